package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/draind/draind/handoff"
)

// stateVersion is the state file's format; a daemon refuses a file of another version rather than guess.
const stateVersion = 1

// record is one handoff in the state file.
type record struct {
	ID      string        `json:"id"`
	Name    string        `json:"name,omitempty"`
	UID     uint32        `json:"uid"`
	Started time.Time     `json:"started"`
	State   handoff.State `json:"state"`
}

type stateDoc struct {
	Version  int      `json:"version"`
	Handoffs []record `json:"handoffs"`
}

// stateFile is the daemon's record of the handoffs in progress, rewritten atomically (temporary file, fsync,
// rename, fsync of the directory) whenever one changes.
type stateFile struct {
	path string
	mu   sync.Mutex
	recs []record
}

func openState(dir string) (*stateFile, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	s := &stateFile{path: filepath.Join(dir, "handoffs.json")}
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state file: %w", err)
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("read state file %s: %w", s.path, err)
	}
	if doc.Version != stateVersion {
		return nil, fmt.Errorf("read state file %s: version %d, this draind knows %d", s.path, doc.Version, stateVersion)
	}
	s.recs = doc.Handoffs
	return s, nil
}

func (s *stateFile) records() []record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.recs)
}

// put adds or replaces a record and writes the file.
func (s *stateFile) put(r record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := slices.IndexFunc(s.recs, func(x record) bool { return x.ID == r.ID })
	if i < 0 {
		s.recs = append(s.recs, r)
	} else {
		s.recs[i] = r
	}
	return s.writeLocked()
}

// remove drops a record and writes the file.
func (s *stateFile) remove(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.recs)
	s.recs = slices.DeleteFunc(s.recs, func(x record) bool { return x.ID == id })
	if len(s.recs) == n {
		return nil
	}
	return s.writeLocked()
}

func (s *stateFile) writeLocked() error {
	b, err := json.MarshalIndent(stateDoc{Version: stateVersion, Handoffs: s.recs}, "", "  ")
	if err != nil {
		return fmt.Errorf("write state file: %w", err)
	}
	dir := filepath.Dir(s.path)
	f, err := os.CreateTemp(dir, ".handoffs-*.json")
	if err != nil {
		return fmt.Errorf("write state file: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write state file: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
