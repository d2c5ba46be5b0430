package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/api"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
	"golang.org/x/sys/unix"
)

// daemonProc is a `draind serve` running for one test, with its own socket, state directory and pin directory.
type daemonProc struct {
	*bgProc // its stderr is its log
	t       testing.TB
	dir     string // holds the socket (reachable by nobody) and the state directory
	pins    string
	socket  string
}

// newDaemonDir makes the directory for a test daemon's socket and state; nobody may reach the socket.
func newDaemonDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "draind-daemon-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startDaemon starts `draind serve` and waits until its socket answers.
func startDaemon(t testing.TB, dir, pins string) *daemonProc {
	t.Helper()
	d := &daemonProc{t: t, dir: dir, pins: pins, socket: filepath.Join(dir, "draind.sock")}
	d.bgProc = startBg(t, exec.Command(draindBin(t), "serve", "--socket", d.socket, "--state-dir", filepath.Join(dir, "state"),
		"--pin-dir", pins, "--socket-group", "65534", "--log-level", "debug", "--metrics-addr", "127.0.0.1:0"))
	t.Cleanup(func() {
		d.kill()                                    // before startBg's own cleanup: the log is complete once it exited
		if strings.Contains(d.log(), "DATA RACE") { // a draind built with DRAIND_TEST_RACE=1 found one
			t.Errorf("the race detector reported a data race in draind serve")
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		if c, err := net.Dial("unix", d.socket); err == nil {
			c.Close()
			return d
		}
		select {
		case <-d.done:
			t.Fatalf("draind serve exited (%d) before serving: %s", d.code, d.log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("draind serve did not serve within 15s: %s", d.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (d *daemonProc) log() string { return d.errText() }

// waitEnded waits until the daemon runs no handoff and its log holds the "handoff ended" line of each: the line is
// written before a handoff leaves the status list, and the log reaches the test through a pipe a moment later.
func (d *daemonProc) waitEnded(within time.Duration) {
	d.t.Helper()
	testenv.WaitFor(d.t, within, func() bool {
		l := d.log()
		return len(d.status()) == 0 && strings.Count(l, `"msg":"handoff ended"`) >= strings.Count(l, `"msg":"resuming handoff"`)
	})
}

// signal sends sig and waits for the daemon to exit; it returns the exit code (-N: killed by signal N).
func (d *daemonProc) signal(sig syscall.Signal) int {
	d.t.Helper()
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		d.t.Fatalf("draind serve did not exit within 30s of %v: %s", sig, d.log())
	}
	return d.code
}

// records reads the daemon's state file (the handoffs it would resume).
func (d *daemonProc) records() []json.RawMessage {
	d.t.Helper()
	b, err := os.ReadFile(filepath.Join(d.dir, "state", "handoffs.json"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		d.t.Fatal(err)
	}
	var doc struct {
		Handoffs []json.RawMessage `json:"handoffs"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		d.t.Fatalf("state file: %v: %s", err, b)
	}
	return doc.Handoffs
}

// status runs `draind status --json` against the daemon.
func (d *daemonProc) status() []api.Handoff {
	d.t.Helper()
	out, err := exec.Command(draindBin(d.t), "status", "--json", "--socket", d.socket).Output()
	if err != nil {
		d.t.Fatalf("draind status: %v", err)
	}
	var hs []api.Handoff
	if err := json.Unmarshal(out, &hs); err != nil {
		d.t.Fatalf("draind status output %q: %v", out, err)
	}
	return hs
}

// daemonArgs are the handoff flags to go through the test daemon.
func daemonArgs(d *daemonProc, old, new *testenv.Server) []string {
	return []string{"--daemon", "--socket", d.socket, "--from", strconv.Itoa(old.PID), "--to", strconv.Itoa(new.PID)}
}

// TestDaemonHandoffUnderLoad: `draind handoff` through the daemon gives what a standalone run gives: zero failed
// connections, long-lived connections left alone, the old process signalled once they closed; `draind status` shows
// the handoff while it drains, and nothing is left behind.
func TestDaemonHandoffUnderLoad(t *testing.T) {
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	handoffUnderLoad(t, ns, pins, func(old, new *testenv.Server) []string { return daemonArgs(d, old, new) },
		func(old, new *testenv.Server) {
			hs := d.status()
			if len(hs) != 1 || hs[0].From != old.PID || hs[0].To != new.PID || hs[0].Old.Conns == 0 || hs[0].Deadline.IsZero() {
				t.Fatalf("status during the drain: %+v", hs)
			}
		}, true)
	if hs := d.status(); len(hs) != 0 {
		t.Fatalf("status after the end: %+v", hs)
	}
	if recs := d.records(); len(recs) != 0 {
		t.Fatalf("state file still holds %d handoff(s)", len(recs))
	}
	if code := d.signal(syscall.SIGTERM); code != 0 {
		t.Fatalf("draind serve exited %d on SIGTERM", code)
	}
}

// TestDaemonSurvivesKillAndStop: under load, the daemon is killed (SIGKILL) right after the flip, restarted, stopped
// (SIGTERM) mid-drain, and restarted again. Steering stays in the kernel throughout: zero failed connections, new
// connections keep reaching the new process, and the old process is signalled once, only after its long-lived
// connections closed, by the third daemon process.
func TestDaemonSurvivesKillAndStop(t *testing.T) {
	ns, pins := setup(t)
	dir := newDaemonDir(t)
	d := startDaemon(t, dir, pins)
	old := server(t, ns, "old", testenv.ServerOptions{Delay: time.Millisecond})
	const hold = 6 * time.Second
	loadStart := testenv.MonoNow()
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 16, Duration: 30 * time.Second,
		KeepAlive: 8, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: hold,
	})
	time.Sleep(300 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{Delay: time.Millisecond})

	h := startHandoff(t, daemonArgs(d, old, newS)...)
	h.waitFor(t, "flipped", 10*time.Second)
	if code := d.signal(syscall.SIGKILL); code != -int(syscall.SIGKILL) {
		t.Fatalf("daemon exit %d, want killed", code)
	}
	if recs := d.records(); len(recs) != 1 || !strings.Contains(string(recs[0]), `"stage": "flipped"`) {
		t.Fatalf("state file after the kill: %s", recs)
	}
	out, code := h.wait(t, 10*time.Second)
	if code != exitError || !strings.Contains(out.Error, "goes on when it restarts") {
		t.Fatalf("client: exit %d, %q", code, out.Error)
	}
	afterKill := load.Progress()
	time.Sleep(500 * time.Millisecond) // nobody watches: the kernel steers alone

	d2 := startDaemon(t, dir, pins)
	testenv.WaitFor(t, 10*time.Second, func() bool {
		hs := d2.status()
		return len(hs) == 1 && hs[0].Resumed && hs[0].Stage == handoff.StageDraining
	})
	if code := d2.signal(syscall.SIGTERM); code != 0 {
		t.Fatalf("second daemon exited %d on SIGTERM", code)
	}
	if recs := d2.records(); len(recs) != 1 {
		t.Fatalf("state file after SIGTERM holds %d handoffs, want the one in progress", len(recs))
	}
	if len(old.Signals()) != 0 {
		t.Fatalf("old was signalled before it drained: %v", old.Signals())
	}

	d3 := startDaemon(t, dir, pins)
	testenv.WaitFor(t, 20*time.Second, old.Exited)
	d3.waitEnded(20 * time.Second)
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("load: requests %d ok %d failures %v by server %v; keep-alive %+v", r.Requests, r.OK, r.Failures, r.ByServer, r.KeepAlive)
	requireNoFailures(t, r)
	if r.ByServer["new"] <= afterKill.ByServer["new"] {
		t.Fatalf("no new connection reached the new process while draind was down or after: %v then %v", afterKill.ByServer, r.ByServer)
	}
	sigs := old.Signals()
	if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM || sigs[0].MonoNS < loadStart+hold.Nanoseconds() {
		t.Fatalf("old got signals %v, want one SIGTERM after its long-lived connections closed (%v after the load started)", sigs, hold)
	}
	if len(newS.Signals()) != 0 || newS.Exited() {
		t.Fatalf("new was signalled or exited")
	}
	if recs := d3.records(); len(recs) != 0 {
		t.Fatalf("state file still holds %d handoff(s)", len(recs))
	}
	requireUnused(t, pins)
}

// TestDaemonGenerations: A->B, then B->C while A still drains, through one daemon, under load. A handoff that would
// take A's listener again is refused with the ID of the handoff using it. A and B are each signalled once, after their
// own long-lived connections closed; C keeps everything; no connection fails.
func TestDaemonGenerations(t *testing.T) {
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	a := server(t, ns, "a", testenv.ServerOptions{Delay: time.Millisecond})
	const holdA, holdB = 6 * time.Second, 3 * time.Second
	loadStart := testenv.MonoNow()
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 16, Duration: 30 * time.Second,
		KeepAlive: 6, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: holdA,
	})
	time.Sleep(300 * time.Millisecond)
	b := server(t, ns, "b", testenv.ServerOptions{Delay: time.Millisecond})
	c := server(t, ns, "c", testenv.ServerOptions{Delay: time.Millisecond})

	ab := startHandoff(t, daemonArgs(d, a, b)...)
	ab.waitFor(t, "draining:", 10*time.Second)
	hs := d.status()
	if len(hs) != 1 {
		t.Fatalf("status: %+v", hs)
	}
	abID := hs[0].ID

	// A's listener is taken.
	conflict := startHandoff(t, daemonArgs(d, a, c)...)
	out, code := conflict.wait(t, 10*time.Second)
	if code != exitBadInput || !strings.Contains(out.Error, abID) {
		t.Fatalf("second handoff of A: exit %d, %q; want exit %d naming %s", code, out.Error, exitBadInput, abID)
	}

	// Long-lived connections that reach B (new connections go to B now).
	bStart := testenv.MonoNow()
	loadB := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: -1, Duration: 30 * time.Second,
		KeepAlive: 4, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: holdB,
	})
	testenv.WaitFor(t, 10*time.Second, func() bool { return loadB.Progress().KeepAlive.Opened == 4 })
	bc := startHandoff(t, daemonArgs(d, b, c)...)
	bc.waitFor(t, "draining:", 10*time.Second)
	hs = d.status()
	if len(hs) != 2 {
		t.Fatalf("status with both generations draining: %+v", hs)
	}
	// A->B cannot be rolled back any more: B->C took its new side over.
	bcID := hs[1].ID
	if code, _, stderr := runAs(t, 0, "abort", "--socket", d.socket, abID); code != exitBadInput || !strings.Contains(stderr, bcID) {
		t.Fatalf("abort of A->B while B->C drains: exit %d, %q; want exit %d naming %s", code, stderr, exitBadInput, bcID)
	}

	outAB, codeAB := ab.wait(t, 30*time.Second)
	outBC, codeBC := bc.wait(t, 30*time.Second)
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	rB, err := loadB.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("A->B: %s, drained in %v; B->C: %s, drained in %v", outAB.Outcome, outAB.DrainTime, outBC.Outcome, outBC.DrainTime)
	t.Logf("load: %d ok, failures %v, by server %v, keep-alive %v; load on B: keep-alive %+v", r.OK, r.Failures, r.ByServer, r.KeepAlive.ByServer, rB.KeepAlive)
	if codeAB != exitOK || codeBC != exitOK {
		t.Fatalf("exit codes %d and %d: %s / %s", codeAB, codeBC, ab.errText(), bc.errText())
	}
	requireNoFailures(t, r)
	requireNoFailures(t, rB)
	if r.ByServer["c"] == 0 || rB.KeepAlive.ByServer["b"] == 0 {
		t.Fatalf("C got no new connection (%v) or B no long-lived one (%v)", r.ByServer, rB.KeepAlive.ByServer)
	}
	for _, x := range []struct {
		name  string
		s     *testenv.Server
		after int64
	}{{"A", a, loadStart + holdA.Nanoseconds()}, {"B", b, bStart + holdB.Nanoseconds()}} {
		sigs := x.s.Signals()
		if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM || sigs[0].MonoNS < x.after {
			t.Fatalf("%s got signals %v, want one SIGTERM after its own long-lived connections closed", x.name, sigs)
		}
	}
	if len(c.Signals()) != 0 || c.Exited() {
		t.Fatalf("C was signalled or exited")
	}
	requireUnused(t, pins)
}

// runAs runs draind with args as uid/gid and returns its exit code, stdout and stderr.
func runAs(t testing.TB, uid uint32, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(draindBin(t), args...)
	if uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, stdout.String(), stderr.String()
}

// TestDaemonAuthorization: a caller that is not root (uid 65534, through the socket's group) may hand off its own
// processes and no one else's; the new process must have the old one's owner whoever asks. Refusals say why, exit 2,
// and change nothing: no selector attached, no pin left, no process signalled.
func TestDaemonAuthorization(t *testing.T) {
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	const nobody = 65534
	mine := func(id, a string) *testenv.Server {
		return testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: a, ID: id, ReusePort: true, UID: nobody, GID: nobody})
	}
	roots := func(id, a string) *testenv.Server {
		return testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: a, ID: id, ReusePort: true})
	}
	oldN, newN := mine("old-nobody", "127.0.0.1:8080"), mine("new-nobody", "127.0.0.1:8080")
	oldR, newR := roots("old-root", "127.0.0.1:8081"), roots("new-root", "127.0.0.1:8081")
	oldM, newM := mine("old-mixed", "127.0.0.1:8082"), roots("new-mixed", "127.0.0.1:8083") // one reuseport group needs one owner
	pid := func(s *testenv.Server) string { return strconv.Itoa(s.PID) }
	before := selectorPrograms(t)

	cases := []struct {
		name     string
		uid      uint32
		old, new *testenv.Server
		want     string
	}{
		{"someone else's processes", nobody, oldR, newR, "belongs to uid 0; uid 65534 may only hand off its own processes"},
		{"own old, someone else's new", nobody, oldM, newM, "the new process " + pid(newM) + " belongs to uid 0; uid 65534 may only hand off its own"},
		{"owners differ (root asks)", 0, oldM, newM, "must have the same owner"},
	}
	for _, c := range cases {
		code, _, stderr := runAs(t, c.uid, "handoff", "--daemon", "--socket", d.socket, "--from", pid(c.old), "--to", pid(c.new))
		if code != exitBadInput || !strings.Contains(stderr, c.want) {
			t.Fatalf("%s: exit %d, %q; want exit %d and %q", c.name, code, stderr, exitBadInput, c.want)
		}
		requireUnused(t, pins)
		requireDetached(t, before)
	}
	for _, s := range []*testenv.Server{oldR, newR, oldM, newM} {
		if len(s.Signals()) != 0 || s.Exited() {
			t.Fatalf("server %d was signalled or exited", s.PID)
		}
	}

	// Its own processes: handed off.
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: "127.0.0.1:8080", Concurrency: 8, Duration: 10 * time.Second})
	time.Sleep(200 * time.Millisecond)
	code, stdout, stderr := runAs(t, nobody, "handoff", "--daemon", "--json", "--socket", d.socket, "--from", pid(oldN), "--to", pid(newN))
	time.Sleep(200 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	var out handoffOut
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("output %q: %v (stderr %s)", stdout, err, stderr)
	}
	if code != exitOK || out.Outcome != handoff.OutcomeDrained || !oldN.Exited() {
		t.Fatalf("own handoff: exit %d, %+v, stderr %s", code, out.Result, stderr)
	}
	requireNoFailures(t, r)
	if r.ByServer["new-nobody"] == 0 {
		t.Fatalf("no request reached the new process: %v", r.ByServer)
	}
	requireUnused(t, pins)
}

// envPIDNSClient makes the test binary run pidnsClient instead of the tests (TestDaemonPIDNamespace starts it as the
// first process of a new PID namespace). Its value is "netns path,socket path,draind binary".
const envPIDNSClient = "DRAIND_TEST_PIDNS_CLIENT"

// pidnsReport is what pidnsClient prints.
type pidnsReport struct {
	Self, Old, New int // PIDs as this PID namespace sees them
	Code           int
	Handoff        handoffOut
	Stderr         string
	OldSignals     int
	OldExited      bool
	Err            string
}

// pidnsClient runs inside a new PID namespace: it starts an old and a new server (which get small PIDs of this
// namespace), hands them off through the daemon by these PIDs, watches the old one exit and prints a pidnsReport.
func pidnsClient() int {
	rep := pidnsReport{Self: os.Getpid()}
	defer func() { json.NewEncoder(os.Stdout).Encode(rep) }()
	args := strings.Split(os.Getenv(envPIDNSClient), ",")
	os.Unsetenv(envPIDNSClient)
	ns := &testenv.NetNS{Path: args[0]}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	old, err := testenv.StartServer(ctx, ns, testenv.ServerOptions{Addr: addr, ID: "old", ReusePort: true})
	if err != nil {
		rep.Err = err.Error()
		return 0
	}
	defer old.Kill()
	newS, err := testenv.StartServer(ctx, ns, testenv.ServerOptions{Addr: addr, ID: "new", ReusePort: true})
	if err != nil {
		rep.Err = err.Error()
		return 0
	}
	defer newS.Kill()
	rep.Old, rep.New = old.PID, newS.PID
	cmd := exec.CommandContext(ctx, args[2], "handoff", "--daemon", "--json", "--socket", args[1],
		"--from", strconv.Itoa(old.PID), "--to", strconv.Itoa(newS.PID))
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if ee, ok := cmd.Run().(*exec.ExitError); ok {
		rep.Code = ee.ExitCode()
	}
	rep.Stderr = stderr.String()
	json.Unmarshal([]byte(stdout.String()), &rep.Handoff)
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	rep.OldExited, _ = old.Wait(wctx)
	rep.OldSignals = len(old.Signals())
	return 0
}

// TestDaemonPIDNamespace: a client in a child PID namespace hands off two servers by the PIDs it sees there (small
// numbers that name other processes, or none, in the daemon's namespace); the daemon gets the processes themselves
// as pidfds, hands them off, and signals the right old process.
func TestDaemonPIDNamespace(t *testing.T) {
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), envPIDNSClient+"="+ns.Path+","+d.socket+","+draindBin(t))
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client in a PID namespace: %v: %s", err, stderr.String())
	}
	var rep pidnsReport
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("report %q: %v", out, err)
	}
	t.Logf("in the child PID namespace: client %d, old %d, new %d; the daemon saw old %d, new %d", rep.Self, rep.Old, rep.New, rep.Handoff.From, rep.Handoff.To)
	if rep.Err != "" || rep.Self != 1 {
		t.Fatalf("client: %+v", rep)
	}
	if rep.Code != exitOK || rep.Handoff.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff: exit %d, %+v, stderr %s", rep.Code, rep.Handoff.Result, rep.Stderr)
	}
	if rep.Handoff.From == rep.Old || rep.Handoff.To == rep.New {
		t.Fatalf("the daemon reports the namespace's PIDs (%d, %d), not its own", rep.Handoff.From, rep.Handoff.To)
	}
	if rep.OldSignals != 1 || !rep.OldExited {
		t.Fatalf("old server: %d signal(s), exited %v", rep.OldSignals, rep.OldExited)
	}
	requireUnused(t, pins)
}

// TestServeConfig: `draind serve --config` reads the YAML file (flags win); an unknown key or a bad value is refused
// with exit 2 before anything starts.
func TestServeConfig(t *testing.T) {
	_, pins := setup(t)
	dir := newDaemonDir(t)
	sock := filepath.Join(dir, "from-config.sock")
	cfg := filepath.Join(dir, "draind.yaml")
	write := func(s string) {
		if err := os.WriteFile(cfg, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("socket: " + sock + "\nstate_dir: " + filepath.Join(dir, "state") + "\npin_dir: " + pins + "\nlog_level: warn\nsocket_group: \"65534\"\nmetrics_addr: 127.0.0.1:0\n")
	cmd := exec.Command(draindBin(t), "serve", "--config", cfg)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	testenv.WaitFor(t, 10*time.Second, func() bool {
		st, err := os.Stat(sock)
		return err == nil && st.Mode()&os.ModeSocket != 0
	})
	st, _ := os.Stat(sock)
	if st.Mode().Perm() != 0o660 || st.Sys().(*syscall.Stat_t).Gid != 65534 {
		t.Fatalf("socket mode %v gid %d, want 0660 and the configured group", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve on SIGTERM: %v", err)
	}
	for _, bad := range []struct{ yaml, want string }{
		{"sockett: /x\n", "field sockett not found"},
		{"log_level: loud\n", "log level"},
		{"socket_group: no-such-group-here\n", "socket group"},
	} {
		write(bad.yaml)
		code, _, stderr := runAs(t, 0, "serve", "--config", cfg)
		if code != exitBadInput || !strings.Contains(stderr, bad.want) {
			t.Fatalf("config %q: exit %d, %q; want %d and %q", bad.yaml, code, stderr, exitBadInput, bad.want)
		}
	}
}

// TestDaemonAbortAndBadRequests: `draind abort ID` rolls a draining handoff back (the client exits 3, the old process
// keeps everything and is not signalled, nothing is left behind); aborting an unknown ID, or a malformed or oversized
// request, is refused and changes nothing.
func TestDaemonAbortAndBadRequests(t *testing.T) {
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	old := server(t, ns, "old", testenv.ServerOptions{})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 8, Duration: 20 * time.Second,
		KeepAlive: 2, KeepAliveEvery: 50 * time.Millisecond, KeepAliveFor: 20 * time.Second,
	})
	time.Sleep(300 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{})
	before := selectorPrograms(t)

	for _, c := range []struct {
		body, want string
		code       int
	}{
		{`{"from":{"pid":1},"to":`, "unexpected EOF", 400},
		{`{"from":{"pid":1},"to":{"pid":2},"extra":1}`, "unknown field", 400},
		{`{"from":{"pid":1},"to":{"pid":2},"ready_url":"` + strings.Repeat("x", 20<<10) + `"}`, "request too large", 400},
	} {
		hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.socket)
		}}}
		resp, err := hc.Post("http://draind/v1/handoffs", "application/json", strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		var e api.Error
		json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != c.code || e.Kind != api.KindBadInput || !strings.Contains(e.Message, c.want) {
			t.Fatalf("%.50s: %d %+v; want %d, bad_input, %q", c.body, resp.StatusCode, e, c.code, c.want)
		}
	}
	if code, _, stderr := runAs(t, 0, "abort", "--socket", d.socket, "h-00000000"); code != exitBadInput || !strings.Contains(stderr, "no handoff") {
		t.Fatalf("abort of an unknown id: exit %d, %q", code, stderr)
	}
	requireUnused(t, pins)
	requireDetached(t, before)

	h := startHandoff(t, daemonArgs(d, old, newS)...)
	h.waitFor(t, "draining:", 10*time.Second)
	hs := d.status()
	if len(hs) != 1 {
		t.Fatalf("status: %+v", hs)
	}
	code, stdout, stderr := runAs(t, 0, "abort", "--json", "--socket", d.socket, hs[0].ID)
	if code != exitOK || !strings.Contains(stdout, `"rolled_back": true`) {
		t.Fatalf("abort: exit %d, %s %s", code, stdout, stderr)
	}
	out, code := h.wait(t, 10*time.Second)
	if code != exitRolledBack || out.Outcome != handoff.OutcomeRolledBack || !strings.Contains(out.RollbackReason, "aborted through the API by uid 0") {
		t.Fatalf("client after the abort: exit %d, %+v", code, out.Result)
	}
	afterAbort := load.Progress().ByServer["old"]
	time.Sleep(500 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	requireNoFailures(t, r)
	if r.ByServer["old"] <= afterAbort {
		t.Fatalf("new connections did not go back to the old process after the abort: %v", r.ByServer)
	}
	if len(old.Signals()) != 0 || old.Exited() {
		t.Fatalf("old was signalled after an abort: %v", old.Signals())
	}
	requireUnused(t, pins)
	requireNoSelector(t, old)
}

// TestDaemonConcurrentPorts: handoffs of different ports run at the same time in one daemon, each to its own end.
func TestDaemonConcurrentPorts(t *testing.T) {
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	type pair struct {
		addr     string
		old, new *testenv.Server
		load     *testenv.Load
		h        *handoffRun
	}
	var ps []*pair
	for _, a := range []string{"127.0.0.1:8080", "127.0.0.1:8081"} {
		p := &pair{addr: a}
		p.old = testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: a, ID: "old", ReusePort: true})
		p.load = testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
			Addr: a, Concurrency: 4, Duration: 20 * time.Second,
			KeepAlive: 2, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: 3 * time.Second,
		})
		p.new = testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: a, ID: "new", ReusePort: true})
		ps = append(ps, p)
	}
	time.Sleep(200 * time.Millisecond)
	for _, p := range ps {
		p.h = startHandoff(t, daemonArgs(d, p.old, p.new)...)
	}
	for _, p := range ps {
		p.h.waitFor(t, "draining:", 10*time.Second)
	}
	if hs := d.status(); len(hs) != 2 {
		t.Fatalf("status with both handoffs draining: %+v", hs)
	}
	// Scrapes at the same time as both handoffs (run with DRAIND_TEST_RACE=1 to have the race detector watch).
	url := d.metricsURL()
	scrapes := make(chan string, 3)
	for range 3 {
		go func() {
			r, err := http.Get(url)
			if err != nil {
				scrapes <- ""
				return
			}
			b, _ := io.ReadAll(r.Body)
			r.Body.Close()
			scrapes <- string(b)
		}()
	}
	for range 3 {
		text := <-scrapes
		for _, p := range ps {
			if v := sample(text, `draind_inflight_connections{listener="`+p.addr+`",name="",netns="`+netnsLabel(t, ns)+`",role="old"}`); v < 2 {
				t.Errorf("a scrape during both handoffs: old in flight on %s = %v, want its 2 long-lived connections", p.addr, v)
			}
		}
	}
	for _, p := range ps {
		out, code := p.h.wait(t, 30*time.Second)
		r, err := p.load.Stop()
		if err != nil {
			t.Fatal(err)
		}
		if code != exitOK || out.Outcome != handoff.OutcomeDrained || len(out.Listeners) != 1 || out.Listeners[0] != p.addr {
			t.Fatalf("%s: exit %d, %+v", p.addr, code, out.Result)
		}
		requireNoFailures(t, r)
		if len(p.old.Signals()) != 1 || r.ByServer["new"] == 0 {
			t.Fatalf("%s: old signals %v, by server %v", p.addr, p.old.Signals(), r.ByServer)
		}
	}
	requireUnused(t, pins)
}

// TestServeNotifiesSystemd: started as a Type=notify service (NOTIFY_SOCKET, WATCHDOG_USEC), the daemon says
// READY=1 once it serves, pets the watchdog, and says STOPPING=1 on SIGTERM.
func TestServeNotifiesSystemd(t *testing.T) {
	_, pins := setup(t)
	dir := newDaemonDir(t)
	notify := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sock := filepath.Join(dir, "draind.sock")
	cmd := exec.Command(draindBin(t), "serve", "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--pin-dir", pins, "--metrics-addr", "off")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify, "WATCHDOG_USEC=200000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var got []string
	buf := make([]byte, 256)
	want := func(msg string) {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			n, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("no %s from draind (got %q): %v", msg, got, err)
			}
			got = append(got, string(buf[:n]))
			if string(buf[:n]) == msg {
				return
			}
		}
	}
	want("READY=1")
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("READY=1 before the socket exists: %v", err)
	}
	want("WATCHDOG=1")
	cmd.Process.Signal(syscall.SIGTERM)
	want("STOPPING=1")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve on SIGTERM: %v", err)
	}
}

// metricsURL is the daemon's /metrics URL, from its log.
func (d *daemonProc) metricsURL() string {
	d.t.Helper()
	var url string
	testenv.WaitFor(d.t, 10*time.Second, func() bool {
		for _, line := range strings.Split(d.log(), "\n") {
			var l struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "serving metrics" {
				url = "http://" + l.Addr + "/metrics"
				return true
			}
		}
		return false
	})
	return url
}

// scrape fetches the daemon's metrics in the Prometheus text format and checks them with promtool.
func scrape(t testing.TB, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := io.Copy(&b, resp.Body); err != nil {
		t.Fatal(err)
	}
	check := exec.Command("promtool", "check", "metrics")
	check.Stdin = strings.NewReader(b.String())
	if out, err := check.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v: %s", err, out)
	}
	return b.String()
}

// netnsLabel is the netns label of series about a network namespace: its inode number.
func netnsLabel(t testing.TB, ns *testenv.NetNS) string {
	t.Helper()
	st, err := os.Stat(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	return strconv.FormatUint(st.Sys().(*syscall.Stat_t).Ino, 10)
}

// sample returns the value of the series whose line starts with prefix (name and labels), or -1.
func sample(text, prefix string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, prefix+" ") {
			v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, prefix)), 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}

// TestDaemonMetrics: the daemon's /metrics, checked by promtool, shows a handoff under load as it happens (both
// sides' in-flight connections on the listener, the selector's decisions, the deadline, the kernel's counters) and
// what it came to (drained, SIGTERM sent, durations); the handoff's series go away when it ends.
func TestDaemonMetrics(t *testing.T) {
	testenv.RequireCommand(t, "promtool")
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	url := d.metricsURL()
	before := scrape(t, url)
	if v := sample(before, "draind_handoffs_in_progress"); v != 0 {
		t.Fatalf("handoffs in progress before any: %v", v)
	}
	old := server(t, ns, "old", testenv.ServerOptions{})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 8, Duration: 20 * time.Second,
		KeepAlive: 4, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: 3 * time.Second,
	})
	time.Sleep(300 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{})
	h := startHandoff(t, append(daemonArgs(d, old, newS), "--name", "web")...)
	h.waitFor(t, "draining:", 10*time.Second)
	during := scrape(t, url)
	series := func(name, labels string) string { return name + "{" + labels + "}" }
	l := `listener="127.0.0.1:8080",name="web",netns="` + netnsLabel(t, ns) + `"`
	for _, c := range []struct {
		series string
		ok     func(float64) bool
	}{
		{"draind_handoffs_in_progress", func(v float64) bool { return v == 1 }},
		{series("draind_inflight_connections", l+`,role="old"`), func(v float64) bool { return v >= 4 }},
		{series("draind_inflight_connections", l+`,role="new"`), func(v float64) bool { return v >= 0 }},
		{series("draind_queued_connections", l+`,role="old"`), func(v float64) bool { return v >= 0 }},
		{series("draind_selector_decisions_total", `decision="steered",`+l), func(v float64) bool { return v > 0 }},
		{series("draind_drain_deadline_timestamp_seconds", l), func(v float64) bool { return v > float64(time.Now().Unix()) }},
		{"draind_handoffs_started_total", func(v float64) bool { return v == 1 }},
	} {
		if v := sample(during, c.series); !c.ok(v) {
			t.Errorf("during the drain: %s = %v\n%s", c.series, v, grepDraind(during))
		}
	}
	if !strings.Contains(during, "draind_kernel_tcp_migrate_requests_total{netns=") {
		t.Errorf("no kernel counters of the handoff's network namespace during the drain")
	}
	out, code := h.wait(t, 30*time.Second)
	if _, err := load.Stop(); err != nil {
		t.Fatal(err)
	}
	if code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff: exit %d, %+v", code, out.Result)
	}
	after := scrape(t, url)
	for _, c := range []struct {
		series string
		want   float64
	}{
		{`draind_handoffs_finished_total{result="drained"}`, 1},
		{`draind_signals_sent_total{signal="SIGTERM"}`, 1},
		{"draind_handoff_duration_seconds_count", 1},
		{"draind_drain_duration_seconds_count", 1},
		{"draind_handoffs_in_progress", 0},
		{"draind_collect_errors_total", 0},
	} {
		if v := sample(after, c.series); v != c.want {
			t.Errorf("after the handoff: %s = %v, want %v", c.series, v, c.want)
		}
	}
	if strings.Contains(after, "draind_inflight_connections{") || strings.Contains(after, "draind_selector_decisions_total{") {
		t.Errorf("the finished handoff's series are still exported")
	}
}

// grepDraind keeps draind's own series of a scrape, for failure messages.
func grepDraind(text string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "draind_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestDaemonResumeNewDied: the daemon is killed after the flip and the new process dies while it is down; the daemon
// that takes the handoff over rolls it back: steering goes back to the old process (the selector is detached, the
// pins are gone), which is not signalled, and the state file forgets the handoff.
func TestDaemonResumeNewDied(t *testing.T) {
	ns, pins := setup(t)
	dir := newDaemonDir(t)
	d := startDaemon(t, dir, pins)
	old := server(t, ns, "old", testenv.ServerOptions{})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 4, Duration: 20 * time.Second,
		KeepAlive: 2, KeepAliveEvery: 50 * time.Millisecond, KeepAliveFor: 20 * time.Second,
	})
	defer load.Stop()
	time.Sleep(200 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{})
	h := startHandoff(t, daemonArgs(d, old, newS)...)
	h.waitFor(t, "draining:", 10*time.Second)
	d.signal(syscall.SIGKILL)
	h.wait(t, 10*time.Second)
	if err := newS.Kill(); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 10*time.Second, newS.Exited)

	d2 := startDaemon(t, dir, pins)
	d2.waitEnded(20 * time.Second)
	if recs := d2.records(); len(recs) != 0 {
		t.Fatalf("state file still holds %d handoff(s)", len(recs))
	}
	if !strings.Contains(d2.log(), "new process") || !strings.Contains(d2.log(), "exited while draind was down") {
		t.Fatalf("the resumed handoff did not roll back for the new process's death:\n%s", d2.log())
	}
	if len(old.Signals()) != 0 || old.Exited() {
		t.Fatalf("old was signalled (%v) or exited", old.Signals())
	}
	requireUnused(t, pins)
	requireNoSelector(t, old)
	before := load.Progress().ByServer["old"]
	time.Sleep(300 * time.Millisecond)
	if after := load.Progress().ByServer["old"]; after <= before {
		t.Fatalf("new connections do not reach the old process after the rollback (%d then %d)", before, after)
	}
}

// TestDaemonSignalAtFlipResumed: `--signal-at flip` through the daemon, and a daemon restarted after that signal.
// The old server stopped accepting with connections queued, and takes 10s to act on SIGTERM; the daemon signals it at
// the flip and is killed; the next daemon resumes the handoff at "signalled", counts the drain (the queue), and at
// the 2s deadline kills the old server (--on-timeout kill), whose queued connections then migrate to the new server:
// none fails.
func TestDaemonSignalAtFlipResumed(t *testing.T) {
	ns, pins := setup(t)
	dir := newDaemonDir(t)
	d := startDaemon(t, dir, pins)
	const queued = 8
	old, load := queuedOld(t, ns, queued, testenv.ServerOptions{ExitDelay: 10 * time.Second})
	migrated := migrations(t, old.PID)
	newS := server(t, ns, "new", testenv.ServerOptions{})
	const deadline = 2 * time.Second
	h := startHandoff(t, append(daemonArgs(d, old, newS), "--signal-at", "flip", "--timeout", deadline.String(), "--on-timeout", "kill")...)
	h.waitFor(t, "SIGTERM", 10*time.Second)
	if code := d.signal(syscall.SIGKILL); code != -int(syscall.SIGKILL) {
		t.Fatalf("daemon exit %d, want killed", code)
	}
	if recs := d.records(); len(recs) != 1 || !strings.Contains(string(recs[0]), `"stage": "signalled"`) || !strings.Contains(string(recs[0]), `"signal_at": "flip"`) {
		t.Fatalf("state file after the kill: %s", recs)
	}
	h.wait(t, 10*time.Second)
	sigs := old.Signals()
	if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM {
		t.Fatalf("old got %v, want one SIGTERM", sigs)
	}

	d2 := startDaemon(t, dir, pins)
	testenv.WaitFor(t, 10*time.Second, old.Exited)
	took := time.Duration(testenv.MonoNow() - sigs[0].MonoNS)
	t.Logf("old process exited %v after its SIGTERM at the flip", took)
	if took < deadline || took > deadline+2*time.Second {
		t.Fatalf("old process exited %v after the flip, want SIGKILL at the %v deadline", took, deadline)
	}
	d2.waitEnded(10 * time.Second)
	moved := migrated(newS.PID)
	r := stopLoad(t, load)
	t.Logf("migrated %v", moved)
	requireNoFailures(t, r)
	if moved < queued || r.ByServer["old"] != 0 {
		t.Fatalf("%v connections migrated, want >= %d; answered by %v", moved, queued, r.ByServer)
	}
	if l := d2.log(); !strings.Contains(l, `"msg":"resuming handoff"`) || !strings.Contains(l, `"stage":"signalled"`) || !strings.Contains(l, `"outcome":"timed_out"`) {
		t.Fatalf("the second daemon did not resume the handoff and end it at the deadline:\n%s", l)
	}
	if recs := d2.records(); len(recs) != 0 {
		t.Fatalf("state file still holds %d handoff(s)", len(recs))
	}
	requireUnused(t, pins)
}

// TestDaemonKillAfterResumed: a daemon killed after the old process got its signal (SIGUSR1, which the old server
// ignores) leaves the rest of --kill-after to the next daemon: it sends SIGKILL when the 2s since the signal are up,
// not 2s after it started, and not never. With the new process gone meanwhile, it is too late to roll back: the next
// daemon says so and does the same.
func TestDaemonKillAfterResumed(t *testing.T) {
	for _, newGone := range []bool{false, true} {
		t.Run(fmt.Sprintf("new_gone=%v", newGone), func(t *testing.T) {
			ns, pins := setup(t)
			dir := newDaemonDir(t)
			d := startDaemon(t, dir, pins)
			old := server(t, ns, "old", testenv.ServerOptions{})
			newS := server(t, ns, "new", testenv.ServerOptions{})
			const killAfter = 2 * time.Second
			h := startHandoff(t, append(daemonArgs(d, old, newS), "--signal", "USR1", "--kill-after", killAfter.String())...)
			h.waitFor(t, "SIGUSR1", 10*time.Second)
			if code := d.signal(syscall.SIGKILL); code != -int(syscall.SIGKILL) {
				t.Fatalf("daemon exit %d, want killed", code)
			}
			h.wait(t, 10*time.Second)
			sigs := old.Signals()
			if len(sigs) != 1 || sigs[0].Signal != syscall.SIGUSR1 {
				t.Fatalf("old got %v, want SIGUSR1", sigs)
			}
			if newGone {
				if err := newS.Kill(); err != nil {
					t.Fatal(err)
				}
				testenv.WaitFor(t, 5*time.Second, newS.Exited)
			}
			time.Sleep(time.Second) // the next daemon starts about 1s into the 2s
			d2 := startDaemon(t, dir, pins)
			testenv.WaitFor(t, 10*time.Second, old.Exited)
			took := time.Duration(testenv.MonoNow() - sigs[0].MonoNS)
			t.Logf("old process exited %v after its SIGUSR1", took)
			if took < killAfter || took > killAfter+time.Second {
				t.Fatalf("old process exited %v after its signal, want SIGKILL at %v", took, killAfter)
			}
			d2.waitEnded(10 * time.Second)
			l := d2.log()
			if !strings.Contains(l, `"stage":"signalled"`) || !strings.Contains(l, `"outcome":"drained"`) {
				t.Fatalf("the second daemon did not end the resumed handoff:\n%s", l)
			}
			if newGone != strings.Contains(l, "new process exited after the old one was signalled") {
				t.Fatalf("new process gone: %v; the second daemon's log:\n%s", newGone, l)
			}
			requireUnused(t, pins)
		})
	}
}

// TestDaemonMoveInterrupted: a daemon killed while the old server is stopped for the move of its accept queue
// (--queue move, the default) must not leave it stopped: the state file names the stopped processes and the next
// daemon continues them, then finishes the handoff. The stop lasts a few milliseconds: the test kills the daemon
// when waitid(2) reports the old server (its child) stopped, and tries again, up to 5 times, if that came too late.
func TestDaemonMoveInterrupted(t *testing.T) {
	for attempt := 1; attempt <= 5; attempt++ {
		if moveInterrupted(t) {
			return
		}
		t.Logf("attempt %d: the daemon was not killed while the old server was stopped", attempt)
	}
	t.Fatal("the daemon was never killed while the old server was stopped")
}

// moveInterrupted runs TestDaemonMoveInterrupted once; false: the kill came after the old server was continued, or
// the stop was not seen.
func moveInterrupted(t *testing.T) bool {
	ns, pins := setup(t)
	dir := newDaemonDir(t)
	d := startDaemon(t, dir, pins)
	old, load := queuedOld(t, ns, 8, testenv.ServerOptions{})
	newS := server(t, ns, "new", testenv.ServerOptions{})
	stopped := make(chan error, 1)
	go func() {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, old.PID, &info, unix.WSTOPPED|unix.WNOWAIT, nil)
		if err == nil {
			err = d.cmd.Process.Kill()
		}
		stopped <- err
	}()
	h := startHandoff(t, append(daemonArgs(d, old, newS), "--timeout", "3s")...)
	select {
	case err := <-stopped:
		if errors.Is(err, unix.ECHILD) {
			// The old server exited, reaped, without this waitid seeing it stopped: a stop of a few milliseconds
			// that ended before the waiting thread ran (a busy machine). Try again; a move that never stops the old
			// server fails every attempt.
			h.wait(t, 10*time.Second)
			t.Logf("the old server's stop was not seen: %s", h.errText())
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the old server was never stopped: %s", h.errText())
	}
	if code := d.signal(syscall.SIGKILL); code != -int(syscall.SIGKILL) {
		t.Fatalf("daemon exit %d, want killed", code)
	}
	h.wait(t, 10*time.Second)
	caught := proc.State(old.PID) == 'T'
	if caught {
		if recs := d.records(); len(recs) != 1 || !strings.Contains(string(recs[0]), `"stopped": [`) {
			t.Fatalf("state file after the kill: %s", recs)
		}
	}

	// Either way the next daemon finishes the handoff (and continues the old server if it was left stopped).
	d2 := startDaemon(t, dir, pins)
	testenv.WaitFor(t, 10*time.Second, func() bool { return proc.State(old.PID) != 'T' })
	testenv.WaitFor(t, 10*time.Second, old.Exited)
	d2.waitEnded(10 * time.Second)
	r := stopLoad(t, load)
	requireNoFailures(t, r)
	if l := d2.log(); caught != strings.Contains(l, "continued a process the previous draind left stopped") {
		t.Fatalf("old server stopped when the daemon died: %v; the second daemon's log:\n%s", caught, l)
	}
	if recs := d2.records(); len(recs) != 0 {
		t.Fatalf("state file still holds %d handoff(s)", len(recs))
	}
	requireUnused(t, pins)
	return caught
}
