package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/handoff"
	"github.com/draind/draind/steer"
	"github.com/draind/draind/testenv"
)

// TestPreparedPlainServer: a server that never sets SO_REUSEPORT (plain TCP, like Go's, Python's or Node's defaults)
// in its own cgroup. A new instance cannot even bind the port while the old one runs; after `draind prepare` it can
// (the bind hook gives it SO_REUSEPORT, draind gave the old listener the same) but gets no connection before the
// flip (prepare attached the selector, target: old), a same-user process outside the cgroup cannot bind (EPERM), and
// `draind handoff` then upgrades it under load with zero failed connections, the old process signalled once its
// long-lived connections closed.
func TestPreparedPlainServer(t *testing.T) {
	ns, pins := setup(t)
	cg := testenv.CgroupForTest(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") }) // unpins the bind links: they detach
	plain := func(id string) (*testenv.Server, error) {
		return testenv.StartServer(context.Background(), ns, testenv.ServerOptions{Addr: addr, ID: id, Cgroup: cg})
	}
	old, err := plain("old")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Kill() })
	if s, err := plain("too-early"); err == nil || !strings.Contains(err.Error(), "address already in use") {
		if s != nil {
			s.Kill()
		}
		t.Fatalf("a second plain server bound the port before prepare (err %v): the test cannot tell prepare works", err)
	}

	code, stdout, stderr := runAs(t, 0, "prepare", "--json", "--from", strconv.Itoa(old.PID), "--pin-dir", pins)
	var res steer.Prepared
	if code != exitOK || json.Unmarshal([]byte(stdout), &res) != nil || len(res.Shared) != 1 || res.Cgroup != cg || !res.Attached {
		t.Fatalf("prepare: exit %d, %s %s", code, stdout, stderr)
	}
	// The old listener now has SO_REUSEPORT: a process of the same user outside the service's cgroup could join its
	// reuseport group, but the bind guard refuses it.
	rogue, err := testenv.StartServer(context.Background(), ns, testenv.ServerOptions{Addr: addr, ID: "rogue", ReusePort: true})
	if err == nil {
		rogue.Kill()
		t.Fatal("a process outside the service's cgroup bound the prepared port")
	}
	if !strings.Contains(err.Error(), "operation not permitted") {
		t.Fatalf("a process outside the service's cgroup: %v, want EPERM from the bind guard", err)
	}
	// Again: nothing new to do, and it says so.
	code, stdout, _ = runAs(t, 0, "prepare", "--json", "--from", strconv.Itoa(old.PID), "--pin-dir", pins)
	if json.Unmarshal([]byte(stdout), &res) != nil || code != exitOK || res.Attached || len(res.Already) != 1 {
		t.Fatalf("second prepare: exit %d, %s", code, stdout)
	}

	const hold = 3 * time.Second
	loadStart := testenv.MonoNow()
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 16, Duration: 20 * time.Second,
		KeepAlive: 4, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: hold,
	})
	time.Sleep(300 * time.Millisecond)
	newS, err := plain("new")
	if err != nil {
		t.Fatalf("the new plain server could not start after prepare: %v", err)
	}
	t.Cleanup(func() { newS.Kill() })
	// It listens, in the old one's reuseport group, but draind's selector (attached by prepare, target: old) gives
	// it nothing before the flip.
	time.Sleep(500 * time.Millisecond)
	if p := load.Progress(); p.ByServer["new"] != 0 || p.ByServer["old"] == 0 {
		t.Fatalf("before the flip: connections by server %v, want all on the old one", p.ByServer)
	}
	h := startHandoff(t, pidArgs(old, newS, pins)...)
	out, code := h.wait(t, 30*time.Second)
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("load: requests %d ok %d failures %v by server %v; keep-alive %+v", r.Requests, r.OK, r.Failures, r.ByServer, r.KeepAlive)
	if code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff: exit %d, %+v: %s", code, out.Result, h.errText())
	}
	requireNoFailures(t, r)
	if r.ByServer["new"] == 0 || r.KeepAlive.ByServer["old"] == 0 {
		t.Fatalf("load did not reach both servers: %v, keep-alive %v", r.ByServer, r.KeepAlive.ByServer)
	}
	sigs := old.Signals()
	if len(sigs) != 1 || sigs[0].Signal != syscall.SIGTERM || sigs[0].MonoNS < loadStart+hold.Nanoseconds() {
		t.Fatalf("old got signals %v, want one SIGTERM after its long-lived connections closed", sigs)
	}
	requireGone(t, pins)

	// Unprepare, through the new version: the cgroup's programs and the root's guard are detached; SO_REUSEPORT
	// stays, and it says so. Twice: nothing left to do.
	code, stdout, stderr = runAs(t, 0, "unprepare", "--json", "--from", strconv.Itoa(newS.PID), "--pin-dir", pins)
	var un steer.Unprepared
	if code != exitOK || json.Unmarshal([]byte(stdout), &un) != nil || len(un.Ports) != 1 || un.Ports[0] != 8080 || len(un.Detached) != 2 || len(un.Stays) == 0 {
		t.Fatalf("unprepare: exit %d, %s %s", code, stdout, stderr)
	}
	if l := cgroupLinks(pins); len(l) > 0 {
		t.Errorf("unprepare left the links %v", l)
	}
	if code, _, stderr = runAs(t, 0, "unprepare", "--from", strconv.Itoa(newS.PID), "--pin-dir", pins); code != exitBadInput || !strings.Contains(stderr, "nothing is prepared") {
		t.Fatalf("second unprepare: exit %d, %q", code, stderr)
	}
}

// TestPrepareBadInput: prepare refuses what it cannot do, changing nothing.
func TestPrepareBadInput(t *testing.T) {
	ns, pins := setup(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") })
	plainTCP := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: addr, ID: "plain"})
	reuse := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:8081", ID: "reuse", ReusePort: true})
	mptcp := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:8082", ID: "mptcp", MPTCP: true})
	pid := func(s *testenv.Server) string { return strconv.Itoa(s.PID) }
	for _, c := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown pid", []string{"--from", "4194000"}, exitBadInput, "no such process"},
		{"port not listened", []string{"--from", pid(plainTCP), "--port", "9999"}, exitBadInput, "does not listen on port 9999"},
		{"MPTCP listener", []string{"--from", pid(mptcp)}, exitBadInput, "MPTCP listener"},
		{"already SO_REUSEPORT", []string{"--from", pid(reuse)}, exitOK, "nothing to prepare: 127.0.0.1:8081 already set SO_REUSEPORT"},
		{"--cgroup without --port", []string{"--cgroup", "self"}, exitBadInput, "--cgroup needs --port"},
		{"--cgroup not a directory", []string{"--cgroup", "/nonexistent", "--port", "8080"}, exitBadInput, "not a directory"},
	} {
		code, stdout, stderr := runAs(t, 0, append([]string{"prepare", "--pin-dir", pins}, c.args...)...)
		if code != c.code || !strings.Contains(stdout+stderr, c.want) {
			t.Errorf("%s: exit %d, %q %q; want exit %d and %q", c.name, code, stdout, stderr, c.code, c.want)
		}
		requireGone(t, pins)
	}
	// No cgroup v2 mounted (a mount namespace where it is unmounted).
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		"umount -a -t cgroup2 && exec "+draindBin(t)+" prepare --pin-dir "+pins+" --from "+pid(plainTCP)).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != exitBadInput || !strings.Contains(string(out), "no cgroup v2") {
		t.Errorf("no cgroup v2 mounted: %v, %q; want exit %d and \"no cgroup v2\"", err, out, exitBadInput)
	}
	requireGone(t, pins)
	if l := cgroupLinks(pins); len(l) > 0 { // the maps' pins may be there, no program attached to a cgroup
		t.Errorf("a refused prepare attached programs: %v", l)
	}
}

// cgroupLinks lists prepared mode's pinned cgroup links under pins (a link is attached while pinned).
func cgroupLinks(pins string) []string {
	entries, _ := os.ReadDir(pins + "-prepare")
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "cgroup-") {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestPreparedRefusesMPTCP: in a prepared cgroup and network namespace, a new server that asks for MPTCP (Go's
// default since 1.24) gets plain TCP (the socket is refused and Go falls back), so it can be handed off; outside the
// cgroup, MPTCP is untouched.
func TestPreparedRefusesMPTCP(t *testing.T) {
	ns, pins := setup(t)
	cg := testenv.CgroupForTest(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") })
	old := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: addr, ID: "old", Cgroup: cg})
	if code, stdout, stderr := runAs(t, 0, "prepare", "--from", strconv.Itoa(old.PID), "--pin-dir", pins); code != exitOK {
		t.Fatalf("prepare: exit %d, %s %s", code, stdout, stderr)
	}
	newS := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: addr, ID: "new", Cgroup: cg, MPTCP: true})
	outside := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: "127.0.0.1:8081", ID: "outside", MPTCP: true})
	isMPTCP := func(s *testenv.Server) bool { return listenersOf(t, s)[0].MPTCP }
	if isMPTCP(newS) {
		t.Fatal("the new server in the prepared cgroup listens with MPTCP")
	}
	if !isMPTCP(outside) {
		t.Fatal("a server outside the prepared cgroup lost MPTCP: the refusal is not scoped")
	}
	h := startHandoff(t, pidArgs(old, newS, pins)...)
	if out, code := h.wait(t, 30*time.Second); code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff: exit %d, %+v: %s", code, out.Result, h.errText())
	}
}

// TestPreparedWithDaemon: with a daemon running, `draind prepare --standalone` from the command line shares the
// daemon's pinned steering maps, `draind prepare` goes through the daemon's API (which refuses a user another
// user's server), and the daemon then hands the prepared server off; `draind unprepare` goes through the API too.
func TestPreparedWithDaemon(t *testing.T) {
	ns, pins := setup(t)
	cg := testenv.CgroupForTest(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") })
	d := startDaemon(t, newDaemonDir(t), pins)
	old := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: addr, ID: "old", Cgroup: cg})
	from := strconv.Itoa(old.PID)
	if code, _, stderr := runAs(t, 65534, "prepare", "--socket", d.socket, "--from", from); code != exitBadInput || !strings.Contains(stderr, "may only hand off its own processes") {
		t.Fatalf("prepare of root's server by uid 65534: exit %d, %q", code, stderr)
	}
	if l := cgroupLinks(pins); len(l) > 0 {
		t.Fatalf("a refused prepare attached programs: %v", l)
	}
	if code, stdout, stderr := runAs(t, 0, "prepare", "--standalone", "--from", from, "--pin-dir", pins); code != exitOK {
		t.Fatalf("prepare --standalone: exit %d, %s %s", code, stdout, stderr)
	}
	code, stdout, stderr := runAs(t, 0, "prepare", "--json", "--socket", d.socket, "--from", from)
	var res steer.Prepared
	if code != exitOK || json.Unmarshal([]byte(stdout), &res) != nil || res.Attached || len(res.Already) != 1 {
		t.Fatalf("prepare through the daemon, after the standalone one: exit %d, %s %s", code, stdout, stderr)
	}
	newS := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: addr, ID: "new", Cgroup: cg})
	h := startHandoff(t, daemonArgs(d, old, newS)...)
	if out, code := h.wait(t, 30*time.Second); code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff through the daemon after prepare: exit %d, %+v: %s", code, out.Result, h.errText())
	}
	requireUnused(t, pins)
	code, stdout, stderr = runAs(t, 0, "unprepare", "--socket", d.socket, "--from", strconv.Itoa(newS.PID))
	if code != exitOK || !strings.Contains(stdout, "unprepared port(s) [8080]") {
		t.Fatalf("unprepare through the daemon: exit %d, %s %s", code, stdout, stderr)
	}
	if l := cgroupLinks(pins); len(l) > 0 {
		t.Fatalf("unprepare left programs attached: %v", l)
	}
}
