package testenv

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Environment variables by which a re-executed binary learns that it is a testenv child.
const (
	envRole = "DRAIND_TESTENV_ROLE"
	envOpts = "DRAIND_TESTENV_OPTS"
)

// Roles a child can run.
const (
	roleServer       = "server"
	roleWorker       = "worker"
	roleLoad         = "load"
	roleHolder       = "holder"
	roleHolderWorker = "holder-worker"
	roleConns        = "conns"
	roleChurn        = "churn"
)

// Main runs the role of a testenv child and exits if this process is one; otherwise it runs the tests and exits with
// their status. Call it from TestMain of every test package that starts servers or load clients.
func Main(m *testing.M) {
	RunChildIfRequested()
	os.Exit(m.Run())
}

// RunChildIfRequested runs the role of a testenv child and exits if this process is one (DRAIND_TESTENV_ROLE is set);
// otherwise it returns at once. A binary that starts testenv children calls it first thing in main.
func RunChildIfRequested() {
	role, ok := os.LookupEnv(envRole)
	if !ok {
		return
	}
	opts := os.Getenv(envOpts)
	os.Unsetenv(envRole)
	os.Unsetenv(envOpts)
	os.Exit(runChild(role, []byte(opts)))
}

func runChild(role string, opts []byte) int {
	var err error
	switch role {
	case roleServer:
		err = runServer(opts)
	case roleWorker:
		err = runWorker(opts)
	case roleLoad:
		err = runLoad(opts)
	case roleHolder:
		err = runHolder(opts)
	case roleHolderWorker:
		err = runHolderWorker(opts)
	case roleConns:
		err = runConns(opts)
	case roleChurn:
		err = runChurn(opts)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		emit(event{Ev: "error", Err: err.Error()})
		fmt.Fprintf(os.Stderr, "testenv %s (pid %d): %v\n", role, os.Getpid(), err)
		return 1
	}
	return 0
}

// event is one JSON line a child writes to its stdout. Which fields are set depends on Ev:
//
//	listening  Addr, PIDs (workers), Mono    the server or holder listens (and all its workers are ready)
//	started    -                             the load client is sending
//	served     Served                        running count of served requests
//	signal     Signal, Mono                  a signal arrived
//	ack        Seq, Err                      a control command was carried out
//	progress   Result                        periodic load snapshot
//	result     Result                        final load result
//	exiting    Served, Holder, Conns         about to exit 0
//	error      Err                           about to exit 1
//	accept-error Err, Mono                   a listener's accept failed: its accept loop ended
//	holder     Holder, Seq (stats command)   holder counts (on change, rate-limited, and before a stats ack)
//	conns      Conns, Seq (stats command)    conns client counts (likewise)
//	opened     Conns                         the conns client finished opening (all established, or gave up)
//	churn      Churn                         periodic (progress) and final (final set) churn counts
type event struct {
	Ev     string       `json:"ev"`
	Seq    int          `json:"seq,omitempty"`
	Err    string       `json:"err,omitempty"`
	Addr   string       `json:"addr,omitempty"`
	PIDs   []int        `json:"pids,omitempty"`
	Served int          `json:"served,omitempty"`
	Signal int          `json:"signal,omitempty"`
	Mono   int64        `json:"mono,omitempty"`
	Result *LoadResult  `json:"result,omitempty"`
	Holder *HolderStats `json:"holder,omitempty"`
	Conns  *ConnsStats  `json:"conns,omitempty"`
	Churn  *ChurnResult `json:"churn,omitempty"`
	Final  bool         `json:"final,omitempty"`
}

var stdoutMu sync.Mutex

// emit writes one event line to stdout (child side).
func emit(ev event) { WriteEvent(ev) }

// WriteEvent writes v as one JSON line to stdout, in a single write (a child's side of the event protocol; the
// bench's children use it too).
func WriteEvent(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testenv: encode event: %v\n", err)
		return
	}
	b = append(b, '\n')
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	_, _ = os.Stdout.Write(b)
}

// readControl reads control lines "<command> <seq>" from stdin (child side) and calls handle for each one, in order.
// It returns at EOF.
func readControl(handle func(cmd string, seq int)) {
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		seq := 0
		if len(f) > 1 {
			seq, _ = strconv.Atoi(f[1])
		}
		handle(f[0], seq)
	}
}

// ack confirms control command seq (child side).
func ack(seq int, err error) {
	ev := event{Ev: "ack", Seq: seq}
	if err != nil {
		ev.Err = err.Error()
	}
	emit(ev)
}

// proc is the parent's handle on a child: it reads the child's events, sends control commands and waits for exit.
type proc struct {
	cmd   *exec.Cmd
	stdin *os.File

	onEvent func(event) // called in order from the reader goroutine

	ctlMu sync.Mutex // one control command at a time
	mu    sync.Mutex
	seq   int
	acks  map[int]chan error

	exited  chan struct{} // closed when the process has exited
	eof     chan struct{} // closed when its stdout reached EOF
	waitErr error         // valid after exited
}

type procConfig struct {
	ns         *NetNS
	role       string
	opts       any
	extraFiles []*os.File
	uid, gid   uint32 // credentials if uid != 0
	cgroup     string // cgroup v2 directory to start the child in, if set
	onEvent    func(event)
}

// startProc re-executes this binary as a child with the given role, in the given namespace.
func startProc(cfg procConfig) (_ *proc, err error) {
	optsJSON, err := json.Marshal(cfg.opts)
	if err != nil {
		return nil, fmt.Errorf("encode options: %w", err)
	}
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		stdinR.Close()
		stdinW.Close()
		return nil, err
	}
	defer func() {
		// The child has its own copies of these.
		stdinR.Close()
		stdoutW.Close()
		if err != nil {
			stdinW.Close()
			stdoutR.Close()
		}
	}()

	env := make([]string, 0, len(os.Environ())+3)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envRole+"=") && !strings.HasPrefix(kv, envOpts+"=") && !strings.HasPrefix(kv, "GORACE=") {
			env = append(env, kv)
		}
	}
	env = append(env, envRole+"="+cfg.role, envOpts+"="+string(optsJSON), childGORACE())

	cmd := &exec.Cmd{
		Path:       "/proc/self/exe",
		Args:       []string{"draind-testenv-" + cfg.role},
		Env:        env,
		Stdin:      stdinR,
		Stdout:     stdoutW,
		Stderr:     os.Stderr,
		ExtraFiles: cfg.extraFiles,
		SysProcAttr: &syscall.SysProcAttr{
			// Nothing outlives the parent. The signal is tied to the forking thread; spawn forks on a thread
			// that lives as long as the process.
			Pdeathsig: syscall.SIGKILL,
		},
	}
	if cfg.uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: cfg.uid, Gid: cfg.gid, NoSetGroups: true}
	}
	if cfg.cgroup != "" {
		cg, err := os.Open(cfg.cgroup)
		if err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
		defer cg.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cg.Fd()) // clone3(CLONE_INTO_CGROUP)
	}
	if err := spawn(cfg.ns, cmd.Start); err != nil {
		return nil, err
	}

	p := &proc{
		cmd:     cmd,
		stdin:   stdinW,
		onEvent: cfg.onEvent,
		acks:    make(map[int]chan error),
		exited:  make(chan struct{}),
		eof:     make(chan struct{}),
	}
	go p.read(stdoutR)
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
		p.stdin.Close()
	}()
	return p, nil
}

// childGORACE returns the GORACE setting for a child: the race detector (if the binary has it) otherwise sleeps 1s
// at every exit, which would delay each server's and load client's exit, and a pre-fork master's twice.
func childGORACE() string {
	v := os.Getenv("GORACE")
	if !strings.Contains(v, "atexit_sleep_ms") {
		v = strings.TrimSpace(v + " atexit_sleep_ms=0")
	}
	return "GORACE=" + v
}

func (p *proc) read(r *os.File) {
	defer close(p.eof)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var ev event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: child %d: bad event %q: %v\n", p.cmd.Process.Pid, sc.Text(), err)
			continue
		}
		if ev.Ev == "ack" {
			p.mu.Lock()
			ch := p.acks[ev.Seq]
			delete(p.acks, ev.Seq)
			p.mu.Unlock()
			if ch != nil {
				var err error
				if ev.Err != "" {
					err = errors.New(ev.Err)
				}
				ch <- err
			}
			continue
		}
		if p.onEvent != nil {
			p.onEvent(ev)
		}
	}
}

// control sends a command and waits until the child confirms it.
func (p *proc) control(ctx context.Context, command string) error {
	p.ctlMu.Lock()
	defer p.ctlMu.Unlock()
	p.mu.Lock()
	p.seq++
	seq := p.seq
	ch := make(chan error, 1)
	p.acks[seq] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.acks, seq)
		p.mu.Unlock()
	}()

	if _, err := fmt.Fprintf(p.stdin, "%s %d\n", command, seq); err != nil {
		if p.hasExited() {
			return errors.New("process exited")
		}
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-p.eof:
		return errors.New("process exited")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// hasExited asks the kernel too: the goroutine that reaps the child may run a moment after its exit, later than a
// test that saw the exit another way (draind's pidfd) looks. WNOWAIT leaves the zombie to that goroutine; ECHILD
// means it has just reaped it.
func (p *proc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
	}
	var info unix.Siginfo
	err := unix.Waitid(unix.P_PID, p.cmd.Process.Pid, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	return errors.Is(err, unix.ECHILD) || (err == nil && info.Signo == int32(unix.SIGCHLD))
}

// wait waits until the process has exited and its events are read. exited is false only if ctx ended first; err is
// then ctx.Err(), else the process's exit error (nil for exit status 0).
func (p *proc) wait(ctx context.Context) (exited bool, err error) {
	select {
	case <-p.exited:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	// The child's stdout is not shared with anything else, so EOF follows exit closely.
	t := time.NewTimer(2 * time.Second)
	defer t.Stop()
	select {
	case <-p.eof:
	case <-t.C:
	case <-ctx.Done():
	}
	return true, p.waitErr
}

func (p *proc) kill() error {
	err := p.cmd.Process.Kill()
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

func (p *proc) signal(sig os.Signal) error {
	return p.cmd.Process.Signal(sig)
}

// spawner forks all children from one OS thread that stays locked for the life of the process. Pdeathsig fires
// when the thread that forked a child exits, and the Go runtime ends threads whose goroutine exits while locked
// (any code doing namespace tricks may do that to a thread it borrowed), so forking on an arbitrary thread could get
// a child killed at a random time.
var spawner struct {
	once sync.Once
	reqs chan spawnReq
}

type spawnReq struct {
	ns   *NetNS
	fn   func() error
	done chan error
}

// spawn runs fn (cmd.Start) on the spawner thread, switched into ns for the call.
// StartIn starts cmd in network namespace ns (nil: the current one) from testenv's spawner thread: a thread that
// lives as long as this process, so that a child's Pdeathsig fires only when this process dies. For child processes
// a package starts itself (testenv's own children use it too).
func StartIn(ns *NetNS, cmd *exec.Cmd) error { return spawn(ns, cmd.Start) }

func spawn(ns *NetNS, fn func() error) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan spawnReq)
		go runSpawner(spawner.reqs)
	})
	req := spawnReq{ns: ns, fn: fn, done: make(chan error, 1)}
	spawner.reqs <- req
	return <-req.done
}

func runSpawner(reqs chan spawnReq) {
	runtime.LockOSThread() // never unlocked: the thread must outlive every child forked on it
	for req := range reqs {
		if req.ns == nil {
			req.done <- req.fn()
			continue
		}
		restore, err := enterNetNS(req.ns.Path)
		if err != nil {
			req.done <- fmt.Errorf("enter netns %s: %w", req.ns.Name, err)
			continue
		}
		err = req.fn()
		if rerr := restore(); rerr != nil {
			req.done <- errors.Join(err, fmt.Errorf("restore netns: %w", rerr))
			// This thread is stuck in the wrong namespace. Keep it (and the children forked on it) alive
			// and hand the work to a fresh spawner thread.
			go runSpawner(reqs)
			select {}
		}
		req.done <- err
	}
}
