package testenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Failure kinds of LoadResult.Failures.
const (
	FailRefused = "refused" // ECONNREFUSED: nothing listened (or the SYN was answered with RST)
	FailReset   = "reset"   // ECONNRESET, EPIPE, or EOF before any response byte: the connection was dropped
	FailTimeout = "timeout" // no complete response within LoadOptions.Timeout
	FailWrong   = "wrong"   // a response, but a bad status, body or header, or cut short
	FailOther   = "other"   // anything else
)

// LoadOptions configures a load client. The zero value sends new-connection requests from 32 workers to
// 127.0.0.1:8080 as fast as possible for up to 30s.
type LoadOptions struct {
	// Addr is the server address; default "127.0.0.1:8080".
	Addr string
	// Concurrency is the number of workers that each send one request per new connection (HTTP/1.1 GET / with
	// "Connection: close"), one after another; default 32. Negative: none (only keep-alive connections).
	Concurrency int
	// Duration bounds the run; default 30s. Stop ends it earlier.
	Duration time.Duration
	// Rate limits the new-connection requests to this many per second overall; 0 is as fast as possible.
	Rate int
	// KeepAlive is the number of long-lived connections opened at the start. Each sends a request every
	// KeepAliveEvery over the same connection. A connection that fails, or that the server closes (Connection:
	// close), is reopened for the next request.
	KeepAlive int
	// KeepAliveEvery is the interval between the requests of one long-lived connection; default 50ms.
	KeepAliveEvery time.Duration
	// KeepAliveFor closes each long-lived connection this long after it was opened, for good; 0 keeps them until
	// the end.
	KeepAliveFor time.Duration
	// Timeout bounds each request, connect included; default 3s.
	Timeout time.Duration
	// Path is the requested path; default "/". A server that sends no X-Server header (a third-party server serving
	// a file) is identified by its body: a single word and a newline.
	Path string
}

func (o LoadOptions) withDefaults() LoadOptions {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:8080"
	}
	if o.Concurrency == 0 {
		o.Concurrency = 32
	}
	if o.Duration <= 0 {
		o.Duration = 30 * time.Second
	}
	if o.KeepAliveEvery <= 0 {
		o.KeepAliveEvery = 50 * time.Millisecond
	}
	if o.Timeout <= 0 {
		o.Timeout = 3 * time.Second
	}
	if o.Path == "" {
		o.Path = "/"
	}
	return o
}

// LoadResult counts what a load client saw.
type LoadResult struct {
	Requests       int             // new-connection requests attempted
	OK             int             // ... answered correctly
	Failures       map[string]int  // ... failed, by kind (FailRefused, FailReset, ...)
	ByServer       map[string]int  // ... answered, by the server ID in the response
	Spans          map[string]Span // per server ID: connect-start times of the first and last request it answered
	KeepAlive      KeepAliveResult // the long-lived connections
	FailureSamples []string        // up to 20 example errors, "kind: error"
}

// Span is a range of CLOCK_MONOTONIC times (see MonoNow).
type Span struct {
	FirstStartNS, LastStartNS int64
	// FirstConnectedNS is the earliest time a connection it answered was established (connect(2) returned): a
	// connection whose SYN was dropped and sent again may start well before it reaches a listener.
	FirstConnectedNS int64
}

// KeepAliveResult counts what the long-lived connections saw.
type KeepAliveResult struct {
	Opened   int            // connections opened (reopened ones included)
	Closed   int            // connections closed by the client as planned (KeepAliveFor, or the end of the run)
	Requests int            // requests attempted
	OK       int            // ... answered correctly
	Failures map[string]int // ... failed, by kind
	ByServer map[string]int // ... answered, by server ID
}

// FailureCount returns the number of failed requests, new-connection and keep-alive together.
func (r LoadResult) FailureCount() int {
	n := 0
	for _, v := range r.Failures {
		n += v
	}
	for _, v := range r.KeepAlive.Failures {
		n += v
	}
	return n
}

func newLoadResult() LoadResult {
	return LoadResult{
		Failures: map[string]int{},
		ByServer: map[string]int{},
		Spans:    map[string]Span{},
		KeepAlive: KeepAliveResult{
			Failures: map[string]int{},
			ByServer: map[string]int{},
		},
	}
}

func (r LoadResult) clone() LoadResult {
	c := r
	c.Failures = maps.Clone(r.Failures)
	c.ByServer = maps.Clone(r.ByServer)
	c.Spans = maps.Clone(r.Spans)
	c.KeepAlive.Failures = maps.Clone(r.KeepAlive.Failures)
	c.KeepAlive.ByServer = maps.Clone(r.KeepAlive.ByServer)
	c.FailureSamples = append([]string(nil), r.FailureSamples...)
	return c
}

// Load is a running load client process.
type Load struct {
	PID int
	Cmd *exec.Cmd // do not call Wait on it

	opts    LoadOptions
	p       *proc
	started chan struct{}

	mu       sync.Mutex
	progress LoadResult
	final    *LoadResult
	errMsg   string

	stopOnce sync.Once
	stopRes  LoadResult
	stopErr  error
}

// StartLoad starts a load client process in ns (nil: the current namespace) and returns once it is sending (its
// long-lived connections are open and have had their first answer). If ctx ends first the process is killed.
func StartLoad(ctx context.Context, ns *NetNS, opts LoadOptions) (*Load, error) {
	opts = opts.withDefaults()
	l := &Load{opts: opts, started: make(chan struct{}), progress: newLoadResult()}
	p, err := startProc(procConfig{ns: ns, role: roleLoad, opts: opts, onEvent: l.handleEvent})
	if err != nil {
		return nil, fmt.Errorf("start load: %w", err)
	}
	l.p, l.PID, l.Cmd = p, p.cmd.Process.Pid, p.cmd
	select {
	case <-l.started:
		return l, nil
	case <-p.eof:
		select {
		case <-l.started: // started, then finished at once
			return l, nil
		default:
		}
		_, werr := p.wait(context.Background())
		l.mu.Lock()
		msg := l.errMsg
		l.mu.Unlock()
		if msg != "" {
			return nil, fmt.Errorf("start load: %s", msg)
		}
		return nil, fmt.Errorf("start load: exited before sending: %w", werr)
	case <-ctx.Done():
		_ = p.kill()
		_, _ = p.wait(context.Background())
		return nil, fmt.Errorf("start load: %w", ctx.Err())
	}
}

// StartLoadForTest starts a load client like StartLoad and stops it when the test ends. It fails the test on error.
func StartLoadForTest(t testing.TB, ns *NetNS, opts LoadOptions) *Load {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	l, err := StartLoad(ctx, ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = l.Stop() })
	return l
}

func (l *Load) handleEvent(ev event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch ev.Ev {
	case "started":
		select {
		case <-l.started:
		default:
			close(l.started)
		}
	case "progress":
		if ev.Result != nil {
			l.progress = *ev.Result
		}
	case "result":
		if ev.Result != nil {
			l.progress = *ev.Result
			r := *ev.Result
			l.final = &r
		}
	case "error":
		l.errMsg = ev.Err
	}
}

// Progress returns the latest snapshot the client reported (it reports every 100ms).
func (l *Load) Progress() LoadResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.progress.clone()
}

// Stop tells the client to stop (it closes its stdin), lets the requests in flight finish, and returns the final
// result. It returns the same result when called again.
func (l *Load) Stop() (LoadResult, error) {
	l.stopOnce.Do(func() {
		l.stopRes, l.stopErr = l.stop()
	})
	return l.stopRes.clone(), l.stopErr
}

func (l *Load) stop() (LoadResult, error) {
	l.p.stdin.Close() // EOF on the child's stdin: stop
	grace := 2*l.opts.Timeout + 10*time.Second
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	exited, werr := l.p.wait(ctx)
	if !exited {
		_ = l.p.kill()
		_, _ = l.p.wait(context.Background())
		return l.Progress(), fmt.Errorf("stop load: no result after %v, killed", grace)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.final == nil {
		if l.errMsg != "" {
			return l.progress.clone(), fmt.Errorf("stop load: %s", l.errMsg)
		}
		return l.progress.clone(), fmt.Errorf("stop load: exited without result: %v", werr)
	}
	if werr != nil {
		return l.final.clone(), fmt.Errorf("stop load: %w", werr)
	}
	return l.final.clone(), nil
}

// ---- child side ----

const maxFailureSamples = 20

type loadRunner struct {
	opts   LoadOptions
	dialer net.Dialer
	req    []byte // new-connection request
	kaReq  []byte // keep-alive request

	mu  sync.Mutex
	res LoadResult

	rateMu   sync.Mutex
	nextSlot time.Time
	interval time.Duration
}

func runLoad(optsJSON []byte) error {
	var opts LoadOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	opts = opts.withDefaults()
	r := &loadRunner{
		opts:   opts,
		res:    newLoadResult(),
		req:    []byte("GET " + opts.Path + " HTTP/1.1\r\nHost: " + opts.Addr + "\r\nUser-Agent: draind-testenv\r\nConnection: close\r\n\r\n"),
		kaReq:  []byte("GET " + opts.Path + " HTTP/1.1\r\nHost: " + opts.Addr + "\r\nUser-Agent: draind-testenv\r\n\r\n"),
		dialer: net.Dialer{Timeout: opts.Timeout},
	}
	r.dialer.SetMultipathTCP(false)
	if opts.Rate > 0 {
		r.interval = time.Second / time.Duration(opts.Rate)
	}

	// Stop on stdin EOF (or "stop"), SIGINT/SIGTERM, or after Duration.
	ctx, stop := runContext(opts.Duration)
	defer stop()

	var wg sync.WaitGroup
	var opened sync.WaitGroup
	opened.Add(opts.KeepAlive)
	for range opts.KeepAlive {
		wg.Go(func() { r.keepAliveLoop(ctx, opened.Done) })
	}
	opened.Wait()
	for range max(opts.Concurrency, 0) {
		wg.Go(func() { r.requestLoop(ctx) })
	}
	snap := r.snapshot()
	emit(event{Ev: "progress", Result: &snap})
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
			emit(event{Ev: "progress", Result: &snap})
		case <-done:
			snap := r.snapshot()
			emit(event{Ev: "result", Result: &snap})
			return nil
		}
	}
}

func (r *loadRunner) snapshot() LoadResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.res.clone()
}

// waitSlot waits for the next request slot under Rate; false if ctx ended first.
func (r *loadRunner) waitSlot(ctx context.Context) bool {
	if r.interval == 0 {
		return ctx.Err() == nil
	}
	r.rateMu.Lock()
	now := time.Now()
	slot := r.nextSlot
	if slot.Before(now) {
		slot = now
	}
	r.nextSlot = slot.Add(r.interval)
	r.rateMu.Unlock()
	d := time.Until(slot)
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (r *loadRunner) requestLoop(ctx context.Context) {
	br := bufio.NewReaderSize(nil, 4096)
	// A stop lets the request in flight finish: it is bounded by Timeout.
	for r.waitSlot(ctx) {
		startNS := MonoNow()
		id, connNS, err := r.oneRequest(br)
		r.recordRequest(startNS, connNS, id, err)
	}
}

// oneRequest connects, sends one request and reads the answer; it returns the server ID and when the connection was
// established.
func (r *loadRunner) oneRequest(br *bufio.Reader) (string, int64, error) {
	deadline := time.Now().Add(r.opts.Timeout)
	d := r.dialer
	d.Deadline = deadline
	conn, err := d.Dial("tcp", r.opts.Addr)
	if err != nil {
		return "", 0, err
	}
	connNS := MonoNow()
	defer conn.Close()
	_ = conn.SetDeadline(deadline)
	cc := &countingConn{Conn: conn}
	if _, err := cc.Write(r.req); err != nil {
		return "", connNS, err
	}
	br.Reset(cc)
	id, _, err := readResponse(br, cc)
	if err != nil {
		return "", connNS, err
	}
	// Wait for the server's FIN (it closes after answering a "Connection: close" request), so the TIME_WAIT
	// state stays on the server's side and does not use up client ports. What happens here is not the request's
	// business any more.
	_, _ = io.Copy(io.Discard, br)
	return id, connNS, nil
}

func (r *loadRunner) keepAliveLoop(ctx context.Context, opened func()) {
	var (
		conn     net.Conn
		cc       *countingConn
		br       = bufio.NewReaderSize(nil, 4096)
		firstOK  = false
		openedAt time.Time
	)
	signalOpened := func() {
		if !firstOK {
			firstOK = true
			opened()
		}
	}
	defer signalOpened()
	closeConn := func(planned bool) {
		if conn == nil {
			return
		}
		conn.Close()
		conn = nil
		if planned {
			r.mu.Lock()
			r.res.KeepAlive.Closed++
			r.mu.Unlock()
		}
	}
	defer closeConn(true)

	tick := time.NewTicker(r.opts.KeepAliveEvery)
	defer tick.Stop()
	for {
		if conn != nil && r.opts.KeepAliveFor > 0 && time.Since(openedAt) >= r.opts.KeepAliveFor {
			closeConn(true)
			return
		}
		if conn == nil {
			c, err := r.dialer.Dial("tcp", r.opts.Addr)
			r.mu.Lock()
			r.res.KeepAlive.Requests++
			if err == nil {
				r.res.KeepAlive.Opened++
			}
			r.mu.Unlock()
			if err != nil {
				r.recordKeepAlive("", err)
			} else {
				conn, cc, openedAt = c, &countingConn{Conn: c}, time.Now()
			}
		} else {
			r.mu.Lock()
			r.res.KeepAlive.Requests++
			r.mu.Unlock()
		}
		if conn != nil {
			_ = conn.SetDeadline(time.Now().Add(r.opts.Timeout))
			cc.n = 0
			id, closing, err := func() (string, bool, error) {
				if _, err := cc.Write(r.kaReq); err != nil {
					return "", false, err
				}
				br.Reset(cc)
				return readResponse(br, cc)
			}()
			r.recordKeepAlive(id, err)
			if err != nil || closing {
				closeConn(false)
			}
		}
		signalOpened()
		select {
		case <-tick.C:
		case <-ctx.Done():
			return
		}
	}
}

func (r *loadRunner) recordRequest(startNS, connNS int64, id string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Requests++
	if err != nil {
		kind := Classify(err)
		r.res.Failures[kind]++
		r.sampleLocked(kind, err)
		return
	}
	r.res.OK++
	r.res.ByServer[id]++
	sp, ok := r.res.Spans[id]
	if !ok || startNS < sp.FirstStartNS {
		sp.FirstStartNS = startNS
	}
	if startNS > sp.LastStartNS {
		sp.LastStartNS = startNS
	}
	if !ok || connNS < sp.FirstConnectedNS {
		sp.FirstConnectedNS = connNS
	}
	r.res.Spans[id] = sp
}

// recordKeepAlive records the outcome of a keep-alive request; Requests was counted already.
func (r *loadRunner) recordKeepAlive(id string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		kind := Classify(err)
		r.res.KeepAlive.Failures[kind]++
		r.sampleLocked(kind, fmt.Errorf("keep-alive: %w", err))
		return
	}
	r.res.KeepAlive.OK++
	r.res.KeepAlive.ByServer[id]++
}

func (r *loadRunner) sampleLocked(kind string, err error) {
	if len(r.res.FailureSamples) < maxFailureSamples {
		r.res.FailureSamples = append(r.res.FailureSamples, kind+": "+err.Error())
	}
}

// countingConn counts the bytes read since n was last reset.
type countingConn struct {
	net.Conn
	n int
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n += n
	return n, err
}

// WrongResponse is a response that came but is not what the server should send (Classify: FailWrong).
type WrongResponse struct{ Msg string }

func (e *WrongResponse) Error() string { return "wrong response: " + e.Msg }

// ErrNoResponse marks an EOF before any byte of the response (Classify: FailReset).
var ErrNoResponse = errors.New("connection closed before any response byte")

const maxBody = 4096

// readResponse reads one HTTP/1.1 response and checks it: status 200 and a body of "<X-Server>\n". It returns the
// X-Server ID and whether the server announced it closes the connection.
func readResponse(br *bufio.Reader, cc *countingConn) (id string, closing bool, err error) {
	defer func() {
		if err == nil {
			return
		}
		var w *WrongResponse
		if errors.As(err, &w) {
			return
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			if cc.n == 0 {
				err = fmt.Errorf("%w: %w", ErrNoResponse, err)
			} else {
				err = &WrongResponse{Msg: "cut short: " + err.Error()}
			}
		}
	}()
	line, err := readLine(br)
	if err != nil {
		return "", false, err
	}
	proto, rest, _ := strings.Cut(line, " ")
	codeStr, _, _ := strings.Cut(rest, " ")
	if !strings.HasPrefix(proto, "HTTP/1.") {
		return "", false, &WrongResponse{Msg: fmt.Sprintf("status line %q", line)}
	}
	code, err := strconv.Atoi(codeStr)
	if err != nil {
		return "", false, &WrongResponse{Msg: fmt.Sprintf("status line %q", line)}
	}
	contentLength := -1
	chunked := false
	for {
		h, err := readLine(br)
		if err != nil {
			return "", false, err
		}
		if h == "" {
			break
		}
		k, v, ok := strings.Cut(h, ":")
		if !ok {
			return "", false, &WrongResponse{Msg: fmt.Sprintf("header line %q", h)}
		}
		v = strings.TrimSpace(v)
		switch {
		case strings.EqualFold(k, "Content-Length"):
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return "", false, &WrongResponse{Msg: fmt.Sprintf("Content-Length %q", v)}
			}
			contentLength = n
		case strings.EqualFold(k, "X-Server"):
			id = v
		case strings.EqualFold(k, "Connection"):
			closing = strings.EqualFold(v, "close")
		case strings.EqualFold(k, "Transfer-Encoding"):
			chunked = true
		}
	}
	if chunked {
		return "", true, &WrongResponse{Msg: "chunked body"}
	}
	var body []byte
	if contentLength >= 0 {
		if contentLength > maxBody {
			return "", true, &WrongResponse{Msg: fmt.Sprintf("Content-Length %d too large", contentLength)}
		}
		body = make([]byte, contentLength)
		if _, err := io.ReadFull(br, body); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return "", true, err
		}
	} else {
		// No length: the body ends with the connection.
		closing = true
		body, err = io.ReadAll(io.LimitReader(br, maxBody+1))
		if err != nil {
			return "", true, err
		}
	}
	if id == "" && code == 200 {
		id = idOfBody(body)
	}
	switch {
	case code != 200:
		return id, closing, &WrongResponse{Msg: fmt.Sprintf("status %d from %q", code, id)}
	case id == "":
		return "", closing, &WrongResponse{Msg: "no X-Server header"}
	case string(body) != id+"\n":
		return "", closing, &WrongResponse{Msg: fmt.Sprintf("body %q from %q", body, id)}
	}
	return id, closing, nil
}

// idOfBody is the server ID a body of one word and a newline carries ("" for any other body).
func idOfBody(b []byte) string {
	w, ok := bytes.CutSuffix(b, []byte("\n"))
	if !ok || len(w) == 0 || len(w) > 64 {
		return ""
	}
	for _, c := range w {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return ""
		}
	}
	return string(w)
}

func readLine(br *bufio.Reader) (string, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return "", &WrongResponse{Msg: "line too long"}
		}
		if errors.Is(err, io.EOF) && len(line) > 0 {
			return "", io.ErrUnexpectedEOF
		}
		return "", err
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// Classify maps a request's error to a failure kind (FailRefused, ...): how every load client of testenv, and the
// bench's, report failures.
func Classify(err error) string {
	var wrong *WrongResponse
	var ne net.Error
	switch {
	case errors.As(err, &wrong):
		return FailWrong
	case errors.Is(err, syscall.ECONNREFUSED):
		return FailRefused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNABORTED),
		errors.Is(err, ErrNoResponse):
		return FailReset
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, syscall.ETIMEDOUT), errors.As(err, &ne) && ne.Timeout():
		return FailTimeout
	}
	return FailOther
}

// runContext ends after d, on SIGINT/SIGTERM, or when the parent says "stop" or closes stdin: the life of a client
// child.
func runContext(d time.Duration) (context.Context, context.CancelFunc) {
	ctx, stop := context.WithTimeout(context.Background(), d)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		select {
		case <-sigc:
			stop()
		case <-ctx.Done():
		}
	}()
	go func() {
		readControl(func(cmd string, _ int) {
			if cmd == "stop" {
				stop()
			}
		})
		stop()
	}()
	return ctx, stop
}
