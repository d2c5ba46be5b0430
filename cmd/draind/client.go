package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/api"
	"github.com/draind/draind/handoff"
)

// handoffViaDaemon asks the daemon for the handoff, passing pidfds the caller opened in its own PID namespace, and
// reports its events like a standalone run. An interrupt (Ctrl-C) aborts the handoff, as it would standalone.
func handoffViaDaemon(ctx context.Context, c *api.Client, from, to int, req api.HandoffRequest, pr *progress) (*handoff.Result, string, int, error) {
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for i, x := range []struct {
		what string
		pid  int
	}{{"old", from}, {"new", to}} {
		fd, err := unix.PidfdOpen(x.pid, 0)
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				err = errors.New("no such process")
			}
			return nil, "", exitBadInput, fmt.Errorf("%s process: open process %d: %w", x.what, x.pid, err)
		}
		fds = append(fds, fd)
		idx := i
		if i == 0 {
			req.From.PIDFD = &idx
		} else {
			req.To.PIDFD = &idx
		}
	}
	var (
		mu sync.Mutex
		id string // the handoff's, once the daemon said it
	)
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		known := id
		mu.Unlock()
		if known != "" {
			c.Abort(context.Background(), known)
		}
	})
	defer stop()
	// The stream is not tied to ctx: an interrupt aborts the handoff, whose result still comes through it.
	last, err := c.Handoff(context.WithoutCancel(ctx), req, fds, func(ev api.Event) {
		switch ev.Type {
		case api.EventStarted:
			mu.Lock()
			id = ev.ID
			mu.Unlock()
			if ctx.Err() != nil { // interrupted before the ID was known
				go c.Abort(context.Background(), ev.ID)
			}
		case api.EventProgress:
			p := handoff.Progress{Stage: ev.Stage, Message: ev.Message}
			if ev.Old != nil {
				p.Count = ev.Old.Drain()
			}
			if ev.New != nil {
				p.New = ev.New.Drain()
			}
			pr.report(p)
		}
	})
	mu.Lock()
	defer mu.Unlock()
	var ae *api.Error
	switch {
	case errors.As(err, &ae):
		return nil, id, exitCodeOfKind(ae.Kind), ae
	case err != nil:
		return nil, id, exitError, err
	}
	res := last.Result
	if last.Err != nil {
		return res, id, exitCodeOfKind(last.Err.Kind), last.Err
	}
	code := exitOK
	if res != nil && res.Outcome == handoff.OutcomeTimedOut {
		code = exitTimedOut
	}
	return res, id, code, nil
}

func exitCodeOfKind(k api.Kind) int {
	switch k {
	case api.KindBadInput, api.KindForbidden, api.KindConflict, api.KindNotFound:
		return exitBadInput
	case api.KindRolledBack:
		return exitRolledBack
	case api.KindUnwatched:
		return exitTimedOut
	}
	return exitError
}

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", api.DefaultSocket, "the daemon's socket")
	jsonOut := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		return exitBadInput
	}
	hs, err := (&api.Client{Socket: *socket}).List(context.Background())
	if err != nil {
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	if *jsonOut {
		printJSON(stdout, hs)
		return exitOK
	}
	if len(hs) == 0 {
		fmt.Fprintln(stdout, "no handoff in progress")
		return exitOK
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tFROM\tTO\tLISTENERS\tSTAGE\tOLD\tNEW\tAGE\tDEADLINE")
	now := time.Now()
	for _, h := range hs {
		deadline := "-"
		if !h.Deadline.IsZero() {
			deadline = "in " + h.Deadline.Sub(now).Round(time.Second).String()
		}
		stage := string(h.Stage)
		if h.Resumed {
			stage += " (resumed)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%d\t%d\t%s\t%s\n", h.ID, h.From, h.To, strings.Join(h.Listeners, ","), stage,
			h.Old.Conns+h.Old.Queued+h.Old.Detached, h.New.Conns+h.New.Queued, now.Sub(h.Started).Round(time.Second), deadline)
	}
	tw.Flush()
	return exitOK
}

func cmdAbort(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("abort", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", api.DefaultSocket, "the daemon's socket")
	jsonOut := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return exitBadInput
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: draind abort [--socket PATH] [--json] ID")
		return exitBadInput
	}
	if err := (&api.Client{Socket: *socket}).Abort(context.Background(), fs.Arg(0)); err != nil {
		fmt.Fprintf(stderr, "draind: %v\n", err)
		var ae *api.Error
		if errors.As(err, &ae) {
			return exitCodeOfKind(ae.Kind)
		}
		return exitError
	}
	if *jsonOut {
		printJSON(stdout, struct {
			ID         string `json:"id"`
			RolledBack bool   `json:"rolled_back"`
		}{fs.Arg(0), true})
		return exitOK
	}
	fmt.Fprintf(stdout, "handoff %s rolled back\n", fs.Arg(0))
	return exitOK
}
