package bench

import (
	"fmt"
	"html"
	"math"
	"strings"
	"time"
)

// timelinePanel is one contender's run in a timeline plot.
type timelinePanel struct {
	Label  string
	Report *LoadReport
	Marks  []int64 // CLOCK_MONOTONIC of the switch commands
}

const (
	svgWidth  = 960
	svgLeft   = 230 // room for the labels
	svgRight  = 20
	plotWidth = svgWidth - svgLeft - svgRight
	maxSteps  = plotWidth // at most one step per pixel
)

// svgDoc accumulates an SVG document.
type svgDoc struct {
	b strings.Builder
}

func (d *svgDoc) f(format string, a ...any) { fmt.Fprintf(&d.b, format, a...) }

func (d *svgDoc) text(x, y float64, anchor, class, s string) {
	d.f(`<text x="%.1f" y="%.1f" text-anchor="%s" class="%s">%s</text>`+"\n", x, y, anchor, class, html.EscapeString(s))
}

func svgHeader(d *svgDoc, height int, title string) {
	d.f(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif">`+"\n", svgWidth, height, svgWidth, height)
	d.f(`<style>.t{font-size:15px;font-weight:bold}.l{font-size:12px}.s{font-size:10px;fill:#555}.ax{stroke:#999;stroke-width:1}.g{stroke:#e4e4e4;stroke-width:1}.mk{stroke:#1f5fbf;stroke-width:1;stroke-dasharray:3,3}</style>` + "\n")
	d.f(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	d.text(10, 22, "start", "t", title)
}

// svgLegend writes the legend line under the title.
func svgLegend(d *svgDoc, s string) { d.text(10, 40, "start", "s", s) }

// step is a group of consecutive timeline buckets drawn as one x position.
type step struct {
	failed  int
	ok      int
	connP99 int64 // the largest per-bucket p99 in the step
	reqP99  int64
}

func steps(r *LoadReport, per int) []step {
	var out []step
	for i := 0; i < len(r.Buckets); i += per {
		var s step
		for _, b := range r.Buckets[i:min(i+per, len(r.Buckets))] {
			s.failed += b.Failed
			s.ok += b.OK
			s.connP99 = max(s.connP99, b.ConnP99)
			s.reqP99 = max(s.reqP99, b.ReqP99)
		}
		out = append(out, s)
	}
	return out
}

// latency scale of the plots: log10 from 10 µs to 10 s.
const (
	latLo = 1e4
	latHi = 1e10
)

func latY(ns int64, top, h float64) float64 {
	v := math.Log10(min(max(float64(ns), latLo), latHi))
	return top + h - (v-math.Log10(latLo))/(math.Log10(latHi)-math.Log10(latLo))*h
}

// timelineSVG plots, for each panel, the failed attempts per step (bars) and the p99 connect and request latency
// per step (lines, log scale), with the switch commands as dashed lines. All panels share the time axis (seconds
// since their load started).
func timelineSVG(title string, panels []timelinePanel) []byte {
	const failH, latH, gap, top = 44.0, 80.0, 34.0, 56.0
	span := int64(0)
	bucket := int64(0)
	for _, p := range panels {
		if p.Report != nil && p.Report.BucketNS > 0 {
			span = max(span, int64(len(p.Report.Buckets))*p.Report.BucketNS)
			bucket = max(bucket, p.Report.BucketNS)
		}
	}
	height := int(top + float64(len(panels))*(failH+latH+gap) + 10)
	var d svgDoc
	svgHeader(&d, height, title)
	if span == 0 {
		d.f("</svg>\n")
		return []byte(d.b.String())
	}
	per := max(1, int(math.Ceil(float64(span/bucket)/maxSteps)))
	stepNS := bucket * int64(per)
	xOf := func(ns int64) float64 { return svgLeft + float64(ns)/float64(span)*plotWidth }
	svgLegend(&d, fmt.Sprintf("x: seconds since the load started; step %s. Red bars: failed attempts per step. Lines (log scale): connect p99 (black) and request p99 (grey) per step. Blue dashes: switch commands.", time.Duration(stepNS)))
	y := top
	for _, p := range panels {
		r := p.Report
		d.text(10, y+16, "start", "l", p.Label)
		if r == nil || r.BucketNS != bucket {
			d.text(10, y+32, "start", "s", "no timeline")
			y += failH + latH + gap
			continue
		}
		ss := steps(r, per)
		maxFail := 0
		total := 0
		for _, s := range ss {
			maxFail = max(maxFail, s.failed)
			total += s.failed
		}
		d.text(10, y+32, "start", "s", fmt.Sprintf("%d failed in total, at most %d per step", total, maxFail))
		// Failure bars.
		d.f(`<line class="ax" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", svgLeft, y+failH, svgWidth-svgRight, y+failH)
		if maxFail > 0 {
			w := math.Max(plotWidth/float64(len(ss)), 1)
			for i, s := range ss {
				if s.failed == 0 {
					continue
				}
				h := math.Max(float64(s.failed)/float64(maxFail)*failH, 1.5)
				d.f(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#d62728"/>`+"\n", xOf(int64(i)*stepNS), y+failH-h, w, h)
			}
		}
		// Latency lines.
		lt := y + failH + 6
		for _, g := range []struct {
			ns    int64
			label string
		}{{1e5, "100µs"}, {1e6, "1ms"}, {1e7, "10ms"}, {1e8, "100ms"}, {1e9, "1s"}} {
			gy := latY(g.ns, lt, latH)
			d.f(`<line class="g" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", svgLeft, gy, svgWidth-svgRight, gy)
			d.text(svgLeft-4, gy+3, "end", "s", g.label)
		}
		for _, line := range []struct {
			color string
			val   func(step) int64
		}{{"#999", func(s step) int64 { return s.reqP99 }}, {"#000", func(s step) int64 { return s.connP99 }}} {
			var pts []string
			for i, s := range ss {
				v := line.val(s)
				if v <= 0 {
					continue
				}
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(int64(i)*stepNS+stepNS/2), latY(v, lt, latH)))
			}
			if len(pts) > 0 {
				d.f(`<polyline fill="none" stroke="%s" stroke-width="1" points="%s"/>`+"\n", line.color, strings.Join(pts, " "))
			}
		}
		for _, m := range p.Marks {
			x := xOf(m - r.StartMono)
			d.f(`<line class="mk" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f"/>`+"\n", x, y, x, lt+latH)
		}
		y += failH + latH + gap
	}
	// Time axis.
	secs := float64(span) / 1e9
	tick := 1.0
	for secs/tick > 12 {
		tick *= 2
	}
	for s := 0.0; s <= secs+1e-9; s += tick {
		x := xOf(int64(s * 1e9))
		d.f(`<line class="ax" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f"/>`+"\n", x, y-gap+8, x, y-gap+12)
		d.text(x, y-gap+24, "middle", "s", fmt.Sprintf("%gs", s))
	}
	d.f("</svg>\n")
	return []byte(d.b.String())
}

// ratePhase is a named time range of a rate plot.
type ratePhase struct {
	Label      string
	From, Till int64 // CLOCK_MONOTONIC
}

// rateSVG plots the answered attempts per second of a load report (per 100 ms) with its phases shaded.
func rateSVG(title string, r *LoadReport, phases []ratePhase) []byte {
	const top, h = 70.0, 220.0
	var d svgDoc
	svgHeader(&d, int(top+h+60), title)
	if r == nil || r.BucketNS <= 0 || len(r.Buckets) == 0 {
		d.f("</svg>\n")
		return []byte(d.b.String())
	}
	per := max(1, int(100*time.Millisecond)/int(r.BucketNS))
	ss := steps(r, per)
	stepSec := float64(int64(per)*r.BucketNS) / 1e9
	span := float64(int64(len(r.Buckets)) * r.BucketNS)
	xOf := func(ns float64) float64 { return svgLeft + ns/span*plotWidth }
	maxRate := 0.0
	for _, s := range ss {
		maxRate = max(maxRate, float64(s.ok)/stepSec)
	}
	if maxRate == 0 {
		maxRate = 1
	}
	maxRate *= 1.1
	yOf := func(v float64) float64 { return top + h - v/maxRate*h }
	for _, p := range phases {
		x0, x1 := xOf(float64(p.From-r.StartMono)), xOf(float64(p.Till-r.StartMono))
		fill := "#f2f2f2"
		switch {
		case strings.Contains(p.Label, "counter"):
			fill = "#fbe3cc"
		case strings.HasPrefix(p.Label, "attached"):
			fill = "#dbe8fb"
		}
		d.f(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x0, top, math.Max(x1-x0, 0), h, fill)
		switch {
		case strings.Contains(p.Label, ","):
			d.text(x1, top-6, "end", "s", p.Label)
		case len(phases) <= 6:
			d.text((x0+x1)/2, top-6, "middle", "s", p.Label)
		}
	}
	svgLegend(&d, "Answered connections per second, per 100 ms; x: seconds since the load started. Blue: selector attached; grey: no selector; orange: selector attached and draind's counter loaded.")
	for _, g := range []float64{0.25, 0.5, 0.75, 1} {
		v := maxRate / 1.1 * g
		gy := yOf(v)
		d.f(`<line class="g" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", svgLeft, gy, svgWidth-svgRight, gy)
		d.text(svgLeft-4, gy+3, "end", "s", fmt.Sprintf("%.0f/s", v))
	}
	var pts []string
	for i, s := range ss {
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf((float64(i)+0.5)*stepSec*1e9), yOf(float64(s.ok)/stepSec)))
	}
	d.f(`<polyline fill="none" stroke="#000" stroke-width="1.2" points="%s"/>`+"\n", strings.Join(pts, " "))
	d.f(`<line class="ax" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", svgLeft, top+h, svgWidth-svgRight, top+h)
	secs := span / 1e9
	tick := 1.0
	for secs/tick > 12 {
		tick *= 2
	}
	for s := 0.0; s <= secs+1e-9; s += tick {
		d.text(xOf(s*1e9), top+h+16, "middle", "s", fmt.Sprintf("%gs", s))
	}
	d.f("</svg>\n")
	return []byte(d.b.String())
}
