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
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"testing"
	"unsafe"

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

// bpfProgLoadAttr is the prefix of union bpf_attr used by BPF_PROG_LOAD up to prog_flags; the kernel treats the
// missing tail as zero.
type bpfProgLoadAttr struct {
	progType    uint32
	insnCnt     uint32
	insns       uint64
	license     uint64
	logLevel    uint32
	logSize     uint32
	logBuf      uint64
	kernVersion uint32
	progFlags   uint32
}

// probeBPF loads "r0 = 0; exit" as a socket filter and closes it again.
func probeBPF() error {
	insns := []byte{
		0xb7, 0, 0, 0, 0, 0, 0, 0, // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 0
		0x95, 0, 0, 0, 0, 0, 0, 0, // BPF_JMP | BPF_EXIT
	}
	license := []byte("GPL\x00")
	attr := bpfProgLoadAttr{
		progType: unix.BPF_PROG_TYPE_SOCKET_FILTER,
		insnCnt:  uint32(len(insns) / 8),
		insns:    uint64(uintptr(unsafe.Pointer(&insns[0]))),
		license:  uint64(uintptr(unsafe.Pointer(&license[0]))),
	}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(insns)
	runtime.KeepAlive(license)
	if errno != 0 {
		return errno
	}
	if int(fd) < 0 {
		return errors.New("invalid program fd")
	}
	return unix.Close(int(fd))
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
