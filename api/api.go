// Package api is the local API of `draind serve`: HTTP+JSON over a unix socket. It holds the request and response
// shapes, their strict decoding, and the client the CLI uses. The client passes the processes of a handoff as pidfds
// (SCM_RIGHTS) it opened itself, so the PIDs it was given are resolved in its own PID namespace.
//
// Endpoints:
//
//	POST   /v1/handoffs        HandoffRequest (+ pidfds) -> a stream of Event, one JSON object per line
//	GET    /v1/handoffs        -> []Handoff: the handoffs in progress
//	DELETE /v1/handoffs/{id}   abort one: roll it back (only before its old process was signalled)
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
	body, err := io.ReadAll(io.LimitReader(r, MaxRequestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read request: %w: %w", ErrInvalid, err)
	}
	if len(body) > MaxRequestBytes {
		return nil, fmt.Errorf("read request: %w (over %d bytes)", ErrTooLarge, MaxRequestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var req HandoffRequest
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("decode request: %w: %w", ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("decode request: %w: data after the request", ErrInvalid)
	}
	if err := req.Check(nfds); err != nil {
		return nil, err
	}
	return &req, nil
}

// Check validates the request against the number of pidfds passed with it.
func (r *HandoffRequest) Check(nfds int) error {
	invalid := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	var used []int
	for _, p := range []struct {
		name string
		ref  ProcRef
	}{{"from", r.From}, {"to", r.To}} {
		switch {
		case p.ref.PIDFD != nil && p.ref.PID != 0:
			return invalid("%s: give pidfd or pid, not both", p.name)
		case p.ref.PIDFD != nil:
			i := *p.ref.PIDFD
			if i < 0 || i >= nfds {
				return invalid("%s: pidfd %d not passed (%d passed)", p.name, i, nfds)
			}
			if slices.Contains(used, i) {
				return invalid("old and new are the same pidfd")
			}
			used = append(used, i)
		case p.ref.PID <= 0:
			return invalid("%s: a pidfd or a pid > 0 is required", p.name)
		}
	}
	if r.From.PID != 0 && r.From.PID == r.To.PID {
		return invalid("old and new are the same process (%d)", r.From.PID)
	}
	if !validName(r.Name) {
		return invalid("name %q: at most 63 letters, digits, '.', '_' or '-'", r.Name)
	}
	if len(r.Ports) > MaxPorts {
		return invalid("%d ports (at most %d)", len(r.Ports), MaxPorts)
	}
	for i, p := range r.Ports {
		if p == 0 {
			return invalid("port 0")
		}
		if slices.Contains(r.Ports[:i], p) {
			return invalid("port %d twice", p)
		}
	}
	if r.Signal != "" {
		if _, err := drain.ParseSignal(r.Signal); err != nil {
			return invalid("%v", err)
		}
	}
	if r.OnTimeout != "" {
		if _, err := drain.ParseOnTimeout(r.OnTimeout); err != nil {
			return invalid("%v", err)
		}
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
