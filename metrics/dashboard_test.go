package metrics

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/draind/draind/dashboards"
	"github.com/draind/draind/testenv"
)

// TestDashboard: the dashboard parses strictly, has a stable uid, a datasource variable (not __inputs), job and
// instance variables; every query uses $__rate_interval for its ranges, parses (promtool, Prometheus's own parser)
// once the variables are substituted, and queries only metrics draind exports.
func TestDashboard(t *testing.T) {
	testenv.RequireCommand(t, "promtool")
	d, panels, err := dashboards.Parse(dashboards.JSON)
	if err != nil {
		t.Fatal(err)
	}
	var top map[string]json.RawMessage
	json.Unmarshal(dashboards.JSON, &top)
	if _, ok := top["__inputs"]; ok {
		t.Error("the dashboard has __inputs: use a datasource variable")
	}
	if d.Uid == nil || *d.Uid != "draind-overview" {
		t.Errorf("uid %v, want the stable draind-overview", d.Uid)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = string(v.Type)
	}
	for name, typ := range map[string]string{"datasource": "datasource", "job": "query", "instance": "query"} {
		if vars[name] != typ {
			t.Errorf("variable %s: type %q, want %q", name, vars[name], typ)
		}
	}
	if len(panels) < 8 {
		t.Errorf("%d panels, want the 8 or more the README lists", len(panels))
	}

	names := exported(t)
	metricRe := regexp.MustCompile(`draind_[a-z0-9_]+`)
	rangeRe := regexp.MustCompile(`\[[^\]]*\]`)
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	n := 0
	for _, p := range panels {
		title := p.Title
		for _, e := range p.Queries {
			for _, r := range rangeRe.FindAllString(e, -1) {
				if r != "[$__rate_interval]" {
					t.Errorf("panel %q: range %s: use [$__rate_interval]", title, r)
				}
			}
			if !strings.Contains(e, `job="$job"`) || !strings.Contains(e, `instance=~"$instance"`) {
				t.Errorf("panel %q: %s does not select $job and $instance", title, e)
			}
			ms := metricRe.FindAllString(e, -1)
			if len(ms) == 0 {
				t.Errorf("panel %q: %s queries no draind metric", title, e)
			}
			for _, m := range ms {
				if !slices.Contains(names, m) {
					t.Errorf("panel %q queries %s, which draind does not export", title, m)
				}
			}
			n++
			q, _ := json.Marshal(dashboards.Substitute(e, "draind", "1m"))
			fmt.Fprintf(&rules, "      - record: dashboard:query%d\n        expr: %s\n", n, q)
		}
	}
	file := filepath.Join(t.TempDir(), "queries.yml")
	if err := os.WriteFile(file, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("promtool", "check", "rules", file).CombinedOutput(); err != nil {
		t.Fatalf("promtool does not parse the dashboard's queries: %v\n%s", err, out)
	}
}
