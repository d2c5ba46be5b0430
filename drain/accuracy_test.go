package drain_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
)

// TestAccuracyUnderChurn samples the count of both sides of a handoff many times while a churn client opens and ends
// connections at random (normal closes, half-closes, client resets, idle holds) against a holder that keeps each ended
// connection's fd 20ms (so CLOSE_WAIT and reset-but-open sockets exist). For each sample the client and both servers
// are frozen with SIGSTOP (the servers first, so that accept queues fill), then the BPF count is compared with the
// ground truth from /proc fd tables and sock_diag, taken before and after it. Every sample must match (but for the few
// whose ground truth changed during the count: the handoff moving the old side's queue), the kernel's count of the old
// side's connections that a socket file may hold must not be below what a walk of the namespace finds (Wait skips its
// walk for connections held outside fd tables when that count is zero), and the handoff must lose no connection and
// signal the old side only once it holds nothing.
func TestAccuracyUnderChurn(t *testing.T) {
	testenv.Require(t)
	ns := testenv.NetNSForTest(t)
	const addr = "127.0.0.1:8080"
	ports := []uint16{8080}
	hopts := testenv.HolderOptions{Addr: addr, ReusePort: true, CloseDelay: 20 * time.Millisecond}
	old := testenv.StartHolderForTest(t, ns, hopts)
	churn := testenv.StartChurnForTest(t, ns, testenv.ChurnOptions{Addr: addr, Concurrency: 48, Duration: 2 * time.Minute,
		Hold: 500 * time.Millisecond, IdleHold: 3 * time.Second, Timeout: 10 * time.Second})
	// Two connections that stay on the old side until enough samples were taken during the handoff.
	keep := testenv.StartConnsForTest(t, ns, testenv.ConnsOptions{Addr: addr, N: 2, SourceStart: "127.3.0.1"})
	time.Sleep(300 * time.Millisecond)
	next := testenv.StartHolderForTest(t, ns, hopts)

	oldP, newP := openProc(t, old.PID), openProc(t, next.PID)
	tr, err := drain.NewTracker(drain.TrackerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	oldC, err := tr.Watch(oldP, ports, drain.WatchOptions{Exclude: []*proc.Process{newP}, Track: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { oldC.Close() })
	newC, err := tr.Watch(newP, ports, drain.WatchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { newC.Close() })

	var samples, mismatches, nonzero, queued, during, moved int
	var maxLive int64
	var maxHeld int
	sample := func(inHandoff bool) {
		thawServers := freeze(t, old.PID, next.PID)
		time.Sleep(time.Millisecond) // the client connects on: accept queues fill
		thawChurn := freeze(t, churn.PID)
		defer func() { thawChurn(); thawServers() }()
		if inHandoff {
			during++
		}
		time.Sleep(2 * time.Millisecond) // let loopback packets in flight land
		// Before this sample's snapshots tag what the old side accepted since the last one: counted from birth.
		live, held := liveCovers(t, oldC, oldP, samples)
		maxLive, maxHeld = max(maxLive, live), max(maxHeld, held)
		for _, side := range []struct {
			name    string
			p       *proc.Process
			count   func() (drain.Count, error)
			exclude []int
		}{
			{"old (full snapshot)", oldP, oldC.FullCount, []int{next.PID}},
			{"old (fast snapshot)", oldP, oldC.FastCount, []int{next.PID}},
			{"new (fast snapshot)", newP, newC.FastCount, nil},
			{"new (full snapshot)", newP, newC.FullCount, nil},
		} {
			// The ground truth before and after the count: the running handoff may move the old side's queue
			// meanwhile (its processes are stopped: they do not accept). A sample across such a move is not compared.
			before, err := groundTruth(side.p, ports, side.exclude...)
			if err != nil {
				t.Fatalf("ground truth %s: %v", side.name, err)
			}
			got, err := side.count()
			if err != nil {
				t.Fatalf("count %s: %v", side.name, err)
			}
			want, err := groundTruth(side.p, ports, side.exclude...)
			if err != nil {
				t.Fatalf("ground truth %s: %v", side.name, err)
			}
			if want != before {
				moved++
				continue
			}
			samples++
			if got != want {
				mismatches++
				t.Errorf("sample %d (%s): count %+v, ground truth %+v", samples, side.name, got, want)
			}
			if want.Total() > 0 {
				nonzero++
			}
			if want.Queued > 0 {
				queued++
			}
		}
	}

	for range 40 {
		sample(false)
		time.Sleep(10 * time.Millisecond)
	}

	type result struct {
		res *handoff.Result
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := handoff.Run(context.Background(), handoff.Options{From: old.PID, To: next.PID, PinDir: pinDir(t),
			Timeout: time.Minute, Tracker: tr})
		done <- result{res, err}
	}()
	var r result
	released := false
loop:
	for {
		select {
		case r = <-done:
			break loop
		default:
		}
		sample(true)
		if during >= 150 && !released {
			released = true
			go keep.CloseAll(context.Background(), 0)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cr, err := churn.Stop(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("samples: %d (%d freezes during the handoff), %d mismatches, %d non-zero, %d with queued connections; %d not compared (the ground truth changed during the count)",
		samples, during, mismatches, nonzero, queued, moved)
	t.Logf("old side: up to %d connections held (the walk), up to %d counted as possibly held (the kernel)", maxHeld, maxLive)
	t.Logf("churn: %+v", cr)
	if r.err != nil {
		t.Fatalf("handoff: %v", r.err)
	}
	t.Logf("handoff: outcome %s, %d in flight at the flip, drained in %v, %d snapshots", r.res.Outcome, r.res.InFlightAtFlip, r.res.DrainTime, r.res.Snapshots)
	if mismatches > 0 {
		t.Fatalf("%d of %d samples differ from the ground truth", mismatches, samples)
	}
	if !released || nonzero < samples/2 || queued == 0 || moved > samples/10 {
		t.Fatalf("the samples say too little: the handoff ended after %d freezes, %d non-zero, %d with queued connections, %d not compared", during, nonzero, queued, moved)
	}
	if cr.FailureCount() > 0 {
		t.Fatalf("churn lost connections: %v %v", cr.Failures, cr.Samples)
	}
	if r.res.Outcome != handoff.OutcomeDrained || r.res.InFlightAtFlip == 0 {
		t.Fatalf("handoff outcome %s with %d in flight at the flip", r.res.Outcome, r.res.InFlightAtFlip)
	}
	sigs := old.Signals()
	if len(sigs) != 1 || sigs[0].MonoNS < old.Snapshot().LastCloseMono {
		t.Fatalf("old side signalled %v, last closed a connection at %d", sigs, old.Snapshot().LastCloseMono)
	}
}

// liveCovers checks that the kernel's count of c's connections that a socket file may hold is not below what a walk
// of the network namespace finds, and returns both (zeros once c's process has exited).
func liveCovers(t *testing.T, c *drain.Counter, p *proc.Process, sample int) (int64, int) {
	t.Helper()
	// Read before and after the walk: a snapshot of the running handoff may tag a connection meanwhile.
	live1, err := c.Live()
	if err != nil {
		t.Fatal(err)
	}
	held, err := c.HeldWalk()
	if err != nil {
		if p.Exited() {
			return 0, 0 // signalled at the end of the handoff
		}
		t.Fatal(err)
	}
	live2, err := c.Live()
	if err != nil {
		t.Fatal(err)
	}
	if max(live1, live2) < int64(held) {
		t.Errorf("sample %d: the kernel counts %d (then %d) connections that may be held, the walk finds %d",
			sample, live1, live2, held)
	}
	return live2, held
}

func openProc(t *testing.T, pid int) *proc.Process {
	t.Helper()
	p, err := proc.Open(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// pinDir is a private bpffs directory for the test's steering maps.
func pinDir(t *testing.T) string {
	d := fmt.Sprintf("/sys/fs/bpf/draind-test-drain-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
