package drain

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/proc"
)

// OnTimeout is what happens when the drain deadline passes with connections left.
type OnTimeout string

// The policies for OnTimeout.
const (
	TimeoutSignal OnTimeout = "signal" // send the configured signal anyway
	TimeoutKill   OnTimeout = "kill"   // send SIGKILL
	TimeoutAbort  OnTimeout = "abort"  // roll back: steer to the old side again and never signal it
)

// ParseOnTimeout accepts "signal", "kill" or "abort"; the empty string means "signal".
func ParseOnTimeout(s string) (OnTimeout, error) {
	return parseChoice("on-timeout", s, TimeoutSignal, TimeoutKill, TimeoutAbort)
}

// parseChoice accepts one of choices; the empty string means the first (the default).
func parseChoice[T ~string](what, s string, choices ...T) (T, error) {
	if s == "" {
		return choices[0], nil
	}
	if i := slices.Index(choices, T(s)); i >= 0 {
		return choices[i], nil
	}
	names := make([]string, len(choices))
	for i, c := range choices {
		names[i] = string(c)
	}
	last := len(names) - 1
	return "", fmt.Errorf("parse %s %q: want %s or %s", what, s, strings.Join(names[:last], ", "), names[last])
}

// SignalAt is when the old process gets its signal.
type SignalAt string

// The policies for SignalAt.
const (
	// SignalDrained signals the old process once it holds no connection, accepted or queued: right for any server,
	// including one whose graceful shutdown drops requests it reads after the shutdown began (Go's net/http).
	SignalDrained SignalAt = "drained"
	// SignalFlip signals it right after the flip. A server that closes its listener on the signal has what it had
	// queued migrated to the new process by the selector, and drains its accepted connections while draind counts
	// them. Only for servers whose graceful shutdown answers every connection it accepted.
	SignalFlip SignalAt = "flip"
)

// ParseSignalAt accepts "drained" or "flip"; the empty string means "drained".
func ParseSignalAt(s string) (SignalAt, error) {
	return parseChoice("signal-at", s, SignalDrained, SignalFlip)
}

// Allows says whether OnTimeout ot goes with SignalAt a: a rollback at the deadline (abort) needs an old process
// that was not signalled yet.
func (a SignalAt) Allows(ot OnTimeout) error {
	if a == SignalFlip && ot == TimeoutAbort {
		return errors.New("check policy: on-timeout abort rolls back, which signal-at flip rules out (the old process is signalled at the flip)")
	}
	return nil
}

// Queue is what becomes of the connections waiting in the old listeners' accept queues at the flip.
type Queue string

// The policies for Queue.
const (
	// QueueMove moves them to the new process right after the flip (the old server's listeners stay open; its
	// processes are stopped for the few milliseconds this takes): nothing waits for a slow old server.
	QueueMove Queue = "move"
	// QueueKeep leaves them to the old process to accept, as its own queue.
	QueueKeep Queue = "keep"
)

// ParseQueue accepts "move" or "keep"; the empty string means "move".
func ParseQueue(s string) (Queue, error) {
	return parseChoice("queue", s, QueueMove, QueueKeep)
}

// ParseSignal accepts a signal name with or without "SIG" in any case ("TERM", "sigquit") or a number ("15").
func ParseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 || unix.SignalName(syscall.Signal(n)) == "" && n < 32 {
			return 0, fmt.Errorf("parse signal %q: no such signal number", s)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, fmt.Errorf("parse signal %q: unknown signal name", s)
	}
	return sig, nil
}

// SignalName is the short name of sig ("TERM"), or its number.
func SignalName(sig syscall.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return strings.TrimPrefix(n, "SIG")
	}
	return strconv.Itoa(int(sig))
}

// Outcome of Signal.
type Outcome struct {
	Signal   syscall.Signal // what was sent first
	Sent     bool           // it was delivered (false: the process had already exited)
	Killed   bool           // SIGKILL followed because the process outlived KillAfter
	Exited   bool           // the exit was seen through the pidfd
	ExitWait time.Duration  // from the first signal to the exit
}

// SignalOptions configures Signal. Zero values: no SIGKILL escalation, wait 30s for the exit.
type SignalOptions struct {
	KillAfter time.Duration // send SIGKILL if the process has not exited this long after sig (0: never)
	ExitWait  time.Duration // how long to watch for the exit after the last signal
	Sent      func()        // if set, called once the first signal is delivered, before the exit watch
}

// Signal sends sig through the pidfd, escalates to SIGKILL after KillAfter if asked, and watches for the exit.
func Signal(ctx context.Context, p *proc.Process, sig syscall.Signal, opts SignalOptions) (Outcome, error) {
	out := Outcome{Signal: sig}
	start := time.Now()
	if err := p.Signal(sig); err != nil {
		if errors.Is(err, proc.ErrNoProcess) {
			out.Exited = true
			return out, nil
		}
		return out, err
	}
	out.Sent = true
	if opts.Sent != nil {
		opts.Sent()
	}
	return watchExit(ctx, p, out, start, opts)
}

// WatchExit watches for the exit of a process signalled earlier (sig, at start) as Signal does after sending:
// SIGKILL once KillAfter has passed (counted from now), then up to ExitWait.
func WatchExit(ctx context.Context, p *proc.Process, sig syscall.Signal, start time.Time, opts SignalOptions) (Outcome, error) {
	return watchExit(ctx, p, Outcome{Signal: sig, Sent: true}, start, opts)
}

func watchExit(ctx context.Context, p *proc.Process, out Outcome, start time.Time, opts SignalOptions) (Outcome, error) {
	if opts.ExitWait <= 0 {
		opts.ExitWait = 30 * time.Second
	}
	if opts.KillAfter > 0 && out.Signal != syscall.SIGKILL {
		wctx, cancel := context.WithTimeout(ctx, opts.KillAfter)
		exited := p.WaitExit(wctx)
		cancel()
		if exited {
			out.Exited, out.ExitWait = true, time.Since(start)
			return out, nil
		}
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		switch err := p.Signal(syscall.SIGKILL); {
		case err == nil:
			out.Killed = true
		case !errors.Is(err, proc.ErrNoProcess):
			return out, err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, opts.ExitWait)
	defer cancel()
	if p.WaitExit(wctx) {
		out.Exited, out.ExitWait = true, time.Since(start)
	}
	return out, nil
}
