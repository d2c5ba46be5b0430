package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"

	"github.com/draind/draind/api"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

// started is the new process `handoff --exec` started.
type started struct {
	cmd    *exec.Cmd
	p      *proc.Process
	exited chan struct{} // closed once the process exited and was reaped; state is then set
	state  *os.ProcessState
}

// execOptions configure startNew.
type execOptions struct {
	from          *proc.Process
	ports         []uint16
	argv          []string
	pinDir        string
	client        *api.Client // the daemon, if one serves: it prepares
	listenTimeout time.Duration
	say           func(format string, a ...any)
}

// errExecInput marks startNew's errors that are the caller's (nothing was changed).
var errExecInput = errors.New("bad input")

// startNew prepares the old process (steer.Prepare: SO_REUSEPORT, the bind programs; steer.Hold: the selector with
// the old listeners as target), starts argv like the old process (proc.StartLike) and waits until the new process
// listens on every port the old one hands off. Errors before anything changed wrap errExecInput. When the new
// process fails to listen it is stopped; the preparation stays (it is idempotent, and the old process keeps
// everything).
func startNew(ctx context.Context, o execOptions) (*started, error) {
	like, err := proc.Identity(o.from)
	if err != nil {
		return nil, fmt.Errorf("%w: old process: %w", errExecInput, err)
	}
	if _, err := proc.LookPath(o.argv[0], like.Env); err != nil {
		return nil, fmt.Errorf("%w: %w (searched with the old process's PATH)", errExecInput, err)
	}
	prep, err := prepareForExec(ctx, o)
	if err != nil {
		return nil, err
	}
	if len(prep.Shared) > 0 {
		o.say("prepared: %s made shareable (SO_REUSEPORT), bind programs on cgroup %s", strings.Join(prep.Shared, ", "), prep.Cgroup)
	}
	if len(prep.Held) > 0 {
		o.say("selector attached to %s, target: old (the new process gets nothing before the flip)", strings.Join(prep.Held, ", "))
	}
	var want []uint16
	for _, a := range prep.Listeners {
		i := strings.LastIndexByte(a, ':')
		n, _ := strconv.ParseUint(a[i+1:], 10, 16)
		if !slices.Contains(want, uint16(n)) {
			want = append(want, uint16(n))
		}
	}

	cmd, err := proc.StartLike(o.from, like, o.argv)
	if err != nil {
		return nil, err
	}
	s := &started{cmd: cmd, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		s.state = cmd.ProcessState
		close(s.exited)
	}()
	if s.p, err = proc.Open(cmd.Process.Pid); err != nil {
		<-s.exited
		if errors.Is(err, proc.ErrNoProcess) { // it exited at once
			return nil, exitedEarly(cmd.Process.Pid, s.state, want)
		}
		return nil, fmt.Errorf("new process %d: %w (%s)", cmd.Process.Pid, err, s.state)
	}
	o.say("started %s as process %d (uid %d, gid %d, cgroup %s, in the old process's network namespace and directory %s)",
		cmd.Path, cmd.Process.Pid, like.UID, like.GID, like.Cgroup, like.Dir)
	if err := s.waitListening(ctx, want, o.listenTimeout); err != nil {
		s.stop(o.say)
		return nil, err
	}
	o.say("process %d listens on port(s) %v", s.p.PID, want)
	return s, nil
}

// prepareForExec prepares the old process (steer.Prepare) and gives the groups that exist already the selector,
// target: old (steer.Hold): through the daemon if one serves, else here.
func prepareForExec(ctx context.Context, o execOptions) (*api.PrepareResult, error) {
	if o.client != nil {
		idx := 0
		res, err := o.client.Prepare(ctx, api.PrepareRequest{From: api.ProcRef{PIDFD: &idx}, Ports: o.ports, Hold: true}, []int{o.from.FD()})
		var ae *api.Error
		if errors.As(err, &ae) && exitCodeOfKind(ae.Kind) == exitBadInput {
			return nil, fmt.Errorf("%w: prepare old process: %w", errExecInput, err)
		}
		if err != nil {
			return nil, fmt.Errorf("prepare old process: %w", err)
		}
		return res, nil
	}
	pobjs, err := loader.OpenPrepare(loader.Options{PinDir: o.pinDir})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errExecInput, err)
	}
	defer pobjs.Close()
	steering, err := loader.Open(loader.Options{PinDir: o.pinDir})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errExecInput, err)
	}
	defer steering.Close()
	defer steering.RemoveUnusedPins()
	prep, err := steer.Prepare(pobjs, steering, o.from, o.ports)
	if err != nil {
		if isPrepareInput(err) {
			err = fmt.Errorf("%w: %w", errExecInput, err)
		}
		return nil, fmt.Errorf("prepare old process: %w", err)
	}
	res := &api.PrepareResult{Prepared: *prep}
	if res.Held, err = steer.Hold(steering, o.from, prep.Already); err != nil {
		return nil, fmt.Errorf("attach selector (target: old) to %s: %w", strings.Join(prep.Already, ", "), err)
	}
	return res, nil
}

func isPrepareInput(err error) bool {
	return errors.Is(err, steer.ErrNoListeners) || errors.Is(err, steer.ErrNoMatch) || errors.Is(err, steer.ErrIncompatible) ||
		errors.Is(err, proc.ErrNoCgroup2) || errors.Is(err, proc.ErrNotPermitted) || errors.Is(err, loader.ErrNotPermitted)
}

// waitListening waits until the new process listens on every port of want.
func (s *started) waitListening(ctx context.Context, want []uint16, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var missing []uint16
	for {
		missing = slices.Clone(want)
		if ports, err := proc.ListeningPorts(s.p.PID); err == nil {
			missing = slices.DeleteFunc(missing, func(p uint16) bool { return slices.Contains(ports, p) })
		}
		if len(missing) == 0 {
			return nil
		}
		select {
		case <-s.exited:
			return exitedEarly(s.p.PID, s.state, missing)
		case <-ctx.Done():
			return fmt.Errorf("wait for new process %d to listen: not listening on port(s) %v after %s: %w", s.p.PID, missing, limit, context.Cause(ctx))
		case <-tick.C:
		}
	}
}

func exitedEarly(pid int, state *os.ProcessState, missing []uint16) error {
	return fmt.Errorf("wait for new process %d to listen: it exited (%s) before it listened on port(s) %v", pid, state, missing)
}

// stop ends a new process that is not taking over: SIGTERM, and SIGKILL if it still runs 5s later.
func (s *started) stop(say func(string, ...any)) {
	s.p.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
		s.p.Signal(syscall.SIGKILL)
		<-s.exited
	}
	say("stopped new process %d (%s): the old process keeps serving", s.p.PID, s.state)
}

func (s *started) close() {
	if s != nil && s.p != nil {
		s.p.Close()
	}
}

// mainPID tells a supervisor which process is the service's main one now: through the notification socket when
// systemd gave one (MAINPID=, for a service with NotifyAccess=), and in pidFile if set.
func mainPID(pid int, pidFile string) error {
	var errs []error
	if _, err := sddaemon.SdNotify(false, "MAINPID="+strconv.Itoa(pid)); err != nil {
		errs = append(errs, fmt.Errorf("notify MAINPID: %w", err))
	}
	if pidFile != "" {
		tmp := pidFile + ".tmp"
		err := os.WriteFile(tmp, []byte(strconv.Itoa(pid)+"\n"), 0o644)
		if err == nil {
			err = os.Rename(tmp, pidFile)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("write pid file: %w", err))
		}
	}
	return errors.Join(errs...)
}

// takesOver says whether the new process is the service after a handoff that ended with res and err: the flip
// happened and was not rolled back.
func takesOver(res *handoff.Result, err error) bool {
	if res == nil || errors.Is(err, handoff.ErrRolledBack) {
		return false
	}
	return res.Outcome == handoff.OutcomeDrained || res.Outcome == handoff.OutcomeTimedOut
}
