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

// prepareCmd is what prepare and unprepare share: their flags, the process named by --from, and the prepared mode's
// BPF objects.
type prepareCmd struct {
	p      *proc.Process
	objs   *loader.Prepare
	ports  portList
	pinDir string
	json   bool
}

// openPrepareCmd parses the flags of prepare or unprepare and opens what they need; a non-zero code means the
// command ends with it (the error is printed).
func openPrepareCmd(name, fromHelp, portHelp string, args []string, stderr io.Writer) (*prepareCmd, int) {
	c := &prepareCmd{}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	from := fs.Int("from", 0, fromHelp+" (required)")
	fs.StringVar(&c.pinDir, "pin-dir", "", "bpffs directory for draind's pins (default /sys/fs/bpf/draind; prepare pins under DIR-prepare)")
	fs.BoolVar(&c.json, "json", false, "print the result as JSON")
	fs.Var(&c.ports, "port", portHelp)
	if err := fs.Parse(args); err != nil {
		return nil, exitBadInput
	}
	fail := badInput(stderr)
	if fs.NArg() > 0 {
		return nil, fail("unexpected argument %q", fs.Arg(0))
	}
	if *from <= 0 {
		return nil, fail("--from is required")
	}
	var err error
	if c.p, err = proc.Open(*from); err != nil {
		return nil, fail("process: %v", err)
	}
	if c.objs, err = loader.OpenPrepare(loader.Options{PinDir: c.pinDir}); err != nil {
		c.p.Close()
		return nil, fail("%v", err)
	}
	return c, exitOK
}

func (c *prepareCmd) close() {
	c.objs.Close()
	c.p.Close()
}

func cmdPrepare(args []string, stdout, stderr io.Writer) int {
	c, code := openPrepareCmd("prepare", "PID of the running (old) server",
		"prepare only this port (repeatable; default: every port the process listens on)", args, stderr)
	if c == nil {
		return code
	}
	defer c.close()
	fail := badInput(stderr)
	steering, err := loader.Open(loader.Options{PinDir: c.pinDir})
	if err != nil {
		return fail("%v", err)
	}
	defer steering.Close()
	defer steering.RemoveUnusedPins() // a refused prepare leaves no steering pins
	res, err := steer.Prepare(c.objs, steering, c.p, c.ports)
	if err != nil {
		if errors.Is(err, steer.ErrNoListeners) || errors.Is(err, steer.ErrNoMatch) || errors.Is(err, steer.ErrIncompatible) ||
			errors.Is(err, proc.ErrNoCgroup2) || errors.Is(err, proc.ErrNotPermitted) || errors.Is(err, loader.ErrNotPermitted) {
			return fail("%v", err)
		}
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	if c.json {
		printJSON(stdout, res)
		return exitOK
	}
	if len(res.Shared) == 0 && res.Cgroup == "" {
		fmt.Fprintf(stdout, "nothing to prepare: %s already set SO_REUSEPORT; hand it off as it is\n", strings.Join(res.Already, ", "))
		return exitOK
	}
	fmt.Fprintf(stdout, "prepared process %d for a handoff on the same port\n", c.p.PID)
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
	c, code := openPrepareCmd("unprepare", "PID of a process of the prepared service (old or new version)",
		"unprepare only this port (repeatable; default: every port prepared in the process's cgroup)", args, stderr)
	if c == nil {
		return code
	}
	defer c.close()
	fail := badInput(stderr)
	res, err := steer.Unprepare(c.objs, c.p, c.ports)
	if err != nil {
		if errors.Is(err, steer.ErrNoMatch) || errors.Is(err, proc.ErrNoCgroup2) {
			return fail("%v", err)
		}
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	if c.json {
		printJSON(stdout, res)
		return exitOK
	}
	fmt.Fprintf(stdout, "unprepared port(s) %v of process %d's cgroup\n", res.Ports, c.p.PID)
	for _, d := range res.Detached {
		fmt.Fprintf(stdout, "  detached programs from  %s\n", d)
	}
	for _, s := range res.Stays {
		fmt.Fprintf(stdout, "  stays                   %s\n", s)
	}
	return exitOK
}
