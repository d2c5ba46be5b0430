package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/testenv"
)

// envGen carries a tableflip generation's number to its successor (tableflip starts it with this process's
// environment).
const envGen = "DRAINBENCH_TF_GEN"

// tableflipOptions configure the bench's tableflip server: the library way of upgrading, which needs the server's
// code changed. On SIGHUP it starts its successor (this binary again) through tableflip, which inherits the
// listening socket itself; once the successor is ready the old generation closes its copy of the listener, finishes
// what it holds and exits.
type tableflipOptions struct {
	Addr        string        `json:"addr"`
	Hold        bool          `json:"hold"`         // raw TCP: hold connections until the peer ends them (else HTTP)
	Backlog     int           `json:"backlog"`      // listen backlog of the socket (set by generation 0); 0: somaxconn
	AcceptDelay time.Duration `json:"accept_delay"` // slept before each accept, in generation 0 only
	MaxLife     time.Duration `json:"max_life"`     // a generation exits after this long whatever happens; default 10m
}

// runTableflipChild is one generation of the tableflip server.
func runTableflipChild(optsJSON []byte) error {
	var opts tableflipOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	if opts.MaxLife <= 0 {
		opts.MaxLife = 10 * time.Minute
	}
	gen, _ := strconv.Atoi(os.Getenv(envGen))
	id := "tf" + strconv.Itoa(gen)
	pid := os.Getpid()
	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	hup := make(chan os.Signal, 4)
	signal.Notify(hup, syscall.SIGHUP)

	lc := &net.ListenConfig{}
	lc.SetMultipathTCP(false) // plain TCP like every other contender
	upg, err := tableflip.New(tableflip.Options{ListenConfig: lc, UpgradeTimeout: 30 * time.Second})
	if err != nil {
		return fmt.Errorf("create upgrader: %w", err)
	}
	defer upg.Stop()
	ln, err := upg.Listen("tcp", opts.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	delay := time.Duration(0)
	if gen == 0 {
		delay = opts.AcceptDelay
		if opts.Backlog > 0 {
			if err := setBacklog(ln, opts.Backlog); err != nil {
				return err
			}
		}
	}
	sl := &slowListener{Listener: ln, delay: delay}

	var (
		srv  *http.Server
		hold *holdServer
	)
	if opts.Hold {
		hold = newHoldServer()
		go hold.serve(sl)
	} else {
		srv = &http.Server{Handler: idHandler(id)}
		go func() { _ = srv.Serve(sl) }()
	}
	// Parent gone (stdin EOF; every generation shares the first one's stdin): exit.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	go func() {
		for range hup {
			os.Setenv(envGen, strconv.Itoa(gen+1))
			// tableflip refuses to upgrade until it has seen its own parent exit (it learns that from a pipe,
			// a little after the exit): retry that case for a while, as an operator would.
			err := upg.Upgrade()
			for i := 0; err != nil && strings.Contains(err.Error(), "parent hasn't exited") && i < 2000; i++ {
				time.Sleep(time.Millisecond)
				err = upg.Upgrade()
			}
			if err != nil {
				emit(event{Ev: "upgrade-error", PID: pid, Err: err.Error()})
			}
		}
	}()
	if err := upg.Ready(); err != nil {
		return fmt.Errorf("ready: %w", err)
	}
	emit(event{Ev: "listening", PID: pid, ID: id, Mono: testenv.MonoNow()})

	life := time.NewTimer(opts.MaxLife)
	defer life.Stop()
	select {
	case <-upg.Exit():
	case <-sigc:
		emit(event{Ev: "exiting", PID: pid, Mono: testenv.MonoNow()})
		return nil
	case <-life.C:
		return errors.New("max life reached")
	}
	// The successor is ready: stop accepting, finish what we hold, exit.
	emit(event{Ev: "upgraded", PID: pid, Mono: testenv.MonoNow()})
	held := 0
	if opts.Hold {
		held = hold.drain(sl, opts.MaxLife)
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := srv.Shutdown(ctx)
		cancel()
		if err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
	}
	emit(event{Ev: "exiting", PID: pid, Mono: testenv.MonoNow(), N: held})
	return nil
}

func setBacklog(ln net.Listener, backlog int) error {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return fmt.Errorf("set backlog: %T has no fd", ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("set backlog: %w", err)
	}
	var lerr error
	if err := rc.Control(func(fd uintptr) { lerr = unix.Listen(int(fd), backlog) }); err != nil {
		return fmt.Errorf("set backlog: %w", err)
	}
	if lerr != nil {
		return fmt.Errorf("set backlog: %w", lerr)
	}
	return nil
}

// idHandler answers every request with its ID, the way testenv's servers do (the load client checks it).
func idHandler(id string) http.Handler {
	body := id + "\n"
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("X-Server", id)
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	})
}

// slowListener sleeps before each accept (a slow accepter whose queue fills up).
type slowListener struct {
	net.Listener
	delay time.Duration
}

func (l *slowListener) Accept() (net.Conn, error) {
	if l.delay > 0 {
		time.Sleep(l.delay)
	}
	return l.Listener.Accept()
}

// holdServer accepts connections and holds them, discarding what arrives, until the peer ends them.
type holdServer struct {
	mu      sync.Mutex
	held    int
	closing bool
	zero    chan struct{}
	stopped chan struct{} // the accept loop returned
}

func newHoldServer() *holdServer {
	return &holdServer{zero: make(chan struct{}), stopped: make(chan struct{})}
}

func (h *holdServer) serve(ln net.Listener) {
	defer close(h.stopped)
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		h.held++
		h.mu.Unlock()
		go func() {
			_, _ = io.Copy(io.Discard, c)
			c.Close()
			h.mu.Lock()
			h.held--
			if h.closing && h.held == 0 {
				close(h.zero)
			}
			h.mu.Unlock()
		}()
	}
}

// drain closes the listener and waits (at most limit) until every held connection has been ended by its peer. It
// returns how many it held when the listener closed.
func (h *holdServer) drain(ln net.Listener, limit time.Duration) int {
	ln.Close()
	<-h.stopped
	h.mu.Lock()
	n := h.held
	h.closing = true
	if h.held == 0 {
		close(h.zero)
	}
	h.mu.Unlock()
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-h.zero:
	case <-t.C:
	}
	return n
}

// tableflipServer is the parent's handle on a tableflip server: its first generation is a child of the bench, each
// later one a child of its predecessor. All share one stdout pipe, so events name their process.
type tableflipServer struct {
	c         *child
	listening chan event // "listening" and "upgrade-error" events
	mu        sync.Mutex
	errMsg    string
}

func startTableflip(ctx context.Context, ns *testenv.NetNS, opts tableflipOptions) (*tableflipServer, event, error) {
	s := &tableflipServer{listening: make(chan event, 64)}
	c, err := startChild(ns, roleTableflip, opts, func(ev event) {
		switch ev.Ev {
		case "listening", "upgrade-error":
			select {
			case s.listening <- ev:
			default:
			}
		case "error":
			s.mu.Lock()
			s.errMsg = fmt.Sprintf("pid %d: %s", ev.PID, ev.Err)
			s.mu.Unlock()
			select {
			case s.listening <- ev:
			default:
			}
		}
	})
	if err != nil {
		return nil, event{}, fmt.Errorf("start tableflip server: %w", err)
	}
	s.c = c
	ev, err := s.next(ctx, 0)
	if err != nil {
		c.kill()
		return nil, event{}, fmt.Errorf("start tableflip server: %w", err)
	}
	return s, ev, nil
}

// next waits for the "listening" event of a generation other than pid.
func (s *tableflipServer) next(ctx context.Context, pid int) (event, error) {
	t := time.NewTimer(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case ev := <-s.listening:
			switch {
			case ev.Ev == "listening" && ev.PID != pid:
				return ev, nil
			case ev.Ev == "upgrade-error" || ev.Ev == "error":
				return ev, fmt.Errorf("pid %d: %s", ev.PID, ev.Err)
			}
		case <-s.c.eof:
			return event{}, errors.New("every generation exited")
		case <-t.C:
			return event{}, errors.New("no new generation listening after 30s")
		case <-ctx.Done():
			return event{}, ctx.Err()
		}
	}
}

// close ends the server: stdin EOF makes every generation exit; the first one is also killed.
func (s *tableflipServer) close() {
	s.c.stdin.Close()
	s.c.kill()
}

// exitWatch watches a process's exit through a pidfd and records when it was seen; it can signal the process
// race-free. With reap, it also reaps the process if it is (by now) a child of the bench (the bench is a child
// subreaper, so a tableflip generation whose parent exited becomes one).
type exitWatch struct {
	PID  int
	fd   int
	done chan struct{} // closed when the exit was seen
	mono int64         // CLOCK_MONOTONIC when it was seen; valid after done
	stop chan struct{}
	over chan struct{} // the watcher returned
	once sync.Once
}

func watchExit(pid int, reap bool) (*exitWatch, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("open pidfd of %d: %w", pid, err)
	}
	w := &exitWatch{PID: pid, fd: fd, done: make(chan struct{}), stop: make(chan struct{}), over: make(chan struct{})}
	go func() {
		defer close(w.over)
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			n, err := unix.Poll(pfd, 200)
			if err != nil && !errors.Is(err, unix.EINTR) {
				return
			}
			if n > 0 {
				w.mono = testenv.MonoNow()
				if reap {
					var info unix.Siginfo
					_ = unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG, nil)
				}
				close(w.done)
				return
			}
		}
	}()
	return w, nil
}

// signal sends sig through the pidfd.
func (w *exitWatch) signal(sig syscall.Signal) error {
	if err := unix.PidfdSendSignal(w.fd, sig, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("signal %d: %w", w.PID, err)
	}
	return nil
}

// wait waits for the exit; it returns the time it was seen, or 0 if ctx ended first.
func (w *exitWatch) wait(ctx context.Context) int64 {
	select {
	case <-w.done:
		return w.mono
	case <-ctx.Done():
		return 0
	}
}

// exited reports whether the exit was seen.
func (w *exitWatch) exited() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

// close stops watching and closes the pidfd.
func (w *exitWatch) close() {
	w.once.Do(func() {
		close(w.stop)
		<-w.over
		unix.Close(w.fd)
	})
}
