package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ServerOptions configures a test server. The zero value is a plain single-process HTTP server on 127.0.0.1:8080.
type ServerOptions struct {
	// Addr is the listen address; default "127.0.0.1:8080". Port 0 picks a free port (see Server.Addr).
	Addr string
	// ID is sent in every response body ("<ID>\n") and in the header X-Server; default "server".
	ID string
	// ReusePort sets SO_REUSEPORT before bind.
	ReusePort bool
	// MPTCP makes the listeners MPTCP. By default they are plain TCP (Go would otherwise pick MPTCP).
	MPTCP bool
	// Workers > 0 makes a pre-fork server: the master process opens the listeners, starts Workers worker processes
	// that inherit them, accept and serve; the master does not accept but keeps its copies of the listeners open
	// (like nginx). On SIGTERM/SIGINT/SIGQUIT the master closes its copies, forwards the signal to the workers,
	// waits for them and exits.
	Workers int
	// Listeners is the number of listening sockets the server opens on Addr (nginx `reuseport` style, needs
	// ReusePort); default 1. With Workers > 0, worker w gets listeners i with i%Workers == w; a worker that would
	// get none shares listener w%Listeners (so Listeners=1 is the classic shared-listener pre-fork server).
	Listeners int
	// Delay is slept before writing each response.
	Delay time.Duration
	// AcceptDelay is slept before each accept, which makes a slow accepter whose accept queue fills up.
	AcceptDelay time.Duration
	// ExitDelay is slept after an exit signal before the server stops (a slow graceful shutdown): it keeps its
	// listeners and connections meanwhile. Single-process servers only.
	ExitDelay time.Duration
	// Backlog sets the listen backlog; 0 keeps Go's default (net.core.somaxconn).
	Backlog int
	// ReadyDelay makes GET /ready answer 503 until this long after the server started listening, 200 after.
	ReadyDelay time.Duration
	// UID and GID, if UID != 0, are the credentials the server runs with.
	UID, GID uint32
	// Cgroup, if set, is the cgroup v2 directory the server (and its workers) start in (see CgroupForTest).
	Cgroup string
}

func (o ServerOptions) withDefaults() ServerOptions {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:8080"
	}
	if o.ID == "" {
		o.ID = "server"
	}
	if o.Listeners == 0 {
		o.Listeners = 1
	}
	return o
}

func (o ServerOptions) validate() error {
	switch {
	case o.Listeners < 0:
		return fmt.Errorf("negative Listeners %d", o.Listeners)
	case o.Listeners > 1 && !o.ReusePort:
		return fmt.Errorf("%d listeners on one address need ReusePort", o.Listeners)
	case o.Workers < 0:
		return fmt.Errorf("negative Workers %d", o.Workers)
	case o.Backlog < 0:
		return fmt.Errorf("negative Backlog %d", o.Backlog)
	}
	return nil
}

// SignalEvent is a signal a child process received.
type SignalEvent struct {
	Signal syscall.Signal
	MonoNS int64 // CLOCK_MONOTONIC when the child saw it, comparable with MonoNow
}

// Server is a running test server process.
type Server struct {
	PID        int       // the server process (the master if Workers > 0)
	Cmd        *exec.Cmd // do not call Wait on it; use Server.Wait
	ID         string    // ServerOptions.ID with the default applied
	Addr       string    // the address it listens on, with the port resolved
	WorkerPIDs []int     // worker processes if Workers > 0

	p     *proc
	ready chan struct{} // closed on the "listening" event

	mu         sync.Mutex
	served     int
	signals    []SignalEvent
	errMsg     string
	acceptErrs []string
}

// StartServer starts a server process in ns (nil: the current namespace) and returns once it, and all its workers,
// listen. If ctx ends first the process is killed.
func StartServer(ctx context.Context, ns *NetNS, opts ServerOptions) (*Server, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("start server: %w", err)
	}
	s := &Server{ID: opts.ID, ready: make(chan struct{})}
	p, err := startProc(procConfig{
		ns:      ns,
		role:    roleServer,
		opts:    opts,
		uid:     opts.UID,
		cgroup:  opts.Cgroup,
		gid:     opts.GID,
		onEvent: s.handleEvent,
	})
	if err != nil {
		return nil, fmt.Errorf("start server: %w", err)
	}
	s.p, s.PID, s.Cmd = p, p.cmd.Process.Pid, p.cmd

	select {
	case <-s.ready:
		return s, nil
	case <-p.eof:
		select {
		case <-s.ready: // listened, then exited at once
			return s, nil
		default:
		}
		_, werr := p.wait(context.Background())
		s.mu.Lock()
		msg := s.errMsg
		s.mu.Unlock()
		if msg != "" {
			return nil, fmt.Errorf("start server: %s", msg)
		}
		return nil, fmt.Errorf("start server: exited before listening: %w", werr)
	case <-ctx.Done():
		_ = p.kill()
		_, _ = p.wait(context.Background())
		return nil, fmt.Errorf("start server: %w", ctx.Err())
	}
}

// StartServerForTest starts a server like StartServer and kills it when the test ends. It fails the test on error.
func StartServerForTest(t testing.TB, ns *NetNS, opts ServerOptions) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := StartServer(ctx, ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = s.Kill()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if exited, _ := s.Wait(ctx); !exited {
			t.Errorf("server %s (pid %d) did not exit after SIGKILL", s.ID, s.PID)
		}
	})
	return s
}

func (s *Server) handleEvent(ev event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch ev.Ev {
	case "listening":
		if s.Addr == "" {
			s.Addr = ev.Addr
			s.WorkerPIDs = ev.PIDs
			close(s.ready)
		}
	case "served", "exiting":
		s.served = ev.Served
	case "signal":
		s.signals = append(s.signals, SignalEvent{Signal: syscall.Signal(ev.Signal), MonoNS: ev.Mono})
	case "error":
		s.errMsg = ev.Err
	case "accept-error":
		s.acceptErrs = append(s.acceptErrs, ev.Err)
	}
}

const controlTimeout = 10 * time.Second

func (s *Server) control(command string) error {
	ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
	defer cancel()
	return s.p.control(ctx, command)
}

// PauseAccept makes the server stop accepting; new connections queue up in the kernel. It returns once no accept
// is in progress any more.
func (s *Server) PauseAccept() error {
	if err := s.control("pause"); err != nil {
		return fmt.Errorf("pause accept: %w", err)
	}
	return nil
}

// ResumeAccept undoes PauseAccept.
func (s *Server) ResumeAccept() error {
	if err := s.control("resume"); err != nil {
		return fmt.Errorf("resume accept: %w", err)
	}
	return nil
}

// CloseListener makes the server close its listening sockets (in all its processes) without accepting what is
// queued, and returns once it has. The process keeps serving the connections it has.
func (s *Server) CloseListener() error {
	if err := s.control("close"); err != nil {
		return fmt.Errorf("close listener: %w", err)
	}
	return nil
}

// Signals returns the signals the server process received so far, in order.
func (s *Server) Signals() []SignalEvent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SignalEvent(nil), s.signals...)
}

// AcceptErrors returns the errors that ended one of the server's accept loops (a server that stops accepting on
// such an error, as net/http's does): none unless something broke its listener.
func (s *Server) AcceptErrors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.acceptErrs)
}

// Served returns the number of HTTP requests the server (all its workers) answered so far. It is updated at least
// every 100ms while the server runs and is final once Wait has returned.
func (s *Server) Served() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.served
}

// Signal sends sig to the server process (the master if Workers > 0).
func (s *Server) Signal(sig os.Signal) error {
	if err := s.p.signal(sig); err != nil {
		return fmt.Errorf("signal server: %w", err)
	}
	return nil
}

// Wait waits until the server process has exited, or ctx ends. exited is false only if ctx ended first (err is then
// ctx.Err()); after an exit err is the exit error: nil for status 0, *exec.ExitError otherwise.
func (s *Server) Wait(ctx context.Context) (exited bool, err error) {
	return s.p.wait(ctx)
}

// Exited reports whether the server process has exited.
func (s *Server) Exited() bool {
	return s.p.hasExited()
}

// Kill sends SIGKILL to the server process; its workers die with it (Pdeathsig). It is safe to call when the
// process is already dead.
func (s *Server) Kill() error {
	if err := s.p.kill(); err != nil {
		return fmt.Errorf("kill server: %w", err)
	}
	return nil
}

// ---- child side ----

// exitSignals end a server; the others are only reported.
var (
	exitSignals   = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT}
	reportSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2}
)

func isExitSignal(sig os.Signal) bool {
	for _, s := range exitSignals {
		if s == sig {
			return true
		}
	}
	return false
}

// workerOptions are the options of a pre-fork worker; its listeners are fds 3, 4, ...
type workerOptions struct {
	Server     ServerOptions
	ListenMono int64
	Listeners  int
}

func runServer(optsJSON []byte) error {
	var opts ServerOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	// Listen and report signals from the start.
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, reportSignals...)
	lns, err := listen(opts)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	listenMono := MonoNow()
	if opts.Workers > 0 {
		return runMaster(opts, lns, listenMono, sigc)
	}
	return serve(opts, lns, listenMono, sigc)
}

func runWorker(optsJSON []byte) error {
	var wo workerOptions
	if err := json.Unmarshal(optsJSON, &wo); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, reportSignals...)
	var lns []*net.TCPListener
	for i := range wo.Listeners {
		f := os.NewFile(uintptr(3+i), "listener"+strconv.Itoa(i))
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("inherit listener %d: %w", i, err)
		}
		tl, ok := l.(*net.TCPListener)
		if !ok {
			return fmt.Errorf("inherit listener %d: not TCP (%T)", i, l)
		}
		lns = append(lns, tl)
	}
	return serve(wo.Server, lns, wo.ListenMono, sigc)
}

func listen(opts ServerOptions) ([]*net.TCPListener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(opts.MPTCP)
	if opts.ReusePort {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			})
			return errors.Join(err, serr)
		}
	}
	addr := opts.Addr
	var lns []*net.TCPListener
	closeAll := func() {
		for _, l := range lns {
			l.Close()
		}
	}
	for i := range opts.Listeners {
		l, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			closeAll()
			return nil, err
		}
		tl := l.(*net.TCPListener)
		lns = append(lns, tl)
		if i == 0 {
			addr = tl.Addr().String() // the same port for the others, also when Addr asked for port 0
		}
		if opts.Backlog > 0 {
			// listen(2) on a listening socket only updates its backlog.
			if err := setBacklog(tl, opts.Backlog); err != nil {
				closeAll()
				return nil, fmt.Errorf("set backlog: %w", err)
			}
		}
	}
	return lns, nil
}

func setBacklog(l *net.TCPListener, backlog int) error {
	rc, err := l.SyscallConn()
	if err != nil {
		return err
	}
	var lerr error
	err = rc.Control(func(fd uintptr) { lerr = unix.Listen(int(fd), backlog) })
	return errors.Join(err, lerr)
}

// ctlListener is a listener whose accepting can be paused and which sleeps before each accept if asked to.
type ctlListener struct {
	ln          *net.TCPListener
	acceptDelay time.Duration

	mu     sync.Mutex
	cond   *sync.Cond
	paused bool
	parked bool // the accept loop waits because of paused
	closed bool
}

func newCtlListener(ln *net.TCPListener, acceptDelay time.Duration) *ctlListener {
	l := &ctlListener{ln: ln, acceptDelay: acceptDelay}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *ctlListener) Accept() (net.Conn, error) {
	for {
		if l.acceptDelay > 0 {
			time.Sleep(l.acceptDelay)
		}
		l.mu.Lock()
		for l.paused && !l.closed {
			l.parked = true
			l.cond.Broadcast()
			l.cond.Wait()
		}
		l.parked = false
		closed := l.closed
		l.mu.Unlock()
		if closed {
			return nil, net.ErrClosed
		}
		c, err := l.ln.Accept()
		if err == nil {
			return c, nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue // pause interrupted the accept
		}
		l.mu.Lock()
		closed = l.closed
		l.mu.Unlock()
		if closed {
			return nil, net.ErrClosed
		}
		return nil, err
	}
}

// pause returns once the accept loop is parked (or the listener closed).
func (l *ctlListener) pause() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.paused = true
	_ = l.ln.SetDeadline(time.Unix(1, 0)) // wake an accept in progress
	for !l.parked && !l.closed {
		l.cond.Wait()
	}
}

func (l *ctlListener) resume() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.paused = false
	_ = l.ln.SetDeadline(time.Time{})
	l.cond.Broadcast()
}

// Close closes the socket; it returns after the file descriptor is closed. Safe to call more than once.
func (l *ctlListener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.cond.Broadcast()
	l.mu.Unlock()
	return l.ln.Close()
}

func (l *ctlListener) Addr() net.Addr { return l.ln.Addr() }

// httpChild is a process that serves HTTP on its listeners: a single-process server or a pre-fork worker.
type httpChild struct {
	opts      ServerOptions
	readyMono int64
	served    atomic.Int64
	lns       []*ctlListener
}

func (c *httpChild) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("X-Server", c.opts.ID)
	h.Set("Content-Type", "text/plain; charset=utf-8")
	defer c.served.Add(1)
	if r.URL.Path == "/ready" && MonoNow() < c.readyMono {
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, "not ready\n")
		return
	}
	if c.opts.Delay > 0 {
		time.Sleep(c.opts.Delay)
	}
	body := c.opts.ID + "\n"
	h.Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = io.WriteString(w, body)
}

func (c *httpChild) closeListeners() {
	for _, l := range c.lns {
		_ = l.Close()
	}
	emit(event{Ev: "closed", Mono: MonoNow()})
}

func serve(opts ServerOptions, lns []*net.TCPListener, listenMono int64, sigc chan os.Signal) error {
	c := &httpChild{opts: opts, readyMono: listenMono + int64(opts.ReadyDelay)}
	for _, l := range lns {
		c.lns = append(c.lns, newCtlListener(l, opts.AcceptDelay))
	}
	srv := &http.Server{Handler: c}
	for _, l := range c.lns {
		go func() {
			// Serve returns when Accept fails for good (not after the listener was closed on purpose).
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				emit(event{Ev: "accept-error", Err: err.Error(), Mono: MonoNow()})
			}
		}()
	}
	addr := ""
	if len(lns) > 0 {
		addr = lns[0].Addr().String()
	}
	emit(event{Ev: "listening", Addr: addr, PIDs: nil, Mono: listenMono})

	var closeOnce sync.Once
	go readControl(func(cmd string, seq int) {
		switch cmd {
		case "pause":
			for _, l := range c.lns {
				l.pause()
			}
			ack(seq, nil)
		case "resume":
			for _, l := range c.lns {
				l.resume()
			}
			ack(seq, nil)
		case "close":
			closeOnce.Do(c.closeListeners)
			ack(seq, nil)
		default:
			ack(seq, fmt.Errorf("unknown command %q", cmd))
		}
	})

	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := int64(-1)
	for {
		select {
		case sig := <-sigc:
			emit(event{Ev: "signal", Signal: int(sig.(syscall.Signal)), Mono: MonoNow()})
			if !isExitSignal(sig) {
				continue
			}
			time.Sleep(opts.ExitDelay)
			// What is queued on the listeners is reset by the kernel (unless migrated); the requests of
			// accepted connections are answered.
			closeOnce.Do(c.closeListeners)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := srv.Shutdown(ctx)
			cancel()
			if err != nil {
				fmt.Fprintf(os.Stderr, "testenv server %s: shutdown: %v\n", opts.ID, err)
			}
			emit(event{Ev: "exiting", Served: int(c.served.Load())})
			return nil
		case <-tick.C:
			if n := c.served.Load(); n != last {
				last = n
				emit(event{Ev: "served", Served: int(n)})
			}
		}
	}
}

// runMaster runs the master of a pre-fork server: it starts the workers, relays control commands and signals, and
// reports the sum of what they served.
func runMaster(opts ServerOptions, lns []*net.TCPListener, listenMono int64, sigc chan os.Signal) error {
	files := make([]*os.File, len(lns))
	for i, l := range lns {
		f, err := l.File()
		if err != nil {
			return fmt.Errorf("dup listener: %w", err)
		}
		files[i] = f
	}

	var (
		mu     sync.Mutex
		served = make([]int, opts.Workers)
	)
	sum := func() int {
		n := 0
		for _, v := range served {
			n += v
		}
		return n
	}
	workers := make([]*proc, opts.Workers)
	ready := make([]chan struct{}, opts.Workers)
	killAll := func() {
		for _, w := range workers {
			if w != nil {
				_ = w.kill()
			}
		}
	}
	for w := range opts.Workers {
		var mine []*os.File
		for i, f := range files {
			if i%opts.Workers == w {
				mine = append(mine, f)
			}
		}
		if len(mine) == 0 {
			mine = []*os.File{files[w%len(files)]}
		}
		ready[w] = make(chan struct{})
		var readyOnce sync.Once
		p, err := startProc(procConfig{
			role:       roleWorker,
			opts:       workerOptions{Server: opts, ListenMono: listenMono, Listeners: len(mine)},
			extraFiles: mine,
			onEvent: func(ev event) {
				switch ev.Ev {
				case "listening":
					readyOnce.Do(func() { close(ready[w]) })
				case "served", "exiting":
					mu.Lock()
					served[w] = ev.Served
					n := sum()
					mu.Unlock()
					emit(event{Ev: "served", Served: n})
				}
			},
		})
		if err != nil {
			killAll()
			return fmt.Errorf("start worker %d: %w", w, err)
		}
		workers[w] = p
	}
	for _, f := range files {
		f.Close()
	}

	pids := make([]int, len(workers))
	timeout := time.NewTimer(30 * time.Second)
	for w, p := range workers {
		select {
		case <-ready[w]:
		case <-p.eof:
			killAll()
			return fmt.Errorf("worker %d exited before listening", w)
		case <-timeout.C:
			killAll()
			return fmt.Errorf("worker %d not listening after 30s", w)
		}
		pids[w] = p.cmd.Process.Pid
	}
	timeout.Stop()
	emit(event{Ev: "listening", Addr: lns[0].Addr().String(), PIDs: pids, Mono: listenMono})

	var closeOnce sync.Once
	closeOwn := func() {
		closeOnce.Do(func() {
			for _, l := range lns {
				l.Close()
			}
		})
	}
	go readControl(func(cmd string, seq int) {
		if cmd == "close" {
			closeOwn()
		}
		var errs []error
		for i, w := range workers {
			ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
			if err := w.control(ctx, cmd); err != nil {
				errs = append(errs, fmt.Errorf("worker %d: %w", i, err))
			}
			cancel()
		}
		if cmd == "close" {
			emit(event{Ev: "closed", Mono: MonoNow()})
		}
		ack(seq, errors.Join(errs...))
	})

	for sig := range sigc {
		emit(event{Ev: "signal", Signal: int(sig.(syscall.Signal)), Mono: MonoNow()})
		if !isExitSignal(sig) {
			continue
		}
		closeOwn()
		for _, w := range workers {
			_ = w.signal(sig)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 35*time.Second)
		for i, w := range workers {
			if exited, _ := w.wait(ctx); !exited {
				fmt.Fprintf(os.Stderr, "testenv server %s: worker %d did not exit, killing it\n", opts.ID, i)
				_ = w.kill()
				_, _ = w.wait(context.Background())
			}
		}
		cancel()
		mu.Lock()
		n := sum()
		mu.Unlock()
		emit(event{Ev: "exiting", Served: n})
		return nil
	}
	return nil
}
