// Package daemon is `draind serve`: it runs handoffs for local callers through the API (package api), authorizes
// them by their credentials, persists each handoff's state so that a restarted daemon finishes what a killed one
// began, and leaves steering as it is when it stops.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/api"
	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/metrics"
)

// DefaultStateDir holds the daemon's state file unless Options.StateDir says otherwise.
const DefaultStateDir = "/var/lib/draind"

// DefaultMetricsAddr is where the daemon serves /metrics unless Options.MetricsAddr says otherwise: loopback only.
const DefaultMetricsAddr = "127.0.0.1:9464"

// Options configures New. The zero value serves api.DefaultSocket (mode 0660, group root), keeps its state under
// DefaultStateDir, pins under loader.DefaultPinDir and logs to slog.Default().
type Options struct {
	Socket    string
	SocketGID int // group owning the socket; callers in it may connect (authorization still applies)
	// MetricsAddr is where /metrics is served (HTTP); default DefaultMetricsAddr, "off" for none.
	MetricsAddr string
	StateDir    string
	PinDir      string
	Logger      *slog.Logger
	// Ready, if set, is called once the daemon resumed the handoffs it found and serves the socket (systemd's
	// READY=1).
	Ready func()
}

// Daemon serves the API and runs its handoffs.
type Daemon struct {
	opts    Options
	log     *slog.Logger
	tracker *drain.Tracker
	objs    *loader.Objects // the pinned maps, for the selector's counters
	prep    *loader.Prepare // prepared mode's pinned programs and maps, opened by the first prepare
	prepMu  sync.Mutex      // one prepare or unprepare at a time; guards prep
	state   *stateFile
	metrics *metrics.Metrics

	ctx    context.Context // parent of the handoffs' contexts
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup // handoff goroutines

	mu       sync.Mutex
	handoffs map[string]*entry
	claims   map[uint64]claim // listener cookie -> the handoff using it
	closed   bool
	once     sync.Once
}

// claim is a listener's use by a handoff.
type claim struct {
	id  string
	old bool // the handoff's old side (else its new side)
}

// New prepares a daemon: it loads the counter and reads the state a previous daemon process left.
func New(opts Options) (*Daemon, error) {
	if opts.Socket == "" {
		opts.Socket = api.DefaultSocket
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	if opts.PinDir == "" {
		opts.PinDir = loader.DefaultPinDir
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MetricsAddr == "" {
		opts.MetricsAddr = DefaultMetricsAddr
	}
	st, err := openState(opts.StateDir)
	if err != nil {
		return nil, err
	}
	// Fail at start, not at the first handoff, when BPF is out of reach (this also mounts bpffs if needed). The
	// maps stay pinned while the daemon runs, so that other draind processes (prepare, a standalone handoff) share
	// them; Close removes the pins if no steering uses them.
	objs, err := loader.Open(loader.Options{PinDir: opts.PinDir, Logger: opts.Logger})
	if err != nil {
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	tr, err := drain.NewTracker(drain.TrackerOptions{Logger: opts.Logger})
	if err != nil {
		objs.Close()
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	d := &Daemon{opts: opts, log: opts.Logger, tracker: tr, objs: objs, state: st, handoffs: map[string]*entry{}, claims: map[uint64]claim{}}
	d.metrics = metrics.New(metrics.Options{Source: d})
	d.ctx, d.cancel = context.WithCancelCause(context.Background())
	return d, nil
}

// Serve resumes the handoffs a previous daemon process left, then serves the API until ctx is done. Then it stops
// accepting calls, leaves every handoff in progress as it is (steering stays; the state file says where each one
// is), and returns.
func (d *Daemon) Serve(ctx context.Context) error {
	l, err := d.listen()
	if err != nil {
		return err
	}
	defer os.Remove(d.opts.Socket)
	for _, rec := range d.state.records() {
		d.resume(rec)
	}
	if d.opts.MetricsAddr != "off" {
		ml, err := net.Listen("tcp", d.opts.MetricsAddr)
		if err != nil {
			l.Close()
			d.stop()
			return fmt.Errorf("serve metrics: %w", err)
		}
		msrv := &http.Server{Handler: d.metrics.Handler(d.log), ReadHeaderTimeout: 5 * time.Second}
		go msrv.Serve(ml)
		defer msrv.Close()
		d.log.Info("serving metrics", "addr", ml.Addr().String())
	}
	srv := &http.Server{
		Handler:           d.routes(),
		ConnContext:       api.WithPeer,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       30 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(api.NewPeerListener(l)) }()
	d.log.Info("serving", "socket", d.opts.Socket, "state_dir", d.opts.StateDir, "pin_dir", d.opts.PinDir)
	if d.opts.Ready != nil {
		d.opts.Ready()
	}
	select {
	case <-ctx.Done():
	case err := <-served:
		d.stop()
		return fmt.Errorf("serve api: %w", err)
	}
	srv.Close() // no more calls; streams end (their handoffs go on until stop)
	d.stop()
	return nil
}

// stop leaves the handoffs in progress to the next daemon process.
func (d *Daemon) stop() {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.cancel(handoff.ErrLeft)
	d.wg.Wait()
	d.log.Info("stopped; handoffs in progress left to the next draind", "handoffs", len(d.state.records()))
}

// Close releases the counter. Call it after Serve returned. Safe to call twice.
func (d *Daemon) Close() error {
	var err error
	d.once.Do(func() {
		d.cancel(handoff.ErrLeft)
		d.wg.Wait()
		err = d.tracker.Close()
		if _, rerr := d.objs.RemoveUnusedPins(); rerr != nil {
			d.log.Warn("remove unused pins", "err", rerr)
		}
		d.objs.Close()
		d.prepMu.Lock()
		if d.prep != nil {
			d.prep.Close()
		}
		d.prepMu.Unlock()
	})
	return err
}

// prepareObjects opens prepared mode's pinned objects (under the daemon's pin dir) the first time they are needed.
func (d *Daemon) prepareObjects() (*loader.Prepare, error) {
	d.prepMu.Lock()
	defer d.prepMu.Unlock()
	if d.prep == nil {
		p, err := loader.OpenPrepare(loader.Options{PinDir: d.opts.PinDir})
		if err != nil {
			return nil, err
		}
		d.prep = p
	}
	return d.prep, nil
}

// listen creates the socket, refusing to replace one a live daemon serves.
func (d *Daemon) listen() (*net.UnixListener, error) {
	path := d.opts.Socket
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: another draind serves it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	// Created with mode 0600 by the umask below, then opened up to the group: no window in which others connect.
	old := unix.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chown(path, 0, d.opts.SocketGID); err != nil {
		l.Close()
		return nil, fmt.Errorf("set socket group: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("set socket mode: %w", err)
	}
	return l, nil
}

// entry is one handoff the daemon runs.
type entry struct {
	id      string
	name    string // operator-given, for the metrics
	uid     uint32
	started time.Time
	resumed bool
	cancel  context.CancelCauseFunc
	done    chan struct{}
	events  chan api.Event    // to the caller's stream, if any (progress may be dropped if it does not keep up)
	signal  func(name string) // called when the old process is signalled (the metrics count it then)
	result  chan api.Event    // the last event, once

	mu        sync.Mutex
	from, to  int
	listeners []string
	stage     handoff.Stage
	st        *handoff.State // last persisted
	old, new  api.Count
	recorded  bool            // counted in draind_handoffs_started_total
	outcome   handoff.Outcome // set when the handoff ended

	countMu    sync.Mutex     // held while the metrics Peek the counters
	oldC, newC *drain.Counter // the sides' counters while the handoff runs
	newPID     int            // the new process, in the daemon's PID namespace
}

func newID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return "h-" + hex.EncodeToString(b)
}

func (e *entry) status() api.Handoff {
	e.mu.Lock()
	defer e.mu.Unlock()
	h := api.Handoff{ID: e.id, Name: e.name, From: e.from, To: e.to, Listeners: e.listeners, Stage: e.stage, Old: e.old, New: e.new,
		Started: e.started, UID: e.uid, Resumed: e.resumed}
	if e.st != nil && !e.st.FlippedAt.IsZero() {
		h.Deadline = e.st.FlippedAt.Add(e.st.Timeout)
	}
	return h
}

// signalled reports whether the old process was (or is being) signalled: too late to roll back.
func (e *entry) signalled() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.st != nil && e.st.Stage == handoff.StageSignalled
}

// outcomeOf returns how the handoff ended (valid once done is closed).
func (e *entry) outcomeOf() handoff.Outcome {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.outcome
}

// persisted reports whether the handoff reached a state worth persisting (steering began).
func (e *entry) persisted() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.st != nil
}

// flipped reports whether the handoff's new side takes the new connections.
func (e *entry) flipped() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.st != nil && e.st.Stage != handoff.StageSteering
}

// progress records a progress report and passes it on to the caller's stream.
func (e *entry) progress(p handoff.Progress) {
	ev := api.Event{Type: api.EventProgress, ID: e.id, Stage: p.Stage, Message: p.Message}
	if p.Signal != "" && e.signal != nil {
		e.signal(p.Signal)
	}
	e.mu.Lock()
	e.stage = p.Stage
	if p.Stage == handoff.StageFlipped || p.Stage == handoff.StageDraining {
		e.old, e.new = api.CountOf(p.Count), api.CountOf(p.New)
		old, nw := e.old, e.new
		ev.Old, ev.New = &old, &nw
	}
	e.mu.Unlock()
	if e.events == nil {
		return
	}
	select {
	case e.events <- ev:
	default: // a slow caller misses a progress line, never the result
	}
}

// start registers a handoff and runs fn for it in its own goroutine, under the daemon's context.
func (d *Daemon) start(e *entry, fn func(ctx context.Context) (*handoff.Result, error)) error {
	ctx, cancel := context.WithCancelCause(d.ctx)
	e.cancel, e.done = cancel, make(chan struct{})
	e.signal = d.metrics.SignalSent
	e.result = make(chan api.Event, 1)
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		cancel(nil)
		return errors.New("start handoff: draind is stopping")
	}
	d.handoffs[e.id] = e
	d.wg.Add(1)
	d.mu.Unlock()
	go func() {
		defer d.wg.Done()
		defer close(e.done)
		defer close(e.result)
		defer cancel(nil)
		res, err := fn(ctx)
		e.mu.Lock()
		e.outcome = outcomeOf(res)
		e.mu.Unlock()
		if errors.Is(err, handoff.ErrLeft) {
			d.forget(e, false) // the state file keeps it for the next daemon process
			d.log.Info("handoff left for the next draind", "id", e.id)
			return
		}
		// Metrics and the log line come before the handoff leaves the status list: a caller that sees it gone
		// also sees how it ended.
		d.record(e, res, err)
		d.log.Info("handoff ended", "id", e.id, "outcome", outcomeOf(res), "err", err)
		d.forget(e, true)
		ev := api.Event{Type: api.EventResult, ID: e.id, Result: res}
		if err != nil {
			ev.Err = classify(err)
		}
		e.result <- ev
	}()
	return nil
}

func outcomeOf(res *handoff.Result) handoff.Outcome {
	if res == nil {
		return handoff.OutcomeFailed
	}
	return res.Outcome
}

// forget drops a handoff and its listener claims; with drop, its record leaves the state file first, so a handoff
// gone from the status list is gone from the state file too.
func (d *Daemon) forget(e *entry, drop bool) {
	if drop {
		if err := d.state.remove(e.id); err != nil {
			d.log.Error("write state file", "err", err)
		}
	}
	d.mu.Lock()
	delete(d.handoffs, e.id)
	for c, cl := range d.claims {
		if cl.id == e.id {
			delete(d.claims, c)
		}
	}
	d.mu.Unlock()
}

// record counts a handoff's end in the metrics.
func (d *Daemon) record(e *entry, res *handoff.Result, err error) {
	result, rollback := metrics.ResultFailed, ""
	var drained time.Duration
	if res != nil {
		switch res.Outcome {
		case handoff.OutcomeDrained:
			result = metrics.ResultDrained
		case handoff.OutcomeTimedOut:
			result = metrics.ResultTimedOut
		case handoff.OutcomeRolledBack:
			result, rollback = metrics.ResultRolledBack, string(res.RollbackCause)
			if res.RollbackCause == handoff.CauseAborted {
				result = metrics.ResultAborted
			}
		}
		if res.Outcome == handoff.OutcomeDrained || res.Outcome == handoff.OutcomeTimedOut {
			drained = res.DrainTime
		}
	}
	if err != nil && result == metrics.ResultDrained {
		result = metrics.ResultFailed // signalled but the finish failed, or the signal could not be sent
	}
	d.metrics.Finished(result, time.Since(e.started), drained, rollback)
	if res != nil && res.QueuePaused > 0 {
		d.metrics.QueueMoved(res.QueueMoved, res.QueuePaused)
	}
	if res != nil && res.QueueEmptied > 0 {
		d.metrics.QueueKept(res.QueueEmptied)
	}
}

// counting is a handoff's Counting hook: the metrics read the sides' counters while they exist.
func (e *entry) counting(old, new *drain.Counter) {
	e.countMu.Lock()
	defer e.countMu.Unlock()
	e.oldC, e.newC = old, new
}

// persister is a handoff's Persist hook: the state goes to the state file before the handoff goes on.
func (d *Daemon) persister(e *entry) func(handoff.State) error {
	return func(st handoff.State) error {
		e.mu.Lock()
		e.st = &st
		e.from, e.to, e.listeners = st.From, st.To, st.Listeners
		started, uid, first := e.started, e.uid, !e.recorded
		e.recorded = true
		e.mu.Unlock()
		if first {
			d.metrics.Started()
		}
		return d.state.put(record{ID: e.id, Name: e.name, UID: uid, Started: started, State: st})
	}
}

// resume takes over a handoff a previous daemon process left.
func (d *Daemon) resume(rec record) {
	e := &entry{id: rec.ID, name: rec.Name, uid: rec.UID, started: rec.Started, resumed: true, from: rec.State.From,
		to: rec.State.To, listeners: rec.State.Listeners, stage: rec.State.Stage, recorded: true, newPID: rec.State.To}
	st := rec.State
	e.st = &st
	d.mu.Lock()
	for _, g := range rec.State.Groups {
		for _, s := range g.Old {
			d.claims[s.Cookie] = claim{id: e.id, old: true}
		}
		for _, s := range g.New {
			if _, taken := d.claims[s.Cookie]; !taken { // a later generation's old side keeps its claim
				d.claims[s.Cookie] = claim{id: e.id}
			}
		}
	}
	d.mu.Unlock()
	d.log.Info("resuming handoff", "id", e.id, "from", st.From, "to", st.To, "stage", st.Stage)
	err := d.start(e, func(ctx context.Context) (*handoff.Result, error) {
		return handoff.Resume(ctx, rec.State, handoff.Options{
			PinDir: d.opts.PinDir, Tracker: d.tracker, Objects: d.objs, Logger: d.log.With("handoff", e.id),
			Progress: e.progress, Persist: d.persister(e), Counting: e.counting,
		})
	})
	if err != nil {
		d.log.Error("resume handoff", "id", e.id, "err", err)
	}
}
