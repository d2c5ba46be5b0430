package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/draind/draind/handoff"
	"github.com/draind/draind/testenv"
)

// cmdDemo does the main job on built-in parts: in a private network namespace, an old and a new built-in HTTP
// server, load from a separate process, a handoff, and a table of what happened.
func cmdDemo(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	clients := fs.Int("clients", 32, "concurrent load clients, each opening a new connection per request")
	keepAlive := fs.Int("keepalive", 8, "long-lived keep-alive connections opened to the old server before the handoff")
	hold := fs.Duration("hold", 1500*time.Millisecond, "how long the long-lived connections stay open")
	delay := fs.Duration("delay", 2*time.Millisecond, "server response time")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return exitBadInput
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(stderr, "draind: demo needs root (it creates a network namespace and steers sockets with BPF)")
		return exitBadInput
	}
	if *clients <= 0 || *keepAlive < 0 || *hold <= 0 {
		fmt.Fprintln(stderr, "draind: --clients and --hold must be positive")
		return exitBadInput
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	say := func(format string, a ...any) {
		if !*jsonOut {
			fmt.Fprintf(stderr, format+"\n", a...)
		}
	}

	ns, err := testenv.NewNetNS()
	if err != nil {
		fmt.Fprintf(stderr, "draind: demo: %v\n", err)
		return exitError
	}
	defer ns.Close()
	const addr = "127.0.0.1:8080"
	srv := func(id string) (*testenv.Server, error) {
		return testenv.StartServer(ctx, ns, testenv.ServerOptions{Addr: addr, ID: id, ReusePort: true, Delay: *delay})
	}
	old, err := srv("old")
	if err != nil {
		fmt.Fprintf(stderr, "draind: demo: %v\n", err)
		return exitError
	}
	defer old.Kill()
	say("network namespace %s: old server pid %d listens on %s", ns.Name, old.PID, addr)

	load, err := testenv.StartLoad(ctx, ns, testenv.LoadOptions{
		Addr: addr, Concurrency: *clients, Duration: time.Minute,
		KeepAlive: *keepAlive, KeepAliveEvery: 50 * time.Millisecond, KeepAliveFor: *hold,
	})
	if err != nil {
		fmt.Fprintf(stderr, "draind: demo: %v\n", err)
		return exitError
	}
	defer load.Stop()
	say("load: %d clients (a new connection per request) and %d long-lived connections, from a separate process", *clients, *keepAlive)
	time.Sleep(500 * time.Millisecond)

	newS, err := srv("new")
	if err != nil {
		fmt.Fprintf(stderr, "draind: demo: %v\n", err)
		return exitError
	}
	defer newS.Kill()
	say("new server pid %d listens on %s; handing off %d -> %d", newS.PID, addr, old.PID, newS.PID)

	pr := newProgress(stderr, *jsonOut)
	res, herr := handoff.Run(ctx, handoff.Options{
		From: old.PID, To: newS.PID, Timeout: time.Minute,
		ReadyURL: "http://" + addr + "/ready",
		Logger:   slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Progress: pr.report,
	})
	pr.done()
	time.Sleep(300 * time.Millisecond) // load keeps going against the new server
	lr, lerr := load.Stop()
	if lerr != nil {
		fmt.Fprintf(stderr, "draind: demo: %v\n", lerr)
		return exitError
	}
	if *jsonOut {
		printJSON(stdout, struct {
			Handoff *handoff.Result    `json:"handoff"`
			Error   string             `json:"error,omitempty"`
			Load    testenv.LoadResult `json:"load"`
		}{res, errString(herr), lr})
	} else {
		printDemo(stdout, res, lr)
	}
	switch {
	case herr != nil:
		fmt.Fprintf(stderr, "draind: demo: handoff: %v\n", herr)
		return exitCode(res, herr)
	case lr.FailureCount() > 0 || lr.KeepAlive.Failures["reset"]+lr.KeepAlive.Failures["refused"]+lr.KeepAlive.Failures["timeout"]+lr.KeepAlive.Failures["wrong"]+lr.KeepAlive.Failures["other"] > 0:
		fmt.Fprintln(stderr, "draind: demo: the load saw failures")
		return exitError
	}
	return exitOK
}

func printDemo(w io.Writer, r *handoff.Result, lr testenv.LoadResult) {
	row := func(k string, v any) { fmt.Fprintf(w, "| %-34s | %-52v |\n", k, v) }
	fmt.Fprintf(w, "\n| %-34s | %-52s |\n|%s|%s|\n", "what", "value", strings.Repeat("-", 36), strings.Repeat("-", 54))
	row("requests (new connection each)", lr.Requests)
	row("  answered", lr.OK)
	row("  failed", fmt.Sprintf("%d (%s)", lr.FailureCount(), kinds(lr.Failures)))
	row("  served by", byServer(lr.ByServer))
	row("long-lived connections", lr.KeepAlive.Opened)
	row("  requests over them", lr.KeepAlive.Requests)
	row("  failed", fmt.Sprintf("%d (%s)", sum(lr.KeepAlive.Failures), kinds(lr.KeepAlive.Failures)))
	row("  served by", byServer(lr.KeepAlive.ByServer))
	if r != nil {
		row("handoff outcome", r.Outcome)
		row("connections drained (at the flip)", r.InFlightAtFlip)
		row("time to drain", r.DrainTime.Round(time.Millisecond))
		row("exact counts (woken by events)", fmt.Sprintf("%d full + %d fast, longest %s / %s", r.Snapshots, r.FastSnapshots, r.SnapshotMax.Round(10*time.Microsecond), r.FastSnapshotMax.Round(10*time.Microsecond)))
		row("signal sent", fmt.Sprintf("SIG%s (delivered: %v)", r.Signal, r.Signalled))
		row("old process exit seen", fmt.Sprintf("%v (%s after the signal)", r.ExitSeen, r.ExitWait.Round(time.Millisecond)))
		row("selector decisions", fmt.Sprintf("%d steered, %d fell back, %d migrated", r.Steered, r.Fallbacks, r.Migrated))
	}
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func kinds(m map[string]int) string {
	var out []string
	for _, k := range []string{"refused", "reset", "timeout", "wrong", "other"} {
		out = append(out, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(out, ", ")
}

func byServer(m map[string]int) string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []string
	for _, k := range keys {
		out = append(out, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(out, ", ")
}
