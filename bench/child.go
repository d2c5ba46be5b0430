package bench

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/draind/draind/testenv"
)

// Environment variables by which a re-executed bench binary learns that it is one of the bench's own children (the
// load client with latency timelines, and the tableflip server). testenv's children (servers, holders, conns clients)
// use testenv's own variables.
const (
	envRole = "DRAINBENCH_ROLE"
	envOpts = "DRAINBENCH_OPTS"
)

const (
	roleLoad      = "load"
	roleTableflip = "tableflip"
)

// RunChildIfRequested runs the role of a testenv or bench child and exits if this process is one; otherwise it
// returns at once. A binary (or TestMain) that runs the bench calls it first thing.
func RunChildIfRequested() {
	testenv.RunChildIfRequested()
	role, ok := os.LookupEnv(envRole)
	if !ok {
		return
	}
	opts := []byte(os.Getenv(envOpts))
	var err error
	switch role {
	case roleLoad:
		os.Unsetenv(envRole)
		os.Unsetenv(envOpts)
		err = runLoadChild(opts)
	case roleTableflip:
		// The variables stay: tableflip starts the next generation with this process's environment, and it must
		// run the same role.
		err = runTableflipChild(opts)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		emit(event{Ev: "error", PID: os.Getpid(), Err: err.Error()})
		fmt.Fprintf(os.Stderr, "drainbench %s (pid %d): %v\n", role, os.Getpid(), err)
		os.Exit(1)
	}
	os.Exit(0)
}

// event is one JSON line a bench child writes to its stdout. Several tableflip generations share one stdout pipe,
// so every line names its process; lines other than the load report stay below PIPE_BUF (written atomically).
//
//	started    Mono                 the load client is sending
//	result     Report               the load client's final report
//	listening  PID, ID, Mono        a tableflip generation listens (ready: Upgrader.Ready returned)
//	upgraded   PID, Mono            a tableflip generation's successor is ready; it closes its listener
//	exiting    PID, Mono, N         a tableflip generation exits (N: connections it held when its listener closed)
//	upgrade-error PID, Err          an upgrade failed (the generation keeps serving)
//	error      PID, Err             the child is about to exit 1
type event struct {
	Ev     string      `json:"ev"`
	PID    int         `json:"pid,omitempty"`
	ID     string      `json:"id,omitempty"`
	Mono   int64       `json:"mono,omitempty"`
	N      int         `json:"n,omitempty"`
	Err    string      `json:"err,omitempty"`
	Report *LoadReport `json:"report,omitempty"`
}

// emit writes one event line to stdout (child side).
func emit(ev event) { testenv.WriteEvent(ev) }

// child is the parent's handle on a bench child process.
type child struct {
	cmd   *exec.Cmd
	stdin *os.File

	exited  chan struct{} // closed once the process has exited
	eof     chan struct{} // closed once its stdout reached EOF (with tableflip: every generation has exited)
	waitErr error         // valid after exited
}

// startChild re-executes this binary as a bench child with role and opts, in ns (nil: the current namespace).
// onEvent is called in order from a reader goroutine for every event line.
func startChild(ns *testenv.NetNS, role string, opts any, onEvent func(event)) (_ *child, err error) {
	optsJSON, err := json.Marshal(opts)
	if err != nil {
		return nil, fmt.Errorf("encode options: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find executable: %w", err)
	}
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("create pipe: %w", err)
	}
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		stdinR.Close()
		stdinW.Close()
		return nil, fmt.Errorf("create pipe: %w", err)
	}
	defer func() {
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
	// A race-enabled binary otherwise sleeps 1s at every exit (a tableflip generation's exit is measured).
	gorace := os.Getenv("GORACE")
	if !strings.Contains(gorace, "atexit_sleep_ms") {
		gorace = strings.TrimSpace(gorace + " atexit_sleep_ms=0")
	}
	env = append(env, envRole+"="+role, envOpts+"="+string(optsJSON), "GORACE="+gorace)
	cmd := &exec.Cmd{
		Path: exe,
		// An absolute argv[0]: tableflip starts the next generation with exec.LookPath(os.Args[0]).
		Args:   []string{exe},
		Env:    env,
		Stdin:  stdinR,
		Stdout: stdoutW,
		Stderr: os.Stderr,
		// Pdeathsig is tied to the forking thread: spawn forks on a thread that lives as long as the process.
		SysProcAttr: &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL},
	}
	if err := testenv.StartIn(ns, cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", role, err)
	}
	c := &child{cmd: cmd, stdin: stdinW, exited: make(chan struct{}), eof: make(chan struct{})}
	go func() {
		defer close(c.eof)
		defer stdoutR.Close()
		sc := bufio.NewScanner(stdoutR)
		sc.Buffer(make([]byte, 64<<10), 64<<20)
		for sc.Scan() {
			var ev event
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				fmt.Fprintf(os.Stderr, "drainbench: child %d: bad event %.200q: %v\n", cmd.Process.Pid, sc.Text(), err)
				continue
			}
			if onEvent != nil {
				onEvent(ev)
			}
		}
	}()
	go func() {
		c.waitErr = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// kill sends SIGKILL to the child; safe when it is gone already.
func (c *child) kill() {
	if err := c.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		fmt.Fprintf(os.Stderr, "drainbench: kill child %d: %v\n", c.cmd.Process.Pid, err)
	}
}
