package proc_test

import (
	"context"
	"maps"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestWaitExit: WaitExit returns false when its context ends and true once the process exits, promptly in both
// cases; Ino is stable and differs between processes.
func TestWaitExit(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	p, err := proc.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	again, err := proc.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	self, err := proc.Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	a, err1 := p.Ino()
	b, err2 := again.Ino()
	c, err3 := self.Ino()
	if err1 != nil || err2 != nil || err3 != nil || a != b || a == 0 || a == c {
		t.Fatalf("ino of two pidfds of one process: %d (%v), %d (%v); of another: %d (%v)", a, err1, b, err2, c, err3)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	start := time.Now()
	if p.WaitExit(ctx) {
		t.Fatal("WaitExit saw an exit of a running process")
	}
	cancel()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("WaitExit returned %v after its context ended", d)
	}

	go func() {
		time.Sleep(50 * time.Millisecond)
		cmd.Process.Kill()
	}()
	if !p.WaitExit(context.Background()) || !p.Exited() {
		t.Fatal("WaitExit missed the exit")
	}
	cmd.Wait()
}

// TestListening: the LISTEN-only sock_diag dump finds exactly the listeners of a namespace (with their accept
// queues) among established connections, the same as a full dump.
func TestListening(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:8080"})
	testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "[::1]:9090"})
	testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: "127.0.0.1:8080", N: 50})
	if err := h.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: "127.0.0.1:8080", N: 7, SourceStart: "127.9.0.1"})

	p, err := proc.Open(h.PID)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	got, err := proc.Listening(p)
	if err != nil {
		t.Fatal(err)
	}
	dh, err := proc.DiagHandle(p)
	if err != nil {
		t.Fatal(err)
	}
	defer dh.Close()
	want := map[uint64]uint32{}
	all := 0
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := proc.DiagTCP(dh, fam)
		if err != nil {
			t.Fatal(err)
		}
		all += len(socks)
		for _, s := range socks {
			if s.State == proc.TCPListen {
				want[uint64(s.INode)] = s.RQueue
			}
		}
	}
	if !maps.Equal(got, want) || len(got) != 2 || all < 100 {
		t.Fatalf("listening %v, full dump (%d sockets) %v", got, all, want)
	}
	var queued uint32
	for _, q := range got {
		queued += q
	}
	if queued != 7 {
		t.Fatalf("accept queues hold %d, want the 7 connections made while accepting was paused", queued)
	}
}

// TestTree: the tree of a pre-fork server is its master and its workers, and an excluded worker is left out; the
// walk through /proc/PID/task/TID/children finds what a scan of every process's parent finds.
func TestTree(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Workers: 2})
	sorted := func(s []int) []int { slices.Sort(s); return s }
	want := sorted(append([]int{srv.PID}, srv.WorkerPIDs...))
	if got := sorted(proc.Tree(srv.PID)); !slices.Equal(got, want) {
		t.Fatalf("tree of %d: %v, want %v", srv.PID, got, want)
	}
	cut := []int{srv.WorkerPIDs[0]}
	fast, ok := proc.TreeFromChildren(srv.PID, cut)
	if !ok {
		t.Fatal("no /proc/PID/task/TID/children on this kernel")
	}
	scan := proc.TreeFromScan(srv.PID, cut)
	if !slices.Equal(sorted(fast), sorted(scan)) || len(fast) != 2 {
		t.Fatalf("tree without worker %d: children walk %v, scan %v", cut[0], fast, scan)
	}
	self := sorted(proc.TreeFromScan(os.Getpid(), nil))
	if f, _ := proc.TreeFromChildren(os.Getpid(), nil); !slices.Equal(sorted(f), self) {
		t.Fatalf("tree of the test process: children walk %v, scan %v", f, self)
	}
}
