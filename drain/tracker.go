package drain

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
	"golang.org/x/sys/unix"
)

// TrackerOptions configures NewTracker. The zero value logs to slog.Default().
type TrackerOptions struct {
	Logger *slog.Logger
	// EventsLinger is how long the event program stays attached after the last tracking Counter closed (default
	// DefaultEventsLinger): handoffs in a row then neither pay for attaching it at their start nor for detaching it
	// at their end (0.47–0.85 ms and 0.39–0.59 ms here in two runs of BenchmarkWatchEvents in package loader).
	EventsLinger time.Duration
}

// DefaultEventsLinger is TrackerOptions.EventsLinger's default.
const DefaultEventsLinger = 10 * time.Second

// Tracker counts the in-flight connections of process trees with BPF: an iterator over every task's file table
// gives exact snapshots, and a tracepoint on TCP state changes wakes the counters whose count may have moved. One
// Tracker serves any number of Counters; it holds no state that must outlive the process.
type Tracker struct {
	log  *slog.Logger
	k    *loader.Counter
	done chan struct{}

	snapMu sync.Mutex // one iteration at a time: the iterator program caches per run

	mu       sync.Mutex
	marks    map[uint64]*mark // by the process's pidfs inode
	ids      map[uint32]*mark // by mark id
	counters map[*Counter]struct{}
	ports    map[loader.PortKey]*portRef
	lastID   uint32 // the mark id given last: ids are given round the ring, so a freed one is reused last
	tracked  int    // Counters that track: the event program stays attached while there are some, and EventsLinger after
	linger   time.Duration
	detach   *time.Timer // pending detach of the event program, EventsLinger after the last tracking Counter
	lingerN  uint64      // detaches scheduled so far: a timer acts only if it is the last one (Stop cannot stop one firing)
	closed   bool
	once     sync.Once
	closeErr error

	stats TrackerStats
}

// TrackerStats says how much work the Tracker did.
type TrackerStats struct {
	Snapshots    int64         // iterator runs
	SnapshotTime time.Duration // their total duration
	SnapshotMax  time.Duration // the longest one
	Records      int64         // sockets the iterator reported, over all runs
	Wakeups      int64         // ring buffer records read
}

// mark is one entry of the BPF marks map: a process whose tree some Counter counts, or whose subtree some Counter
// cuts out of its tree.
type mark struct {
	ino      uint64
	id       uint32
	refs     int // Counters rooted here or cutting this subtree out
	tracking int // Counters rooted here that track
	cutting  int // Counters cutting this subtree out
}

// NewTracker loads the counter programs and attaches them.
func NewTracker(opts TrackerOptions) (*Tracker, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	k, err := loader.LoadCounter(loader.CounterOptions{Logger: opts.Logger})
	if err != nil {
		return nil, fmt.Errorf("start tracker: %w", err)
	}
	if opts.EventsLinger <= 0 {
		opts.EventsLinger = DefaultEventsLinger
	}
	t := &Tracker{
		log: opts.Logger, k: k, done: make(chan struct{}), linger: opts.EventsLinger,
		marks: map[uint64]*mark{}, ids: map[uint32]*mark{}, counters: map[*Counter]struct{}{},
		ports: map[loader.PortKey]*portRef{},
	}
	t.mu.Lock()
	t.scheduleDetachLocked() // LoadCounter attached the event program: off unless a tracking Counter comes soon
	t.mu.Unlock()
	go t.read()
	return t, nil
}

// read dispatches ring buffer records to the Counters rooted at their mark until the counter is closed.
func (t *Tracker) read() {
	defer close(t.done)
	for {
		id, err := t.k.ReadEvent()
		if err != nil {
			if !errors.Is(err, loader.ErrClosed) {
				t.log.Error("read counter events", "err", err)
			}
			return
		}
		t.mu.Lock()
		t.stats.Wakeups++
		for c := range t.counters {
			if c.root.id == id {
				select {
				case c.wake <- struct{}{}:
				default:
				}
			}
		}
		t.mu.Unlock()
		// Let the woken waiter run on this P now: otherwise it may sit in this P's run queue while this goroutine
		// blocks in epoll_wait, until the runtime's sysmon takes the P back (up to 10ms on an idle machine).
		runtime.Gosched()
	}
}

// Stats returns what the Tracker did so far.
func (t *Tracker) Stats() TrackerStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stats
}

// Close detaches the programs and unloads them. Counters must be closed first. Safe to call twice.
func (t *Tracker) Close() error {
	t.once.Do(func() {
		t.mu.Lock()
		t.closed = true
		if t.detach != nil {
			t.detach.Stop()
		}
		t.mu.Unlock()
		t.closeErr = t.k.Close()
		<-t.done
	})
	return t.closeErr
}

// WatchOptions configures Tracker.Watch. The zero value counts the whole tree and does not track it.
type WatchOptions struct {
	// Exclude cuts the subtrees rooted at these processes out of the tree (the new process, when the old one
	// started it, as nginx does for a binary upgrade). They must stay open while the Counter is.
	Exclude []*proc.Process
	// Track makes the kernel remember the tree's sockets so that their state changes wake Wait. Without it the
	// Counter only takes snapshots (enough for the new side of a handoff, whose count nothing waits for).
	Track bool
}

// Watch starts counting p's process tree on ports, in p's network namespace. The caller keeps p open until the
// Counter is closed.
func (t *Tracker) Watch(p *proc.Process, ports []uint16, opts WatchOptions) (_ *Counter, err error) {
	if len(ports) == 0 {
		return nil, errors.New("watch process: no ports")
	}
	ino, err := p.Ino()
	if err != nil {
		return nil, fmt.Errorf("watch process %d: %w", p.PID, err)
	}
	netns, err := p.NetNSIno()
	if err != nil {
		return nil, fmt.Errorf("watch process %d: %w", p.PID, err)
	}
	var exclIno []uint64
	for _, e := range opts.Exclude {
		i, err := e.Ino()
		if err != nil {
			return nil, fmt.Errorf("watch process %d: exclude: %w", p.PID, err)
		}
		exclIno = append(exclIno, i)
	}
	c := &Counter{t: t, p: p, netns: uint32(netns), ports: slices.Clone(ports), track: opts.Track, wake: make(chan struct{}, 1)}

	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("watch process: tracker closed")
	}
	defer func() {
		if err != nil {
			t.unwatchLocked(c)
		}
	}()
	// Ports first, then exclusions, then the root: a snapshot never sees a half-cut tree. A process may be marked
	// already (by another Counter): marks are shared and counted.
	for _, port := range c.ports {
		k := loader.PortKey{Netns: c.netns, Port: port}
		ref := t.ports[k]
		if ref == nil {
			ref = &portRef{slot: t.freeSlotLocked()}
			if err := t.k.PutPort(k, ref.slot); err != nil {
				return nil, err
			}
			t.ports[k] = ref
		}
		ref.refs++
		c.portKeys = append(c.portKeys, k)
		c.slots = append(c.slots, uint16(ref.slot))
	}
	for _, i := range exclIno {
		m, err := t.markLocked(i)
		if err != nil {
			return nil, err
		}
		m.cutting++
		c.excl = append(c.excl, m)
		if err := t.syncMarkLocked(m); err != nil {
			return nil, err
		}
	}
	m, err := t.markLocked(ino)
	if err != nil {
		return nil, err
	}
	c.root = m
	if c.track {
		// The event program goes on before the first tracked mark, so that it sees every event after the first
		// snapshot that tags the tree.
		m.tracking++
		t.tracked++ // a detach scheduled before does nothing now
		if err := t.k.WatchEvents(true); err != nil {
			return nil, err
		}
	}
	if err := t.syncMarkLocked(m); err != nil {
		return nil, err
	}
	t.counters[c] = struct{}{}
	return c, nil
}

// portRef is a watched (netns, port) pair: how many Counters watch it, and its slot in the fast snapshot.
type portRef struct {
	refs int
	slot uint32
}

// freeSlotLocked is the lowest slot no watched pair uses. Slots from loader.MaxSlots on work, but only with the full
// snapshot.
func (t *Tracker) freeSlotLocked() uint32 {
	used := map[uint32]bool{}
	for _, r := range t.ports {
		used[r.slot] = true
	}
	var s uint32
	for used[s] {
		s++
	}
	return s
}

// markLocked returns the mark of the process with pidfs inode ino, with one more reference.
func (t *Tracker) markLocked(ino uint64) (*mark, error) {
	m := t.marks[ino]
	if m == nil {
		// Sockets may keep the tag of a freed id for a while (until the next snapshot of another tree retags
		// them): give the id freed longest ago.
		m = &mark{ino: ino}
		for range loader.MaxMarks - 1 {
			t.lastID = t.lastID%(loader.MaxMarks-1) + 1
			if t.ids[t.lastID] == nil {
				m.id = t.lastID
				break
			}
		}
		if m.id == 0 {
			return nil, fmt.Errorf("watch process: all %d marks in use", loader.MaxMarks-1)
		}
		t.marks[ino], t.ids[m.id] = m, m
	}
	m.refs++
	return m, nil
}

// syncMarkLocked writes m to the BPF marks map, or deletes it when no Counter refers to it any more.
func (t *Tracker) syncMarkLocked(m *mark) error {
	if m.refs == 0 {
		delete(t.marks, m.ino)
		delete(t.ids, m.id)
		return t.k.DeleteMark(m.ino)
	}
	v := loader.Mark{Id: m.id}
	if m.tracking > 0 {
		v.Flags |= loader.MarkTrack
	}
	if m.cutting > 0 {
		v.Flags |= loader.MarkCut
	}
	return t.k.PutMark(m.ino, v)
}

// scheduleDetachLocked detaches the event program EventsLinger from now, unless a tracking Counter comes first. The
// detach holds t.mu (a Watch meanwhile waits for it, then attaches it again), and happens off the handoff's way: a
// command-line handoff, whose Tracker is new, neither waits for it to be attached before its flip nor for it to be
// detached at its end (closing the Tracker detaches it).
func (t *Tracker) scheduleDetachLocked() {
	t.lingerN++
	n := t.lingerN
	if t.detach != nil {
		t.detach.Stop()
	}
	t.detach = time.AfterFunc(t.linger, func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed || t.tracked > 0 || t.lingerN != n {
			return
		}
		if err := t.k.WatchEvents(false); err != nil {
			t.log.Warn("detach the counter's event program", "err", err)
		}
	})
}

// unwatchLocked undoes whatever part of Watch was done for c.
func (t *Tracker) unwatchLocked(c *Counter) error {
	var errs []error
	delete(t.counters, c)
	if m := c.root; m != nil {
		m.refs--
		if c.track {
			m.tracking--
			t.tracked--
		}
		errs = append(errs, t.syncMarkLocked(m))
		if c.track && t.tracked == 0 {
			t.scheduleDetachLocked()
		}
		c.root = nil
	}
	for _, m := range c.excl {
		m.refs--
		m.cutting--
		errs = append(errs, t.syncMarkLocked(m))
	}
	c.excl = nil
	for _, k := range c.portKeys {
		ref := t.ports[k]
		ref.refs--
		if ref.refs == 0 {
			delete(t.ports, k)
			errs = append(errs, t.k.DeletePort(k))
		}
	}
	c.portKeys, c.slots = nil, nil
	return errors.Join(errs...)
}

// snapshot runs the full snapshot once and hands every record to fn.
func (t *Tracker) snapshot(fn func(r *loader.SockRec)) (time.Duration, error) {
	t.snapMu.Lock()
	defer t.snapMu.Unlock()
	start := time.Now()
	n := 0
	err := t.k.Snapshot(func(r *loader.SockRec) {
		n++
		fn(r)
	})
	return t.record(start, n, err)
}

// held runs the iterator of held tagged connections once in the network namespace nsfd.
func (t *Tracker) held(nsfd int, fn func(r *loader.HeldRec)) error {
	t.snapMu.Lock()
	defer t.snapMu.Unlock()
	return t.k.Held(nsfd, fn)
}

// sums runs the fast snapshot once and hands every record to fn.
func (t *Tracker) sums(fn func(r *loader.TaskRec)) (time.Duration, error) {
	t.snapMu.Lock()
	defer t.snapMu.Unlock()
	start := time.Now()
	n := 0
	err := t.k.Sums(func(r *loader.TaskRec) {
		n++
		fn(r)
	})
	return t.record(start, n, err)
}

func (t *Tracker) record(start time.Time, records int, err error) (time.Duration, error) {
	if err != nil {
		return 0, err
	}
	d := time.Since(start)
	t.mu.Lock()
	t.stats.Snapshots++
	t.stats.SnapshotTime += d
	t.stats.SnapshotMax = max(t.stats.SnapshotMax, d)
	t.stats.Records += int64(records)
	t.mu.Unlock()
	return d, nil
}

// Counter counts one process tree's connections on some ports: see Tracker.Watch.
type Counter struct {
	t     *Tracker
	p     *proc.Process
	netns uint32
	ports []uint16
	track bool
	wake  chan struct{}

	root     *mark   // the tree's root
	excl     []*mark // the subtrees cut out of it
	portKeys []loader.PortKey
	slots    []uint16 // the slots of portKeys

	mu     sync.Mutex // one count at a time (seen, tagged, byPort)
	seen   map[uint64]struct{}
	byPort map[uint16]Count // the last count, per port
	tagged loader.MarkCount // the root mark's events just before the last full snapshot
	// Full snapshots and the tree's queues (see Wait): a connection that waited in a listener's queue since before
	// the listener was tagged is not tagged when the tree accepts it. queuedAtFull is what the last full snapshot saw
	// queued on the tree's listeners; quietFulls how many full snapshots in a row saw nothing queued.
	queuedAtFull int
	quietFulls   int
	closed       bool
	stats        CounterStats
}

// CounterStats says how many snapshots a Counter took, of each kind.
type CounterStats struct {
	Full, Fast       int           // full snapshots (they tag the sockets of a tracked tree), fast ones
	FullMax, FastMax time.Duration // the longest of each
}

// Stats returns the Counter's snapshot figures so far.
func (c *Counter) Stats() CounterStats {
	c.t.mu.Lock()
	defer c.t.mu.Unlock()
	return c.stats
}

// Count takes one exact snapshot: what the tree holds on the ports now, the way `ss` sees it. Sockets held by
// several processes of the tree (inherited, passed) count once. A tracked Counter takes a full snapshot, which also
// tags the tree's sockets for the events; an untracked one takes the fast snapshot when it can.
func (c *Counter) Count() (Count, error) {
	if c.track {
		return c.count(false)
	}
	return c.count(true)
}

// count takes a fast snapshot if fast is set and the fast snapshot can count what c watches, else a full one.
func (c *Counter) count(fast bool) (Count, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.countLocked(fast)
}

func (c *Counter) countLocked(fast bool) (Count, error) {
	c.t.mu.Lock()
	if c.closed || c.root == nil {
		c.t.mu.Unlock()
		return Count{}, errors.New("count connections: counter closed")
	}
	root := uint16(c.root.id)
	slots := c.slots // Close drops the slice, never changes it
	excl := make([]uint16, len(c.excl))
	for i, m := range c.excl {
		excl[i] = uint16(m.id)
	}
	c.t.mu.Unlock()
	if c.p.Exited() {
		c.byPort = nil
		return Count{}, nil // it holds nothing any more
	}
	if c.seen == nil {
		c.seen = map[uint64]struct{}{}
	}
	if fast {
		clear(c.seen)
		byPort := map[uint16]Count{}
		d, err := c.t.sums(func(r *loader.TaskRec) {
			i := slices.Index(slots, r.Slot)
			if i < 0 || !below(r.Marks[:], root, excl) {
				return
			}
			pc := byPort[c.ports[i]]
			if r.Kind == loader.RecSum {
				pc.Conns += int(r.Conns)
				pc.Queued += int(r.Queued)
			} else if _, dup := c.seen[r.Sock]; !dup {
				c.seen[r.Sock] = struct{}{}
				pc.add(r.State, r.Queued)
			}
			byPort[c.ports[i]] = pc
		})
		if err == nil {
			n := c.setByPort(byPort)
			c.t.mu.Lock()
			c.stats.Fast++
			c.stats.FastMax = max(c.stats.FastMax, d)
			c.t.mu.Unlock()
			return n, nil
		}
		if !errors.Is(err, loader.ErrNoFastSnapshot) {
			return Count{}, fmt.Errorf("count connections: %w", err)
		}
	}
	if c.track {
		// Whatever happens from here on is seen by the snapshot or counted after these.
		ev, err := c.events()
		if err != nil {
			return Count{}, err
		}
		if ev.Resnaps != c.tagged.Resnaps {
			// A listener opened (or closed) since the last full snapshot: the quiet ones before say nothing of the
			// connections born on a new listener before this snapshot tags it, and this one may miss one of them, taken
			// from the queue into an fd slot it has passed. The count starts again.
			c.quietFulls = 0
		}
		c.tagged = ev
	}
	clear(c.seen)
	byPort := map[uint16]Count{}
	d, err := c.t.snapshot(func(r *loader.SockRec) {
		if r.Netns != c.netns || !slices.Contains(c.ports, r.Port) || !below(r.Marks[:], root, excl) {
			return
		}
		if _, dup := c.seen[r.Ino]; !dup {
			c.seen[r.Ino] = struct{}{}
			pc := byPort[r.Port]
			pc.add(r.State, r.Queue)
			byPort[r.Port] = pc
		}
	})
	if err != nil {
		return Count{}, fmt.Errorf("count connections: %w", err)
	}
	n := c.setByPort(byPort)
	c.queuedAtFull = n.Queued
	if n.Queued > 0 {
		c.quietFulls = 0
	} else {
		c.quietFulls++
	}
	c.t.mu.Lock()
	c.stats.Full++
	c.stats.FullMax = max(c.stats.FullMax, d)
	c.t.mu.Unlock()
	return n, nil
}

// setByPort keeps the per-port breakdown of a count and returns the total.
func (c *Counter) setByPort(byPort map[uint16]Count) Count {
	c.byPort = byPort
	var n Count
	for _, pc := range byPort {
		n.Conns += pc.Conns
		n.Queued += pc.Queued
	}
	return n
}

// Peek counts now without tagging (the fast snapshot when it can) and returns the count per port: for readers
// (metrics) that must not disturb a Wait on the same Counter.
func (c *Counter) Peek() (map[uint16]Count, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.countLocked(true); err != nil {
		return nil, err
	}
	out := make(map[uint16]Count, len(c.ports))
	for _, p := range c.ports {
		out[p] = c.byPort[p]
	}
	return out, nil
}

// ByPort returns the last count taken (by any of Count, Wait), per port: what the metrics export per listener.
// Connections held outside fd tables (Count.Detached) are not broken down.
func (c *Counter) ByPort() map[uint16]Count {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[uint16]Count, len(c.ports))
	for _, p := range c.ports {
		out[p] = c.byPort[p]
	}
	return out
}

// settle is called when a count is zero: it looks, in the tree's network namespace, for connections the tree took that
// a socket file still holds outside every fd table (in flight in an SCM_RIGHTS message, or an io_uring fixed file),
// and returns the count with them as Detached. It does not look when the kernel counts none that may be held (the
// usual case: the tree closed them all), which spares it a walk of the namespace's connections. Sockets born on the
// tree's listener but taken by another watched tree (queued connections that migrated to the new side) are told apart
// by a full snapshot, which retags them.
func (c *Counter) settle() (Count, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k, err := c.heldLocked()
	if err != nil || k == 0 {
		return Count{}, err
	}
	n, err := c.countLocked(false)
	if err != nil || n.Total() > 0 {
		return n, err
	}
	n.Detached, err = c.heldLocked()
	return n, err
}

// heldLocked counts the connections tagged with the tree's mark that a socket file holds. The walk of the network
// namespace's connections is skipped when the kernel counts none that may be held.
func (c *Counter) heldLocked() (int, error) {
	if !c.track || c.p.Exited() {
		return 0, nil
	}
	c.t.mu.Lock()
	if c.closed || c.root == nil {
		c.t.mu.Unlock()
		return 0, errors.New("count connections: counter closed")
	}
	id := c.root.id
	c.t.mu.Unlock()
	live, err := c.t.k.Live(id)
	if err != nil {
		return 0, fmt.Errorf("count connections: %w", err)
	}
	if live <= 0 {
		return 0, nil
	}
	return c.walkHeld(id)
}

// walkHeld walks the tree's network namespace for the connections tagged with mark id that a socket file holds.
func (c *Counter) walkHeld(id uint32) (int, error) {
	nsfd, err := c.p.NetNS()
	if err != nil {
		return 0, fmt.Errorf("count connections: %w", err)
	}
	defer unix.Close(nsfd)
	k := 0
	err = c.t.held(nsfd, func(r *loader.HeldRec) {
		if r.Mark == id && slices.Contains(c.ports, r.Port) {
			k++
		}
	})
	if err != nil {
		return 0, fmt.Errorf("count connections: %w", err)
	}
	return k, nil
}

// tagState returns the root mark's events read just before the last full snapshot, what that snapshot saw queued on
// the tree's listeners, and whether every connection the tree accepted is tagged: the last two full snapshots, both
// taken since the last listener opened or closed, saw nothing queued (a connection accepted during one, into an fd
// slot it had passed, is in an fd table when the next one starts).
func (c *Counter) tagState() (ev loader.MarkCount, queued int, settled bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tagged, c.queuedAtFull, c.quietFulls >= 2
}

// add counts one socket: a listener's accept queue, or a connection in a state `ss` lists (not CLOSE: reset or
// never connected, still held by the process but gone from the kernel's tables).
func (n *Count) add(state uint8, queue uint32) {
	switch state {
	case loader.TCPListen:
		n.Queued += int(queue)
	case loader.TCPClose:
	default:
		n.Conns++
	}
}

// below reports whether a socket whose holder has the marks path above it (nearest first) is in the tree rooted at
// root less the subtrees at excl: root is on the path and no excluded mark comes before it.
func below(path []uint16, root uint16, excl []uint16) bool {
	for _, m := range path {
		switch {
		case m == root:
			return true
		case m == 0 || slices.Contains(excl, m):
			return false
		}
	}
	return false
}

// events reads how many events the tree's root mark has had so far.
func (c *Counter) events() (loader.MarkCount, error) {
	return c.t.k.MarkEvents(c.root.id)
}

// Close stops counting. Safe to call twice.
func (c *Counter) Close() error {
	c.t.mu.Lock()
	defer c.t.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if err := c.t.unwatchLocked(c); err != nil {
		return fmt.Errorf("close counter: %w", err)
	}
	return nil
}
