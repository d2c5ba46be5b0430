// Package metrics is draind's Prometheus instrumentation: a custom registry with what the daemon records as
// handoffs go (started, finished, durations, signals, rollbacks) and a collector that reads, at scrape time, the
// in-flight counts of the handoffs in progress, the selector's per-CPU decision counters and the kernel's TCP
// counters of the network namespaces draind works in. No PID is ever a label: a listener is named by its address
// (and an optional operator-given name), and the series of a handoff go away when it ends.
package metrics

import (
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/draind/draind/proc"
)

const namespace = "draind"

// Version is draind's version, for draind_build_info (set at build time with -ldflags -X).
var Version = "dev"

// Results of a finished handoff (draind_handoffs_finished_total's result label).
const (
	ResultDrained    = "drained"     // drained to zero, signalled
	ResultTimedOut   = "timed_out"   // the deadline passed, signalled or killed by policy
	ResultAborted    = "aborted"     // rolled back because someone asked
	ResultRolledBack = "rolled_back" // rolled back for any other reason (the new side died or was not ready, ...)
	ResultFailed     = "failed"      // refused or failed before steering, or the signal could not be sent
)

// RollbackReasons are the values of draind_rollbacks_total's reason label (handoff.Cause).
var RollbackReasons = []string{"new_exited", "not_ready", "deadline", "aborted", "restarted", "error"}

// Decisions of the selector (draind_selector_decisions_total's decision label).
var decisions = []string{"steered", "fallback", "migrated", "failed", "probed"}

// Source is what the collector reads at scrape time: the daemon's handoffs in progress. It must be safe to call
// from several scrapes at once. A non-nil error says some figures could not be read (the others are exported).
type Source interface {
	Snapshot() (Snapshot, error)
}

// Snapshot is the state of the handoffs in progress.
type Snapshot struct {
	Handoffs  int        // handoffs in progress
	Listeners []Listener // one per listener of every handoff in progress
	Netns     []Netns    // the network namespaces those listeners are in
}

// Listener is one handed-off listener.
type Listener struct {
	Addr     string    // "127.0.0.1:8080"
	Name     string    // operator-given name of the handoff, may be empty
	Netns    uint64    // the listener's network namespace (inode number): pods on one node share addresses
	Old, New Count     // in-flight connections of each side on the listener's port
	Selector [5]uint64 // decisions: steered, fallback, migrated, failed, probed
	Deadline time.Time // the drain deadline (zero before the flip)
}

// Count is one side's connections on a listener.
type Count struct {
	InFlight, Queued int
}

// Netns is one network namespace, named by a process in it through which its counters are read (the namespace's
// inode number is the label).
type Netns struct {
	PID int
}

// Metrics is draind's registry and the instruments the daemon records into. Safe for concurrent use.
type Metrics struct {
	Registry *prometheus.Registry

	started      prometheus.Counter
	finished     *prometheus.CounterVec
	duration     prometheus.Histogram
	drain        prometheus.Histogram
	queueMoved   prometheus.Counter
	queueKept    prometheus.Counter
	queuePause   prometheus.Histogram
	signals      *prometheus.CounterVec
	rollbacks    *prometheus.CounterVec
	collectErrs  prometheus.Counter
	source       Source
	procRoot     string
	mu           sync.Mutex // one collection at a time reads the source
	descInFlight *prometheus.Desc
	descQueued   *prometheus.Desc
	descActive   *prometheus.Desc
	descDecision *prometheus.Desc
	descMigrate  *prometheus.Desc
	descOverflow *prometheus.Desc
	descDrops    *prometheus.Desc
	descDeadline *prometheus.Desc
}

// Options configures New. The zero value has no source (no per-handoff series) and registers the Go and process
// collectors.
type Options struct {
	Source Source
	// NoRuntime leaves out the Go runtime and process collectors (tests that compare whole outputs).
	NoRuntime bool
}

// New creates the registry and its instruments.
func New(opts Options) *Metrics {
	m := &Metrics{Registry: prometheus.NewPedanticRegistry(), source: opts.Source, procRoot: "/proc"}
	f := func(name string) string { return prometheus.BuildFQName(namespace, "", name) }
	m.started = prometheus.NewCounter(prometheus.CounterOpts{Name: f("handoffs_started_total"),
		Help: "Handoffs draind started steering for (they passed the checks and the selector was attached)."})
	m.finished = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("handoffs_finished_total"),
		Help: "Handoffs that ended, by result: drained, timed_out, aborted, rolled_back, failed."}, []string{"result"})
	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: f("handoff_duration_seconds"),
		Help:    "Time from a handoff's request to its end (drain, signal and exit wait included).",
		Buckets: prometheus.ExponentialBuckets(0.05, 2, 14)})
	m.drain = prometheus.NewHistogram(prometheus.HistogramOpts{Name: f("drain_duration_seconds"),
		Help:    "Time from the flip to the old side's last connection closing (or to the deadline).",
		Buckets: prometheus.ExponentialBuckets(0.01, 2, 17)})
	m.queueMoved = prometheus.NewCounter(prometheus.CounterOpts{Name: f("queue_moved_connections_total"),
		Help: "Connections that waited in an old listener's accept queue after the flip and that draind moved to the new side."})
	m.queueKept = prometheus.NewCounter(prometheus.CounterOpts{Name: f("queue_kept_connections_total"),
		Help: "Connections that waited in an old listener's accept queue after the flip and that the old side accepted itself soon enough for draind not to move them."})
	m.queuePause = prometheus.NewHistogram(prometheus.HistogramOpts{Name: f("queue_move_pause_seconds"),
		Help:    "How long the old side's processes were stopped (SIGSTOP) while draind moved their accept queues.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 12)})
	m.signals = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("signals_sent_total"),
		Help: "Signals draind delivered to old processes, by signal name."}, []string{"signal"})
	m.rollbacks = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("rollbacks_total"),
		Help: "Handoffs rolled back (steering back to the old side, which was not signalled), by reason."}, []string{"reason"})
	m.collectErrs = prometheus.NewCounter(prometheus.CounterOpts{Name: f("collect_errors_total"),
		Help: "Scrapes in which draind could not read some of its figures (BPF counters, kernel counters, counts)."})
	build := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: f("build_info"),
		Help:        "draind's version and Go version; always 1.",
		ConstLabels: prometheus.Labels{"version": Version, "goversion": runtime.Version()}}, func() float64 { return 1 })

	m.descActive = prometheus.NewDesc(f("handoffs_in_progress"), "Handoffs in progress.", nil, nil)
	m.descInFlight = prometheus.NewDesc(f("inflight_connections"),
		"Connections a side of a handoff holds on a listener's port (accepted, not closed), as ss sees them.",
		[]string{"listener", "name", "netns", "role"}, nil)
	m.descQueued = prometheus.NewDesc(f("queued_connections"),
		"Connections waiting in the accept queue of a side's listener.", []string{"listener", "name", "netns", "role"}, nil)
	m.descDecision = prometheus.NewDesc(f("selector_decisions_total"),
		"The selector's decisions for new connections on a listener: steered (to the target side), fallback (to the other side: no target listener alive), migrated (off a closing listener), failed (left to the kernel: none of draind's listeners alive), probed (draind's readiness probe sent to the new side).",
		[]string{"listener", "name", "netns", "decision"}, nil)
	m.descMigrate = prometheus.NewDesc(f("kernel_tcp_migrate_requests_total"),
		"The kernel's count of connections migrated off closing listeners (TcpExt TCPMigrateReqSuccess/Failure), in a network namespace draind works in.",
		[]string{"netns", "result"}, nil)
	m.descOverflow = prometheus.NewDesc(f("kernel_listen_overflows_total"),
		"The kernel's count of accept queue overflows (TcpExt ListenOverflows), in a network namespace draind works in.",
		[]string{"netns"}, nil)
	m.descDeadline = prometheus.NewDesc(f("drain_deadline_timestamp_seconds"),
		"When the drain of the old side of a listener's handoff must end (Unix time); after it, the deadline policy applies.",
		[]string{"listener", "name", "netns"}, nil)
	m.descDrops = prometheus.NewDesc(f("kernel_listen_drops_total"),
		"The kernel's count of SYNs dropped by listeners (TcpExt ListenDrops), in a network namespace draind works in.",
		[]string{"netns"}, nil)

	m.Registry.MustRegister(m.started, m.finished, m.duration, m.drain, m.queueMoved, m.queueKept, m.queuePause, m.signals, m.rollbacks, m.collectErrs, build, m)
	if !opts.NoRuntime {
		m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	for _, r := range []string{ResultDrained, ResultTimedOut, ResultAborted, ResultRolledBack, ResultFailed} {
		m.finished.WithLabelValues(r) // every result has a series from the start (rate() works from the first)
	}
	for _, r := range RollbackReasons {
		m.rollbacks.WithLabelValues(r)
	}
	return m
}

// Started records a handoff whose steering began.
func (m *Metrics) Started() { m.started.Inc() }

// SignalSent records a signal delivered to an old process, when it is sent.
func (m *Metrics) SignalSent(signal string) { m.signals.WithLabelValues(signal).Inc() }

// Finished records a handoff's end: its result, how long it took from its request, how long its drain took (0: it
// did not drain) and its rollback reason ("": none).
func (m *Metrics) Finished(result string, took, drain time.Duration, rollback string) {
	m.finished.WithLabelValues(result).Inc()
	m.duration.Observe(took.Seconds())
	if drain > 0 {
		m.drain.Observe(drain.Seconds())
	}
	if rollback != "" {
		m.rollbacks.WithLabelValues(rollback).Inc()
	}
}

// QueueMoved records a move of the old side's accept queues: the connections moved and how long the old side's
// processes were stopped for it.
func (m *Metrics) QueueMoved(n int, paused time.Duration) {
	m.queueMoved.Add(float64(n))
	m.queuePause.Observe(paused.Seconds())
}

// QueueKept records connections that waited in the old side's accept queues after the flip and that it accepted
// itself soon enough for draind not to move them.
func (m *Metrics) QueueKept(n int) {
	m.queueKept.Add(float64(n))
}

// Describe implements prometheus.Collector for the scrape-time families.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.descActive, m.descInFlight, m.descQueued, m.descDecision, m.descMigrate, m.descOverflow, m.descDrops, m.descDeadline} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: it reads the source and the kernel's counters now.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	if m.source == nil {
		ch <- prometheus.MustNewConstMetric(m.descActive, prometheus.GaugeValue, 0)
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	snap, err := m.source.Snapshot()
	failed := err != nil
	for _, l := range snap.Listeners {
		ns := strconv.FormatUint(l.Netns, 10)
		for _, side := range []struct {
			role string
			c    Count
		}{{"old", l.Old}, {"new", l.New}} {
			ch <- prometheus.MustNewConstMetric(m.descInFlight, prometheus.GaugeValue, float64(side.c.InFlight), l.Addr, l.Name, ns, side.role)
			ch <- prometheus.MustNewConstMetric(m.descQueued, prometheus.GaugeValue, float64(side.c.Queued), l.Addr, l.Name, ns, side.role)
		}
		for i, d := range decisions {
			ch <- prometheus.MustNewConstMetric(m.descDecision, prometheus.CounterValue, float64(l.Selector[i]), l.Addr, l.Name, ns, d)
		}
		if !l.Deadline.IsZero() {
			ch <- prometheus.MustNewConstMetric(m.descDeadline, prometheus.GaugeValue, float64(l.Deadline.UnixNano())/1e9, l.Addr, l.Name, ns)
		}
	}
	seen := map[uint64]bool{}
	for _, n := range snap.Netns {
		st, err := os.Stat(fmt.Sprintf("%s/%d/ns/net", m.procRoot, n.PID))
		if err != nil {
			failed = true
			continue
		}
		ino := st.Sys().(*syscall.Stat_t).Ino
		if seen[ino] {
			continue
		}
		seen[ino] = true
		v, err := m.netstat(n.PID)
		if err != nil {
			failed = true
			continue
		}
		ns := strconv.FormatUint(ino, 10)
		ch <- prometheus.MustNewConstMetric(m.descMigrate, prometheus.CounterValue, v["TCPMigrateReqSuccess"], ns, "success")
		ch <- prometheus.MustNewConstMetric(m.descMigrate, prometheus.CounterValue, v["TCPMigrateReqFailure"], ns, "failure")
		ch <- prometheus.MustNewConstMetric(m.descOverflow, prometheus.CounterValue, v["ListenOverflows"], ns)
		ch <- prometheus.MustNewConstMetric(m.descDrops, prometheus.CounterValue, v["ListenDrops"], ns)
	}
	ch <- prometheus.MustNewConstMetric(m.descActive, prometheus.GaugeValue, float64(snap.Handoffs))
	if failed {
		m.collectErrs.Inc()
	}
}

// netstat reads the TcpExt counters of the network namespace process pid is in.
func (m *Metrics) netstat(pid int) (map[string]float64, error) {
	f, err := os.Open(fmt.Sprintf("%s/%d/net/netstat", m.procRoot, pid))
	if err != nil {
		return nil, fmt.Errorf("read kernel counters: %w", err)
	}
	defer f.Close()
	return proc.ParseTcpExt(f)
}

// Handler serves the registry (OpenMetrics if the scraper asks for it); errors of the HTTP layer go to log.
func (m *Metrics) Handler(log *slog.Logger) http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		EnableOpenMetrics: true,
		Registry:          m.Registry,
	})
}
