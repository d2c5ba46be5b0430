package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ChurnOptions configures a churn client: Concurrency workers that each, over and over, open a TCP connection,
// write a few bytes and then end the connection in one of four ways picked at random (see ChurnResult). The zero
// value runs 16 workers against 127.0.0.1:8080 for 10s.
type ChurnOptions struct {
	// Addr is the server address; default "127.0.0.1:8080".
	Addr string
	// Concurrency is the number of workers; default 16.
	Concurrency int
	// Duration bounds the run; default 10s (wall clock, time frozen by SIGSTOP included). Stop ends it earlier.
	Duration time.Duration
	// Hold bounds the random hold before a normal close or a reset; default 200ms.
	Hold time.Duration
	// IdleHold bounds the random hold of an idle connection; default 1s.
	IdleHold time.Duration
	// Timeout bounds the connect, the write and the wait for the server's close after a half-close; default 3s.
	// Freezing the process (SIGSTOP) for longer than that can turn a wait in progress into a timeout failure.
	Timeout time.Duration
	// Seed seeds the random choices (worker w uses the PCG stream (Seed, w)); 0 picks a time-based seed, which
	// Churn.Seed reports.
	Seed int64
	// SourceStart is the source address of worker 0 when Addr is in 127.0.0.0/8; worker w binds to SourceStart+w
	// (port 0, IP_BIND_ADDRESS_NO_PORT), so that the client's TIME_WAIT sockets do not use up the ephemeral ports of
	// one address. Default "127.2.0.1"; "none" does not bind.
	SourceStart string
}

func (o ChurnOptions) withDefaults() ChurnOptions {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:8080"
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 16
	}
	if o.Duration <= 0 {
		o.Duration = 10 * time.Second
	}
	if o.Hold <= 0 {
		o.Hold = 200 * time.Millisecond
	}
	if o.IdleHold <= 0 {
		o.IdleHold = time.Second
	}
	if o.Timeout <= 0 {
		o.Timeout = 3 * time.Second
	}
	if o.Seed == 0 {
		o.Seed = time.Now().UnixNano()
	}
	if o.SourceStart == "" {
		o.SourceStart = "127.2.0.1"
	}
	return o
}

func (o ChurnOptions) validate() error {
	if _, err := resolveAddr(o.Addr); err != nil {
		return fmt.Errorf("bad Addr: %w", err)
	}
	if o.SourceStart != "none" {
		if a, err := netip.ParseAddr(o.SourceStart); err != nil || !a.Is4() {
			return fmt.Errorf("bad SourceStart %q: want an IPv4 address or \"none\"", o.SourceStart)
		}
	}
	return nil
}

// ChurnResult counts what a churn client did. Every attempt ends in one of Closed, HalfClosed, Reset, Idle or a
// failure; Opened = Closed + HalfClosed + Reset + Idle + the failures after the connect.
type ChurnResult struct {
	Attempts   int            // connects started
	Opened     int            // connections established
	Closed     int            // ... closed normally (FIN) after a random hold up to Hold
	HalfClosed int            // ... half-closed (shutdown SHUT_WR), the server's close awaited (EOF), then closed
	Reset      int            // ... reset by the client (SO_LINGER {1, 0}, close: RST) after a random hold up to Hold
	Idle       int            // ... held idle for a random time up to IdleHold, then closed normally
	Failures   map[string]int // failed attempts by kind: FailRefused, FailReset (by the server), FailTimeout, FailOther
	Samples    []string       // up to 20 example failures, "kind: step: error"
}

// FailureCount returns the number of failed attempts.
func (r ChurnResult) FailureCount() int {
	n := 0
	for _, v := range r.Failures {
		n += v
	}
	return n
}

func (r ChurnResult) clone() ChurnResult {
	c := r
	c.Failures = maps.Clone(r.Failures)
	c.Samples = append([]string(nil), r.Samples...)
	return c
}

// Churn is a running churn client process.
type Churn struct {
	PID  int       // the caller may SIGSTOP/SIGCONT it to freeze the workload
	Cmd  *exec.Cmd // do not call Wait on it
	Seed int64     // the seed in use

	opts    ChurnOptions
	p       *proc
	started chan struct{}

	mu       sync.Mutex
	progress ChurnResult
	final    *ChurnResult
	errMsg   string

	stopOnce sync.Once
	stopRes  ChurnResult
	stopErr  error
}

// StartChurn starts a churn client in ns (nil: the current namespace) and returns once its workers run. If ctx ends
// first the process is killed.
func StartChurn(ctx context.Context, ns *NetNS, opts ChurnOptions) (*Churn, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("start churn: %w", err)
	}
	c := &Churn{opts: opts, Seed: opts.Seed, started: make(chan struct{}), progress: ChurnResult{Failures: map[string]int{}}}
	p, err := startProc(procConfig{ns: ns, role: roleChurn, opts: opts, onEvent: c.handleEvent})
	if err != nil {
		return nil, fmt.Errorf("start churn: %w", err)
	}
	c.p, c.PID, c.Cmd = p, p.cmd.Process.Pid, p.cmd
	if err := awaitStart(ctx, p, c.started, func() string {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.errMsg
	}); err != nil {
		return nil, fmt.Errorf("start churn: %w", err)
	}
	return c, nil
}

// StartChurnForTest starts a churn client like StartChurn and stops it when the test ends. It fails the test on
// error.
func StartChurnForTest(t testing.TB, ns *NetNS, opts ChurnOptions) *Churn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := StartChurn(ctx, ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*c.opts.Timeout+10*time.Second)
		defer cancel()
		_, _ = c.Stop(ctx)
	})
	return c
}

func (c *Churn) handleEvent(ev event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch ev.Ev {
	case "started":
		select {
		case <-c.started:
		default:
			close(c.started)
		}
	case "churn":
		if ev.Churn != nil {
			c.progress = *ev.Churn
			if ev.Final {
				r := *ev.Churn
				c.final = &r
			}
		}
	case "error":
		c.errMsg = ev.Err
	}
}

// Progress returns the latest counts the client reported (it reports every 100ms while it runs).
func (c *Churn) Progress() ChurnResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.progress.clone()
}

// Stop tells the client to stop (it closes its stdin): each worker finishes its connection (holds are cut short, a
// half-close wait is bounded by Timeout) and the client reports its final counts and exits. If ctx ends first the
// process is killed and Stop returns the last progress and an error. It returns the same result when called again.
// A frozen (SIGSTOP) client is continued (SIGCONT) first.
func (c *Churn) Stop(ctx context.Context) (ChurnResult, error) {
	c.stopOnce.Do(func() {
		c.stopRes, c.stopErr = c.stop(ctx)
	})
	return c.stopRes.clone(), c.stopErr
}

func (c *Churn) stop(ctx context.Context) (ChurnResult, error) {
	_ = c.p.signal(syscall.SIGCONT) // in case it is frozen
	c.p.stdin.Close()               // EOF on the child's stdin: stop
	exited, werr := c.p.wait(ctx)
	if !exited {
		_ = c.p.kill()
		_, _ = c.p.wait(context.Background())
		return c.Progress(), fmt.Errorf("stop churn: no result: %w; killed", werr)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.final == nil {
		if c.errMsg != "" {
			return c.progress.clone(), fmt.Errorf("stop churn: %s", c.errMsg)
		}
		return c.progress.clone(), fmt.Errorf("stop churn: exited without result: %v", werr)
	}
	if werr != nil {
		return c.final.clone(), fmt.Errorf("stop churn: %w", werr)
	}
	return c.final.clone(), nil
}

// Wait waits until the client process has exited, or ctx ends; see Holder.Wait.
func (c *Churn) Wait(ctx context.Context) (exited bool, err error) {
	return c.p.wait(ctx)
}

// Exited reports whether the client process has exited.
func (c *Churn) Exited() bool {
	return c.p.hasExited()
}

// Signal sends sig to the client process (SIGSTOP and SIGCONT freeze and continue it; SIGTERM and SIGINT stop it
// like Stop).
func (c *Churn) Signal(sig os.Signal) error {
	if err := c.p.signal(sig); err != nil {
		return fmt.Errorf("signal churn: %w", err)
	}
	return nil
}

// Kill sends SIGKILL to the client process. It is safe to call when the process is already dead.
func (c *Churn) Kill() error {
	if err := c.p.kill(); err != nil {
		return fmt.Errorf("kill churn: %w", err)
	}
	return nil
}

// ---- child side ----

// churnPayload is what each churn connection writes.
var churnPayload = []byte("churn\n")

// Churn actions.
const (
	churnClose = iota
	churnHalfClose
	churnReset
	churnIdle
	churnActions
)

type churnRunner struct {
	opts ChurnOptions

	mu  sync.Mutex
	res ChurnResult
}

func runChurn(optsJSON []byte) error {
	var opts ChurnOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return err
	}
	ap, _ := resolveAddr(opts.Addr)
	bind := opts.SourceStart != "none" && ap.Addr().Is4() && ap.Addr().As4()[0] == 127
	r := &churnRunner{opts: opts, res: ChurnResult{Failures: map[string]int{}}}

	// Stop on stdin EOF (or "stop"), SIGINT/SIGTERM, or after Duration. Nothing here watches the clock against
	// the process being frozen.
	ctx, stop := runContext(opts.Duration)
	defer stop()

	var wg sync.WaitGroup
	for w := range opts.Concurrency {
		d := net.Dialer{Timeout: opts.Timeout, KeepAlive: -1}
		d.SetMultipathTCP(false)
		if bind {
			s := netip.MustParseAddr(opts.SourceStart).As4()
			a := (uint32(s[0])<<24 | uint32(s[1])<<16 | uint32(s[2])<<8 | uint32(s[3])) + uint32(w)
			d.LocalAddr = &net.TCPAddr{IP: net.IPv4(byte(a>>24), byte(a>>16), byte(a>>8), byte(a))}
			d.Control = func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) {
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
				})
				return errors.Join(err, serr)
			}
		}
		rng := rand.New(rand.NewPCG(uint64(opts.Seed), uint64(w)))
		wg.Go(func() {
			for ctx.Err() == nil {
				r.once(ctx, rng, &d)
			}
		})
	}
	emit(event{Ev: "started"})

	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			snap := r.snapshot()
			emit(event{Ev: "churn", Churn: &snap})
		case <-done:
			snap := r.snapshot()
			emit(event{Ev: "churn", Churn: &snap, Final: true})
			return nil
		}
	}
}

func (r *churnRunner) snapshot() ChurnResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.res.clone()
}

func (r *churnRunner) count(f func(*ChurnResult)) {
	r.mu.Lock()
	f(&r.res)
	r.mu.Unlock()
}

func (r *churnRunner) failure(step string, err error) {
	kind := Classify(err)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Failures[kind]++
	if len(r.res.Samples) < maxFailureSamples {
		r.res.Samples = append(r.res.Samples, fmt.Sprintf("%s: %s: %v", kind, step, err))
	}
}

// hold sleeps a random time in [0, bound), cut short when ctx ends.
func hold(ctx context.Context, rng *rand.Rand, bound time.Duration) {
	d := time.Duration(rng.Int64N(int64(bound)))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// once runs one connection: connect, write, end it one of the four ways.
func (r *churnRunner) once(ctx context.Context, rng *rand.Rand, d *net.Dialer) {
	action := rng.IntN(churnActions)
	r.count(func(res *ChurnResult) { res.Attempts++ })
	// Dial, not DialContext: a stop lets the connect in flight finish (it is bounded by Timeout).
	c, err := d.Dial("tcp", r.opts.Addr)
	if err != nil {
		r.failure("connect", err)
		// Do not spin on a refusing address.
		hold(ctx, rng, 20*time.Millisecond)
		return
	}
	conn := c.(*net.TCPConn)
	r.count(func(res *ChurnResult) { res.Opened++ })
	_ = conn.SetDeadline(time.Now().Add(r.opts.Timeout))
	if _, err := conn.Write(churnPayload); err != nil {
		conn.Close()
		r.failure("write", err)
		return
	}
	switch action {
	case churnClose:
		hold(ctx, rng, r.opts.Hold)
		conn.Close()
		r.count(func(res *ChurnResult) { res.Closed++ })
	case churnIdle:
		hold(ctx, rng, r.opts.IdleHold)
		conn.Close()
		r.count(func(res *ChurnResult) { res.Idle++ })
	case churnReset:
		hold(ctx, rng, r.opts.Hold)
		if err := conn.SetLinger(0); err != nil {
			conn.Close()
			r.failure("set SO_LINGER", err)
			return
		}
		conn.Close()
		r.count(func(res *ChurnResult) { res.Reset++ })
	case churnHalfClose:
		err := halfCloseWait(conn, r.opts.Timeout)
		conn.Close()
		if err != nil {
			r.failure("half-close", err)
			return
		}
		r.count(func(res *ChurnResult) { res.HalfClosed++ })
	}
}

// halfCloseWait shuts the write side down and reads until the server closes (EOF).
func halfCloseWait(conn *net.TCPConn, timeout time.Duration) error {
	if err := conn.CloseWrite(); err != nil {
		return err
	}
	_ = conn.SetReadDeadline(time.Now().Add(timeout))
	_, err := io.Copy(io.Discard, conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The deadline may have passed while the process was frozen with the EOF already there: look once more.
		_ = conn.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		if _, err2 := io.Copy(io.Discard, conn); err2 == nil {
			return nil
		}
		return fmt.Errorf("no close from the server within %v: %w", timeout, err)
	}
	return err
}
