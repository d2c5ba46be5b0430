package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/testenv"
)

// Contender keys.
const (
	StopStart  = "stop-start"
	ReusePort  = "reuseport"
	Migrate    = "reuseport-migrate"
	Tableflip  = "tableflip"
	Draind     = "draind"
	DraindFlip = "draind-flip"
)

// draindSignalAt is when each draind contender's handoffs signal the old process (handoff.Options.SignalAt); a key
// is in it if and only if the contender upgrades with handoff.Run.
var draindSignalAt = map[string]drain.SignalAt{Draind: drain.SignalDrained, DraindFlip: drain.SignalFlip}

// isDraind reports whether contender key k upgrades with handoff.Run ((e) or (f)).
func isDraind(k string) bool {
	_, ok := draindSignalAt[k]
	return ok
}

// Contender is one way of upgrading a server.
type Contender struct {
	Key     string `json:"key"`
	Label   string `json:"label"`
	How     string `json:"how"`
	Command string `json:"command"` // what switch times are measured from
}

// Contenders are the ways compared, in the order the tables list them.
var Contenders = []Contender{
	{StopStart, "(a) stop, then start", "SIGTERM the old server, wait for its exit, start the new one",
		"the SIGTERM to the old process"},
	{ReusePort, "(b) SO_REUSEPORT + SIGTERM", "start the new server on the same port with SO_REUSEPORT, then SIGTERM the old one",
		"the start of the new process (the SIGTERM follows once it listens)"},
	{Migrate, "(c) (b) + tcp_migrate_req", "(b) with net.ipv4.tcp_migrate_req=1 in the namespace",
		"the start of the new process (as (b))"},
	{Tableflip, "(d) tableflip", "a server built with cloudflare/tableflip: SIGHUP starts its successor, which inherits the listening socket",
		"the SIGHUP to the running process"},
	{Draind, "(e) draind", "start the new, unmodified server with SO_REUSEPORT, then handoff.Run with its defaults (steer; move what waits in the old listener's accept queue to the new server, the old one paused meanwhile, unless the old one accepts it itself within 10 ms; drain; SIGTERM the old)",
		"the handoff.Run call (the new process was started just before it)"},
	{DraindFlip, "(f) draind, signal at flip", "as (e), with handoff.Options.SignalAt flip (`draind handoff --signal-at flip`): the old server is signalled right after the flip, closes its listener, and what it had queued migrates to the new one",
		"the handoff.Run call (the new process was started just before it)"},
}

// ContenderKeys returns the keys of Contenders, in order.
func ContenderKeys() []string {
	keys := make([]string, len(Contenders))
	for i, c := range Contenders {
		keys[i] = c.Key
	}
	return keys
}

// ContenderByKey returns the contender with key k.
func ContenderByKey(k string) (Contender, bool) {
	for _, c := range Contenders {
		if c.Key == k {
			return c, true
		}
	}
	return Contender{}, false
}

// serverSpec describes the server every generation of a run is.
type serverSpec struct {
	Addr             string
	Hold             bool          // a raw TCP holder (long-lived connections) instead of the HTTP server
	Backlog          int           // 0: somaxconn
	FirstAcceptDelay time.Duration // the first generation accepts slowly (HTTP only)
}

// gen is one generation (process) of the server.
type gen struct {
	N     int
	ID    string // the ID in its HTTP answers
	PID   int
	srv   *testenv.Server
	hold  *testenv.Holder
	watch *exitWatch
}

// fleet runs the generations of one contender's server in one network namespace.
type fleet struct {
	c       Contender
	ns      *testenv.NetNS
	spec    serverSpec
	log     *slog.Logger
	pinDir  string
	tracker *drain.Tracker  // (e), (f): shared by the handoffs of the run, as the daemon would
	objs    *loader.Objects // (e), (f): the pinned maps and loaded selectors, shared likewise
	tf      *tableflipServer
	gens    []*gen
}

func newFleet(c Contender, ns *testenv.NetNS, spec serverSpec, env *runEnv) (*fleet, error) {
	f := &fleet{c: c, ns: ns, spec: spec, log: env.quiet, pinDir: env.pinDir}
	if isDraind(c.Key) {
		tr, err := drain.NewTracker(drain.TrackerOptions{Logger: env.quiet})
		if err != nil {
			return nil, fmt.Errorf("create tracker: %w", err)
		}
		f.tracker = tr
		objs, err := loader.Open(loader.Options{PinDir: env.pinDir, Logger: env.quiet})
		if err != nil {
			tr.Close()
			return nil, fmt.Errorf("open pinned maps: %w", err)
		}
		f.objs = objs
	}
	return f, nil
}

// close kills every generation still running.
func (f *fleet) close() {
	for _, g := range f.gens {
		switch {
		case g.srv != nil:
			_ = g.srv.Kill()
		case g.hold != nil:
			_ = g.hold.Kill()
		default:
			_ = g.watch.signal(syscall.SIGKILL)
		}
	}
	if f.tf != nil {
		f.tf.close()
	}
	for _, g := range f.gens {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		g.watch.wait(ctx)
		cancel()
		g.watch.close()
	}
	if f.objs != nil {
		f.objs.Close()
	}
	if f.tracker != nil {
		f.tracker.Close()
	}
}

// first starts generation 0.
func (f *fleet) first(ctx context.Context) (*gen, error) {
	if f.c.Key == Tableflip {
		tf, ev, err := startTableflip(ctx, f.ns, tableflipOptions{
			Addr: f.spec.Addr, Hold: f.spec.Hold, Backlog: f.spec.Backlog, AcceptDelay: f.spec.FirstAcceptDelay,
		})
		if err != nil {
			return nil, err
		}
		f.tf = tf
		return f.adopt(ev, false)
	}
	return f.start(ctx)
}

// adopt records a tableflip generation that announced itself.
func (f *fleet) adopt(ev event, reap bool) (*gen, error) {
	w, err := watchExit(ev.PID, reap)
	if err != nil {
		return nil, err
	}
	g := &gen{N: len(f.gens), ID: ev.ID, PID: ev.PID, watch: w}
	f.gens = append(f.gens, g)
	return g, nil
}

// start starts the next generation of a testenv server (or holder).
func (f *fleet) start(ctx context.Context) (*gen, error) {
	n := len(f.gens)
	g := &gen{N: n, ID: "g" + strconv.Itoa(n)}
	reuse := f.c.Key != StopStart
	if f.spec.Hold {
		h, err := testenv.StartHolder(ctx, f.ns, testenv.HolderOptions{Addr: f.spec.Addr, ReusePort: reuse, Backlog: f.spec.Backlog})
		if err != nil {
			return nil, err
		}
		g.hold, g.PID = h, h.PID
	} else {
		opts := testenv.ServerOptions{Addr: f.spec.Addr, ID: g.ID, ReusePort: reuse, Backlog: f.spec.Backlog}
		if n == 0 {
			opts.AcceptDelay = f.spec.FirstAcceptDelay
		}
		s, err := testenv.StartServer(ctx, f.ns, opts)
		if err != nil {
			return nil, err
		}
		g.srv, g.PID = s, s.PID
	}
	w, err := watchExit(g.PID, false)
	if err != nil {
		if g.srv != nil {
			_ = g.srv.Kill()
		} else {
			_ = g.hold.Kill()
		}
		return nil, err
	}
	g.watch = w
	f.gens = append(f.gens, g)
	return g, nil
}

// upgrade is one upgrade from Old to New. Times are CLOCK_MONOTONIC; 0: did not happen.
type upgrade struct {
	Old, New     *gen
	StartMono    int64 // the upgrade began (for (b), (c), (e), (f): the new process is started)
	CommandMono  int64 // the switch command (see Contender.Command)
	NewReadyMono int64 // the new process listens
	SteerMono    int64 // (e), (f): the selector is attached (target: old), reported through handoff's Progress
	FlipMono     int64 // (e), (f): the selector's target flipped to the new side
	OldExitMono  int64 // the old process's exit was seen
	Handoff      *handoff.Result

	done chan struct{} // (e), (f): handoff.Run returned
	err  error         // (e), (f): its error
}

// exitTimeout bounds waiting for an old process to exit.
const exitTimeout = 60 * time.Second

// begin starts an upgrade of old and returns once the switch is commanded and the new generation listens; finish
// waits for the rest (the old process's exit).
func (f *fleet) begin(ctx context.Context, old *gen) (*upgrade, error) {
	u := &upgrade{Old: old, StartMono: testenv.MonoNow()}
	switch f.c.Key {
	case StopStart:
		u.CommandMono = u.StartMono
		if err := old.watch.signal(syscall.SIGTERM); err != nil {
			return u, err
		}
		wctx, cancel := context.WithTimeout(ctx, exitTimeout)
		u.OldExitMono = old.watch.wait(wctx)
		cancel()
		if u.OldExitMono == 0 {
			return u, fmt.Errorf("old server %d did not exit", old.PID)
		}
		g, err := f.start(ctx)
		if err != nil {
			return u, err
		}
		u.New, u.NewReadyMono = g, testenv.MonoNow()
	case ReusePort, Migrate:
		u.CommandMono = u.StartMono
		g, err := f.start(ctx)
		if err != nil {
			return u, err
		}
		u.New, u.NewReadyMono = g, testenv.MonoNow()
		if err := old.watch.signal(syscall.SIGTERM); err != nil {
			return u, err
		}
	case Tableflip:
		u.CommandMono = u.StartMono
		if err := old.watch.signal(syscall.SIGHUP); err != nil {
			return u, err
		}
		ev, err := f.tf.next(ctx, old.PID)
		if err != nil {
			return u, fmt.Errorf("tableflip upgrade: %w", err)
		}
		g, err := f.adopt(ev, true)
		if err != nil {
			return u, err
		}
		u.New, u.NewReadyMono = g, ev.Mono
	case Draind, DraindFlip:
		g, err := f.start(ctx)
		if err != nil {
			return u, err
		}
		u.New, u.NewReadyMono = g, testenv.MonoNow()
		u.done = make(chan struct{})
		var steerMono atomic.Int64
		u.CommandMono = testenv.MonoNow()
		go func() {
			defer close(u.done)
			u.Handoff, u.err = handoff.Run(ctx, handoff.Options{
				From: old.PID, To: g.PID, Tracker: f.tracker, Objects: f.objs, PinDir: f.pinDir,
				Timeout: exitTimeout, ExitWait: 30 * time.Second, Logger: f.log, SignalAt: draindSignalAt[f.c.Key],
				Progress: func(p handoff.Progress) {
					if p.Stage == handoff.StageSteering {
						steerMono.CompareAndSwap(0, testenv.MonoNow())
					}
				},
			})
			u.SteerMono = steerMono.Load()
		}()
	default:
		return u, fmt.Errorf("unknown contender %q", f.c.Key)
	}
	return u, nil
}

// finish waits until the old process has exited (and, for (e) and (f), the handoff has returned).
func (u *upgrade) finish(ctx context.Context) error {
	var err error
	if u.done != nil {
		select {
		case <-u.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if u.Handoff != nil {
			u.FlipMono = u.Handoff.FlippedAt
		}
		if u.err != nil {
			err = fmt.Errorf("handoff: %w", u.err)
		}
	}
	if u.OldExitMono == 0 {
		wctx, cancel := context.WithTimeout(ctx, exitTimeout)
		u.OldExitMono = u.Old.watch.wait(wctx)
		cancel()
		if u.OldExitMono == 0 {
			err = errors.Join(err, fmt.Errorf("old server %d did not exit within %s", u.Old.PID, exitTimeout))
		}
	}
	return err
}
