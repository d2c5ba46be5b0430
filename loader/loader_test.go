package loader

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// openFresh opens the maps under a pin directory of their own, /sys/fs/bpf/NAME, emptied first; the maps are closed
// and the directory removed when the test ends.
func openFresh(tb testing.TB, name string) (*Objects, string) {
	tb.Helper()
	testenv.Require(tb)
	dir := filepath.Join("/sys/fs/bpf", name)
	os.RemoveAll(dir)
	tb.Cleanup(func() { os.RemoveAll(dir) })
	o, err := Open(Options{PinDir: dir})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { o.Close() })
	return o, dir
}

// TestOpenPinsAndRemoves: Open creates and pins the maps, a second Open reuses the pins, a selector copy loads
// (the verifier accepts it), and RemoveUnusedPins leaves nothing behind while no group is in use.
func TestOpenPinsAndRemoves(t *testing.T) {
	a, dir := openFresh(t, "draind-loader-test")
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
	if removed, err := a.RemoveUnusedPins(); err != nil || removed {
		t.Fatalf("second removal: %v %v", removed, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("second removal left the pin dir: %v", err)
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
	o, _ := openFresh(b, "draind-loader-bench")
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

// TestUnusedSeesSockets: a filled socket slot that no group points at (a draind that died between its two writes)
// keeps the maps in use, and frees them when its listener closes.
func TestUnusedSeesSockets(t *testing.T) {
	o, _ := openFresh(t, "draind-loader-test-unused")
	if unused, err := o.Unused(); err != nil || !unused {
		t.Fatalf("fresh maps: unused %v, %v", unused, err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			unix.Close(fd)
		}
	}()
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	if err := o.Sockets.Update(uint32(MaxSockets-1), uint64(fd), ebpf.UpdateNoExist); err != nil {
		t.Fatal(err)
	}
	if unused, err := o.Unused(); err != nil || unused {
		t.Fatalf("socket in the last slot: unused %v, %v", unused, err)
	}
	if err := o.GroupKeys.Put(uint32(MaxGroups-1), GroupKey{NetnsCookie: 42}); err != nil {
		t.Fatal(err)
	}
	if unused, err := o.Unused(); err != nil || unused {
		t.Fatalf("last group allocated: unused %v, %v", unused, err)
	}
	if err := o.GroupKeys.Put(uint32(MaxGroups-1), GroupKey{}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	closed = true
	if unused, err := o.Unused(); err != nil || !unused {
		t.Fatalf("listener closed: unused %v, %v", unused, err)
	}
}

// TestLockChecksPins: Lock restores pins another draind removed, accepts its own pins again without reopening
// them, and refuses pins recreated for other maps, also after it remembered the old ones.
func TestLockChecksPins(t *testing.T) {
	a, dir := openFresh(t, "draind-loader-test-pins")
	lock := func() error {
		unlock, err := a.Lock()
		if err == nil {
			unlock()
		}
		return err
	}
	mapID := func(m *ebpf.Map) ebpf.MapID {
		t.Helper()
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		return id
	}
	pinnedID := func(name string) ebpf.MapID {
		t.Helper()
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		return mapID(m)
	}
	for range 3 { // check, remember, then accept by the pin files alone
		if err := lock(); err != nil {
			t.Fatal(err)
		}
	}

	// Another draind removes the pins as unused: the next Lock pins a's maps again, and the one after accepts them.
	b, err := Open(Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if removed, err := b.RemoveUnusedPins(); err != nil || !removed {
		t.Fatalf("remove pins: %v %v", removed, err)
	}
	b.Close()
	for range 2 {
		if err := lock(); err != nil {
			t.Fatalf("restore pins: %v", err)
		}
	}
	if got, want := pinnedID(selectorMapGroups), mapID(a.Groups); got != want {
		t.Fatalf("restored pin holds map %d, want %d", got, want)
	}

	// The pins are removed and recreated for other maps: Lock refuses them.
	c, err := Open(Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if removed, err := c.RemoveUnusedPins(); err != nil || !removed {
		t.Fatalf("remove pins: %v %v", removed, err)
	}
	c.Close()
	d, err := Open(Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := lock(); err == nil {
		t.Fatal("Lock accepted pins of other maps")
	}
}

// BenchmarkCleanup: the loader's share of the clean-up at the end of a handoff, with nothing in use: Unused, Lock
// (pins unchanged), and the end of a handoff run by the command: the steering's Lock (which restores the pins the
// previous round removed), then the handoff's RemoveUnusedPins.
// go test -run '^$' -bench Cleanup -benchtime 200x ./loader
func BenchmarkCleanup(b *testing.B) {
	o, _ := openFresh(b, "draind-loader-bench-cleanup")
	lock := func() {
		unlock, err := o.Lock()
		if err != nil {
			b.Fatal(err)
		}
		unlock()
	}
	b.Run("unused", func(b *testing.B) {
		for b.Loop() {
			if unused, err := o.Unused(); err != nil || !unused {
				b.Fatalf("unused: %v %v", unused, err)
			}
		}
	})
	b.Run("lock", func(b *testing.B) {
		for b.Loop() {
			lock()
		}
	})
	b.Run("end", func(b *testing.B) {
		for b.Loop() {
			lock()
			if removed, err := o.RemoveUnusedPins(); err != nil || !removed {
				b.Fatalf("remove: %v %v", removed, err)
			}
		}
	})
}
