package loader

import (
	"net"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/testenv"
)

// TestWatchEvents: the event programs run only while attached (they cost every TCP connection of the host): a
// connection accepted after LoadCounter (which attaches them) or WatchEvents(true) runs accept4's and the state
// program; one after WatchEvents(false) runs none of them. The kernel's run counts say so.
func TestWatchEvents(t *testing.T) {
	testenv.Require(t)
	c, err := LoadCounter(CounterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
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
	runs := func() [2]uint64 {
		t.Helper()
		var n [2]uint64 // accept, state
		for i, ps := range [][]*ebpf.Program{{c.objs.DraindAccept, c.objs.DraindAccept4}, {c.objs.DraindState}} {
			for _, p := range ps {
				st, err := p.Stats()
				if err != nil {
					t.Fatal(err)
				}
				n[i] += st.RunCount
			}
		}
		return n
	}
	accept := func() {
		t.Helper()
		cl, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		s, err := ln.Accept() // accept4(2)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	for i, step := range []struct {
		on   bool
		want bool // the connection ran the programs
	}{{true, true}, {false, false}, {true, true}, {true, true}, {false, false}} {
		if i > 0 {
			if err := c.WatchEvents(step.on); err != nil {
				t.Fatal(err)
			}
		}
		before := runs()
		accept()
		after := runs()
		for k, name := range []string{"accept", "state"} {
			if ran := after[k] > before[k]; ran != step.want {
				t.Fatalf("step %d (attached: %v): a connection ran the %s programs: %v", i, step.on, name, ran)
			}
		}
	}
}

// BenchmarkWatchEvents: attaching the event programs, and detaching them (the kernel waits for the tracepoints'
// users to finish).
// go test -run '^$' -bench WatchEvents -benchtime 5x ./loader
func BenchmarkWatchEvents(b *testing.B) {
	testenv.Require(b)
	c, err := LoadCounter(CounterOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
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
