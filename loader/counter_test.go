package loader

import (
	"net"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/testenv"
)

// counterForTest loads the counter for tb (which needs root and BPF) and closes it at cleanup.
func counterForTest(tb testing.TB) *Counter {
	tb.Helper()
	testenv.Require(tb)
	c, err := LoadCounter(CounterOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// TestWatchEvents: the event program runs only while attached (it costs every TCP connection of the host): a
// connection after LoadCounter (which attaches it) or WatchEvents(true) runs it; one after WatchEvents(false) does
// not. The kernel's run counts say so.
func TestWatchEvents(t *testing.T) {
	c := counterForTest(t)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	runs := func() uint64 {
		t.Helper()
		n, _, err := c.EventStats()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	connect := func() {
		t.Helper()
		cl, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	for i, step := range []struct {
		on   bool
		want bool // the connection ran the program
	}{{true, true}, {false, false}, {true, true}, {true, true}, {false, false}} {
		if i > 0 {
			if err := c.WatchEvents(step.on); err != nil {
				t.Fatal(err)
			}
		}
		before := runs()
		connect()
		if ran := runs() > before; ran != step.want {
			t.Fatalf("step %d (attached: %v): a connection ran the state program: %v", i, step.on, ran)
		}
	}
}

// BenchmarkWatchEvents: attaching the event program, and detaching it.
// go test -run '^$' -bench WatchEvents -benchtime 5x ./loader
func BenchmarkWatchEvents(b *testing.B) {
	c := counterForTest(b)
	for _, on := range []bool{true, false} {
		name := "detach"
		if on {
			name = "attach"
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				if err := c.WatchEvents(!on); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := c.WatchEvents(on); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
