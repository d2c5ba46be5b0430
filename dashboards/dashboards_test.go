package dashboards

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestParse: the shipped dashboard parses; a misspelt field anywhere, a wrong type, or a query not on the datasource
// variable is refused.
func TestParse(t *testing.T) {
	_, panels, err := Parse(JSON)
	if err != nil {
		t.Fatal(err)
	}
	if len(panels) == 0 || len(panels[0].Queries) == 0 {
		t.Fatalf("panels %+v", panels)
	}
	for _, c := range []struct {
		name, want string
		mutate     func(d map[string]any)
	}{
		{"dashboard field", "unexpected field", func(d map[string]any) { d["titel"] = "x" }},
		{"panel field", "unexpected field 'gridPoss'", func(d map[string]any) { panel(d)["gridPoss"] = map[string]any{} }},
		{"target field", "unexpected field 'exprr'", func(d map[string]any) { target(d)["exprr"] = "up" }},
		{"wrong type", "", func(d map[string]any) { panel(d)["gridPos"] = "top left" }},
		{"hard-coded datasource", "does not use the datasource variable", func(d map[string]any) {
			target(d)["datasource"] = map[string]any{"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
		}},
	} {
		var d map[string]any
		if err := json.Unmarshal(JSON, &d); err != nil {
			t.Fatal(err)
		}
		c.mutate(d)
		raw, _ := json.Marshal(d)
		_, _, err := Parse(raw)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
	if got := Substitute(`rate(x{job="$job",instance=~"$instance"}[$__rate_interval])`, "draind", "5s"); got != `rate(x{job="draind",instance=~".*"}[5s])` {
		t.Errorf("substitute: %s", got)
	}
}

func panel(d map[string]any) map[string]any { return d["panels"].([]any)[2].(map[string]any) }

func target(d map[string]any) map[string]any {
	return panel(d)["targets"].([]any)[0].(map[string]any)
}
