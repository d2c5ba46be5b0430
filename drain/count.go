// Package drain counts the in-flight connections of the old side of a handoff, decides when it has drained (or
// when its deadline has passed), and signals it through its pidfd.
package drain

import (
	"context"
	"errors"
	"math"
	"time"

	"github.com/draind/draind/loader"
)

// Count is what a process tree holds on the handed-off ports.
type Count struct {
	Conns  int // connections held by the tree (accepted, not listening), in any state `ss` lists
	Queued int // connections waiting in the accept queues of its listeners on those ports
	// Detached: connections the tree took that no fd table holds but a socket file still does (in flight in an
	// SCM_RIGHTS message, or an io_uring fixed file). Only Wait looks for them, when the others reach zero.
	Detached int
}

// Total is Conns+Queued+Detached: the drain is over when it is zero.
func (c Count) Total() int { return c.Conns + c.Queued + c.Detached }

// DefaultReconcile is how often Wait takes a snapshot even though no event said the count may have moved: a guard
// against what the events cannot see (a socket received over SCM_RIGHTS from outside the tree, a listener that
// arrives already listening).
const DefaultReconcile = 3 * time.Second

// queuePoll is how often Wait takes a full snapshot while a recent one saw connections queued on the tree's
// listeners (more seldom when full snapshots are slow: 20 times the last one's duration, at most 5% of a CPU; and
// twice as seldom after each one that saw no fewer queued than the one before, as when the tree does not accept).
const queuePoll = 10 * time.Millisecond

// WaitOptions configures Wait. The zero value waits for kernel events and reconciles every DefaultReconcile.
type WaitOptions struct {
	// Poll, if positive, replaces the events: a snapshot every Poll (the way draind worked before the events; kept
	// as the baseline of the reaction benchmark).
	Poll time.Duration
	// Reconcile is the longest Wait goes without a snapshot when no event comes (longer when full snapshots are
	// slow: 500 times the last one's duration).
	Reconcile time.Duration
	// Tagged says the caller has just counted the Counter (Count tags a tracked tree's sockets), so Wait may start
	// with a fast snapshot.
	Tagged bool
	// Progress, if set, is called with every count that differs from the previous one, except the final zero (which
	// Wait returns without delay).
	Progress func(Count)
}

// ErrDeadline is returned by Wait when ctx's deadline passed before the count reached zero.
var ErrDeadline = errors.New("drain deadline passed")

// Wait counts until the total is zero, returning the last count. It returns ErrDeadline (with the last count) if
// ctx's deadline passes first, and ctx's error if ctx is cancelled.
//
// Between snapshots it sleeps until the kernel reports events on the tree's sockets. Each counted event lowers the
// count by at most one, so after a snapshot of N it needs N of them (or a listener opening or closing, which needs a
// new snapshot) before the count can be zero: a drain of 100,000 connections takes a handful of snapshots, and the last
// connection's close is seen within one snapshot's time. The first snapshot, those after a listener opened or closed,
// and the reconciliations are full (they tag the tree's sockets for the events); the others are fast. A connection that
// waited in a listener's queue since before the listener was tagged is not tagged when the tree accepts it (connections
// born later are: they inherit their listener's tag), and no event says it was accepted: so until two full snapshots in
// a row, both since the last listener opened or closed, saw nothing queued on the tree's listeners, Wait takes a full
// one every 10 ms or so, which tags what the tree accepted meanwhile (a connection accepted during one, into an fd slot
// it had passed, is seen by the next). (After a handoff's flip the old listeners get no new connections: this lasts
// until the old side has accepted its queue, or draind moved it.) When the count reaches zero, Wait also looks for
// connections the tree took that no fd table holds (see Count.Detached) and goes on waiting while there are some. The
// Counter must track its tree.
func Wait(ctx context.Context, c *Counter, opts WaitOptions) (Count, error) {
	if opts.Reconcile <= 0 {
		opts.Reconcile = DefaultReconcile
	}
	if !c.track && opts.Poll <= 0 {
		return Count{}, errors.New("wait for drain: counter does not track its tree")
	}
	last := Count{Conns: -1}
	// exact counts what the tree holds, and at zero what it holds outside fd tables.
	exact := func(fast bool) (Count, error) {
		n, err := c.count(fast)
		if err != nil || n.Total() > 0 {
			return n, err
		}
		return c.settle()
	}
	done := func(err error) (Count, error) {
		if errors.Is(err, context.DeadlineExceeded) {
			// One last exact count: the tree may have drained since the last snapshot.
			if n, cerr := exact(false); cerr == nil {
				if n.Total() == 0 {
					return n, nil
				}
				last = n
			}
			return last, ErrDeadline
		}
		return last, err
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	full := !opts.Tagged          // the first snapshot tags the tree's sockets
	fullTook := c.Stats().FullMax // the caller's full snapshot, if Tagged
	var now loader.MarkCount      // the events read by the wait that ended the last round, if it was woken
	woken := false
	poll, lastQueued := queuePoll, math.MaxInt // while connections were queued recently (see above)
	for {
		// Events are read before the snapshot: whatever happens from here on is in it or counted after. When a wakeup
		// ended the last round, the events it read a moment ago do as well (an event in between is then both in the
		// snapshot and counted after it, which at worst brings the next snapshot one event early).
		before := now
		if !woken {
			var err error
			if before, err = c.events(); err != nil {
				return last, err
			}
		}
		woken = false
		if tagged, _, settled := c.tagState(); before.Resnaps != tagged.Resnaps || !settled {
			// A listener opened since the last full snapshot (perhaps the caller's), or connections were queued
			// recently (perhaps accepted since, untagged): tag them.
			full = true
		}
		start := time.Now()
		n, err := exact(!full && opts.Poll <= 0)
		if err != nil {
			return last, err
		}
		if full {
			fullTook = time.Since(start)
		}
		full = false
		if n.Total() == 0 {
			return n, nil // at once: the caller is waiting to signal
		}
		if n != last && opts.Progress != nil {
			opts.Progress(n)
		}
		last = n
		if opts.Poll > 0 {
			timer.Reset(opts.Poll)
			select {
			case <-ctx.Done():
				return done(ctx.Err())
			case <-timer.C:
			}
			continue
		}
		// Reconciliations (full snapshots) cost at most 0.2% of a CPU, however many sockets they walk.
		next := max(opts.Reconcile, 500*fullTook)
		if _, queued, settled := c.tagState(); !settled {
			if queued == 0 || queued < lastQueued {
				poll = max(queuePoll, 20*fullTook)
			} else {
				poll = min(2*poll, next)
			}
			lastQueued = queued
			next = min(next, poll)
		}
		timer.Reset(next)
	wait:
		for {
			select {
			case <-ctx.Done():
				return done(ctx.Err())
			case <-timer.C:
				full = true // also tags what the events could not see arrive
				woken = false
				break wait
			case <-c.wake:
			}
			var err error
			if now, err = c.events(); err != nil {
				return last, err
			}
			woken = true
			if now.Resnaps != before.Resnaps {
				full = true // a new listener must be tagged, or a closed one's queue recounted
				break wait
			}
			if now.Changes-before.Changes >= uint64(n.Total()) {
				break wait // a fast snapshot will do: nothing new came to the tree
			}
		}
	}
}
