package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// Limits and constants of the counter; they mirror bpf/counter.bpf.c.
const (
	MaxMarks  = 4096 // mark ids are 1..MaxMarks-1
	PathMarks = 6    // marks a SockRec carries, nearest first
	MaxSlots  = 32   // (netns, port) pairs the fast snapshot sums separately: slots 0..MaxSlots-1
	MarkTrack = 1    // Mark.Flags: remember the sockets below the mark and count their events
	MarkCut   = 2    // Mark.Flags: the subtree is cut out of the trees above (a tracked mark above does not tag it)

	EventState    = 1 // Event.Kind: a remembered socket changed state
	EventListener = 2 // Event.Kind: a remembered listener closed
	EventListen   = 3 // Event.Kind: a process under a tracked mark started listening on a watched port

	RecSum    = 1 // TaskRec.Kind: sums over a task's unshared sockets on one slot
	RecShared = 2 // TaskRec.Kind: one socket whose file has several references

	TCPClose  = 7  // TCP_CLOSE
	TCPListen = 10 // TCP_LISTEN
)

// Exported forms of the counter's generated types, for drain/.
type (
	SockRec   = counterSockRec   // one socket, as written by the full snapshot
	TaskRec   = counterTaskRec   // one record of the fast snapshot
	Event     = counterEvent     // one wakeup from the ring buffer
	Mark      = counterMark      // a marked process: its id and flags
	PortKey   = counterPortKey   // a watched (netns inode, port)
	MarkCount = counterMarkCount // per-mark event counts
	HeldRec   = counterHeldRec   // a tagged connection some file still holds, as written by Held
)

// CounterOptions configures LoadCounter. The zero value logs to slog.Default().
type CounterOptions struct {
	Logger *slog.Logger
}

// Counter is the loaded and attached counter: the iterators, the tracepoint and the ring buffer reader. It is private
// to one draind process (nothing is pinned): counting starts afresh with every process, from a snapshot.
type Counter struct {
	objs  counterObjects
	iter  *link.Iter // full snapshot (iter/task_file)
	tasks *link.Iter // fast snapshot (iter/task)
	held  *link.Iter // tagged connections still held (iter/tcp)
	// events is the event program's link while attached (WatchEvents), under eventsMu.
	eventsMu sync.Mutex
	events   link.Link
	rd       *ringbuf.Reader
	buf      []byte
	run      uint64 // fast snapshots so far (run_id)
	once     sync.Once
	err      error
}

// LoadCounter loads the counter and attaches it, the event program included (see WatchEvents).
func LoadCounter(opts CounterOptions) (_ *Counter, err error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	c := &Counter{}
	if err := loadCounterObjects(&c.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			opts.Logger.Error("counter rejected by the verifier", "log", fmt.Sprintf("%+v", verr))
		}
		return nil, fmt.Errorf("load counter: %w", wrapPerm(err))
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	p := &c.objs.counterPrograms
	if c.iter, err = link.AttachIter(link.IterOptions{Program: p.DraindSockets}); err != nil {
		return nil, fmt.Errorf("attach socket iterator: %w", wrapPerm(err))
	}
	if c.tasks, err = link.AttachIter(link.IterOptions{Program: p.DraindTasks}); err != nil {
		return nil, fmt.Errorf("attach task iterator: %w", wrapPerm(err))
	}
	if c.held, err = link.AttachIter(link.IterOptions{Program: p.DraindHeld}); err != nil {
		return nil, fmt.Errorf("attach tcp iterator: %w", wrapPerm(err))
	}
	// Attached here, so that a kernel that refuses it fails at load rather than in a handoff; the caller detaches
	// it while it tracks nothing (WatchEvents).
	if err := c.WatchEvents(true); err != nil {
		return nil, err
	}
	if c.rd, err = ringbuf.NewReader(c.objs.Events); err != nil {
		return nil, fmt.Errorf("open ring buffer: %w", err)
	}
	return c, nil
}

// recSize is the size of SockRec and TaskRec as the iterators write them; heldSize that of HeldRec.
const (
	recSize  = 32
	heldSize = 16
)

// Snapshot runs the full snapshot once and hands fn every socket it reports; it also tags the sockets of tracked
// marks. One snapshot (of either kind) at a time: the programs cache per run, so concurrent callers must serialize.
func (c *Counter) Snapshot(fn func(r *SockRec)) error {
	var rec SockRec
	return c.read(c.iter, recSize, func(b []byte) error {
		rec.Ino = binary.LittleEndian.Uint64(b[0:])
		for i := range rec.Marks {
			rec.Marks[i] = binary.LittleEndian.Uint16(b[8+2*i:])
		}
		rec.Queue = binary.LittleEndian.Uint32(b[20:])
		rec.Netns = binary.LittleEndian.Uint32(b[24:])
		rec.Port = binary.LittleEndian.Uint16(b[28:])
		rec.State = b[30]
		rec.Family = b[31]
		fn(&rec)
		return nil
	})
}

// ErrNoFastSnapshot is returned by Sums when the fast snapshot cannot count what is watched (a slot >= MaxSlots, or
// a task with too many shared sockets for one output buffer): use Snapshot.
var ErrNoFastSnapshot = errors.New("fast snapshot not possible")

// Sums runs the fast snapshot once and hands fn its records. It does not tag sockets.
func (c *Counter) Sums(fn func(r *TaskRec)) error {
	c.run++
	if err := c.objs.RunId.Set(c.run); err != nil {
		return fmt.Errorf("start fast snapshot: %w", err)
	}
	var rec TaskRec
	err := c.read(c.tasks, recSize, func(b []byte) error {
		rec.Sock = binary.LittleEndian.Uint64(b[0:])
		for i := range rec.Marks {
			rec.Marks[i] = binary.LittleEndian.Uint16(b[8+2*i:])
		}
		rec.Slot = binary.LittleEndian.Uint16(b[20:])
		rec.Kind = b[22]
		rec.State = b[23]
		rec.Conns = binary.LittleEndian.Uint32(b[24:])
		rec.Queued = binary.LittleEndian.Uint32(b[28:])
		if rec.Slot >= MaxSlots {
			return ErrNoFastSnapshot
		}
		fn(&rec)
		return nil
	})
	if errors.Is(err, unix.E2BIG) {
		return fmt.Errorf("%w: %w", ErrNoFastSnapshot, err)
	}
	return err
}

// Held hands fn every tagged connection, in the network namespace nsfd refers to, that a socket file still holds: not
// closed, and accepted (not waiting in a listener's queue). The same serialization as Snapshot applies.
func (c *Counter) Held(nsfd int, fn func(r *HeldRec)) error {
	rd, err := openInNetNS(c.held, nsfd)
	if err != nil {
		return err
	}
	var rec HeldRec
	return c.readFrom(rd, heldSize, func(b []byte) error {
		rec.Sock = binary.LittleEndian.Uint64(b[0:])
		rec.Mark = binary.LittleEndian.Uint32(b[8:])
		rec.Port = binary.LittleEndian.Uint16(b[12:])
		rec.State = b[14]
		fn(&rec)
		return nil
	})
}

// openInNetNS starts a run of it in the network namespace nsfd refers to: iterators over a namespace's sockets see
// the namespace of the thread that opens them.
func openInNetNS(it *link.Iter, nsfd int) (io.ReadCloser, error) {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("open network namespace: %w", err)
	}
	defer orig.Close()
	if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter network namespace: %w", wrapPerm(err))
	}
	rd, err := it.Open()
	if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr == nil {
		runtime.UnlockOSThread()
	} // else the thread stays locked, and dies with the goroutine's end: it is in the wrong namespace
	if err != nil {
		return nil, fmt.Errorf("run iterator: %w", err)
	}
	return rd, nil
}

// read runs an iterator and hands fn each record of size bytes.
func (c *Counter) read(it *link.Iter, size int, fn func(b []byte) error) error {
	rd, err := it.Open()
	if err != nil {
		return fmt.Errorf("run iterator: %w", err)
	}
	return c.readFrom(rd, size, fn)
}

// readFrom reads an iterator run to its end and hands fn each record of size bytes.
func (c *Counter) readFrom(rd io.ReadCloser, size int, fn func(b []byte) error) error {
	defer rd.Close()
	if c.buf == nil {
		c.buf = make([]byte, 64<<10)
	}
	var pending int
	for {
		m, err := rd.Read(c.buf[pending:])
		m += pending
		full := m - m%size
		for off := 0; off < full; off += size {
			if err := fn(c.buf[off : off+size]); err != nil {
				return err
			}
		}
		pending = copy(c.buf, c.buf[full:m])
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read iterator: %w", err)
		}
	}
}

// ErrClosed is returned by ReadEvent once the Counter is closed.
var ErrClosed = errors.New("counter closed")

// ReadEvent blocks until the next ring buffer record and returns its mark id.
func (c *Counter) ReadEvent() (uint32, error) {
	var rec ringbuf.Record
	for {
		if err := c.rd.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return 0, ErrClosed
			}
			return 0, fmt.Errorf("read counter events: %w", err)
		}
		if len(rec.RawSample) >= 4 {
			return binary.LittleEndian.Uint32(rec.RawSample), nil
		}
	}
}

// MarkEvents reads the event counts of a mark.
func (c *Counter) MarkEvents(id uint32) (MarkCount, error) {
	var v MarkCount
	if err := c.objs.MarkEvents.Lookup(id, &v); err != nil {
		return v, fmt.Errorf("read counter events: %w", err)
	}
	return v, nil
}

// Live reads how many connections tagged with mark id may still be held by a socket file (never fewer than Held
// would report for it): zero means Held would report none.
func (c *Counter) Live(id uint32) (int64, error) {
	var n int64
	if err := c.objs.MarkLive.Lookup(id, &n); err != nil {
		return 0, fmt.Errorf("read live connections: %w", err)
	}
	return n, nil
}

// PutMark marks the process with pidfs inode ino.
func (c *Counter) PutMark(ino uint64, m Mark) error {
	if err := c.objs.Marks.Put(ino, m); err != nil {
		return fmt.Errorf("mark process: %w", err)
	}
	return nil
}

// DeleteMark unmarks the process with pidfs inode ino.
func (c *Counter) DeleteMark(ino uint64) error {
	if err := c.objs.Marks.Delete(ino); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unmark process: %w", err)
	}
	return nil
}

// PutPort makes the snapshots report sockets on k, summed under slot in the fast one.
func (c *Counter) PutPort(k PortKey, slot uint32) error {
	if err := c.objs.Ports.Put(k, slot); err != nil {
		return fmt.Errorf("watch port %d: %w", k.Port, err)
	}
	return nil
}

// DeletePort stops reporting sockets on k.
func (c *Counter) DeletePort(k PortKey) error {
	if err := c.objs.Ports.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unwatch port %d: %w", k.Port, err)
	}
	return nil
}

// WatchEvents attaches the event program (on) or detaches it: the tp_btf program on TCP state changes. It costs
// the host while attached, whether or not a tree is tracked: it runs on every TCP state change. The Tracker
// attaches it only while it tracks a tree, so that an idle draind costs the host nothing. Calling it with the
// current state does nothing.
//
// Tags outlive a detach: a tagged connection released meanwhile stays counted in mark_live (too high, which is safe:
// the walk for held connections is then not skipped for its mark, whose id is reused last).
func (c *Counter) WatchEvents(on bool) error {
	c.eventsMu.Lock()
	defer c.eventsMu.Unlock()
	if on == (c.events != nil) {
		return nil
	}
	if !on {
		err := c.events.Close()
		c.events = nil
		if err != nil {
			return fmt.Errorf("detach event program: %w", err)
		}
		return nil
	}
	l, err := link.AttachTracing(link.TracingOptions{Program: c.objs.DraindState})
	if err != nil {
		return fmt.Errorf("attach tracepoint inet_sock_set_state: %w", wrapPerm(err))
	}
	c.events = l
	return nil
}

// EventStats returns the kernel's run-time statistics of the event program (WatchEvents): how often it ran and for
// how long. The kernel counts only while its BPF statistics are on (BPF_ENABLE_STATS, or kernel.bpf_stats_enabled=1).
func (c *Counter) EventStats() (runs uint64, total time.Duration, err error) {
	st, err := c.objs.DraindState.Stats()
	if err != nil {
		return 0, 0, fmt.Errorf("read counter statistics: %w", err)
	}
	return st.RunCount, st.Runtime, nil
}

// Close detaches and unloads the counter; a blocked ReadEvent returns ErrClosed. Safe to call twice.
func (c *Counter) Close() error {
	c.once.Do(func() {
		var errs []error
		if c.rd != nil {
			errs = append(errs, c.rd.Close())
		}
		errs = append(errs, c.WatchEvents(false))
		for _, it := range []*link.Iter{c.iter, c.tasks, c.held} {
			if it != nil {
				errs = append(errs, it.Close())
			}
		}
		errs = append(errs, c.objs.Close())
		if err := errors.Join(errs...); err != nil {
			c.err = fmt.Errorf("close counter: %w", err)
		}
	})
	return c.err
}
