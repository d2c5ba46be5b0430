package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/api"
	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

// portList is a repeatable --port flag (also accepts comma-separated lists).
type portList []uint16

func (p *portList) String() string { return fmt.Sprint(*p) }

func (p *portList) Set(s string) error {
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("not a port: %q", f)
		}
		*p = append(*p, uint16(n))
	}
	return nil
}

func cmdHandoff(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		ports        portList
		from         = fs.Int("from", 0, "PID of the old process (required)")
		to           = fs.Int("to", 0, "PID of the new process (required)")
		sigName      = fs.String("signal", "TERM", "signal for the old process, once drained or at the flip (--signal-at): a name or number")
		timeout      = fs.Duration("timeout", 5*time.Minute, "drain deadline")
		onTimeout    = fs.String("on-timeout", "signal", "at the deadline: signal, kill or abort (roll back)")
		signalAt     = fs.String("signal-at", "drained", "when to signal the old process: drained (once it holds no connection, accepted or queued) or flip (right after the flip: its queue migrates to the new process when it closes its listener; only for servers whose graceful shutdown answers every connection they accepted)")
		queue        = fs.String("queue", "move", "the old listeners' accept queues at the flip: move (to the new process, at once: the old server's processes are stopped (SIGSTOP) for the few milliseconds it takes, its listeners stay open) or keep (the old server accepts them)")
		killAfter    = fs.Duration("kill-after", 0, "send SIGKILL if the old process has not exited this long after its signal (with --signal-at flip: after the drain ended; 0: never)")
		exitWait     = fs.Duration("exit-wait", 30*time.Second, "how long to watch for the old process's exit")
		readyURL     = fs.String("ready-url", "", "URL that must answer 2xx (asked from the new process's network namespace) before the flip")
		readyTimeout = fs.Duration("ready-timeout", 10*time.Second, "how long to wait for --ready-url")
		pinDir       = fs.String("pin-dir", "", "bpffs directory for draind's pinned maps (default /sys/fs/bpf/draind)")
		poll         = fs.Duration("poll", 0, "count the old side's connections by polling at this interval instead of waiting for kernel events (for comparison; 0: events)")
		jsonOut      = fs.Bool("json", false, "print the result as JSON")
		verbose      = fs.Bool("v", false, "debug logs")
		socket       = fs.String("socket", api.DefaultSocket, "the daemon's socket: used when it exists")
		standalone   = fs.Bool("standalone", false, "run the handoff in this process even if a daemon serves --socket")
		viaDaemon    = fs.Bool("daemon", false, "require the daemon (fail if it does not serve --socket)")
		name         = fs.String("name", "", "a name for the handoff's metrics (the daemon's listener series)")
		execNew      = fs.Bool("exec", false, "start the new process: the command after -- (prepare the old one, start the command with its user, groups, cgroup, network namespace, working directory and environment, wait until it listens; then hand off)")
		listenWait   = fs.Duration("listen-timeout", 30*time.Second, "with --exec: how long to wait for the new process to listen")
		pidFile      = fs.String("pid-file", "", "with --exec: write the new process's PID here once it took over")
	)
	fs.Var(&ports, "port", "hand off only this port (repeatable; default: every port the old process listens on)")
	if err := fs.Parse(args); err != nil {
		return exitBadInput
	}
	fail := badInput(stderr)
	switch {
	case *execNew && *to != 0:
		return fail("--exec starts the new process: it excludes --to")
	case *execNew && fs.NArg() == 0:
		return fail("--exec needs the new process's command after --: draind handoff --from PID --exec -- CMD ARGS...")
	case !*execNew && fs.NArg() > 0:
		return fail("unexpected argument %q", fs.Arg(0))
	case !*execNew && (*listenWait != 30*time.Second || *pidFile != ""):
		return fail("--listen-timeout and --pid-file go with --exec")
	case *from == 0 || (*to == 0 && !*execNew):
		return fail("--from and --to (or --exec) are required")
	case *listenWait <= 0:
		return fail("--listen-timeout %s is not positive", *listenWait)
	}
	sig, err := drain.ParseSignal(*sigName)
	if err != nil {
		return fail("%v", err)
	}
	ot, err := drain.ParseOnTimeout(*onTimeout)
	if err != nil {
		return fail("%v", err)
	}
	at, err := drain.ParseSignalAt(*signalAt)
	if err == nil {
		err = at.Allows(ot)
	}
	if err != nil {
		return fail("%v", err)
	}
	q, err := drain.ParseQueue(*queue)
	if err != nil {
		return fail("%v", err)
	}
	if *timeout <= 0 {
		return fail("--timeout %s is not positive", *timeout)
	}
	if *readyTimeout <= 0 || *exitWait <= 0 || *killAfter < 0 || *poll < 0 {
		return fail("--ready-timeout and --exit-wait must be positive, --kill-after and --poll not negative")
	}
	if *standalone && *viaDaemon {
		return fail("--standalone and --daemon exclude each other")
	}
	client := &api.Client{Socket: *socket}
	useDaemon := *viaDaemon || (!*standalone && client.Available())
	if useDaemon && (*poll > 0 || *pinDir != "") {
		return fail("--poll and --pin-dir are for --standalone runs (the daemon has its own pin dir)")
	}
	if !useDaemon && *name != "" {
		return fail("--name names the daemon's metrics series: it needs the daemon (no socket at %s)", *socket)
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pr := newProgress(stderr, false) // progress goes to stderr, so --json output on stdout stays clean
	var (
		res  *handoff.Result
		code int
		id   string
		neu  *started
	)
	// A standalone --exec loads the counting programs while the new process starts, not after.
	tracker := func() *drain.Tracker { return nil }
	if *execNew && !useDaemon && *poll == 0 {
		ch := make(chan *drain.Tracker, 1)
		go func() {
			t, err := drain.NewTracker(drain.TrackerOptions{Logger: logger})
			if err != nil {
				t = nil // handoff.Run loads its own and reports the error
			}
			ch <- t
		}()
		var t *drain.Tracker
		var once sync.Once
		tracker = func() *drain.Tracker { once.Do(func() { t = <-ch }); return t }
		defer func() {
			if t := tracker(); t != nil {
				t.Close()
			}
		}()
	}
	if *execNew {
		old, err := proc.Open(*from)
		if err != nil {
			return fail("old process: %v", err)
		}
		eo := execOptions{from: old, ports: ports, argv: fs.Args(), pinDir: *pinDir, listenTimeout: *listenWait, say: pr.say}
		if useDaemon {
			eo.client = client
		}
		neu, err = startNew(ctx, eo)
		old.Close()
		if errors.Is(err, errExecInput) {
			return fail("%s", strings.TrimPrefix(err.Error(), errExecInput.Error()+": "))
		}
		if err != nil {
			fmt.Fprintf(stderr, "draind: %v\n", err)
			return exitError
		}
		defer neu.close()
		*to = neu.p.PID
		pr.onStage = func(ev handoff.Progress) {
			switch ev.Stage {
			case handoff.StageFlipped:
				if err := mainPID(*to, *pidFile); err != nil {
					logger.Warn("tell the supervisor the new main PID", "pid", *to, "err", err)
				}
			case handoff.StageRolledBack:
				if err := mainPID(*from, *pidFile); err != nil {
					logger.Warn("tell the supervisor the main PID", "pid", *from, "err", err)
				}
			}
		}
	}
	if useDaemon {
		req := api.HandoffRequest{
			Name: *name, Ports: ports, Signal: *sigName, Timeout: api.Duration(*timeout), OnTimeout: *onTimeout, SignalAt: string(at), Queue: string(q),
			KillAfter: api.Duration(*killAfter), ExitWait: api.Duration(*exitWait), ReadyURL: *readyURL, ReadyTimeout: api.Duration(*readyTimeout),
		}
		res, id, code, err = handoffViaDaemon(ctx, client, *from, *to, req, pr)
	} else {
		res, err = handoff.Run(ctx, handoff.Options{
			From: *from, To: *to, Ports: ports, Signal: sig, Timeout: *timeout, OnTimeout: ot, SignalAt: at, Queue: q,
			KillAfter: *killAfter, ExitWait: *exitWait, ReadyURL: *readyURL, ReadyTimeout: *readyTimeout,
			PinDir: *pinDir, Poll: *poll, Logger: logger, Progress: pr.report, Tracker: tracker(),
		})
		code = exitCode(res, err)
	}
	pr.done()
	if neu != nil && !takesOver(res, err) {
		neu.stop(pr.say)
	}
	if *jsonOut {
		out := struct {
			*handoff.Result
			ID       string `json:"id,omitempty"`
			Error    string `json:"error,omitempty"`
			ExitCode int    `json:"exit_code"`
			NewPID   int    `json:"new_pid,omitempty"`
		}{res, id, errString(err), code, newPID(neu, res, err)}
		printJSON(stdout, out)
		return code
	}
	if err != nil && (res == nil || res.Outcome == handoff.OutcomeFailed && res.Listeners == nil) {
		fmt.Fprintf(stderr, "draind: %v\n", strings.TrimPrefix(err.Error(), handoff.ErrBadInput.Error()+": "))
		return code
	}
	printSummary(stdout, res)
	if pid := newPID(neu, res, err); pid != 0 {
		fmt.Fprintf(stdout, "  new process        %d (started by draind)\n", pid)
	}
	if err != nil {
		fmt.Fprintf(stderr, "draind: %v\n", err)
	}
	return code
}

// newPID is the PID of the process `--exec` started, when it took over.
func newPID(s *started, res *handoff.Result, err error) int {
	if s == nil || !takesOver(res, err) {
		return 0
	}
	return s.p.PID
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func exitCode(res *handoff.Result, err error) int {
	switch {
	case errors.Is(err, handoff.ErrBadInput):
		return exitBadInput
	case errors.Is(err, handoff.ErrRolledBack):
		return exitRolledBack
	case errors.Is(err, handoff.ErrUnwatched):
		return exitTimedOut
	case err != nil:
		return exitError
	case res.Outcome == handoff.OutcomeTimedOut:
		return exitTimedOut
	}
	return exitOK
}

func printSummary(w io.Writer, r *handoff.Result) {
	yes := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}
	fmt.Fprintf(w, "handoff %d -> %d: %s\n", r.From, r.To, r.Outcome)
	fmt.Fprintf(w, "  listeners          %s\n", strings.Join(r.Listeners, ", "))
	if r.Outcome == handoff.OutcomeRolledBack {
		fmt.Fprintf(w, "  rolled back        %s\n", r.RollbackReason)
		fmt.Fprintf(w, "  old signalled      no\n")
	} else {
		fmt.Fprintf(w, "  in flight at flip  %d\n", r.InFlightAtFlip)
		if r.QueueMoved > 0 {
			fmt.Fprintf(w, "  queue moved        %d connection(s) to the new process (old side paused %s)\n", r.QueueMoved, r.QueuePaused.Round(time.Microsecond))
		}
		if r.QueueEmptied > 0 {
			fmt.Fprintf(w, "  queue kept         %d connection(s) the old process accepted itself within %s\n", r.QueueEmptied, steer.DefaultMoveGrace)
		}
		when := ""
		if r.SignalAt == drain.SignalFlip {
			when = " at the flip"
			fmt.Fprintf(w, "  left at drain end  %d\n", r.Left)
		} else {
			fmt.Fprintf(w, "  left at signal     %d\n", r.Left)
		}
		fmt.Fprintf(w, "  time to drain      %s\n", r.DrainTime.Round(time.Millisecond))
		fmt.Fprintf(w, "  signal sent        SIG%s%s (delivered: %s, SIGKILL after: %s)\n", r.Signal, when, yes(r.Signalled), yes(r.Killed))
		fmt.Fprintf(w, "  old process exit   %s", yes(r.ExitSeen))
		if r.ExitSeen {
			fmt.Fprintf(w, " (%s after the signal)", r.ExitWait.Round(time.Millisecond))
		}
		fmt.Fprintln(w)
		if r.SteeringLeft {
			fmt.Fprintf(w, "  steering           left in place: old listeners are still open\n")
		}
	}
	fmt.Fprintf(w, "  selector           %d steered, %d fell back, %d migrated, %d left to the kernel\n", r.Steered, r.Fallbacks, r.Migrated, r.Failed)
}

// progress prints handoff progress: one updating line on a terminal, plain lines otherwise.
type progress struct {
	w     io.Writer
	tty   bool
	quiet bool
	start time.Time
	open  bool // an updating line is on screen
	// onStage, if set, sees every report first.
	onStage func(handoff.Progress)
}

// say prints a line of its own among the progress.
func (p *progress) say(format string, a ...any) {
	if p.quiet {
		return
	}
	p.done()
	fmt.Fprintf(p.w, "[%8s] %s\n", time.Since(p.start).Round(time.Millisecond), fmt.Sprintf(format, a...))
}

func newProgress(w io.Writer, quiet bool) *progress {
	p := &progress{w: w, quiet: quiet, start: time.Now()}
	if f, ok := w.(*os.File); ok {
		_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
		p.tty = err == nil
	}
	return p
}

func (p *progress) report(ev handoff.Progress) {
	if p.onStage != nil {
		p.onStage(ev)
	}
	if p.quiet {
		return
	}
	at := time.Since(p.start).Round(time.Millisecond)
	if ev.Stage == handoff.StageDraining {
		detached := ""
		if ev.Count.Detached > 0 {
			detached = fmt.Sprintf(", %d held outside any fd table", ev.Count.Detached)
		}
		line := fmt.Sprintf("[%8s] draining: %d connection(s) left (%d accepted, %d queued%s); new side: %d", at, ev.Count.Total(), ev.Count.Conns, ev.Count.Queued, detached, ev.New.Total())
		if p.tty {
			fmt.Fprintf(p.w, "\r\033[K%s", line)
			p.open = true
			return
		}
		fmt.Fprintln(p.w, line)
		return
	}
	p.done()
	msg := string(ev.Stage)
	if ev.Message != "" {
		msg += ": " + ev.Message
	}
	fmt.Fprintf(p.w, "[%8s] %s\n", at, msg)
}

func (p *progress) done() {
	if p.open {
		fmt.Fprintln(p.w)
		p.open = false
	}
}
