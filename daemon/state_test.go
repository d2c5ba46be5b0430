package daemon

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/draind/draind/handoff"
	"github.com/draind/draind/metrics"
	"github.com/draind/draind/steer"
)

// TestStateFile: records survive a reopen (what a restarted daemon reads), removal rewrites the file, no temporary
// file is left, and a file of another version is refused rather than guessed at.
func TestStateFile(t *testing.T) {
	dir := t.TempDir()
	s, err := openState(dir)
	if err != nil {
		t.Fatal(err)
	}
	a := record{ID: "h-a", UID: 1000, Started: time.Unix(1700000000, 0).UTC(), State: handoff.State{
		Stage: handoff.StageFlipped, From: 10, To: 11, FromIno: 5, ToIno: 6, Ports: []uint16{8080},
		Groups:  []steer.GroupState{{ID: 3, Addr: "127.0.0.1:8080", OldGen: 1, NewGen: 2, Old: []steer.SlotState{{Cookie: 77, Slot: 4}}}},
		Timeout: time.Minute, FlippedAt: time.Unix(1700000001, 0).UTC(),
	}}
	b := record{ID: "h-b", State: handoff.State{Stage: handoff.StageSteering, From: 20, To: 21}}
	for _, r := range []record{a, b, a} {
		if err := s.put(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.remove("h-b"); err != nil {
		t.Fatal(err)
	}
	again, err := openState(dir)
	if err != nil {
		t.Fatal(err)
	}
	recs := again.records()
	if len(recs) != 1 || recs[0].ID != "h-a" || recs[0].State.Groups[0].Old[0].Cookie != 77 || !recs[0].State.FlippedAt.Equal(a.State.FlippedAt) {
		t.Fatalf("reopened: %+v", recs)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("state dir holds %v, want only handoffs.json", entries)
	}
	os.WriteFile(filepath.Join(dir, "handoffs.json"), []byte(`{"version": 99, "handoffs": []}`), 0o600)
	if _, err := openState(dir); err == nil || !strings.Contains(err.Error(), "version 99") {
		t.Fatalf("version 99: %v", err)
	}
}

// TestRollbackReasons: the metrics know every rollback cause a handoff can report (their series exist from the
// start).
func TestRollbackReasons(t *testing.T) {
	for _, c := range handoff.Causes {
		if !slices.Contains(metrics.RollbackReasons, string(c)) {
			t.Errorf("cause %q is not in metrics.RollbackReasons", c)
		}
	}
	if len(handoff.Causes) != len(metrics.RollbackReasons) {
		t.Errorf("%d causes, %d reasons", len(handoff.Causes), len(metrics.RollbackReasons))
	}
}
