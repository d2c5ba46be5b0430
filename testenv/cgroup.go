package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	dproc "github.com/draind/draind/proc"
)

// CgroupForTest creates a child cgroup v2 for the test (processes can start in it: ServerOptions.Cgroup) and removes
// it at cleanup, once the test's processes are gone. Without cgroup v2 the test fails in CI and is skipped elsewhere.
func CgroupForTest(t testing.TB) string {
	t.Helper()
	root, err := dproc.Cgroup2Root()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("testenv: %v", err)
		}
		t.Skipf("testenv: %v", err)
	}
	b := make([]byte, 4)
	rand.Read(b)
	dir := filepath.Join(root, "draind-test-"+hex.EncodeToString(b))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		// Registered before the test starts processes in it, so this runs after they were killed; their exit may
		// take a moment to be reflected.
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
				if err != nil && !errors.Is(err, os.ErrNotExist) {
					t.Errorf("remove cgroup %s: %v", dir, err)
				}
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return dir
}
