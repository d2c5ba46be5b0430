package testenv_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
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
			"needs CAP_SYS_RESOURCE; set DRAIND_TESTENV_BIG_N lower)", n, n+64, lim)
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
