// Package handoff runs one handoff from an old to a new process: resolve, discover, check, steer, wait for the
// new side to be ready, flip, drain the old side, signal it, and finish — or roll back to where it started.
// It ties steer/ and drain/ together for the CLI and, later, the daemon.
package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

// ErrBadInput marks errors caused by what the caller asked for; nothing was changed.
var ErrBadInput = errors.New("bad input")

// ErrRolledBack marks a handoff that failed after steering started and was rolled back: the old side keeps
// everything and was not signalled.
var ErrRolledBack = errors.New("handoff rolled back")

// ErrUnwatched marks a handoff with SignalAt flip interrupted during the drain: the old process has its signal and
// drains by itself, no longer watched; nothing is rolled back.
var ErrUnwatched = errors.New("interrupted after the old process was signalled at the flip")

// ErrLeft is the context cause with which a daemon that stops cancels its handoffs: they return ErrLeft at once
// and leave the steering and the processes as they are, for the next draind process to Resume. Any other cause
// (or none) rolls a handoff back if its old process was not signalled yet.
var ErrLeft = errors.New("left for the next draind process")

// Options for Run. Zero values are the documented defaults.
type Options struct {
	From, To     int             // old and new PID (required)
	FromProc     *proc.Process   // if set, the old process itself (From is then only its PID, for reports); the caller closes it after Run
	ToProc       *proc.Process   // the same for the new process
	Ports        []uint16        // hand off only these ports (default: every port the old side listens on)
	Signal       syscall.Signal  // for the old process once drained, or at the flip (SignalAt) (default SIGTERM)
	Timeout      time.Duration   // drain deadline (default 5m)
	OnTimeout    drain.OnTimeout // what to do at the deadline (default signal)
	SignalAt     drain.SignalAt  // when to signal the old process (default drained; flip excludes OnTimeout abort)
	Queue        drain.Queue     // the old listeners' accept queues at the flip: moved to the new side (default) or kept
	KillAfter    time.Duration   // SIGKILL if the old process outlives its signal (flip: drain) by this (default off)
	ExitWait     time.Duration   // how long to watch for the old process's exit (default 30s)
	ReadyURL     string          // if set, must answer 2xx (from the new process's netns) before the flip
	ReadyTimeout time.Duration   // default 10s
	PinDir       string          // bpffs directory for draind's pins (default loader.DefaultPinDir)
	Poll         time.Duration   // >0: count by polling at this interval instead of waiting for kernel events (a baseline)
	Tracker      *drain.Tracker  // counts connections; nil: Run starts its own and closes it
	Objects      *loader.Objects // the pinned maps; nil: Run opens them (under PinDir) and closes them
	Logger       *slog.Logger    // default slog.Default()
	Progress     func(Progress)  // optional progress callback
	// Claim, if set, is called with the pairs once the listeners are found and paired, before anything changes; an
	// error refuses the handoff as bad input (a daemon refuses listeners another of its handoffs is using).
	Claim func(pairs []steer.Pair) error
	// Persist, if set, is called with the handoff's state at each stage a draind restarted mid-handoff needs to
	// finish it (Resume): steering begun, flipped, signalled. An error before the flip rolls back; later ones are
	// logged.
	Persist func(State) error
	// Counting, if set, is called with the Counters of the old and the new side once both are watched, and with
	// nil, nil before they are closed (readers such as metrics Peek them meanwhile).
	Counting func(old, new *drain.Counter)
}

// State is what a draind process that takes over a handoff (Resume) needs to know about it.
type State struct {
	Stage          Stage              `json:"stage"` // StageSteering, StageFlipped or StageSignalled
	From           int                `json:"from"`
	To             int                `json:"to"`
	FromIno        uint64             `json:"from_ino"` // pidfs inode numbers: the processes' identities (a PID may be reused)
	ToIno          uint64             `json:"to_ino"`
	Ports          []uint16           `json:"ports"`
	Listeners      []string           `json:"listeners"`
	Groups         []steer.GroupState `json:"groups"`
	Signal         int                `json:"signal"`
	Timeout        time.Duration      `json:"timeout_ns"`
	OnTimeout      drain.OnTimeout    `json:"on_timeout"`
	SignalAt       drain.SignalAt     `json:"signal_at,omitempty"` // empty: drained (a record from before the field)
	KillAfter      time.Duration      `json:"kill_after_ns"`
	ExitWait       time.Duration      `json:"exit_wait_ns"`
	FlippedAt      time.Time          `json:"flipped_at,omitzero"` // wall clock: the drain deadline is FlippedAt+Timeout
	FlippedAtMono  int64              `json:"flipped_at_mono_ns,omitempty"`
	SignalledAt    time.Time          `json:"signalled_at,omitzero"` // wall clock: KillAfter counts from it
	DrainedAt      time.Time          `json:"drained_at,omitzero"`   // SignalAt flip: the drain's end, where KillAfter counts from
	InFlightAtFlip int                `json:"in_flight_at_flip"`
	// Stopped lists the old side's processes stopped (SIGSTOP) while their accept queues move; a draind that finds
	// them here died meanwhile, and continues them.
	Stopped []int `json:"stopped,omitempty"`
	// Moving lists the old listeners whose queues were being moved then: one may have been left not listening.
	Moving []steer.Moving `json:"moving,omitempty"`
}

// Stage names a step of the handoff, reported through Progress.
type Stage string

// The stages in order.
const (
	StageSteering   Stage = "steering"   // listeners found and paired, selector attached (target: old)
	StageReady      Stage = "ready"      // the new side is ready
	StageFlipped    Stage = "flipped"    // new connections go to the new side
	StageMoved      Stage = "moved"      // what waited in the old listeners' accept queues went to the new side
	StageDraining   Stage = "draining"   // count of the old side's in-flight connections changed
	StageSignalled  Stage = "signalled"  // the old process got its signal
	StageExited     Stage = "exited"     // the old process exited
	StageRolledBack Stage = "rolledback" // steering went back to the old side
)

// Progress is one progress report.
type Progress struct {
	Stage   Stage
	Signal  string      // StageSignalled, when the signal was just delivered: its name ("SIGTERM")
	Resumed bool        // the report of a handoff taken over by Resume (its stage is where it was)
	Count   drain.Count // the old side's count, in StageFlipped and StageDraining
	New     drain.Count // the new side's count at the same time
	Message string
}

// Outcome summarizes how a handoff ended.
type Outcome string

// The outcomes.
const (
	OutcomeDrained    Outcome = "drained"     // drained to zero, then signalled
	OutcomeTimedOut   Outcome = "timed_out"   // the deadline passed; signalled or killed by policy
	OutcomeRolledBack Outcome = "rolled_back" // steering went back to the old side; it was not signalled
	OutcomeFailed     Outcome = "failed"      // could not start; nothing changed
)

// Cause is the kind of a rollback's reason: a short, fixed set (a metrics label).
type Cause string

// The causes.
const (
	CauseNewExited Cause = "new_exited" // the new process exited before the old one was signalled
	CauseNotReady  Cause = "not_ready"  // the new side failed its readiness check
	CauseDeadline  Cause = "deadline"   // the drain deadline passed with --on-timeout abort
	CauseAborted   Cause = "aborted"    // someone asked (draind abort, Ctrl-C, SIGTERM to a standalone draind)
	CauseRestarted Cause = "restarted"  // a draind that took the handoff over found it not flipped yet
	CauseError     Cause = "error"      // anything else (a failed map write, count, persist)
)

// Causes lists every Cause.
var Causes = []Cause{CauseNewExited, CauseNotReady, CauseDeadline, CauseAborted, CauseRestarted, CauseError}

// Result reports a handoff.
type Result struct {
	Outcome         Outcome        `json:"outcome"`
	From            int            `json:"from"`
	To              int            `json:"to"`
	Listeners       []string       `json:"listeners"`         // addresses handed off
	InFlightAtFlip  int            `json:"in_flight_at_flip"` // old side's connections when the flip happened
	Left            int            `json:"left"`              // connections left when the drain ended
	DrainTime       time.Duration  `json:"drain_time_ns"`     // from the flip to zero (or to the deadline)
	Signal          string         `json:"signal,omitempty"`  // signal sent to the old process
	SignalAt        drain.SignalAt `json:"signal_at"`         // when: once drained, or at the flip
	Queue           drain.Queue    `json:"queue"`             // the old listeners' accept queues: moved or kept
	QueueMoved      int            `json:"queue_moved"`       // connections waiting in them when they were moved to the new side
	QueuePaused     time.Duration  `json:"queue_paused_ns"`   // how long the old side's processes were stopped for it
	QueueEmptied    int            `json:"queue_emptied"`     // connections queued at the flip that the old side accepted itself within steer.DefaultMoveGrace (not moved)
	Signalled       bool           `json:"signalled"`         // it was delivered
	Killed          bool           `json:"killed"`            // SIGKILL followed
	ExitSeen        bool           `json:"exit_seen"`         // the old process's exit was seen
	ExitWait        time.Duration  `json:"exit_wait_ns"`      // from the signal to the exit
	RollbackReason  string         `json:"rollback_reason,omitempty"`
	RollbackCause   Cause          `json:"rollback_cause,omitempty"`         // the reason's kind, for metrics
	FlippedAt       int64          `json:"flipped_at_mono_ns,omitempty"`     // CLOCK_MONOTONIC of the flip
	RolledBackAt    int64          `json:"rolled_back_at_mono_ns,omitempty"` // CLOCK_MONOTONIC of the rollback
	DrainedAt       int64          `json:"drained_at_mono_ns,omitempty"`     // CLOCK_MONOTONIC when the drain ended (zero seen, or the deadline)
	SignalledAt     int64          `json:"signalled_at_mono_ns,omitempty"`   // CLOCK_MONOTONIC just before the signal was sent
	SteeringLeft    bool           `json:"steering_left"`                    // the selector stays because old listeners are still open
	Steered         uint64         `json:"steered"`                          // selector decisions for the target side
	Fallbacks       uint64         `json:"fallbacks"`                        // decisions that fell back to the other side
	Migrated        uint64         `json:"migrated"`                         // connections migrated off a closing listener
	Failed          uint64         `json:"selector_failed"`                  // decisions left to the kernel (no draind listener alive)
	Probed          uint64         `json:"probed"`                           // readiness probes sent to the new side before the flip
	Snapshots       int            `json:"snapshots"`                        // full snapshots of the old side (they tag its sockets for the events)
	SnapshotMax     time.Duration  `json:"snapshot_max_ns"`                  // the longest of them
	FastSnapshots   int            `json:"fast_snapshots"`                   // fast snapshots (exact counts between full ones)
	FastSnapshotMax time.Duration  `json:"fast_snapshot_max_ns"`             // the longest of them
}

func (o *Options) defaults() error {
	if o.Signal == 0 {
		o.Signal = syscall.SIGTERM
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Minute
	}
	if o.OnTimeout == "" {
		o.OnTimeout = drain.TimeoutSignal
	}
	if o.ExitWait == 0 {
		o.ExitWait = 30 * time.Second
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Progress == nil {
		o.Progress = func(Progress) {}
	}
	switch {
	case o.From <= 0 || o.To <= 0:
		return fmt.Errorf("%w: old and new PIDs must be > 0", ErrBadInput)
	case o.From == o.To:
		return fmt.Errorf("%w: %w (%d)", ErrBadInput, steer.ErrSamePID, o.From)
	case o.Timeout < 0:
		return fmt.Errorf("%w: timeout %s is not positive", ErrBadInput, o.Timeout)
	case o.ReadyTimeout < 0 || o.KillAfter < 0 || o.ExitWait < 0:
		return fmt.Errorf("%w: durations must be positive", ErrBadInput)
	}
	if _, err := drain.ParseOnTimeout(string(o.OnTimeout)); err != nil {
		return fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	at, err := drain.ParseSignalAt(string(o.SignalAt))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	o.SignalAt = at
	if err := at.Allows(o.OnTimeout); err != nil {
		return fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	if o.Queue, err = drain.ParseQueue(string(o.Queue)); err != nil {
		return fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	return nil
}

func bad(err error) error { return fmt.Errorf("%w: %w", ErrBadInput, err) }

// Run performs one handoff. It returns a Result whenever steering started; the error is nil only when the old side
// drained (or timed out by policy) and was signalled.
func Run(ctx context.Context, opts Options) (*Result, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	res := &Result{From: opts.From, To: opts.To, Outcome: OutcomeFailed}
	oldP, newP := opts.FromProc, opts.ToProc
	var err error
	if oldP == nil {
		if oldP, err = proc.Open(opts.From); err != nil {
			return res, bad(fmt.Errorf("old process: %w", err))
		}
		defer oldP.Close()
	}
	if newP == nil {
		if newP, err = proc.Open(opts.To); err != nil {
			return res, bad(fmt.Errorf("new process: %w", err))
		}
		defer newP.Close()
	}

	// Both sides at once: each walks /proc and asks sock_diag in its netns (a few ms each).
	var newSide *steer.Side
	var newErr error
	var discovering sync.WaitGroup
	discovering.Go(func() { newSide, newErr = steer.Discover(newP, oldP.PID) })
	oldSide, err := steer.Discover(oldP, newP.PID)
	discovering.Wait()
	if newSide != nil {
		defer newSide.Close()
	}
	if oldSide != nil {
		defer oldSide.Close()
	}
	if err != nil {
		return res, bad(fmt.Errorf("old process: %w", err))
	}
	if newErr != nil {
		return res, bad(fmt.Errorf("new process: %w", newErr))
	}
	pairs, err := steer.PairListeners(oldSide, newSide, opts.Ports)
	if err != nil {
		return res, bad(err)
	}
	if opts.Claim != nil {
		if err := opts.Claim(pairs); err != nil {
			return res, bad(err)
		}
	}
	var ports []uint16
	for _, p := range pairs {
		res.Listeners = append(res.Listeners, p.Addr.String())
		if !slices.Contains(ports, p.Addr.Port()) {
			ports = append(ports, p.Addr.Port())
		}
	}

	h := &run{opts: opts, res: res, oldP: oldP, newP: newP, ports: ports}
	defer h.close()
	if err := h.open(); err != nil {
		return res, err
	}
	st, err := steer.Begin(h.objs, pairs, steer.Options{Logger: opts.Logger})
	if err != nil {
		if errors.Is(err, loader.ErrNotPermitted) || errors.Is(err, proc.ErrNotPermitted) || errors.Is(err, steer.ErrAlreadyActive) {
			return res, bad(err)
		}
		return res, fmt.Errorf("begin steering: %w", err)
	}
	h.st = st
	opts.Progress(Progress{Stage: StageSteering, Message: fmt.Sprintf("selector attached to %d group(s), target: old", len(pairs))})
	h.state = State{
		Stage: StageSteering, From: opts.From, To: opts.To, Ports: ports, Listeners: res.Listeners,
		Groups: st.State(), Signal: int(opts.Signal), Timeout: opts.Timeout, OnTimeout: opts.OnTimeout, SignalAt: opts.SignalAt,
		KillAfter: opts.KillAfter, ExitWait: opts.ExitWait,
	}
	if h.state.FromIno, err = oldP.Ino(); err == nil {
		h.state.ToIno, err = newP.Ino()
	}
	if err != nil {
		return h.rollback(CauseError, fmt.Sprintf("identify processes: %v", err))
	}
	if err := h.persist(); err != nil {
		return h.rollback(CauseError, fmt.Sprintf("persist handoff: %v", err))
	}
	return h.run(ctx)
}

type run struct {
	ctx         context.Context // the handoff's: its cause says whether to roll back or leave
	opts        Options
	res         *Result
	st          *steer.Steering
	objs        *loader.Objects
	tracker     *drain.Tracker
	ownTracker  bool
	oldP, newP  *proc.Process
	ports       []uint16
	counter     *drain.Counter // the old side's tree
	newCounter  *drain.Counter // the new side's
	state       State
	persistErrs int
	signalledAt time.Time // SignalAt flip: when the old process got its signal (the start of its ExitWait)
}

// openMaps opens the pinned maps.
func (h *run) openMaps() (err error) {
	if h.objs = h.opts.Objects; h.objs != nil {
		return nil
	}
	if h.objs, err = loader.Open(loader.Options{PinDir: h.opts.PinDir, Logger: h.opts.Logger}); err != nil {
		return bad(err)
	}
	return nil
}

// open loads what the handoff needs: the pinned maps, the tracker, and the counters of both sides.
func (h *run) open() (err error) {
	if err := h.openMaps(); err != nil {
		return err
	}
	h.tracker = h.opts.Tracker
	if h.tracker == nil {
		if h.tracker, err = drain.NewTracker(drain.TrackerOptions{Logger: h.opts.Logger}); err != nil {
			if errors.Is(err, loader.ErrNotPermitted) {
				return bad(err)
			}
			return err
		}
		h.ownTracker = true
	}
	if h.counter, err = h.tracker.Watch(h.oldP, h.ports, drain.WatchOptions{Exclude: []*proc.Process{h.newP}, Track: true}); err != nil {
		return err
	}
	if h.newCounter, err = h.tracker.Watch(h.newP, h.ports, drain.WatchOptions{}); err != nil {
		return err
	}
	if h.opts.Counting != nil {
		h.opts.Counting(h.counter, h.newCounter)
	}
	return nil
}

// close releases what open loaded (not the steering: its end is the handoff's business).
func (h *run) close() {
	if h.opts.Counting != nil && h.newCounter != nil {
		h.opts.Counting(nil, nil)
	}
	for _, c := range []*drain.Counter{h.newCounter, h.counter} {
		if c != nil {
			c.Close()
		}
	}
	if h.ownTracker {
		h.tracker.Close()
	}
	if h.objs != nil && h.opts.Objects == nil { // shared maps (a daemon's) stay pinned for their owner
		if _, err := h.objs.RemoveUnusedPins(); err != nil {
			h.opts.Logger.Warn("remove unused pins", "err", err)
		}
		h.objs.Close()
	}
}

// persist hands the state to Options.Persist.
func (h *run) persist() error {
	if h.opts.Persist == nil {
		return nil
	}
	return h.opts.Persist(h.state)
}

func (h *run) rollback(cause Cause, reason string) (*Result, error) {
	if h.leaving() {
		return h.leave()
	}
	h.res.Outcome = OutcomeRolledBack
	h.res.RollbackReason, h.res.RollbackCause = reason, cause
	h.readCounters()
	defer func() { h.res.RolledBackAt = monoNow() }()
	if err := h.st.Undo(); err != nil {
		h.opts.Logger.Error("undo steering", "err", err)
		return h.res, fmt.Errorf("%w: %s; undo: %w", ErrRolledBack, reason, err)
	}
	h.opts.Progress(Progress{Stage: StageRolledBack, Message: reason})
	return h.res, fmt.Errorf("%w: %s", ErrRolledBack, reason)
}

// leaving reports whether the handoff's context was cancelled with ErrLeft.
func (h *run) leaving() bool {
	return h.ctx != nil && errors.Is(context.Cause(h.ctx), ErrLeft)
}

// leave gives the handoff up without touching steering or processes: the next draind process resumes it.
func (h *run) leave() (*Result, error) {
	if h.st != nil {
		h.st.Abandon()
	}
	h.readCounters()
	return h.res, ErrLeft
}

// interrupted is the rollback reason for a cancelled ctx: its cause if one was given (an abort says who asked).
func interrupted(ctx context.Context) string {
	if c := context.Cause(ctx); c != nil && !errors.Is(c, context.Canceled) {
		return c.Error()
	}
	return "interrupted"
}

// watchNew watches the new process: newDied is closed if it exits before stop is called. stop does not wait (it is
// on the way to the signal); wait waits for the watcher, which uses the new process's pidfd (closed after the
// handoff returns). Both may be called more than once.
func (h *run) watchNew(ctx context.Context) (newDied <-chan struct{}, stop, wait func()) {
	died := make(chan struct{})
	watchCtx, cancel := context.WithCancel(ctx)
	var watching sync.WaitGroup
	watching.Go(func() {
		if h.newP.WaitExit(watchCtx) && watchCtx.Err() == nil {
			close(died)
		}
	})
	return died, cancel, func() {
		cancel()
		watching.Wait()
	}
}

func (h *run) run(ctx context.Context) (*Result, error) {
	h.ctx = ctx
	// Watch the new process: if it dies before the old one is signalled, roll back.
	newDied, stopWatch, waitWatch := h.watchNew(ctx)
	defer waitWatch()

	if err := h.waitReady(ctx, newDied); err != nil {
		if ctx.Err() != nil {
			return h.rollback(CauseAborted, interrupted(ctx))
		}
		return h.rollback(CauseNotReady, err.Error())
	}
	h.opts.Progress(Progress{Stage: StageReady})

	if ctx.Err() != nil { // aborted while the readiness check passed: not flipped yet
		return h.rollback(CauseAborted, interrupted(ctx))
	}
	if err := h.st.Flip(); err != nil {
		return h.rollback(CauseError, fmt.Sprintf("flip: %v", err))
	}
	h.state.FlippedAt = time.Now()
	h.state.FlippedAtMono = monoNow()
	first, err := h.counter.Count()
	if err != nil {
		return h.rollback(CauseError, fmt.Sprintf("count connections: %v", err))
	}
	h.state.InFlightAtFlip = first.Total()
	h.state.Stage = StageFlipped
	if err := h.persist(); err != nil {
		return h.rollback(CauseError, fmt.Sprintf("persist handoff: %v", err))
	}
	h.opts.Progress(Progress{Stage: StageFlipped, Count: first, New: h.newCount(), Message: fmt.Sprintf("new connections go to %d", h.opts.To)})
	h.moveQueues(ctx)
	return h.drain(ctx, newDied, stopWatch, true)
}

// moveQueues moves what waits in the old listeners' accept queues to the new side (Queue move; with SignalAt flip
// the old server's own close moves it). What a failure leaves is accepted by the old process as before:
// it is logged, and the handoff goes on.
func (h *run) moveQueues(ctx context.Context) {
	h.res.Queue = h.opts.Queue
	if h.opts.Queue != drain.QueueMove || h.state.SignalAt == drain.SignalFlip {
		return
	}
	mr, err := h.st.MoveQueues(ctx, h.oldP, []int{h.newP.PID}, steer.MoveOptions{Stopping: h.persistStopped})
	h.res.QueueMoved, h.res.QueuePaused, h.res.QueueEmptied = mr.Queued, mr.Paused, mr.Emptied
	if err != nil {
		h.opts.Logger.Warn("move accept queues", "err", err, "paused", mr.Paused)
	}
	if mr.Listeners > 0 {
		h.opts.Progress(Progress{Stage: StageMoved, Message: fmt.Sprintf("%d queued connection(s) of %d listener(s) to %d (old side paused %s)",
			mr.Queued, mr.Listeners, h.opts.To, mr.Paused.Round(time.Microsecond))})
	}
}

// persistStopped records the processes MoveQueues is about to stop and the listeners it moves (nil: all continued
// again). A record that could not be written is not kept.
func (h *run) persistStopped(pids []int, moving []steer.Moving) error {
	oldPIDs, oldMoving := h.state.Stopped, h.state.Moving
	h.state.Stopped, h.state.Moving = pids, moving
	if err := h.persist(); err != nil {
		h.state.Stopped, h.state.Moving = oldPIDs, oldMoving
		return err
	}
	return nil
}

// drain waits for the old side to drain (the flip is done), signals it and finishes the steering. tagged says the
// old side's sockets were just counted (and tagged) at the flip. With SignalAt flip, the signal comes first.
func (h *run) drain(ctx context.Context, newDied <-chan struct{}, stopWatch func(), tagged bool) (*Result, error) {
	h.res.FlippedAt = h.state.FlippedAtMono
	h.res.InFlightAtFlip = h.state.InFlightAtFlip
	flipAt := h.state.FlippedAt
	early := h.state.SignalAt == drain.SignalFlip
	h.res.SignalAt = drain.SignalDrained
	if early {
		h.res.SignalAt = drain.SignalFlip
		if res, err := h.signalAtFlip(ctx, newDied, stopWatch); res != nil || err != nil {
			return res, err
		}
	}
	// Drain, unless the new side dies or we are interrupted.
	dctx, cancel := context.WithDeadline(ctx, flipAt.Add(h.state.Timeout))
	defer cancel()
	drainCtx, stopDrain := context.WithCancelCause(dctx)
	defer stopDrain(nil)
	errNewDied := errors.New("new process exited")
	go func() {
		if early {
			return // signalled: the new process's exit changes nothing
		}
		select {
		case <-newDied:
			if h.st.Superseded() {
				return // a later handoff took over from the new process: its exit is that handoff's business
			}
			stopDrain(errNewDied)
		case <-drainCtx.Done():
		}
	}()
	left, err := drain.Wait(drainCtx, h.counter, drain.WaitOptions{
		Poll:     h.opts.Poll,
		Tagged:   tagged,
		Progress: func(c drain.Count) { h.opts.Progress(Progress{Stage: StageDraining, Count: c, New: h.newCount()}) },
	})
	h.res.DrainTime = time.Since(flipAt)
	h.res.DrainedAt = monoNow()
	cs := h.counter.Stats()
	h.res.Snapshots, h.res.SnapshotMax = cs.Full, cs.FullMax
	h.res.FastSnapshots, h.res.FastSnapshotMax = cs.Fast, cs.FastMax
	h.res.Left = left.Total()
	if early {
		return h.drainedAfterSignal(ctx, err)
	}
	timedOut := false
	switch {
	case err == nil:
	case errors.Is(context.Cause(drainCtx), errNewDied):
		return h.rollback(CauseNewExited, fmt.Sprintf("new process %d exited during the drain", h.opts.To))
	case ctx.Err() != nil:
		return h.rollback(CauseAborted, interrupted(ctx))
	case errors.Is(err, drain.ErrDeadline):
		timedOut = true
		if h.state.OnTimeout == drain.TimeoutAbort {
			return h.rollback(CauseDeadline, fmt.Sprintf("drain deadline %s passed with %d connection(s) left (--on-timeout abort)", h.state.Timeout, left.Total()))
		}
	default:
		return h.rollback(CauseError, fmt.Sprintf("count connections: %v", err))
	}
	// Last chance to keep the old side: the new one must still be alive.
	if res, err := h.lastChance(ctx, newDied, stopWatch); res != nil || err != nil {
		return res, err
	}

	sig := syscall.Signal(h.state.Signal)
	if timedOut && h.state.OnTimeout == drain.TimeoutKill {
		sig = syscall.SIGKILL
	}
	h.res.Outcome = OutcomeDrained
	if timedOut {
		h.res.Outcome = OutcomeTimedOut
	}
	h.res.Signal = drain.SignalName(sig)
	h.res.SignalledAt = monoNow()
	sigCtx, stopSig := h.exitWatchContext(ctx)
	defer stopSig()
	out, err := drain.Signal(sigCtx, h.oldP, sig, drain.SignalOptions{KillAfter: h.state.KillAfter, ExitWait: h.state.ExitWait, Sent: func() { h.sent(sig) }})
	return h.exitWatched(out, err)
}

// lastChance rolls back if the new process died or the handoff was interrupted before the old one is signalled;
// otherwise it stops watching the new process (once the old one is signalled, there is no going back) and returns
// nil, nil.
func (h *run) lastChance(ctx context.Context, newDied <-chan struct{}, stopWatch func()) (*Result, error) {
	select {
	case <-newDied:
		if !h.st.Superseded() {
			return h.rollback(CauseNewExited, fmt.Sprintf("new process %d exited before the old one was signalled", h.opts.To))
		}
	default:
	}
	stopWatch()
	if ctx.Err() != nil { // aborted (or draind stopping) as the drain ended: not signalled yet
		return h.rollback(CauseAborted, interrupted(ctx))
	}
	return nil, nil
}

// sent records that the old process got signal sig (the one configured, or SIGKILL by OnTimeout). Persisted once
// sent: a draind killed between the two resumes at "flipped", finds the drain over and signals again, which the old
// process can take (the same signal) rather than never getting one.
func (h *run) sent(sig syscall.Signal) {
	h.state.Stage, h.state.SignalledAt, h.state.Signal = StageSignalled, time.Now(), int(sig)
	if err := h.persist(); err != nil {
		h.opts.Logger.Error("persist handoff", "err", err)
	}
	name := "SIG" + drain.SignalName(sig) // a SIGKILL at the deadline after a signal at the flip is not h.res.Signal
	h.opts.Progress(Progress{Stage: StageSignalled, Signal: name, Message: name})
}

// exitWatchContext is the context of the watch for the old process's exit: once signalled, an interruption does
// not stop it, except a daemon leaving the handoff (the next one watches instead).
func (h *run) exitWatchContext(ctx context.Context) (context.Context, context.CancelFunc) {
	sigCtx, stopSig := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		if h.leaving() {
			stopSig()
		}
	})
	return sigCtx, func() {
		stop()
		stopSig()
	}
}

// exitWatched records how the signal and the exit watch went and finishes the handoff.
func (h *run) exitWatched(out drain.Outcome, err error) (*Result, error) {
	h.res.Signalled = h.res.Signalled || out.Sent
	h.res.Killed, h.res.ExitSeen, h.res.ExitWait = out.Killed, out.Exited, out.ExitWait
	if h.leaving() {
		return h.leave()
	}
	if err != nil {
		h.res.Outcome = OutcomeFailed
		return h.res, fmt.Errorf("signal old process: %w", err)
	}
	return h.finish(out.Exited)
}

// signalAtFlip sends the old process its signal right after the flip (SignalAt flip), unless a resumed handoff did
// already. A server that closes its listener on it has what it had queued migrated to the new side by the selector.
// It returns nil, nil unless the handoff ended (rolled back) instead.
func (h *run) signalAtFlip(ctx context.Context, newDied <-chan struct{}, stopWatch func()) (*Result, error) {
	sig := syscall.Signal(h.state.Signal)
	if h.state.Stage == StageSignalled { // resumed: sent by the draind before this one
		stopWatch()
		h.res.Signal, h.res.Signalled, h.signalledAt = drain.SignalName(sig), true, h.state.SignalledAt
		if h.signalledAt.IsZero() { // a record from before the field
			h.signalledAt = time.Now()
		}
		return nil, nil
	}
	if res, err := h.lastChance(ctx, newDied, stopWatch); res != nil || err != nil {
		return res, err
	}
	h.res.Signal, h.res.SignalledAt, h.signalledAt = drain.SignalName(sig), monoNow(), time.Now()
	err := h.oldP.Signal(sig)
	switch {
	case err == nil:
		h.res.Signalled = true
		h.sent(sig)
	case errors.Is(err, proc.ErrNoProcess): // it exited by itself: the drain finds nothing left
	default:
		return h.rollback(CauseError, fmt.Sprintf("signal old process at the flip: %v", err))
	}
	return nil, nil
}

// drainedAfterSignal ends a handoff whose old process was signalled at the flip, once its drain ended (err is
// drain.Wait's): SIGKILL at the deadline if OnTimeout says so, else watch for the exit (escalating to SIGKILL
// KillAfter from now).
func (h *run) drainedAfterSignal(ctx context.Context, err error) (*Result, error) {
	h.res.Outcome = OutcomeDrained
	switch {
	case err == nil:
	case h.leaving():
		return h.leave()
	case ctx.Err() != nil:
		// Interrupted: the old process has its signal and goes on draining by itself; stop watching it.
		h.res.Outcome = OutcomeTimedOut
		res, ferr := h.finish(false)
		err := fmt.Errorf("wait for the drain: %w (%d connection(s) left)", ErrUnwatched, h.res.Left)
		if why := interrupted(ctx); why != "interrupted" {
			err = fmt.Errorf("%w: %s", err, why)
		}
		return res, errors.Join(err, ferr)
	case errors.Is(err, drain.ErrDeadline):
		h.res.Outcome = OutcomeTimedOut
	default:
		h.res.Outcome = OutcomeFailed
		res, ferr := h.finish(false)
		return res, errors.Join(fmt.Errorf("count connections after the signal at the flip: %w", err), ferr)
	}
	if !h.res.Signalled { // it had exited before its signal
		h.res.ExitSeen = true
		return h.finish(true)
	}
	sigCtx, stopSig := h.exitWatchContext(ctx)
	defer stopSig()
	if h.res.Outcome == OutcomeTimedOut && h.state.OnTimeout == drain.TimeoutKill {
		out, err := drain.Signal(sigCtx, h.oldP, syscall.SIGKILL, drain.SignalOptions{ExitWait: h.state.ExitWait, Sent: func() { h.sent(syscall.SIGKILL) }})
		out.Killed = out.Sent
		if out.Exited {
			out.ExitWait = time.Since(h.signalledAt)
		}
		return h.exitWatched(out, err)
	}
	// KillAfter counts from the drain's end, which a resumed handoff may have passed already.
	if h.state.DrainedAt.IsZero() {
		h.state.DrainedAt = time.Now()
		if err := h.persist(); err != nil {
			h.opts.Logger.Error("persist handoff", "err", err)
		}
	}
	killAfter, _ := remaining(h.state.KillAfter, h.state.DrainedAt)
	out, err := drain.WatchExit(sigCtx, h.oldP, syscall.Signal(h.state.Signal), h.signalledAt,
		drain.SignalOptions{KillAfter: killAfter, ExitWait: h.state.ExitWait})
	return h.exitWatched(out, err)
}

// finish ends a handoff whose old process was signalled: it reports the exit and frees the steering.
func (h *run) finish(exited bool) (*Result, error) {
	if exited {
		h.opts.Progress(Progress{Stage: StageExited})
	}
	h.readCounters()
	if err := h.st.Finish(); err != nil {
		if !errors.Is(err, steer.ErrOldAlive) {
			return h.res, fmt.Errorf("finish steering: %w", err)
		}
		h.res.SteeringLeft = true
		h.opts.Logger.Warn("steering left in place", "err", err)
	}
	return h.res, nil
}

// newCount is the new side's count, for progress reports (a failed count reports zero: it is only informative).
func (h *run) newCount() drain.Count {
	n, err := h.newCounter.Count()
	if err != nil {
		h.opts.Logger.Warn("count new side", "err", err)
	}
	return n
}

// readCounters sums the selector's counters of this handoff's groups.
func (h *run) readCounters() {
	for _, id := range h.st.GroupIDs() {
		var per []loader.Counters
		if err := h.objs.Stats.Lookup(id, &per); err != nil {
			continue
		}
		for _, c := range per {
			h.res.Steered += c.Selected
			h.res.Fallbacks += c.Fallback
			h.res.Migrated += c.Migrated
			h.res.Failed += c.Failed
			h.res.Probed += c.Probed
		}
	}
}

// monoNow is CLOCK_MONOTONIC in ns: comparable with timestamps taken by other processes on the host.
func monoNow() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}
