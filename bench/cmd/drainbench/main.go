// Command drainbench compares draind with the usual ways of upgrading a TCP server, in one run on this machine, and
// writes a Markdown table (results.md), the raw figures (results.json) and SVG plots under --out.
//
//	go run ./bench/cmd/drainbench [--long] [--out bench/results]
//
// It needs root: every run has its own network namespace, and draind steers sockets with BPF.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/draind/draind/bench"
)

func main() {
	bench.RunChildIfRequested() // the servers and load clients are this binary itself
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("drainbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	long := fs.Bool("long", false, "the long run: a minute of storm per contender, 5 repeats (10 of the queue scenario), 10,000 long-lived connections (about 55 minutes)")
	out := fs.String("out", "bench/results", "directory for results.md, results.json and the SVG plots")
	repeats := fs.Int("repeats", 0, "repeats per scenario (default 3; with --long 5, and 10 for the queue scenario)")
	scenarios := fs.String("scenarios", "", "comma-separated subset of "+strings.Join(bench.Scenarios, ","))
	contenders := fs.String("contenders", "", "comma-separated subset of "+strings.Join(bench.ContenderKeys(), ",")+" (scenario 5 is draind's alone and ignores it)")
	verbose := fs.Bool("v", false, "log draind's own informational messages too")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of this process (the upgrades of (e) and (f) run in it) to this file")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "drainbench: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(stderr, "drainbench: needs root (network namespaces, BPF)")
		return 2
	}
	p := bench.DefaultParams(*long)
	if *repeats < 0 {
		fmt.Fprintln(stderr, "drainbench: --repeats must be positive")
		return 2
	}
	if *repeats > 0 {
		p.Repeats, p.QueueRepeats = *repeats, 0
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintf(stderr, "drainbench: %v\n", err)
			return 2
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			fmt.Fprintf(stderr, "drainbench: start CPU profile: %v\n", err)
			return 2
		}
		defer func() {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				fmt.Fprintf(stderr, "drainbench: write CPU profile: %v\n", err)
			}
		}()
	}
	start := time.Now()
	res, err := bench.Run(ctx, bench.Config{
		Params:     p,
		Long:       *long,
		Scenarios:  split(*scenarios),
		Contenders: split(*contenders),
		Command:    "drainbench " + strings.Join(args, " "),
		Logger:     log,
	})
	if err != nil && res == nil {
		fmt.Fprintf(stderr, "drainbench: %v\n", err)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "drainbench: stopped early: %v (writing what was measured)\n", err)
		res.Wall = time.Since(start)
	}
	md, werr := bench.Write(*out, res)
	if werr != nil {
		fmt.Fprintf(stderr, "drainbench: %v\n", werr)
		return 1
	}
	fmt.Fprint(stdout, md)
	fmt.Fprintf(stderr, "drainbench: wrote %s/results.md, results.json and plots in %s\n", *out, time.Since(start).Round(time.Second))
	if err != nil {
		return 1
	}
	return 0
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
