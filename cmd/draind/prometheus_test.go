package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/draind/draind/dashboards"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/testenv"
)

// promServer is a Prometheus server (Debian's package) started by a test, scraping draind every second.
type promServer struct {
	t   testing.TB
	api string // http://127.0.0.1:PORT/api/v1
}

// startPrometheus runs Prometheus on loopback with a 1 s scrape of draind's metrics at target, and draind's alert
// rules loaded.
func startPrometheus(t testing.TB, target string) *promServer {
	t.Helper()
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	rules, err := filepath.Abs("../../deploy/prometheus/draind-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: draind
    static_configs:
      - targets: [%q]
`, rules, target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("prometheus", "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr, "--log.level=warn")
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("prometheus log:\n%s", logs.String())
		}
	})
	p := &promServer{t: t, api: "http://" + addr + "/api/v1"}
	testenv.WaitFor(t, 30*time.Second, func() bool {
		r, err := http.Get("http://" + addr + "/-/ready")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	})
	return p
}

// promSeries is one series of a query result.
type promSeries struct {
	Metric map[string]string `json:"metric"`
	Values [][2]any          `json:"values"` // range queries and range-vector instant queries: [ts, "value"]
	Value  [2]any            `json:"value"`  // instant vector queries
}

// get runs an API query and returns its result series.
func (p *promServer) get(path string, params url.Values) []promSeries {
	p.t.Helper()
	r, err := http.Get(p.api + path + "?" + params.Encode())
	if err != nil {
		p.t.Fatal(err)
	}
	defer r.Body.Close()
	var out struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []promSeries `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(r.Body).Decode(&out); err != nil {
		p.t.Fatalf("prometheus %s %v: %v", path, params, err)
	}
	if out.Status != "success" {
		p.t.Fatalf("prometheus %s %v: %s", path, params, out.Error)
	}
	return out.Data.Result
}

// checkRules checks that Prometheus loaded draind's alert rules and evaluates them without error.
func (p *promServer) checkRules() {
	p.t.Helper()
	r, err := http.Get(p.api + "/rules")
	if err != nil {
		p.t.Fatal(err)
	}
	defer r.Body.Close()
	var out struct {
		Data struct {
			Groups []struct {
				Rules []struct {
					Name, Health, LastError string
				} `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	if err := json.NewDecoder(r.Body).Decode(&out); err != nil {
		p.t.Fatal(err)
	}
	n := 0
	for _, g := range out.Data.Groups {
		for _, rule := range g.Rules {
			n++
			if rule.Health != "ok" {
				p.t.Errorf("alert rule %s: health %q %s", rule.Name, rule.Health, rule.LastError)
			}
		}
	}
	if n < 4 {
		p.t.Errorf("prometheus loaded %d alert rules, want draind's 4", n)
	}
}

// samples are the raw (timestamp, value) samples of a series.
func samples(s promSeries) (ts []float64, vs []float64) {
	for _, v := range s.Values {
		t, _ := v[0].(float64)
		f, _ := strconv.ParseFloat(fmt.Sprint(v[1]), 64)
		ts, vs = append(ts, t), append(vs, f)
	}
	return ts, vs
}

// TestPrometheusDashboard: a real Prometheus scrapes the daemon every second during a handoff under load. Every
// query of the Grafana dashboard (its variables substituted) returns data over the run, the alert rules load, and the
// old side's in-flight series, above zero during the drain, is zero at every scrape from the one where the signal
// is counted on (while the old process takes its time to exit) until it goes with the handoff.
func TestPrometheusDashboard(t *testing.T) {
	testenv.RequireCommand(t, "prometheus", "promtool")
	ns, pins := setup(t)
	d := startDaemon(t, newDaemonDir(t), pins)
	murl, err := url.Parse(d.metricsURL())
	if err != nil {
		t.Fatal(err)
	}
	prom := startPrometheus(t, murl.Host)
	testenv.WaitFor(t, 30*time.Second, func() bool {
		r := prom.get("/query", url.Values{"query": {`up{job="draind"} == 1`}})
		return len(r) == 1
	})
	start := time.Now()

	// The old server takes 3 s to stop after its SIGTERM: scrapes see the handoff between the signal and the exit.
	old := server(t, ns, "old", testenv.ServerOptions{ExitDelay: 3 * time.Second})
	load := testenv.StartLoadForTest(t, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: 8, Duration: 30 * time.Second,
		KeepAlive: 4, KeepAliveEvery: 50 * time.Millisecond, KeepAliveFor: 5 * time.Second,
	})
	time.Sleep(300 * time.Millisecond)
	newS := server(t, ns, "new", testenv.ServerOptions{})
	h := startHandoff(t, append(daemonArgs(d, old, newS), "--name", "web")...)
	out, code := h.wait(t, 30*time.Second)
	time.Sleep(4 * time.Second) // a few more scrapes after the end
	r, err := load.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if code != exitOK || out.Outcome != handoff.OutcomeDrained {
		t.Fatalf("handoff: exit %d, %+v", code, out.Result)
	}
	requireNoFailures(t, r)
	end := time.Now()

	_, panels, err := dashboards.Parse(dashboards.JSON)
	if err != nil {
		t.Fatal(err)
	}
	rng := url.Values{"start": {strconv.FormatInt(start.Unix(), 10)}, "end": {strconv.FormatInt(end.Unix()+1, 10)}, "step": {"1"}}
	for _, p := range panels {
		for _, q := range p.Queries {
			expr := dashboards.Substitute(q, "draind", "4s") // Grafana's $__rate_interval: 4 scrape intervals
			params := url.Values{"query": {expr}}
			for k, v := range rng {
				params[k] = v
			}
			res := prom.get("/query_range", params)
			n := 0
			for _, s := range res {
				n += len(s.Values)
			}
			if n == 0 {
				t.Errorf("panel %q: %s returned no data", p.Title, expr)
			} else {
				t.Logf("panel %q: %d series, %d points: %s", p.Title, len(res), n, expr)
			}
		}
	}
	prom.checkRules()

	// Raw samples, as scraped.
	window := fmt.Sprintf("[%ds]", int(end.Sub(start).Seconds())+5)
	at := url.Values{"time": {strconv.FormatInt(end.Unix()+1, 10)}}
	query := func(q string) []promSeries {
		params := url.Values{"query": {q + window}}
		for k, v := range at {
			params[k] = v
		}
		return prom.get("/query", params)
	}
	sig := query(`draind_signals_sent_total{job="draind",signal="SIGTERM"}`)
	inflight := query(`draind_inflight_connections{job="draind",role="old",listener="127.0.0.1:8080",name="web",netns="` + netnsLabel(t, ns) + `"}`)
	if len(sig) != 1 || len(inflight) != 1 {
		t.Fatalf("%d signal series, %d old in-flight series; want one each", len(sig), len(inflight))
	}
	sts, svs := samples(sig[0])
	signalledAt := -1.0
	for i, v := range svs {
		if v >= 1 {
			signalledAt = sts[i]
			break
		}
	}
	its, ivs := samples(inflight[0])
	before, after := 0, 0
	for i, v := range ivs {
		switch {
		case signalledAt >= 0 && its[i] >= signalledAt:
			after++
			if v != 0 {
				t.Errorf("at %v, when the signal was already counted, the old side had %v connections in flight", its[i], v)
			}
		case v > 0:
			before++
		}
	}
	t.Logf("old side in flight: %v (at %v); signal counted from %v", ivs, its, signalledAt)
	if signalledAt < 0 || before == 0 || after == 0 {
		t.Fatalf("signal counted at %v; %d scrapes with connections in flight before it, %d after: the drain and the signal were not both observed", signalledAt, before, after)
	}
}
