package handoff

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

// Resume finishes a handoff that another draind process began (one that was killed, or stopped), from the last State
// it persisted. It adopts the steering as the kernel kept it, then goes on where the handoff was:
//   - not flipped yet: rolls back (the caller that asked for the handoff is gone with that process);
//   - flipped: drains the old side until the deadline the handoff started with, signals it, finishes;
//   - signalled: does not signal again; signalled at the flip (SignalAt flip), drains the old side until the
//     deadline; watches for the exit (SIGKILL when what is left of KillAfter is up), finishes. A new process that
//     died meanwhile changes nothing: there is no going back once the old one was signalled.
//
// The processes are found by PID and must have the pidfs inode numbers of State: a PID that now names another
// process counts as gone. With the old process gone the handoff is over (steering is finished); with the new one
// gone before the old one was signalled, it rolls back. Options gives the logger, tracker, progress, pin directory
// and hooks; the handoff's own parameters come from State.
func Resume(ctx context.Context, st State, opts Options) (*Result, error) {
	opts.From, opts.To = st.From, st.To
	opts.Signal, opts.Timeout, opts.OnTimeout, opts.SignalAt = 0, st.Timeout, st.OnTimeout, st.SignalAt
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	res := &Result{From: st.From, To: st.To, Outcome: OutcomeFailed, Listeners: st.Listeners}
	oldP, newP := openSame(st.From, st.FromIno), openSame(st.To, st.ToIno)
	for _, p := range []*proc.Process{oldP, newP} {
		if p != nil {
			defer p.Close()
		}
	}
	h := &run{ctx: ctx, opts: opts, res: res, oldP: oldP, newP: newP, ports: st.Ports, state: st}
	defer h.close()
	h.contStopped()
	var err error
	if oldP != nil && newP != nil {
		err = h.open()
	} else {
		err = h.openMaps()
	}
	if err != nil {
		// Nothing was changed and the kernel keeps steering: keep the record for a later attempt.
		return res, fmt.Errorf("resume handoff: %w (%w)", err, ErrLeft)
	}
	oldSide, newSide := discoverIfAlive(oldP, newP), discoverIfAlive(newP, oldP)
	for _, side := range []*steer.Side{oldSide, newSide} {
		if side != nil {
			defer side.Close()
		}
	}
	if h.st, err = steer.Adopt(h.objs, st.Groups, oldSide, newSide, steer.Options{Logger: opts.Logger}); err != nil {
		return res, fmt.Errorf("resume handoff: %w", err)
	}
	opts.Progress(Progress{Stage: st.Stage, Message: "resumed by a new draind process", Resumed: true})

	switch {
	case oldP == nil:
		// The old process exited while no draind watched it: nothing left to drain or signal.
		res.Outcome, res.ExitSeen = OutcomeDrained, true
		res.Signalled = st.Stage == StageSignalled
		res.Signal = signalNameIf(res.Signalled, st.Signal)
		if newP == nil {
			return h.rollback(CauseNewExited, "both processes exited while draind was down")
		}
		return h.finish(true)
	case newP == nil && st.Stage != StageSignalled:
		return h.rollback(CauseNewExited, fmt.Sprintf("new process %d exited while draind was down", st.To))
	case newP == nil:
		// Too late to roll back to the old process: it was told to go. Its connections are not counted any more
		// (the counters need both sides); its exit is watched.
		opts.Logger.Warn("new process exited after the old one was signalled", "new", st.To, "old", st.From)
		return h.resumeSignalled(ctx)
	}

	newDied, stopWatch, waitWatch := h.watchNew(ctx)
	defer waitWatch()
	switch st.Stage {
	case StageSteering:
		all, any, err := h.st.Flipped()
		if err != nil {
			return h.rollback(CauseError, fmt.Sprintf("read steering: %v", err))
		}
		if !any {
			return h.rollback(CauseRestarted, "draind restarted before the flip")
		}
		if !all {
			if err := h.st.Flip(); err != nil {
				return h.rollback(CauseError, fmt.Sprintf("flip: %v", err))
			}
		}
		// The flip happened; when exactly is not known: start the deadline now.
		h.state.FlippedAt, h.state.FlippedAtMono = time.Now(), monoNow()
		first, err := h.counter.Count()
		if err != nil {
			return h.rollback(CauseError, fmt.Sprintf("count connections: %v", err))
		}
		h.state.InFlightAtFlip, h.state.Stage = first.Total(), StageFlipped
		if err := h.persist(); err != nil {
			opts.Logger.Error("persist handoff", "err", err)
		}
		return h.drain(ctx, newDied, stopWatch, true)
	case StageFlipped:
		return h.drain(ctx, newDied, stopWatch, false)
	case StageSignalled:
		if st.SignalAt == drain.SignalFlip { // signalled at the flip: the drain may not be over
			return h.drain(ctx, newDied, stopWatch, false)
		}
		stopWatch()
		return h.resumeSignalled(ctx)
	}
	return res, fmt.Errorf("resume handoff: unknown stage %q", st.Stage)
}

// contStopped mends what a draind left when it died while moving the old listeners' accept queues (State.Stopped,
// State.Moving): a listener shut down but not listening again listens again, then the stopped processes continue.
func (h *run) contStopped() {
	if len(h.state.Stopped) == 0 && len(h.state.Moving) == 0 {
		return
	}
	for _, m := range h.state.Moving {
		switch again, err := steer.Relisten(m); {
		case err != nil:
			h.opts.Logger.Error("restore an old listener the previous draind left shut down", "pid", m.PID, "fd", m.FD, "err", err)
		case again:
			h.opts.Logger.Warn("an old listener the previous draind left shut down listens again", "pid", m.PID, "fd", m.FD)
		}
	}
	for _, pid := range h.state.Stopped {
		switch cont, err := proc.ContinueStopped(pid); {
		case err != nil:
			h.opts.Logger.Error("continue a process stopped by the previous draind", "pid", pid, "err", err)
		case cont:
			h.opts.Logger.Warn("continued a process the previous draind left stopped", "pid", pid)
		}
	}
	h.state.Stopped, h.state.Moving = nil, nil
	if err := h.persist(); err != nil {
		h.opts.Logger.Error("persist handoff", "err", err)
	}
}

// resumeSignalled watches for the exit of an old process that the draind before this one signalled, sending SIGKILL
// when what is left of KillAfter since the signal is up, and finishes.
func (h *run) resumeSignalled(ctx context.Context) (*Result, error) {
	st := h.state
	h.res.Outcome, h.res.Signalled, h.res.Signal = OutcomeDrained, true, signalNameIf(true, st.Signal)
	killAfter, at := remaining(st.KillAfter, st.SignalledAt)
	sigCtx, stopSig := h.exitWatchContext(ctx)
	defer stopSig()
	out, err := drain.WatchExit(sigCtx, h.oldP, syscall.Signal(st.Signal), at, drain.SignalOptions{KillAfter: killAfter, ExitWait: st.ExitWait})
	return h.exitWatched(out, err)
}

// remaining is what is left of d (a KillAfter, 0: none) since since, at least 1ns so that it still applies; and the
// time it counts from: since, or now for a record from before the time was persisted.
func remaining(d time.Duration, since time.Time) (time.Duration, time.Time) {
	if since.IsZero() {
		return d, time.Now()
	}
	if d > 0 {
		d = max(d-time.Since(since), time.Nanosecond)
	}
	return d, since
}

// openSame opens the process with this PID if it still is the one with pidfs inode ino, else returns nil.
func openSame(pid int, ino uint64) *proc.Process {
	p, err := proc.Open(pid)
	if err != nil {
		return nil
	}
	if got, err := p.Ino(); err != nil || got != ino || p.Exited() {
		p.Close()
		return nil
	}
	return p
}

func signalNameIf(sent bool, sig int) string {
	if !sent {
		return ""
	}
	return drain.SignalName(syscall.Signal(sig))
}

// discoverIfAlive lists p's listeners (less other's subtree), or returns nil when p is gone or listens on nothing
// any more: Adopt keeps the listeners it cannot find as closed ones.
func discoverIfAlive(p, other *proc.Process) *steer.Side {
	if p == nil {
		return nil
	}
	var exclude []int
	if other != nil {
		exclude = append(exclude, other.PID)
	}
	side, err := steer.Discover(p, exclude...)
	if err != nil {
		return nil
	}
	return side
}
