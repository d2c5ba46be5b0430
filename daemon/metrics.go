package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/loader"
	"github.com/draind/draind/metrics"
)

// Metrics returns the daemon's metrics (served on Options.MetricsAddr).
func (d *Daemon) Metrics() *metrics.Metrics { return d.metrics }

// Snapshot implements metrics.Source: for each listener of the handoffs in progress, both sides' connections on its
// port (counted now, without disturbing the drains), the selector's counters of its group and the drain deadline;
// and the network namespaces they are in. Generations on one listener (A->B and B->C) make one series per side:
// the old side sums every draining generation (A and B), the new side is the newest handoff's (C), and the
// deadline is the earliest. Safe for concurrent scrapes.
func (d *Daemon) Snapshot() (metrics.Snapshot, error) {
	d.mu.Lock()
	entries := make([]*entry, 0, len(d.handoffs))
	for _, e := range d.handoffs {
		entries = append(entries, e)
	}
	d.mu.Unlock()
	slices.SortFunc(entries, func(a, b *entry) int { return a.started.Compare(b.started) })
	var snap metrics.Snapshot
	var errs []error
	index := map[listenerKey]int{} // -> index in snap.Listeners
	for _, e := range entries {
		e.mu.Lock()
		st, name, newPID := e.st, e.name, e.newPID
		e.mu.Unlock()
		if st == nil {
			continue // not steering yet: nothing of it to show
		}
		netns := netnsOf(newPID)
		snap.Handoffs++
		oldPorts, newPorts, err := e.peek()
		if err != nil {
			errs = append(errs, err)
		}
		for _, g := range st.Groups {
			key := listenerKey{g.Addr, name, netns}
			i, ok := index[key]
			if !ok {
				i = len(snap.Listeners)
				index[key] = i
				sel, err := d.selectorCounters(g.ID)
				if err != nil {
					errs = append(errs, err)
				}
				snap.Listeners = append(snap.Listeners, metrics.Listener{Addr: g.Addr, Name: name, Netns: netns, Selector: sel})
			}
			l := &snap.Listeners[i]
			if ap, err := netip.ParseAddrPort(g.Addr); err == nil {
				o, n := oldPorts[ap.Port()], newPorts[ap.Port()]
				l.Old.InFlight += o.Conns
				l.Old.Queued += o.Queued
				l.New = metrics.Count{InFlight: n.Conns, Queued: n.Queued} // the newest handoff's, as entries are in order
			}
			if !st.FlippedAt.IsZero() {
				if dl := st.FlippedAt.Add(st.Timeout); l.Deadline.IsZero() || dl.Before(l.Deadline) {
					l.Deadline = dl
				}
			}
		}
		if newPID > 0 {
			snap.Netns = append(snap.Netns, metrics.Netns{PID: newPID})
		}
	}
	return snap, errors.Join(errs...)
}

// listenerKey is what one set of listener series stands for: generations of a listener share it, pods with the same
// address in other network namespaces do not.
type listenerKey struct {
	addr, name string
	netns      uint64
}

// netnsOf is the inode number of the network namespace of process pid (0 if it is gone).
func netnsOf(pid int) uint64 {
	var st unix.Stat_t
	if unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) != nil {
		return 0
	}
	return st.Ino
}

// peek counts both sides now, per port (nothing while the handoff has no counters).
func (e *entry) peek() (old, new map[uint16]drain.Count, err error) {
	e.countMu.Lock()
	defer e.countMu.Unlock()
	if e.oldC == nil || e.newC == nil {
		return nil, nil, nil
	}
	if old, err = e.oldC.Peek(); err != nil {
		return nil, nil, fmt.Errorf("count old side of %s: %w", e.id, err)
	}
	if new, err = e.newC.Peek(); err != nil {
		return nil, nil, fmt.Errorf("count new side of %s: %w", e.id, err)
	}
	return old, new, nil
}

// selectorCounters sums a group's per-CPU counters, in the order of metrics.Listener.Selector.
func (d *Daemon) selectorCounters(id uint32) ([5]uint64, error) {
	var out [5]uint64
	var per []loader.Counters
	if err := d.objs.Stats.Lookup(id, &per); err != nil {
		return out, fmt.Errorf("read selector counters of group %d: %w", id, err)
	}
	for _, c := range per {
		out[0] += c.Selected
		out[1] += c.Fallback
		out[2] += c.Migrated
		out[3] += c.Failed
		out[4] += c.Probed
	}
	return out, nil
}
