// Package testenv provides what draind's end-to-end tests (and `draind demo`) need around the code under test:
// network namespaces, real test server processes with knobs, load client processes that classify every failure,
// and privilege helpers.
//
// Servers and load clients run as separate processes: the current binary is re-executed (/proc/self/exe) with the
// environment variable DRAIND_TESTENV_ROLE naming the role and DRAIND_TESTENV_OPTS holding its options as JSON. A
// test package that starts children must therefore call Main from its TestMain, and a normal binary must call
// RunChildIfRequested first thing in main:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// Children talk to their parent with JSON lines: events on their stdout, control commands on their stdin.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// btfPath is the kernel's BTF description, needed by CO-RE BPF programs.
const btfPath = "/sys/kernel/btf/vmlinux"

// Require marks a test as needing root and working BPF: the effective UID must be 0, the kernel must expose BTF at
// /sys/kernel/btf/vmlinux, and loading a trivial socket filter with BPF_PROG_LOAD must succeed. If something is
// missing the test fails when the environment variable CI is "true" (CI machines are set up for these tests, so a
// missing requirement is a broken machine) and is skipped otherwise. The message names what is missing.
func Require(t testing.TB) {
	t.Helper()
	if err := checkRequirements(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("testenv: %v", err)
		}
		t.Skipf("testenv: %v", err)
	}
}

// RequireCommand marks a test as needing the programs names on PATH (promtool, prometheus): skipped without them,
// failed when CI is "true" (.ci/run installs them).
func RequireCommand(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("testenv: requires %s: %v", n, err)
			}
			t.Skipf("testenv: requires %s: %v", n, err)
		}
	}
}

func checkRequirements() error {
	if euid := os.Geteuid(); euid != 0 {
		return fmt.Errorf("requires root (running as euid %d)", euid)
	}
	if _, err := os.Stat(btfPath); err != nil {
		return fmt.Errorf("requires kernel BTF: %w", err)
	}
	if err := probeBPF(); err != nil {
		return fmt.Errorf("requires BPF: load socket filter: %w", err)
	}
	return nil
}

// probeBPF loads "r0 = 0; exit" as a socket filter and closes it again. cilium/ebpf retries the load when a signal
// interrupts the verifier (EAGAIN: the Go runtime's preemption signals reach a test binary's threads).
func probeBPF() error {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SocketFilter,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		return err
	}
	return p.Close()
}

// MonoNow returns CLOCK_MONOTONIC in nanoseconds. The clock is shared by all processes on the host, so values taken
// in different processes (children's events, the test itself) can be compared.
func MonoNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		// CLOCK_MONOTONIC always exists on Linux; failing here means the vDSO and the syscall are broken.
		panic(fmt.Sprintf("clock_gettime(CLOCK_MONOTONIC): %v", err))
	}
	return ts.Nano()
}
