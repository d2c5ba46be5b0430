package loader

import (
	"errors"
	"github.com/cilium/ebpf"
	"os"
	"path/filepath"
	"testing"

	"github.com/draind/draind/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestOpenPinsAndRemoves: Open creates and pins the maps, a second Open reuses the pins, a selector copy loads
// (the verifier accepts it), and RemoveUnusedPins leaves nothing behind while no group is in use.
func TestOpenPinsAndRemoves(t *testing.T) {
	testenv.Require(t)
	dir := filepath.Join("/sys/fs/bpf", "draind-loader-test")
	os.RemoveAll(dir)
	t.Cleanup(func() { os.RemoveAll(dir) })

	a, err := Open(Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for _, name := range mapNames {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Fatalf("map %s not pinned: %v", name, err)
		}
	}
	b, err := Open(Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := a.Groups.Put(uint32(7), Group{TargetGen: 3}); err != nil {
		t.Fatal(err)
	}
	var g Group
	if err := b.Groups.Lookup(uint32(7), &g); err != nil || g.TargetGen != 3 {
		t.Fatalf("second Open does not share the pinned map: %+v %v", g, err)
	}
	a.Groups.Put(uint32(7), Group{})

	// A group's selector is loaded once and handed out as duplicates; another group gets its own.
	id := func(g uint32) ebpf.ProgramID {
		t.Helper()
		prog, err := a.LoadSelector(g)
		if err != nil {
			t.Fatalf("load selector: %+v", err)
		}
		defer prog.Close()
		info, err := prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := info.ID()
		return pid
	}
	first := id(5)
	if again, other := id(5), id(6); again != first || other == first {
		t.Fatalf("selector ids: group 5 %d then %d, group 6 %d; want one program per group, kept", first, again, other)
	}

	if err := a.GroupKeys.Put(uint32(1), GroupKey{NetnsCookie: 42}); err != nil {
		t.Fatal(err)
	}
	if removed, err := a.RemoveUnusedPins(); err != nil || removed {
		t.Fatalf("removed pins of a group in use: %v %v", removed, err)
	}
	a.GroupKeys.Put(uint32(1), GroupKey{})
	if removed, err := a.RemoveUnusedPins(); err != nil || !removed {
		t.Fatalf("unused pins not removed: %v %v", removed, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("pin dir left: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal("second Close failed")
	}
	if p, err := ebpf.NewProgramFromID(first); err == nil {
		p.Close()
		t.Fatalf("selector %d still loaded after Close", first)
	}
}

// TestCounterLifecycle: the counter loads and attaches, an unmarked system gives an empty snapshot, a blocked
// ReadEvent returns ErrClosed when the counter closes, and Close is safe twice.
func TestCounterLifecycle(t *testing.T) {
	testenv.Require(t)
	c, err := LoadCounter(CounterOptions{})
	if err != nil {
		t.Fatalf("load counter: %+v", err)
	}
	n := 0
	if err := c.Snapshot(func(*SockRec) { n++ }); err != nil || n != 0 {
		t.Fatalf("snapshot with nothing marked: %d records, %v", n, err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.ReadEvent()
		done <- err
	}()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadEvent after Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// BenchmarkLoadSelector: loading a group's selector (the verifier's work) against handing out the one a long-lived
// draind keeps loaded. go test -run '^$' -bench LoadSelector ./loader
func BenchmarkLoadSelector(b *testing.B) {
	testenv.Require(b)
	dir := filepath.Join("/sys/fs/bpf", "draind-loader-bench")
	os.RemoveAll(dir)
	b.Cleanup(func() { os.RemoveAll(dir) })
	o, err := Open(Options{PinDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	defer o.Close()
	b.Run("load", func(b *testing.B) {
		for b.Loop() {
			p, err := o.loadSelector(1)
			if err != nil {
				b.Fatal(err)
			}
			p.Close()
		}
	})
	b.Run("cached", func(b *testing.B) {
		for b.Loop() {
			p, err := o.LoadSelector(2)
			if err != nil {
				b.Fatal(err)
			}
			p.Close()
		}
	})
}
