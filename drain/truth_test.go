package drain_test

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/proc"
)

// groundTruth counts what the tree of p (less the subtrees rooted at exclude) holds on ports, without BPF: the fd
// tables under /proc joined with a sock_diag dump in p's network namespace, the way `ss -tanp` would show it.
func groundTruth(p *proc.Process, ports []uint16, exclude ...int) (drain.Count, error) {
	var n drain.Count
	if p.Exited() {
		return n, nil
	}
	inodes := map[uint32]bool{}
	for _, pid := range proc.Tree(p.PID, exclude...) {
		socks, err := proc.Sockets(pid)
		if err != nil {
			continue // exited meanwhile: it holds nothing
		}
		for _, s := range socks {
			inodes[uint32(s.Inode)] = true
		}
	}
	h, err := proc.DiagHandle(p)
	if err != nil {
		return n, err
	}
	defer h.Close()
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := proc.DiagTCP(h, fam)
		if err != nil {
			return n, err
		}
		for _, s := range socks {
			if s.INode == 0 || !inodes[s.INode] || !slices.Contains(ports, s.ID.SourcePort) {
				continue
			}
			if s.State == proc.TCPListen {
				n.Queued += int(s.RQueue)
			} else {
				n.Conns++
			}
		}
	}
	return n, nil
}

// freeze stops processes with SIGSTOP and returns once every thread of each is stopped; the returned function
// resumes them.
func freeze(t testing.TB, pids ...int) (thaw func()) {
	t.Helper()
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil && err != syscall.ESRCH { // gone: nothing to freeze
			t.Fatalf("stop %d: %v", pid, err)
		}
	}
	thaw = func() {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for !stopped(pid) {
			if time.Now().After(deadline) {
				thaw()
				t.Fatalf("process %d did not stop", pid)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
	return thaw
}

// stopped reports whether every thread of pid is stopped (or the process is gone).
func stopped(pid int) bool {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return true
	}
	for _, task := range tasks {
		b, err := os.ReadFile(dir + "/" + task.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) == 0 || (f[0] != "T" && f[0] != "t" && f[0] != "Z" && f[0] != "X") {
			return false
		}
	}
	return true
}
