package bench

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/draind/draind/testenv"
)

func TestMain(m *testing.M) {
	RunChildIfRequested()
	os.Exit(m.Run())
}

// TestSmokeStorm runs scenario 1 once, briefly, for tableflip and draind, (e) and (f) (the contenders with the most
// moving parts: a server that re-executes itself across upgrades, and handoffs), and writes the results.
func TestSmokeStorm(t *testing.T) {
	testenv.Require(t)
	p := DefaultParams(false)
	p.Repeats = 1
	p.Storm = StormParams{Duration: 3 * time.Second, Every: time.Second, Concurrency: 8}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	res, err := Run(ctx, Config{
		Params:     p,
		Scenarios:  []string{ScenarioStorm},
		Contenders: []string{Tableflip, Draind, DraindFlip},
		Command:    "go test -run TestSmokeStorm ./bench",
		Logger:     slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Errors) > 0 {
		t.Errorf("runs reported errors: %v", res.Errors)
	}
	if len(res.Storm) != 3 {
		t.Fatalf("%d storm runs, want 3", len(res.Storm))
	}
	for _, s := range res.Storm {
		if s.Upgrades < 2 || len(s.Switches) != s.Upgrades || s.OK == 0 {
			t.Errorf("%s: %d upgrades (%d timed), %d answered; want 2 upgrades and answers", s.Contender, s.Upgrades, len(s.Switches), s.OK)
		}
		// Every generation answered: the load saw each upgrade reach a new process.
		if n := len(s.timeline.Servers); n != s.Upgrades+1 {
			t.Errorf("%s: answers from %d server generations, want %d: %v", s.Contender, n, s.Upgrades+1, s.timeline.Servers)
		}
		for i, w := range s.Switches {
			if w.CommandToAllNew < 0 || w.Total <= 0 {
				t.Errorf("%s: upgrade %d not timed: %+v", s.Contender, i, w)
			}
			if isDraind(s.Contender) && (w.CommandToFlip <= 0 || w.CommandToSteer <= 0 || w.CommandToSteer > w.CommandToFlip) {
				t.Errorf("%s: upgrade %d: steering at %d ns, flip at %d ns after the command", s.Contender, i, w.CommandToSteer, w.CommandToFlip)
			}
			if want := draindSignalAt[s.Contender]; w.SignalAt != want {
				t.Errorf("%s: upgrade %d: handoff signalled at %q, want %q", s.Contender, i, w.SignalAt, want)
			}
		}
		// (f) signals the old net/http server at the flip: its Shutdown may drop a request it reads afterwards.
		if s.Contender == Draind && s.Failed != 0 {
			t.Errorf("%s: %d failed connections (%v): %v", s.Contender, s.Failed, s.Failures, s.Samples)
		}
	}
	dir := t.TempDir()
	md, err := Write(dir, res)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"results.md", "results.json", "storm.svg"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("missing %s: %v", f, err)
		}
	}
	if !strings.Contains(md, "| (d) tableflip") || !strings.Contains(md, "| (e) draind") || !strings.Contains(md, "| (f) draind, signal at flip") {
		t.Errorf("results.md lacks a contender row:\n%s", md)
	}
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
