package steer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
)

// DefaultMoveGrace is how long MoveQueues waits, by default, for the old side to empty its accept queues itself.
const DefaultMoveGrace = 10 * time.Millisecond

// MoveOptions for MoveQueues. The zero value gives the old side DefaultMoveGrace to empty its queues itself, waits up
// to 200 ms for the holders to stop and persists nothing.
type MoveOptions struct {
	// Grace is how long the old side may take, from MoveQueues' first look, to empty its queues itself (0:
	// DefaultMoveGrace; negative: no wait): MoveQueues watches each queue and moves it as soon as the rate the old
	// side accepts at says it would take longer (a queue that has not shrunk after 1 ms is moved then). After the flip
	// an old listener's queue gets no new connections (only handshakes already under way complete into it), so a
	// server that accepts empties it within a few milliseconds even on a busy machine, and moving it would cost more
	// than it saves: the old side's holders are stopped, and the listen(2) that starts a listener again checks it
	// against every socket bound to its port (about 5 ms with the tens of thousands of a connection storm), holding
	// the port's bind hash lock, which every connection established on the port takes too.
	Grace time.Duration
	// StopTimeout bounds the wait for the old listeners' holders to stop; see proc.StopOptions.
	StopTimeout time.Duration
	// Stopping, if set, is called with the processes about to be stopped and the listeners about to be moved
	// (before each SIGSTOP, with everything stopped so far), and with nil, nil once they are all continued, so that
	// a caller can record them: a draind that dies in between leaves them stopped (and maybe a listener not
	// listening), and the next one must mend that (see Mend). An error cancels the move. A failed SIGCONT keeps the
	// record.
	Stopping func(pids []int, moving []Moving) error
}

// Moving is an old listener whose queue is being moved: where it is, and what listen(2) needs to start it again.
type Moving struct {
	PID     int    `json:"pid"`
	FD      int    `json:"fd"`
	Cookie  uint64 `json:"cookie"`
	Backlog int    `json:"backlog"`
}

// MoveResult says what MoveQueues did.
type MoveResult struct {
	Listeners int           // old listeners whose accept queue was moved
	Queued    int           // connections waiting in those queues just before the move
	Paused    time.Duration // how long they were stopped (also when the move failed)
	// Emptied is how many connections waited in the old listeners' queues when MoveQueues first looked, in the queues
	// that the old side emptied itself within the grace (and were not moved).
	Emptied int
}

// queued is an old listener with connections in its accept queue, and draind's copy of its fd.
type queued struct {
	g       *group
	l       *Listener
	fd      int
	backlog int
	first   int       // connections queued when queuedListeners looked
	at      time.Time // when it looked
}

// MoveQueues moves the connections waiting in the old listeners' accept queues to the new side, once the flip is
// done, without closing the old listeners (the old server keeps them and its accept loop). It first gives the old
// side opts.Grace to empty them itself, and moves only what it has not.
//
// The kernel moves a listener's queue only when the listener stops listening, through the selector
// (SELECT_OR_MIGRATE), which sends each queued connection to the target: the new side. So, for each old listener
// with a non-empty queue, draind stops it (shutdown(SHUT_RD) on its own pidfd_getfd copy) and starts it again at
// once (listen(2) with the same backlog; the kernel puts it back in its reuseport group), then puts it back in its
// slot (a closing listener leaves the socket array). An old process that called accept(2) in between would get
// EINVAL, which ends many servers' accept loops: so every process of the old tree (old and its descendants, except
// the subtrees of exclude, and draind) that holds one of these listeners is stopped with SIGSTOP for the duration,
// and continued after: a few milliseconds, most of it waiting for every thread to stop and walking the tree again
// once they are stopped, until no new holder (a worker forked meanwhile) shows up. Processes that cannot be stopped
// in time leave the queues where they are (an error wrapping proc.ErrNotStopped, nothing changed).
//
// A listener whose group's new listeners are all gone (checked again once the holders are stopped) is left alone.
func (s *Steering) MoveQueues(ctx context.Context, old *proc.Process, exclude []int, opts MoveOptions) (res MoveResult, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	qs, err := s.queuedListeners()
	defer func() {
		for _, q := range qs {
			unix.Close(q.fd)
		}
	}()
	if err != nil || len(qs) == 0 {
		return res, err
	}
	qs, res.Emptied, err = settle(ctx, qs, opts.Grace)
	if err != nil || len(qs) == 0 {
		return res, err
	}
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("move accept queues: %w", err)
	}
	unlock, err := s.objs.Lock()
	if err != nil {
		return res, fmt.Errorf("move accept queues: %w", err)
	}
	defer unlock()

	moving := make([]Moving, len(qs))
	for i, q := range qs {
		moving[i] = Moving{PID: q.l.Holder.PID, FD: q.l.FD, Cookie: q.l.Cookie, Backlog: q.backlog}
	}
	var (
		stops   []*proc.Stopped
		stopped []int
		opened  []*proc.Process
		seen    = map[int]bool{}
		record  bool // Stopping was told of processes about to stop
	)
	defer func() {
		for _, p := range opened {
			p.Close()
		}
	}()
	var start time.Time // the first SIGSTOP
	// Continue whatever was stopped, however this returns; the record goes only once all are running again.
	defer func() {
		if len(stops) == 0 && !record {
			return
		}
		var errs []error
		for _, st := range stops {
			errs = append(errs, st.Cont())
		}
		if len(stops) > 0 {
			res.Paused = time.Since(start)
		}
		if cerr := errors.Join(errs...); cerr != nil {
			err = errors.Join(err, fmt.Errorf("move accept queues: %w", cerr))
			return
		}
		if record {
			if perr := opts.Stopping(nil, nil); perr != nil {
				err = errors.Join(err, fmt.Errorf("move accept queues: record the processes continued: %w", perr))
			}
		}
	}()
	for round := 0; ; round++ {
		holders, err := holdersOf(old, exclude, qs, seen)
		opened = append(opened, holders...)
		if err != nil {
			return res, err
		}
		if len(holders) == 0 {
			if round == 0 {
				return res, fmt.Errorf("move accept queues: no process of %d holds the listeners any more", old.PID)
			}
			break
		}
		if start.IsZero() {
			start = time.Now()
		}
		st, err := proc.Stop(ctx, holders, proc.StopOptions{Timeout: opts.StopTimeout, Before: func(pids []int) error {
			if opts.Stopping == nil {
				return nil
			}
			if err := opts.Stopping(append(slices.Clone(stopped), pids...), moving); err != nil {
				return err
			}
			record = true
			return nil
		}})
		if err != nil {
			return res, fmt.Errorf("move accept queues: %w", err)
		}
		stops = append(stops, st)
		stopped = append(stopped, st.PIDs()...)
	}
	var errs []error
	for _, q := range qs {
		n, err := s.moveQueue(q)
		if err != nil {
			errs = append(errs, err)
		}
		if n > 0 {
			res.Listeners++
			res.Queued += n
		}
	}
	if err := errors.Join(errs...); err != nil {
		return res, fmt.Errorf("move accept queues: %w", err)
	}
	return res, nil
}

// settle waits while the old side empties the queues of qs itself fast enough to be done within grace (0:
// DefaultMoveGrace) of the first look, judged by the rate it has accepted at so far (from 1 ms on), and returns the
// listeners whose queue it does not empty that fast (closing the others' fds), and how many connections the emptied
// ones held at first. A queue that has not shrunk after 1 ms is returned then: its server is not accepting, or is
// slow (one that sleeps between accepts).
func settle(ctx context.Context, qs []queued, grace time.Duration) (move []queued, emptied int, err error) {
	if grace == 0 {
		grace = DefaultMoveGrace
	}
	const (
		observe = time.Millisecond       // before judging a rate
		poll    = 200 * time.Microsecond // between looks
	)
	for {
		waiting := qs[:0]
		for _, q := range qs {
			n, _, err := acceptQueue(q.fd)
			elapsed := time.Since(q.at)
			switch {
			case err == nil && n == 0:
				emptied += q.first
				unix.Close(q.fd)
			case err != nil || elapsed >= grace:
				move = append(move, q)
			case elapsed < observe:
				waiting = append(waiting, q)
			default:
				// At the rate so far, the rest takes n*elapsed/accepted more.
				accepted := q.first - int(n)
				if accepted > 0 && elapsed+time.Duration(n)*elapsed/time.Duration(accepted) <= grace {
					waiting = append(waiting, q)
				} else {
					move = append(move, q)
				}
			}
		}
		qs = waiting
		if len(qs) == 0 {
			return move, emptied, nil
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return append(move, qs...), emptied, fmt.Errorf("move accept queues: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// queuedListeners copies the fds of the old listeners that have connections queued, in groups whose target is the
// new side and whose new side still has a listener in the socket array.
func (s *Steering) queuedListeners() ([]queued, error) {
	var out []queued
	for _, g := range s.groups {
		var gv loader.Group
		if err := s.objs.Groups.Lookup(g.id, &gv); err != nil {
			return out, fmt.Errorf("move accept queues: read group %d: %w", g.id, err)
		}
		if gv.TargetGen != g.newGen || !s.inArray(g, g.pair.New) {
			continue
		}
		// Pairing refuses a socket that both sides hold, so an old listener is never the new side's.
		for _, l := range g.pair.Old {
			if l.Holder == nil || !s.inArray(g, []*Listener{l}) {
				continue
			}
			fd, err := l.Copy()
			if err != nil {
				continue // closed meanwhile: its queue migrated, or went with it
			}
			n, backlog, err := acceptQueue(fd)
			if err != nil || n == 0 {
				unix.Close(fd)
				continue
			}
			out = append(out, queued{g: g, l: l, fd: fd, backlog: int(backlog), first: int(n), at: time.Now()})
		}
	}
	return out, nil
}

// holdersOf returns the processes of old's tree that hold one of qs's listeners (old itself included if it does),
// draind and its descendants excepted, leaving out (and adding to) seen. The processes other than old are opened for
// the caller to close.
func holdersOf(old *proc.Process, exclude []int, qs []queued, seen map[int]bool) ([]*proc.Process, error) {
	inodes := map[uint64]bool{}
	for _, q := range qs {
		inodes[q.l.Inode] = true
	}
	var out []*proc.Process
	// draind holds copies of the listeners now: if it runs in the old tree (a server that started it), it must not
	// stop itself.
	for _, pid := range proc.Tree(old.PID, append(slices.Clone(exclude), os.Getpid())...) {
		if seen[pid] {
			continue
		}
		socks, err := proc.Sockets(pid)
		if err != nil {
			continue // exited meanwhile
		}
		if !slices.ContainsFunc(socks, func(s proc.SocketFD) bool { return inodes[s.Inode] }) {
			continue
		}
		p, err := proc.Open(pid)
		if err != nil {
			continue
		}
		seen[pid] = true
		out = append(out, p)
	}
	return out, nil
}

// moveQueue stops and restarts one old listener (its holders are stopped) and puts it back in its slot; it returns
// how many connections were queued (and moved). A listener whose queue emptied meanwhile, or whose group's new side
// is gone, is left alone.
func (s *Steering) moveQueue(q queued) (int, error) {
	queue, _, err := acceptQueue(q.fd)
	if err != nil {
		return 0, fmt.Errorf("read queue of %s: %w", q.l, err)
	}
	if queue == 0 || !s.inArray(q.g, q.g.pair.New) {
		return 0, nil
	}
	if err := unix.Shutdown(q.fd, unix.SHUT_RD); err != nil {
		return 0, fmt.Errorf("shut down listener %s: %w", q.l, err)
	}
	n := int(queue)
	if err := unix.Listen(q.fd, q.backlog); err != nil {
		// The old server's listener is dead now: its accept loop will see EINVAL. Say so loudly.
		return n, fmt.Errorf("listen again on %s (the old server can no longer accept on it): %w", q.l, err)
	}
	// A listener whose port was not chosen by its bind (port 0) gets a new one when it listens again.
	if sa, err := unix.Getsockname(q.fd); err == nil && sockPort(sa) != int(q.l.Addr.Port()) {
		return n, fmt.Errorf("listen again on %s: it listens on port %d now", q.l, sockPort(sa))
	}
	slot := q.g.slots[q.l.Cookie]
	if err := s.objs.Sockets.Update(slot, uint64(q.fd), ebpf.UpdateNoExist); err != nil {
		return n, fmt.Errorf("put %s back in slot %d: %w", q.l, slot, explainInsert(err))
	}
	return n, nil
}

func sockPort(sa unix.Sockaddr) int {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return a.Port
	case *unix.SockaddrInet6:
		return a.Port
	}
	return -1
}

// Relisten makes m listen again if a draind died between the two halves of its move (shut down, not listening yet),
// and reports whether it had to. The socket goes back in its reuseport group; its slot in the socket array stays
// empty (the selector then falls back to the other side's listeners).
func Relisten(m Moving) (bool, error) {
	p, err := proc.Open(m.PID)
	if errors.Is(err, proc.ErrNoProcess) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("listen again: %w", err)
	}
	defer p.Close()
	fd, err := p.GetFD(m.FD)
	if err != nil {
		return false, nil // closed meanwhile
	}
	defer unix.Close(fd)
	if c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err != nil || c != m.Cookie {
		return false, nil // the fd now holds another socket
	}
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v != 0 {
		return false, err
	}
	if err := unix.Listen(fd, m.Backlog); err != nil {
		return false, fmt.Errorf("listen again on pid %d fd %d: %w", m.PID, m.FD, err)
	}
	return true, nil
}
