package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/draind/draind/api"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

// prepareCmd is what prepare and unprepare share: their flags, the process named by --from (or the cgroup named by
// --cgroup), and either the daemon that serves --socket or the prepared mode's BPF objects.
type prepareCmd struct {
	p      *proc.Process // --from; nil with --cgroup
	cgroup string        // --cgroup (resolved), or the cgroup of --from
	netns  string        // --netns
	client *api.Client   // the daemon, when it serves the socket (and --from is given)
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
	fs.StringVar(&c.pinDir, "pin-dir", "", "bpffs directory for draind's pins (default /sys/fs/bpf/draind; prepare pins under DIR-prepare); for --standalone runs")
	fs.BoolVar(&c.json, "json", false, "print the result as JSON")
	socket := fs.String("socket", api.DefaultSocket, "the daemon's socket: used when it exists (with --from)")
	standalone := fs.Bool("standalone", false, "work in this process even if a daemon serves --socket")
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
		if client := (&api.Client{Socket: *socket}); !*standalone && client.Available() {
			if c.pinDir != "" {
				c.close()
				return nil, fail("--pin-dir is for --standalone runs (the daemon has its own pin dir)")
			}
			c.client = client
			return c, exitOK
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

// request is the daemon's request for c's process.
func (c *prepareCmd) request(hold bool) (api.PrepareRequest, []int) {
	idx := 0
	return api.PrepareRequest{From: api.ProcRef{PIDFD: &idx}, Ports: c.ports, Hold: hold}, []int{c.p.FD()}
}

// prepareErr prints err and returns its exit code: bad input (nothing changed) or an error.
func prepareErr(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "draind: %v\n", err)
	var ae *api.Error
	if errors.As(err, &ae) {
		return exitCodeOfKind(ae.Kind)
	}
	if isPrepareInput(err) {
		return exitBadInput
	}
	return exitError
}

func cmdPrepare(args []string, stdout, stderr io.Writer) int {
	c, code := openPrepareCmd("prepare", "PID of the running (old) server",
		"prepare only this port (repeatable; default: every port the process listens on)", args, stderr)
	if c == nil {
		return code
	}
	defer c.close()
	var res *api.PrepareResult
	if c.client != nil {
		req, fds := c.request(false)
		var err error
		if res, err = c.client.Prepare(context.Background(), req, fds); err != nil {
			return prepareErr(stderr, err)
		}
	} else {
		steering, err := loader.Open(loader.Options{PinDir: c.pinDir})
		if err != nil {
			return prepareErr(stderr, err)
		}
		defer steering.Close()
		defer steering.RemoveUnusedPins() // a refused prepare leaves no steering pins
		var pr *steer.Prepared
		if c.p != nil {
			pr, err = steer.Prepare(c.objs, steering, c.p, c.ports)
		} else {
			ns, oerr := os.Open(c.netns)
			if oerr != nil {
				return badInput(stderr)("--netns: %v", oerr)
			}
			pr, err = steer.PrepareCgroup(c.objs, c.cgroup, int(ns.Fd()), c.ports)
			ns.Close()
		}
		if err != nil {
			return prepareErr(stderr, err)
		}
		res = &api.PrepareResult{Prepared: *pr}
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
	var (
		res *steer.Unprepared
		err error
	)
	if c.client != nil {
		req, fds := c.request(false)
		res, err = c.client.Unprepare(context.Background(), req, fds)
	} else {
		res, err = steer.Unprepare(c.objs, c.cgroup, c.ports)
	}
	if err != nil {
		return prepareErr(stderr, err)
	}
	if c.json {
		printJSON(stdout, res)
		return exitOK
	}
	what := "cgroup " + c.cgroup
	if c.p != nil {
		what = fmt.Sprintf("process %d's cgroup", c.p.PID)
	}
	fmt.Fprintf(stdout, "unprepared port(s) %v of %s\n", res.Ports, what)
	for _, d := range res.Detached {
		fmt.Fprintf(stdout, "  detached programs from  %s\n", d)
	}
	for _, s := range res.Stays {
		fmt.Fprintf(stdout, "  stays                   %s\n", s)
	}
	return exitOK
}
