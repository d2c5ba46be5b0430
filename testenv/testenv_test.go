package testenv_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/testenv"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func stopLoad(t *testing.T, l *testenv.Load) testenv.LoadResult {
	t.Helper()
	res, err := l.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("load: requests=%d ok=%d failures=%v byServer=%v keepAlive=%+v", res.Requests, res.OK, res.Failures,
		res.ByServer, res.KeepAlive)
	for _, s := range res.FailureSamples {
		t.Logf("  sample: %s", s)
	}
	return res
}

func TestNetNS(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	if !strings.HasPrefix(ns.Name, "draind-test-") || ns.Path != filepath.Join("/run/netns", ns.Name) {
		t.Fatalf("unexpected name %q path %q", ns.Name, ns.Path)
	}
	host, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	var inside string
	var loUp bool
	err = ns.Do(func() error {
		var err error
		if inside, err = os.Readlink("/proc/thread-self/ns/net"); err != nil {
			return err
		}
		lo, err := net.InterfaceByName("lo")
		if err != nil {
			return err
		}
		loUp = lo.Flags&net.FlagUp != 0
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if inside == host {
		t.Fatalf("Do ran in the host namespace %s", host)
	}
	if !loUp {
		t.Error("lo is down in the new namespace")
	}
	if after, _ := os.Readlink("/proc/thread-self/ns/net"); after != host {
		t.Fatalf("caller's thread left in %s", after)
	}

	// Panics are re-raised in the caller, with the thread switched back.
	func() {
		defer func() {
			if p := recover(); p != "boom" {
				t.Errorf("recovered %v, want boom", p)
			}
		}()
		_ = ns.Do(func() error { panic("boom") })
	}()

	hostMigrate, err := (*testenv.NetNS)(nil).SysctlValue("net/ipv4/tcp_migrate_req")
	if err != nil {
		t.Fatal(err)
	}
	want := "1"
	if hostMigrate == "1" {
		want = "0"
	}
	if err := ns.Sysctl("net.ipv4.tcp_migrate_req", want); err != nil {
		t.Fatal(err)
	}
	if got, err := ns.SysctlValue("net/ipv4/tcp_migrate_req"); err != nil || got != want {
		t.Fatalf("sysctl in netns = %q, %v; want %q", got, err, want)
	}
	if got, _ := (*testenv.NetNS)(nil).SysctlValue("net/ipv4/tcp_migrate_req"); got != hostMigrate {
		t.Fatalf("host sysctl changed from %q to %q", hostMigrate, got)
	}

	if err := ns.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ns.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := os.Stat(ns.Path); !os.IsNotExist(err) {
		t.Fatalf("%s still exists after Close: %v", ns.Path, err)
	}
}

func TestServerAndLoad(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{ID: "a", ReusePort: true})
	if srv.Addr != "127.0.0.1:8080" {
		t.Errorf("Addr = %q", srv.Addr)
	}
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Concurrency: 32})
	time.Sleep(time.Second)
	if p := load.Progress(); p.Requests == 0 {
		t.Error("no progress reported after 1s")
	}
	res := stopLoad(t, load)
	if res.OK == 0 || res.FailureCount() != 0 || res.Requests != res.OK || res.ByServer["a"] != res.OK {
		t.Fatalf("want only successes from a, got %+v", res)
	}
	sp := res.Spans["a"]
	if sp.FirstStartNS == 0 || sp.LastStartNS < sp.FirstStartNS || sp.LastStartNS > testenv.MonoNow() {
		t.Errorf("bad span %+v", sp)
	}
	// Same result again.
	if again, err := load.Stop(); err != nil || again.OK != res.OK {
		t.Errorf("second Stop: %+v, %v", again, err)
	}
	// Every request the load saw answered was counted by the server.
	waitFor(t, "served count", 2*time.Second, func() bool { return srv.Served() == res.OK })

	// A graceful stop: exit status 0.
	if err := srv.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if exited, err := srv.Wait(ctx); !exited || err != nil {
		t.Fatalf("Wait after SIGTERM: exited=%v err=%v", exited, err)
	}
	if !srv.Exited() {
		t.Error("Exited() false after Wait")
	}
	if err := srv.Kill(); err != nil {
		t.Errorf("Kill after exit: %v", err)
	}
}

func TestListenerIsPlainTCPWithReusePort(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{ReusePort: true, Listeners: 2, Addr: "127.0.0.1:0"})
	if strings.HasSuffix(srv.Addr, ":0") {
		t.Fatalf("port not resolved: %s", srv.Addr)
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", srv.PID))
	if err != nil {
		t.Fatal(err)
	}
	pfd, err := unix.PidfdOpen(srv.PID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pfd)
	var tcp, reuse int
	for _, e := range fds {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		own, err := unix.PidfdGetfd(pfd, fd, 0)
		if err != nil {
			continue
		}
		proto, err1 := unix.GetsockoptInt(own, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		acc, err2 := unix.GetsockoptInt(own, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		rp, err3 := unix.GetsockoptInt(own, unix.SOL_SOCKET, unix.SO_REUSEPORT)
		unix.Close(own)
		if err1 != nil || err2 != nil || err3 != nil || acc != 1 {
			continue
		}
		if proto == unix.IPPROTO_TCP {
			tcp++
		}
		if rp == 1 {
			reuse++
		}
	}
	if tcp != 2 || reuse != 2 {
		t.Fatalf("want 2 plain TCP listeners with SO_REUSEPORT, got tcp=%d reuseport=%d", tcp, reuse)
	}
}

func TestPreforkServer(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	for _, listeners := range []int{1, 2} {
		srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{
			ID: "pf", ReusePort: true, Workers: 2, Listeners: listeners,
		})
		if len(srv.WorkerPIDs) != 2 {
			t.Fatalf("WorkerPIDs = %v", srv.WorkerPIDs)
		}
		load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Concurrency: 8, KeepAlive: 2})
		time.Sleep(700 * time.Millisecond)
		res := stopLoad(t, load)
		if res.OK == 0 || res.FailureCount() != 0 || res.ByServer["pf"] != res.OK {
			t.Fatalf("listeners=%d: want only successes, got %+v", listeners, res)
		}
		if err := srv.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		exited, err := srv.Wait(ctx)
		cancel()
		if !exited || err != nil {
			t.Fatalf("Wait after SIGTERM: exited=%v err=%v", exited, err)
		}
		if got, want := srv.Served(), res.OK+res.KeepAlive.OK; got != want {
			t.Errorf("listeners=%d: Served() = %d, load got %d answers", listeners, got, want)
		}
		for _, pid := range srv.WorkerPIDs {
			if err := syscall.Kill(pid, 0); err == nil {
				t.Errorf("worker %d still alive", pid)
			}
		}
	}
}

// Closing a listener with queued connections resets them: the failures are real and classified.
func TestCloseListenerResetsQueue(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{ID: "q", ReusePort: true})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Concurrency: 16, Timeout: 5 * time.Second})
	waitFor(t, "first answers", 5*time.Second, func() bool { return load.Progress().OK > 0 })
	if err := srv.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	// All workers end up waiting in the accept queue.
	time.Sleep(500 * time.Millisecond)
	before := load.Progress()
	if err := srv.CloseListener(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	res := stopLoad(t, load)
	if res.Failures[testenv.FailReset] == 0 {
		t.Fatalf("want resets of the queued connections, got %v", res.Failures)
	}
	if res.Failures[testenv.FailRefused] == 0 {
		t.Errorf("want refused connections after the close, got %v", res.Failures)
	}
	if res.Failures[testenv.FailTimeout] != 0 || res.Failures[testenv.FailWrong] != 0 || res.Failures[testenv.FailOther] != 0 {
		t.Errorf("unexpected failure kinds %v", res.Failures)
	}
	if res.OK != before.OK {
		t.Errorf("answers while paused: %d before close, %d at the end", before.OK, res.OK)
	}
}

func TestPauseResume(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{ID: "p"})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Concurrency: 4})
	waitFor(t, "first answers", 5*time.Second, func() bool { return load.Progress().OK > 0 })
	if err := srv.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	paused := load.Progress().OK
	time.Sleep(300 * time.Millisecond)
	if got := load.Progress().OK; got != paused {
		t.Fatalf("answers while paused: %d -> %d", paused, got)
	}
	if err := srv.ResumeAccept(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "answers after resume", 5*time.Second, func() bool { return load.Progress().OK > paused })
	res := stopLoad(t, load)
	if res.FailureCount() != 0 {
		t.Fatalf("failures: %v", res.Failures)
	}
}

func TestKeepAlive(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	testenv.StartServerForTest(t, ns, testenv.ServerOptions{ID: "k"})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Concurrency: -1, KeepAlive: 4, KeepAliveEvery: 20 * time.Millisecond,
	})
	// StartLoad returns after each long-lived connection had its first answer.
	if p := load.Progress(); p.KeepAlive.Opened != 4 || p.KeepAlive.OK < 4 {
		t.Errorf("progress right after start: %+v", p.KeepAlive)
	}
	time.Sleep(time.Second)
	res := stopLoad(t, load)
	ka := res.KeepAlive
	if res.Requests != 0 {
		t.Errorf("new-connection requests with Concurrency -1: %d", res.Requests)
	}
	if ka.Opened != 4 || ka.Closed != 4 {
		t.Errorf("Opened=%d Closed=%d, want 4 and 4 (no reconnects)", ka.Opened, ka.Closed)
	}
	if ka.OK < 4*20 || ka.OK != ka.Requests || res.FailureCount() != 0 || ka.ByServer["k"] != ka.OK {
		t.Fatalf("want ~200 successful keep-alive requests, got %+v", ka)
	}

	// KeepAliveFor closes them early.
	load = testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Concurrency: -1, KeepAlive: 2, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: 200 * time.Millisecond,
	})
	time.Sleep(600 * time.Millisecond)
	mid := load.Progress().KeepAlive
	res = stopLoad(t, load)
	if res.KeepAlive.Closed != 2 || res.KeepAlive.Opened != 2 || mid.Requests != res.KeepAlive.Requests {
		t.Fatalf("KeepAliveFor: want 2 closed before the end, got mid %+v final %+v", mid, res.KeepAlive)
	}
}

func TestSignals(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{})
	before := testenv.MonoNow()
	if err := srv.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "SIGHUP event", 5*time.Second, func() bool { return len(srv.Signals()) > 0 })
	sigs := srv.Signals()
	if sigs[0].Signal != syscall.SIGHUP || sigs[0].MonoNS < before || sigs[0].MonoNS > testenv.MonoNow() {
		t.Fatalf("signals %+v, want SIGHUP after %d", sigs, before)
	}
	if srv.Exited() {
		t.Fatal("server exited on SIGHUP")
	}
	if err := srv.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if exited, err := srv.Wait(ctx); !exited || err != nil {
		t.Fatalf("Wait after SIGINT: exited=%v err=%v", exited, err)
	}
	if sigs := srv.Signals(); len(sigs) != 2 || sigs[1].Signal != syscall.SIGINT {
		t.Fatalf("signals %+v, want SIGHUP, SIGINT", sigs)
	}
}

// On SIGTERM the server answers what it accepted: every request it counted reached the client.
func TestGracefulShutdown(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{ID: "g", Delay: 200 * time.Millisecond})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Concurrency: 8})
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	if err := srv.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if exited, err := srv.Wait(ctx); !exited || err != nil {
		t.Fatalf("Wait after SIGTERM: exited=%v err=%v", exited, err)
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("exited after %v, before the in-flight requests could be answered", d)
	}
	time.Sleep(200 * time.Millisecond)
	res := stopLoad(t, load)
	if res.OK == 0 || srv.Served() != res.OK {
		t.Fatalf("server served %d, load got %d answers", srv.Served(), res.OK)
	}
	if res.Failures[testenv.FailRefused] == 0 {
		t.Errorf("want refused after exit, got %v", res.Failures)
	}
	if n := res.Failures[testenv.FailTimeout] + res.Failures[testenv.FailWrong] + res.Failures[testenv.FailOther]; n != 0 {
		t.Errorf("unexpected failures %v", res.Failures)
	}
}

func TestReadyDelayAndUID(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	srv := testenv.StartServerForTest(t, ns, testenv.ServerOptions{
		ReadyDelay: 300 * time.Millisecond, UID: 65534, GID: 65534,
	})
	status, err := inNS(ns, "GET /ready")
	if err != nil || status != 503 {
		t.Fatalf("/ready right after start: %d, %v; want 503", status, err)
	}
	time.Sleep(400 * time.Millisecond)
	if status, err := inNS(ns, "GET /ready"); err != nil || status != 200 {
		t.Fatalf("/ready after ReadyDelay: %d, %v; want 200", status, err)
	}
	st, err := os.Stat(fmt.Sprintf("/proc/%d", srv.PID))
	if err != nil {
		t.Fatal(err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; uid != 65534 {
		t.Errorf("server runs as uid %d", uid)
	}
}

// inNS sends one request to 127.0.0.1:8080 in ns and returns the status code.
func inNS(ns *testenv.NetNS, requestLine string) (int, error) {
	var status int
	err := ns.Do(func() error {
		var d net.Dialer
		d.SetMultipathTCP(false)
		c, err := d.Dial("tcp", "127.0.0.1:8080")
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte(requestLine + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")); err != nil {
			return err
		}
		buf := make([]byte, 12)
		if _, err := c.Read(buf); err != nil {
			return err
		}
		status, err = strconv.Atoi(string(buf[9:12]))
		return err
	})
	return status, err
}

// A hand-written server that misbehaves in known ways: the load classifies each failure.
func TestFailureClassification(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	var ln net.Listener
	err := ns.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", "127.0.0.1:8080")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for i := 0; ; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				if _, err := c.Read(buf); err != nil {
					return
				}
				switch i % 4 {
				case 0: // close without answering
				case 1:
					_, _ = c.Write([]byte("HTTP/1.1 500 Oops\r\nX-Server: bad\r\nContent-Length: 4\r\n\r\nbad\n"))
				case 2:
					_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\nX-Server: bad\r\nContent-Length: 40\r\n\r\nbad\n"))
				case 3: // never answer
					_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
					_, _ = c.Read(buf)
				}
			}()
		}
	}()
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Concurrency: 8, Timeout: 300 * time.Millisecond})
	time.Sleep(time.Second)
	res := stopLoad(t, load)
	f := res.Failures
	if res.OK != 0 || f[testenv.FailReset] == 0 || f[testenv.FailWrong] == 0 || f[testenv.FailTimeout] == 0 ||
		f[testenv.FailOther] != 0 || f[testenv.FailRefused] != 0 {
		t.Fatalf("want reset, wrong and timeout failures only, got ok=%d %v", res.OK, f)
	}
	if res.FailureCount() != res.Requests {
		t.Errorf("FailureCount %d != Requests %d", res.FailureCount(), res.Requests)
	}
}

// TestClassify: the failure kinds the load clients report.
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), testenv.FailRefused},
		{fmt.Errorf("read: %w", syscall.ECONNRESET), testenv.FailReset},
		{testenv.ErrNoResponse, testenv.FailReset},
		{fmt.Errorf("read: %w", os.ErrDeadlineExceeded), testenv.FailTimeout},
		{&testenv.WrongResponse{Msg: "x"}, testenv.FailWrong},
		{errors.New("something else"), testenv.FailOther},
	} {
		if got := testenv.Classify(tc.err); got != tc.want {
			t.Errorf("testenv.Classify(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}
