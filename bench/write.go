package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Write writes the results under dir: results.md (the tables), results.json (every run's figures) and the SVG plots
// of the first repeat. It returns the Markdown document.
func Write(dir string, r *Results) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create results dir: %w", err)
	}
	plots := map[string]string{}
	put := func(name string, data []byte) error {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
		return nil
	}
	var storm, queue []timelinePanel
	for _, c := range r.Contenders {
		for _, s := range r.Storm {
			if s.Contender == c.Key && s.Repeat == 0 && s.timeline != nil {
				storm = append(storm, timelinePanel{Label: c.Label, Report: s.timeline, Marks: s.marks})
			}
		}
		for _, s := range r.Queue {
			if s.Contender == c.Key && s.Repeat == 0 && s.timeline != nil {
				queue = append(queue, timelinePanel{Label: c.Label, Report: s.timeline, Marks: s.marks})
			}
		}
	}
	if len(storm) > 0 {
		if err := put("storm.svg", timelineSVG("Scenario 1: new-connection storm, an upgrade every second (first repeat)", storm)); err != nil {
			return "", err
		}
		plots[ScenarioStorm] = "storm.svg"
	}
	if len(queue) > 0 {
		if err := put("queue.svg", timelineSVG("Scenario 2: accept-queue torture (first repeat)", queue)); err != nil {
			return "", err
		}
		plots[ScenarioQueue] = "queue.svg"
	}
	for _, d := range r.Datapath {
		if d.Repeat != 0 || d.timeline == nil {
			continue
		}
		if err := put("datapath.svg", rateSVG("Scenario 5: one server, with and without draind's selector, then its counter (first repeat)", d.timeline, d.phases)); err != nil {
			return "", err
		}
		plots[ScenarioDatapath] = "datapath.svg"
	}
	md := r.Markdown(plots)
	if err := put("results.md", []byte(md)); err != nil {
		return "", err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", fmt.Errorf("encode results: %w", err)
	}
	if err := put("results.json", append(js, '\n')); err != nil {
		return "", err
	}
	return md, nil
}
