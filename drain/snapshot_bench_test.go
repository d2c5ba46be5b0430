package drain_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
)

// BenchmarkSnapshot: the cost of one exact count of a process holding 19,000 connections (the most one process may
// hold on the development VM; DRAIND_BENCH_100K=1: a pre-fork server with 6 workers holding 100,002), with the full
// snapshot (which tags the sockets for the events) and the fast one. The clients' 19,000 (100,002) sockets live on
// the same machine, as they would next to a proxy.
//
//	go test -run '^$' -bench Snapshot ./drain
func BenchmarkSnapshot(b *testing.B) {
	testenv.Require(b)
	n, workers := 19_000, 0
	if os.Getenv("DRAIND_BENCH_100K") == "1" {
		n, workers = 100_002, 6
	}
	ns := testenv.NetNSForTest(b)
	h := testenv.StartHolderForTest(b, ns, testenv.HolderOptions{Addr: "127.0.0.1:8080", Backlog: 4096, Workers: workers})
	for i := range max(workers, 1) {
		testenv.StartConnsForTest(b, ns, testenv.ConnsOptions{Addr: "127.0.0.1:8080", N: n / max(workers, 1), SourceStart: fmt.Sprintf("127.%d.0.1", 10+i)})
	}
	tr, err := drain.NewTracker(drain.TrackerOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	p, err := proc.Open(h.PID)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	c, err := tr.Watch(p, []uint16{8080}, drain.WatchOptions{Track: true})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	for _, kind := range []struct {
		name  string
		count func() (drain.Count, error)
	}{
		{"full", c.FullCount}, // walks every file of every task, tags the sockets for the events
		{"fast", c.FastCount}, // walks the fd tables of the marked processes only, sums in the kernel
	} {
		b.Run(kind.name, func(b *testing.B) {
			for b.Loop() {
				got, err := kind.count()
				if err != nil || got.Conns != n {
					b.Fatalf("count %+v, %v", got, err)
				}
			}
		})
	}
}
