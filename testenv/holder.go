package testenv

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// HolderOptions configures a holder: a raw epoll TCP server that accepts connections and holds them, reading and
// discarding what arrives, until the peer ends them. It uses one goroutine for all connections, so 100,000 of them
// cost little memory. The zero value is a single process that listens on 127.0.0.1:8080 with a backlog of
// net.core.somaxconn and closes a connection as soon as the peer has ended it.
//
// One process holds at most about RLIMIT_NOFILE connections, and without CAP_SYS_RESOURCE that is the hard limit
// it inherited (see NofileLimit). Workers makes a pre-fork holder whose process tree holds more.
type HolderOptions struct {
	// Addr is the listen address; default "127.0.0.1:8080". Port 0 picks a free port (see Holder.Addr).
	Addr string
	// ReusePort sets SO_REUSEPORT before bind.
	ReusePort bool
	// Backlog is the listen backlog; 0 is net.core.somaxconn of the namespace.
	Backlog int
	// CloseDelay keeps a connection's fd open this long after the peer ended it (EOF or an error such as a reset)
	// before closing it, which leaves the socket in CLOSE_WAIT (or reset but not closed) for that long.
	CloseDelay time.Duration
	// Echo writes back what arrives, as far as it fits in the socket's send buffer (the rest is dropped); by default
	// what arrives is discarded.
	Echo bool
	// Workers > 0 makes a pre-fork holder, like nginx: the master process opens the listening socket (Addr,
	// ReusePort, Backlog) and starts Workers worker processes, its children, which inherit the socket and each run
	// the accept-and-hold loop on it; the master keeps its copy open but does not accept. Control commands go to all
	// workers, the counts are their sums (see Holder.Stats), and an exit signal to the master ends them all (see
	// Holder.Signals). Holder.WorkerPIDs lists the workers. 0: a single process.
	Workers int
	// PerWorker is the most connections a worker holds (those waiting out CloseDelay included): while it holds that
	// many it does not accept, and new connections wait in the accept queue for a worker with room. Default: the
	// worker's RLIMIT_NOFILE minus 100. Only with Workers > 0.
	PerWorker int
}

func (o HolderOptions) withDefaults() HolderOptions {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:8080"
	}
	return o
}

func (o HolderOptions) validate() error {
	switch {
	case o.Backlog < 0:
		return fmt.Errorf("negative Backlog %d", o.Backlog)
	case o.CloseDelay < 0:
		return fmt.Errorf("negative CloseDelay %v", o.CloseDelay)
	case o.Workers < 0:
		return fmt.Errorf("negative Workers %d", o.Workers)
	case o.PerWorker < 0:
		return fmt.Errorf("negative PerWorker %d", o.PerWorker)
	case o.PerWorker > 0 && o.Workers == 0:
		return fmt.Errorf("PerWorker %d without Workers", o.PerWorker)
	}
	return nil
}

// HolderStats are a holder's counts. Those of a pre-fork holder (HolderOptions.Workers > 0) are the sums over its
// workers (LastCloseMono: the latest); Listening is true while the master's or a worker's copy of the listening socket
// is open, and Paused reflects the last PauseAccept or ResumeAccept.
type HolderStats struct {
	Accepted      int   // connections accepted so far
	Open          int   // connection fds held now, those waiting out CloseDelay included
	Closing       int   // ... of which the peer has ended and whose fd waits out CloseDelay
	PeerEnded     int   // connections the peer ended (EOF, reset or another error) so far
	Closed        int   // connection fds closed so far (not counting those closed by the exit)
	LastCloseMono int64 // CLOCK_MONOTONIC right after the most recent close of a connection fd (see MonoNow); 0: none
	AcceptErrors  int   // accept failures other than EAGAIN and ECONNABORTED
	Listening     bool  // the listening socket is open
	Paused        bool  // accepting is paused
	HeldAtExit    int   // connections still held when an exit signal came (they were closed by the exit)
	MaxFDs        int   // the process's RLIMIT_NOFILE (see NofileLimit); of a pre-fork holder, the sum of the workers'
}

// Holder is a running holder process (with HolderOptions.Workers > 0: a master and its workers).
type Holder struct {
	PID        int       // the holder process (the master if Workers > 0)
	Cmd        *exec.Cmd // do not call Wait on it; use Holder.Wait
	Addr       string    // the address it listens on, with the port resolved
	WorkerPIDs []int     // the worker processes if Workers > 0, children of PID

	p       *proc
	ready   chan struct{} // closed on the "listening" event
	workers *workerTree   // nil if there are none

	mu      sync.Mutex
	stats   HolderStats
	signals []SignalEvent
	errMsg  string
}

// StartHolder starts a holder process in ns (nil: the current namespace) and returns once it listens. If ctx ends
// first the process is killed.
func StartHolder(ctx context.Context, ns *NetNS, opts HolderOptions) (*Holder, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("start holder: %w", err)
	}
	h := &Holder{ready: make(chan struct{})}
	p, err := startProc(procConfig{ns: ns, role: roleHolder, opts: opts, onEvent: h.handleEvent})
	if err != nil {
		return nil, fmt.Errorf("start holder: %w", err)
	}
	h.p, h.PID, h.Cmd = p, p.cmd.Process.Pid, p.cmd
	if err := awaitStart(ctx, p, h.ready, func() string {
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.errMsg
	}); err != nil {
		return nil, fmt.Errorf("start holder: %w", err)
	}
	if len(h.WorkerPIDs) > 0 {
		h.workers = watchWorkers(h.WorkerPIDs)
	}
	return h, nil
}

// StartHolderForTest starts a holder like StartHolder and kills it (its workers too) when the test ends. It fails
// the test on error.
func StartHolderForTest(t testing.TB, ns *NetNS, opts HolderOptions) *Holder {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	h, err := StartHolder(ctx, ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = h.Kill()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if exited, _ := h.Wait(ctx); !exited {
			t.Errorf("holder (pid %d) did not exit after SIGKILL", h.PID)
		}
	})
	return h
}

// awaitStart waits for a child's ready channel. If the child exits first the error carries the message of its
// "error" event; if ctx ends first the child is killed.
func awaitStart(ctx context.Context, p *proc, ready <-chan struct{}, errMsg func() string) error {
	select {
	case <-ready:
		return nil
	case <-p.eof:
		select {
		case <-ready: // ready, then exited at once
			return nil
		default:
		}
		_, werr := p.wait(context.Background())
		if msg := errMsg(); msg != "" {
			return errors.New(msg)
		}
		return fmt.Errorf("exited before it was ready: %w", werr)
	case <-ctx.Done():
		_ = p.kill()
		_, _ = p.wait(context.Background())
		return ctx.Err()
	}
}

func (h *Holder) handleEvent(ev event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch ev.Ev {
	case "listening":
		if h.Addr == "" {
			h.Addr = ev.Addr
			h.WorkerPIDs = ev.PIDs
			close(h.ready)
		}
	case "holder", "exiting":
		if ev.Holder != nil {
			h.stats = *ev.Holder
		}
	case "signal":
		h.signals = append(h.signals, SignalEvent{Signal: syscall.Signal(ev.Signal), MonoNS: ev.Mono})
	case "error":
		h.errMsg = ev.Err
	}
}

func (h *Holder) control(command string) error {
	ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
	defer cancel()
	return h.p.control(ctx, command)
}

// Stats asks the holder for its counts and returns them, exact as of the moment it answered. A pre-fork master asks
// all its workers and sums their answers, each exact as of the moment that worker answered.
func (h *Holder) Stats(ctx context.Context) (HolderStats, error) {
	if err := h.p.control(ctx, "stats"); err != nil {
		return h.Snapshot(), fmt.Errorf("get holder stats: %w", err)
	}
	// The stats event precedes the ack on the same pipe, so it has been handled.
	return h.Snapshot(), nil
}

// Snapshot returns the latest counts the holder reported. It reports within 50ms of a change while it runs; after
// an exit they are final.
func (h *Holder) Snapshot() HolderStats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stats
}

// Accepted returns the number of connections accepted so far, as last reported (see Snapshot).
func (h *Holder) Accepted() int { return h.Snapshot().Accepted }

// Open returns the number of connection fds held, as last reported (see Snapshot); 0 after an exit.
func (h *Holder) Open() int { return h.Snapshot().Open }

// LastCloseMono returns CLOCK_MONOTONIC (comparable with MonoNow) taken right after the holder's most recent close
// of a connection fd, as last reported (see Snapshot); 0 if it closed none. Closes done by the exit after a
// signal do not count.
func (h *Holder) LastCloseMono() int64 { return h.Snapshot().LastCloseMono }

// PauseAccept makes the holder stop accepting; new connections queue up in the kernel, the listener stays open. It
// returns once the holder has stopped.
func (h *Holder) PauseAccept() error {
	if err := h.control("pause-accept"); err != nil {
		return fmt.Errorf("pause accept: %w", err)
	}
	return nil
}

// ResumeAccept undoes PauseAccept.
func (h *Holder) ResumeAccept() error {
	if err := h.control("resume-accept"); err != nil {
		return fmt.Errorf("resume accept: %w", err)
	}
	return nil
}

// CloseListener makes the holder close its listening socket without accepting what is queued, and returns once it
// has. It keeps the connections it holds.
func (h *Holder) CloseListener() error {
	if err := h.control("close-listener"); err != nil {
		return fmt.Errorf("close listener: %w", err)
	}
	return nil
}

// Signals returns the signals the holder received so far, in order. On SIGTERM, SIGINT and SIGQUIT it reports the
// signal, closes everything and exits 0; the event is reported before it exits. A pre-fork master reports the
// signal (only its own: the workers' are not reported), forwards it to its workers, waits for them to close
// everything and exit (it kills those that take over 30s), closes its copy of the listener, reports the final
// counts and exits 0 (1 if a worker did not exit with status 0).
func (h *Holder) Signals() []SignalEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]SignalEvent(nil), h.signals...)
}

// Signal sends sig to the holder process (the master if Workers > 0).
func (h *Holder) Signal(sig os.Signal) error {
	if err := h.p.signal(sig); err != nil {
		return fmt.Errorf("signal holder: %w", err)
	}
	return nil
}

// Wait waits until the holder process, and its workers if it has any, have exited, or ctx ends. exited is false
// only if ctx ended first (err is then ctx.Err()); after an exit err is the holder's (the master's) exit error: nil
// for status 0, *exec.ExitError otherwise.
func (h *Holder) Wait(ctx context.Context) (exited bool, err error) {
	exited, err = h.p.wait(ctx)
	if !exited || h.workers == nil {
		return exited, err
	}
	select {
	case <-h.workers.done:
		return true, err
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// Exited reports whether the holder process, and its workers if it has any, have exited.
func (h *Holder) Exited() bool {
	return h.p.hasExited() && h.workers.exited()
}

// Err returns the error the holder reported before it exited with status 1 (nil if it did not), such as a worker
// of a pre-fork holder that died: the master then kills the other workers and exits 1.
func (h *Holder) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.errMsg == "" {
		return nil
	}
	return errors.New(h.errMsg)
}

// Kill sends SIGKILL to the holder process and to its workers if it has any. It is safe to call when they are
// already dead.
func (h *Holder) Kill() error {
	err := h.p.kill()
	h.workers.kill()
	if err != nil {
		return fmt.Errorf("kill holder: %w", err)
	}
	return nil
}

// ---- child side: helpers shared by the epoll children (holder, conns) ----

// minNofile is what the epoll children raise RLIMIT_NOFILE to when they may.
const minNofile = 1 << 20

// NofileLimit returns the RLIMIT_NOFILE the holder and conns children run with: at least 1<<20 (at most fs.nr_open)
// when the caller may raise the hard limit (root with CAP_SYS_RESOURCE), otherwise the current hard limit. A holder
// or conns client can hold a little fewer connections than that.
func NofileLimit() uint64 {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	if !canRaiseNofile() {
		return lim.Max
	}
	target := uint64(minNofile)
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n < target {
			target = n
		}
	}
	return max(lim.Max, target)
}

// canRaiseNofile reports whether this process may raise its hard RLIMIT_NOFILE: it needs CAP_SYS_RESOURCE, which
// root may lack (in containers, say).
func canRaiseNofile() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[unix.CAP_SYS_RESOURCE/32].Effective&(1<<(unix.CAP_SYS_RESOURCE%32)) != 0
}

// raiseNofile sets RLIMIT_NOFILE, soft and hard, to NofileLimit and returns the soft limit in effect.
func raiseNofile() (uint64, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("get RLIMIT_NOFILE: %w", err)
	}
	want := NofileLimit()
	if lim.Cur >= want && lim.Max >= want {
		return lim.Cur, nil
	}
	nl := unix.Rlimit{Cur: want, Max: max(want, lim.Max)}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &nl); err != nil {
		return lim.Cur, fmt.Errorf("set RLIMIT_NOFILE to %d: %w", want, err)
	}
	return want, nil
}

// ctlCmd is a control command handed to an epoll loop.
type ctlCmd struct {
	name string
	seq  int
}

// cmdQueue hands control commands (and internal ones such as an exit on a signal) to an epoll loop; an eventfd
// registered in the loop's epoll set wakes it.
type cmdQueue struct {
	efd int

	mu sync.Mutex
	q  []ctlCmd
}

func newCmdQueue() (*cmdQueue, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("create eventfd: %w", err)
	}
	return &cmdQueue{efd: efd}, nil
}

func (c *cmdQueue) push(cmd ctlCmd) {
	c.mu.Lock()
	c.q = append(c.q, cmd)
	c.mu.Unlock()
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	for {
		_, err := unix.Write(c.efd, one[:])
		if err != unix.EINTR {
			return // EAGAIN: the counter is saturated, the loop wakes anyway
		}
	}
}

// take resets the eventfd and returns the queued commands.
func (c *cmdQueue) take() []ctlCmd {
	var b [8]byte
	_, _ = unix.Read(c.efd, b[:])
	c.mu.Lock()
	defer c.mu.Unlock()
	q := c.q
	c.q = nil
	return q
}

// cmdExit is the internal command by which the signal goroutine ends an epoll loop.
const cmdExit = "exit-on-signal"

// watchSignals reports the signals in reportSignals as "signal" events, the monotonic time read as soon as the
// signal is received, and queues cmdExit for an exit signal (after its event is written).
func watchSignals(q *cmdQueue) {
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, reportSignals...)
	go func() {
		for sig := range sigc {
			mono := MonoNow()
			emit(event{Ev: "signal", Signal: int(sig.(syscall.Signal)), Mono: mono})
			if isExitSignal(sig) {
				q.push(ctlCmd{name: cmdExit})
			}
		}
	}()
}

// epollTimeout converts the time until due (CLOCK_MONOTONIC ns; 0: none) to an epoll_wait timeout in ms, rounded
// up; -1 if there is nothing to wait for.
func epollTimeout(now, due int64) int {
	if due == 0 {
		return -1
	}
	if due <= now {
		return 0
	}
	ms := (due - now + int64(time.Millisecond) - 1) / int64(time.Millisecond)
	return int(min(ms, 60_000))
}

// earliest returns the earlier of two due times, 0 meaning none.
func earliest(a, b int64) int64 {
	switch {
	case a == 0:
		return b
	case b == 0:
		return a
	}
	return min(a, b)
}

// growTo returns s with len(s) > i, grown by doubling.
func growTo[T any](s []T, i int) []T {
	if i < len(s) {
		return s
	}
	n := max(2*len(s), i+1, 1024)
	return append(s, make([]T, n-len(s))...)
}

// sockaddrOf converts an address to a sockaddr and its family.
func sockaddrOf(ap netip.AddrPort) (unix.Sockaddr, int) {
	a := ap.Addr()
	if a.Is4() || a.Is4In6() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.Unmap().As4()}, unix.AF_INET
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}, unix.AF_INET6
}

// resolveAddr parses "host:port" (host an IP address or empty; empty is 0.0.0.0).
func resolveAddr(addr string) (netip.AddrPort, error) {
	ta, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	ap := ta.AddrPort()
	if !ap.Addr().IsValid() {
		ap = netip.AddrPortFrom(netip.IPv4Unspecified(), ap.Port())
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// accept4 accepts a connection without asking for its address (no allocation).
func accept4(fd, flags int) (int, error) {
	nfd, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(fd), 0, 0, uintptr(flags), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(nfd), nil
}

// monoClock reads CLOCK_MONOTONIC (comparable with MonoNow) through the Go runtime's clock, which is the same clock
// read through the vDSO: MonoNow is a system call (over a microsecond on a VM), too slow to take per connection.
type monoClock struct {
	base     time.Time
	baseMono int64
}

// newMonoClock pairs a runtime clock reading with a MonoNow reading; of a few tries it keeps the one whose MonoNow
// call took the least time, and takes the middle of that call, so the error is well under a microsecond.
func newMonoClock() monoClock {
	var c monoClock
	best := time.Duration(-1)
	for range 8 {
		t1 := time.Now()
		m := MonoNow()
		d := time.Since(t1)
		if best < 0 || d < best {
			best = d
			c.base, c.baseMono = t1.Add(d/2), m
		}
	}
	return c
}

func (c monoClock) now() int64 { return c.baseMono + int64(time.Since(c.base)) }

// statsEvery is the least interval between two unrequested stats events of an epoll child.
const statsEvery = 50 * time.Millisecond

// ---- child side: the holder ----

// Per-fd states of the holder's connections.
const (
	hcNone    uint8 = iota // not a connection of ours
	hcOpen                 // registered in epoll
	hcClosing              // the peer ended it; out of epoll, waiting out CloseDelay
)

type pendingClose struct {
	fd  int32
	due int64
}

type holderChild struct {
	opts  HolderOptions
	clk   monoClock
	epfd  int
	lfd   int // -1 once closed
	cmds  *cmdQueue
	buf   []byte
	state []uint8 // by fd
	limit int     // the most connections held at once (a pre-fork worker's PerWorker); 0: no limit

	paused       bool
	lRegistered  bool  // the listener is in the epoll set
	backoffUntil int64 // after EMFILE and the like, accepting waits until then

	closeQ    []pendingClose // due times ascend: CloseDelay is the same for all
	closeHead int

	stats    HolderStats
	dirty    bool
	lastEmit int64
}

func runHolder(optsJSON []byte) error {
	var opts HolderOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	opts = opts.withDefaults()
	if opts.Workers > 0 {
		return runHolderMaster(opts)
	}
	nofile, err := raiseNofile()
	if err != nil {
		return err
	}
	cmds, err := newCmdQueue()
	if err != nil {
		return err
	}
	watchSignals(cmds)
	lfd, addr, err := holderListen(opts)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return runHolderLoop(opts, cmds, lfd, addr, nofile, 0)
}

// runHolderLoop holds connections accepted on the listening socket lfd, at most limit at once (0: no limit), until
// an exit signal (see watchSignals, which must be set up on cmds).
func runHolderLoop(opts HolderOptions, cmds *cmdQueue, lfd int, addr netip.AddrPort, nofile uint64, limit int) error {
	h := &holderChild{opts: opts, lfd: lfd, cmds: cmds, limit: limit, buf: make([]byte, 64<<10), clk: newMonoClock()}
	h.stats.Listening = true
	h.stats.MaxFDs = int(nofile)
	var err error
	h.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return fmt.Errorf("create epoll: %w", err)
	}
	if err := unix.EpollCtl(h.epfd, unix.EPOLL_CTL_ADD, cmds.efd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(cmds.efd)}); err != nil {
		return fmt.Errorf("register eventfd: %w", err)
	}
	if err := h.syncListener(h.clk.now()); err != nil {
		return err
	}
	emit(event{Ev: "listening", Addr: addr.String(), Mono: h.clk.now()})
	h.emitStats(0, h.clk.now())
	go readControl(func(cmd string, seq int) { cmds.push(ctlCmd{name: cmd, seq: seq}) })
	return h.loop()
}

// holderListen opens the listening socket: plain TCP, nonblocking, SO_REUSEADDR (as Go sets it), SO_REUSEPORT if
// asked.
func holderListen(opts HolderOptions) (int, netip.AddrPort, error) {
	ap, err := resolveAddr(opts.Addr)
	if err != nil {
		return -1, netip.AddrPort{}, err
	}
	sa, family := sockaddrOf(ap)
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, netip.AddrPort{}, fmt.Errorf("create socket: %w", err)
	}
	fail := func(what string, err error) (int, netip.AddrPort, error) {
		unix.Close(fd)
		return -1, netip.AddrPort{}, fmt.Errorf("%s: %w", what, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail("set SO_REUSEADDR", err)
	}
	if opts.ReusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fail("set SO_REUSEPORT", err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind "+ap.String(), err)
	}
	backlog := opts.Backlog
	if backlog == 0 {
		backlog = somaxconn()
	}
	if err := unix.Listen(fd, backlog); err != nil {
		return fail("listen", err)
	}
	lsa, err := unix.Getsockname(fd)
	if err != nil {
		return fail("get socket name", err)
	}
	return fd, addrPortOf(lsa), nil
}

// somaxconn returns net.core.somaxconn of the current namespace (4096 if it cannot be read).
func somaxconn() int {
	b, err := os.ReadFile("/proc/sys/net/core/somaxconn")
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
			return n
		}
	}
	return 4096
}

// full reports whether the holder holds as many connections as it may.
func (h *holderChild) full() bool { return h.limit > 0 && h.stats.Open >= h.limit }

// syncListener puts the listener into the epoll set or takes it out, as the state asks.
func (h *holderChild) syncListener(now int64) error {
	want := h.lfd >= 0 && !h.paused && now >= h.backoffUntil && !h.full()
	if want == h.lRegistered {
		return nil
	}
	if want {
		if err := unix.EpollCtl(h.epfd, unix.EPOLL_CTL_ADD, h.lfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(h.lfd)}); err != nil {
			return fmt.Errorf("register listener: %w", err)
		}
	} else if err := unix.EpollCtl(h.epfd, unix.EPOLL_CTL_DEL, h.lfd, nil); err != nil {
		return fmt.Errorf("unregister listener: %w", err)
	}
	h.lRegistered = want
	return nil
}

func (h *holderChild) loop() error {
	events := make([]unix.EpollEvent, 1024)
	for {
		now := h.clk.now()
		due := int64(0)
		if h.closeHead < len(h.closeQ) {
			due = h.closeQ[h.closeHead].due
		}
		if h.dirty {
			due = earliest(due, h.lastEmit+int64(statsEvery))
		}
		if h.backoffUntil > now {
			due = earliest(due, h.backoffUntil)
		}
		n, err := unix.EpollWait(h.epfd, events, epollTimeout(now, due))
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("epoll wait: %w", err)
		}
		// Nothing below closes an fd that may still have an event further down the batch: a connection is
		// closed only while handling its own event, and commands (which may close the listener) and timed
		// closes run after the batch.
		var cmds []ctlCmd
		for _, ev := range events[:max(n, 0)] {
			switch fd := int(ev.Fd); {
			case fd == h.cmds.efd:
				cmds = append(cmds, h.cmds.take()...)
			case fd == h.lfd:
				h.acceptBatch()
			default:
				h.readConn(fd)
			}
		}
		now = h.clk.now()
		h.closeDue(now)
		for _, c := range cmds {
			if c.name == cmdExit {
				h.exit()
				return nil
			}
			if err := h.command(c); err != nil {
				return err
			}
		}
		now = h.clk.now()
		if err := h.syncListener(now); err != nil {
			return err
		}
		if h.dirty && now-h.lastEmit >= int64(statsEvery) {
			h.emitStats(0, now)
		}
	}
}

func (h *holderChild) command(c ctlCmd) error {
	var err error
	switch c.name {
	case "pause-accept":
		h.paused = true
	case "resume-accept":
		h.paused = false
	case "close-listener":
		if h.lfd >= 0 {
			if h.lRegistered {
				if err := unix.EpollCtl(h.epfd, unix.EPOLL_CTL_DEL, h.lfd, nil); err != nil {
					return fmt.Errorf("unregister listener: %w", err)
				}
				h.lRegistered = false
			}
			unix.Close(h.lfd)
			h.lfd = -1
		}
	case "stats":
	default:
		err = fmt.Errorf("unknown command %q", c.name)
	}
	if err := h.syncListener(h.clk.now()); err != nil {
		return err
	}
	h.stats.Paused = h.paused
	h.stats.Listening = h.lfd >= 0
	h.emitStats(c.seq, h.clk.now())
	ack(c.seq, err)
	return nil
}

func (h *holderChild) emitStats(seq int, now int64) {
	st := h.stats
	emit(event{Ev: "holder", Seq: seq, Holder: &st})
	h.dirty = false
	h.lastEmit = now
}

// acceptBatch accepts what is queued, up to a bound so that the connections get their turn, and stops when the
// holder is full (the loop then takes the listener out of the epoll set until a connection is closed).
func (h *holderChild) acceptBatch() {
	for range 4096 {
		if h.full() {
			return
		}
		fd, err := accept4(h.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			switch err {
			case unix.EAGAIN, unix.EINTR:
				return
			case unix.ECONNABORTED:
				continue
			}
			h.stats.AcceptErrors++
			h.dirty = true
			if n := h.stats.AcceptErrors; n&(n-1) == 0 { // 1, 2, 4, ...: EMFILE would repeat every 10ms
				fmt.Fprintf(os.Stderr, "testenv holder (pid %d): accept: %v (%d accept errors so far)\n", os.Getpid(), err, n)
			}
			// EMFILE and the like: the queue stays readable, so back off instead of spinning.
			h.backoffUntil = h.clk.now() + int64(10*time.Millisecond)
			return
		}
		if err := unix.EpollCtl(h.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(fd)}); err != nil {
			fmt.Fprintf(os.Stderr, "testenv holder (pid %d): register connection: %v\n", os.Getpid(), err)
			h.stats.AcceptErrors++
			unix.Close(fd)
			continue
		}
		h.state = growTo(h.state, fd)
		h.state[fd] = hcOpen
		h.stats.Accepted++
		h.stats.Open++
		h.dirty = true
	}
}

func (h *holderChild) readConn(fd int) {
	if fd >= len(h.state) || h.state[fd] != hcOpen {
		return
	}
	n, err := unix.Read(fd, h.buf)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return
	case err == nil && n > 0:
		if h.opts.Echo {
			_, _ = unix.Write(fd, h.buf[:n])
		}
		return
	}
	// EOF or an error (ECONNRESET, ETIMEDOUT, ...): the peer ended the connection.
	h.stats.PeerEnded++
	h.dirty = true
	if h.opts.CloseDelay <= 0 {
		h.closeConn(fd)
		return
	}
	_ = unix.EpollCtl(h.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	h.state[fd] = hcClosing
	h.stats.Closing++
	h.closeQ = append(h.closeQ, pendingClose{fd: int32(fd), due: h.clk.now() + int64(h.opts.CloseDelay)})
}

func (h *holderChild) closeConn(fd int) {
	if h.state[fd] == hcClosing {
		h.stats.Closing--
	}
	h.state[fd] = hcNone
	unix.Close(fd)
	h.stats.LastCloseMono = h.clk.now()
	h.stats.Closed++
	h.stats.Open--
	h.dirty = true
}

// closeDue closes the connections whose CloseDelay is over.
func (h *holderChild) closeDue(now int64) {
	for h.closeHead < len(h.closeQ) && h.closeQ[h.closeHead].due <= now {
		h.closeConn(int(h.closeQ[h.closeHead].fd))
		h.closeHead++
	}
	if h.closeHead == len(h.closeQ) {
		h.closeQ, h.closeHead = h.closeQ[:0], 0
	} else if h.closeHead > 4096 && h.closeHead > len(h.closeQ)/2 {
		h.closeQ = append(h.closeQ[:0], h.closeQ[h.closeHead:]...)
		h.closeHead = 0
	}
}

// exit closes everything after an exit signal and reports the final counts.
func (h *holderChild) exit() {
	h.stats.HeldAtExit = h.stats.Open
	if h.lfd >= 0 {
		unix.Close(h.lfd)
		h.lfd = -1
	}
	for fd, st := range h.state {
		if st != hcNone {
			unix.Close(fd)
			h.state[fd] = hcNone
		}
	}
	h.stats.Open, h.stats.Closing = 0, 0
	h.stats.Listening = false
	st := h.stats
	emit(event{Ev: "exiting", Holder: &st})
}
