package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

func cmdPrepare(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("prepare", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var ports portList
	from := fs.Int("from", 0, "PID of the running (old) server (required)")
	pinDir := fs.String("pin-dir", "", "bpffs directory for draind's pins (default /sys/fs/bpf/draind; prepare pins under DIR-prepare)")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	fs.Var(&ports, "port", "prepare only this port (repeatable; default: every port the process listens on)")
	if err := fs.Parse(args); err != nil {
		return exitBadInput
	}
	fail := badInput(stderr)
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *from <= 0 {
		return fail("--from is required")
	}
	p, err := proc.Open(*from)
	if err != nil {
		return fail("old process: %v", err)
	}
	defer p.Close()
	objs, err := loader.OpenPrepare(loader.Options{PinDir: *pinDir})
	if err != nil {
		return fail("%v", err)
	}
	defer objs.Close()
	steering, err := loader.Open(loader.Options{PinDir: *pinDir})
	if err != nil {
		return fail("%v", err)
	}
	defer steering.Close()
	defer steering.RemoveUnusedPins() // a refused prepare leaves no steering pins
	res, err := steer.Prepare(objs, steering, p, ports)
	if err != nil {
		if errors.Is(err, steer.ErrNoListeners) || errors.Is(err, steer.ErrNoMatch) || errors.Is(err, steer.ErrIncompatible) ||
			errors.Is(err, proc.ErrNoCgroup2) || errors.Is(err, proc.ErrNotPermitted) || errors.Is(err, loader.ErrNotPermitted) {
			return fail("%v", err)
		}
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	if *jsonOut {
		printJSON(stdout, res)
		return exitOK
	}
	if len(res.Shared) == 0 && res.Cgroup == "" {
		fmt.Fprintf(stdout, "nothing to prepare: %s already set SO_REUSEPORT; hand it off as it is\n", strings.Join(res.Already, ", "))
		return exitOK
	}
	fmt.Fprintf(stdout, "prepared process %d for a handoff on the same port\n", *from)
	if len(res.Shared) > 0 {
		fmt.Fprintf(stdout, "  made shareable (SO_REUSEPORT)  %s\n", strings.Join(res.Shared, ", "))
	}
	state := "attached"
	if !res.Attached {
		state = "already attached"
	}
	fmt.Fprintf(stdout, "  bind programs                  %s to cgroup %s: a new process started there binds these ports with SO_REUSEPORT\n", state, res.Cgroup)
	return exitOK
}

func cmdUnprepare(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("unprepare", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var ports portList
	from := fs.Int("from", 0, "PID of a process of the prepared service (old or new version; required)")
	pinDir := fs.String("pin-dir", "", "bpffs directory for draind's pins (default /sys/fs/bpf/draind)")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	fs.Var(&ports, "port", "unprepare only this port (repeatable; default: every port prepared in the process's cgroup)")
	if err := fs.Parse(args); err != nil {
		return exitBadInput
	}
	fail := badInput(stderr)
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *from <= 0 {
		return fail("--from is required")
	}
	p, err := proc.Open(*from)
	if err != nil {
		return fail("process: %v", err)
	}
	defer p.Close()
	objs, err := loader.OpenPrepare(loader.Options{PinDir: *pinDir})
	if err != nil {
		return fail("%v", err)
	}
	defer objs.Close()
	res, err := steer.Unprepare(objs, p, ports)
	if err != nil {
		if errors.Is(err, steer.ErrNoMatch) || errors.Is(err, proc.ErrNoCgroup2) {
			return fail("%v", err)
		}
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	if *jsonOut {
		printJSON(stdout, res)
		return exitOK
	}
	fmt.Fprintf(stdout, "unprepared port(s) %v of process %d's cgroup\n", res.Ports, *from)
	for _, d := range res.Detached {
		fmt.Fprintf(stdout, "  detached programs from  %s\n", d)
	}
	for _, s := range res.Stays {
		fmt.Fprintf(stdout, "  stays                   %s\n", s)
	}
	return exitOK
}
