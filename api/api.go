// Package api is the local API of `draind serve`: HTTP+JSON over a unix socket. It holds the request and response
// shapes, their strict decoding, and the client the CLI uses. The client passes the processes of a handoff as pidfds
// (SCM_RIGHTS) it opened itself, so the PIDs it was given are resolved in its own PID namespace.
//
// Endpoints:
//
//	POST   /v1/handoffs        HandoffRequest (+ pidfds) -> a stream of Event, one JSON object per line
//	GET    /v1/handoffs        -> []Handoff: the handoffs in progress
//	DELETE /v1/handoffs/{id}   abort one: roll it back (only before its old process was signalled)
//	POST   /v1/prepare         PrepareRequest (+ pidfd) -> PrepareResult: make a server without SO_REUSEPORT upgradable
//	POST   /v1/unprepare       PrepareRequest (+ pidfd) -> steer.Unprepared: undo what is safe to undo
//
// Errors before a handoff starts are an HTTP status and an Error body.
package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"time"

	"github.com/draind/draind/drain"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/steer"
)

// DefaultSocket is where the daemon listens unless told otherwise.
const DefaultSocket = "/run/draind/draind.sock"

// Limits on what the daemon accepts.
const (
	MaxRequestBytes = 16 << 10 // a request body larger than this is refused
	MaxFDs          = 2        // pidfds passed with one request
	MaxPorts        = 64
	MaxTimeout      = 7 * 24 * time.Hour // a drain deadline
	MaxWait         = time.Hour          // kill_after, exit_wait, ready_timeout
)

// HandoffRequest asks for a handoff. The zero value of each optional field is the CLI's default.
type HandoffRequest struct {
	From         ProcRef  `json:"from"`
	To           ProcRef  `json:"to"`
	Name         string   `json:"name,omitempty"` // a name for the metrics' listener series (e.g. the service's)
	Ports        []uint16 `json:"ports,omitempty"`
	Signal       string   `json:"signal,omitempty"`     // name ("TERM", "SIGQUIT") or number; default TERM
	Timeout      Duration `json:"timeout,omitempty"`    // drain deadline, from the flip; default 5m
	OnTimeout    string   `json:"on_timeout,omitempty"` // signal, kill or abort; default signal
	SignalAt     string   `json:"signal_at,omitempty"`  // drained or flip; default drained
	Queue        string   `json:"queue,omitempty"`      // move or keep; default move
	KillAfter    Duration `json:"kill_after,omitempty"`
	ExitWait     Duration `json:"exit_wait,omitempty"`
	ReadyURL     string   `json:"ready_url,omitempty"`
	ReadyTimeout Duration `json:"ready_timeout,omitempty"`
}

// ProcRef names a process: PIDFD is the index of a pidfd passed with the request (the CLI's way); PID is a PID in
// the daemon's PID namespace, accepted only from a caller in that namespace. Exactly one is set.
type ProcRef struct {
	PIDFD *int `json:"pidfd,omitempty"`
	PID   int  `json:"pid,omitempty"`
}

// Duration is a time.Duration written as a Go duration string ("90s", "5m").
type Duration time.Duration

// MarshalJSON writes d as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// ErrTooLarge is returned by DecodeHandoff for a body over MaxRequestBytes.
var ErrTooLarge = errors.New("request too large")

// ErrInvalid marks a request that is well-formed JSON but asks for something that cannot be.
var ErrInvalid = errors.New("invalid request")

// DecodeHandoff reads and checks a handoff request whose sender passed nfds pidfds. It refuses bodies over
// MaxRequestBytes, unknown fields, trailing data and values out of range; it changes nothing.
func DecodeHandoff(r io.Reader, nfds int) (*HandoffRequest, error) {
	var req HandoffRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	if err := req.Check(nfds); err != nil {
		return nil, err
	}
	return &req, nil
}

// decodeStrict reads one JSON value of at most MaxRequestBytes into v: no unknown field, nothing after it.
func decodeStrict(r io.Reader, v any) error {
	body, err := io.ReadAll(io.LimitReader(r, MaxRequestBytes+1))
	if err != nil {
		return fmt.Errorf("read request: %w: %w", ErrInvalid, err)
	}
	if len(body) > MaxRequestBytes {
		return fmt.Errorf("read request: %w (over %d bytes)", ErrTooLarge, MaxRequestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode request: %w: %w", ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("decode request: %w: data after the request", ErrInvalid)
	}
	return nil
}

// PrepareRequest asks the daemon to prepare a server that never set SO_REUSEPORT for a handoff on the same port
// (POST /v1/prepare: steer.Prepare), or to undo it for the process's cgroup (POST /v1/unprepare: steer.Unprepare).
type PrepareRequest struct {
	From  ProcRef  `json:"from"`
	Ports []uint16 `json:"ports,omitempty"`
	// Hold (prepare only): also give the reuseport groups of listeners that have SO_REUSEPORT already draind's
	// selector with them as target (steer.Hold), so the next process that listens gets nothing before a flip.
	Hold bool `json:"hold,omitempty"`
}

// PrepareResult answers a prepare.
type PrepareResult struct {
	steer.Prepared
	Held []string `json:"held,omitempty"` // listeners Hold gave the selector
}

// DecodePrepare reads and checks a prepare (or, with unprepare, an unprepare) request whose sender passed nfds
// pidfds, as strictly as DecodeHandoff.
func DecodePrepare(r io.Reader, nfds int, unprepare bool) (*PrepareRequest, error) {
	var req PrepareRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	if err := checkRef("from", req.From, nfds); err != nil {
		return nil, err
	}
	if err := checkPorts(req.Ports); err != nil {
		return nil, err
	}
	if unprepare && req.Hold {
		return nil, fmt.Errorf("%w: hold is for prepare", ErrInvalid)
	}
	return &req, nil
}

// checkRef checks a process reference against the number of pidfds passed.
func checkRef(name string, ref ProcRef, nfds int) error {
	switch {
	case ref.PIDFD != nil && ref.PID != 0:
		return fmt.Errorf("%w: %s: give pidfd or pid, not both", ErrInvalid, name)
	case ref.PIDFD != nil:
		if i := *ref.PIDFD; i < 0 || i >= nfds {
			return fmt.Errorf("%w: %s: pidfd %d not passed (%d passed)", ErrInvalid, name, i, nfds)
		}
	case ref.PID <= 0:
		return fmt.Errorf("%w: %s: a pidfd or a pid > 0 is required", ErrInvalid, name)
	}
	return nil
}

// checkPorts checks a request's port list.
func checkPorts(ports []uint16) error {
	if len(ports) > MaxPorts {
		return fmt.Errorf("%w: %d ports (at most %d)", ErrInvalid, len(ports), MaxPorts)
	}
	for i, p := range ports {
		if p == 0 {
			return fmt.Errorf("%w: port 0", ErrInvalid)
		}
		if slices.Contains(ports[:i], p) {
			return fmt.Errorf("%w: port %d twice", ErrInvalid, p)
		}
	}
	return nil
}

// Check validates the request against the number of pidfds passed with it.
func (r *HandoffRequest) Check(nfds int) error {
	invalid := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	for _, p := range []struct {
		name string
		ref  ProcRef
	}{{"from", r.From}, {"to", r.To}} {
		if err := checkRef(p.name, p.ref, nfds); err != nil {
			return err
		}
	}
	if r.From.PIDFD != nil && r.To.PIDFD != nil && *r.From.PIDFD == *r.To.PIDFD {
		return invalid("old and new are the same pidfd")
	}
	if r.From.PID != 0 && r.From.PID == r.To.PID {
		return invalid("old and new are the same process (%d)", r.From.PID)
	}
	if !validName(r.Name) {
		return invalid("name %q: at most 63 letters, digits, '.', '_' or '-'", r.Name)
	}
	if err := checkPorts(r.Ports); err != nil {
		return err
	}
	if r.Signal != "" {
		if _, err := drain.ParseSignal(r.Signal); err != nil {
			return invalid("%v", err)
		}
	}
	ot, err := drain.ParseOnTimeout(r.OnTimeout)
	if err != nil {
		return invalid("%v", err)
	}
	at, err := drain.ParseSignalAt(r.SignalAt)
	if err != nil {
		return invalid("%v", err)
	}
	if err := at.Allows(ot); err != nil {
		return invalid("%v", err)
	}
	if _, err := drain.ParseQueue(r.Queue); err != nil {
		return invalid("%v", err)
	}
	if r.Timeout < 0 || r.KillAfter < 0 || r.ExitWait < 0 || r.ReadyTimeout < 0 {
		return invalid("durations must not be negative")
	}
	if time.Duration(r.Timeout) > MaxTimeout {
		return invalid("timeout %s is over %s", time.Duration(r.Timeout), MaxTimeout)
	}
	if max(r.KillAfter, r.ExitWait, r.ReadyTimeout) > Duration(MaxWait) {
		return invalid("kill_after, exit_wait and ready_timeout are at most %s", MaxWait)
	}
	if r.ReadyURL != "" {
		u, err := url.Parse(r.ReadyURL)
		if err != nil || u.Scheme != "http" || u.Host == "" {
			return invalid("ready_url %q is not an http:// URL", r.ReadyURL)
		}
	}
	return nil
}

// validName accepts the names the metrics may carry as a label value: short, plain.
func validName(s string) bool {
	if len(s) > 63 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// Options turns the request into handoff options (without the processes, which the daemon resolves).
func (r *HandoffRequest) Options() handoff.Options {
	o := handoff.Options{
		Ports: slices.Clone(r.Ports), Timeout: time.Duration(r.Timeout), KillAfter: time.Duration(r.KillAfter),
		ExitWait: time.Duration(r.ExitWait), ReadyURL: r.ReadyURL, ReadyTimeout: time.Duration(r.ReadyTimeout),
	}
	if r.Signal != "" {
		o.Signal, _ = drain.ParseSignal(r.Signal) // checked by Check
	}
	if r.OnTimeout != "" {
		o.OnTimeout, _ = drain.ParseOnTimeout(r.OnTimeout)
	}
	o.SignalAt, _ = drain.ParseSignalAt(r.SignalAt) // checked by Check
	o.Queue, _ = drain.ParseQueue(r.Queue)
	return o
}

// Kind classifies an error, for the client's exit code.
type Kind string

// The kinds.
const (
	KindBadInput   Kind = "bad_input"   // the request cannot be served; nothing changed
	KindForbidden  Kind = "forbidden"   // the caller may not hand off these processes; nothing changed
	KindConflict   Kind = "conflict"    // a listener is in another handoff; nothing changed
	KindNotFound   Kind = "not_found"   // no such handoff
	KindRolledBack Kind = "rolled_back" // steering started and was rolled back; the old process was not signalled
	KindUnwatched  Kind = "unwatched"   // signalled at the flip, then interrupted: the old process drains unwatched
	KindInternal   Kind = "internal"    // anything else
)

// Error is the body of a refused request, and the error of a final Event.
type Error struct {
	Message  string `json:"error"`
	Kind     Kind   `json:"kind"`
	Conflict string `json:"conflict,omitempty"` // KindConflict: the ID of the handoff using the listener
}

func (e *Error) Error() string { return e.Message }

// Count is a side's in-flight connections.
type Count struct {
	Conns    int `json:"conns"`
	Queued   int `json:"queued"`
	Detached int `json:"detached,omitempty"`
}

// CountOf converts a drain.Count.
func CountOf(c drain.Count) Count {
	return Count{Conns: c.Conns, Queued: c.Queued, Detached: c.Detached}
}

// Drain converts back.
func (c Count) Drain() drain.Count {
	return drain.Count{Conns: c.Conns, Queued: c.Queued, Detached: c.Detached}
}

// Event is one line of a handoff's stream.
type Event struct {
	Type    string          `json:"type"` // EventStarted, EventProgress, EventResult
	ID      string          `json:"id,omitempty"`
	Stage   handoff.Stage   `json:"stage,omitempty"`
	Old     *Count          `json:"old,omitempty"`
	New     *Count          `json:"new,omitempty"`
	Message string          `json:"message,omitempty"`
	Result  *handoff.Result `json:"result,omitempty"` // EventResult: nil if the handoff never started
	Err     *Error          `json:"err,omitempty"`    // EventResult: how it failed, if it did
}

// Event types.
const (
	EventStarted  = "started"  // the daemon took the handoff; ID names it
	EventProgress = "progress" // a handoff.Progress
	EventResult   = "result"   // the last event
)

// Handoff is a handoff in progress, as GET /v1/handoffs lists it.
type Handoff struct {
	ID        string        `json:"id"`
	Name      string        `json:"name,omitempty"`
	From      int           `json:"from"` // PIDs in the daemon's PID namespace
	To        int           `json:"to"`
	Listeners []string      `json:"listeners"`
	Stage     handoff.Stage `json:"stage"`
	Old       Count         `json:"old"`
	New       Count         `json:"new"`
	Started   time.Time     `json:"started"`
	Deadline  time.Time     `json:"deadline,omitzero"` // set once flipped
	UID       uint32        `json:"uid"`               // who asked for it
	Resumed   bool          `json:"resumed,omitempty"` // taken over from an earlier daemon process
}
