package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/testenv"
)

// Failure kinds, as testenv's load client names them.
const (
	failRefused = testenv.FailRefused
	failReset   = testenv.FailReset
	failTimeout = testenv.FailTimeout
	failWrong   = testenv.FailWrong
	failOther   = testenv.FailOther
)

var failKinds = []string{failRefused, failReset, failTimeout, failWrong, failOther}

// LoadOptions configures the bench's load client: Concurrency workers that each, one after another, open a new TCP
// connection, send one HTTP/1.1 request with "Connection: close", read the whole answer and wait for the server's
// FIN. Every attempt is recorded with its start time, its connect latency and its total latency, so the client can
// report percentiles and a timeline.
type LoadOptions struct {
	Addr        string        `json:"addr"`         // server address; default 127.0.0.1:8080
	Concurrency int           `json:"concurrency"`  // workers; default 32
	Duration    time.Duration `json:"duration"`     // upper bound of the run; default 2m (stop ends it earlier)
	Timeout     time.Duration `json:"timeout"`      // bounds each attempt, connect included; default 3s
	Bucket      time.Duration `json:"bucket"`       // timeline resolution; default 10ms
	Backoff     time.Duration `json:"backoff"`      // a worker sleeps this long after a failed attempt; default 1ms
	SourceStart string        `json:"source_start"` // worker w binds to this address + w (port 0); default 127.3.0.1
}

func (o LoadOptions) withDefaults() LoadOptions {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:8080"
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Duration <= 0 {
		o.Duration = 2 * time.Minute
	}
	if o.Timeout <= 0 {
		o.Timeout = 3 * time.Second
	}
	if o.Bucket <= 0 {
		o.Bucket = 10 * time.Millisecond
	}
	if o.Backoff == 0 {
		o.Backoff = time.Millisecond
	}
	if o.SourceStart == "" {
		o.SourceStart = "127.3.0.1"
	}
	return o
}

// LoadReport is what a load client saw. Times are CLOCK_MONOTONIC nanoseconds (testenv.MonoNow), comparable with the
// parent's clock; durations are nanoseconds.
type LoadReport struct {
	StartMono int64          `json:"start_mono"`
	EndMono   int64          `json:"end_mono"`
	Requests  int            `json:"requests"` // attempts
	OK        int            `json:"ok"`       // answered correctly
	Failures  map[string]int `json:"failures"` // failed attempts by kind
	// NoAnswer counts the failures of kind reset where the server closed the connection cleanly (FIN) before
	// any byte of an answer, e.g. a Go net/http server that read the request after its Shutdown began.
	NoAnswer int      `json:"no_answer"`
	Samples  []string `json:"samples,omitempty"`
	// FailedAt lists the first failed attempts (at most maxFailedAt, by start time): when each started, relative
	// to StartMono, and its kind.
	FailedAt []FailureAt `json:"failed_at,omitempty"`
	// Connect is the connect latency (connect(2) to established) of the attempts whose connect succeeded; Request
	// the latency of the answered ones, from connect(2) to the end of the answer.
	Connect Percentiles `json:"connect"`
	Request Percentiles `json:"request"`
	// AfterMark describes the attempts answered at or after the mark (loadClient.mark), if one was set: what an
	// upgrade commanded at the mark could still change, without what was over before it.
	AfterMark *MarkFigures          `json:"after_mark,omitempty"`
	BucketNS  int64                 `json:"bucket_ns"`
	Buckets   []Bucket              `json:"buckets"` // by attempt start: bucket i starts at StartMono + i*BucketNS
	Servers   map[string]ServerSpan `json:"servers"` // answered attempts by server ID
}

// Bucket is one step of a load timeline.
type Bucket struct {
	Attempts int   `json:"a"`
	OK       int   `json:"ok"`
	Failed   int   `json:"f"`
	ConnP99  int64 `json:"cp99"` // of the successful connects started in the bucket
	ConnMax  int64 `json:"cmax"`
	ReqP99   int64 `json:"rp99"` // of the answered attempts started in the bucket
}

// FailureAt is one failed attempt: its start relative to the load's start, and its kind.
type FailureAt struct {
	AtNS int64  `json:"at_ns"`
	Kind string `json:"kind"`
}

const maxFailedAt = 200

// ServerSpan counts the attempts one server answered, with the start times of the first and the last of them.
type ServerSpan struct {
	N         int   `json:"n"`
	FirstMono int64 `json:"first_mono"`
	LastMono  int64 `json:"last_mono"`
}

// MarkFigures describe the answered attempts that ended at or after a mark (CLOCK_MONOTONIC).
type MarkFigures struct {
	Mono    int64       `json:"mono"`
	Request Percentiles `json:"request"` // request latency of the attempts answered at or after the mark
	// InFlight counts those that started before the mark: in the accept queue, or being served, at the mark.
	InFlight int `json:"in_flight"`
	// LastInFlight is from the mark to the end of the last of them; 0 if none.
	LastInFlight int64 `json:"last_in_flight_ns"`
}

// Failed returns the number of failed attempts.
func (r *LoadReport) Failed() int {
	n := 0
	for _, v := range r.Failures {
		n += v
	}
	return n
}

// Window sums the timeline over attempts started in [from, to) (CLOCK_MONOTONIC); only whole buckets count.
// It returns the attempts, the answered ones and the length of the buckets covered.
func (r *LoadReport) Window(from, to int64) (attempts, ok int, covered time.Duration) {
	if r.BucketNS <= 0 {
		return 0, 0, 0
	}
	first := (from - r.StartMono + r.BucketNS - 1) / r.BucketNS
	last := (to - r.StartMono) / r.BucketNS // exclusive
	first = max(first, 0)
	last = min(last, int64(len(r.Buckets)))
	for i := first; i < last; i++ {
		attempts += r.Buckets[i].Attempts
		ok += r.Buckets[i].OK
	}
	if last > first {
		covered = time.Duration((last - first) * r.BucketNS)
	}
	return attempts, ok, covered
}

// attempt is one recorded attempt (child side).
type attempt struct {
	start   int64
	connNS  int64 // -1: the connect failed
	totalNS int64
	server  int32 // index+1 into the worker's ids; 0: none
	fail    int8  // index+1 into failKinds; 0: answered
	eof     bool  // the failure was a FIN before any byte of the answer
}

type loadWorker struct {
	opts   LoadOptions
	dialer net.Dialer
	req    []byte
	recs   []attempt
	ids    []string
	idx    map[string]int32
	buf    []byte
	sample []string
}

// runLoadChild is the load client process.
func runLoadChild(optsJSON []byte) error {
	var opts LoadOptions
	if err := json.Unmarshal(optsJSON, &opts); err != nil {
		return fmt.Errorf("decode options: %w", err)
	}
	opts = opts.withDefaults()
	src, err := netip.ParseAddr(opts.SourceStart)
	if err != nil {
		return fmt.Errorf("parse source address: %w", err)
	}
	var mark atomic.Int64
	ctx, stop := clientContext(opts.Duration, &mark)
	defer stop()

	req := []byte("GET / HTTP/1.1\r\nHost: " + opts.Addr + "\r\nUser-Agent: drainbench\r\nConnection: close\r\n\r\n")
	workers := make([]*loadWorker, opts.Concurrency)
	for i := range workers {
		w := &loadWorker{opts: opts, req: req, idx: map[string]int32{}, buf: make([]byte, 4096)}
		w.dialer.SetMultipathTCP(false)
		if isLoopback(opts.Addr) {
			w.dialer.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
			w.dialer.Control = bindNoPort
			src = src.Next()
		}
		workers[i] = w
	}
	start := testenv.MonoNow()
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Go(func() { w.run(ctx) })
	}
	emit(event{Ev: "started", Mono: start})
	wg.Wait()
	rep := buildReport(opts, start, testenv.MonoNow(), mark.Load(), workers)
	emit(event{Ev: "result", Report: rep})
	return nil
}

func isLoopback(addr string) bool {
	ap, err := netip.ParseAddrPort(addr)
	return err == nil && ap.Addr().Is4() && ap.Addr().IsLoopback()
}

// bindNoPort sets IP_BIND_ADDRESS_NO_PORT, so that binding a source address leaves the port to connect(2).
func bindNoPort(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	})
	return errors.Join(err, serr)
}

// clientContext ends after d, on SIGINT/SIGTERM or at the end of stdin; a line "mark N" on stdin sets mark to N.
func clientContext(d time.Duration, mark *atomic.Int64) (context.Context, context.CancelFunc) {
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
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "mark "); ok {
				if n, err := strconv.ParseInt(v, 10, 64); err == nil {
					mark.Store(n)
				}
			}
		}
		stop()
	}()
	return ctx, stop
}

func (w *loadWorker) run(ctx context.Context) {
	backoff := time.NewTimer(0)
	<-backoff.C
	for ctx.Err() == nil {
		a := w.one()
		w.recs = append(w.recs, a)
		if a.fail != 0 && w.opts.Backoff > 0 {
			backoff.Reset(w.opts.Backoff)
			select {
			case <-backoff.C:
			case <-ctx.Done():
				return
			}
		}
	}
}

// one makes one attempt (a request loop cannot stop in the middle of one: it is bounded by Timeout).
func (w *loadWorker) one() attempt {
	start := testenv.MonoNow()
	a := attempt{start: start, connNS: -1}
	deadline := time.Now().Add(w.opts.Timeout)
	id, err := func() (string, error) {
		d := w.dialer
		d.Deadline = deadline
		conn, err := d.Dial("tcp", w.opts.Addr)
		if err != nil {
			return "", err
		}
		a.connNS = testenv.MonoNow() - start
		defer conn.Close()
		_ = conn.SetDeadline(deadline)
		if _, err := conn.Write(w.req); err != nil {
			return "", err
		}
		n, err := readAll(conn, w.buf)
		if err != nil {
			if n > 0 && errors.Is(err, io.ErrUnexpectedEOF) {
				return "", &testenv.WrongResponse{Msg: "cut short"}
			}
			return "", err
		}
		if n == 0 {
			return "", testenv.ErrNoResponse
		}
		return parseResponse(w.buf[:n])
	}()
	a.totalNS = testenv.MonoNow() - start
	if err != nil {
		kind := testenv.Classify(err)
		a.eof = errors.Is(err, testenv.ErrNoResponse)
		for i, k := range failKinds {
			if k == kind {
				a.fail = int8(i + 1)
			}
		}
		if len(w.sample) < 3 {
			w.sample = append(w.sample, kind+": "+err.Error())
		}
		return a
	}
	i, ok := w.idx[id]
	if !ok {
		w.ids = append(w.ids, id)
		i = int32(len(w.ids))
		w.idx[id] = i
	}
	a.server = i
	return a
}

// readAll reads until EOF into buf; an answer larger than buf is cut short.
func readAll(r io.Reader, buf []byte) (int, error) {
	n := 0
	for {
		if n == len(buf) {
			return n, io.ErrUnexpectedEOF
		}
		m, err := r.Read(buf[n:])
		n += m
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// parseResponse checks an HTTP/1.x answer: status 200, an X-Server header, and a body of "<X-Server>\n". It returns
// the server ID.
func parseResponse(b []byte) (string, error) {
	head, body, ok := bytes.Cut(b, []byte("\r\n\r\n"))
	if !ok {
		return "", &testenv.WrongResponse{Msg: "no end of header"}
	}
	lines := bytes.Split(head, []byte("\r\n"))
	if !bytes.HasPrefix(lines[0], []byte("HTTP/1.")) || len(lines[0]) < 12 || string(lines[0][9:12]) != "200" {
		return "", &testenv.WrongResponse{Msg: fmt.Sprintf("status line %q", lines[0])}
	}
	id := ""
	for _, l := range lines[1:] {
		k, v, ok := bytes.Cut(l, []byte(":"))
		if ok && bytes.EqualFold(bytes.TrimSpace(k), []byte("X-Server")) {
			id = string(bytes.TrimSpace(v))
		}
	}
	switch {
	case id == "":
		return "", &testenv.WrongResponse{Msg: "no X-Server header"}
	case string(body) != id+"\n":
		return "", &testenv.WrongResponse{Msg: fmt.Sprintf("body %q from %q", body, id)}
	}
	return id, nil
}

// buildReport merges the workers' records into a report.
func buildReport(opts LoadOptions, start, end, mark int64, workers []*loadWorker) *LoadReport {
	rep := &LoadReport{
		StartMono: start,
		EndMono:   end,
		Failures:  map[string]int{},
		BucketNS:  int64(opts.Bucket),
		Servers:   map[string]ServerSpan{},
	}
	nb := int((end-start)/rep.BucketNS) + 1
	rep.Buckets = make([]Bucket, nb)
	bConn := make([][]int64, nb)
	bReq := make([][]int64, nb)
	var conns, reqs, afterMark []int64
	var am MarkFigures
	for _, w := range workers {
		for _, s := range w.sample {
			if len(rep.Samples) < 20 {
				rep.Samples = append(rep.Samples, s)
			}
		}
		for _, a := range w.recs {
			rep.Requests++
			bi := min(max(int((a.start-start)/rep.BucketNS), 0), nb-1)
			b := &rep.Buckets[bi]
			b.Attempts++
			if a.connNS >= 0 {
				conns = append(conns, a.connNS)
				bConn[bi] = append(bConn[bi], a.connNS)
			}
			if a.fail != 0 {
				rep.Failures[failKinds[a.fail-1]]++
				if a.eof {
					rep.NoAnswer++
				}
				rep.FailedAt = append(rep.FailedAt, FailureAt{AtNS: a.start - start, Kind: failKinds[a.fail-1]})
				b.Failed++
				continue
			}
			rep.OK++
			b.OK++
			reqs = append(reqs, a.totalNS)
			bReq[bi] = append(bReq[bi], a.totalNS)
			if end := a.start + a.totalNS; mark != 0 && end >= mark {
				afterMark = append(afterMark, a.totalNS)
				if a.start < mark {
					am.InFlight++
					am.LastInFlight = max(am.LastInFlight, end-mark)
				}
			}
			id := w.ids[a.server-1]
			sp, seen := rep.Servers[id]
			if !seen || a.start < sp.FirstMono {
				sp.FirstMono = a.start
			}
			if a.start > sp.LastMono {
				sp.LastMono = a.start
			}
			sp.N++
			rep.Servers[id] = sp
		}
	}
	slices.SortFunc(rep.FailedAt, func(a, b FailureAt) int { return cmp.Compare(a.AtNS, b.AtNS) })
	rep.FailedAt = rep.FailedAt[:min(len(rep.FailedAt), maxFailedAt)]
	rep.Connect = Summarize(conns)
	rep.Request = Summarize(reqs)
	if mark != 0 {
		am.Mono, am.Request = mark, Summarize(afterMark)
		rep.AfterMark = &am
	}
	for i := range rep.Buckets {
		c := Summarize(bConn[i])
		rep.Buckets[i].ConnP99, rep.Buckets[i].ConnMax = c.P99, c.Max
		rep.Buckets[i].ReqP99 = Summarize(bReq[i]).P99
	}
	sort.Strings(rep.Samples)
	return rep
}

// loadClient is the parent's handle on a running load client.
type loadClient struct {
	c       *child
	opts    LoadOptions
	started chan struct{}

	mu     sync.Mutex
	start  int64
	report *LoadReport
	errMsg string
}

// startLoad starts a load client in ns and returns once its workers run.
func startLoad(ctx context.Context, ns *testenv.NetNS, opts LoadOptions) (*loadClient, error) {
	opts = opts.withDefaults()
	l := &loadClient{opts: opts, started: make(chan struct{})}
	c, err := startChild(ns, roleLoad, opts, func(ev event) {
		l.mu.Lock()
		defer l.mu.Unlock()
		switch ev.Ev {
		case "started":
			l.start = ev.Mono
			close(l.started)
		case "result":
			l.report = ev.Report
		case "error":
			l.errMsg = ev.Err
		}
	})
	if err != nil {
		return nil, fmt.Errorf("start load: %w", err)
	}
	l.c = c
	select {
	case <-l.started:
		return l, nil
	case <-c.eof:
		<-c.exited
		l.mu.Lock()
		defer l.mu.Unlock()
		return nil, fmt.Errorf("start load: exited before sending: %s %v", l.errMsg, c.waitErr)
	case <-ctx.Done():
		c.kill()
		return nil, fmt.Errorf("start load: %w", ctx.Err())
	}
}

// startMono is CLOCK_MONOTONIC when the client's workers started.
func (l *loadClient) startMono() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.start
}

// mark sets the client's mark (CLOCK_MONOTONIC): the report's AfterMark describes what was answered from then on.
func (l *loadClient) mark(mono int64) error {
	if _, err := fmt.Fprintf(l.c.stdin, "mark %d\n", mono); err != nil {
		return fmt.Errorf("mark load: %w", err)
	}
	return nil
}

// stop ends the run (attempts in flight finish, bounded by Timeout) and returns the report.
func (l *loadClient) stop() (*LoadReport, error) {
	l.c.stdin.Close()
	t := time.NewTimer(l.opts.Timeout + 30*time.Second)
	defer t.Stop()
	select {
	case <-l.c.eof:
	case <-t.C:
		l.c.kill()
		return nil, errors.New("stop load: no report in time, killed")
	}
	<-l.c.exited
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.report == nil {
		return nil, fmt.Errorf("stop load: no report: %s %v", l.errMsg, l.c.waitErr)
	}
	return l.report, nil
}

// kill ends the client without a report (cleanup).
func (l *loadClient) kill() { l.c.kill() }
