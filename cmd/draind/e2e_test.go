package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
	"github.com/draind/draind/testenv"
)

func TestMain(m *testing.M) {
	if os.Getenv(envPIDNSClient) != "" {
		os.Exit(pidnsClient())
	}
	testenv.Main(m)
}

const addr = "127.0.0.1:8080"

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// draindBin builds the draind binary once per test run.
func draindBin(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "draind-bin-")
		if err != nil {
			binErr = err
			return
		}
		os.Chmod(dir, 0o755) // the not-root test runs it as nobody
		binPath = filepath.Join(dir, "draind")
		args := []string{"build", "-o", binPath}
		if os.Getenv("DRAIND_TEST_RACE") != "" {
			args = append(args, "-race") // a draind built with the race detector (its reports go to its stderr)
		}
		out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// setup checks the test's requirements, builds draind, and gives a fresh network namespace and pin directory.
func setup(t testing.TB) (*testenv.NetNS, string) {
	testenv.Require(t)
	draindBin(t)
	return testenv.NetNSForTest(t), pinDir(t)
}

// pinDir is a private bpffs directory per test, so a test can check that nothing is left behind.
func pinDir(t testing.TB) string {
	d := fmt.Sprintf("/sys/fs/bpf/draind-test-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_"))
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// bgProc is a draind command running in the background, its stderr collected line by line.
type bgProc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr strings.Builder
	done   chan struct{}
	code   int // once done is closed: the exit code, or -N if a signal N killed it
}

// startBg starts cmd; it is killed at cleanup.
func startBg(t testing.TB, cmd *exec.Cmd) *bgProc { return startBgIn(t, nil, cmd) }

// startBgIn starts cmd in network namespace ns (nil: this process's); it is killed at cleanup.
func startBgIn(t testing.TB, ns *testenv.NetNS, cmd *exec.Cmd) *bgProc {
	t.Helper()
	b := &bgProc{cmd: cmd, done: make(chan struct{})}
	errPipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := cmd.Start
	if ns != nil {
		start = func() error { return testenv.StartIn(ns, cmd) }
	}
	if err := start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(b.done)
		sc := bufio.NewScanner(errPipe)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			b.mu.Lock()
			b.stderr.WriteString(sc.Text() + "\n")
			b.mu.Unlock()
		}
		err := cmd.Wait()
		if ee, ok := err.(*exec.ExitError); ok {
			b.code = ee.ExitCode()
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				b.code = -int(ws.Signal())
			}
		}
	}()
	t.Cleanup(b.kill)
	return b
}

// kill kills the process and waits for it.
func (b *bgProc) kill() {
	b.cmd.Process.Kill()
	<-b.done
}

func (b *bgProc) errText() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stderr.String()
}

// handoffRun is a `draind handoff --json` running in the background.
type handoffRun struct {
	*bgProc
	stdout bytes.Buffer
}

func startHandoff(t testing.TB, args ...string) *handoffRun {
	t.Helper()
	h := &handoffRun{}
	cmd := exec.Command(draindBin(t), append([]string{"handoff", "--json"}, args...)...)
	cmd.Stdout = &h.stdout
	h.bgProc = startBg(t, cmd)
	return h
}

// waitFor waits until draind's progress output contains s.
func (h *handoffRun) waitFor(t testing.TB, s string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(h.errText(), s) {
		select {
		case <-h.done:
			t.Fatalf("draind ended (exit %d) before %q: %s", h.code, s, h.errText())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %s: %s", s, within, h.errText())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

type handoffOut struct {
	handoff.Result
	Error    string `json:"error"`
	ExitCode int    `json:"exit_code"`
	NewPID   int    `json:"new_pid"` // handoff --exec
}

// wait waits for draind to end and decodes its JSON result.
func (h *handoffRun) wait(t testing.TB, within time.Duration) (handoffOut, int) {
	t.Helper()
	select {
	case <-h.done:
	case <-time.After(within):
		t.Fatalf("draind did not end within %s: %s", within, h.errText())
	}
	var out handoffOut
	if err := json.Unmarshal(h.stdout.Bytes(), &out); err != nil {
		t.Fatalf("decode draind output %q: %v (stderr: %s)", h.stdout.String(), err, h.errText())
	}
	if out.ExitCode != h.code {
		t.Fatalf("JSON says exit code %d, process exited %d", out.ExitCode, h.code)
	}
	return out, h.code
}

func server(t testing.TB, ns *testenv.NetNS, id string, o testenv.ServerOptions) *testenv.Server {
	o.Addr, o.ID, o.ReusePort = addr, id, true
	return testenv.StartServerForTest(t, ns, o)
}

func pidArgs(old, new *testenv.Server, pins string) []string {
	return []string{"--from", strconv.Itoa(old.PID), "--to", strconv.Itoa(new.PID), "--pin-dir", pins}
}

// migrations returns a function that gives the connections the kernel migrated off closing listeners
// (TCPMigrateReqSuccess) in pid's network namespace since now; it reads the counter through whichever process
// of that namespace it is given (the first may be gone by then).
func migrations(t testing.TB, pid int) func(pid int) float64 {
	t.Helper()
	before, err := proc.TcpExt(pid)
	if err != nil {
		t.Fatal(err)
	}
	return func(pid int) float64 {
		t.Helper()
		after, err := proc.TcpExt(pid)
		if err != nil {
			t.Fatal(err)
		}
		return after["TCPMigrateReqSuccess"] - before["TCPMigrateReqSuccess"]
	}
}

func requireNoFailures(t testing.TB, r testenv.LoadResult) {
	t.Helper()
	if n := r.FailureCount(); n > 0 || sumKinds(r.KeepAlive.Failures) > 0 {
		t.Fatalf("load saw failures: %v, keep-alive %v; samples %v", r.Failures, r.KeepAlive.Failures, r.FailureSamples)
	}
}

func sumKinds(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// requireDetached checks that no selector program loaded since before outlives the handoff (an attached one stays
// loaded). Program ids are not reused, so selectors of other draind runs (tests of other packages) do not matter.
func requireDetached(t testing.TB, before map[ebpf.ProgramID]bool) {
	t.Helper()
	for id := range selectorPrograms(t) {
		if !before[id] {
			t.Fatalf("selector program %d, loaded during the handoff, is still loaded: it is still attached", id)
		}
	}
}

// requireNoSelector checks, through a copy of each of the server's listeners, that no BPF program is attached to
// their reuseport group (SO_DETACH_REUSEPORT_BPF fails with ENOENT). It is for runs where a long-lived draind keeps
// selector programs loaded for the next handoff, which requireDetached cannot tell from an attached one.
func requireNoSelector(t testing.TB, s *testenv.Server) {
	t.Helper()
	for _, l := range listenersOf(t, s) {
		fd, err := l.Copy()
		if err != nil {
			t.Fatal(err)
		}
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
		unix.Close(fd)
		if !errors.Is(err, unix.ENOENT) {
			t.Fatalf("listener %s: a selector is still attached to its group (detach: %v)", l, err)
		}
	}
}

// listenersOf discovers a test server's listeners as draind sees them (their handles are closed at cleanup).
func listenersOf(t testing.TB, s *testenv.Server) []*steer.Listener {
	t.Helper()
	p, err := proc.Open(s.PID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	side, err := steer.Discover(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { side.Close() })
	return side.Listeners
}

// requireUnused checks that the steering maps a running daemon keeps pinned hold no group and no socket: every
// handoff gave back what it took. (A daemon keeps its pins for its life, so that other draind processes share its
// maps; standalone runs remove theirs: requireGone.)
func requireUnused(t testing.TB, pins string) {
	t.Helper()
	if _, err := os.Stat(pins); os.IsNotExist(err) {
		return
	}
	objs, err := loader.Open(loader.Options{PinDir: pins})
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	if unused, err := objs.Unused(); err != nil || !unused {
		t.Fatalf("the pinned steering maps under %s are still in use (%v)", pins, err)
	}
}

func requireGone(t testing.TB, pins string) {
	t.Helper()
	if _, err := os.Stat(pins); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(pins)
		t.Fatalf("pins left under %s: %v", pins, entries)
	}
}

// TestHandoffUnderLoad: a handoff under continuous new-connection load loses nothing; after the flip every new
// connection reaches the new process; long-lived connections keep working; the old process is signalled only once
// they are closed, and exits.
func TestHandoffUnderLoad(t *testing.T) {
	ns, pins := setup(t)
	handoffUnderLoad(t, ns, pins, func(old, new *testenv.Server) []string { return pidArgs(old, new, pins) }, nil, false)
}

// handoffUnderLoad runs the scenario of TestHandoffUnderLoad with the draind flags args gives (standalone, or
// through a daemon) and checks its outcome; during, if set, runs while the handoff drains.
func handoffUnderLoad(t *testing.T, ns *testenv.NetNS, pins string, args func(old, new *testenv.Server) []string, during func(old, new *testenv.Server), daemon bool) {
	old := server(t, ns, "old", testenv.ServerOptions{Delay: time.Millisecond})
	const hold = 3 * time.Second // long enough to outlast starting the new server and draind
	loadStart := testenv.MonoNow()
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 32, Duration: 20 * time.Second,
		KeepAlive: 8, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: hold,
	})
	time.Sleep(300 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{Delay: time.Millisecond})
	before := selectorPrograms(t)

	h := startHandoff(t, append(args(old, newS), "--ready-url", "http://"+addr+"/ready")...)
	if during != nil {
		h.waitFor(t, "draining:", 10*time.Second)
		during(old, newS)
	}
	out, code := h.wait(t, 30*time.Second)
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("handoff: %+v", out.Result)
	t.Logf("load: requests %d ok %d failures %v by server %v; keep-alive %+v", r.Requests, r.OK, r.Failures, r.ByServer, r.KeepAlive)
	if code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("exit %d outcome %s: %s", code, out.Outcome, h.errText())
	}
	requireNoFailures(t, r)
	if r.ByServer["new"] == 0 || r.KeepAlive.ByServer["old"] == 0 || r.KeepAlive.OK == 0 {
		t.Fatalf("load did not reach both servers: %v, keep-alive %v", r.ByServer, r.KeepAlive.ByServer)
	}
	if last := r.Spans["old"].LastStartNS; last >= out.FlippedAt {
		t.Fatalf("a connection started %v after the flip reached the old process", time.Duration(last-out.FlippedAt))
	}
	if out.InFlightAtFlip == 0 {
		t.Fatalf("nothing was in flight at the flip: the drain was not exercised")
	}
	sigs := old.Signals()
	if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM {
		t.Fatalf("old got signals %v, want one SIGTERM", sigs)
	}
	if sigs[0].MonoNS < loadStart+hold.Nanoseconds() {
		t.Fatalf("old was signalled %v before its long-lived connections closed", time.Duration(loadStart+hold.Nanoseconds()-sigs[0].MonoNS))
	}
	if !out.ExitSeen || !old.Exited() {
		t.Fatalf("old exit not seen (draind: %v)", out.ExitSeen)
	}
	if len(newS.Signals()) != 0 {
		t.Fatalf("new got signals %v", newS.Signals())
	}
	if daemon {
		requireUnused(t, pins)
	} else {
		requireGone(t, pins)
	}
	requireNoSelector(t, newS)
	if !daemon { // a daemon keeps its selector programs loaded (not attached) for the next handoff
		requireDetached(t, before)
	}
}

// TestWithoutDraindLosesConnections is the same load with the usual upgrade (start new, SIGTERM old) on a server
// that closes its listener without accepting what is queued: the load must see failures, which proves the tests
// above can see loss.
func TestWithoutDraindLosesConnections(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	old := server(t, ns, "old", testenv.ServerOptions{AcceptDelay: 5 * time.Millisecond})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: 32, Duration: 20 * time.Second})
	time.Sleep(300 * time.Millisecond)
	server(t, ns, "new", testenv.ServerOptions{AcceptDelay: 5 * time.Millisecond})
	time.Sleep(200 * time.Millisecond)
	if err := old.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	old.Wait(ctx)
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("without draind: requests %d failures %v samples %v", r.Requests, r.Failures, r.FailureSamples)
	if r.FailureCount() == 0 {
		t.Fatalf("the usual upgrade lost nothing: the test cannot see loss")
	}
}

// queuedOld starts an old server that stopped accepting, and a load client whose n workers' connections wait in its
// accept queue.
func queuedOld(t testing.TB, ns *testenv.NetNS, n int, o testenv.ServerOptions) (*testenv.Server, *testenv.Load) {
	t.Helper()
	old := server(t, ns, "old", o)
	if err := old.PauseAccept(); err != nil {
		t.Fatal(err)
	}
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: n, Duration: 20 * time.Second, Timeout: 15 * time.Second})
	// Every worker's connection waits in the queue: on a busy machine the load client connects late (a fixed 300 ms
	// wait let a handoff find the queue empty and end the drain at once).
	p, err := proc.Open(old.PID)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	testenv.WaitFor(t, 10*time.Second, func() bool {
		side, err := steer.Discover(p)
		if err != nil {
			return false
		}
		defer side.Close()
		q := 0
		for _, l := range side.Listeners {
			q += int(l.Queue)
		}
		return q >= n
	})
	return old, load
}

// stopLoad lets the last answers arrive, stops the load and logs what it saw.
func stopLoad(t testing.TB, load *testenv.Load) testenv.LoadResult {
	t.Helper()
	time.Sleep(200 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("load: requests %d ok %d failures %v by server %v", r.Requests, r.OK, r.Failures, r.ByServer)
	return r
}

// requireQueueServedByNew: nothing failed, the paused old server answered nothing and the new one answered, and the
// queued connections were in flight at the flip and migrated by the selector.
func requireQueueServedByNew(t testing.TB, out handoffOut, r testenv.LoadResult, old *testenv.Server, queued int) {
	t.Helper()
	requireNoFailures(t, r)
	if old.Served() != 0 || r.ByServer["old"] != 0 || r.ByServer["new"] == 0 {
		t.Fatalf("old served %d requests while paused; answered by %v", old.Served(), r.ByServer)
	}
	if out.InFlightAtFlip < queued || out.Migrated < uint64(queued) {
		t.Fatalf("in flight at flip %d, migrated %d: want >= %d queued connections migrated", out.InFlightAtFlip, out.Migrated, queued)
	}
}

// queuedRun is a handoff from an old server that stopped accepting with connections queued (queuedOld) to a new
// one, under that load, as runQueued ran it.
type queuedRun struct {
	out  handoffOut
	code int
	load testenv.LoadResult
	old  *testenv.Server
	pins string
	h    *handoffRun
}

// runQueued runs draind handoff with args added, from an old server with queued connections waiting to a new one;
// during, if set, runs while draind does. It waits for draind's end and stops the load.
func runQueued(t *testing.T, queued int, during func(h *handoffRun, old *testenv.Server), args ...string) queuedRun {
	t.Helper()
	ns, pins := setup(t)
	old, load := queuedOld(t, ns, queued, testenv.ServerOptions{})
	newS := server(t, ns, "new", testenv.ServerOptions{})
	h := startHandoff(t, append(pidArgs(old, newS, pins), args...)...)
	if during != nil {
		during(h, old)
	}
	out, code := h.wait(t, 20*time.Second)
	r := stopLoad(t, load)
	t.Logf("handoff: %+v", out.Result)
	return queuedRun{out: out, code: code, load: r, old: old, pins: pins, h: h}
}

// TestAcceptQueueMigrates: the old server stops accepting with connections queued, then closes its listener:
// every queued connection is served by the new one.
func TestAcceptQueueMigrates(t *testing.T) {
	const queued = 10
	// --queue keep: the queue stays on the old listener until it closes (the default would move it at the flip).
	q := runQueued(t, queued, func(h *handoffRun, old *testenv.Server) {
		h.waitFor(t, "] flipped", 10*time.Second)
		time.Sleep(200 * time.Millisecond)
		if err := old.CloseListener(); err != nil {
			t.Fatal(err)
		}
	}, "--queue", "keep")
	if q.code != exitOK {
		t.Fatalf("exit %d: %s", q.code, q.h.errText())
	}
	requireQueueServedByNew(t, q.out, q.load, q.old, queued)
	requireGone(t, q.pins)
}

// TestQueueMoved: an old server that accepts slowly has a full accept queue under load. With the default --queue
// move, draind moves that queue to the new server right after the flip, without closing the old listener and
// without breaking the old server's accept loop; with --queue keep the old server accepts it itself and nothing
// migrates.
func TestQueueMoved(t *testing.T) {
	for _, queue := range []drain.Queue{drain.QueueMove, drain.QueueKeep} {
		t.Run(string(queue), func(t *testing.T) {
			ns, pins := setup(t)
			// ExitDelay: after its SIGTERM the old server keeps accepting for 300 ms, so a listener the move left broken
			// shows as an accept error (without it, the listener closes 20 ms before the next accept).
			old := server(t, ns, "old", testenv.ServerOptions{AcceptDelay: 20 * time.Millisecond, ExitDelay: 300 * time.Millisecond})
			load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: 32, Duration: 20 * time.Second, Timeout: 15 * time.Second})
			time.Sleep(500 * time.Millisecond) // the queue fills: 32 workers, 50 accepts a second
			newS := server(t, ns, "new", testenv.ServerOptions{})
			h := startHandoff(t, append(pidArgs(old, newS, pins), "--queue", string(queue))...)
			out, code := h.wait(t, 20*time.Second)
			r := stopLoad(t, load)
			t.Logf("handoff: %+v", out.Result)
			if code != exitOK || out.Outcome != handoff.OutcomeDrained || out.Queue != queue {
				t.Fatalf("exit %d, outcome %s, queue %q: %s", code, out.Outcome, out.Queue, h.errText())
			}
			requireNoFailures(t, r)
			if errs := old.AcceptErrors(); len(errs) > 0 {
				t.Fatalf("the old server's accept loop failed: %v", errs)
			}
			if !out.Signalled || !out.ExitSeen {
				t.Fatalf("old signalled %v, exit seen %v", out.Signalled, out.ExitSeen)
			}
			switch queue {
			case drain.QueueMove:
				// Whatever waited at the move went through the selector to the new server.
				if out.QueueMoved < 10 || out.Migrated < uint64(out.QueueMoved) || out.QueuePaused <= 0 {
					t.Fatalf("queue moved %d (paused %s), migrated %d: want >= 10 moved, all of them migrated", out.QueueMoved, out.QueuePaused, out.Migrated)
				}
			case drain.QueueKeep:
				if out.QueueMoved != 0 || out.Migrated != 0 || out.InFlightAtFlip < 10 {
					t.Fatalf("queue moved %d, migrated %d, in flight at flip %d: want the old server to accept its queue itself", out.QueueMoved, out.Migrated, out.InFlightAtFlip)
				}
			}
			requireGone(t, pins)
		})
	}
}

// TestQueueMovedWakesNew: the old server stopped accepting with 10 connections queued, and every load worker waits on
// one of them, so nothing else reaches the new server: the connections moved at the flip must wake it by themselves
// (a kernel that did not wake the new listener's waiters would leave them queued until the load's 15 s timeout).
func TestQueueMovedWakesNew(t *testing.T) {
	const queued = 10
	q := runQueued(t, queued, nil)
	if out := q.out; q.code != exitOK || out.Outcome != handoff.OutcomeDrained || out.QueueMoved != queued {
		t.Fatalf("exit %d, outcome %s, queue moved %d: %s", q.code, out.Outcome, out.QueueMoved, q.h.errText())
	}
	requireQueueServedByNew(t, q.out, q.load, q.old, queued)
	requireGone(t, q.pins)
}

// TestSignalAtFlip: with --signal-at flip the old server gets its signal right after the flip, while its accept queue
// is full (it stopped accepting); it closes its listener on SIGTERM and every queued connection migrates to the new
// server, which answers them, without anyone closing the old listener by hand (compare TestAcceptQueueMigrates).
func TestSignalAtFlip(t *testing.T) {
	const queued = 10
	q := runQueued(t, queued, nil, "--signal-at", "flip")
	out, code, old, h := q.out, q.code, q.old, q.h
	if code != exitOK || out.Outcome != handoff.OutcomeDrained || out.SignalAt != drain.SignalFlip {
		t.Fatalf("exit %d, outcome %s, signal at %q: %s", code, out.Outcome, out.SignalAt, h.errText())
	}
	requireQueueServedByNew(t, out, q.load, old, queued)
	// Signalled at the flip, before the drain ended (the queue was full then), once, and the old server exited.
	sigs := old.Signals()
	if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM || !out.Signalled || !out.ExitSeen || !old.Exited() {
		t.Fatalf("old got %v (signalled %v, exit seen %v, exited %v), want one SIGTERM and its exit", sigs, out.Signalled, out.ExitSeen, old.Exited())
	}
	if !(out.FlippedAt <= out.SignalledAt && out.SignalledAt <= sigs[0].MonoNS && sigs[0].MonoNS <= out.DrainedAt) {
		t.Fatalf("flip %d, signal sent %d, seen by the server %d, drain ended %d: want them in this order", out.FlippedAt, out.SignalledAt, sigs[0].MonoNS, out.DrainedAt)
	}
	requireGone(t, q.pins)
}

// TestPreForkServer: a master with 2 workers holding the connections is drained as a tree and signalled.
func TestPreForkServer(t *testing.T) {
	ns, pins := setup(t)
	old := server(t, ns, "old", testenv.ServerOptions{Workers: 2, Delay: time.Millisecond})
	const hold = 3 * time.Second // long enough to outlast starting the new server and draind
	loadStart := testenv.MonoNow()
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 32, Duration: 20 * time.Second,
		KeepAlive: 4, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: hold,
	})
	time.Sleep(300 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{Workers: 2, Delay: time.Millisecond})
	h := startHandoff(t, pidArgs(old, newS, pins)...)
	out, code := h.wait(t, 30*time.Second)
	time.Sleep(200 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("handoff: %+v", out.Result)
	t.Logf("load: requests %d ok %d failures %v by server %v", r.Requests, r.OK, r.Failures, r.ByServer)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, h.errText())
	}
	requireNoFailures(t, r)
	if out.InFlightAtFlip == 0 {
		t.Fatalf("nothing in flight in the workers at the flip: the tree was not counted")
	}
	sigs := old.Signals()
	if len(sigs) == 0 || sigs[0].MonoNS < loadStart+hold.Nanoseconds() {
		t.Fatalf("old master signals %v: want SIGTERM after its workers' connections closed", sigs)
	}
	if !out.ExitSeen {
		t.Fatalf("old master exit not seen")
	}
	requireGone(t, pins)
}

// TestRollbackWhenNewDies: the new process is killed right after the flip; draind steers back to the old one at
// once, never signals it, and says so in its exit code.
func TestRollbackWhenNewDies(t *testing.T) {
	ns, pins := setup(t)
	progs := selectorPrograms(t)
	old := server(t, ns, "old", testenv.ServerOptions{})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 8, Duration: 20 * time.Second, KeepAlive: 2, KeepAliveEvery: 20 * time.Millisecond,
	})
	time.Sleep(200 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{})
	h := startHandoff(t, pidArgs(old, newS, pins)...)
	h.waitFor(t, "] flipped", 10*time.Second)
	time.Sleep(100 * time.Millisecond)
	killedAt := testenv.MonoNow()
	if err := newS.Kill(); err != nil {
		t.Fatal(err)
	}
	out, code := h.wait(t, 10*time.Second)
	if code != exitRolledBack || out.Outcome != handoff.OutcomeRolledBack {
		t.Fatalf("exit %d outcome %s, want %d rolled back: %s", code, out.Outcome, exitRolledBack, h.errText())
	}
	if d := time.Duration(out.RolledBackAt - killedAt); d > 100*time.Millisecond {
		t.Fatalf("rolled back %v after the new process died, want <= 100ms", d)
	}
	t.Logf("rolled back %v after the kill: %s", time.Duration(out.RolledBackAt-killedAt), out.RollbackReason)
	// From now on the old process serves everything (Progress is refreshed every 100ms).
	time.Sleep(250 * time.Millisecond)
	before := load.Progress()
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if r.OK-before.OK == 0 || r.FailureCount() != before.FailureCount() || r.ByServer["old"]-before.ByServer["old"] != r.OK-before.OK {
		t.Fatalf("after the rollback: %d answered, failures %v -> %v, by server %v -> %v", r.OK-before.OK, before.Failures, r.Failures, before.ByServer, r.ByServer)
	}
	if len(old.Signals()) != 0 || old.Exited() {
		t.Fatalf("old was signalled (%v) or exited", old.Signals())
	}
	requireGone(t, pins)
	requireDetached(t, progs)
}

// TestRollbackWhenNotReady: the ready URL never answers 2xx: no flip, the old process keeps everything.
func TestRollbackWhenNotReady(t *testing.T) {
	ns, pins := setup(t)
	progs := selectorPrograms(t)
	old := server(t, ns, "old", testenv.ServerOptions{})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: 8, Duration: 20 * time.Second})
	newS := server(t, ns, "new", testenv.ServerOptions{ReadyDelay: time.Hour})
	h := startHandoff(t, append(pidArgs(old, newS, pins), "--ready-url", "http://"+addr+"/ready", "--ready-timeout", "700ms")...)
	out, code := h.wait(t, 10*time.Second)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if code != exitRolledBack || !strings.Contains(out.RollbackReason, "not ready") {
		t.Fatalf("exit %d reason %q: %s", code, out.RollbackReason, h.errText())
	}
	// While draind waited for readiness the selector kept every new connection on the old side, except draind's
	// own readiness probes, which reached the new one.
	if out.Steered == 0 || out.Fallbacks != 0 || out.Failed != 0 || out.Probed == 0 {
		t.Fatalf("selector: %d to old, %d fell back, %d to the kernel, %d probes: want all to old and probes > 0", out.Steered, out.Fallbacks, out.Failed, out.Probed)
	}
	if r.ByServer["old"] == 0 {
		t.Fatalf("old served nothing: %v", r.ByServer)
	}
	requireNoFailures(t, r)
	if len(old.Signals()) != 0 {
		t.Fatalf("old was signalled: %v", old.Signals())
	}
	requireGone(t, pins)
	requireDetached(t, progs)
}

// selectorPrograms lists the draind selector programs loaded in the kernel (attached ones stay loaded).
func selectorPrograms(t testing.TB) map[ebpf.ProgramID]bool {
	t.Helper()
	ids := map[ebpf.ProgramID]bool{}
	id := ebpf.ProgramID(0)
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if err != nil {
			return ids
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		if info, err := p.Info(); err == nil && info.Name == "draind_select" {
			ids[id] = true
		}
		p.Close()
	}
}

// TestBadInput: every bad input gets one clear line and exit code 2, and changes nothing: no pins, no program.
func TestBadInput(t *testing.T) {
	ns, pins := setup(t)
	other := testenv.NetNSForTest(t)
	old := server(t, ns, "old", testenv.ServerOptions{})
	newS := server(t, ns, "new", testenv.ServerOptions{})
	other8081 := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:8081", ID: "other", ReusePort: true})
	elsewhere := server(t, other, "elsewhere", testenv.ServerOptions{})
	plainOld := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:9090", ID: "plain-old"})
	plainNew := testenv.StartServerForTest(t, other, testenv.ServerOptions{Addr: "127.0.0.1:9090", ID: "plain-new"})
	mptcpOld := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:7070", ID: "mptcp-old", ReusePort: true, MPTCP: true})
	mptcpNew := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:7070", ID: "mptcp-new", ReusePort: true, MPTCP: true})

	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleeper.Process.Kill(); sleeper.Wait() })
	exited := exec.Command("true")
	if err := exited.Run(); err != nil {
		t.Fatal(err)
	}

	pid := func(p int) string { return strconv.Itoa(p) }
	ok := []string{"--from", pid(old.PID), "--to", pid(newS.PID)}
	cases := []struct {
		name   string
		args   []string
		nobody bool
		want   string
	}{
		{"unknown pid", []string{"--from", "4194000", "--to", pid(newS.PID)}, false, "old process: open process 4194000: no such process"},
		{"exited pid", []string{"--from", pid(old.PID), "--to", pid(exited.Process.Pid)}, false, "no such process"},
		{"same pid", []string{"--from", pid(old.PID), "--to", pid(old.PID)}, false, "old and new are the same process"},
		{"no listeners", []string{"--from", pid(sleeper.Process.Pid), "--to", pid(newS.PID)}, false, "no listening TCP sockets"},
		{"no matching listeners", []string{"--from", pid(old.PID), "--to", pid(other8081.PID)}, false, "does not listen on 127.0.0.1:8080"},
		{"port not listened", append(ok, "--port", "8443"), false, "does not listen on port 8443"},
		{"different netns", []string{"--from", pid(old.PID), "--to", pid(elsewhere.PID)}, false, "different network namespaces"},
		{"no SO_REUSEPORT", []string{"--from", pid(plainOld.PID), "--to", pid(plainNew.PID)}, false, "does not have SO_REUSEPORT set"},
		{"MPTCP", []string{"--from", pid(mptcpOld.PID), "--to", pid(mptcpNew.PID)}, false, "is an MPTCP listener"},
		{"not root", ok, true, "not permitted"},
		{"bad signal", append(ok, "--signal", "SIGNOPE"), false, "unknown signal name"},
		{"zero timeout", append(ok, "--timeout", "0s"), false, "--timeout 0s is not positive"},
		{"negative timeout", append(ok, "--timeout", "-5s"), false, "--timeout -5s is not positive"},
		{"bad on-timeout", append(ok, "--on-timeout", "explode"), false, "want signal, kill or abort"},
		{"bad signal-at", append(ok, "--signal-at", "soon"), false, "want drained or flip"},
		{"bad queue", append(ok, "--queue", "drop"), false, "want move or keep"},
		{"signal-at flip and abort", append(ok, "--signal-at", "flip", "--on-timeout", "abort"), false, "on-timeout abort rolls back, which signal-at flip rules out"},
		{"missing --to", []string{"--from", pid(old.PID)}, false, "--from and --to (or --exec) are required"},
	}
	before := selectorPrograms(t)
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			cmd := exec.Command(draindBin(t), append([]string{"handoff", "--pin-dir", pins}, c.args...)...)
			if c.nobody {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			msg := strings.TrimSpace(stderr.String())
			if code != exitBadInput || !strings.Contains(msg, c.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, msg, exitBadInput, c.want)
			}
			if strings.Count(msg, "\n") > 0 {
				t.Fatalf("want one line, got %q", msg)
			}
			requireGone(t, pins)
			requireDetached(t, before)
		})
	}
	// The servers were left as they were: old still gets requests (nothing steered) and nobody was signalled.
	for _, s := range []*testenv.Server{old, newS} {
		if len(s.Signals()) != 0 || s.Exited() {
			t.Fatalf("server %d was signalled or exited", s.PID)
		}
	}
}

// TestDeadlineAndInterrupt: a drain that cannot finish (long-lived connections stay open) ends by policy: abort rolls
// back, signal and kill signal anyway with exit code 4, and Ctrl-C to draind rolls back.
func TestDeadlineAndInterrupt(t *testing.T) {
	cases := []struct {
		name      string
		args      []string
		interrupt bool
		wantCode  int
		wantSig   syscall.Signal // 0: old must not be signalled
	}{
		{"abort", []string{"--timeout", "500ms", "--on-timeout", "abort"}, false, exitRolledBack, 0},
		{"signal", []string{"--timeout", "500ms", "--signal", "USR1", "--exit-wait", "500ms"}, false, exitTimedOut, syscall.SIGUSR1},
		{"kill", []string{"--timeout", "500ms", "--on-timeout", "kill"}, false, exitTimedOut, syscall.SIGKILL},
		{"kill-after", []string{"--timeout", "500ms", "--signal", "USR1", "--kill-after", "300ms"}, false, exitTimedOut, syscall.SIGKILL},
		{"interrupt", nil, true, exitRolledBack, 0},
		// Signalled at the flip (USR1: the server lives on), the deadline passes: no second signal.
		{"flip signal", []string{"--signal-at", "flip", "--timeout", "500ms", "--signal", "USR1", "--exit-wait", "500ms"}, false, exitTimedOut, syscall.SIGUSR1},
		{"flip kill", []string{"--signal-at", "flip", "--timeout", "500ms", "--signal", "USR1", "--on-timeout", "kill"}, false, exitTimedOut, syscall.SIGKILL},
		// Interrupted after the signal at the flip: nothing to roll back, draind stops watching and says so.
		{"flip interrupt", []string{"--signal-at", "flip", "--signal", "USR1"}, true, exitTimedOut, syscall.SIGUSR1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ns, pins := setup(t)
			old := server(t, ns, "old", testenv.ServerOptions{})
			load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: 4, Duration: 20 * time.Second, KeepAlive: 2, KeepAliveEvery: 20 * time.Millisecond})
			time.Sleep(100 * time.Millisecond)
			newS := server(t, ns, "new", testenv.ServerOptions{})
			h := startHandoff(t, append(pidArgs(old, newS, pins), c.args...)...)
			if c.interrupt {
				h.waitFor(t, "] draining", 10*time.Second)
				h.cmd.Process.Signal(os.Interrupt)
			}
			out, code := h.wait(t, 15*time.Second)
			r, err := load.Stop()
			if err != nil {
				t.Fatal(err)
			}
			if code != c.wantCode {
				t.Fatalf("exit %d, want %d: %s", code, c.wantCode, h.errText())
			}
			sigs := old.Signals()
			switch {
			case c.wantSig == 0 && len(sigs) != 0:
				t.Fatalf("old was signalled: %v", sigs)
			case c.wantSig == syscall.SIGKILL:
				if !(out.Killed || out.Signal == "KILL") || !out.ExitSeen || !old.Exited() {
					t.Fatalf("old not killed: signal %s, killed %v, exit seen %v, exited %v (outcome %s, left %d): %s", out.Signal, out.Killed, out.ExitSeen, old.Exited(), out.Outcome, out.Left, h.errText())
				}
			case c.wantSig != 0 && (len(sigs) != 1 || sigs[0].Signal != c.wantSig):
				t.Fatalf("old got %v, want %v", sigs, c.wantSig)
			}
			if c.interrupt && c.wantSig != 0 && !strings.Contains(out.Error, "after the old process was signalled at the flip") {
				t.Fatalf("error %q, want it to say the old process was signalled at the flip", out.Error)
			}
			if c.wantSig == 0 {
				// Rolled back: the long-lived connections never noticed.
				if sumKinds(r.KeepAlive.Failures) != 0 || r.KeepAlive.OK == 0 {
					t.Fatalf("keep-alive after rollback: %+v", r.KeepAlive)
				}
				requireGone(t, pins)
			}
		})
	}
}

// TestSeveralListenersIPv6: each side holds two listeners on [::1]:8080 (nginx `reuseport` style, one per worker);
// after the flip, new connections are spread over both of the new side's listeners and nothing fails.
func TestSeveralListenersIPv6(t *testing.T) {
	ns, pins := setup(t)
	const addr6 = "[::1]:8080"
	o := testenv.ServerOptions{Addr: addr6, ReusePort: true, Listeners: 2, Workers: 2}
	o.ID = "old"
	old := testenv.StartServerForTest(t, ns, o)
	// Two long-lived connections keep the old side draining until the load stops.
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr6, Concurrency: 32, Duration: 20 * time.Second, KeepAlive: 2})
	time.Sleep(200 * time.Millisecond)
	o.ID = "new"
	newS := testenv.StartServerForTest(t, ns, o)
	h := startHandoff(t, pidArgs(old, newS, pins)...)
	h.waitFor(t, "] flipped", 10*time.Second)

	// While the selector steers, hold 16 new connections and count them per new worker (each owns one listener).
	held := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr6, Concurrency: -1, KeepAlive: 16, Duration: 20 * time.Second})
	if len(newS.WorkerPIDs) != 2 {
		t.Fatalf("new workers: %v", newS.WorkerPIDs)
	}
	tr, err := drain.NewTracker(drain.TrackerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	for _, w := range newS.WorkerPIDs {
		p, err := proc.Open(w)
		if err != nil {
			t.Fatal(err)
		}
		c, err := tr.Watch(p, []uint16{8080}, drain.WatchOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n, err := c.Count()
		c.Close()
		p.Close()
		if err != nil || n.Conns == 0 {
			t.Fatalf("worker %d holds %d connections (%v): new connections are not spread over the new listeners", w, n.Conns, err)
		}
		t.Logf("worker %d holds %d of 16 connections", w, n.Conns)
	}
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	out, code := h.wait(t, 30*time.Second)
	held.Stop()
	t.Logf("handoff: %+v", out.Result)
	t.Logf("load: requests %d ok %d failures %v by server %v", r.Requests, r.OK, r.Failures, r.ByServer)
	if code != exitOK || len(out.Listeners) != 1 || out.Listeners[0] != addr6 {
		t.Fatalf("exit %d listeners %v: %s", code, out.Listeners, h.errText())
	}
	requireNoFailures(t, r)
	if last := r.Spans["old"].LastStartNS; last >= out.FlippedAt {
		t.Fatalf("a connection started after the flip reached the old process")
	}
	if out.Fallbacks != 0 || out.Steered == 0 {
		t.Fatalf("selector: %d steered, %d fell back", out.Steered, out.Fallbacks)
	}
	requireGone(t, pins)
}

// TestStaleSlots: a draind that died between writing the socket array and the group leaves sockets in slots no group
// points at: one of another process (its slot is skipped) and the old listener itself (found again). A handoff still
// works, and leaves nothing behind.
func TestStaleSlots(t *testing.T) {
	ns, pins := setup(t)
	old := server(t, ns, "old", testenv.ServerOptions{})
	newS := server(t, ns, "new", testenv.ServerOptions{})
	other := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:9090", ID: "other", ReusePort: true})
	objs, err := loader.Open(loader.Options{PinDir: pins})
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	for i, s := range []*testenv.Server{other, old} {
		fd, err := listenersOf(t, s)[0].Copy()
		if err != nil {
			t.Fatal(err)
		}
		if err := objs.Sockets.Update(uint32(i), uint64(fd), ebpf.UpdateNoExist); err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
	}
	h := startHandoff(t, pidArgs(old, newS, pins)...)
	out, code := h.wait(t, 30*time.Second)
	if code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff over stale slots: exit %d, %+v: %s", code, out.Result, h.errText())
	}
	// The other process's stale slot is still there (not draind's to clear); nothing else is.
	var c uint64
	if err := objs.Sockets.Lookup(uint32(0), &c); err != nil {
		t.Fatalf("the other process's socket was removed from its slot: %v", err)
	}
	objs.Sockets.Delete(uint32(0))
	for slot := uint32(1); slot < loader.MaxSockets; slot++ {
		if objs.Sockets.Lookup(slot, &c) == nil {
			t.Fatalf("slot %d still holds a socket after the handoff", slot)
		}
	}
}
