package proc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// ErrNotStopped is returned by Stop when a process's threads do not all stop in time (a thread in uninterruptible
// sleep, or a process under a debugger, whose tracer gets the SIGSTOP).
var ErrNotStopped = errors.New("process did not stop")

// Stopped is a set of processes that Stop stopped; Cont continues them.
type Stopped struct {
	procs []*Process
	once  sync.Once
	err   error
}

// StopOptions for Stop. The zero value waits up to 200 ms.
type StopOptions struct {
	// Timeout bounds the wait for every thread of every process to stop; default 200 ms.
	Timeout time.Duration
	// Before, if set, is called with the PIDs about to get SIGSTOP (those not stopped already), before the first
	// one does; an error stops nothing.
	Before func(pids []int) error
}

// Stop stops ps with SIGSTOP (through their pidfds) and returns once every thread of every one of them is stopped,
// so none runs until Cont. A process that was already stopped (by somebody else) is left alone and not continued by
// Cont. On error, the processes stopped so far are continued and nothing is left stopped.
func Stop(ctx context.Context, ps []*Process, opts StopOptions) (_ *Stopped, err error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 200 * time.Millisecond
	}
	s := &Stopped{}
	defer func() {
		if err != nil {
			err = errors.Join(err, s.Cont())
		}
	}()
	var todo []*Process
	var pids []int
	for _, p := range ps {
		if stopped, _ := threadsStopped(p.PID); stopped {
			continue
		}
		todo, pids = append(todo, p), append(pids, p.PID)
	}
	if opts.Before != nil && len(todo) > 0 {
		if err := opts.Before(pids); err != nil {
			return nil, fmt.Errorf("stop processes: %w", err)
		}
	}
	for _, p := range todo {
		if err := p.Signal(syscall.SIGSTOP); err != nil {
			return nil, fmt.Errorf("stop processes: %w", err) // "signal process N: ..."
		}
		s.procs = append(s.procs, p)
	}
	deadline := time.Now().Add(opts.Timeout)
	for _, p := range s.procs {
		for {
			stopped, err := threadsStopped(p.PID)
			if err != nil {
				return nil, fmt.Errorf("stop process %d: %w", p.PID, err)
			}
			if stopped {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("stop process %d: %w within %s", p.PID, ErrNotStopped, opts.Timeout)
			}
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("stop process %d: %w", p.PID, err)
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	return s, nil
}

// PIDs lists the processes Stop stopped (and Cont continues).
func (s *Stopped) PIDs() []int {
	out := make([]int, len(s.procs))
	for i, p := range s.procs {
		out[i] = p.PID
	}
	return out
}

// Cont continues the stopped processes (SIGCONT). Safe to call more than once; a process that exited meanwhile is
// not an error.
func (s *Stopped) Cont() error {
	s.once.Do(func() {
		var errs []error
		for _, p := range s.procs {
			if err := p.Signal(syscall.SIGCONT); err != nil && !errors.Is(err, ErrNoProcess) {
				errs = append(errs, fmt.Errorf("continue process %d: %w", p.PID, err))
			}
		}
		s.err = errors.Join(errs...)
	})
	return s.err
}

// threadsStopped reports whether every thread of pid is in group stop (state T) or gone (Z, X). A thread stopped by
// a tracer (t) does not count: its tracer may resume it at any time.
func threadsStopped(pid int) (bool, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, ErrNoProcess
		}
		return false, err
	}
	for _, t := range tasks {
		b, err := os.ReadFile(dir + "/" + t.Name() + "/stat")
		if err != nil {
			continue // the thread exited
		}
		switch taskState(string(b)) {
		case 'T', 'Z', 'X':
		default:
			return false, nil
		}
	}
	return true, nil
}

// taskState returns the state letter of a /proc/.../stat line, 0 if it has none.
func taskState(stat string) byte {
	if f := statFields(stat); len(f) > 0 && f[0] != "" {
		return f[0][0]
	}
	return 0
}

// ContinueStopped continues pid (SIGCONT) if it is stopped, and reports whether it was: what a draind does for the
// processes a draind that died while they were stopped (Stop) left behind.
func ContinueStopped(pid int) (bool, error) {
	p, err := Open(pid)
	if errors.Is(err, ErrNoProcess) {
		return false, nil // exited
	}
	if err != nil {
		return false, fmt.Errorf("continue process %d: %w", pid, err)
	}
	defer p.Close()
	if stopped, err := threadsStopped(pid); err != nil || !stopped {
		return false, nil
	}
	if err := p.Signal(syscall.SIGCONT); err != nil {
		return false, err
	}
	return true, nil
}
