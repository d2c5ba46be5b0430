package metrics

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/draind/draind/proc"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// source is a Source whose snapshot the test changes while scrapes run.
type source struct {
	mu   sync.Mutex
	snap Snapshot
	err  error
}

func (s *source) Snapshot() (Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := s.snap
	snap.Listeners = append([]Listener(nil), s.snap.Listeners...)
	return snap, s.err
}

func (s *source) set(snap Snapshot, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snap, s.err = snap, err
}

// TestMetrics: the families lint clean (pedantic registry, GatherAndLint), carry what the source and the daemon
// recorded, read this process's real network namespace counters, count their own collection errors, and drop a
// handoff's series once it is gone.
func TestMetrics(t *testing.T) {
	src := &source{}
	m := New(Options{Source: src})
	src.set(Snapshot{Handoffs: 1, Listeners: []Listener{{
		Addr: "127.0.0.1:8080", Name: "web", Netns: 4026531840, Old: Count{InFlight: 7, Queued: 2}, New: Count{InFlight: 40},
		Selector: [5]uint64{100, 1, 3, 0, 1},
	}}, Netns: []Netns{{PID: os.Getpid()}}}, nil)
	m.Started()
	m.SignalSent("SIGTERM")
	m.Finished(ResultDrained, 3*time.Second, 2500*time.Millisecond, "")
	m.Finished(ResultRolledBack, time.Second, 0, "new_exited")
	m.QueueMoved(12, 1500*time.Microsecond)
	m.QueueKept(5)

	problems, err := testutil.GatherAndLint(m.Registry)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP draind_inflight_connections Connections a side of a handoff holds on a listener's port (accepted, not closed), as ss sees them.
# TYPE draind_inflight_connections gauge
draind_inflight_connections{listener="127.0.0.1:8080",name="web",netns="4026531840",role="new"} 40
draind_inflight_connections{listener="127.0.0.1:8080",name="web",netns="4026531840",role="old"} 7
# HELP draind_handoffs_finished_total Handoffs that ended, by result: drained, timed_out, aborted, rolled_back, failed.
# TYPE draind_handoffs_finished_total counter
draind_handoffs_finished_total{result="aborted"} 0
draind_handoffs_finished_total{result="drained"} 1
draind_handoffs_finished_total{result="failed"} 0
draind_handoffs_finished_total{result="rolled_back"} 1
draind_handoffs_finished_total{result="timed_out"} 0
# HELP draind_rollbacks_total Handoffs rolled back (steering back to the old side, which was not signalled), by reason.
# TYPE draind_rollbacks_total counter
draind_rollbacks_total{reason="aborted"} 0
draind_rollbacks_total{reason="deadline"} 0
draind_rollbacks_total{reason="error"} 0
draind_rollbacks_total{reason="new_exited"} 1
draind_rollbacks_total{reason="not_ready"} 0
draind_rollbacks_total{reason="restarted"} 0
# HELP draind_queue_moved_connections_total Connections that waited in an old listener's accept queue after the flip and that draind moved to the new side.
# TYPE draind_queue_moved_connections_total counter
draind_queue_moved_connections_total 12
# HELP draind_queue_kept_connections_total Connections that waited in an old listener's accept queue after the flip and that the old side accepted itself soon enough for draind not to move them.
# TYPE draind_queue_kept_connections_total counter
draind_queue_kept_connections_total 5
# HELP draind_signals_sent_total Signals draind delivered to old processes, by signal name.
# TYPE draind_signals_sent_total counter
draind_signals_sent_total{signal="SIGTERM"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "draind_inflight_connections",
		"draind_handoffs_finished_total", "draind_rollbacks_total", "draind_signals_sent_total", "draind_queue_moved_connections_total",
		"draind_queue_kept_connections_total"); err != nil {
		t.Fatal(err)
	}
	var pause dto.Metric
	if err := m.queuePause.Write(&pause); err != nil {
		t.Fatal(err)
	}
	if h := pause.GetHistogram(); h.GetSampleCount() != 1 || h.GetSampleSum() != 0.0015 {
		t.Fatalf("queue pause histogram: %d samples, sum %v; want 1, 0.0015", h.GetSampleCount(), h.GetSampleSum())
	}
	if n := testutil.CollectAndCount(m, "draind_selector_decisions_total"); n != 5 {
		t.Fatalf("%d decision series, want 5", n)
	}
	if n := testutil.CollectAndCount(m, "draind_kernel_listen_overflows_total"); n != 1 {
		t.Fatalf("%d listen overflow series for this process's netns, want 1", n)
	}
	if v := testutil.ToFloat64(m.collectErrs); v != 0 {
		t.Fatalf("collect errors %v after clean scrapes", v)
	}

	// A failing source still exports what it has and counts the error; a gone process's netns is an error too.
	src.set(Snapshot{Netns: []Netns{{PID: 1 << 30}}}, errors.New("read selector counters: boom"))
	if n := testutil.CollectAndCount(m, "draind_inflight_connections"); n != 0 {
		t.Fatalf("%d in-flight series after the handoff ended, want 0", n)
	}
	if v := testutil.ToFloat64(m.collectErrs); v != 1 {
		t.Fatalf("collect errors %v, want 1", v)
	}
}

func TestParseNetstat(t *testing.T) {
	v, err := proc.ParseTcpExt(strings.NewReader("TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPMigrateReqSuccess\nTcpExt: 0 12 13 4\nIpExt: InOctets\nIpExt: 5\n"))
	if err != nil || v["ListenOverflows"] != 12 || v["ListenDrops"] != 13 || v["TCPMigrateReqSuccess"] != 4 {
		t.Fatalf("%v, %v", v, err)
	}
	if _, err := proc.ParseTcpExt(strings.NewReader("TcpExt: A B\nTcpExt: 1\n")); err == nil {
		t.Fatal("a short values line was accepted")
	}
	f, err := os.Open("/proc/self/net/netstat")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	real, err := proc.ParseTcpExt(f)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"ListenOverflows", "ListenDrops", "TCPMigrateReqSuccess", "TCPMigrateReqFailure"} {
		if _, ok := real[k]; !ok {
			t.Fatalf("this kernel's TcpExt has no %s", k)
		}
	}
}

// TestConcurrentScrapes: scrapes, recordings and source changes at once (run with -race).
func TestConcurrentScrapes(t *testing.T) {
	src := &source{}
	m := New(Options{Source: src, NoRuntime: true})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := range 4 {
		wg.Go(func() {
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				switch i {
				case 0:
					src.set(Snapshot{Handoffs: j % 3, Listeners: []Listener{{Addr: fmt.Sprintf("127.0.0.1:%d", 8000+j%5), Old: Count{InFlight: j}}}}, nil)
				case 1:
					m.Started()
					m.SignalSent("SIGTERM")
					m.Finished(ResultDrained, time.Second, time.Second, "")
				default:
					if _, err := m.Registry.Gather(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
}
