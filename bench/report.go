package bench

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode/utf8"
)

// Table is a Markdown table with a heading and notes.
type Table struct {
	Title  string
	Notes  []string
	Header []string
	Rows   [][]string
}

// Markdown renders the table with its columns padded to equal width (readable as plain text too). A cell's "|" is
// escaped.
func (t Table) Markdown() string {
	ncol := len(t.Header)
	for _, r := range t.Rows {
		ncol = max(ncol, len(r))
	}
	cell := func(r []string, i int) string {
		if i < len(r) {
			return strings.ReplaceAll(r[i], "|", `\|`)
		}
		return ""
	}
	width := make([]int, ncol)
	for i := range ncol {
		width[i] = max(3, utf8.RuneCountInString(cell(t.Header, i)))
		for _, r := range t.Rows {
			width[i] = max(width[i], utf8.RuneCountInString(cell(r, i)))
		}
	}
	var b strings.Builder
	line := func(r []string) {
		b.WriteString("|")
		for i := range ncol {
			c := cell(r, i)
			b.WriteString(" " + c + strings.Repeat(" ", width[i]-utf8.RuneCountInString(c)) + " |")
		}
		b.WriteString("\n")
	}
	if t.Title != "" {
		b.WriteString("### " + t.Title + "\n\n")
	}
	line(t.Header)
	b.WriteString("|")
	for i := range ncol {
		b.WriteString(strings.Repeat("-", width[i]+2) + "|")
	}
	b.WriteString("\n")
	for _, r := range t.Rows {
		line(r)
	}
	if len(t.Notes) > 0 {
		b.WriteString("\n")
		for _, n := range t.Notes {
			b.WriteString("- " + n + "\n")
		}
	}
	return b.String()
}

// fmtNS formats a duration given in nanoseconds with about three significant digits; negative: "–".
func fmtNS(ns float64) string {
	switch {
	case ns < 0 || math.IsNaN(ns):
		return "–"
	case ns < 1e3:
		return fmt.Sprintf("%.0f ns", ns)
	case ns < 1e6:
		return trimZero(fmt.Sprintf("%.3g", ns/1e3)) + " µs"
	case ns < 1e9:
		return trimZero(fmt.Sprintf("%.3g", ns/1e6)) + " ms"
	}
	return trimZero(fmt.Sprintf("%.3g", ns/1e9)) + " s"
}

// trimZero turns "1e+02" style output of %g back into plain digits.
func trimZero(s string) string {
	if strings.ContainsAny(s, "e") {
		var f float64
		fmt.Sscan(s, &f)
		return fmt.Sprintf("%.0f", f)
	}
	return s
}

// fmtCount formats a count (a median of two counts may end in .5).
func fmtCount(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

func fmtRate(v float64) string { return fmt.Sprintf("%.0f", v) }

func fmtRatio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.3f", v)
}

func fmtPercent(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v < 0.01:
		return "<0.01%"
	}
	return fmt.Sprintf("%.2f%%", v)
}

// fmtSpread formats a spread as "median (min–max)", or the value alone when all repeats agree; "–" without values.
func fmtSpread(s Spread, f func(float64) string) string {
	switch {
	case s.N == 0:
		return "–"
	case s.Min == s.Max:
		return f(s.Med)
	}
	return fmt.Sprintf("%s (%s–%s)", f(s.Med), f(s.Min), f(s.Max))
}

// spreadOf collects one value per run (ok false: skip the run) and returns their spread.
func spreadOf[T any](runs []T, f func(T) (float64, bool)) Spread {
	var vs []float64
	for _, r := range runs {
		if v, ok := f(r); ok {
			vs = append(vs, v)
		}
	}
	return SpreadOf(vs)
}

// kindsOf sums the runs' failures by kind and renders the non-zero ones; of the resets, those that were a FIN
// before any answer are named.
func kindsOf(fs ...loadFigures) string {
	sum := map[string]int{}
	noAnswer := 0
	for _, f := range fs {
		for k, v := range f.Failures {
			sum[k] += v
		}
		noAnswer += f.NoAnswer
	}
	var out []string
	for _, k := range failKinds {
		switch {
		case sum[k] == 0:
		case k == failReset && noAnswer > 0:
			out = append(out, fmt.Sprintf("%s %d (%d FIN before any answer)", k, sum[k], noAnswer))
		default:
			out = append(out, fmt.Sprintf("%s %d", k, sum[k]))
		}
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

func filterRuns[T any](runs []T, keep func(T) bool) []T {
	var out []T
	for _, r := range runs {
		if keep(r) {
			out = append(out, r)
		}
	}
	return out
}

// has reports whether contender c is among the run's contenders.
func (r *Results) has(c string) bool {
	return slices.ContainsFunc(r.Contenders, func(x Contender) bool { return x.Key == c })
}

// draindVariants are the draind contenders that the targets and the same-run ratios are about, with the name their
// rows and columns give them ((e)'s keep the plain "draind" they had before (f) existed).
var draindVariants = []struct{ key, name string }{{Draind, "draind"}, {DraindFlip, "(f) draind-flip"}}

func (r *Results) stormOf(c string) []*StormRun {
	return filterRuns(r.Storm, func(s *StormRun) bool { return s.Contender == c && s.Requests > 0 })
}

func (r *Results) queueOf(c string) []*QueueRun {
	return filterRuns(r.Queue, func(s *QueueRun) bool { return s.Contender == c && s.Requests > 0 })
}

func (r *Results) longOf(c string) []*LongRun {
	return filterRuns(r.LongLived, func(s *LongRun) bool { return s.Contender == c && s.Conns > 0 })
}

func (s *StormRun) repeat() int { return s.Repeat }
func (s *QueueRun) repeat() int { return s.Repeat }
func (s *LongRun) repeat() int  { return s.Repeat }

// perRepeat turns a figure f of a scenario's runs (runsOf: a contender's) into the figure of contender c in repeat
// rep (false: c has no run in rep, or f has no value for it).
func perRepeat[R interface{ repeat() int }](runsOf func(string) []R, f func(R) (float64, bool)) func(c string, rep int) (float64, bool) {
	return func(c string, rep int) (float64, bool) {
		for _, s := range runsOf(c) {
			if s.repeat() == rep {
				return f(s)
			}
		}
		return 0, false
	}
}

// afterCommand is a figure of what a scenario 2 run answered after its switch command (false: none, or a run from
// before the figure existed).
func afterCommand(f func(*MarkFigures) (float64, bool)) func(*QueueRun) (float64, bool) {
	return func(s *QueueRun) (float64, bool) {
		if s.AfterCommand == nil || s.AfterCommand.Request.N == 0 {
			return 0, false
		}
		return f(s.AfterCommand)
	}
}

func afterP99(m *MarkFigures) (float64, bool)  { return float64(m.Request.P99), true }
func afterP999(m *MarkFigures) (float64, bool) { return float64(m.Request.P999), true }

// afterLastInFlight is from the command to the answer of the last connection opened before it; false: none was.
func afterLastInFlight(m *MarkFigures) (float64, bool) {
	return float64(m.LastInFlight), m.InFlight > 0
}

// always is a figure that every run has.
func always[R any](f func(R) float64) func(R) (float64, bool) {
	return func(s R) (float64, bool) { return f(s), true }
}

// figure is one figure of scenarios 1–4 on which the targets compare two contenders.
type figure struct {
	name         string
	higherBetter bool
	median       func(c string) Spread                   // over contender c's runs (for (4): its upgrades, pooled)
	inRepeat     func(c string, rep int) (float64, bool) // contender c's in repeat rep
}

func runFigure[R interface{ repeat() int }](name string, higherBetter bool, runsOf func(string) []R, f func(R) (float64, bool)) figure {
	return figure{name: name, higherBetter: higherBetter,
		median:   func(c string) Spread { return spreadOf(runsOf(c), f) },
		inRepeat: perRepeat(runsOf, f)}
}

// worse says whether value a is worse than b for this figure.
func (f figure) worse(a, b float64) bool {
	if f.higherBetter {
		return a < b
	}
	return a > b
}

// targetFigures are the figures the targets compare: what each scenario is about. Scenario 2's latencies are of
// what was answered after the switch command (the second of load before it is the same for every contender).
func (r *Results) targetFigures() []figure {
	switches := func(c string) Spread {
		var ss []SwitchSample
		for _, s := range r.stormOf(c) {
			ss = append(ss, s.Switches...)
		}
		return spreadOf(ss, func(s SwitchSample) (float64, bool) { return float64(s.CommandToAllNew), s.CommandToAllNew >= 0 })
	}
	return []figure{
		runFigure("(1) failed", false, r.stormOf, always(func(s *StormRun) float64 { return float64(s.Failed) })),
		runFigure("(1) connect p99", false, r.stormOf, always(func(s *StormRun) float64 { return float64(s.Connect.P99) })),
		runFigure("(1) connect p99.9", false, r.stormOf, always(func(s *StormRun) float64 { return float64(s.Connect.P999) })),
		runFigure("(1) answered/s", true, r.stormOf, always(func(s *StormRun) float64 { return s.Rate })),
		runFigure("(2) failed", false, r.queueOf, always(func(s *QueueRun) float64 { return float64(s.Failed) })),
		runFigure("(2) connect p99", false, r.queueOf, always(func(s *QueueRun) float64 { return float64(s.Connect.P99) })),
		runFigure("(2) request p99 after the command", false, r.queueOf, afterCommand(afterP99)),
		runFigure("(2) request p99.9 after the command", false, r.queueOf, afterCommand(afterP999)),
		runFigure("(2) command → last earlier connection answered", false, r.queueOf, afterCommand(afterLastInFlight)),
		runFigure("(3) cut", false, r.longOf, always(func(s *LongRun) float64 { return float64(s.Cut) })),
		runFigure("(3) last close → exit", false, r.longOf, func(s *LongRun) (float64, bool) { return float64(s.LastCloseToExit), s.LastCloseToExit >= 0 }),
		{name: "(4) switch", median: switches, inRepeat: perRepeat(r.stormOf, medianSwitch)},
	}
}

// medianSwitch is a storm run's median switch (command → last connection answered by old); false: none measured.
func medianSwitch(s *StormRun) (float64, bool) {
	var vs []float64
	for _, w := range s.Switches {
		if w.CommandToAllNew >= 0 {
			vs = append(vs, float64(w.CommandToAllNew))
		}
	}
	return SpreadOf(vs).Med, len(vs) > 0
}

func failedPct(f loadFigures) (float64, bool) {
	if f.Requests == 0 {
		return 0, false
	}
	return 100 * float64(f.Failed) / float64(f.Requests), true
}

// StormTable is scenario 1.
func (r *Results) StormTable() Table {
	p := r.Params.Storm
	t := Table{
		Title: fmt.Sprintf("Scenario 1: new-connection storm, an upgrade every %s during %s", p.Every, p.Duration),
		Header: []string{"contender", "upgrades", "failed connections", "failed %", "failures (all repeats)", "answered/s",
			"connect p99", "connect p99.9", "request p99"},
		Notes: []string{
			fmt.Sprintf("%d load workers in a separate process, each opening a new connection per request (HTTP/1.1, `Connection: close`) as fast as it can; after a failed attempt a worker waits 1 ms.", p.Concurrency),
			"connect = connect(2) until established, of the attempts whose connect succeeded; request = connect(2) until the whole answer, of the answered attempts.",
			"Failure kinds as testenv names them: refused (nothing listened), reset (RST, or a FIN before any byte of an answer), timeout, wrong. A FIN before any answer is what Go's net/http Server.Shutdown does to a connection whose request it reads after Shutdown began (net/http closes it without answering); the servers of (a)–(d) shut down that way on SIGTERM (testenv's server) or once tableflip's successor is ready (the tableflip example's pattern). (e) draind moves what waits in the old server's accept queue to the new server right after the flip, unless the old server accepts it itself within 10 ms (the old listener stays open), and signals the old server only once it holds no connection, accepted or queued; (f) signals it right after the flip, so the old server closes its listener then (what was still queued on it migrates to the new server through draind's selector) and shuts down with the connections it had accepted, net/http's way.",
		},
	}
	if !r.Long {
		t.Notes = append(t.Notes, fmt.Sprintf("Short run: %s of load with an upgrade every %s (the issue asks for a minute; `--long` runs %s).",
			p.Duration, p.Every, DefaultParams(true).Storm.Duration))
	}
	for _, c := range r.Contenders {
		runs := r.stormOf(c.Key)
		var kinds []loadFigures
		for _, s := range runs {
			kinds = append(kinds, s.loadFigures)
		}
		t.Rows = append(t.Rows, []string{
			c.Label,
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return float64(s.Upgrades), true }), fmtCount),
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return float64(s.Failed), true }), fmtCount),
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return failedPct(s.loadFigures) }), fmtPercent),
			kindsOf(kinds...),
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return s.Rate, true }), fmtRate),
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return float64(s.Connect.P99), s.Connect.N > 0 }), fmtNS),
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return float64(s.Connect.P999), s.Connect.N > 0 }), fmtNS),
			fmtSpread(spreadOf(runs, func(s *StormRun) (float64, bool) { return float64(s.Request.P99), s.Request.N > 0 }), fmtNS),
		})
	}
	return t
}

// SwitchTable is scenario 4, from scenario 1's upgrades.
func (r *Results) SwitchTable() Table {
	t := Table{
		Title: "Scenario 4: switch time (every upgrade of scenario 1, all repeats pooled)",
		Header: []string{"contender", "switch command", "command → last connection answered by old", "draind: command → selector attached", "draind: command → flip",
			"start → first connection on new", "start → new listening", "start → old exited", "upgrades"},
		Notes: []string{
			"command → last connection answered by old: from the switch command to the start (connect) of the last connection the old process answered; 0: none started after the command. Where nothing failed, every later connection went to the new process, so this is the switch as clients saw it; where connections failed (the old process's queue reset), some later ones went to the old process and failed. It is as fine as the load is dense (a connection every few hundred µs here).",
			"start: the upgrade's first step, starting the new process for (b), (c), (e) and (f); for (a) and (d) the start is the command.",
			"draind: command → selector attached ((e) and (f)) is when handoff.Run reports its steering stage (listeners discovered and paired, both sides' counts set up, selector attached with the old side as target); command → flip is handoff.Run's own CLOCK_MONOTONIC of the selector's flip. Before the flip, the new server (already listening with SO_REUSEPORT) gets its kernel-hash share of new connections until handoff.Run attaches the selector, which is why \"start → first connection on new\" is short for (e) and (f).",
		},
	}
	for _, c := range r.Contenders {
		var ss []SwitchSample
		for _, s := range r.stormOf(c.Key) {
			ss = append(ss, s.Switches...)
		}
		pick := func(f func(SwitchSample) int64) string {
			return fmtSpread(spreadOf(ss, func(s SwitchSample) (float64, bool) { v := f(s); return float64(v), v >= 0 }), fmtNS)
		}
		t.Rows = append(t.Rows, []string{
			c.Label, c.Command,
			pick(func(s SwitchSample) int64 { return s.CommandToAllNew }),
			pick(func(s SwitchSample) int64 { return s.CommandToSteer }),
			pick(func(s SwitchSample) int64 { return s.CommandToFlip }),
			pick(func(s SwitchSample) int64 { return s.StartToFirstNew }),
			pick(func(s SwitchSample) int64 { return s.StartToReady }),
			pick(func(s SwitchSample) int64 { return s.Total }),
			fmt.Sprint(len(ss)),
		})
	}
	return t
}

// QueueTable is scenario 2.
func (r *Results) QueueTable() Table {
	p := r.Params.Queue
	t := Table{
		Title: "Scenario 2: accept-queue torture (one upgrade of a slow-accepting old server)",
		Header: []string{"contender", "failed connections", "failures (all repeats)", "connect p99", "connect p99.9",
			"request p99 (whole run)", "after the command: request p99", "request p99.9", "earlier connections answered after the command: n, last", "command → old exited", "queued connections migrated (kernel)"},
		Notes: []string{
			fmt.Sprintf("The old server sleeps %s before each accept (backlog %d), so its accept queue holds most of the %d load workers' connections; on SIGTERM it closes its listener (what is still queued is reset unless migrated). The new server accepts at full speed (for (d), tableflip's successor).", p.AcceptDelay, p.Backlog, p.Concurrency),
			fmt.Sprintf("%s of load before the upgrade, %s after its start; request latency includes the wait in the accept queue. Failures are counted at the attempt's start, so a queued connection reset at the SIGTERM counts where it was opened.", p.Before, p.After),
			"after the command: of the attempts answered after the switch command, the second of load before it left out (the same slow server under the same load for every contender; whether its slow requests make up more than 1% of a whole run depends on how many fast ones follow, so the whole-run p99 jumps between the slow and the fast mode). earlier connections answered after the command: those opened before it (queued at the old listener, or being served, at the command), how many, and from the command to the last one's answer. The targets compare these figures.",
			"queued connections migrated: the namespace's TcpExt TCPMigrateReqSuccess counter (connections moved off a closing listener by the kernel, with tcp_migrate_req or draind's selector). results.json has more TcpExt counters per run.",
		},
	}
	for _, c := range r.Contenders {
		runs := r.queueOf(c.Key)
		var kinds []loadFigures
		for _, s := range runs {
			kinds = append(kinds, s.loadFigures)
		}
		t.Rows = append(t.Rows, []string{
			c.Label,
			fmtSpread(spreadOf(runs, func(s *QueueRun) (float64, bool) { return float64(s.Failed), true }), fmtCount),
			kindsOf(kinds...),
			fmtSpread(spreadOf(runs, func(s *QueueRun) (float64, bool) { return float64(s.Connect.P99), s.Connect.N > 0 }), fmtNS),
			fmtSpread(spreadOf(runs, func(s *QueueRun) (float64, bool) { return float64(s.Connect.P999), s.Connect.N > 0 }), fmtNS),
			fmtSpread(spreadOf(runs, func(s *QueueRun) (float64, bool) { return float64(s.Request.P99), s.Request.N > 0 }), fmtNS),
			fmtSpread(spreadOf(runs, afterCommand(afterP99)), fmtNS),
			fmtSpread(spreadOf(runs, afterCommand(afterP999)), fmtNS),
			fmtSpread(spreadOf(runs, afterCommand(func(m *MarkFigures) (float64, bool) { return float64(m.InFlight), true })), fmtCount) + ", " +
				fmtSpread(spreadOf(runs, afterCommand(afterLastInFlight)), fmtNS),
			fmtSpread(spreadOf(runs, func(s *QueueRun) (float64, bool) { return float64(s.CommandToExit), s.CommandToExit >= 0 }), fmtNS),
			fmtSpread(spreadOf(runs, func(s *QueueRun) (float64, bool) {
				v, ok := s.Kernel["TCPMigrateReqSuccess"]
				return float64(v), ok
			}), fmtCount),
		})
	}
	return t
}

// LongTable is scenario 3.
func (r *Results) LongTable() Table {
	p := r.Params.Long
	t := Table{
		Title:  fmt.Sprintf("Scenario 3: %d long-lived connections across one upgrade", p.Conns),
		Header: []string{"contender", "connections", "cut by the upgrade", "client's last close → old exited", "command → old exited"},
		Notes: []string{
			"The server is a raw TCP holder (testenv's, or the tableflip server in hold mode) that holds connections until the peer ends them, and closes everything on SIGTERM: a server without a graceful drain, like a streaming or websocket server whose connections never go idle.",
			fmt.Sprintf("The clients (a separate process) start closing their connections %s after the switch command and close them all evenly over %s. cut: connections the server side ended first (the client saw EOF or a reset).", p.CloseAfter, p.Spread),
			"client's last close → old exited: from the client's close(2) of its last connection (its clock) to the old process's exit seen through a pidfd; – when the old process had exited before (cutting connections).",
			"(f) signals the holder right after the flip, so it closes what it holds then: signal-at flip is for servers whose graceful shutdown answers every connection they accepted, which this holder is not.",
		},
	}
	for _, c := range r.Contenders {
		runs := r.longOf(c.Key)
		t.Rows = append(t.Rows, []string{
			c.Label,
			fmtSpread(spreadOf(runs, func(s *LongRun) (float64, bool) { return float64(s.Conns), true }), fmtCount),
			fmtSpread(spreadOf(runs, func(s *LongRun) (float64, bool) { return float64(s.Cut), true }), fmtCount),
			fmtSpread(spreadOf(runs, func(s *LongRun) (float64, bool) { return float64(s.LastCloseToExit), s.LastCloseToExit >= 0 }), fmtNS),
			fmtSpread(spreadOf(runs, func(s *LongRun) (float64, bool) { return float64(s.CommandToExit), s.CommandToExit >= 0 }), fmtNS),
		})
	}
	return t
}

// DatapathTable is scenario 5.
func (r *Results) DatapathTable() Table {
	p := r.Params.Datapath
	runs := filterRuns(r.Datapath, func(d *DatapathRun) bool { return d.Error == "" })
	t := Table{
		Title:  "Scenario 5: datapath cost of draind's selector and counter",
		Header: []string{"figure", fmt.Sprintf("median (min–max), %d repeats", len(runs))},
		Notes: []string{
			fmt.Sprintf("One server process under the same load throughout (%d workers opening a new connection per request as fast as they can), in %d pairs of alternating %s phases (%s left out at both ends of each): draind's selector attached (steer.Begin + Flip, then the other side's listener closed: the state at the end of every handoff) and detached (SO_DETACH_REUSEPORT_BPF; re-attached with SO_ATTACH_REUSEPORT_EBPF), then one phase of %s attached with the kernel's BPF run-time statistics on.", p.Concurrency, p.Pairs, p.Phase, p.Margin, statsPhases*p.Phase),
			fmt.Sprintf("Then, the selector still attached, draind's counter (drain.Tracker's BPF programs, loaded with loader.LoadCounter and closed between phases), in %d pairs of alternating phases loaded and not, then one phase of %s loaded with BPF statistics on; twice: counter idle (as a draind process keeps it between handoffs: its iterators loaded, no event program attached), then counter tracking (as while a handoff drains: its event program attached, the tp_btf program on TCP state changes, and the server's port watched). steer.Finish detaches the selector at the end. The counter's full cost during handoffs, snapshots and wakeups included, is in scenarios 1–3.", p.Pairs/2, statsPhases*p.Phase),
			"ratios: per repeat, the median over every two adjacent phases of one kind's answered/s over the other's (short alternating phases: drift cancels, and a burst of other load on the machine spoils only the pairs it falls in). The answered/s rows are over all phases of a kind.",
			"time per connection / machine CPU time per connection: the program's run time per answered connection × answered/s ÷ (CPUs × 1 s), in its statistics phase: the throughput it can cost when the machine is saturated, a figure the noisy ratios cannot resolve at this size.",
			"Run times: Δrun_time_ns / Δrun_cnt of the attached selector program (cilium/ebpf Program.Stats), and Δrun_time_ns of the counter's event program (loader.Counter.EventStats), over their statistics phases; statistics are switched on with BPF_ENABLE_STATS (the fd-scoped form of kernel.bpf_stats_enabled=1, so nothing stays on if the bench dies) and off again after each phase.",
		},
	}
	row := func(name string, f func(*DatapathRun) (float64, bool), fm func(float64) string) {
		t.Rows = append(t.Rows, []string{name, fmtSpread(spreadOf(runs, f), fm)})
	}
	pct := func(v float64) string { return fmt.Sprintf("%.3f%%", v) }
	row("answered/s, no selector", func(d *DatapathRun) (float64, bool) { return d.None, true }, fmtRate)
	row("answered/s, selector attached", func(d *DatapathRun) (float64, bool) { return d.Attached, true }, fmtRate)
	row("ratio attached / none", func(d *DatapathRun) (float64, bool) { return d.Ratio, d.Ratio > 0 }, fmtRatio)
	row("answered/s, selector attached + BPF statistics on", func(d *DatapathRun) (float64, bool) { return d.WithStats, true }, fmtRate)
	row("selector run time per run (kernel BPF statistics)", func(d *DatapathRun) (float64, bool) { return d.NsPerRun, d.Runs > 0 }, fmtNS)
	row("selector runs per connection", func(d *DatapathRun) (float64, bool) { return d.RunsPerConn, d.Runs > 0 }, func(v float64) string { return fmt.Sprintf("%.2f", v) })
	row("selector time per connection / machine CPU time per connection", func(d *DatapathRun) (float64, bool) { return d.CPUShare * 100, d.CPUShare > 0 }, pct)
	for _, k := range []struct {
		name string
		cc   func(*DatapathRun) *CounterCost
	}{{"counter idle", func(d *DatapathRun) *CounterCost { return &d.CounterIdle }},
		{"counter tracking", func(d *DatapathRun) *CounterCost { return &d.CounterTracking }}} {
		row("answered/s, "+k.name+": not loaded", func(d *DatapathRun) (float64, bool) { return k.cc(d).NotLoaded, k.cc(d).NotLoaded > 0 }, fmtRate)
		row("answered/s, "+k.name+": loaded", func(d *DatapathRun) (float64, bool) { return k.cc(d).Loaded, k.cc(d).Loaded > 0 }, fmtRate)
		row("ratio "+k.name+" loaded / not", func(d *DatapathRun) (float64, bool) { return k.cc(d).Ratio, k.cc(d).Ratio > 0 }, fmtRatio)
		row(k.name+": run time per connection (kernel BPF statistics, its event program)", func(d *DatapathRun) (float64, bool) { return k.cc(d).NsPerConn, k.cc(d).Runs > 0 }, fmtNS)
		row(k.name+": time per connection / machine CPU time per connection", func(d *DatapathRun) (float64, bool) { return k.cc(d).CPUShare * 100, k.cc(d).CPUShare > 0 }, pct)
	}
	row("failed connections (whole run)", func(d *DatapathRun) (float64, bool) { return float64(d.Failed), true }, fmtCount)
	return t
}

// CompareTable sets draind ((e), and (f) when it ran) beside tableflip and beside (b), run by run: each ratio is
// taken within one repeat (the contenders of a repeat run one after another), then summarized over the repeats.
func (r *Results) CompareTable() Table {
	t := Table{
		Title:  "Same-run ratios: draind's figure over another contender's (lower is better for draind)",
		Header: []string{"figure"},
		Notes:  []string{"Each ratio is taken between runs of the same repeat, then summarized as median (min–max) over the repeats."},
	}
	others := []string{Tableflip, ReusePort}
	type pair struct{ a, b string }
	var cols []pair
	for _, d := range draindVariants {
		if d.key != Draind && !r.has(d.key) { // (e)'s columns are always there, as before (f) existed
			continue
		}
		t.Header = append(t.Header, d.name+" / (d) tableflip", d.name+" / (b) SO_REUSEPORT")
		for _, o := range others {
			cols = append(cols, pair{d.key, o})
		}
	}
	type fig struct {
		name string
		val  func(c string, rep int) (float64, bool)
	}
	storm := func(f func(*StormRun) float64) func(string, int) (float64, bool) {
		return perRepeat(r.stormOf, always(f))
	}
	queue := func(f func(*QueueRun) float64) func(string, int) (float64, bool) {
		return perRepeat(r.queueOf, always(f))
	}
	figs := []fig{
		{"(1) connect p99", storm(func(s *StormRun) float64 { return float64(s.Connect.P99) })},
		{"(1) connect p99.9", storm(func(s *StormRun) float64 { return float64(s.Connect.P999) })},
		{"(1) request p99", storm(func(s *StormRun) float64 { return float64(s.Request.P99) })},
		{"(1) answered/s (higher is better)", storm(func(s *StormRun) float64 { return s.Rate })},
		{"(2) request p99 (whole run)", queue(func(s *QueueRun) float64 { return float64(s.Request.P99) })},
		{"(2) request p99 after the command", perRepeat(r.queueOf, afterCommand(afterP99))},
		{"(2) command → last earlier connection answered", perRepeat(r.queueOf, afterCommand(afterLastInFlight))},
		{"(4) command → last connection answered by old (median per run)", perRepeat(r.stormOf, medianSwitch)},
	}
	for _, f := range figs {
		row := []string{f.name}
		for _, col := range cols {
			var vs []float64
			for rep := range r.Params.maxRepeats() {
				a, ok1 := f.val(col.a, rep)
				b, ok2 := f.val(col.b, rep)
				if ok1 && ok2 && b > 0 {
					vs = append(vs, a/b)
				}
			}
			row = append(row, fmtSpread(SpreadOf(vs), fmtRatio))
		}
		t.Rows = append(t.Rows, row)
	}
	return t
}

// Targets checks the targets against this run's figures.
func (r *Results) Targets() Table {
	t := Table{Title: "The issue's targets, as measured in this run", Header: []string{"target", "measured", "met"}}
	yes := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}
	// failures sums contender c's failed connections over every run of scenarios (1) and (2), and with cut its cut
	// long-lived connections in (3), each as a part of the measured column.
	failures := func(c string, cut bool) (parts []string, total int) {
		add := func(format string, n, runs int) {
			if runs > 0 {
				total += n
				parts = append(parts, fmt.Sprintf(format, n))
			}
		}
		storm, queue := r.stormOf(c), r.queueOf(c)
		add("(1) %d", sumOf(storm, func(s *StormRun) int { return s.Failed }), len(storm))
		add("(2) %d", sumOf(queue, func(s *QueueRun) int { return s.Failed }), len(queue))
		if cut {
			long := r.longOf(c)
			add("(3) %d cut", sumOf(long, func(s *LongRun) int { return s.Cut }), len(long))
		}
		return parts, total
	}
	for _, d := range draindVariants {
		if !r.has(d.key) {
			continue
		}
		if parts, total := failures(d.key, true); len(parts) > 0 {
			t.Rows = append(t.Rows, []string{d.name + ": 0 failed connections in every scenario (all repeats)", strings.Join(parts, ", "), yes(total == 0)})
		}
	}
	if r.has(ReusePort) {
		if parts, total := failures(ReusePort, false); len(parts) > 0 {
			t.Rows = append(t.Rows, []string{"(b) shows failures in (1) or (2) (all repeats)", strings.Join(parts, ", "), yes(total > 0)})
		}
	}
	if runs := filterRuns(r.Datapath, func(d *DatapathRun) bool { return d.Error == "" }); len(runs) > 0 {
		s := spreadOf(runs, func(d *DatapathRun) (float64, bool) { return d.Ratio, d.Ratio > 0 })
		t.Rows = append(t.Rows, []string{"selector overhead ratio ≥ 0.98 (median)", fmtSpread(s, fmtRatio), yes(s.N > 0 && s.Med >= 0.98)})
	}
	if r.has(Draind) {
		var ss []SwitchSample
		for _, s := range r.stormOf(Draind) {
			ss = append(ss, s.Switches...)
		}
		if len(ss) > 0 {
			all := spreadOf(ss, func(s SwitchSample) (float64, bool) { return float64(s.CommandToAllNew), s.CommandToAllNew >= 0 })
			flip := spreadOf(ss, func(s SwitchSample) (float64, bool) { return float64(s.CommandToFlip), s.CommandToFlip >= 0 })
			t.Rows = append(t.Rows, []string{"switch time ≤ 10 ms (draind, median: command → last connection answered by old)",
				fmtSpread(all, fmtNS) + "; command → flip " + fmtSpread(flip, fmtNS), yes(all.N > 0 && all.Med <= 10e6)})
		}
	}
	for _, d := range draindVariants {
		if !r.has(d.key) || !r.has(Tableflip) {
			continue
		}
		measured := d.name + "'s median is no worse on any figure compared"
		worse := r.worseMedians(d.key, Tableflip)
		if len(worse) > 0 {
			measured = d.name + "'s median is worse on: " + strings.Join(worse, "; ") + " (medians compared as they are, with no allowance for noise: see the same-run ratios)"
		}
		t.Rows = append(t.Rows, []string{d.name + " no worse than tableflip on any figure (medians of scenarios 1–4)", measured, yes(len(worse) == 0)})

		// The same figures, repeat by repeat: a difference the machine's noise explains goes one way in some repeats
		// and the other way in others; one that is draind's goes its way in (nearly) every repeat.
		measured, ok := r.signVerdict(d.key, Tableflip)
		t.Rows = append(t.Rows, []string{d.name + " worse than tableflip beyond the noise on no figure (sign test over the repeats, one-sided, 5%)", measured, yes(ok)})
	}
	return t
}

// signTestMin is the fewest repeats compared on which the sign test of the targets can find a difference: with 4, a
// difference in every one of them is one that chance alone gives 6.25% of the time, more than signTestLevel.
const signTestMin = 5

// signTestLevel: a figure is worse beyond the noise when chance alone (the two contenders equal: in each repeat,
// which one does better is a coin toss) makes it worse in as many of the repeats at most this often.
const signTestLevel = 0.05

// signTest is the sign test of one target figure between two contenders.
type signTest struct {
	name                   string
	repeats, worse, better int     // repeats where both have the figure; of them, where the first did worse, better
	p                      float64 // the chance of doing worse in at least `worse` of the untied repeats, were they equal
}

// signTests runs the sign test on every target figure of contenders a and b that both have in some repeat.
func (r *Results) signTests(a, b string) []signTest {
	var out []signTest
	for _, f := range r.targetFigures() {
		st := signTest{name: f.name}
		for rep := range r.Params.maxRepeats() {
			va, ok1 := f.inRepeat(a, rep)
			vb, ok2 := f.inRepeat(b, rep)
			if !ok1 || !ok2 {
				continue
			}
			st.repeats++
			switch {
			case f.worse(va, vb):
				st.worse++
			case f.worse(vb, va):
				st.better++
			}
		}
		if st.repeats > 0 {
			st.p = binomTail(st.worse+st.better, st.worse)
			out = append(out, st)
		}
	}
	return out
}

// signVerdict says, for the target row, on which figures contender a is worse than b beyond the noise, and whether
// it is on none (false also when a figure had too few repeats to tell). It also names the figures whose median is
// worse within the noise.
func (r *Results) signVerdict(a, b string) (string, bool) {
	var worse, few, within []string
	minN, maxN := math.MaxInt, 0
	medianWorse := r.worseMedians(a, b)
	for _, st := range r.signTests(a, b) {
		minN, maxN = min(minN, st.repeats), max(maxN, st.repeats)
		desc := fmt.Sprintf("%s (worse in %d of %d, p = %.3f)", st.name, st.worse, st.repeats, st.p)
		switch {
		case st.repeats < signTestMin:
			few = append(few, fmt.Sprintf("%s (%d)", st.name, st.repeats))
		case st.p <= signTestLevel:
			worse = append(worse, desc)
		case slices.Contains(medianWorse, st.name):
			within = append(within, desc)
		}
	}
	if maxN == 0 {
		return "no figure compared", false
	}
	var parts []string
	if len(worse) > 0 {
		parts = append(parts, "worse beyond the noise on: "+strings.Join(worse, "; "))
	}
	if len(few) > 0 {
		parts = append(parts, fmt.Sprintf("too few repeats to tell (the test needs %d) on: %s", signTestMin, strings.Join(few, "; ")))
	}
	if len(parts) == 0 {
		reps := fmt.Sprint(minN)
		if maxN != minN {
			reps = fmt.Sprintf("%d–%d", minN, maxN)
		}
		parts = append(parts, fmt.Sprintf("on no figure (%s repeats compared)", reps))
	}
	if len(within) > 0 {
		parts = append(parts, "median worse within the noise on: "+strings.Join(within, "; "))
	}
	return strings.Join(parts, "; "), len(worse) == 0 && len(few) == 0
}

// binomTail is P(X ≥ k) for X binomial with n trials of probability 1/2.
func binomTail(n, k int) float64 {
	if k <= 0 {
		return 1
	}
	sum, c := 0.0, 1.0 // c: n choose i
	for i := 0; i <= n; i++ {
		if i >= k {
			sum += c
		}
		c = c * float64(n-i) / float64(i+1)
	}
	return sum / math.Pow(2, float64(n))
}

// worseMedians lists the target figures on which contender a's median is worse than contender b's, compared as
// they are.
func (r *Results) worseMedians(a, b string) (worse []string) {
	for _, f := range r.targetFigures() {
		ma, mb := f.median(a), f.median(b)
		if ma.N > 0 && mb.N > 0 && f.worse(ma.Med, mb.Med) {
			worse = append(worse, f.name)
		}
	}
	return worse
}

// ContenderTable lists the contenders.
func (r *Results) ContenderTable() Table {
	t := Table{Title: "Contenders", Header: []string{"contender", "how", "switch command (scenario 4)"}}
	for _, c := range r.Contenders {
		t.Rows = append(t.Rows, []string{c.Label, c.How, c.Command})
	}
	return t
}

// Markdown renders the whole results document. plots names the SVG files written beside it, by scenario key.
func (r *Results) Markdown(plots map[string]string) string {
	var b strings.Builder
	b.WriteString("# drainbench results\n\n")
	fmt.Fprintf(&b, "Command: `%s`  \n", r.Command)
	fmt.Fprintf(&b, "Started %s; wall time %s.  \n", r.Started.UTC().Format("2006-01-02 15:04 MST"), r.Wall.Round(time.Second))
	m := r.Machine
	fmt.Fprintf(&b, "Machine: %s, %d CPUs (%s), %s memory, %s.\n\n", m.Kernel, m.CPUs, m.CPU, m.Memory, m.Go)
	kind := "Short run"
	if r.Long {
		kind = "Long run"
	}
	reps := fmt.Sprint(r.Params.Repeats)
	if q := r.Params.RepeatsOf(ScenarioQueue); q != r.Params.Repeats {
		reps = fmt.Sprintf("%d (scenario 2: %d)", r.Params.Repeats, q)
	}
	fmt.Fprintf(&b, "%s: every figure is the median (min–max) over %s repeats, unless a table says otherwise; in each repeat the contenders run one after another, in an order rotated per repeat. Every run has its own network namespace, servers and load client processes. The machine is small and may be shared: absolute figures are noisy, ratios between contenders within one repeat are what to quote.\n\n", kind, reps)
	plot := func(key, alt string) {
		if f, ok := plots[key]; ok {
			fmt.Fprintf(&b, "\n![%s](%s)\n", alt, f)
		}
	}
	b.WriteString(r.ContenderTable().Markdown() + "\n")
	if len(r.Storm)+len(r.Queue)+len(r.LongLived)+len(r.Datapath) > 0 {
		b.WriteString(r.Targets().Markdown() + "\n")
	}
	if len(r.Storm) > 0 {
		b.WriteString(r.StormTable().Markdown())
		plot(ScenarioStorm, "failures and connect latency over time, scenario 1, first repeat")
		b.WriteString("\n" + r.SwitchTable().Markdown() + "\n")
	}
	if len(r.Queue) > 0 {
		b.WriteString(r.QueueTable().Markdown())
		plot(ScenarioQueue, "failures and latency over time, scenario 2, first repeat")
		b.WriteString("\n")
	}
	if len(r.LongLived) > 0 {
		b.WriteString(r.LongTable().Markdown() + "\n")
	}
	if len(r.Datapath) > 0 {
		b.WriteString(r.DatapathTable().Markdown())
		plot(ScenarioDatapath, "answered connections per second over the phases, scenario 5, first repeat")
		b.WriteString("\n")
	}
	if len(r.Storm) > 0 || len(r.Queue) > 0 {
		b.WriteString(r.CompareTable().Markdown() + "\n")
	}
	if errs := r.runErrors(); len(errs) > 0 {
		b.WriteString("### Runs that reported an error\n\n")
		for _, e := range errs {
			b.WriteString("- " + e + "\n")
		}
		b.WriteString("\n")
	}
	return b.String()
}

func (r *Results) runErrors() []string {
	errs := slices.Clone(r.Errors)
	sort.Strings(errs)
	return slices.Compact(errs)
}

// sumOf adds up f over xs.
func sumOf[T any](xs []T, f func(T) int) int {
	n := 0
	for _, x := range xs {
		n += f(x)
	}
	return n
}
