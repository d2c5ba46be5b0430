package testenv_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/testenv"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCP states as sock_diag reports them (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpCloseWait   = 8
	tcpListen      = 10
)

// tcpSockets dumps the IPv4 TCP sockets of ns with sock_diag.
func tcpSockets(t *testing.T, ns *testenv.NetNS) []*netlink.Socket {
	t.Helper()
	for try := 0; ; try++ {
		var socks []*netlink.Socket
		err := ns.Do(func() error {
			var err error
			socks, err = netlink.SocketDiagTCP(unix.AF_INET)
			return err
		})
		if errors.Is(err, netlink.ErrDumpInterrupted) && try < 5 {
			continue
		}
		if err != nil {
			t.Fatalf("sock_diag in %s: %v", ns, err)
		}
		return socks
	}
}

// serverSockets counts the sockets on the server side of port (local port == port) by state, and the distinct
// peer addresses of those not listening.
func serverSockets(t *testing.T, ns *testenv.NetNS, port uint16) (byState map[uint8]int, peers map[string]bool, listener *netlink.Socket) {
	t.Helper()
	byState, peers = map[uint8]int{}, map[string]bool{}
	for _, s := range tcpSockets(t, ns) {
		if s.ID.SourcePort != port {
			continue
		}
		byState[s.State]++
		if s.State == tcpListen {
			listener = s
			continue
		}
		peers[s.ID.Destination.String()] = true
	}
	return byState, peers, listener
}

func portOf(t *testing.T, addr string) uint16 {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

func holderStats(t *testing.T, h *testenv.Holder) testenv.HolderStats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := h.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waitHolder polls Stats until cond holds.
func waitHolder(t *testing.T, h *testenv.Holder, what string, timeout time.Duration, cond func(testenv.HolderStats) bool) testenv.HolderStats {
	t.Helper()
	var st testenv.HolderStats
	deadline := time.Now().Add(timeout)
	for {
		st = holderStats(t, h)
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for holder %s: %+v", timeout, what, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestHolderAndConns(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", ReusePort: true})
	port := portOf(t, h.Addr)
	if port == 0 {
		t.Fatalf("port not resolved: %s", h.Addr)
	}
	start := time.Now()
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 2000, PerSource: 500, Send: []byte("hello\n")})
	cs := c.Snapshot()
	t.Logf("2000 connections in %v (client: %v), sources %v", time.Since(start), cs.OpenTook, cs.Sources)
	if c.Established() != 2000 || c.Failed() != 0 || cs.Open != 2000 || cs.Connecting != 0 {
		t.Fatalf("conns stats %+v", cs)
	}
	if want := []string{"127.1.0.1", "127.1.0.2", "127.1.0.3", "127.1.0.4"}; fmt.Sprint(cs.Sources) != fmt.Sprint(want) {
		t.Errorf("sources %v, want %v", cs.Sources, want)
	}
	st := waitHolder(t, h, "to hold 2000", 10*time.Second, func(s testenv.HolderStats) bool { return s.Open == 2000 })
	if st.Accepted != 2000 || st.Closed != 0 || st.LastCloseMono != 0 || !st.Listening || st.Paused {
		t.Fatalf("holder stats %+v", st)
	}
	waitFor(t, "Open() to catch up", 2*time.Second, func() bool { return h.Open() == 2000 && h.Accepted() == 2000 })

	// The kernel agrees: 2000 established server-side sockets, from 4 source addresses.
	byState, peers, ln := serverSockets(t, ns, port)
	if byState[tcpEstablished] != 2000 || len(peers) != 4 || ln == nil {
		t.Fatalf("sock_diag: states %v, peers %v, listener %v", byState, peers, ln)
	}

	// Close 100 at once, then the rest spread over 400ms.
	before := testenv.MonoNow()
	if err := c.Close(ctxFor(t, 10*time.Second), 100); err != nil {
		t.Fatal(err)
	}
	if got := c.Open(); got != 1900 {
		t.Fatalf("client holds %d after closing 100", got)
	}
	st = waitHolder(t, h, "to close 100", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 1900 })
	if st.LastCloseMono < before || st.LastCloseMono > testenv.MonoNow() || st.Closed != 100 || st.PeerEnded != 100 {
		t.Fatalf("after closing 100: %+v (before %d)", st, before)
	}
	firstClose := st.LastCloseMono
	if err := c.Close(ctxFor(t, 10*time.Second), 5000); err == nil || !strings.Contains(err.Error(), "only 1900") {
		t.Errorf("closing more than open: %v", err)
	}

	t0 := time.Now()
	if err := c.CloseAll(ctxFor(t, 10*time.Second), 400*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	if took < 350*time.Millisecond || took > 3*time.Second {
		t.Errorf("CloseAll over 400ms took %v", took)
	}
	cs = c.Snapshot()
	if cs.Open != 0 || cs.Closed != 2000 || cs.PeerEnded != 0 {
		t.Errorf("client after CloseAll: %+v", cs)
	}
	st = waitHolder(t, h, "to close all", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 0 })
	if st.Closed != 2000 || st.LastCloseMono <= firstClose+int64(300*time.Millisecond) || st.LastCloseMono > testenv.MonoNow() {
		t.Fatalf("after CloseAll: %+v (first close at %d)", st, firstClose)
	}
	t.Logf("CloseAll(400ms) took %v; holder's closes spanned %v", took, time.Duration(st.LastCloseMono-firstClose))
	if byState, _, _ := serverSockets(t, ns, port); byState[tcpEstablished]+byState[tcpCloseWait] != 0 {
		t.Errorf("server-side sockets left: %v", byState)
	}
	if err := c.CloseAll(ctxFor(t, 5*time.Second), 0); err != nil {
		t.Errorf("CloseAll with nothing open: %v", err)
	}
}

func TestConnsFailuresAreReported(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	_, err := testenv.StartConns(ctxFor(t, 20*time.Second), ns, testenv.ConnsOptions{Addr: "127.0.0.1:9", N: 5})
	if err == nil || !strings.Contains(err.Error(), "0 of 5") || !strings.Contains(err.Error(), "5 failed") ||
		!strings.Contains(err.Error(), "refused") {
		t.Fatalf("want an error saying 0 of 5 established, 5 refused; got %v", err)
	}
	t.Logf("error: %v", err)
}

func TestHolderCloseDelay(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	const delay = 800 * time.Millisecond
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", CloseDelay: delay})
	port := portOf(t, h.Addr)
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 50})
	waitHolder(t, h, "to hold 50", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 50 })

	t0 := testenv.MonoNow()
	if err := c.CloseAll(ctxFor(t, 10*time.Second), 0); err != nil {
		t.Fatal(err)
	}
	// The peer's FIN is seen, the fds are kept: CLOSE_WAIT.
	st := waitHolder(t, h, "to see 50 EOFs", 2*time.Second, func(s testenv.HolderStats) bool { return s.PeerEnded == 50 })
	if st.Open != 50 || st.Closing != 50 || st.Closed != 0 {
		t.Fatalf("during CloseDelay: %+v", st)
	}
	if byState, _, _ := serverSockets(t, ns, port); byState[tcpCloseWait] != 50 {
		t.Fatalf("sock_diag during CloseDelay: %v, want 50 in CLOSE_WAIT", byState)
	}
	st = waitHolder(t, h, "to close after the delay", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 0 })
	if d := time.Duration(st.LastCloseMono - t0); d < delay || d > delay+time.Second {
		t.Errorf("last close %v after CloseAll, want about %v", d, delay)
	}
	if byState, _, _ := serverSockets(t, ns, port); byState[tcpCloseWait] != 0 {
		t.Fatalf("sock_diag after CloseDelay: %v", byState)
	}

	// A reset by the peer: the fd is kept too (the socket is closed by the kernel but not by the holder).
	err := ns.Do(func() error {
		for range 5 {
			var d net.Dialer
			d.SetMultipathTCP(false)
			conn, err := d.Dial("tcp", h.Addr)
			if err != nil {
				return err
			}
			_ = conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	st = waitHolder(t, h, "to see 5 resets", 2*time.Second, func(s testenv.HolderStats) bool { return s.PeerEnded == 55 })
	if st.Open != 5 || st.Closing != 5 {
		t.Fatalf("after resets, during CloseDelay: %+v", st)
	}
	waitHolder(t, h, "to close the reset ones", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 0 && s.Closed == 55 })
}

func TestHolderSignal(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0"})
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 20})
	waitHolder(t, h, "to hold 20", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 20 })

	// SIGHUP is reported, nothing else.
	if err := h.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "SIGHUP event", 5*time.Second, func() bool { return len(h.Signals()) == 1 })
	if h.Exited() || holderStats(t, h).Open != 20 {
		t.Fatal("holder changed on SIGHUP")
	}

	// The reaction-time measurement: last close, then the signal.
	if err := c.Close(ctxFor(t, 5*time.Second), 15); err != nil {
		t.Fatal(err)
	}
	st := waitHolder(t, h, "to hold 5", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 5 })
	lastClose := st.LastCloseMono
	before := testenv.MonoNow()
	if err := h.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if exited, err := h.Wait(ctx); !exited || err != nil {
		t.Fatalf("Wait after SIGTERM: exited=%v err=%v", exited, err)
	}
	after := testenv.MonoNow()
	sigs := h.Signals()
	if len(sigs) != 2 || sigs[1].Signal != syscall.SIGTERM || sigs[1].MonoNS < before || sigs[1].MonoNS > after {
		t.Fatalf("signals %+v, want SIGHUP then SIGTERM within [%d, %d]", sigs, before, after)
	}
	t.Logf("SIGTERM seen %v after kill(2), %v after the last close", time.Duration(sigs[1].MonoNS-before),
		time.Duration(sigs[1].MonoNS-lastClose))
	final := h.Snapshot()
	if final.HeldAtExit != 5 || final.Open != 0 || final.LastCloseMono != lastClose || final.Listening {
		t.Errorf("final stats %+v (last close before the signal %d)", final, lastClose)
	}
	// The exit closed the rest: the client sees them end.
	waitFor(t, "client to see the exit", 5*time.Second, func() bool { return c.Snapshot().PeerEnded == 5 })
	if _, err := h.Stats(ctx); err == nil {
		t.Error("Stats after exit succeeded")
	}
}

func TestHolderPauseAcceptAndCloseListener(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", Backlog: 100})
	port := portOf(t, h.Addr)
	if err := h.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	if st := holderStats(t, h); !st.Paused || !st.Listening {
		t.Fatalf("after PauseAccept: %+v", st)
	}
	// Handshakes complete into the accept queue, so the client gets all 60.
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 60})
	_, _, ln := serverSockets(t, ns, port)
	if ln == nil || ln.RQueue != 60 || ln.WQueue != 100 {
		t.Fatalf("listener while paused: %+v, want accept queue 60 of 100", ln)
	}
	if st := holderStats(t, h); st.Accepted != 0 {
		t.Fatalf("accepted %d while paused", st.Accepted)
	}
	if err := h.ResumeAccept(); err != nil {
		t.Fatal(err)
	}
	waitHolder(t, h, "to accept the queue", 5*time.Second, func(s testenv.HolderStats) bool { return s.Accepted == 60 && s.Open == 60 })
	if _, _, ln := serverSockets(t, ns, port); ln == nil || ln.RQueue != 0 {
		t.Fatalf("listener after resume: %+v", ln)
	}

	// Pause again with a queue, then close the listener: the queued connections are reset, the held ones stay.
	if err := h.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	c2 := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 10, SourceStart: "127.3.0.1"})
	if err := h.CloseListener(); err != nil {
		t.Fatal(err)
	}
	st := holderStats(t, h)
	if st.Listening || st.Open != 60 || st.Accepted != 60 {
		t.Fatalf("after CloseListener: %+v", st)
	}
	byState, _, ln := serverSockets(t, ns, port)
	if ln != nil || byState[tcpEstablished] != 60 {
		t.Fatalf("sock_diag after CloseListener: %v, listener %+v", byState, ln)
	}
	waitFor(t, "the queued ones to be reset", 5*time.Second, func() bool { return c2.Snapshot().PeerEnded == 10 })
	if c.Snapshot().PeerEnded != 0 {
		t.Errorf("held connections ended: %+v", c.Snapshot())
	}
	_, err := testenv.StartConns(ctxFor(t, 20*time.Second), ns, testenv.ConnsOptions{Addr: h.Addr, N: 1})
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("connect after CloseListener: %v, want refused", err)
	}
}

func TestChurn(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0"})
	ch := testenv.StartChurnForTest(t, ns, testenv.ChurnOptions{
		Addr: h.Addr, Duration: 2 * time.Second, Hold: 50 * time.Millisecond, IdleHold: 300 * time.Millisecond,
	})
	t.Logf("seed %d", ch.Seed)
	time.Sleep(600 * time.Millisecond)

	// Frozen, it does nothing; continued, it goes on.
	if err := ch.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // let the last events drain
	frozen := ch.Progress()
	time.Sleep(300 * time.Millisecond)
	if p := ch.Progress(); p.Attempts != frozen.Attempts {
		t.Errorf("progress while frozen: %d -> %d attempts", frozen.Attempts, p.Attempts)
	}
	if err := ch.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "progress after SIGCONT", 5*time.Second, func() bool { return ch.Progress().Attempts > frozen.Attempts })

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if exited, err := ch.Wait(ctx); !exited || err != nil { // Duration ends it
		t.Fatalf("churn did not end by itself: exited=%v err=%v", exited, err)
	}
	res, err := ch.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("churn: %+v", res)
	if res.FailureCount() != 0 {
		t.Fatalf("failures %v: %v", res.Failures, res.Samples)
	}
	if res.Closed == 0 || res.HalfClosed == 0 || res.Reset == 0 || res.Idle == 0 {
		t.Fatalf("want every action, got %+v", res)
	}
	if res.Opened != res.Attempts || res.Opened != res.Closed+res.HalfClosed+res.Reset+res.Idle {
		t.Fatalf("counts do not add up: %+v", res)
	}
	// Every connection reached the holder, and the holder closed them all.
	st := waitHolder(t, h, "to close all churn connections", 5*time.Second, func(s testenv.HolderStats) bool {
		return s.Accepted == res.Opened && s.Open == 0
	})
	t.Logf("holder: %+v", st)
}

// One holder process holding 100,000 connections (DRAIND_TESTENV_BIG_N if set) from one conns process.
func TestHolderConns100k(t *testing.T) {
	testenv.Require(t)
	if os.Getenv("DRAIND_TESTENV_BIG") != "1" {
		t.Skip("set DRAIND_TESTENV_BIG=1 to open 100,000 connections")
	}
	n := 100_000
	if v := os.Getenv("DRAIND_TESTENV_BIG_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			t.Fatalf("bad DRAIND_TESTENV_BIG_N %q", v)
		}
	}
	if lim := testenv.NofileLimit(); lim < uint64(n)+64 {
		t.Skipf("%d connections need RLIMIT_NOFILE > %d per process; the children get %d (raising the hard limit "+
			"needs CAP_SYS_RESOURCE; set DRAIND_TESTENV_BIG_N lower, or see TestHolderWorkers100k)", n, n+64, lim)
	}
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0"})
	start := time.Now()
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: n})
	opened := time.Since(start)
	st := waitHolder(t, h, "to hold all", 30*time.Second, func(s testenv.HolderStats) bool { return s.Open == n })
	held := time.Since(start)
	cs := c.Snapshot()
	t.Logf("%d connections: established in %v (client's own clock %v), all held by the holder after %v; sources %v",
		n, opened, cs.OpenTook, held, cs.Sources)
	t.Logf("holder %s, client %s", memOf(t, h.PID), memOf(t, c.PID))
	if st.Accepted != n || st.AcceptErrors != 0 {
		t.Fatalf("holder stats %+v", st)
	}
	t0 := testenv.MonoNow()
	if err := c.CloseAll(ctxFor(t, time.Minute), 0); err != nil {
		t.Fatal(err)
	}
	closed := time.Duration(testenv.MonoNow() - t0)
	st = waitHolder(t, h, "to close all", 30*time.Second, func(s testenv.HolderStats) bool { return s.Open == 0 })
	t.Logf("client closed all in %v; the holder closed its last %v after the start", closed,
		time.Duration(st.LastCloseMono-t0))
	t.Logf("after close: holder %s, client %s", memOf(t, h.PID), memOf(t, c.PID))
}

func memOf(t *testing.T, pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") || strings.HasPrefix(l, "VmRSS:") {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, ", ")
}

// socketFDs counts the socket fds of process pid.
func socketFDs(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(dir + "/" + e.Name()); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

// ppidOf returns the parent PID of process pid.
func ppidOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// pid (comm) state ppid ...; comm may contain anything, so split after its last ')'.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatalf("parse %q: %v", s, err)
	}
	return ppid
}

// checkWorkers checks that the holder's workers are n children of its master and returns how many connections each
// holds (its socket fds but the listener).
func checkWorkers(t *testing.T, h *testenv.Holder, n int) []int {
	t.Helper()
	if len(h.WorkerPIDs) != n {
		t.Fatalf("WorkerPIDs %v, want %d", h.WorkerPIDs, n)
	}
	held := make([]int, n)
	for i, pid := range h.WorkerPIDs {
		if ppid := ppidOf(t, pid); ppid != h.PID {
			t.Fatalf("worker %d (pid %d) has parent %d, not the master %d", i, pid, ppid, h.PID)
		}
		held[i] = socketFDs(t, pid) - 1
	}
	return held
}

// gone reports whether process pid has exited: it is a zombie (its fds are closed) or reaped.
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && (f[0] == "Z" || f[0] == "X")
}

func sum(v []int) int {
	n := 0
	for _, x := range v {
		n += x
	}
	return n
}

func TestHolderWorkers(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	const perWorker = 500
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", Workers: 3, PerWorker: perWorker})
	port := portOf(t, h.Addr)
	checkWorkers(t, h, 3)
	if socketFDs(t, h.PID) != 1 {
		t.Errorf("master has %d sockets, want its copy of the listener only", socketFDs(t, h.PID))
	}

	start := time.Now()
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 1200})
	st := waitHolder(t, h, "to hold 1200", 10*time.Second, func(s testenv.HolderStats) bool { return s.Open == 1200 })
	t.Logf("1200 connections held after %v", time.Since(start))
	if st.Accepted != 1200 || st.Closed != 0 || st.LastCloseMono != 0 || st.AcceptErrors != 0 || !st.Listening || st.Paused {
		t.Fatalf("holder stats %+v", st)
	}
	held := checkWorkers(t, h, 3)
	t.Logf("held by the workers: %v", held)
	for i, n := range held {
		if n > perWorker {
			t.Errorf("worker %d holds %d > PerWorker %d", i, n, perWorker)
		}
	}
	if sum(held) != 1200 {
		t.Errorf("the workers hold %v, together not 1200", held)
	}
	if byState, _, ln := serverSockets(t, ns, port); byState[tcpEstablished] != 1200 || ln == nil {
		t.Fatalf("sock_diag: states %v, listener %v", byState, ln)
	}

	// Filled up: every worker holds PerWorker, and what comes then waits in the accept queue.
	c2 := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 300, SourceStart: "127.2.0.1"})
	waitHolder(t, h, "to hold 1500", 10*time.Second, func(s testenv.HolderStats) bool { return s.Open == 1500 })
	if held := checkWorkers(t, h, 3); fmt.Sprint(held) != "[500 500 500]" {
		t.Fatalf("full workers hold %v", held)
	}
	c3 := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 20, SourceStart: "127.3.0.1"})
	time.Sleep(200 * time.Millisecond)
	if st := holderStats(t, h); st.Open != 1500 || st.Accepted != 1500 {
		t.Fatalf("full holder accepted more: %+v", st)
	}
	if _, _, ln := serverSockets(t, ns, port); ln == nil || ln.RQueue != 20 {
		t.Fatalf("listener of the full holder: %+v, want 20 queued", ln)
	}
	// Room again: the queue is accepted.
	if err := c2.CloseAll(ctxFor(t, 10*time.Second), 0); err != nil {
		t.Fatal(err)
	}
	st = waitHolder(t, h, "to accept the queue", 10*time.Second, func(s testenv.HolderStats) bool { return s.Accepted == 1520 })
	waitHolder(t, h, "to hold 1220", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 1220 })
	if held := checkWorkers(t, h, 3); sum(held) != 1220 {
		t.Fatalf("after making room the workers hold %v", held)
	}
	if _, _, ln := serverSockets(t, ns, port); ln == nil || ln.RQueue != 0 {
		t.Fatalf("listener after making room: %+v", ln)
	}

	// Closing all: the latest close of any worker is reported.
	before := testenv.MonoNow()
	for _, cc := range []*testenv.Conns{c, c3} {
		if err := cc.CloseAll(ctxFor(t, 10*time.Second), 100*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	st = waitHolder(t, h, "to close all", 10*time.Second, func(s testenv.HolderStats) bool { return s.Open == 0 })
	if st.Closed != 1520 || st.PeerEnded != 1520 || st.LastCloseMono < before+int64(150*time.Millisecond) ||
		st.LastCloseMono > testenv.MonoNow() {
		t.Fatalf("after CloseAll: %+v (CloseAll started at %d)", st, before)
	}
	waitFor(t, "Snapshot to catch up", 2*time.Second, func() bool { return h.Open() == 0 && h.LastCloseMono() == st.LastCloseMono })
	lastClose := st.LastCloseMono
	if held := checkWorkers(t, h, 3); sum(held) != 0 {
		t.Fatalf("after CloseAll the workers hold %v", held)
	}

	// SIGTERM: one signal event, the workers close what they hold, the whole tree exits.
	c4 := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 30, SourceStart: "127.4.0.1"})
	waitHolder(t, h, "to hold 30", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 30 })
	before = testenv.MonoNow()
	if err := h.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if exited, err := h.Wait(ctxFor(t, 10*time.Second)); !exited || err != nil {
		t.Fatalf("Wait after SIGTERM: exited=%v err=%v", exited, err)
	}
	after := testenv.MonoNow()
	t.Logf("the tree exited %v after SIGTERM", time.Since(t0))
	sigs := h.Signals()
	if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM || sigs[0].MonoNS < before || sigs[0].MonoNS > after {
		t.Fatalf("signals %+v, want one SIGTERM within [%d, %d]", sigs, before, after)
	}
	final := h.Snapshot()
	if final.HeldAtExit != 30 || final.Open != 0 || final.Accepted != 1550 || final.Closed != 1520 ||
		final.LastCloseMono != lastClose || final.Listening {
		t.Errorf("final stats %+v (last close before the signal %d)", final, lastClose)
	}
	for _, pid := range h.WorkerPIDs {
		if !gone(pid) {
			t.Errorf("worker %d still there after the master exited", pid)
		}
	}
	waitFor(t, "client to see the exit", 5*time.Second, func() bool { return c4.Snapshot().PeerEnded == 30 })
	if byState, _, ln := serverSockets(t, ns, port); ln != nil || byState[tcpEstablished] != 0 {
		t.Errorf("server-side sockets after the exit: %v, listener %v", byState, ln)
	}
}

func TestHolderWorkersPauseAcceptAndCloseListener(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", Backlog: 100, Workers: 2})
	port := portOf(t, h.Addr)
	if err := h.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	if st := holderStats(t, h); !st.Paused || !st.Listening {
		t.Fatalf("after PauseAccept: %+v", st)
	}
	c := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 60})
	if _, _, ln := serverSockets(t, ns, port); ln == nil || ln.RQueue != 60 || ln.WQueue != 100 {
		t.Fatalf("listener while paused: %+v, want accept queue 60 of 100", ln)
	}
	if st := holderStats(t, h); st.Accepted != 0 {
		t.Fatalf("accepted %d while paused", st.Accepted)
	}
	if err := h.ResumeAccept(); err != nil {
		t.Fatal(err)
	}
	st := waitHolder(t, h, "to accept the queue", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 60 })
	if st.Paused || st.Accepted != 60 {
		t.Fatalf("after ResumeAccept: %+v", st)
	}
	t.Logf("held by the workers: %v", checkWorkers(t, h, 2))

	if err := h.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	c2 := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 10, SourceStart: "127.3.0.1"})
	if err := h.CloseListener(); err != nil {
		t.Fatal(err)
	}
	if st := holderStats(t, h); st.Listening || st.Open != 60 || st.Accepted != 60 {
		t.Fatalf("after CloseListener: %+v", st)
	}
	if socketFDs(t, h.PID) != 0 {
		t.Errorf("the master still has a socket after CloseListener")
	}
	byState, _, ln := serverSockets(t, ns, port)
	if ln != nil || byState[tcpEstablished] != 60 {
		t.Fatalf("sock_diag after CloseListener: %v, listener %+v", byState, ln)
	}
	waitFor(t, "the queued ones to be reset", 5*time.Second, func() bool { return c2.Snapshot().PeerEnded == 10 })
	if c.Snapshot().PeerEnded != 0 {
		t.Errorf("held connections ended: %+v", c.Snapshot())
	}
}

func TestHolderWorkersDie(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)

	// A worker that dies takes the holder with it, reported.
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", Workers: 2})
	testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: h.Addr, N: 10})
	waitHolder(t, h, "to hold 10", 5*time.Second, func(s testenv.HolderStats) bool { return s.Open == 10 })
	if err := syscall.Kill(h.WorkerPIDs[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	exited, err := h.Wait(ctxFor(t, 10*time.Second))
	var ee *exec.ExitError
	if !exited || !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("Wait after a worker died: exited=%v err=%v, want exit status 1", exited, err)
	}
	if err := h.Err(); err == nil || !strings.Contains(err.Error(), "worker 0") || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Err() = %v, want worker 0 killed", err)
	} else {
		t.Logf("reported: %v", err)
	}
	if !gone(h.WorkerPIDs[1]) {
		t.Errorf("the other worker %d is still there", h.WorkerPIDs[1])
	}

	// The workers die with the master (Pdeathsig), and Wait waits for all of them.
	h = testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", Workers: 2})
	if err := syscall.Kill(h.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if exited, _ := h.Wait(ctxFor(t, 10*time.Second)); !exited || !h.Exited() {
		t.Fatal("holder did not exit after SIGKILL")
	}
	for _, pid := range h.WorkerPIDs {
		if !gone(pid) {
			t.Errorf("worker %d still there after the master was killed", pid)
		}
	}

	if _, err := testenv.StartHolder(ctxFor(t, 5*time.Second), ns, testenv.HolderOptions{PerWorker: 10}); err == nil {
		t.Error("PerWorker without Workers accepted")
	}
}

// A pre-fork holder with 6 workers holding 100,000 connections (DRAIND_TESTENV_BIG_N if set) from 6 conns
// processes: one process cannot hold that many when RLIMIT_NOFILE cannot be raised.
func TestHolderWorkers100k(t *testing.T) {
	testenv.Require(t)
	if os.Getenv("DRAIND_TESTENV_BIG") != "1" {
		t.Skip("set DRAIND_TESTENV_BIG=1 to open 100,000 connections")
	}
	n := 100_000
	if v := os.Getenv("DRAIND_TESTENV_BIG_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			t.Fatalf("bad DRAIND_TESTENV_BIG_N %q", v)
		}
	}
	const workers, clients = 6, 6
	if lim := testenv.NofileLimit(); lim < uint64(n/workers)+200 {
		t.Skipf("%d connections need RLIMIT_NOFILE > %d per process; the children get %d", n, n/workers+200, lim)
	}
	ns := testenv.NetNSForTest(t)
	h := testenv.StartHolderForTest(t, ns, testenv.HolderOptions{Addr: "127.0.0.1:0", Workers: workers})
	st := holderStats(t, h)
	t.Logf("holder: master %d, workers %v, MaxFDs %d", h.PID, h.WorkerPIDs, st.MaxFDs)

	start := time.Now()
	cs := make([]*testenv.Conns, clients)
	errs := make([]error, clients)
	var wg sync.WaitGroup
	for i := range clients {
		k := n / clients
		if i < n%clients {
			k++
		}
		opts := testenv.ConnsOptions{Addr: h.Addr, N: k, SourceStart: fmt.Sprintf("127.%d.0.1", 1+10*i)}
		wg.Go(func() {
			cs[i], errs[i] = testenv.StartConns(context.Background(), ns, opts)
		})
	}
	wg.Wait()
	for _, c := range cs {
		if c != nil {
			t.Cleanup(func() {
				_ = c.Kill()
				_, _ = c.Wait(context.Background())
			})
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	opened := time.Since(start)
	st = waitHolder(t, h, "to hold all", time.Minute, func(s testenv.HolderStats) bool { return s.Open == n })
	held := time.Since(start)
	t.Logf("%d connections: established by %d clients in %v, all held by the holder after %v", n, clients, opened, held)
	for i, c := range cs {
		t.Logf("  client %d: %v, sources %v", i, c.Snapshot().OpenTook, c.Snapshot().Sources)
	}
	if st.Accepted != n || st.AcceptErrors != 0 {
		t.Fatalf("holder stats %+v", st)
	}
	perWorker := checkWorkers(t, h, workers)
	t.Logf("held by the workers: %v", perWorker)
	if sum(perWorker) != n {
		t.Errorf("the workers hold %v, together not %d", perWorker, n)
	}
	t.Logf("master %s", memOf(t, h.PID))
	for i, pid := range h.WorkerPIDs {
		t.Logf("worker %d %s", i, memOf(t, pid))
	}
	t.Logf("client 0 %s", memOf(t, cs[0].PID))

	t0 := testenv.MonoNow()
	for i, c := range cs {
		wg.Go(func() {
			errs[i] = c.CloseAll(ctxFor(t, time.Minute), 0)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	closed := time.Duration(testenv.MonoNow() - t0)
	st = waitHolder(t, h, "to close all", time.Minute, func(s testenv.HolderStats) bool { return s.Open == 0 })
	t.Logf("the clients closed all in %v; the holder closed its last %v after the start", closed,
		time.Duration(st.LastCloseMono-t0))
	if st.Closed != n {
		t.Errorf("holder stats after close %+v", st)
	}
	t.Logf("after close: master %s", memOf(t, h.PID))
	for i, pid := range h.WorkerPIDs {
		t.Logf("after close: worker %d %s", i, memOf(t, pid))
	}
}
