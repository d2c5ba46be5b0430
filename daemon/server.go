package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/api"
	"github.com/draind/draind/handoff"
	"github.com/draind/draind/proc"
	"github.com/draind/draind/steer"
)

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/handoffs", d.postHandoff)
	mux.HandleFunc("GET /v1/handoffs", d.listHandoffs)
	mux.HandleFunc("DELETE /v1/handoffs/{id}", d.abortHandoff)
	mux.HandleFunc("POST /v1/prepare", func(w http.ResponseWriter, r *http.Request) { d.prepare(w, r, false) })
	mux.HandleFunc("POST /v1/unprepare", func(w http.ResponseWriter, r *http.Request) { d.prepare(w, r, true) })
	return mux
}

// errForbidden marks an authorization refusal.
var errForbidden = errors.New("not permitted")

// conflictError is a listener in use by another handoff.
type conflictError struct {
	id, listener string
}

func (e *conflictError) Error() string {
	return fmt.Sprintf("listener %s is already in handoff %s", e.listener, e.id)
}

// classify turns a handoff's or a request's error into the API's error.
func classify(err error) *api.Error {
	e := &api.Error{Message: strings.TrimPrefix(err.Error(), handoff.ErrBadInput.Error()+": "), Kind: api.KindInternal}
	var ce *conflictError
	switch {
	case errors.As(err, &ce):
		e.Kind, e.Conflict = api.KindConflict, ce.id
	case errors.Is(err, errForbidden):
		e.Kind = api.KindForbidden
	case errors.Is(err, handoff.ErrBadInput), errors.Is(err, api.ErrInvalid), errors.Is(err, api.ErrTooLarge):
		e.Kind = api.KindBadInput
	case errors.Is(err, handoff.ErrRolledBack):
		e.Kind = api.KindRolledBack
	case errors.Is(err, handoff.ErrUnwatched):
		e.Kind = api.KindUnwatched
	}
	return e
}

func writeError(w http.ResponseWriter, e *api.Error) {
	code := http.StatusInternalServerError
	switch e.Kind {
	case api.KindBadInput:
		code = http.StatusBadRequest
	case api.KindForbidden:
		code = http.StatusForbidden
	case api.KindConflict:
		code = http.StatusConflict
	case api.KindNotFound:
		code = http.StatusNotFound
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(e)
}

// postHandoff starts a handoff and streams its events until it ends (or the caller goes away: the handoff goes on).
func (d *Daemon) postHandoff(w http.ResponseWriter, r *http.Request) {
	pc := api.Peer(r.Context())
	if pc == nil {
		writeError(w, &api.Error{Message: "no peer credentials", Kind: api.KindInternal})
		return
	}
	fds, err := pc.TakeFDs()
	taken := map[int]bool{} // fds FromPidfd took over
	defer func() {
		for i, fd := range fds {
			if !taken[i] {
				unix.Close(fd)
			}
		}
	}()
	if err != nil {
		writeError(w, classify(err))
		return
	}
	// The body must come within 10 s (a caller may not hold a connection by trickling it); no deadline afterwards:
	// the response streams for as long as the handoff runs. (A server-wide ReadTimeout would cancel the request's
	// context in the middle of that stream.)
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(10 * time.Second))
	req, err := api.DecodeHandoff(r.Body, len(fds))
	rc.SetReadDeadline(time.Time{})
	if err != nil {
		writeError(w, classify(err))
		return
	}
	uid := pc.Cred.Uid
	resolve := func(ref api.ProcRef, what string) (*proc.Process, error) {
		return resolveRef(pc, fds, taken, ref, what)
	}
	oldP, err := resolve(req.From, "old")
	if err != nil {
		writeError(w, classify(err))
		return
	}
	newP, err := resolve(req.To, "new")
	if err == nil {
		if err = authorize(uid, oldP, newP); err != nil {
			newP.Close()
		}
	}
	if err != nil {
		oldP.Close()
		writeError(w, classify(err))
		return
	}

	if uid != 0 && d.handoffsOf(uid) >= MaxHandoffsPerUser {
		oldP.Close()
		newP.Close()
		writeError(w, &api.Error{Message: fmt.Sprintf("uid %d already has %d handoffs in progress (at most %d)", uid, MaxHandoffsPerUser, MaxHandoffsPerUser), Kind: api.KindForbidden})
		return
	}
	e := &entry{id: newID(), name: req.Name, uid: uid, started: time.Now(), from: oldP.PID, to: newP.PID, newPID: newP.PID,
		events: make(chan api.Event, 64)}
	opts := req.Options()
	opts.From, opts.To, opts.FromProc, opts.ToProc = oldP.PID, newP.PID, oldP, newP
	opts.PinDir, opts.Tracker, opts.Objects, opts.Logger = d.opts.PinDir, d.tracker, d.objs, d.log.With("handoff", e.id)
	opts.Progress, opts.Persist, opts.Claim, opts.Counting = e.progress, d.persister(e), d.claimer(e, uid), e.counting
	d.log.Info("handoff requested", "id", e.id, "uid", uid, "caller_pid", pc.Cred.Pid, "from", oldP.PID, "to", newP.PID)
	err = d.start(e, func(ctx context.Context) (*handoff.Result, error) {
		defer oldP.Close() // the handoff owns the pidfds from here
		defer newP.Close()
		return handoff.Run(ctx, opts)
	})
	if err != nil {
		oldP.Close()
		newP.Close()
		writeError(w, &api.Error{Message: err.Error(), Kind: api.KindInternal})
		return
	}

	// next is the next event for the caller, progress before the result; !ok when the stream must end (the caller
	// went away, or the daemon stops and leaves the handoff to its successor).
	next := func() (api.Event, bool) {
		select {
		case ev := <-e.events:
			return ev, true
		default:
		}
		select {
		case ev := <-e.events:
			return ev, true
		case <-e.done:
			select {
			case ev := <-e.events:
				return ev, true
			default:
			}
			ev, ok := <-e.result
			return ev, ok
		case <-r.Context().Done():
			return api.Event{}, false
		}
	}
	// Nothing is written before the handoff either began steering or ended: a refusal gets its HTTP status.
	first, ok := next()
	if !ok {
		return
	}
	if first.Type == api.EventResult && !e.persisted() {
		if first.Err == nil {
			first.Err = &api.Error{Message: "handoff ended before it started", Kind: api.KindInternal}
		}
		writeError(w, first.Err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	send := func(ev api.Event) bool {
		if err := enc.Encode(ev); err != nil {
			return false
		}
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		return true
	}
	if !send(api.Event{Type: api.EventStarted, ID: e.id}) {
		return
	}
	for ev := first; send(ev) && ev.Type != api.EventResult; {
		if ev, ok = next(); !ok {
			return // the caller went away, or the daemon stops; the handoff goes on
		}
	}
}

// resolveRef opens the process ref names: a pidfd the caller passed (fds; taken records that it is the Process's
// now) or, from a caller in the daemon's PID namespace, a PID.
func resolveRef(pc *api.PeerConn, fds []int, taken map[int]bool, ref api.ProcRef, what string) (*proc.Process, error) {
	if ref.PIDFD != nil {
		p, err := proc.FromPidfd(fds[*ref.PIDFD]) // closes the fd on error
		taken[*ref.PIDFD] = true
		if err != nil {
			return nil, fmt.Errorf("%w: %s process: %w", handoff.ErrBadInput, what, err)
		}
		return p, nil
	}
	if err := samePIDNamespace(int(pc.Cred.Pid)); err != nil {
		return nil, err
	}
	p, err := proc.Open(ref.PID)
	if err != nil {
		return nil, fmt.Errorf("%w: %s process: %w", handoff.ErrBadInput, what, err)
	}
	return p, nil
}

// MaxPreparedByUsers is how many prepared ports (all users' together) the daemon lets users other than root add: the
// bind guard keeps a prepared port from being bound outside its service's cgroup until it is unprepared, and the
// map is shared by everyone.
const MaxPreparedByUsers = 256

// prepare serves POST /v1/prepare (steer.Prepare, and steer.Hold if asked) and, with undo, POST /v1/unprepare
// (steer.Unprepare of the process's cgroup). The caller must own the process (root may name any).
func (d *Daemon) prepare(w http.ResponseWriter, r *http.Request, undo bool) {
	pc := api.Peer(r.Context())
	if pc == nil {
		writeError(w, &api.Error{Message: "no peer credentials", Kind: api.KindInternal})
		return
	}
	fds, err := pc.TakeFDs()
	taken := map[int]bool{}
	defer func() {
		for i, fd := range fds {
			if !taken[i] {
				unix.Close(fd)
			}
		}
	}()
	if err != nil {
		writeError(w, classify(err))
		return
	}
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(10 * time.Second))
	req, err := api.DecodePrepare(r.Body, len(fds), undo)
	if err != nil {
		writeError(w, classify(err))
		return
	}
	p, err := resolveRef(pc, fds, taken, req.From, "server")
	if err != nil {
		writeError(w, classify(err))
		return
	}
	defer p.Close()
	uid := pc.Cred.Uid
	if err := authorize(uid, p, p); err != nil {
		writeError(w, classify(err))
		return
	}
	objs, err := d.prepareObjects()
	if err != nil {
		writeError(w, classify(err))
		return
	}
	d.prepMu.Lock()
	defer d.prepMu.Unlock()
	badInput := func(err error) error {
		if errors.Is(err, steer.ErrNoListeners) || errors.Is(err, steer.ErrNoMatch) || errors.Is(err, steer.ErrIncompatible) || errors.Is(err, proc.ErrNoCgroup2) {
			return fmt.Errorf("%w: %w", handoff.ErrBadInput, err)
		}
		return err
	}
	var out any
	if undo {
		dir, err := proc.CgroupDir(p.PID)
		if err != nil {
			writeError(w, classify(badInput(err)))
			return
		}
		res, err := steer.Unprepare(objs, dir, req.Ports)
		if err != nil {
			writeError(w, classify(badInput(err)))
			return
		}
		d.log.Info("unprepared", "uid", uid, "pid", p.PID, "cgroup", dir, "ports", res.Ports, "detached", res.Detached)
		out = res
	} else {
		if uid != 0 {
			if entries, err := objs.Entries(); err != nil || len(entries)+max(len(req.Ports), 1) > MaxPreparedByUsers {
				writeError(w, &api.Error{Message: fmt.Sprintf("%d ports are prepared already: users other than root may not add more than %d (err: %v)", len(entries), MaxPreparedByUsers, err), Kind: api.KindForbidden})
				return
			}
		}
		res, err := steer.Prepare(objs, d.objs, p, req.Ports)
		if err != nil {
			writeError(w, classify(badInput(err)))
			return
		}
		pr := &api.PrepareResult{Prepared: *res}
		if req.Hold {
			if pr.Held, err = steer.Hold(d.objs, p, res.Already); err != nil {
				writeError(w, classify(badInput(err)))
				return
			}
		}
		d.log.Info("prepared", "uid", uid, "pid", p.PID, "cgroup", res.Cgroup, "shared", res.Shared, "held", pr.Held)
		out = pr
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

// MaxHandoffsPerUser is how many handoffs a user other than root may have in progress: each takes steering groups,
// socket array slots and marks, which are shared by everyone.
const MaxHandoffsPerUser = 16

// handoffsOf counts uid's handoffs in progress.
func (d *Daemon) handoffsOf(uid uint32) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, e := range d.handoffs {
		if e.uid == uid {
			n++
		}
	}
	return n
}

// claimer is a handoff's Claim hook: the caller must own every process holding a listener (root excepted), and no
// listener may be in another handoff, except the new side of a handoff that has flipped, which may become the old
// side of the next (A->B->C).
func (d *Daemon) claimer(e *entry, uid uint32) func([]steer.Pair) error {
	return func(pairs []steer.Pair) error {
		if uid != 0 {
			for _, p := range pairs {
				for _, l := range slices.Concat(p.Old, p.New) {
					in, err := l.Holder.Info()
					if err != nil {
						return fmt.Errorf("%w: %w", errForbidden, err)
					}
					if in.EUID != uid || in.RUID != uid {
						return fmt.Errorf("%w: listener %s is held by process %d of uid %d, not yours (%d)", errForbidden, l, l.Holder.PID, in.EUID, uid)
					}
				}
			}
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, p := range pairs {
			for _, l := range p.Old {
				if c, ok := d.claims[l.Cookie]; ok && (c.old || d.handoffs[c.id] == nil || !d.handoffs[c.id].flipped()) {
					return &conflictError{id: c.id, listener: l.String()}
				}
			}
			for _, l := range p.New {
				if c, ok := d.claims[l.Cookie]; ok {
					return &conflictError{id: c.id, listener: l.String()}
				}
			}
		}
		for _, p := range pairs {
			for _, l := range p.Old {
				d.claims[l.Cookie] = claim{id: e.id, old: true}
			}
			for _, l := range p.New {
				d.claims[l.Cookie] = claim{id: e.id}
			}
		}
		return nil
	}
}

// authorize applies the rules: root may hand off anything; anyone else only two processes it owns (real and
// effective UID both the caller's). The new process must have the old one's owner in any case.
func authorize(uid uint32, oldP, newP *proc.Process) error {
	oi, err := oldP.Info()
	if err != nil {
		return fmt.Errorf("%w: old process: %w", handoff.ErrBadInput, err)
	}
	ni, err := newP.Info()
	if err != nil {
		return fmt.Errorf("%w: new process: %w", handoff.ErrBadInput, err)
	}
	if uid != 0 {
		for _, x := range []struct {
			what string
			pid  int
			in   proc.Info
		}{{"old", oldP.PID, oi}, {"new", newP.PID, ni}} {
			if x.in.RUID != uid || x.in.EUID != uid {
				return fmt.Errorf("%w: the %s process %d belongs to uid %d; uid %d may only hand off its own processes", errForbidden, x.what, x.pid, x.in.EUID, uid)
			}
		}
	}
	if oi.EUID != ni.EUID {
		return fmt.Errorf("%w: the new process %d belongs to uid %d, the old one %d to uid %d: they must have the same owner", errForbidden, newP.PID, ni.EUID, oldP.PID, oi.EUID)
	}
	return nil
}

// samePIDNamespace refuses PIDs from a caller in another PID namespace: they would be misread as the daemon's.
func samePIDNamespace(callerPID int) error {
	var mine, theirs unix.Stat_t
	if err := unix.Stat("/proc/self/ns/pid", &mine); err != nil {
		return fmt.Errorf("read PID namespace: %w", err)
	}
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/pid", callerPID), &theirs); err != nil {
		return fmt.Errorf("%w: cannot tell the caller's PID namespace (pass pidfds instead of PIDs): %w", handoff.ErrBadInput, err)
	}
	if mine.Ino != theirs.Ino || mine.Dev != theirs.Dev {
		return fmt.Errorf("%w: the caller is in another PID namespace: pass pidfds, not PIDs", handoff.ErrBadInput)
	}
	return nil
}

func (d *Daemon) listHandoffs(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	out := []api.Handoff{}
	for _, e := range d.handoffs {
		out = append(out, e.status())
	}
	d.mu.Unlock()
	slices.SortFunc(out, func(a, b api.Handoff) int { return a.Started.Compare(b.Started) })
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

// abortHandoff rolls a handoff back: root or the user who asked for it, before the old process was signalled.
func (d *Daemon) abortHandoff(w http.ResponseWriter, r *http.Request) {
	pc := api.Peer(r.Context())
	id := r.PathValue("id")
	d.mu.Lock()
	e := d.handoffs[id]
	d.mu.Unlock()
	switch {
	case pc == nil:
		writeError(w, &api.Error{Message: "no peer credentials", Kind: api.KindInternal})
		return
	case e == nil:
		writeError(w, &api.Error{Message: fmt.Sprintf("no handoff %q in progress", id), Kind: api.KindNotFound})
		return
	case pc.Cred.Uid != 0 && pc.Cred.Uid != e.uid:
		writeError(w, &api.Error{Message: fmt.Sprintf("handoff %s was started by uid %d; uid %d may not abort it", id, e.uid, pc.Cred.Uid), Kind: api.KindForbidden})
		return
	case e.signalled():
		writeError(w, &api.Error{Message: fmt.Sprintf("handoff %s already signalled its old process: too late to roll back", id), Kind: api.KindConflict, Conflict: id})
		return
	}
	if later := d.successor(e); later != "" {
		writeError(w, &api.Error{Message: fmt.Sprintf("handoff %s hands the new side of %s on: abort %s first", later, id, later), Kind: api.KindConflict, Conflict: later})
		return
	}
	d.log.Info("abort requested", "id", id, "uid", pc.Cred.Uid)
	e.cancel(fmt.Errorf("aborted through the API by uid %d", pc.Cred.Uid))
	select {
	case <-e.done:
	case <-r.Context().Done():
		return
	}
	if out := e.outcomeOf(); out != handoff.OutcomeRolledBack {
		writeError(w, &api.Error{Message: fmt.Sprintf("handoff %s ended (%s) before the abort could roll it back", id, out), Kind: api.KindConflict, Conflict: id})
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// successor returns the handoff that took e's new side over as its old side (B->C while A->B drains), if any: rolling
// e back would take that side from under it.
func (d *Daemon) successor(e *entry) string {
	e.mu.Lock()
	st := e.st
	e.mu.Unlock()
	if st == nil {
		return ""
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, g := range st.Groups {
		for _, n := range g.New {
			if c, ok := d.claims[n.Cookie]; ok && c.old && c.id != e.id {
				return c.id
			}
		}
	}
	return ""
}
