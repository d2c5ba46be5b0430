package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"runtime"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
	"github.com/draind/draind/testenv"
)

// addr is where every server listens, inside each run's private network namespace.
const addr = "127.0.0.1:8080"

// runEnv is what every run shares.
type runEnv struct {
	log    *slog.Logger // progress
	quiet  *slog.Logger // draind's own logging: warnings and errors only
	pinDir string       // draind's pins for the handoffs (private to this bench process)
}

// newNS creates a run's network namespace with tcp_migrate_req set for c (1 for (c), 0 for the others).
func (e *runEnv) newNS(c Contender) (*testenv.NetNS, error) {
	ns, err := testenv.NewNetNS()
	if err != nil {
		return nil, err
	}
	v := "0"
	if c.Key == Migrate {
		v = "1"
	}
	if err := ns.Sysctl("net.ipv4.tcp_migrate_req", v); err != nil {
		ns.Close()
		return nil, err
	}
	if got, err := ns.SysctlValue("net.ipv4.tcp_migrate_req"); err != nil || got != v {
		ns.Close()
		return nil, fmt.Errorf("set tcp_migrate_req: reads back %q, %v", got, err)
	}
	return ns, nil
}

// kernelCounters are the TcpExt counters of a run's namespace that tell what happened to connections the servers
// did not answer (a new namespace starts them at zero).
var kernelCounters = []string{"ListenOverflows", "ListenDrops", "TCPMigrateReqSuccess", "TCPMigrateReqFailure", "TCPAbortOnClose", "TCPAbortOnData"}

// tcpExt reads kernelCounters in ns (from /proc/thread-self/net/netstat on a thread inside it).
func tcpExt(ns *testenv.NetNS) (map[string]int64, error) {
	var data []byte
	err := ns.Do(func() error {
		var err error
		data, err = os.ReadFile("/proc/thread-self/net/netstat")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read TcpExt counters: %w", err)
	}
	all, err := proc.ParseTcpExt(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, n := range kernelCounters {
		if v, ok := all[n]; ok {
			out[n] = int64(v)
		}
	}
	return out, nil
}

// sleepUntil sleeps until CLOCK_MONOTONIC reaches mono.
func sleepUntil(ctx context.Context, mono int64) error {
	d := time.Duration(mono - testenv.MonoNow())
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// SwitchSample times one upgrade, in nanoseconds; -1: did not happen or not known.
type SwitchSample struct {
	// StartToFirstNew: from the start of the upgrade (for (b), (c), (e), (f): starting the new process) to the start of
	// the first connection the new process answered.
	StartToFirstNew int64 `json:"start_to_first_new_ns"`
	// CommandToAllNew: from the switch command (Contender.Command) to the start of the last connection the old
	// process answered (0: none started after the command). Where nothing failed, every new connection after it
	// went to the new process.
	CommandToAllNew int64 `json:"command_to_all_new_ns"`
	// CommandToSteer: (e) and (f) only, from the handoff.Run call to the selector attached with the old side as target
	// (handoff's StageSteering progress report): discovery, loading and the first counts are done.
	CommandToSteer int64 `json:"command_to_steer_ns"`
	// CommandToFlip: (e) and (f) only, from the handoff.Run call to the selector's flip (handoff.Result.FlippedAt).
	CommandToFlip int64 `json:"command_to_flip_ns"`
	// StartToReady: from the start of the upgrade to the new process listening.
	StartToReady int64 `json:"start_to_new_ready_ns"`
	// Total: from the start of the upgrade to the old process's exit.
	Total int64 `json:"total_ns"`
	// SignalAt: (e) and (f) only, when the handoff signalled the old process, as handoff.Result reports it.
	SignalAt drain.SignalAt `json:"signal_at,omitempty"`
}

func switchSample(u *upgrade, rep *LoadReport) SwitchSample {
	s := SwitchSample{StartToFirstNew: -1, CommandToAllNew: -1, CommandToSteer: -1, CommandToFlip: -1, StartToReady: -1, Total: -1}
	if u.New != nil {
		if sp, ok := rep.Servers[u.New.ID]; ok {
			s.StartToFirstNew = sp.FirstMono - u.StartMono
		}
		if u.NewReadyMono != 0 {
			s.StartToReady = u.NewReadyMono - u.StartMono
		}
	}
	if sp, ok := rep.Servers[u.Old.ID]; ok {
		s.CommandToAllNew = max(sp.LastMono-u.CommandMono, 0)
	}
	if u.SteerMono != 0 {
		s.CommandToSteer = u.SteerMono - u.CommandMono
	}
	if u.FlipMono != 0 {
		s.CommandToFlip = u.FlipMono - u.CommandMono
	}
	if u.OldExitMono != 0 {
		s.Total = u.OldExitMono - u.StartMono
	}
	if u.Handoff != nil {
		s.SignalAt = u.Handoff.SignalAt
	}
	return s
}

// loadFigures are the load client's figures of a run.
type loadFigures struct {
	Requests int            `json:"requests"`
	OK       int            `json:"ok"`
	Failed   int            `json:"failed"`
	Failures map[string]int `json:"failures"`
	NoAnswer int            `json:"no_answer"` // of the resets: FIN before any byte of an answer
	Samples  []string       `json:"samples,omitempty"`
	FailedAt []FailureAt    `json:"failed_at,omitempty"` // the first failures, relative to the load's start
	// Kernel are TcpExt counters of the run's namespace at its end (see kernelCounters).
	Kernel  map[string]int64 `json:"kernel,omitempty"`
	Rate    float64          `json:"rate_per_s"` // answered attempts per second
	Connect Percentiles      `json:"connect"`
	Request Percentiles      `json:"request"`
}

func figuresOf(r *LoadReport) loadFigures {
	f := loadFigures{Requests: r.Requests, OK: r.OK, Failed: r.Failed(), Failures: maps.Clone(r.Failures),
		NoAnswer: r.NoAnswer, Samples: r.Samples, FailedAt: r.FailedAt, Connect: r.Connect, Request: r.Request}
	if d := time.Duration(r.EndMono - r.StartMono); d > 0 {
		f.Rate = float64(r.OK) / d.Seconds()
	}
	return f
}

// StormParams configure scenario 1.
type StormParams struct {
	Duration    time.Duration `json:"duration"`    // of the load
	Every       time.Duration `json:"every"`       // an upgrade starts every Every (or as soon as the previous one ended)
	Concurrency int           `json:"concurrency"` // load workers, as fast as they can
}

// StormRun is one run of scenario 1 (and the samples of scenario 4).
type StormRun struct {
	Contender string `json:"contender"`
	Repeat    int    `json:"repeat"`
	loadFigures
	Upgrades int            `json:"upgrades"`
	Switches []SwitchSample `json:"switches"`
	// CommandsAt are the switch commands, relative to the load's start.
	CommandsAt []int64 `json:"commands_at_ns"`
	// BenchCPUPerUpgrade is this bench process's CPU time (user + system) during the upgrades over their number:
	// handoff.Run's for (e) and (f), which run in it, on top of starting the new server (all but (a) and (d)).
	BenchCPUPerUpgrade int64  `json:"bench_cpu_per_upgrade_ns"`
	Error              string `json:"error,omitempty"`

	timeline *LoadReport
	marks    []int64
}

func runStorm(ctx context.Context, env *runEnv, c Contender, p StormParams, repeat int) (run *StormRun, err error) {
	run = &StormRun{Contender: c.Key, Repeat: repeat}
	ns, err := env.newNS(c)
	if err != nil {
		return run, err
	}
	defer ns.Close()
	f, err := newFleet(c, ns, serverSpec{Addr: addr}, env)
	if err != nil {
		return run, err
	}
	defer f.close()
	cur, err := f.first(ctx)
	if err != nil {
		return run, err
	}
	load, err := startLoad(ctx, ns, LoadOptions{Addr: addr, Concurrency: p.Concurrency, Duration: p.Duration + time.Minute})
	if err != nil {
		return run, err
	}
	defer load.kill()
	t0 := load.startMono()
	end := t0 + int64(p.Duration)
	var ups []*upgrade
	var uerr error
	cpu0, err := processCPU()
	if err != nil {
		return run, err
	}
	for i := int64(1); ; i++ {
		at := max(t0+i*int64(p.Every), testenv.MonoNow())
		if at+int64(p.Every)/2 > end {
			break
		}
		if err := sleepUntil(ctx, at); err != nil {
			return run, err
		}
		u, err := f.begin(ctx, cur)
		if err == nil {
			err = u.finish(ctx)
		}
		ups = append(ups, u)
		if err != nil {
			uerr = fmt.Errorf("upgrade %d: %w", i, err)
			break
		}
		cur = u.New
	}
	cpu1, err := processCPU()
	if err != nil {
		return run, err
	}
	if len(ups) > 0 {
		run.BenchCPUPerUpgrade = int64(cpu1-cpu0) / int64(len(ups))
	}
	if err := sleepUntil(ctx, end); err != nil {
		return run, err
	}
	rep, err := load.stop()
	if err != nil {
		return run, err
	}
	run.loadFigures = figuresOf(rep)
	run.Kernel, err = tcpExt(ns)
	if err != nil {
		return run, err
	}
	run.timeline = rep
	for _, u := range ups {
		run.marks = append(run.marks, u.CommandMono)
		run.CommandsAt = append(run.CommandsAt, u.CommandMono-rep.StartMono)
		if u.New != nil && u.OldExitMono != 0 {
			run.Upgrades++
			run.Switches = append(run.Switches, switchSample(u, rep))
		}
	}
	if uerr != nil {
		run.Error = uerr.Error()
	}
	return run, nil
}

// QueueParams configure scenario 2.
type QueueParams struct {
	Before      time.Duration `json:"before"`       // load before the upgrade
	After       time.Duration `json:"after"`        // load after the upgrade started
	Concurrency int           `json:"concurrency"`  // load workers, as fast as they can
	Backlog     int           `json:"backlog"`      // of the old server's listener
	AcceptDelay time.Duration `json:"accept_delay"` // the old server sleeps this long before each accept
}

// QueueRun is one run of scenario 2.
type QueueRun struct {
	Contender string `json:"contender"`
	Repeat    int    `json:"repeat"`
	loadFigures
	Switch     SwitchSample `json:"switch"`
	CommandsAt []int64      `json:"commands_at_ns"` // the switch command, relative to the load's start
	// CommandToExit is from the switch command to the old process's exit; -1: not seen.
	CommandToExit int64 `json:"command_to_exit_ns"`
	// AfterCommand describes what was answered after the switch command: what the upgrade could still change.
	AfterCommand *MarkFigures `json:"after_command,omitempty"`
	Error        string       `json:"error,omitempty"`

	timeline *LoadReport
	marks    []int64
}

func runQueue(ctx context.Context, env *runEnv, c Contender, p QueueParams, repeat int) (run *QueueRun, err error) {
	run = &QueueRun{Contender: c.Key, Repeat: repeat, CommandToExit: -1}
	ns, err := env.newNS(c)
	if err != nil {
		return run, err
	}
	defer ns.Close()
	f, err := newFleet(c, ns, serverSpec{Addr: addr, Backlog: p.Backlog, FirstAcceptDelay: p.AcceptDelay}, env)
	if err != nil {
		return run, err
	}
	defer f.close()
	cur, err := f.first(ctx)
	if err != nil {
		return run, err
	}
	load, err := startLoad(ctx, ns, LoadOptions{Addr: addr, Concurrency: p.Concurrency, Duration: p.Before + p.After + time.Minute})
	if err != nil {
		return run, err
	}
	defer load.kill()
	t0 := load.startMono()
	if err := sleepUntil(ctx, t0+int64(p.Before)); err != nil {
		return run, err
	}
	u, uerr := f.begin(ctx, cur)
	if uerr == nil {
		uerr = u.finish(ctx)
	}
	if u.CommandMono != 0 {
		uerr = errors.Join(uerr, load.mark(u.CommandMono)) // a run without the figures still has the others
	}
	if err := sleepUntil(ctx, t0+int64(p.Before+p.After)); err != nil {
		return run, err
	}
	rep, err := load.stop()
	if err != nil {
		return run, err
	}
	run.loadFigures = figuresOf(rep)
	run.AfterCommand = rep.AfterMark
	run.Kernel, err = tcpExt(ns)
	if err != nil {
		return run, err
	}
	run.timeline = rep
	run.marks = []int64{u.CommandMono}
	run.CommandsAt = []int64{u.CommandMono - rep.StartMono}
	run.Switch = switchSample(u, rep)
	if u.OldExitMono != 0 {
		run.CommandToExit = u.OldExitMono - u.CommandMono
	}
	if uerr != nil {
		run.Error = uerr.Error()
	}
	return run, nil
}

// LongParams configure scenario 3.
type LongParams struct {
	Conns      int           `json:"conns"`       // long-lived connections open to the old server
	CloseAfter time.Duration `json:"close_after"` // the clients start closing this long after the switch command
	Spread     time.Duration `json:"spread"`      // ... and close them all evenly over this long
}

// LongRun is one run of scenario 3.
type LongRun struct {
	Contender string `json:"contender"`
	Repeat    int    `json:"repeat"`
	Conns     int    `json:"conns"`
	// Cut counts the connections the server side ended (EOF or reset seen by the client) before the client closed
	// them: each is a long-lived connection (a stream, a websocket, a download) the upgrade broke.
	Cut          int `json:"cut"`
	ClientClosed int `json:"client_closed"`
	// LastCloseToExit is from the client's last close (its own clock, right after close(2)) to the old process's
	// exit (seen through a pidfd); -1 when the old process exited before the clients closed.
	LastCloseToExit int64  `json:"last_close_to_exit_ns"`
	CommandToExit   int64  `json:"command_to_exit_ns"`
	Error           string `json:"error,omitempty"`
}

func runLong(ctx context.Context, env *runEnv, c Contender, p LongParams, repeat int) (run *LongRun, err error) {
	run = &LongRun{Contender: c.Key, Repeat: repeat, LastCloseToExit: -1, CommandToExit: -1}
	ns, err := env.newNS(c)
	if err != nil {
		return run, err
	}
	defer ns.Close()
	f, err := newFleet(c, ns, serverSpec{Addr: addr, Hold: true, Backlog: 4096}, env)
	if err != nil {
		return run, err
	}
	defer f.close()
	cur, err := f.first(ctx)
	if err != nil {
		return run, err
	}
	octx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	conns, err := testenv.StartConns(octx, ns, testenv.ConnsOptions{Addr: addr, N: p.Conns})
	cancel()
	if err != nil {
		return run, err
	}
	defer conns.Kill()
	run.Conns = conns.Established()
	u, uerr := f.begin(ctx, cur)
	if uerr == nil {
		if err := sleepUntil(ctx, u.CommandMono+int64(p.CloseAfter)); err != nil {
			return run, err
		}
		cctx, cancel := context.WithTimeout(ctx, p.Spread+time.Minute)
		if err := conns.CloseAll(cctx, p.Spread); err != nil {
			uerr = fmt.Errorf("close connections: %w", err)
		}
		cancel()
		uerr = errors.Join(uerr, u.finish(ctx))
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	st, err := conns.Stats(sctx)
	cancel()
	if err != nil {
		return run, err
	}
	run.Cut, run.ClientClosed = st.PeerEnded, st.Closed
	if u.OldExitMono != 0 {
		run.CommandToExit = u.OldExitMono - u.CommandMono
		if st.LastCloseMono != 0 && u.OldExitMono >= st.LastCloseMono && run.Cut == 0 {
			run.LastCloseToExit = u.OldExitMono - st.LastCloseMono
		}
	}
	if uerr != nil {
		run.Error = uerr.Error()
	}
	return run, nil
}

// DatapathParams configure scenario 5.
type DatapathParams struct {
	Phase       time.Duration `json:"phase"`       // length of each phase
	Pairs       int           `json:"pairs"`       // attached/none phase pairs, alternating (half as many for each counter cost)
	Margin      time.Duration `json:"margin"`      // left out at both ends of a phase
	Concurrency int           `json:"concurrency"` // load workers, as fast as they can
}

// statsPhases is the length of the phase with BPF statistics on, in phases.
const statsPhases = 8

// DatapathRun is one run of scenario 5: one server process under the same load throughout, in alternating phases
// with draind's selector attached (as during and after a handoff: target the measured server) and with no selector,
// then one phase attached with the kernel's BPF run-time statistics on; then, the selector attached, the same for
// draind's counter, idle and tracking (CounterIdle, CounterTracking).
type DatapathRun struct {
	Repeat    int     `json:"repeat"`
	None      float64 `json:"none_per_s"`           // answered/s over all no-selector phases
	Attached  float64 `json:"attached_per_s"`       // ... over all attached phases
	WithStats float64 `json:"attached_stats_per_s"` // ... in the phase with statistics on
	// Ratio is the median, over every two adjacent phases (attached then none, or none then attached), of the
	// attached phase's answered/s over the other's: linear drift cancels, and a burst of other load on the machine
	// spoils only the ratios of the phases it falls in.
	Ratio      float64   `json:"ratio"`
	PairRatios []float64 `json:"pair_ratios"`
	// From the kernel's BPF statistics over the phase with statistics on.
	Runs        uint64  `json:"selector_runs"`
	RunTimeNS   int64   `json:"selector_run_time_ns"`
	NsPerRun    float64 `json:"selector_ns_per_run"`
	RunsPerConn float64 `json:"selector_runs_per_conn"`
	// CPUShare is the selector's run time per connection over the machine's CPU time per connection in the
	// statistics phase (CPUs / answered/s): what the selector can cost the throughput of a machine that is
	// saturated by the load, the server and the kernel's TCP work.
	CPUShare float64 `json:"selector_cpu_share"`
	// draind's counter (drain.Tracker's BPF programs), the selector attached in every phase: idle (as a draind
	// process keeps it loaded between handoffs: its iterators, no event program attached) and tracking (as while a
	// handoff drains: the event program attached, the server's port watched).
	CounterIdle     CounterCost `json:"counter_idle"`
	CounterTracking CounterCost `json:"counter_tracking"`
	Failed          int         `json:"failed"`
	Error           string      `json:"error,omitempty"`

	timeline *LoadReport
	phases   []ratePhase
}

func runDatapath(ctx context.Context, env *runEnv, p DatapathParams, repeat int, pinDir string) (run *DatapathRun, err error) {
	run = &DatapathRun{Repeat: repeat}
	ns, err := env.newNS(Contender{})
	if err != nil {
		return run, err
	}
	defer ns.Close()
	measured, err := testenv.StartServer(ctx, ns, testenv.ServerOptions{Addr: addr, ID: "measured", ReusePort: true})
	if err != nil {
		return run, err
	}
	defer measured.Kill()

	// Attach the selector as a handoff does: another server joins the group as the old side, steering begins and
	// flips to the measured server, and the other server closes its listener. The measured server then holds the
	// group alone with the selector attached, as it does at the end of every draind handoff's drain. The phases
	// then detach and re-attach the same program (SO_DETACH/SO_ATTACH_REUSEPORT_EBPF on a pidfd_getfd copy of
	// the listener); steer.Finish cleans up at the end.
	other, err := testenv.StartServer(ctx, ns, testenv.ServerOptions{Addr: addr, ID: "other", ReusePort: true})
	if err != nil {
		return run, err
	}
	defer other.Kill()
	objs, err := loader.Open(loader.Options{PinDir: pinDir, Logger: env.quiet})
	if err != nil {
		return run, err
	}
	defer objs.Close()
	st, err := beginSteering(objs, other.PID, measured.PID, env.quiet)
	if err != nil {
		return run, err
	}
	finished := false
	defer func() {
		if !finished {
			_ = st.Undo()
		}
	}()
	if err := st.Flip(); err != nil {
		return run, fmt.Errorf("flip: %w", err)
	}
	if err := other.CloseListener(); err != nil {
		return run, err
	}
	prog, err := findSelector(objs)
	if err != nil {
		return run, err
	}
	defer prog.Close()
	lst, err := listenerOf(measured.PID)
	if err != nil {
		return run, err
	}
	defer lst.Proc.Close()
	defer lst.Close()
	setSelector := func(on bool) error {
		fd, err := lst.Listeners[0].Copy()
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if on {
			err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog.FD())
		} else {
			err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
		}
		if err != nil {
			return fmt.Errorf("attach selector (%v): %w", on, err)
		}
		return nil
	}

	// The load outlasts every phase: the selector's pairs and statistics phase, then twice the counter's (with a
	// settle pause and an allowance for loading the counter before each phase); every phase is checked for coverage.
	counterPhaseTime := time.Duration(2*(p.Pairs/2))*(p.Phase+counterSettle+time.Second) + statsPhases*p.Phase
	load, err := startLoad(ctx, ns, LoadOptions{Addr: addr, Concurrency: p.Concurrency,
		Duration: time.Duration(2*p.Pairs+statsPhases)*p.Phase + 2*counterPhaseTime + time.Minute})
	if err != nil {
		return run, err
	}
	defer load.kill()
	phaseOf := func(label string, d time.Duration) (ratePhase, error) {
		s := testenv.MonoNow()
		err := sleepUntil(ctx, s+int64(d))
		return ratePhase{Label: label, From: s, Till: testenv.MonoNow()}, err
	}
	attached, none, all, err := alternate(p.Pairs, p.Phase, 0, "attached", "none", setSelector, phaseOf)
	if err != nil {
		return run, err
	}
	run.phases = append(run.phases, all...)
	if err := setSelector(true); err != nil {
		return run, err
	}
	withStats, selRuns, selTime, err := statsPhase("attached, BPF statistics on", statsPhases*p.Phase, phaseOf,
		func() (uint64, time.Duration, error) {
			st, err := prog.Stats()
			if err != nil {
				return 0, 0, err
			}
			return st.RunCount, st.Runtime, nil
		})
	if err != nil {
		return run, fmt.Errorf("measure selector: %w", err)
	}
	run.phases = append(run.phases, withStats)

	// draind's counter, idle then as while a handoff tracks a tree, each against none (the selector attached
	// throughout).
	nsIno, err := lst.Proc.NetNSIno()
	if err != nil {
		return run, err
	}
	port := lst.Listeners[0].Addr.Port()
	var cps [2]*counterPhases
	for i, tracking := range []bool{false, true} {
		if cps[i], err = runCounterPhases(p.Pairs/2, p.Phase, tracking, loader.PortKey{Netns: uint32(nsIno), Port: port}, env, phaseOf); err != nil {
			return run, err
		}
		run.phases = append(run.phases, cps[i].all...)
		run.phases = append(run.phases, cps[i].stats)
	}

	if err := st.Finish(); err != nil {
		return run, fmt.Errorf("detach selector: %w", err)
	}
	finished = true
	rep, err := load.stop()
	if err != nil {
		return run, err
	}
	run.timeline = rep
	rate := func(ws ...ratePhase) float64 {
		ok, covered := 0, time.Duration(0)
		for _, w := range ws {
			_, n, c := rep.Window(w.From+int64(p.Margin), w.Till-int64(p.Margin))
			ok, covered = ok+n, covered+c
		}
		if covered <= 0 {
			return 0
		}
		return float64(ok) / covered.Seconds()
	}
	for _, ph := range run.phases {
		if _, _, c := rep.Window(ph.From+int64(p.Margin), ph.Till-int64(p.Margin)); c <= 0 {
			return run, fmt.Errorf("measure datapath: the load ended before phase %q", ph.Label)
		}
	}
	run.None, run.Attached, run.WithStats = rate(none...), rate(attached...), rate(withStats)
	run.PairRatios = pairRatios(all, rate)
	if len(run.PairRatios) > 0 { // else 0: no ratio (JSON has no NaN)
		run.Ratio = SpreadOf(run.PairRatios).Med
	}
	run.CounterIdle, run.CounterTracking = cps[0].cost(rep, rate), cps[1].cost(rep, rate)
	_, statsConns, _ := rep.Window(withStats.From, withStats.Till)
	run.Runs, run.RunTimeNS = selRuns, int64(selTime)
	if run.Runs > 0 {
		run.NsPerRun = float64(run.RunTimeNS) / float64(run.Runs)
	}
	if statsConns > 0 {
		run.RunsPerConn = float64(run.Runs) / float64(statsConns)
	}
	run.CPUShare = cpuShare(run.NsPerRun*run.RunsPerConn, run.WithStats)
	run.Failed = rep.Failed()
	return run, nil
}

// CounterCost is what draind's counter costs one server under load: alternating phases with it loaded and not, then
// one loaded with the kernel's BPF statistics on.
type CounterCost struct {
	Loaded     float64   `json:"loaded_per_s"`     // answered/s over the phases with the counter loaded
	NotLoaded  float64   `json:"not_loaded_per_s"` // ... without
	Ratio      float64   `json:"ratio"`            // median over adjacent phases of loaded / not loaded, as DatapathRun.Ratio
	PairRatios []float64 `json:"pair_ratios"`
	WithStats  float64   `json:"stats_per_s"` // answered/s in the phase with statistics on
	// The runs and run time of the counter's event program (loader.Counter.EventStats) over the statistics phase,
	// its run time per answered connection, and that over the machine's CPU time per connection (as CPUShare).
	Runs      uint64  `json:"runs"`
	RunTimeNS int64   `json:"run_time_ns"`
	NsPerConn float64 `json:"ns_per_conn"`
	CPUShare  float64 `json:"cpu_share"`
}

// counterPhases are the phases of one CounterCost.
type counterPhases struct {
	loaded, notLoaded, all []ratePhase
	stats                  ratePhase
	runs                   uint64
	runtime                time.Duration
}

// counterSettle is waited after loading or closing the counter, before the next phase starts: the kernel frees a
// closed counter's programs and maps after the close returns.
const counterSettle = 100 * time.Millisecond

// runCounterPhases alternates pairs of phases with the counter loaded and not, then runs one phase loaded with BPF
// statistics on. tracking: with the event program attached (as LoadCounter leaves it) and port watched (a handoff's
// state; no process is marked, so the counter wakes nobody); idle: with it detached. The counter is loaded and
// closed between phases, outside the measured windows.
func runCounterPhases(pairs int, phase time.Duration, tracking bool, port loader.PortKey, env *runEnv,
	phaseOf func(string, time.Duration) (ratePhase, error)) (_ *counterPhases, err error) {
	label := "attached + counter"
	if tracking {
		label += " (tracking)"
	}
	var c *loader.Counter
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	set := func(on bool) error {
		if !on {
			if c != nil {
				c.Close()
				c = nil
			}
			return nil
		}
		k, err := loader.LoadCounter(loader.CounterOptions{Logger: env.quiet})
		if err != nil {
			return err
		}
		if tracking {
			err = k.PutPort(port, 0)
		} else {
			err = k.WatchEvents(false) // LoadCounter attached it
		}
		if err != nil {
			k.Close()
			return err
		}
		c = k
		return nil
	}
	cp := &counterPhases{}
	if cp.loaded, cp.notLoaded, cp.all, err = alternate(pairs, phase, counterSettle, label, "attached", set, phaseOf); err != nil {
		return nil, err
	}
	if err := set(true); err != nil {
		return nil, err
	}
	if cp.stats, cp.runs, cp.runtime, err = statsPhase(label+", BPF statistics on", statsPhases*phase, phaseOf, c.EventStats); err != nil {
		return nil, fmt.Errorf("measure counter (tracking: %v): %w", tracking, err)
	}
	return cp, nil
}

// alternate runs pairs of alternating phases, the first "on": set(on) before each, then settle, then the phase.
func alternate(pairs int, phase, settle time.Duration, onLabel, offLabel string, set func(on bool) error,
	phaseOf func(string, time.Duration) (ratePhase, error)) (on, off, all []ratePhase, err error) {
	for i := range 2 * pairs {
		isOn := i%2 == 0
		if err := set(isOn); err != nil {
			return nil, nil, nil, err
		}
		time.Sleep(settle)
		label := offLabel
		if isOn {
			label = onLabel
		}
		ph, err := phaseOf(label, phase)
		if err != nil {
			return nil, nil, nil, err
		}
		all = append(all, ph)
		if isOn {
			on = append(on, ph)
		} else {
			off = append(off, ph)
		}
	}
	return on, off, all, nil
}

// statsPhase runs one phase with the kernel's BPF run-time statistics on (BPF_ENABLE_STATS: switched off again
// after it, and by the kernel if this process dies) and returns how much read's counts moved over it.
func statsPhase(label string, d time.Duration, phaseOf func(string, time.Duration) (ratePhase, error),
	read func() (uint64, time.Duration, error)) (ratePhase, uint64, time.Duration, error) {
	off, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return ratePhase{}, 0, 0, fmt.Errorf("enable BPF statistics: %w", err)
	}
	defer off.Close()
	r0, t0, err0 := read()
	ph, perr := phaseOf(label, d)
	r1, t1, err1 := read()
	if err := errors.Join(err0, perr, err1); err != nil {
		return ph, 0, 0, fmt.Errorf("read BPF statistics: %w", err)
	}
	return ph, r1 - r0, t1 - t0, nil
}

// cpuShare is a program's run time per connection over the machine's CPU time per connection at answered
// connections per second (CPUs / rate): what it can cost the throughput of a machine that the load saturates.
func cpuShare(nsPerConn, rate float64) float64 {
	if rate <= 0 {
		return 0
	}
	return nsPerConn / (float64(runtime.NumCPU()) * 1e9 / rate)
}

// cost summarizes the phases against the load's report.
func (cp *counterPhases) cost(rep *LoadReport, rate func(...ratePhase) float64) CounterCost {
	cc := CounterCost{Loaded: rate(cp.loaded...), NotLoaded: rate(cp.notLoaded...), PairRatios: pairRatios(cp.all, rate),
		WithStats: rate(cp.stats), Runs: cp.runs, RunTimeNS: int64(cp.runtime)}
	if len(cc.PairRatios) > 0 {
		cc.Ratio = SpreadOf(cc.PairRatios).Med
	}
	if _, n, _ := rep.Window(cp.stats.From, cp.stats.Till); n > 0 {
		cc.NsPerConn = float64(cc.RunTimeNS) / float64(n)
		cc.CPUShare = cpuShare(cc.NsPerConn, cc.WithStats)
	}
	return cc
}

// processCPU is this process's CPU time so far, user and system.
func processCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("read CPU time: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// pairRatios is, for every two adjacent phases of alternating ones (the first "on"), the rate of the "on" phase
// over the other's.
func pairRatios(phases []ratePhase, rate func(...ratePhase) float64) []float64 {
	var out []float64
	for i := 1; i < len(phases); i++ {
		on, off := phases[i-1], phases[i]
		if i%2 == 0 { // phase i is "on" again
			on, off = off, on
		}
		if r := Ratio(rate(on), rate(off)); !math.IsNaN(r) {
			out = append(out, r)
		}
	}
	return out
}

// listenerOf discovers pid's (single) listening socket. The Side's Proc stays open (Listener.Copy uses its pidfd):
// close the Side, then the Proc.
func listenerOf(pid int) (*steer.Side, error) {
	p, err := proc.Open(pid)
	if err != nil {
		return nil, err
	}
	side, err := steer.Discover(p)
	if err != nil {
		p.Close()
		return nil, err
	}
	if len(side.Listeners) != 1 {
		side.Close()
		p.Close()
		return nil, fmt.Errorf("process %d has %d listeners, want 1", pid, len(side.Listeners))
	}
	return side, nil
}

// beginSteering attaches draind's selector to the group of old's and new's listeners, target old (steer.Begin).
func beginSteering(objs *loader.Objects, oldPID, newPID int, log *slog.Logger) (*steer.Steering, error) {
	oldP, err := proc.Open(oldPID)
	if err != nil {
		return nil, err
	}
	defer oldP.Close()
	newP, err := proc.Open(newPID)
	if err != nil {
		return nil, err
	}
	defer newP.Close()
	oldSide, err := steer.Discover(oldP, newPID)
	if err != nil {
		return nil, err
	}
	defer oldSide.Close()
	newSide, err := steer.Discover(newP, oldPID)
	if err != nil {
		return nil, err
	}
	defer newSide.Close()
	pairs, err := steer.PairListeners(oldSide, newSide, nil)
	if err != nil {
		return nil, err
	}
	return steer.Begin(objs, pairs, steer.Options{Logger: log})
}

// findSelector finds the selector program attached through objs: the newest SK_REUSEPORT program that uses objs's
// socket array (the pin directory is private to this bench, so no other draind's program uses it).
func findSelector(objs *loader.Objects) (*ebpf.Program, error) {
	mi, err := objs.Sockets.Info()
	if err != nil {
		return nil, fmt.Errorf("socket array info: %w", err)
	}
	want, ok := mi.ID()
	if !ok {
		return nil, errors.New("socket array info: no map id")
	}
	var best *ebpf.Program
	var bestID ebpf.ProgramID
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if err != nil {
			break
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // gone meanwhile
		}
		info, err := p.Info()
		if err != nil || info.Type != ebpf.SkReuseport {
			p.Close()
			continue
		}
		mapIDs, _ := info.MapIDs()
		if !slices.Contains(mapIDs, want) || id < bestID {
			p.Close()
			continue
		}
		if best != nil {
			best.Close()
		}
		best, bestID = p, id
	}
	if best == nil {
		return nil, errors.New("find selector: no SK_REUSEPORT program uses the socket array")
	}
	return best, nil
}
