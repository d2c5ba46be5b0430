package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ConnsOptions configures a conns client: a process that opens N plain TCP connections and holds them, all in one
// epoll loop (no goroutine per connection). The zero value opens one connection to 127.0.0.1:8080.
type ConnsOptions struct {
	// Addr is the server address; default "127.0.0.1:8080".
	Addr string
	// N is the number of connections; default 1.
	N int
	// Parallel bounds the connects in flight, so that the server's backlog is not overrun; default 512.
	Parallel int
	// Timeout bounds the opening: connects still in flight then count as failed (FailTimeout); default 2 minutes.
	Timeout time.Duration
	// Send is written on each connection once it is established (it should fit in the send buffer; what does not
	// is dropped). Nothing by default.
	Send []byte
	// PerSource is the number of connections bound to one source address when Addr is in 127.0.0.0/8: the client
	// binds its sockets (port 0, IP_BIND_ADDRESS_NO_PORT) to SourceStart, SourceStart+1, ..., PerSource
	// connections each, so that 100,000 connections do not use up the ephemeral ports of one address. Default
	// 5000: the kernel's search for a free port slows down sharply as an address's range fills (20,000
	// connections from one address take about 6 times as long as from four). Negative: do not bind (also the case
	// for other destinations).
	PerSource int
	// SourceStart is the first source address; default "127.1.0.1".
	SourceStart string
}

func (o ConnsOptions) withDefaults() ConnsOptions {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:8080"
	}
	if o.N == 0 {
		o.N = 1
	}
	if o.Parallel <= 0 {
		o.Parallel = 512
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.PerSource == 0 {
		o.PerSource = 5000
	}
	if o.SourceStart == "" {
		o.SourceStart = "127.1.0.1"
	}
	return o
}

func (o ConnsOptions) validate() error {
	if o.N < 0 {
		return fmt.Errorf("negative N %d", o.N)
	}
	if _, err := resolveAddr(o.Addr); err != nil {
		return fmt.Errorf("bad Addr: %w", err)
	}
	if a, err := netip.ParseAddr(o.SourceStart); err != nil || !a.Is4() {
		return fmt.Errorf("bad SourceStart %q: want an IPv4 address", o.SourceStart)
	}
	return nil
}

// ConnsStats are a conns client's counts.
type ConnsStats struct {
	Established   int            // connections established so far
	Failed        int            // connection attempts that failed
	Connecting    int            // connects in flight
	Open          int            // established connections held now
	Closed        int            // connections the client closed (Close, CloseAll)
	PeerEnded     int            // connections the server ended (EOF or error); the client then closed them
	LastCloseMono int64          // CLOCK_MONOTONIC right after the client's most recent close (see MonoNow); 0: none
	Failures      map[string]int // failed attempts by kind: FailRefused, FailReset, FailTimeout, FailOther
	Samples       []string       // up to 20 example failures, "kind: error"
	Sources       []string       // the source addresses used (empty when not binding)
	OpenTook      time.Duration  // how long opening the N connections took (set when the opening is over)
}

func (s ConnsStats) clone() ConnsStats {
	c := s
	c.Failures = maps.Clone(s.Failures)
	c.Samples = append([]string(nil), s.Samples...)
	c.Sources = append([]string(nil), s.Sources...)
	return c
}

// Conns is a running conns client process.
type Conns struct {
	PID int
	Cmd *exec.Cmd // do not call Wait on it

	p      *proc
	opened chan struct{} // closed on the "opened" event

	mu     sync.Mutex
	stats  ConnsStats
	errMsg string
}

// StartConns starts a conns client in ns (nil: the current namespace) and returns once all N connections are
// established. If some fail, or are not established within ConnsOptions.Timeout, or ctx ends first, it kills the
// process and returns an error with the counts and samples of the failures.
func StartConns(ctx context.Context, ns *NetNS, opts ConnsOptions) (*Conns, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("start conns: %w", err)
	}
	c := &Conns{opened: make(chan struct{})}
	p, err := startProc(procConfig{ns: ns, role: roleConns, opts: opts, onEvent: c.handleEvent})
	if err != nil {
		return nil, fmt.Errorf("start conns: %w", err)
	}
	c.p, c.PID, c.Cmd = p, p.cmd.Process.Pid, p.cmd
	if err := awaitStart(ctx, p, c.opened, func() string {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.errMsg
	}); err != nil {
		return nil, fmt.Errorf("start conns: %w", err)
	}
	st := c.Snapshot()
	if st.Established != opts.N {
		_ = p.kill()
		_, _ = p.wait(context.Background())
		return nil, fmt.Errorf("start conns: %d of %d connections to %s established, %d failed %v in %v; samples: %s",
			st.Established, opts.N, opts.Addr, st.Failed, st.Failures, st.OpenTook.Round(time.Millisecond),
			strings.Join(st.Samples, "; "))
	}
	return c, nil
}

// StartConnsForTest starts a conns client like StartConns and kills it when the test ends. It fails the test on
// error.
func StartConnsForTest(t testing.TB, ns *NetNS, opts ConnsOptions) *Conns {
	t.Helper()
	timeout := opts.withDefaults().Timeout + 20*time.Second
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := StartConns(ctx, ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Kill()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if exited, _ := c.Wait(ctx); !exited {
			t.Errorf("conns client (pid %d) did not exit after SIGKILL", c.PID)
		}
	})
	return c
}

func (c *Conns) handleEvent(ev event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch ev.Ev {
	case "conns", "opened", "exiting":
		if ev.Conns != nil {
			c.stats = *ev.Conns
		}
		if ev.Ev == "opened" {
			select {
			case <-c.opened:
			default:
				close(c.opened)
			}
		}
	case "error":
		c.errMsg = ev.Err
	}
}

// Snapshot returns the latest counts the client reported. It reports within 50ms of a change while it runs.
func (c *Conns) Snapshot() ConnsStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats.clone()
}

// Stats asks the client for its counts and returns them, exact as of the moment it answered.
func (c *Conns) Stats(ctx context.Context) (ConnsStats, error) {
	if err := c.p.control(ctx, "stats"); err != nil {
		return c.Snapshot(), fmt.Errorf("get conns stats: %w", err)
	}
	return c.Snapshot(), nil
}

// Established returns the number of connections established, as last reported.
func (c *Conns) Established() int { return c.Snapshot().Established }

// Failed returns the number of connection attempts that failed, as last reported.
func (c *Conns) Failed() int { return c.Snapshot().Failed }

// Open returns the number of established connections the client holds, as last reported.
func (c *Conns) Open() int { return c.Snapshot().Open }

// CloseAll closes all connections the client holds (close(2): a FIN), one after another evenly spread over spread
// (0: as fast as possible), and returns when the last one is closed.
func (c *Conns) CloseAll(ctx context.Context, spread time.Duration) error {
	if spread < 0 {
		return fmt.Errorf("close all connections: negative spread %v", spread)
	}
	if err := c.p.control(ctx, "close-all:"+strconv.FormatInt(int64(spread), 10)); err != nil {
		return fmt.Errorf("close all connections: %w", err)
	}
	return nil
}

// Close closes n of the connections the client holds, as fast as possible. It fails, closing none, if fewer than
// n are open.
func (c *Conns) Close(ctx context.Context, n int) error {
	if n < 0 {
		return fmt.Errorf("close connections: negative count %d", n)
	}
	if err := c.p.control(ctx, "close:"+strconv.Itoa(n)); err != nil {
		return fmt.Errorf("close connections: %w", err)
	}
	return nil
}

// Wait waits until the client process has exited, or ctx ends; see Holder.Wait.
func (c *Conns) Wait(ctx context.Context) (exited bool, err error) {
	return c.p.wait(ctx)
}

// Exited reports whether the client process has exited.
func (c *Conns) Exited() bool {
	return c.p.hasExited()
}

// Signal sends sig to the client process. SIGTERM and SIGINT end it (status 0); its connections close with it.
func (c *Conns) Signal(sig os.Signal) error {
	if err := c.p.signal(sig); err != nil {
		return fmt.Errorf("signal conns: %w", err)
	}
	return nil
}

// Kill sends SIGKILL to the client process. It is safe to call when the process is already dead.
func (c *Conns) Kill() error {
	if err := c.p.kill(); err != nil {
		return fmt.Errorf("kill conns: %w", err)
	}
	return nil
}

// ---- child side ----

// Per-fd states of the client's sockets.
const (
	ccNone       uint8 = iota
	ccConnecting       // connect in flight
	ccOpen             // established, in the open list
)

type connsChild struct {
	opts  ConnsOptions
	clk   monoClock
	dst   unix.Sockaddr
	fam   int
	bind  bool
	src   uint32 // current source address (bind)
	epfd  int
	cmds  *cmdQueue
	buf   []byte
	state []uint8 // by fd
	pos   []int32 // by fd: index in open
	open  []int32 // established fds

	started  int // connects started
	deadline int64

	closing *closePlan

	stats    ConnsStats
	dirty    bool
	lastEmit int64
}

// closePlan is a CloseAll in progress: close k of total by start + k*spread/total.
type closePlan struct {
	seq   int
	start int64
	span  int64
	total int
	done  int
}

func runConns(optsJSON []byte) error {
	var opts ConnsOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return err
	}
	nofile, err := raiseNofile()
	if err != nil {
		return err
	}
	// A few fds for the runtime, stdio, epoll and eventfd.
	if need := uint64(opts.N) + 16; need > nofile {
		return fmt.Errorf("%d connections need RLIMIT_NOFILE >= %d, have %d (raising the hard limit needs CAP_SYS_RESOURCE)",
			opts.N, need, nofile)
	}
	ap, _ := resolveAddr(opts.Addr)
	c := &connsChild{opts: opts, buf: make([]byte, 16<<10), clk: newMonoClock()}
	c.dst, c.fam = sockaddrOf(ap)
	c.stats.Failures = map[string]int{}
	if c.fam == unix.AF_INET && ap.Addr().As4()[0] == 127 && opts.PerSource > 0 {
		c.bind = true
		s := netip.MustParseAddr(opts.SourceStart).As4()
		c.src = uint32(s[0])<<24 | uint32(s[1])<<16 | uint32(s[2])<<8 | uint32(s[3])
	}
	if c.cmds, err = newCmdQueue(); err != nil {
		return err
	}
	if c.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("create epoll: %w", err)
	}
	if err := unix.EpollCtl(c.epfd, unix.EPOLL_CTL_ADD, c.cmds.efd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(c.cmds.efd)}); err != nil {
		return fmt.Errorf("register eventfd: %w", err)
	}
	watchSignals(c.cmds)
	go readControl(func(cmd string, seq int) { c.cmds.push(ctlCmd{name: cmd, seq: seq}) })
	return c.loop()
}

func (c *connsChild) opening() bool { return c.deadline != 0 }

func (c *connsChild) loop() error {
	start := c.clk.now()
	c.deadline = start + int64(c.opts.Timeout)
	events := make([]unix.EpollEvent, 1024)
	for {
		if c.opening() {
			c.startConnects()
			now := c.clk.now()
			if c.stats.Connecting == 0 && c.started == c.opts.N {
				c.finishOpening(now - start)
			} else if now >= c.deadline {
				c.giveUp()
				c.finishOpening(now - start)
			}
		}
		now := c.clk.now()
		due := int64(0)
		if c.opening() {
			due = c.deadline
		}
		if c.dirty {
			due = earliest(due, c.lastEmit+int64(statsEvery))
		}
		if c.closing != nil {
			due = earliest(due, c.closing.next())
		}
		n, err := unix.EpollWait(c.epfd, events, epollTimeout(now, due))
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("epoll wait: %w", err)
		}
		// A socket is closed only while handling its own event; commands run after the batch (see the holder).
		var cmds []ctlCmd
		for _, ev := range events[:max(n, 0)] {
			fd := int(ev.Fd)
			if fd == c.cmds.efd {
				cmds = append(cmds, c.cmds.take()...)
				continue
			}
			c.handle(fd, ev.Events)
		}
		for _, cmd := range cmds {
			if cmd.name == cmdExit {
				st := c.stats.clone()
				emit(event{Ev: "exiting", Conns: &st})
				return nil
			}
			c.command(cmd)
		}
		now = c.clk.now()
		if c.closing != nil {
			c.closeDue(now)
		}
		if c.dirty && now-c.lastEmit >= int64(statsEvery) {
			c.emitStats(0, now)
		}
	}
}

func (c *connsChild) finishOpening(elapsed int64) {
	c.deadline = 0
	c.stats.OpenTook = time.Duration(elapsed)
	st := c.stats.clone()
	c.dirty = false
	c.lastEmit = c.clk.now()
	emit(event{Ev: "opened", Conns: &st})
}

func (c *connsChild) emitStats(seq int, now int64) {
	st := c.stats.clone()
	emit(event{Ev: "conns", Seq: seq, Conns: &st})
	c.dirty = false
	c.lastEmit = now
}

func (c *connsChild) fail(err error, what string) {
	kind := Classify(err)
	c.stats.Failed++
	c.stats.Failures[kind]++
	if len(c.stats.Samples) < maxFailureSamples {
		c.stats.Samples = append(c.stats.Samples, fmt.Sprintf("%s: %s: %v", kind, what, err))
	}
	c.dirty = true
}

// startConnects starts connects until Parallel are in flight or all N are started.
func (c *connsChild) startConnects() {
	for c.started < c.opts.N && c.stats.Connecting < c.opts.Parallel {
		c.started++
		c.connectOne()
	}
}

func (c *connsChild) sourceFor(i int) [4]byte {
	a := c.src + uint32(i/c.opts.PerSource)
	return [4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}
}

func (c *connsChild) connectOne() {
	i := c.started - 1
	fd, err := unix.Socket(c.fam, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		c.fail(err, "create socket")
		return
	}
	if c.bind {
		src := c.sourceFor(i)
		if i%c.opts.PerSource == 0 {
			c.stats.Sources = append(c.stats.Sources, netip.AddrFrom4(src).String())
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
			unix.Close(fd)
			c.fail(err, "set IP_BIND_ADDRESS_NO_PORT")
			return
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src}); err != nil {
			unix.Close(fd)
			c.fail(err, "bind "+netip.AddrFrom4(src).String())
			return
		}
	}
	// Edge-triggered: EPOLLOUT once the connect completes, EPOLLIN/EPOLLRDHUP when something arrives later.
	err = unix.Connect(fd, c.dst)
	switch err {
	case nil, unix.EINPROGRESS:
	default:
		unix.Close(fd)
		c.fail(err, "connect")
		return
	}
	if rerr := unix.EpollCtl(c.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{
		Events: unix.EPOLLOUT | unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd),
	}); rerr != nil {
		unix.Close(fd)
		c.fail(rerr, "register socket")
		return
	}
	c.state = growTo(c.state, fd)
	c.pos = growTo(c.pos, fd)
	c.state[fd] = ccConnecting
	c.stats.Connecting++
	c.dirty = true
	if err == nil {
		c.established(fd)
	}
}

func (c *connsChild) handle(fd int, evs uint32) {
	if fd >= len(c.state) {
		return
	}
	switch c.state[fd] {
	case ccConnecting:
		if evs&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			return
		}
		if evs&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			// Failed (or, rarely, established and ended at once): SO_ERROR tells.
			soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
			if err == nil && soerr != 0 {
				err = unix.Errno(soerr)
			}
			if err == nil {
				c.established(fd)
				c.drain(fd)
				return
			}
			c.stats.Connecting--
			c.state[fd] = ccNone
			unix.Close(fd)
			c.fail(err, "connect")
			return
		}
		c.established(fd)
		if evs&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0 {
			c.drain(fd)
		}
	case ccOpen:
		if evs&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			c.drain(fd)
		}
	}
}

func (c *connsChild) established(fd int) {
	c.stats.Connecting--
	c.stats.Established++
	c.stats.Open++
	c.state[fd] = ccOpen
	c.pos[fd] = int32(len(c.open))
	c.open = append(c.open, int32(fd))
	c.dirty = true
	if len(c.opts.Send) > 0 {
		_, _ = unix.Write(fd, c.opts.Send)
	}
}

// drain reads what arrived (edge-triggered: until EAGAIN); at EOF or an error the server ended the connection and
// the client closes it.
func (c *connsChild) drain(fd int) {
	for {
		n, err := unix.Read(fd, c.buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return
		case err == nil && n > 0:
			continue
		}
		c.stats.PeerEnded++
		c.closeOpen(fd)
		return
	}
}

// closeOpen closes an established connection and takes it out of the open list.
func (c *connsChild) closeOpen(fd int) {
	i := c.pos[fd]
	last := c.open[len(c.open)-1]
	c.open[i] = last
	c.pos[last] = i
	c.open = c.open[:len(c.open)-1]
	c.state[fd] = ccNone
	unix.Close(fd)
	c.stats.LastCloseMono = c.clk.now()
	c.stats.Open--
	c.dirty = true
}

// giveUp ends the opening at the timeout: the connects in flight count as failed.
func (c *connsChild) giveUp() {
	for fd, st := range c.state {
		if st == ccConnecting {
			unix.Close(fd)
			c.state[fd] = ccNone
			c.stats.Connecting--
			c.fail(fmt.Errorf("%w after %v", unix.ETIMEDOUT, c.opts.Timeout), "connect")
		}
	}
	if n := c.opts.N - c.started; n > 0 {
		c.stats.Failed += n
		c.stats.Failures[FailTimeout] += n
		c.stats.Samples = append(c.stats.Samples, fmt.Sprintf("%s: %d connects not started before the timeout", FailTimeout, n))
		c.started = c.opts.N
	}
}

func (c *connsChild) command(cmd ctlCmd) {
	name, arg, _ := strings.Cut(cmd.name, ":")
	var err error
	switch name {
	case "stats":
	case "close":
		n, perr := strconv.Atoi(arg)
		switch {
		case perr != nil || n < 0:
			err = fmt.Errorf("bad count %q", arg)
		case c.closing != nil:
			err = fmt.Errorf("a close-all is in progress")
		case n > len(c.open):
			err = fmt.Errorf("only %d connections open, asked to close %d", len(c.open), n)
		default:
			for range n {
				c.closeLast()
			}
		}
	case "close-all":
		span, perr := strconv.ParseInt(arg, 10, 64)
		switch {
		case perr != nil || span < 0:
			err = fmt.Errorf("bad spread %q", arg)
		case c.closing != nil:
			err = fmt.Errorf("a close-all is in progress")
		default:
			c.closing = &closePlan{seq: cmd.seq, start: c.clk.now(), span: span, total: len(c.open)}
			c.closeDue(c.clk.now())
			return // acked when done
		}
	default:
		err = fmt.Errorf("unknown command %q", cmd.name)
	}
	c.emitStats(cmd.seq, c.clk.now())
	ack(cmd.seq, err)
}

func (c *connsChild) closeLast() {
	c.stats.Closed++
	c.closeOpen(int(c.open[len(c.open)-1]))
}

// next returns when the next close of the plan is due.
func (p *closePlan) next() int64 {
	if p.total == 0 || p.span == 0 {
		return p.start
	}
	// Close number k (1-based) is due at start + (k-1)*span/total: the first at once, the last at
	// start + span*(total-1)/total.
	return p.start + int64(float64(p.done)*float64(p.span)/float64(p.total))
}

// closeDue closes what the CloseAll plan says is due, and acks it once all are closed.
func (c *connsChild) closeDue(now int64) {
	p := c.closing
	for len(c.open) > 0 && p.done < p.total && p.next() <= now {
		c.closeLast()
		p.done++
	}
	if len(c.open) == 0 || p.done >= p.total {
		// Peer-ended connections leave the list by themselves; nothing new is opened after the opening, so the
		// list is empty here.
		c.closing = nil
		c.emitStats(p.seq, c.clk.now())
		ack(p.seq, nil)
	}
}
