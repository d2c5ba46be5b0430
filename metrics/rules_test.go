package metrics

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/draind/draind/testenv"
)

const rulesDir = "../deploy/prometheus"

// exported lists every family draind exports (with a source that has one handoff in progress), histogram and
// counter sample names included.
func exported(t *testing.T) []string {
	t.Helper()
	src := &source{}
	src.set(Snapshot{Handoffs: 1, Listeners: []Listener{{Addr: "127.0.0.1:80", Deadline: time.Now()}}, Netns: []Netns{{PID: os.Getpid()}}}, nil)
	m := New(Options{Source: src})
	m.SignalSent("SIGTERM")
	m.Finished(ResultDrained, time.Second, time.Second, "error")
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		n := mf.GetName()
		names = append(names, n, n+"_bucket", n+"_sum", n+"_count")
	}
	return names
}

// TestAlertRules: the alert rules pass promtool's check and its unit tests, and every draind metric they query is
// one draind exports.
func TestAlertRules(t *testing.T) {
	testenv.RequireCommand(t, "promtool")
	rules := filepath.Join(rulesDir, "draind-alerts.yml")
	for _, args := range [][]string{{"check", "rules", rules}, {"test", "rules", filepath.Join(rulesDir, "draind-alerts_test.yml")}} {
		if out, err := exec.Command("promtool", args...).CombinedOutput(); err != nil {
			t.Fatalf("promtool %v: %v\n%s", args, err, out)
		}
	}
	b, err := os.ReadFile(rules)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	names := exported(t)
	re := regexp.MustCompile(`draind_[a-z0-9_]+`)
	n := 0
	for _, g := range doc.Groups {
		for _, r := range g.Rules {
			n++
			for _, m := range re.FindAllString(r.Expr, -1) {
				if !slices.Contains(names, m) {
					t.Errorf("alert %s queries %s, which draind does not export", r.Alert, m)
				}
			}
		}
	}
	if n < 4 {
		t.Fatalf("%d rules, want the 4 the README lists", n)
	}
}
