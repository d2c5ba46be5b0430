package drain_test

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// selfCounter watches this test process's tree on the port of a fresh loopback listener.
func selfCounter(t *testing.T, track bool) (*drain.Counter, *net.TCPListener) {
	t.Helper()
	testenv.Require(t)
	tr, err := drain.NewTracker(drain.TrackerOptions{})
	if err != nil {
		t.Fatalf("new tracker: %+v", err)
	}
	t.Cleanup(func() { tr.Close() })
	var lc net.ListenConfig
	lc.SetMultipathTCP(false) // Go would pick MPTCP, which draind does not count
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := l.(*net.TCPListener)
	t.Cleanup(func() { ln.Close() })
	p, err := proc.Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	c, err := tr.Watch(p, []uint16{uint16(ln.Addr().(*net.TCPAddr).Port)}, drain.WatchOptions{Track: track})
	if err != nil {
		t.Fatalf("watch: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, ln
}

func mustCount(t *testing.T, c *drain.Counter, want drain.Count) {
	t.Helper()
	got, err := c.Count()
	if err != nil {
		t.Fatalf("count: %v", err)
	}
	if got != want {
		t.Fatalf("count = %+v, want %+v", got, want)
	}
}

func TestCountSelf(t *testing.T) {
	c, ln := selfCounter(t, true)
	mustCount(t, c, drain.Count{})
	var clients []net.Conn
	for range 5 {
		var d net.Dialer
		d.SetMultipathTCP(false)
		cl, err := d.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, cl)
	}
	time.Sleep(50 * time.Millisecond)
	mustCount(t, c, drain.Count{Queued: 5})
	var servers []net.Conn
	for range 3 {
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		servers = append(servers, s)
	}
	mustCount(t, c, drain.Count{Conns: 3, Queued: 2})

	// Close everything from a goroutine while Wait waits for the events.
	go func() {
		time.Sleep(100 * time.Millisecond)
		for range 2 {
			s, err := ln.Accept()
			if err == nil {
				servers = append(servers, s)
			}
		}
		for _, s := range servers {
			time.Sleep(20 * time.Millisecond)
			s.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	n, err := drain.Wait(ctx, c, drain.WaitOptions{Progress: func(n drain.Count) { t.Logf("%v %+v", time.Since(start), n) }})
	if err != nil || n.Total() != 0 {
		t.Fatalf("wait = %+v, %v", n, err)
	}
	t.Logf("drained in %v, %+v", time.Since(start), c.Stats())
	for _, cl := range clients {
		cl.Close()
	}
}

// TestCountTreeAndExclusion: a pre-fork server (a master and two workers sharing one listener) holds 12 long-lived
// connections. Its tree's count includes every worker's connections and the shared listener once; cutting the
// busier worker's subtree out (as draind does for a new process started by the old one) removes exactly that worker's
// share. Two Counters on one process share its tree; closing one leaves the other working. Each figure is checked
// against the ground truth from /proc and sock_diag.
func TestCountTreeAndExclusion(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:8080", Workers: 2})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: "127.0.0.1:8080", Concurrency: -1, KeepAlive: 12, Duration: time.Minute})
	defer load.Stop()
	waitFor(t, func() bool { return load.Progress().KeepAlive.Opened == 12 })

	tr, err := drain.NewTracker(drain.TrackerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	ports := []uint16{8080}
	// Cut out the worker holding more connections (the kernel need not spread them evenly).
	busy := srv.WorkerPIDs[0]
	if a, b := workerConns(t, srv.WorkerPIDs[0], ports), workerConns(t, srv.WorkerPIDs[1], ports); b > a {
		busy = srv.WorkerPIDs[1]
	}
	master, w0 := openProc(t, srv.PID), openProc(t, busy)

	whole, err := tr.Watch(master, ports, drain.WatchOptions{Track: true})
	if err != nil {
		t.Fatal(err)
	}
	cut, err := tr.Watch(master, ports, drain.WatchOptions{Exclude: []*proc.Process{w0}})
	if err != nil {
		t.Fatal(err)
	}
	worker, err := tr.Watch(w0, ports, drain.WatchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	other, err := tr.Watch(master, []uint16{9090}, drain.WatchOptions{})
	if err != nil {
		t.Fatal(err)
	}

	check := func(name string, c *drain.Counter, p *proc.Process, exclude ...int) drain.Count {
		t.Helper()
		got, err := c.Count()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want, err := groundTruth(p, ports, exclude...)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("%s: count %+v, ground truth %+v", name, got, want)
		}
		return got
	}
	all := check("whole tree", whole, master)
	rest := check("tree without the busier worker", cut, master, busy)
	w := check("busier worker", worker, w0)
	if all.Conns != 12 || w.Conns == 0 || rest.Conns+w.Conns != 12 {
		t.Fatalf("whole %+v, without the busier worker %+v, that worker %+v: want 12 = the two parts, the worker's non-zero", all, rest, w)
	}
	if n, err := other.Count(); err != nil || n.Total() != 0 {
		t.Fatalf("port 9090: %+v, %v", n, err)
	}
	if err := cut.Close(); err != nil {
		t.Fatal(err)
	}
	if err := cut.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := cut.Count(); err == nil {
		t.Fatal("a closed counter counted")
	}
	check("whole tree after the exclusion ended", whole, master)
	for _, c := range []*drain.Counter{whole, worker, other} {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// workerConns is the ground truth of what one process holds on ports.
func workerConns(t *testing.T, pid int, ports []uint16) int {
	t.Helper()
	p := openProc(t, pid)
	n, err := groundTruth(p, ports)
	if err != nil {
		t.Fatal(err)
	}
	return n.Conns
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
