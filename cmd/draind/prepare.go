package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

// prepareCmd is what prepare and unprepare share: their flags, the process named by --from, and the prepared mode's
// BPF objects.
type prepareCmd struct {
	p      *proc.Process // --from; nil with --cgroup
	cgroup string        // --cgroup (resolved), or the cgroup of --from
	netns  string        // --netns
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
	from := fs.Int("from", 0, fromHelp+" (or --cgroup)")
	fs.StringVar(&c.cgroup, "cgroup", "", "a cgroup v2 directory instead of --from's (\"self\": the caller's own, for a service's ExecStartPre=); with --port")
	fs.StringVar(&c.pinDir, "pin-dir", "", "bpffs directory for draind's pins (default /sys/fs/bpf/draind; prepare pins under DIR-prepare)")
	fs.BoolVar(&c.json, "json", false, "print the result as JSON")
	if name == "prepare" {
		fs.StringVar(&c.netns, "netns", "/proc/self/ns/net", "with --cgroup: the network namespace the service listens in (a path such as /run/netns/NAME or /proc/PID/ns/net)")
	}
	fs.Var(&c.ports, "port", portHelp)
	if err := fs.Parse(args); err != nil {
		return nil, exitBadInput
	}
	fail := badInput(stderr)
	if fs.NArg() > 0 {
		return nil, fail("unexpected argument %q", fs.Arg(0))
	}
	var err error
	switch {
	case (*from > 0) == (c.cgroup != ""):
		return nil, fail("one of --from and --cgroup is required")
	case c.cgroup != "":
		if name == "prepare" && len(c.ports) == 0 {
			return nil, fail("--cgroup needs --port: nothing listens yet to name the ports")
		}
		if c.cgroup == "self" {
			if c.cgroup, err = proc.CgroupDir(os.Getpid()); err != nil {
				return nil, fail("%v", err)
			}
		}
		if st, err := os.Stat(c.cgroup); err != nil || !st.IsDir() {
			return nil, fail("--cgroup %s: not a directory", c.cgroup)
		}
	default:
		if c.p, err = proc.Open(*from); err != nil {
			return nil, fail("process: %v", err)
		}
		if c.cgroup, err = proc.CgroupDir(c.p.PID); err != nil {
			c.p.Close()
			return nil, fail("%v", err)
		}
	}
	if c.objs, err = loader.OpenPrepare(loader.Options{PinDir: c.pinDir}); err != nil {
		c.close()
		return nil, fail("%v", err)
	}
	return c, exitOK
}

func (c *prepareCmd) close() {
	if c.objs != nil {
		c.objs.Close()
	}
	if c.p != nil {
		c.p.Close()
	}
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
	var res *steer.Prepared
	if c.p != nil {
		res, err = steer.Prepare(c.objs, steering, c.p, c.ports)
	} else {
		ns, oerr := os.Open(c.netns)
		if oerr != nil {
			return fail("--netns: %v", oerr)
		}
		res, err = steer.PrepareCgroup(c.objs, c.cgroup, int(ns.Fd()), c.ports)
		ns.Close()
	}
	if err != nil {
		if isPrepareInput(err) {
			return fail("%v", err)
		}
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	if c.json {
		printJSON(stdout, res)
		return exitOK
	}
	if c.p == nil {
		fmt.Fprintf(stdout, "prepared cgroup %s for port(s) %v (network namespace %s)\n", res.Cgroup, res.Ports, c.netns)
		fmt.Fprintf(stdout, "  its processes bind these ports with SO_REUSEPORT, and get plain TCP when they ask for MPTCP\n")
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
	res, err := steer.Unprepare(c.objs, c.cgroup, c.ports)
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
	fmt.Fprintf(stdout, "unprepared port(s) %v of cgroup %s\n", res.Ports, c.cgroup)
	for _, d := range res.Detached {
		fmt.Fprintf(stdout, "  detached programs from  %s\n", d)
	}
	for _, s := range res.Stays {
		fmt.Fprintf(stdout, "  stays                   %s\n", s)
	}
	return exitOK
}
