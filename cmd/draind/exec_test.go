package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/handoff"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
	"github.com/draind/draind/testenv"
)

// foreign is a third-party server process the test started (not testenv's): it is killed at cleanup.
type foreign struct {
	cmd *exec.Cmd
	p   *proc.Process
	log string // its stdout and stderr
}

// startForeign starts argv in network namespace ns and cgroup cg, as uid (and gid uid), in directory dir, with
// environment env, and waits until it listens on port.
func startForeign(t *testing.T, ns *testenv.NetNS, cg string, uid uint32, dir string, env []string, port uint16, argv ...string) *foreign {
	t.Helper()
	cgf, err := os.Open(cg)
	if err != nil {
		t.Fatal(err)
	}
	defer cgf.Close()
	f := &foreign{log: filepath.Join(t.TempDir(), "server.log")}
	out, err := os.Create(f.log)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	os.Chmod(f.log, 0o666)
	f.cmd = exec.Command(argv[0], argv[1:]...)
	f.cmd.Dir, f.cmd.Env, f.cmd.Stdout, f.cmd.Stderr = dir, env, out, out
	f.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgf.Fd()), Setsid: true}
	if uid != 0 {
		f.cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uid, Gid: uid}
	}
	if err := testenv.StartIn(ns, f.cmd); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { f.cmd.Wait(); close(exited) }()
	t.Cleanup(func() { f.cmd.Process.Kill(); <-exited })
	if f.p, err = proc.Open(f.cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.p.Close() })
	waitListening(t, f.p, port, f.log)
	return f
}

// waitListening waits (10s at most) until process p listens on port.
func waitListening(t *testing.T, p *proc.Process, port uint16, log string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if side, err := steer.Discover(p); err == nil {
			ok := slices.ContainsFunc(side.Listeners, func(l *steer.Listener) bool { return l.Addr.Port() == port })
			side.Close()
			if ok {
				return
			}
		}
		if p.Exited() || time.Now().After(deadline) {
			b, _ := os.ReadFile(log)
			t.Fatalf("process %d does not listen on port %d (exited: %v); its output:\n%s", p.PID, port, p.Exited(), b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// execCase is one kind of unmodified server for `draind handoff --exec`.
type execCase struct {
	argv  func(id string) []string // the command of the instance that answers with id
	path  string                   // what the load client asks for
	check func(old *proc.Process)  // optional: checks the old instance once it listens
	// daemon: a daemon runs, and `draind handoff --exec` goes through it, run as the service's user (65534) in the
	// service's cgroup and network namespace, as a systemd unit's ExecReload= would be.
	daemon bool
}

// execUnderLoad starts the old instance of c as uid 65534 in a child cgroup, in a working directory of its own and
// with a marker in its environment, puts new-connection and keep-alive load on it, and runs `draind handoff --from
// OLD --exec -- NEW…`. It checks: zero failed connections, long-lived connections kept working on the old
// instance, the new instance answered only after the flip, it runs with the old one's uid, gid, cgroup, network
// namespace, directory and environment, and the old instance exited once drained. It returns the new process's PID.
func execUnderLoad(t *testing.T, c execCase, prepare func(ns *testenv.NetNS, cg, pins string)) int {
	ns, pins := setup(t)
	cg := testenv.CgroupForTest(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") })
	if prepare != nil {
		prepare(ns, cg, pins)
	}
	work := t.TempDir()
	os.Chmod(work, 0o755)
	os.Chmod(filepath.Dir(work), 0o755) // the test's temporary directory: uid 65534 works in it
	for _, id := range []string{"old", "new"} {
		if err := os.Mkdir(filepath.Join(work, id), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(work, id, "id"), []byte(id+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	const nobody = 65534
	env := []string{systemPATH, "HOME=" + work, "DRAIND_TEST_MARK=" + t.Name()}
	old := startForeign(t, ns, cg, nobody, work, env, 8080, c.argv("old")...)
	if c.check != nil {
		c.check(old.p)
	}

	const hold = 3 * time.Second
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Path: c.path, Concurrency: 8, Duration: 20 * time.Second,
		KeepAlive: 4, KeepAliveEvery: 20 * time.Millisecond, KeepAliveFor: hold,
	})
	time.Sleep(300 * time.Millisecond)
	var h *handoffRun
	if c.daemon {
		d := startDaemon(t, newDaemonDir(t), pins)
		h = &handoffRun{}
		cmd := exec.Command(draindBin(t), append([]string{"handoff", "--json", "--daemon", "--socket", d.socket, "--from", strconv.Itoa(old.p.PID), "--exec", "--"}, c.argv("new")...)...)
		cmd.Stdout = &h.stdout
		cgf, err := os.Open(cg)
		if err != nil {
			t.Fatal(err)
		}
		defer cgf.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}, UseCgroupFD: true, CgroupFD: int(cgf.Fd())}
		h.bgProc = startBgIn(t, ns, cmd)
	} else {
		// A supervisor's view: systemd's notification socket, and a pid file.
		notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "notify"), Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		defer notify.Close()
		pidFile := filepath.Join(t.TempDir(), "main.pid")
		h = &handoffRun{}
		cmd := exec.Command(draindBin(t), append([]string{"handoff", "--json", "--from", strconv.Itoa(old.p.PID), "--pin-dir", pins, "--pid-file", pidFile, "--exec", "--"}, c.argv("new")...)...)
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify.LocalAddr().String())
		cmd.Stdout = &h.stdout
		h.bgProc = startBg(t, cmd)
		defer func() {
			notify.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 256)
			n, _ := notify.Read(buf)
			b, _ := os.ReadFile(pidFile)
			if want := strconv.Itoa(pidOf(h)); string(buf[:n]) != "MAINPID="+want || string(b) != want+"\n" {
				t.Errorf("supervisor told %q, pid file %q; want MAINPID=%s", buf[:n], b, want)
			}
		}()
	}
	out, code := h.wait(t, 30*time.Second)
	if out.NewPID > 0 {
		t.Cleanup(func() { syscall.Kill(out.NewPID, syscall.SIGKILL) })
	}
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("load: requests %d ok %d failures %v by server %v; keep-alive %+v", r.Requests, r.OK, r.Failures, r.ByServer, r.KeepAlive)
	t.Logf("draind: %s", h.errText())
	if code != exitOK || out.Outcome != handoff.OutcomeDrained || out.NewPID == 0 {
		b, _ := os.ReadFile(old.log)
		t.Fatalf("handoff --exec: exit %d, %+v: %s\nold server's output:\n%s", code, out, h.errText(), b)
	}
	requireNoFailures(t, r)
	if r.ByServer["new"] == 0 || r.ByServer["old"] == 0 || r.KeepAlive.ByServer["old"] == 0 {
		t.Fatalf("load did not reach both servers: %v, keep-alive %v", r.ByServer, r.KeepAlive.ByServer)
	}
	// Nothing reaches the new server before the flip, except what waited in the old listener's queue and was moved
	// to it (--queue move, the default): such a connection was established before the flip.
	if first := r.Spans["new"].FirstConnectedNS; first < out.FlippedAt && out.QueueMoved == 0 {
		t.Fatalf("the new server answered a connection established %s before the flip", time.Duration(out.FlippedAt-first))
	}
	if !old.p.Exited() || out.Left != 0 || !out.Signalled {
		t.Fatalf("old server: exited %v, signalled %v with %d connections left", old.p.Exited(), out.Signalled, out.Left)
	}
	requireLike(t, old.p.PID, out.NewPID, work, cg)
	return out.NewPID
}

// pidOf is the new process's PID in the result of a finished `handoff --json --exec`.
func pidOf(h *handoffRun) int {
	var out handoffOut
	json.Unmarshal(h.stdout.Bytes(), &out)
	return out.NewPID
}

// requireLike checks that process pid runs like the old process did: uid and gid 65534, cgroup cg, the network
// namespace of the test's netns, working directory dir and the test's environment marker.
func requireLike(t *testing.T, oldPID, pid int, dir, cg string) {
	t.Helper()
	np, err := proc.Open(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer np.Close()
	like, err := proc.Identity(np)
	if err != nil {
		t.Fatal(err)
	}
	if like.UID != 65534 || like.GID != 65534 || like.Cgroup != cg || like.Dir != dir || !slices.Contains(like.Env, "DRAIND_TEST_MARK="+t.Name()) {
		t.Fatalf("new process runs as uid %d gid %d in cgroup %s and directory %s with environment %q", like.UID, like.GID, like.Cgroup, like.Dir, like.Env)
	}
	ino, err := np.NetNSIno()
	if err != nil {
		t.Fatal(err)
	}
	if ino == selfNetNSIno(t) {
		t.Fatal("the new process runs in draind's network namespace, not the old process's")
	}
}

func selfNetNSIno(t *testing.T) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestExecPython: `python3 -m http.server` (no SO_REUSEPORT, one process) is upgraded in one step by `draind
// handoff --exec` under load, with zero failed connections.
func TestExecPython(t *testing.T) {
	python := lookCommand(t, "python3")
	execUnderLoad(t, execCase{
		argv: func(id string) []string {
			return []string{python, "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", id, "--protocol", "HTTP/1.1"}
		},
		path: "/id",
	}, nil)
}

// TestExecPythonWithDaemon: the same through the daemon, by the service's own user: `draind handoff --exec` runs as
// uid 65534 in the service's cgroup and network namespace (a unit's ExecReload= without privileges), and the daemon
// prepares and hands off.
func TestExecPythonWithDaemon(t *testing.T) {
	python := lookCommand(t, "python3")
	execUnderLoad(t, execCase{
		argv: func(id string) []string {
			return []string{python, "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", id, "--protocol", "HTTP/1.1"}
		},
		path:   "/id",
		daemon: true,
	}, nil)
}

// TestExecNode: Node's http server (no SO_REUSEPORT) upgraded in one step under load.
func TestExecNode(t *testing.T) {
	node := lookCommand(t, "node")
	const script = `const fs = require('fs'); const id = fs.readFileSync(process.argv[1] + '/id');
require('http').createServer((req, res) => { res.setHeader('Content-Length', id.length); res.end(id); }).listen(8080, '127.0.0.1');`
	execUnderLoad(t, execCase{argv: func(id string) []string { return []string{node, "-e", script, id} }, path: "/"}, nil)
}

// TestExecBadInput: `handoff --exec` refuses what it cannot do before it changes anything, and stops a new process
// that never listens, the old one keeping everything.
func TestExecBadInput(t *testing.T) {
	ns, pins := setup(t)
	cg := testenv.CgroupForTest(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") })
	old := testenv.StartServerForTest(t, ns, testenv.ServerOptions{Addr: addr, ID: "old", Cgroup: cg})
	from := strconv.Itoa(old.PID)
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"no command", []string{"--from", from, "--exec"}, "needs the new process's command"},
		{"--to and --exec", []string{"--from", from, "--to", from, "--exec", "--", "true"}, "excludes --to"},
		{"unknown command", []string{"--from", from, "--exec", "--", "no-such-server-xyz"}, "command not found"},
		{"unknown pid", []string{"--from", "4194000", "--exec", "--", "true"}, "no such process"},
		{"port not listened", []string{"--from", from, "--port", "9999", "--exec", "--", "true"}, "does not listen on port 9999"},
	} {
		code, stdout, stderr := runAs(t, 0, append([]string{"handoff", "--pin-dir", pins}, c.args...)...)
		if code != exitBadInput || !strings.Contains(stderr, c.want) {
			t.Errorf("%s: exit %d, %q %q; want exit %d and %q", c.name, code, stdout, stderr, exitBadInput, c.want)
		}
	}
	if l := cgroupLinks(pins); len(l) > 0 {
		t.Errorf("a refused handoff --exec attached programs: %v", l)
	}
	// A new process that exits without listening: draind says so, the old server keeps serving.
	code, _, stderr := runAs(t, 0, "handoff", "--pin-dir", pins, "--listen-timeout", "5s", "--from", from, "--exec", "--", "sh", "-c", "exit 3")
	if code != exitError || !strings.Contains(stderr, "exited (exit status 3) before it listened") {
		t.Fatalf("a new process that exits: exit %d, %q", code, stderr)
	}
	// One that runs but never listens: stopped at the timeout.
	code, _, stderr = runAs(t, 0, "handoff", "--pin-dir", pins, "--listen-timeout", "500ms", "--from", from, "--exec", "--", "sleep", "60")
	if code != exitError || !strings.Contains(stderr, "not listening on port(s) [8080] after 500ms") || !strings.Contains(stderr, "stopped new process") {
		t.Fatalf("a new process that never listens: exit %d, %q", code, stderr)
	}
	if sleeping := pgrep(t, "sleep 60"); len(sleeping) > 0 {
		t.Fatalf("the new process that never listened still runs: %v", sleeping)
	}
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: 4, Duration: 500 * time.Millisecond})
	time.Sleep(500 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	requireNoFailures(t, r)
	if r.ByServer["old"] != r.OK || r.OK == 0 {
		t.Fatalf("after the failed --exec: answered by %v, want the old server alone", r.ByServer)
	}
}

// systemPATH is the servers' PATH: the system's directories (root's own, such as a pyenv shim under /root, are not
// for uid 65534).
const systemPATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookCommand returns the path of a program the test needs, found in the system's directories: the test fails in
// CI without it (.ci/run installs it) and is skipped elsewhere.
func lookCommand(t *testing.T, name string) string {
	t.Helper()
	p, err := proc.LookPath(name, []string{systemPATH})
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("requires %s: %v", name, err)
		}
		t.Skipf("requires %s: %v", name, err)
	}
	return p
}

// pgrep lists the processes whose command line is cmdline.
func pgrep(t *testing.T, cmdline string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && string(bytes.ReplaceAll(bytes.TrimRight(b, "\x00"), []byte{0}, []byte(" "))) == cmdline {
			out = append(out, pid)
		}
	}
	return out
}

var (
	goServerOnce sync.Once
	goServerPath string
	goServerErr  error
)

// goServer builds testenv/goserver (http.ListenAndServe with Go's defaults) next to the test's draind binary.
func goServer(t *testing.T) string {
	t.Helper()
	goServerOnce.Do(func() {
		goServerPath = filepath.Join(filepath.Dir(draindBin(t)), "goserver")
		out, err := exec.Command("go", "build", "-o", goServerPath, "../../testenv/goserver").CombinedOutput()
		if err != nil {
			goServerErr = fmt.Errorf("go build goserver: %v\n%s", err, out)
		}
	})
	if goServerErr != nil {
		t.Fatal(goServerErr)
	}
	return goServerPath
}

// prepareCgroup runs `draind prepare --cgroup cg --port 8080 --netns ns`: the service's cgroup is prepared before
// its first version starts.
func prepareCgroup(t *testing.T, ns *testenv.NetNS, cg, pins string) {
	t.Helper()
	code, stdout, stderr := runAs(t, 0, "prepare", "--cgroup", cg, "--port", "8080", "--netns", ns.Path, "--pin-dir", pins)
	if code != exitOK || !strings.Contains(stdout, "prepared cgroup "+cg) {
		t.Fatalf("prepare --cgroup: exit %d, %s %s", code, stdout, stderr)
	}
}

// TestExecGoDefaults: a Go server with Go's defaults (http.ListenAndServe: MPTCP on, no SO_REUSEPORT) in a cgroup
// prepared before its first start listens with plain TCP and SO_REUSEPORT, and is upgraded in one step under load.
// Outside the prepared cgroup the same binary listens with MPTCP: the defaults are on.
func TestExecGoDefaults(t *testing.T) {
	bin := goServer(t)
	var ns *testenv.NetNS
	execUnderLoad(t, execCase{
		argv: func(id string) []string { return []string{bin, "-addr", addr, "-id", id} },
		path: "/",
		check: func(old *proc.Process) {
			side, err := steer.Discover(old)
			if err != nil {
				t.Fatal(err)
			}
			defer side.Close()
			if l := side.Listeners[0]; l.MPTCP || !l.ReusePort {
				t.Fatalf("the first version in the prepared cgroup listens on %s with MPTCP %v, SO_REUSEPORT %v", l, l.MPTCP, l.ReusePort)
			}
			outside := startForeign(t, ns, testenv.CgroupForTest(t), 65534, "/", []string{systemPATH}, 8081, bin, "-addr", "127.0.0.1:8081", "-id", "outside")
			side, err = steer.Discover(outside.p)
			if err != nil {
				t.Fatal(err)
			}
			defer side.Close()
			if !side.Listeners[0].MPTCP {
				t.Fatal("outside the prepared cgroup the Go server does not listen with MPTCP: the test shows nothing about Go's defaults")
			}
		},
	}, func(n *testenv.NetNS, cg, pins string) {
		ns = n
		prepareCgroup(t, n, cg, pins)
	})
}

// TestExecMigratesQueue: connections waiting in the old server's accept queue when it closes its listener migrate to
// the new server instead of being reset. The old Go server is stopped (SIGSTOP) so its queue fills; `handoff --exec
// --timeout 1s --on-timeout kill` flips, and at the deadline kills the old process with its queue full.
func TestExecMigratesQueue(t *testing.T) {
	bin := goServer(t)
	ns, pins := setup(t)
	cg := testenv.CgroupForTest(t)
	t.Cleanup(func() { os.RemoveAll(pins + "-prepare") })
	prepareCgroup(t, ns, cg, pins)
	old := startForeign(t, ns, cg, 0, "/", []string{systemPATH}, 8080, bin, "-addr", addr, "-id", "old")
	if err := old.p.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	const workers = 8
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{Addr: addr, Concurrency: workers, Duration: 10 * time.Second, Timeout: 8 * time.Second})
	time.Sleep(300 * time.Millisecond) // every worker's connection waits in the stopped server's queue
	migrated := migrations(t, old.p.PID)
	h := startHandoff(t, "--from", strconv.Itoa(old.p.PID), "--pin-dir", pins, "--timeout", "1s", "--on-timeout", "kill", "--queue", "keep", "--exec", "--", bin, "-addr", addr, "-id", "new")
	out, code := h.wait(t, 30*time.Second)
	if out.NewPID > 0 {
		t.Cleanup(func() { syscall.Kill(out.NewPID, syscall.SIGKILL) })
	}
	moved := migrated(out.NewPID)
	time.Sleep(300 * time.Millisecond)
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("load: requests %d ok %d failures %v by server %v; migrated %v; draind: %s", r.Requests, r.OK, r.Failures, r.ByServer, moved, h.errText())
	if code != exitTimedOut || out.Outcome != handoff.OutcomeTimedOut || out.NewPID == 0 || out.Left != workers {
		t.Fatalf("handoff --exec: exit %d, %+v, want a timeout with the %d queued connections left", code, out, workers)
	}
	requireNoFailures(t, r)
	if moved != workers || r.ByServer["old"] != 0 {
		t.Fatalf("%v connections migrated, want %d; answered by %v", moved, workers, r.ByServer)
	}
}

// TestSystemdUnits: the units in deploy/systemd pass `systemd-analyze verify`, with the binaries they name replaced by
// the test's draind and Go server.
func TestSystemdUnits(t *testing.T) {
	testenv.RequireCommand(t, "systemd-analyze")
	units, err := filepath.Glob("../../deploy/systemd/*.service")
	if err != nil || len(units) < 2 {
		t.Fatalf("units: %v %v", units, err)
	}
	dir := t.TempDir()
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		s := strings.NewReplacer("/usr/local/bin/draind", draindBin(t), "/usr/local/bin/example-server", goServer(t)).Replace(string(b))
		p := filepath.Join(dir, filepath.Base(u))
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("systemd-analyze", "verify", p).CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", filepath.Base(u), err, out)
		}
	}
}
