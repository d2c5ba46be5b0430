package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Limits and constants of the counter; they mirror bpf/counter.bpf.c.
const (
	MaxMarks  = 4096 // mark ids are 1..MaxMarks-1
	PathMarks = 6    // marks a SockRec carries, nearest first
	MarkTrack = 1    // Mark.Flags: remember the sockets below the mark and count their events

	EventState    = 1 // Event.Kind: a remembered socket changed state
	EventListener = 2 // Event.Kind: a remembered listener closed
	EventAccept   = 3 // Event.Kind: a process under a tracked mark accepted a connection

	TCPClose  = 7  // TCP_CLOSE
	TCPListen = 10 // TCP_LISTEN
)

// Exported forms of the counter's generated types, for drain/.
type (
	SockRec   = counterSockRec   // one socket, as written by the iterator
	Event     = counterEvent     // one wakeup from the ring buffer
	Mark      = counterMark      // a marked process: its id and flags
	PortKey   = counterPortKey   // a watched (netns inode, port)
	MarkCount = counterMarkCount // per-mark event counts
)

// CounterOptions configures LoadCounter. The zero value logs to slog.Default().
type CounterOptions struct {
	Logger *slog.Logger
}

// CounterObjects are the counter's programs and maps. They are private to one draind process (nothing is pinned):
// counting starts afresh with every process, from a snapshot.
type CounterObjects struct {
	Marks      *ebpf.Map // HASH: pidfs inode of a marked process -> Mark
	Ports      *ebpf.Map // HASH: PortKey -> reference count
	Socks      *ebpf.Map // HASH: struct sock address -> mark id (filled by the iterator, emptied by the tracepoint)
	MarkEvents *ebpf.Map // ARRAY: mark id -> MarkCount
	Events     *ebpf.Map // RINGBUF of Event

	Sockets *ebpf.Program // iter/task_file
	State   *ebpf.Program // tp_btf/inet_sock_set_state
	Accept  *ebpf.Program // tracepoint/syscalls/sys_exit_accept
	Accept4 *ebpf.Program // tracepoint/syscalls/sys_exit_accept4

	objs counterObjects
	once sync.Once
}

// LoadCounter mounts tracefs if needed (the syscall tracepoints are found through it) and loads the counter.
func LoadCounter(opts CounterOptions) (*CounterObjects, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := ensureTraceFS(opts.Logger); err != nil {
		return nil, err
	}
	c := &CounterObjects{}
	if err := loadCounterObjects(&c.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			opts.Logger.Error("counter rejected by the verifier", "log", fmt.Sprintf("%+v", verr))
		}
		return nil, fmt.Errorf("load counter: %w", wrapPerm(err))
	}
	m, p := &c.objs.counterMaps, &c.objs.counterPrograms
	c.Marks, c.Ports, c.Socks, c.MarkEvents, c.Events = m.Marks, m.Ports, m.Socks, m.MarkEvents, m.Events
	c.Sockets, c.State, c.Accept, c.Accept4 = p.DraindSockets, p.DraindState, p.DraindAccept, p.DraindAccept4
	return c, nil
}

// Close unloads the counter. Safe to call twice.
func (c *CounterObjects) Close() error {
	var err error
	c.once.Do(func() { err = c.objs.Close() })
	return err
}

const (
	traceFSDir   = "/sys/kernel/tracing"
	traceFSMagic = unix.TRACEFS_MAGIC
)

// ensureTraceFS mounts tracefs at /sys/kernel/tracing when no tracefs is mounted there.
func ensureTraceFS(log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(traceFSDir, &st); err == nil && st.Type == traceFSMagic {
		return nil
	}
	if err := os.MkdirAll(traceFSDir, 0o755); err != nil {
		return fmt.Errorf("create tracefs mount point %s: %w", traceFSDir, wrapPerm(err))
	}
	if err := unix.Mount("tracefs", traceFSDir, "tracefs", 0, ""); err != nil {
		return fmt.Errorf("mount tracefs at %s: %w", traceFSDir, wrapPerm(err))
	}
	log.Info("mounted tracefs", "path", traceFSDir)
	return nil
}
