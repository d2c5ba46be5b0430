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

// MoveOptions for MoveQueues. The zero value waits up to 200 ms for the holders to stop and persists nothing.
type MoveOptions struct {
	// StopTimeout bounds the wait for the old listeners' holders to stop; see proc.StopOptions.
	StopTimeout time.Duration
	// Stopping, if set, is called with the PIDs about to be stopped, and again with nil once they are continued,
	// so that a caller can record them: a draind that dies in between leaves them stopped, and the next one must
	// continue them. An error from the first call cancels the move.
	Stopping func(pids []int) error
}

// MoveResult says what MoveQueues did.
type MoveResult struct {
	Listeners int           // old listeners whose accept queue was moved
	Queued    int           // connections waiting in those queues just before the move
	Stopped   []int         // the holders that were stopped meanwhile
	Paused    time.Duration // how long they were stopped
}

// queued is an old listener with connections in its accept queue, and draind's copy of its fd.
type queued struct {
	l       *Listener
	slot    uint32
	fd      int
	backlog int
}

// MoveQueues moves the connections waiting in the old listeners' accept queues to the new side, once the flip is
// done, without closing the old listeners (the old server keeps them and its accept loop).
//
// The kernel moves a listener's queue only when the listener stops listening, through the selector
// (SELECT_OR_MIGRATE), which sends each queued connection to the target: the new side. So, for each old listener
// with a non-empty queue, draind stops it (shutdown(SHUT_RD) on its own pidfd_getfd copy) and starts it again at
// once (listen(2) with the same backlog; the kernel puts it back in its reuseport group), then puts it back in its
// slot (a closing listener leaves the socket array). An old process that called accept(2) in between would get
// EINVAL, which ends many servers' accept loops: so every process of the old tree (old and its descendants, except
// the subtrees of exclude) that holds one of these listeners is stopped with SIGSTOP for the duration, and continued
// after (a fraction of a millisecond of work). Processes that cannot be stopped in time leave the queues where they
// are (an error wrapping proc.ErrNotStopped, nothing changed).
//
// A listener shared with the new side, or whose group's new listeners are all gone, is left alone.
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
	holders, err := holdersOf(old, exclude, qs)
	defer func() {
		for _, h := range holders {
			if h != old {
				h.Close()
			}
		}
	}()
	if err != nil {
		return res, err
	}
	pids := make([]int, len(holders))
	for i, h := range holders {
		pids[i] = h.PID
	}
	if opts.Stopping != nil {
		if err := opts.Stopping(pids); err != nil {
			return res, fmt.Errorf("move accept queues: record the processes to stop: %w", err)
		}
		defer func() {
			if perr := opts.Stopping(nil); perr != nil {
				err = errors.Join(err, fmt.Errorf("move accept queues: record the processes continued: %w", perr))
			}
		}()
	}
	start := time.Now()
	stopped, err := proc.Stop(ctx, holders, proc.StopOptions{Timeout: opts.StopTimeout})
	if err != nil {
		return res, fmt.Errorf("move accept queues: %w", err)
	}
	res.Stopped = stopped.PIDs()
	var errs []error
	for _, q := range qs {
		n, err := s.moveQueue(q)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		res.Listeners++
		res.Queued += n
	}
	errs = append(errs, stopped.Cont())
	res.Paused = time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return res, fmt.Errorf("move accept queues: %w", err)
	}
	return res, nil
}

// queuedListeners copies the fds of the old listeners that have connections queued, in groups whose target is the
// new side and whose new side still has a listener in the socket array.
func (s *Steering) queuedListeners() ([]queued, error) {
	var out []queued
	for _, g := range s.groups {
		var gv loader.Group
		if err := s.objs.Groups.Lookup(g.id, &gv); err != nil {
			return out, fmt.Errorf("read group %d: %w", g.id, err)
		}
		if gv.TargetGen != g.newGen || !s.inArray(g, g.pair.New) {
			continue
		}
		newCookies := map[uint64]bool{}
		for _, l := range g.pair.New {
			newCookies[l.Cookie] = true
		}
		for _, l := range g.pair.Old {
			if l.Holder == nil || newCookies[l.Cookie] || !s.inArray(g, []*Listener{l}) {
				continue
			}
			fd, err := l.Copy()
			if err != nil {
				continue // closed meanwhile: its queue migrated, or went with it
			}
			info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
			if err != nil || info.Unacked == 0 {
				unix.Close(fd)
				continue
			}
			out = append(out, queued{l: l, slot: g.slots[l.Cookie], fd: fd, backlog: int(info.Sacked)})
		}
	}
	return out, nil
}

// inArray reports whether any of ls is in its slot of the socket array (a closed listener leaves it).
func (s *Steering) inArray(g *group, ls []*Listener) bool {
	for _, l := range ls {
		var c uint64
		if slot, ok := g.slots[l.Cookie]; ok && s.objs.Sockets.Lookup(slot, &c) == nil && c == l.Cookie {
			return true
		}
	}
	return false
}

// holdersOf returns the processes of old's tree that hold one of qs's listeners (old itself included if it does),
// draind and its descendants excepted.
func holdersOf(old *proc.Process, exclude []int, qs []queued) ([]*proc.Process, error) {
	inodes := map[uint64]bool{}
	for _, q := range qs {
		inodes[q.l.Inode] = true
	}
	var out []*proc.Process
	// draind holds copies of the listeners now: if it runs in the old tree (a server that started it), it must not
	// stop itself.
	for _, pid := range proc.Tree(old.PID, append(slices.Clone(exclude), os.Getpid())...) {
		socks, err := proc.Sockets(pid)
		if err != nil {
			continue // exited meanwhile
		}
		if !slices.ContainsFunc(socks, func(s proc.SocketFD) bool { return inodes[s.Inode] }) {
			continue
		}
		if pid == old.PID {
			out = append(out, old)
			continue
		}
		p, err := proc.Open(pid)
		if err != nil {
			continue
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("move accept queues: no process of %d holds the listeners any more", old.PID)
	}
	return out, nil
}

// moveQueue stops and restarts one old listener (its holders are stopped) and puts it back in its slot; it returns
// how many connections were queued.
func (s *Steering) moveQueue(q queued) (int, error) {
	info, err := unix.GetsockoptTCPInfo(q.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("read queue of %s: %w", q.l, err)
	}
	if err := unix.Shutdown(q.fd, unix.SHUT_RD); err != nil {
		return 0, fmt.Errorf("stop listener %s: %w", q.l, err)
	}
	if err := unix.Listen(q.fd, q.backlog); err != nil {
		// The old server's listener is dead now: its accept loop will see EINVAL. Say so loudly.
		return 0, fmt.Errorf("listen again on %s (the old server can no longer accept on it): %w", q.l, err)
	}
	if err := s.objs.Sockets.Update(q.slot, uint64(q.fd), ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("put %s back in slot %d: %w", q.l, q.slot, explainInsert(err))
	}
	return int(info.Unacked), nil
}
