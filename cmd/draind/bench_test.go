package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
)

// BenchmarkReaction measures how fast draind signals the old process once it has drained: from the old process
// closing its last connection (its own CLOCK_MONOTONIC right after close(2)) to the old process receiving SIGTERM
// (its own clock in its signal handler). Each iteration is a whole `draind handoff` between two holder processes,
// with three connections on the old one that the client closes at a random moment within a second after the flip.
// The sub-benchmarks run draind with
// kernel events (the default) and with a 1-second polling baseline, in the same run on the same machine.
//
//	go test -run '^$' -bench Reaction -benchtime 100x ./cmd/draind
func BenchmarkReaction(b *testing.B) {
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"events", nil},
		{"poll-1s", []string{"--poll", "1s"}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			ns, pins := setup(b)
			hopts := testenv.HolderOptions{Addr: addr, ReusePort: true}
			old := testenv.StartHolderForTest(b, ns, hopts)
			var lat, seen, sent []time.Duration // close -> signal received; close -> zero seen; zero seen -> signal sent
			var rss int64
			for b.Loop() {
				conns := testenv.StartConnsForTest(b, ns, testenv.ConnsOptions{Addr: addr, N: 3})
				next := testenv.StartHolderForTest(b, ns, hopts)
				args := append([]string{"--from", strconv.Itoa(old.PID), "--to", strconv.Itoa(next.PID), "--pin-dir", pins}, mode.args...)
				h := startHandoff(b, args...)
				h.waitFor(b, "] flipped", 10*time.Second)
				time.Sleep(rand.N(time.Second)) // any phase of the polling baseline's interval
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				if err := conns.CloseAll(ctx, 0); err != nil {
					b.Fatalf("close connections: %v", err)
				}
				cancel()
				out, code := h.wait(b, 20*time.Second)
				if code != exitOK || out.Outcome != "drained" {
					b.Fatalf("handoff: exit %d, outcome %s: %s", code, out.Outcome, h.errText())
				}
				rss = max(rss, h.cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss)
				ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
				old.Wait(ctx)
				cancel()
				sigs, closed := old.Signals(), old.Snapshot().LastCloseMono
				if len(sigs) != 1 || closed == 0 {
					b.Fatalf("old holder: signals %v, last close at %d", sigs, closed)
				}
				lat = append(lat, time.Duration(sigs[0].MonoNS-closed))
				seen = append(seen, time.Duration(out.DrainedAt-closed))
				sent = append(sent, time.Duration(out.SignalledAt-out.DrainedAt))
				old = next
			}
			reportLatency(b, lat)
			slices.Sort(seen)
			slices.Sort(sent)
			b.Logf("of which: last close -> draind sees zero: p50 %v p99 %v; zero seen -> signal sent: p50 %v p99 %v",
				seen[len(seen)/2], seen[int(0.99*float64(len(seen)-1))], sent[len(sent)/2], sent[int(0.99*float64(len(sent)-1))])
			b.ReportMetric(float64(rss)/1024, "peak-rss-MiB")
		})
	}
}

// reportLatency reports the median, 99th percentile and maximum of lat, in milliseconds.
func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	q := func(p float64) float64 {
		i := int(p * float64(len(lat)-1))
		return float64(lat[i]) / 1e6
	}
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(q(1), "max-ms")
	b.ReportMetric(0, "ns/op") // an iteration is a whole handoff: its duration says nothing
	b.Logf("%d handoffs: min %v p50 %v p99 %v max %v", len(lat), lat[0], lat[len(lat)/2], lat[int(0.99*float64(len(lat)-1))], lat[len(lat)-1])
}

// BenchmarkScale100k: an old server holds 100,000 established connections; draind hands its port off, waits while
// nothing changes, then the clients close everything over 5 seconds and draind signals the old server once it holds
// nothing. Reported: the time of one snapshot at 100k (fast, and full with tagging; taken by this process with
// draind's code), draind's CPU time while idle and during the drain, and its peak RSS.
//
// No process here may hold more than 20,000 fds (root lacks CAP_SYS_RESOURCE and the hard RLIMIT_NOFILE is 20,000),
// so the old server is a pre-fork one (a master and 6 workers sharing its listener, nginx-style: draind counts the
// whole tree), and the connections come from 6 client processes over 24 loopback source addresses.
//
//	go test -run '^$' -bench Scale100k -benchtime 1x ./cmd/draind
func BenchmarkScale100k(b *testing.B) {
	const n, clients = 100_000, 6
	ns, pins := setup(b)
	for b.Loop() {
		hopts := testenv.HolderOptions{Addr: addr, ReusePort: true, Backlog: 4096, Workers: clients}
		old := testenv.StartHolderForTest(b, ns, hopts)
		var conns []*testenv.Conns
		start := time.Now()
		for i := range clients {
			per := n / clients
			if i == clients-1 {
				per = n - per*(clients-1)
			}
			conns = append(conns, testenv.StartConnsForTest(b, ns, testenv.ConnsOptions{Addr: addr, N: per, SourceStart: fmt.Sprintf("127.%d.0.1", 10+i)}))
		}
		b.Logf("%d connections open in %v", n, time.Since(start).Round(time.Millisecond))
		hopts.Workers = 0
		next := testenv.StartHolderForTest(b, ns, hopts)

		full, fast := snapshotTimes(b, old.PID, n, true), snapshotTimes(b, old.PID, n, false)
		h := startHandoff(b, "--from", strconv.Itoa(old.PID), "--to", strconv.Itoa(next.PID), "--pin-dir", pins, "--timeout", "2m")
		h.waitFor(b, "] draining:", 30*time.Second) // the first counts after the flip are done
		b.Logf("draind after the flip: %s", hwm(h.cmd.Process.Pid))
		const idle = 10 * time.Second
		cpu0 := cpuTime(b, h.cmd.Process.Pid)
		time.Sleep(idle)
		cpu1 := cpuTime(b, h.cmd.Process.Pid)

		start = time.Now()
		var wg sync.WaitGroup
		for _, c := range conns {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if err := c.CloseAll(ctx, 5*time.Second); err != nil {
					b.Errorf("close connections: %v", err)
				}
			})
		}
		wg.Wait()
		out, code := h.wait(b, time.Minute)
		if code != exitOK || out.Outcome != "drained" || out.InFlightAtFlip != n {
			b.Fatalf("handoff: exit %d, outcome %s, %d in flight at the flip: %s", code, out.Outcome, out.InFlightAtFlip, h.errText())
		}
		ru := h.cmd.ProcessState.SysUsage().(*syscall.Rusage)
		total := time.Duration(syscall.TimevalToNsec(ru.Utime) + syscall.TimevalToNsec(ru.Stime))
		b.ReportMetric(float64(fast[len(fast)/2])/1e6, "fast-snapshot-p50-ms")
		b.ReportMetric(float64(fast[len(fast)-1])/1e6, "fast-snapshot-max-ms")
		b.ReportMetric(float64(full[len(full)/2])/1e6, "full-snapshot-p50-ms")
		b.ReportMetric(float64(cpu1-cpu0)/float64(idle)*100, "idle-cpu-%")
		b.ReportMetric((total - cpu1).Seconds(), "drain-cpu-s")
		b.ReportMetric(float64(ru.Maxrss)/1024, "peak-rss-MiB")
		b.ReportMetric(out.DrainTime.Seconds(), "drain-s")
		b.ReportMetric(float64(out.Snapshots+out.FastSnapshots), "snapshots")
		b.ReportMetric(0, "ns/op")
		b.Logf("snapshots at %d connections (this process): fast %v; full (tagging) %v", n, fast, full)
		b.Logf("draind: idle %v CPU in %v; drain %v (from the clients' first close %v), %d full snapshots (longest %v) and %d fast (longest %v), %v CPU in total, peak RSS %d KiB",
			cpu1-cpu0, idle, out.DrainTime.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), out.Snapshots, out.SnapshotMax, out.FastSnapshots, out.FastSnapshotMax, total, ru.Maxrss)
	}
}

// snapshotTimes counts pid's connections on the port ten times with a fresh Tracker and returns the sorted durations:
// full snapshots if track (a tracked Counter's Count tags the sockets), else fast ones.
func snapshotTimes(b *testing.B, pid, want int, track bool) []time.Duration {
	tr, err := drain.NewTracker(drain.TrackerOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	p, err := proc.Open(pid)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	c, err := tr.Watch(p, []uint16{8080}, drain.WatchOptions{Track: track})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var ds []time.Duration
	for range 10 {
		start := time.Now()
		got, err := c.Count()
		ds = append(ds, time.Since(start))
		if err != nil || got.Conns != want {
			b.Fatalf("count = %+v, %v; want %d connections", got, err, want)
		}
	}
	slices.Sort(ds)
	return ds
}

// cpuTime is the user+system CPU time pid has used so far, from /proc/PID/stat.
func cpuTime(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14 of stat(5), after pid and comm
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const hz = 100 // USER_HZ
	return time.Duration(ut+st) * time.Second / hz
}

func hwm(pid int) string {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "VmHWM") || strings.HasPrefix(l, "VmRSS") {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, ", ")
}
