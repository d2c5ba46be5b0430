package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ---- the pre-fork holder (HolderOptions.Workers > 0): a master and its workers ----
//
// The master opens the listening socket and starts the workers as its children (Pdeathsig SIGKILL: they die with
// it), handing them the socket as fd 3. Each worker runs the single-process holder's epoll loop on it, holding at
// most PerWorker connections; the master accepts nothing. The master relays control commands to all workers over
// their stdin, sums up their counts (which they report to it as events on their stdout) and reports the sums to
// its parent as its own.

// holderWorkerOptions are the options of a pre-fork holder's worker.
type holderWorkerOptions struct {
	Holder HolderOptions
	Index  int
}

// holderListenerFD is the fd of the listening socket in a worker (its first ExtraFiles entry).
const holderListenerFD = 3

// holderWorkerStartTimeout bounds how long the master waits for its workers to be ready.
const holderWorkerStartTimeout = 30 * time.Second

// holderWorkerExitTimeout bounds how long the master waits for its workers to exit after an exit signal before it
// kills them.
const holderWorkerExitTimeout = 30 * time.Second

// runHolderWorker runs a pre-fork holder's worker: the holder's loop on the inherited listener, holding at most
// PerWorker connections.
func runHolderWorker(optsJSON []byte) error {
	var wo holderWorkerOptions
	if err := json.Unmarshal(optsJSON, &wo); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	opts := wo.Holder.withDefaults()
	nofile, err := raiseNofile()
	if err != nil {
		return err
	}
	cmds, err := newCmdQueue()
	if err != nil {
		return err
	}
	watchSignals(cmds)
	lfd := holderListenerFD
	if v, err := unix.GetsockoptInt(lfd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v != 1 {
		return fmt.Errorf("inherit listener: fd %d is not a listening socket (SO_ACCEPTCONN %d, %v)", lfd, v, err)
	}
	// O_NONBLOCK belongs to the open file description, which the master and all workers share: every worker sets
	// it and nothing clears it (see runHolderMaster).
	if err := unix.SetNonblock(lfd, true); err != nil {
		return fmt.Errorf("set listener nonblocking: %w", err)
	}
	unix.CloseOnExec(lfd)
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return fmt.Errorf("get listener address: %w", err)
	}
	limit := wo.Holder.PerWorker
	if limit == 0 {
		limit = int(nofile) - 100
	}
	if limit <= 0 {
		return fmt.Errorf("RLIMIT_NOFILE %d leaves no room for connections", nofile)
	}
	return runHolderLoop(opts, cmds, lfd, addrPortOf(sa), nofile, limit)
}

// holderMaster is the master of a pre-fork holder.
type holderMaster struct {
	opts    HolderOptions
	workers []*holderWorker

	mu     sync.Mutex
	lf     *os.File // the master's copy of the listening socket; nil once closed
	paused bool
	final  bool // the final counts are reported: nothing more is
}

// holderWorker is the master's handle on one of its workers.
type holderWorker struct {
	idx       int
	p         *proc
	ready     chan struct{} // closed on its "listening" event
	readyOnce sync.Once

	// Guarded by holderMaster.mu.
	stats  HolderStats // as last reported
	exited bool        // it reported its final counts ("exiting")
	errMsg string      // its "error" event
}

func (w *holderWorker) pid() int { return w.p.cmd.Process.Pid }

// runHolderMaster runs the master of a pre-fork holder until an exit signal (it then ends the workers and exits)
// or the unexpected exit of a worker (it then kills the others and returns an error).
func runHolderMaster(opts HolderOptions) error {
	m := &holderMaster{opts: opts}
	exitc := make(chan os.Signal, 1)
	watchMasterSignals(exitc)
	lfd, addr, err := holderListen(opts)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	// The master never accepts, so its copy may block: that keeps the os.File out of the runtime's poller (which
	// every incoming connection would wake), and handing it to a child (File.Fd) then leaves O_NONBLOCK alone,
	// which would otherwise be cleared under the workers already accepting. Each worker sets it.
	if err := unix.SetNonblock(lfd, false); err != nil {
		unix.Close(lfd)
		return fmt.Errorf("set listener blocking: %w", err)
	}
	m.lf = os.NewFile(uintptr(lfd), "listener")
	if err := m.startWorkers(); err != nil {
		m.killWorkers(nil)
		return err
	}
	pids := make([]int, len(m.workers))
	for i, w := range m.workers {
		pids[i] = w.pid()
	}
	emit(event{Ev: "listening", Addr: addr.String(), PIDs: pids, Mono: MonoNow()})
	m.mu.Lock()
	m.emitStatsLocked(0)
	m.mu.Unlock()
	go readControl(m.command)

	died := make(chan *holderWorker, len(m.workers))
	for _, w := range m.workers {
		go func() {
			<-w.p.exited
			died <- w
		}()
	}
	select {
	case sig := <-exitc:
		return m.shutdown(sig)
	case w := <-died:
		return m.workerDied(w)
	}
}

// watchMasterSignals reports the signals in reportSignals as "signal" events, the monotonic time read as soon as
// the signal is received, and hands an exit signal to exitc after its event is written.
func watchMasterSignals(exitc chan<- os.Signal) {
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, reportSignals...)
	go func() {
		for sig := range sigc {
			mono := MonoNow()
			emit(event{Ev: "signal", Signal: int(sig.(syscall.Signal)), Mono: mono})
			if isExitSignal(sig) {
				select {
				case exitc <- sig:
				default: // an exit is under way
				}
			}
		}
	}()
}

// startWorkers starts the workers and waits until all of them listen.
func (m *holderMaster) startWorkers() error {
	m.workers = make([]*holderWorker, m.opts.Workers)
	for i := range m.workers {
		m.workers[i] = &holderWorker{idx: i, ready: make(chan struct{})}
	}
	for _, w := range m.workers {
		p, err := startProc(procConfig{
			role:       roleHolderWorker,
			opts:       holderWorkerOptions{Holder: m.opts, Index: w.idx},
			extraFiles: []*os.File{m.lf},
			onEvent:    func(ev event) { m.workerEvent(w, ev) },
		})
		if err != nil {
			return fmt.Errorf("start worker %d: %w", w.idx, err)
		}
		w.p = p
	}
	timeout := time.NewTimer(holderWorkerStartTimeout)
	defer timeout.Stop()
	for _, w := range m.workers {
		select {
		case <-w.ready:
		case <-w.p.eof:
			select {
			case <-w.ready: // listened, then exited: found out later
				continue
			default:
			}
			_, werr := w.p.wait(context.Background())
			m.mu.Lock()
			msg := w.errMsg
			m.mu.Unlock()
			if msg == "" && werr != nil {
				msg = werr.Error()
			}
			return fmt.Errorf("worker %d (pid %d) exited before listening: %s", w.idx, w.pid(), msg)
		case <-timeout.C:
			return fmt.Errorf("worker %d (pid %d) not listening after %v", w.idx, w.pid(), holderWorkerStartTimeout)
		}
	}
	return nil
}

// workerEvent handles an event of worker w (called in order from the goroutine reading its stdout).
func (m *holderMaster) workerEvent(w *holderWorker, ev event) {
	switch ev.Ev {
	case "listening":
		w.readyOnce.Do(func() { close(w.ready) })
	case "holder", "exiting":
		m.mu.Lock()
		defer m.mu.Unlock()
		if ev.Holder != nil {
			w.stats = *ev.Holder
		}
		if ev.Ev == "exiting" {
			w.exited = true
			return
		}
		// An answer to the master's own command (Seq != 0) is summed up by that command.
		if ev.Seq == 0 {
			m.emitStatsLocked(0)
		}
	case "error":
		m.mu.Lock()
		w.errMsg = ev.Err
		m.mu.Unlock()
	}
	// "signal": the master reports the signals it receives, not those it forwards.
}

// sumLocked sums up the workers' counts.
func (m *holderMaster) sumLocked() HolderStats {
	st := HolderStats{Listening: m.lf != nil, Paused: m.paused}
	for _, w := range m.workers {
		s := &w.stats
		st.Accepted += s.Accepted
		st.Open += s.Open
		st.Closing += s.Closing
		st.PeerEnded += s.PeerEnded
		st.Closed += s.Closed
		st.AcceptErrors += s.AcceptErrors
		st.HeldAtExit += s.HeldAtExit
		st.MaxFDs += s.MaxFDs
		st.LastCloseMono = max(st.LastCloseMono, s.LastCloseMono)
		st.Listening = st.Listening || s.Listening
	}
	return st
}

// emitStatsLocked reports the sums, unless the final ones are out. Holding mu while writing keeps the reports in
// order.
func (m *holderMaster) emitStatsLocked(seq int) {
	if m.final {
		return
	}
	st := m.sumLocked()
	emit(event{Ev: "holder", Seq: seq, Holder: &st})
}

// command carries out a control command from the parent (called in order from the goroutine reading stdin).
func (m *holderMaster) command(cmd string, seq int) {
	var err error
	switch cmd {
	case "stats":
		err = m.forward(cmd)
	case "pause-accept", "resume-accept":
		err = m.forward(cmd)
		m.mu.Lock()
		m.paused = cmd == "pause-accept"
		m.mu.Unlock()
	case "close-listener":
		m.closeListener()
		err = m.forward(cmd)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	// The workers' answers (their counts, then the ack) have been handled: the sums are exact.
	m.mu.Lock()
	m.emitStatsLocked(seq)
	m.mu.Unlock()
	ack(seq, err)
}

// forward sends a control command to all workers at once and waits until each has carried it out.
func (m *holderMaster) forward(cmd string) error {
	errs := make([]error, len(m.workers))
	var wg sync.WaitGroup
	for i, w := range m.workers {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
			defer cancel()
			if err := w.p.control(ctx, cmd); err != nil {
				errs[i] = fmt.Errorf("worker %d (pid %d): %w", w.idx, w.pid(), err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// closeListener closes the master's copy of the listening socket.
func (m *holderMaster) closeListener() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lf != nil {
		m.lf.Close()
		m.lf = nil
	}
}

// shutdown forwards an exit signal to the workers, waits until they have closed everything and exited (killing
// those that take too long), closes the master's listener and reports the final sums.
func (m *holderMaster) shutdown(sig os.Signal) error {
	for _, w := range m.workers {
		_ = w.p.signal(sig)
	}
	errs := m.waitWorkers(holderWorkerExitTimeout)
	m.closeListener()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range m.workers {
		if !w.exited {
			// Killed before it reported its final counts: its exit closed what it held.
			w.stats.HeldAtExit = w.stats.Open
			w.stats.Open, w.stats.Closing, w.stats.Listening = 0, 0, false
		}
	}
	st := m.sumLocked()
	m.final = true
	emit(event{Ev: "exiting", Holder: &st})
	return errors.Join(errs...)
}

// waitWorkers waits until all workers have exited, kills those still running after timeout, and returns the errors
// of those that did not exit with status 0.
func (m *holderMaster) waitWorkers(timeout time.Duration) []error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var errs []error
	for _, w := range m.workers {
		exited, err := w.p.wait(ctx)
		if !exited {
			_ = w.p.kill()
			_, _ = w.p.wait(context.Background())
			err = fmt.Errorf("did not exit within %v, killed", timeout)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("worker %d (pid %d): %w", w.idx, w.pid(), err))
		}
	}
	return errs
}

// killWorkers kills the workers that were started, except skip, and waits for them.
func (m *holderMaster) killWorkers(skip *holderWorker) {
	for _, w := range m.workers {
		if w != skip && w.p != nil {
			_ = w.p.kill()
		}
	}
	for _, w := range m.workers {
		if w != skip && w.p != nil {
			_, _ = w.p.wait(context.Background())
		}
	}
}

// workerDied ends the holder after a worker exited although it was not told to: it kills the other workers and
// returns the error to report.
func (m *holderMaster) workerDied(dead *holderWorker) error {
	_, werr := dead.p.wait(context.Background())
	m.killWorkers(dead)
	m.closeListener()
	m.mu.Lock()
	m.final = true
	msg := dead.errMsg
	m.mu.Unlock()
	status := "exit status 0"
	if werr != nil {
		status = werr.Error()
	}
	if msg != "" {
		status += ": " + msg
	}
	return fmt.Errorf("worker %d (pid %d) exited unexpectedly (%s); killed the other workers", dead.idx, dead.pid(), status)
}

// ---- parent side ----

// workerTree lets the parent of a pre-fork child kill and wait for the child's workers, which are not its own
// children: it holds a pidfd for each (so that a recycled PID is never signalled) and polls them until all have
// exited. The nil *workerTree has no workers.
type workerTree struct {
	done chan struct{} // closed once all have exited

	mu  sync.Mutex
	fds []int // pidfds; nil once all have exited
}

// watchWorkers opens pidfds for pids (those already gone are skipped) and starts polling them.
func watchWorkers(pids []int) *workerTree {
	t := &workerTree{done: make(chan struct{})}
	for _, pid := range pids {
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // ESRCH: exited and reaped by its master already
		}
		t.fds = append(t.fds, fd)
	}
	go t.wait(slices.Clone(t.fds))
	return t
}

// wait polls the pidfds until all are readable (the process has exited), then closes them.
func (t *workerTree) wait(fds []int) {
	pfds := make([]unix.PollFd, len(fds))
	for i, fd := range fds {
		pfds[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	}
	for len(pfds) > 0 {
		if _, err := unix.Poll(pfds, -1); err != nil {
			if err != unix.EINTR {
				time.Sleep(10 * time.Millisecond) // ENOMEM and the like: try again
			}
			continue
		}
		live := pfds[:0]
		for _, p := range pfds {
			if p.Revents == 0 {
				live = append(live, p)
			}
		}
		pfds = live
	}
	t.mu.Lock()
	for _, fd := range t.fds {
		unix.Close(fd)
	}
	t.fds = nil
	t.mu.Unlock()
	close(t.done)
}

// exited reports whether all workers have exited.
func (t *workerTree) exited() bool {
	if t == nil {
		return true
	}
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL to the workers still running.
func (t *workerTree) kill() {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, fd := range t.fds {
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	}
}
