// Package bench compares draind, in one run on one machine, with the usual ways of upgrading a TCP server:
// (a) stop the old server then start the new one, (b) start the new one with SO_REUSEPORT then SIGTERM the old one,
// (c) (b) with net.ipv4.tcp_migrate_req=1, (d) a server built with cloudflare/tableflip, (e) draind on the
// unmodified server, and (f) (e) with the old server signalled right after the flip instead of once drained
// (handoff.Options.SignalAt flip). Every run has a private network namespace, real server processes and load from a
// separate process; every figure in the results comes from a run.
//
// Scenarios: (1) a new-connection storm with an upgrade every second, (2) an accept-queue torture (a slow-accepting
// old server that closes its listener on SIGTERM), (3) thousands of long-lived connections, (4) switch time (from
// the upgrades of scenario 1), (5) datapath cost of draind's selector.
//
// A binary that runs the bench must call RunChildIfRequested first thing in main: the servers, holders and load
// clients are re-executions of the binary itself.
package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Scenario keys.
const (
	ScenarioStorm     = "storm"     // (1), and (4) from its upgrades
	ScenarioQueue     = "queue"     // (2)
	ScenarioLongLived = "longlived" // (3)
	ScenarioDatapath  = "datapath"  // (5)
)

// Scenarios lists the scenario keys in the order they run.
var Scenarios = []string{ScenarioStorm, ScenarioQueue, ScenarioLongLived, ScenarioDatapath}

// Params are every scenario's parameters.
type Params struct {
	Repeats int `json:"repeats"`
	// QueueRepeats, if positive, replaces Repeats for scenario 2, whose runs take seconds: its figures are the
	// noisiest, and the sign test of the targets needs more repeats to tell a difference from noise.
	QueueRepeats int            `json:"queue_repeats,omitempty"`
	Storm        StormParams    `json:"storm"`
	Queue        QueueParams    `json:"queue"`
	Long         LongParams     `json:"longlived"`
	Datapath     DatapathParams `json:"datapath"`
}

// DefaultParams returns the parameters of a short run (a few minutes on 2 cores) or of a long one.
func DefaultParams(long bool) Params {
	p := Params{
		Repeats: 3,
		Storm:   StormParams{Duration: 6 * time.Second, Every: time.Second, Concurrency: 32},
		Queue: QueueParams{Before: time.Second, After: 2 * time.Second, Concurrency: 64, Backlog: 128,
			AcceptDelay: 2 * time.Millisecond},
		Long:     LongParams{Conns: 2000, CloseAfter: 200 * time.Millisecond, Spread: time.Second},
		Datapath: DatapathParams{Phase: 250 * time.Millisecond, Pairs: 24, Margin: 30 * time.Millisecond, Concurrency: 32},
	}
	if long {
		p.Repeats = 5
		p.QueueRepeats = 10
		p.Storm.Duration = 61 * time.Second
		p.Queue.After = 4 * time.Second
		p.Long.Conns = 10000
		p.Long.Spread = 5 * time.Second
		p.Datapath.Pairs = 120
	}
	return p
}

// RepeatsOf is how many times scenario s runs.
func (p Params) RepeatsOf(s string) int {
	if s == ScenarioQueue && p.QueueRepeats > 0 {
		return p.QueueRepeats
	}
	return p.Repeats
}

// maxRepeats is the most repeats any scenario runs.
func (p Params) maxRepeats() int { return max(p.Repeats, p.QueueRepeats) }

// Config configures Run.
type Config struct {
	Params     Params
	Long       bool     // informative: Params are the long run's
	Scenarios  []string // default: all
	Contenders []string // default: all (scenario 5 is draind's alone: it runs whatever the contenders)
	Command    string   // the command line, for the results
	Logger     *slog.Logger
}

// Results are everything a bench run measured.
type Results struct {
	Command    string         `json:"command"`
	Started    time.Time      `json:"started"`
	Wall       time.Duration  `json:"wall_ns"`
	Machine    Machine        `json:"machine"`
	Long       bool           `json:"long"`
	Params     Params         `json:"params"`
	Contenders []Contender    `json:"contenders"`
	Storm      []*StormRun    `json:"storm,omitempty"`
	Queue      []*QueueRun    `json:"queue,omitempty"`
	LongLived  []*LongRun     `json:"longlived,omitempty"`
	Datapath   []*DatapathRun `json:"datapath,omitempty"`
	Errors     []string       `json:"errors,omitempty"`
}

// Machine describes where the bench ran.
type Machine struct {
	Kernel string `json:"kernel"`
	CPUs   int    `json:"cpus"`
	CPU    string `json:"cpu"`
	Memory string `json:"memory"`
	Go     string `json:"go"`
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				var kb int64
				if _, err := fmt.Sscan(strings.TrimSpace(v), &kb); err == nil {
					m.Memory = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
				}
			}
		}
	}
	return m
}

// Run runs the bench. It needs root (network namespaces, BPF). A run that fails is recorded in Results.Errors and
// the bench goes on; Run returns an error only when it cannot run at all or ctx ends.
func Run(ctx context.Context, cfg Config) (*Results, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("run bench: needs root (network namespaces, BPF)")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	scenarios := cfg.Scenarios
	if len(scenarios) == 0 {
		scenarios = Scenarios
	}
	var cs []Contender
	for _, k := range cfg.Contenders {
		c, ok := ContenderByKey(k)
		if !ok {
			return nil, fmt.Errorf("run bench: unknown contender %q", k)
		}
		cs = append(cs, c)
	}
	if len(cs) == 0 {
		cs = Contenders
	}
	for _, s := range scenarios {
		if !isScenario(s) {
			return nil, fmt.Errorf("run bench: unknown scenario %q", s)
		}
	}
	p := cfg.Params
	if p.Repeats <= 0 {
		return nil, errors.New("run bench: repeats must be positive")
	}
	// Tableflip generations outlive their parent generation; as a child subreaper the bench gets them and reaps
	// them (exitWatch) instead of leaving zombies to whatever PID 1 is.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("run bench: become child subreaper: %w", err)
	}
	pinDir := fmt.Sprintf("/sys/fs/bpf/drainbench-%d", os.Getpid())
	defer os.RemoveAll(pinDir)
	defer os.RemoveAll(pinDir + "-datapath")
	env := &runEnv{
		log:    log,
		quiet:  log.WithGroup("draind"),
		pinDir: pinDir,
	}
	if h := log.Handler(); !h.Enabled(ctx, slog.LevelDebug) {
		// Unless debugging, draind's own Info messages (one set per handoff) would drown the bench's progress.
		env.quiet = slog.New(levelHandler{h, slog.LevelWarn}).WithGroup("draind")
	}

	res := &Results{Command: cfg.Command, Started: time.Now(), Machine: machine(), Long: cfg.Long, Params: p, Contenders: cs}
	fail := func(what string, err error) {
		msg := fmt.Sprintf("%s: %v", what, err)
		res.Errors = append(res.Errors, msg)
		log.Error("run failed", "run", what, "err", err)
	}
	for _, s := range scenarios {
		for rep := range p.RepeatsOf(s) {
			if s == ScenarioDatapath {
				run, err := runDatapath(ctx, env, p.Datapath, rep, pinDir+"-datapath")
				if ctx.Err() != nil {
					return res, ctx.Err()
				}
				if err != nil {
					run.Error = err.Error()
					fail(fmt.Sprintf("datapath repeat %d", rep+1), err)
				}
				res.Datapath = append(res.Datapath, run)
				log.Info("datapath", "repeat", rep+1, "none/s", int(run.None), "attached/s", int(run.Attached),
					"ratio", fmt.Sprintf("%.3f", run.Ratio), "ns/run", fmt.Sprintf("%.0f", run.NsPerRun),
					"counter_idle_ratio", fmt.Sprintf("%.3f", run.CounterIdle.Ratio),
					"counter_tracking_ratio", fmt.Sprintf("%.3f", run.CounterTracking.Ratio))
				continue
			}
			// Rotate the order each repeat, so no contender always runs first (or right after another).
			for i := range cs {
				c := cs[(i+rep)%len(cs)]
				what := fmt.Sprintf("%s %s repeat %d", s, c.Key, rep+1)
				var err error
				switch s {
				case ScenarioStorm:
					var run *StormRun
					run, err = runStorm(ctx, env, c, p.Storm, rep)
					if run != nil {
						res.Storm = append(res.Storm, run)
						log.Info(s, "contender", c.Key, "repeat", rep+1, "upgrades", run.Upgrades, "requests", run.Requests,
							"failed", run.Failed, "connect_p99", fmtNS(float64(run.Connect.P99)), "connect_p99.9", fmtNS(float64(run.Connect.P999)),
							"bench_cpu_per_upgrade", fmtNS(float64(run.BenchCPUPerUpgrade)))
						if err == nil && run.Error != "" {
							err = errors.New(run.Error)
						}
					}
				case ScenarioQueue:
					var run *QueueRun
					run, err = runQueue(ctx, env, c, p.Queue, rep)
					if run != nil {
						res.Queue = append(res.Queue, run)
						log.Info(s, "contender", c.Key, "repeat", rep+1, "requests", run.Requests, "failed", run.Failed,
							"connect_p99", fmtNS(float64(run.Connect.P99)), "request_p99", fmtNS(float64(run.Request.P99)))
						if err == nil && run.Error != "" {
							err = errors.New(run.Error)
						}
					}
				case ScenarioLongLived:
					var run *LongRun
					run, err = runLong(ctx, env, c, p.Long, rep)
					if run != nil {
						res.LongLived = append(res.LongLived, run)
						log.Info(s, "contender", c.Key, "repeat", rep+1, "conns", run.Conns, "cut", run.Cut,
							"last_close_to_exit", fmtNS(float64(run.LastCloseToExit)))
						if err == nil && run.Error != "" {
							err = errors.New(run.Error)
						}
					}
				}
				if ctx.Err() != nil {
					return res, ctx.Err()
				}
				if err != nil {
					if r := runOf(res, s); r != nil && *r == "" {
						*r = err.Error()
					}
					fail(what, err)
				}
			}
		}
	}
	res.Wall = time.Since(res.Started)
	return res, nil
}

// runOf returns the Error field of the run just appended for scenario s.
func runOf(res *Results, s string) *string {
	switch s {
	case ScenarioStorm:
		if n := len(res.Storm); n > 0 {
			return &res.Storm[n-1].Error
		}
	case ScenarioQueue:
		if n := len(res.Queue); n > 0 {
			return &res.Queue[n-1].Error
		}
	case ScenarioLongLived:
		if n := len(res.LongLived); n > 0 {
			return &res.LongLived[n-1].Error
		}
	}
	return nil
}

func isScenario(s string) bool {
	for _, k := range Scenarios {
		if k == s {
			return true
		}
	}
	return false
}

// levelHandler raises a handler's minimum level (draind's own Info logging would drown the bench's progress).
type levelHandler struct {
	slog.Handler
	min slog.Level
}

func (h levelHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}

func (h levelHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return levelHandler{h.Handler.WithAttrs(as), h.min}
}

func (h levelHandler) WithGroup(name string) slog.Handler {
	return levelHandler{h.Handler.WithGroup(name), h.min}
}
