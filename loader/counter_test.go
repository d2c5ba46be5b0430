package loader

import (
	"net"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/testenv"
)

// TestWatchAccepts: the accept tracepoints run only while attached (a syscall tracepoint slows every syscall of the
// host): an accept after LoadCounter or after WatchAccepts(false) runs neither program; one after WatchAccepts(true)
// runs accept4's. The kernel's run counts say so.
func TestWatchAccepts(t *testing.T) {
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
	runs := func() uint64 {
		t.Helper()
		var n uint64
		for _, p := range []*ebpf.Program{c.objs.DraindAccept, c.objs.DraindAccept4} {
			st, err := p.Stats()
			if err != nil {
				t.Fatal(err)
			}
			n += st.RunCount
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
		want bool // the accept ran a program
	}{{false, false}, {true, true}, {true, true}, {false, false}} {
		if i > 0 {
			if err := c.WatchAccepts(step.on); err != nil {
				t.Fatal(err)
			}
		}
		before := runs()
		accept()
		if ran := runs() > before; ran != step.want {
			t.Fatalf("step %d (attached: %v): an accept ran the accept programs: %v", i, step.on, ran)
		}
	}
}
