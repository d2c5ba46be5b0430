// Package dashboards holds draind's Grafana dashboard (draind.json, embedded) and reads it the strict way its tests
// need: every field checked against the Grafana schema (grafana-foundation-sdk), every panel query extracted.
package dashboards

import (
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
)

// JSON is dashboards/draind.json.
//
//go:embed draind.json
var JSON []byte

// Panel is one panel's title and PromQL queries.
type Panel struct {
	Title   string
	Queries []string
}

// Parse reads a dashboard strictly (unknown fields and wrong types are errors) and returns it with its panels'
// queries, in the dashboard's order. Every panel must be a plain panel with Prometheus queries on the datasource
// variable.
func Parse(raw []byte) (*dashboard.Dashboard, []Panel, error) {
	plugins.RegisterDefaultPlugins()
	var d dashboard.Dashboard
	if err := strict(d.UnmarshalJSONStrict(raw)); err != nil {
		return nil, nil, fmt.Errorf("parse dashboard: %w", err)
	}
	// The SDK (v0.0.22) drops panels and targets whose strict decoding succeeded: it mistakes its empty error list
	// for an error. Decode each of them again, strictly, on its own.
	var top struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(raw, &top); err != nil {
		return nil, nil, fmt.Errorf("parse dashboard: %w", err)
	}
	var out []Panel
	for i, rp := range top.Panels {
		var p dashboard.Panel
		if err := strict(p.UnmarshalJSONStrict(rp)); err != nil {
			return nil, nil, fmt.Errorf("parse dashboard: panel %d: %w", i, err)
		}
		if p.Type == "row" {
			return nil, nil, fmt.Errorf("parse dashboard: panel %d is a row; draind's dashboard has plain panels only", i)
		}
		panel := Panel{Title: fmt.Sprint(i)}
		if p.Title != nil {
			panel.Title = *p.Title
		}
		var pt struct {
			Targets []json.RawMessage `json:"targets"`
		}
		if err := json.Unmarshal(rp, &pt); err != nil {
			return nil, nil, fmt.Errorf("parse dashboard: panel %q: %w", panel.Title, err)
		}
		for j, rt := range pt.Targets {
			var q prometheus.Dataquery
			if err := strict(q.UnmarshalJSONStrict(rt)); err != nil {
				return nil, nil, fmt.Errorf("parse dashboard: panel %q: target %d: %w", panel.Title, j, err)
			}
			if q.Datasource == nil || q.Datasource.Type == nil || *q.Datasource.Type != "prometheus" ||
				q.Datasource.Uid == nil || *q.Datasource.Uid != "${datasource}" {
				return nil, nil, fmt.Errorf("parse dashboard: panel %q: target %d does not use the datasource variable", panel.Title, j)
			}
			panel.Queries = append(panel.Queries, q.Expr)
		}
		if len(panel.Queries) == 0 {
			return nil, nil, fmt.Errorf("parse dashboard: panel %q has no query", panel.Title)
		}
		out = append(out, panel)
	}
	if len(out) == 0 {
		return nil, nil, errors.New("parse dashboard: no panels")
	}
	return &d, out, nil
}

// strict turns the SDK's empty error list (a non-nil error) into nil.
func strict(err error) error {
	if be, ok := err.(cog.BuildErrors); ok && len(be) == 0 {
		return nil
	}
	return err
}

// Substitute replaces the dashboard's variables in a query as Grafana would for one job, every instance and a rate
// interval.
func Substitute(expr, job, rateInterval string) string {
	return strings.NewReplacer("$job", job, "$instance", ".*", "$__rate_interval", rateInterval).Replace(expr)
}
