package bench

import (
	"encoding/xml"
	"errors"
	"io"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/testenv"
)

func TestTableMarkdown(t *testing.T) {
	tb := Table{
		Title:  "T",
		Header: []string{"a", "long header"},
		Rows:   [][]string{{"µs|x", "1"}, {"only one"}},
		Notes:  []string{"note"},
	}
	want := "### T\n\n" +
		"| a        | long header |\n" +
		"|----------|-------------|\n" +
		`| µs\|x    | 1           |` + "\n" +
		"| only one |             |\n" +
		"\n- note\n"
	if got := tb.Markdown(); got != want {
		t.Errorf("Markdown:\n%s\nwant:\n%s", got, want)
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		got, want string
	}{
		{fmtNS(-1), "–"},
		{fmtNS(math.NaN()), "–"},
		{fmtNS(0), "0 ns"},
		{fmtNS(417), "417 ns"},
		{fmtNS(12_345), "12.3 µs"},
		{fmtNS(999_000), "999 µs"},
		{fmtNS(6_500_000), "6.5 ms"},
		{fmtNS(123_456_789), "123 ms"},
		{fmtNS(1_210_000_000), "1.21 s"},
		{fmtNS(123e9), "123 s"},
		{fmtCount(3), "3"},
		{fmtCount(2.5), "2.5"},
		{fmtPercent(0), "0"},
		{fmtPercent(0.001), "<0.01%"},
		{fmtPercent(6.5), "6.50%"},
		{fmtRatio(math.NaN()), "–"},
		{fmtRatio(0.98234), "0.982"},
		{fmtSpread(Spread{}, fmtCount), "–"},
		{fmtSpread(Spread{N: 3, Min: 2, Med: 2, Max: 2}, fmtCount), "2"},
		{fmtSpread(Spread{N: 3, Min: 1, Med: 2, Max: 5}, fmtCount), "2 (1–5)"},
		{kindsOf(), "none"},
		{kindsOf(loadFigures{Failures: map[string]int{failReset: 3, failRefused: 2}, NoAnswer: 1},
			loadFigures{Failures: map[string]int{failReset: 1}}), "refused 2, reset 4 (1 FIN before any answer)"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestParseResponse(t *testing.T) {
	ok := "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Server: g1\r\nConnection: close\r\n\r\ng1\n"
	if id, err := parseResponse([]byte(ok)); err != nil || id != "g1" {
		t.Errorf("parseResponse(ok) = %q, %v", id, err)
	}
	for _, bad := range []string{
		"HTTP/1.1 503 Service Unavailable\r\nX-Server: g1\r\n\r\ng1\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ng1\n",
		"HTTP/1.1 200 OK\r\nX-Server: g1\r\n\r\ng2\n",
		"HTTP/1.1 200 OK\r\nX-Server: g1\r\n",
		"garbage",
	} {
		_, err := parseResponse([]byte(bad))
		if testenv.Classify(err) != failWrong {
			t.Errorf("parseResponse(%q) = %v, want a wrong answer", bad, err)
		}
	}
}

func TestReadAll(t *testing.T) {
	buf := make([]byte, 4)
	if n, err := readAll(strings.NewReader("abc"), buf); n != 3 || err != nil {
		t.Errorf("readAll(abc) = %d, %v", n, err)
	}
	if _, err := readAll(strings.NewReader("abcdef"), buf); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("readAll(too long) = %v, want ErrUnexpectedEOF", err)
	}
}

func TestBuildReport(t *testing.T) {
	const ms = int64(time.Millisecond)
	w := &loadWorker{ids: []string{"g0", "g1"}}
	w.recs = []attempt{
		{start: 1000 + 1*ms, connNS: 100, totalNS: 500, server: 1},
		{start: 1000 + 2*ms, connNS: 300, totalNS: 700, server: 1},
		{start: 1000 + 12*ms, connNS: -1, totalNS: 50, fail: 1},              // refused
		{start: 1000 + 13*ms, connNS: 200, totalNS: 900, fail: 2, eof: true}, // FIN before any answer
		{start: 1000 + 25*ms, connNS: 400, totalNS: 800, server: 2},
		{start: 1000 + 26*ms, connNS: 100, totalNS: 600, server: 2},
	}
	rep := buildReport(LoadOptions{Bucket: 10 * time.Millisecond}, 1000, 1000+30*ms, 0, []*loadWorker{w})
	if rep.AfterMark != nil {
		t.Errorf("no mark, but AfterMark %+v", rep.AfterMark)
	}
	// A mark at 2ms+500ns: the attempt started at 2ms (answered 200ns after the mark) was in flight; the failed
	// ones do not count; the two answered at 25ms and 26ms follow.
	mark := 1000 + 2*ms + 500
	if am := buildReport(LoadOptions{Bucket: 10 * time.Millisecond}, 1000, 1000+30*ms, mark, []*loadWorker{w}).AfterMark; am == nil ||
		am.Mono != mark || am.Request.N != 3 || am.Request.Max != 800 || am.InFlight != 1 || am.LastInFlight != 200 {
		t.Errorf("AfterMark = %+v, want 3 answered (max 800ns), 1 in flight answered 200ns after the mark", am)
	}
	if rep.Requests != 6 || rep.OK != 4 || rep.Failed() != 2 || rep.Failures[failRefused] != 1 || rep.Failures[failReset] != 1 || rep.NoAnswer != 1 {
		t.Errorf("counts: %+v", rep)
	}
	if len(rep.Buckets) != 4 {
		t.Fatalf("%d buckets, want 4", len(rep.Buckets))
	}
	if b := rep.Buckets[1]; b.Attempts != 2 || b.Failed != 2 || b.OK != 0 || b.ConnMax != 200 {
		t.Errorf("bucket 1 = %+v", b)
	}
	if b := rep.Buckets[0]; b.ConnP99 != 300 || b.ReqP99 != 700 {
		t.Errorf("bucket 0 = %+v", b)
	}
	if rep.Connect.N != 5 || rep.Connect.Max != 400 || rep.Request.N != 4 || rep.Request.Max != 800 {
		t.Errorf("percentiles: connect %+v request %+v", rep.Connect, rep.Request)
	}
	if sp := rep.Servers["g0"]; sp.N != 2 || sp.FirstMono != 1000+ms || sp.LastMono != 1000+2*ms {
		t.Errorf("g0 = %+v", sp)
	}
	if sp := rep.Servers["g1"]; sp.N != 2 || sp.FirstMono != 1000+25*ms {
		t.Errorf("g1 = %+v", sp)
	}
	// Window: whole buckets only.
	if a, ok, cov := rep.Window(1000, 1000+20*ms); a != 4 || ok != 2 || cov != 20*time.Millisecond {
		t.Errorf("Window(0, 20ms) = %d, %d, %v", a, ok, cov)
	}
	if a, ok, cov := rep.Window(1000+5*ms, 1000+29*ms); a != 2 || ok != 0 || cov != 10*time.Millisecond {
		t.Errorf("Window(5ms, 29ms) = %d, %d, %v", a, ok, cov)
	}
}

func TestSwitchSample(t *testing.T) {
	rep := &LoadReport{Servers: map[string]ServerSpan{
		"g0": {N: 10, FirstMono: 0, LastMono: 130},
		"g1": {N: 5, FirstMono: 150, LastMono: 400},
	}}
	u := &upgrade{Old: &gen{ID: "g0"}, New: &gen{ID: "g1"}, StartMono: 100, CommandMono: 110, NewReadyMono: 140,
		FlipMono: 125, SteerMono: 120, OldExitMono: 300, Handoff: &handoff.Result{SignalAt: drain.SignalFlip}}
	got := switchSample(u, rep)
	want := SwitchSample{StartToFirstNew: 50, CommandToAllNew: 20, CommandToSteer: 10, CommandToFlip: 15, StartToReady: 40, Total: 200,
		SignalAt: drain.SignalFlip}
	if got != want {
		t.Errorf("switchSample = %+v, want %+v", got, want)
	}
	u.CommandMono = 200 // the old process answered nothing started after the command
	if got := switchSample(u, rep); got.CommandToAllNew != 0 {
		t.Errorf("CommandToAllNew = %d, want 0", got.CommandToAllNew)
	}
}

const signRow = "draind worse than tableflip beyond the noise on no figure (sign test over the repeats, one-sided, 5%)"

// TestSignTest checks the sign test of the targets: a figure is worse beyond the noise only when chance alone would
// make it worse in as many repeats at most 5% of the time (5 of 5; 9 of 10), ties left out.
func TestSignTest(t *testing.T) {
	for _, c := range []struct {
		n, k int
		want float64
	}{{5, 5, 1.0 / 32}, {5, 4, 6.0 / 32}, {10, 9, 11.0 / 1024}, {10, 8, 56.0 / 1024}, {3, 0, 1}, {0, 0, 1}} {
		if got := binomTail(c.n, c.k); math.Abs(got-c.want) > 1e-12 {
			t.Errorf("binomTail(%d, %d) = %v, want %v", c.n, c.k, got, c.want)
		}
	}
	row := func(r *Results) []string {
		t.Helper()
		for _, row := range r.Targets().Rows {
			if row[0] == signRow {
				return row
			}
		}
		t.Fatalf("no row %q in %v", signRow, r.Targets().Rows)
		return nil
	}
	r := fakeResultsN(5)
	// draind's connect p99 is half tableflip's: better in every repeat. Its rate: worse in 4 of 5 repeats, which is
	// noise (p = 6/32); the median is worse, so the row names it.
	for rep, s := range r.stormOf(Draind) {
		if rep < 4 {
			s.Rate = 4900
		} else {
			s.Rate = 5100
		}
	}
	want := []string{signRow, "on no figure (5 repeats compared); median worse within the noise on: (1) answered/s (worse in 4 of 5, p = 0.188)", "yes"}
	if got := row(r); !slices.Equal(got, want) {
		t.Errorf("worse in 4 of 5: row %q, want %q", got, want)
	}
	// Worse in every repeat: beyond the noise.
	r.stormOf(Draind)[4].Rate = 4900
	want = []string{signRow, "worse beyond the noise on: (1) answered/s (worse in 5 of 5, p = 0.031)", "no"}
	if got := row(r); !slices.Equal(got, want) {
		t.Errorf("worse in 5 of 5: row %q, want %q", got, want)
	}
	// A tie is left out: worse in 4 repeats, equal in the fifth, is 4 of 4 untied (p = 1/16, not beyond the noise).
	r.stormOf(Draind)[4].Rate = 5000
	want = []string{signRow, "on no figure (5 repeats compared); median worse within the noise on: (1) answered/s (worse in 4 of 5, p = 0.062)", "yes"}
	if got := row(r); !slices.Equal(got, want) {
		t.Errorf("worse in 4 of 5, one tie: row %q, want %q", got, want)
	}
}

// fakeResults is a small, made-up set of runs for the rendering tests.
func fakeResults() *Results { return fakeResultsN(2) }

// fakeResultsN is fakeResults with n repeats.
func fakeResultsN(n int) *Results {
	mk := func(c string, rep, failed int, p99 int64) *StormRun {
		return &StormRun{Contender: c, Repeat: rep, Upgrades: 5, loadFigures: loadFigures{
			Requests: 1000, OK: 1000 - failed, Failed: failed, Failures: map[string]int{failReset: failed},
			Rate: 5000, Connect: Percentiles{N: 1000, P99: p99, P999: 2 * p99}, Request: Percentiles{N: 1000, P99: 3 * p99},
		}, Switches: []SwitchSample{{CommandToAllNew: 5e6, CommandToFlip: 4e6, CommandToSteer: 3e6, StartToFirstNew: 1e6, StartToReady: 1e6, Total: 9e6}}}
	}
	r := &Results{
		Command:    "drainbench",
		Started:    time.Date(2026, 1, 2, 3, 4, 0, 0, time.UTC),
		Params:     DefaultParams(false),
		Contenders: []Contender{Contenders[1], Contenders[3], Contenders[4]},
	}
	r.Params.Repeats = n
	for rep := range n {
		r.Storm = append(r.Storm, mk(ReusePort, rep, 40+rep, 8e6), mk(Tableflip, rep, 0, 8e6), mk(Draind, rep, 0, 4e6))
	}
	r.Datapath = []*DatapathRun{{None: 1000, Attached: 990, Ratio: 0.99, Runs: 100, NsPerRun: 400, RunsPerConn: 1}}
	return r
}

func TestResultsMarkdown(t *testing.T) {
	r := fakeResults()
	md := r.Markdown(map[string]string{ScenarioStorm: "storm.svg"})
	for _, want := range []string{
		"Command: `drainbench`",
		"| (b) SO_REUSEPORT + SIGTERM | 5        | 40.5 (40–41)",
		"| (e) draind                 | 5        | 0 ",
		"![failures and connect latency over time, scenario 1, first repeat](storm.svg)",
		"| (1) connect p99                                                | 0.500",
		"| selector overhead ratio ≥ 0.98 (median)",
		"| draind: 0 failed connections in every scenario (all repeats) ",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("Markdown lacks %q:\n%s", want, md)
		}
	}
	st := r.Targets()
	met := map[string]string{}
	for _, row := range st.Rows {
		met[row[0]] = row[2]
	}
	if met["(b) shows failures in (1) or (2) (all repeats)"] != "yes" {
		t.Errorf("targets: %v", st.Rows)
	}
	if met["switch time ≤ 10 ms (draind, median: command → last connection answered by old)"] != "yes" {
		t.Errorf("targets: %v", st.Rows)
	}
	// Two repeats cannot tell a difference from noise: the sign test's row says so, and is not met.
	if row := met[signRow]; row != "no" {
		t.Errorf("targets: %v", st.Rows)
	}
	for _, row := range r.Targets().Rows {
		if row[0] == signRow && row[1] != "too few repeats to tell (the test needs 5) on: (1) failed (2); (1) connect p99 (2); (1) connect p99.9 (2); (1) answered/s (2); (4) switch (2)" {
			t.Errorf("target row %q", row)
		}
		if strings.HasPrefix(row[0], "(f)") {
			t.Errorf("target row for (f), which did not run: %v", row)
		}
	}
	if h := r.CompareTable().Header; !slices.Equal(h, []string{"figure", "draind / (d) tableflip", "draind / (b) SO_REUSEPORT"}) {
		t.Errorf("same-run ratios without (f): header %q", h)
	}
}

// TestTargetsDraindFlip checks (f)'s target rows and same-run ratios: its own figures, beside (e)'s, which stay as
// they were.
func TestTargetsDraindFlip(t *testing.T) {
	r := fakeResultsN(5)
	flip, ok := ContenderByKey(DraindFlip)
	if !ok || flip.Label != "(f) draind, signal at flip" {
		t.Fatalf("contender %q: %+v, %v", DraindFlip, flip, ok)
	}
	r.Contenders = append(r.Contenders, flip)
	for rep := range 5 {
		s := *r.stormOf(Draind)[rep]
		s.Contender = DraindFlip
		s.Connect.P99 = 2e6 // (f) / tableflip: 0.25
		r.Storm = append(r.Storm, &s)
	}
	const (
		eFailed = "draind: 0 failed connections in every scenario (all repeats)"
		eMedian = "draind no worse than tableflip on any figure (medians of scenarios 1–4)"
		eRepeat = signRow
		fFailed = "(f) draind-flip: 0 failed connections in every scenario (all repeats)"
		fMedian = "(f) draind-flip no worse than tableflip on any figure (medians of scenarios 1–4)"
		fRepeat = "(f) draind-flip worse than tableflip beyond the noise on no figure (sign test over the repeats, one-sided, 5%)"
	)
	targets := func() map[string][]string {
		rows := map[string][]string{}
		var order []string
		for _, row := range r.Targets().Rows {
			rows[row[0]] = row
			order = append(order, row[0])
		}
		// (f)'s rows follow (e)'s of the same kind.
		for _, p := range [][2]string{{eFailed, fFailed}, {eMedian, fMedian}, {eRepeat, fRepeat}} {
			if i, j := slices.Index(order, p[0]), slices.Index(order, p[1]); i < 0 || j < 0 || j < i {
				t.Errorf("target rows %q (at %d) and %q (at %d): %q", p[0], i, p[1], j, order)
			}
		}
		return rows
	}
	requireRows := func(want [][3]string) {
		t.Helper()
		rows := targets()
		for _, w := range want {
			if row := rows[w[0]]; !slices.Equal(row, w[:]) {
				t.Errorf("target row %q = %q, want %q", w[0], row, w)
			}
		}
	}
	requireRows([][3]string{
		{eFailed, "(1) 0", "yes"},
		{fFailed, "(1) 0", "yes"},
		{eMedian, "draind's median is no worse on any figure compared", "yes"},
		{fMedian, "(f) draind-flip's median is no worse on any figure compared", "yes"},
		{eRepeat, "on no figure (5 repeats compared)", "yes"},
		{fRepeat, "on no figure (5 repeats compared)", "yes"},
	})

	// (f) fails connections in both repeats; (e) is unchanged.
	for _, s := range r.stormOf(DraindFlip) {
		s.Failed = 3
	}
	// answered/s: better in two repeats, worse in three; so worse in the median, within the noise.
	for rep, rate := range []float64{6000, 3000, 6000, 3000, 3000} {
		r.stormOf(DraindFlip)[rep].Rate = rate
	}
	requireRows([][3]string{
		{eFailed, "(1) 0", "yes"},
		{fFailed, "(1) 15", "no"},
		{eMedian, "draind's median is no worse on any figure compared", "yes"},
		{fMedian, "(f) draind-flip's median is worse on: (1) failed; (1) answered/s (medians compared as they are, with no allowance for noise: see the same-run ratios)", "no"},
		{eRepeat, "on no figure (5 repeats compared)", "yes"},
		{fRepeat, "worse beyond the noise on: (1) failed (worse in 5 of 5, p = 0.031); median worse within the noise on: (1) answered/s (worse in 3 of 5, p = 0.500)", "no"},
	})

	ct := r.CompareTable()
	if want := []string{"figure", "draind / (d) tableflip", "draind / (b) SO_REUSEPORT",
		"(f) draind-flip / (d) tableflip", "(f) draind-flip / (b) SO_REUSEPORT"}; !slices.Equal(ct.Header, want) {
		t.Errorf("same-run ratios: header %q, want %q", ct.Header, want)
	}
	for _, row := range ct.Rows {
		if row[0] == "(1) connect p99" && !slices.Equal(row, []string{"(1) connect p99", "0.500", "0.500", "0.250", "0.250"}) {
			t.Errorf("same-run ratios: %q", row)
		}
	}
	if md := r.Markdown(nil); !strings.Contains(md, "| (f) draind, signal at flip | 5        | 3 ") {
		t.Errorf("Markdown lacks (f)'s storm row:\n%s", md)
	}
}

func TestSVGWellFormed(t *testing.T) {
	rep := &LoadReport{StartMono: 0, BucketNS: int64(10 * time.Millisecond)}
	for i := range 3000 { // more buckets than pixels: steps merge them
		b := Bucket{Attempts: 10, OK: 10, ConnP99: int64(50e3 + i), ReqP99: int64(2e6)}
		if i == 1500 {
			b.Failed, b.OK = 7, 3
		}
		rep.Buckets = append(rep.Buckets, b)
	}
	docs := map[string][]byte{
		"timeline": timelineSVG("a <title> & more", []timelinePanel{
			{Label: "(a) one", Report: rep, Marks: []int64{int64(15 * time.Second)}},
			{Label: "(b) none"},
		}),
		"empty": timelineSVG("empty", nil),
		"rate": rateSVG("rate", rep, []ratePhase{{Label: "attached", From: 0, Till: int64(10 * time.Second)},
			{Label: "none", From: int64(10 * time.Second), Till: int64(20 * time.Second)}}),
	}
	for name, doc := range docs {
		dec := xml.NewDecoder(strings.NewReader(string(doc)))
		for {
			_, err := dec.Token()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: not well-formed XML: %v\n%s", name, err, doc)
			}
		}
	}
	if s := string(docs["timeline"]); !strings.Contains(s, "a &lt;title&gt; &amp; more") || !strings.Contains(s, "7 failed in total") || !strings.Contains(s, `fill="#d62728"`) {
		t.Errorf("timeline SVG lacks the title, the failure count or a failure bar")
	}
}

// TestQueueFigures: scenario 2's targets compare what was answered after the switch command; runs without those
// figures (from before they existed) and scenario 3's "not applicable" (-1) are left out, not compared.
func TestQueueFigures(t *testing.T) {
	r := fakeResults()
	mk := func(c string, rep int, wholeP99, afterP99, last int64) *QueueRun {
		q := &QueueRun{Contender: c, Repeat: rep, loadFigures: loadFigures{Requests: 100, OK: 100, Request: Percentiles{N: 100, P99: wholeP99}}}
		if afterP99 > 0 {
			q.AfterCommand = &MarkFigures{Request: Percentiles{N: 90, P99: afterP99, P999: afterP99}, InFlight: 60, LastInFlight: last}
		}
		return q
	}
	for rep := range 2 {
		// draind's whole-run p99 is worse in both repeats, its p99 after the command is not; its queue clears later.
		r.Queue = append(r.Queue, mk(Tableflip, rep, 50e6, 9e6, 30e6), mk(Draind, rep, 150e6, 8e6, 200e6))
		// tableflip's old process exited before the last close (-1): nothing to compare draind's 5ms with.
		r.LongLived = append(r.LongLived, &LongRun{Contender: Tableflip, Repeat: rep, Conns: 10, LastCloseToExit: -1},
			&LongRun{Contender: Draind, Repeat: rep, Conns: 10, LastCloseToExit: 5e6})
	}
	// The figures on which draind did worse than tableflip in every repeat that has them.
	alwaysWorse := func() (figs []string) {
		for _, st := range r.signTests(Draind, Tableflip) {
			if st.worse == st.repeats {
				figs = append(figs, st.name)
			}
		}
		return figs
	}
	want := []string{"(2) command → last earlier connection answered"}
	if figs := alwaysWorse(); !slices.Equal(figs, want) {
		t.Errorf("worse in every repeat on %v, want %v", figs, want)
	}
	if figs := r.worseMedians(Draind, Tableflip); !slices.Equal(figs, want) {
		t.Errorf("worse medians on %v, want %v", figs, want)
	}
	// No connection opened before tableflip's command was answered after it: nothing to compare draind's with.
	for _, q := range r.queueOf(Tableflip) {
		q.AfterCommand.InFlight, q.AfterCommand.LastInFlight = 0, 0
	}
	if figs := alwaysWorse(); len(figs) != 0 {
		t.Errorf("none in flight at tableflip's command: worse in every repeat on %v", figs)
	}
	// The same runs without the after-command figures: nothing of scenario 2's latency is compared.
	for _, q := range r.Queue {
		q.AfterCommand = nil
	}
	if figs := alwaysWorse(); len(figs) != 0 {
		t.Errorf("without after-command figures: worse in every repeat on %v", figs)
	}
	md := r.QueueTable().Markdown()
	for _, want := range []string{"request p99 (whole run)", "| (e) draind                 | 0 ", "150 ms"} {
		if !strings.Contains(md, want) {
			t.Errorf("queue table lacks %q:\n%s", want, md)
		}
	}
}
