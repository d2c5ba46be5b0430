package steer

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
)

// Prepared says what Prepare did.
type Prepared struct {
	Cgroup    string   // the cgroup v2 directory the bind programs are attached to
	Attached  bool     // they were attached now (false: an earlier prepare did)
	Shared    []string // listeners of the old process draind gave SO_REUSEPORT
	Already   []string // listeners that had it already
	Listeners []string // every prepared listener
	Ports     []uint16 `json:",omitempty"` // PrepareCgroup: the ports prepared
}

// Prepare makes a server that never set SO_REUSEPORT upgradable on the same port: it gives the old process's TCP
// listeners on ports (all of them if none given) SO_REUSEPORT through draind's copies, and attaches the bind programs
// to the old process's cgroup (v2) so that a new process started there gets SO_REUSEPORT on the same ports in the
// same network namespace. It also attaches draind's selector to their reuseport groups with the old listeners as
// target (steering: the pinned maps), so a new process that listens gets nothing before the handoff's flip. Then
// `handoff` works as for any reuseport server. Prepare is idempotent; for a server whose
// listeners all have SO_REUSEPORT already it changes nothing (Prepared.Shared is empty, Cgroup too). Clearing
// SO_REUSEPORT again is never done: the port's bind bucket remembers it (see DESIGN.md).
func Prepare(objs *loader.Prepare, steering *loader.Objects, p *proc.Process, ports []uint16) (*Prepared, error) {
	side, err := Discover(p)
	if err != nil {
		return nil, err
	}
	defer side.Close()
	var ls []*Listener
	for _, l := range side.Listeners {
		if len(ports) == 0 || slices.Contains(ports, l.Addr.Port()) {
			ls = append(ls, l)
		}
	}
	for _, port := range ports {
		if !slices.ContainsFunc(ls, func(l *Listener) bool { return l.Addr.Port() == port }) {
			return nil, fmt.Errorf("%w: process %d does not listen on port %d", ErrNoMatch, p.PID, port)
		}
	}
	for _, l := range ls {
		if l.MPTCP {
			return nil, fmt.Errorf("%w: %s is an MPTCP listener (Go >= 1.24 listens with MPTCP by default): it cannot be steered; prepare the service's cgroup before it starts (draind prepare --cgroup DIR --port %d), and it listens with plain TCP", ErrIncompatible, l, l.Addr.Port())
		}
	}
	out := &Prepared{}
	for _, l := range ls {
		out.Listeners = append(out.Listeners, l.Addr.String())
		if l.ReusePort {
			out.Already = append(out.Already, l.Addr.String())
		}
	}
	if len(out.Already) == len(ls) {
		return out, nil // a reuseport server: nothing to prepare
	}
	dir, root, svc, err := serviceOf(p)
	if err != nil {
		return nil, err
	}
	out.Cgroup = dir
	// The programs first (they do nothing until the ports are put in their map): if they cannot be attached, the old
	// process's listeners are left as they were.
	if out.Attached, err = objs.Attach(dir, root); err != nil {
		return nil, err
	}
	var shared []*Listener
	for _, l := range ls {
		if l.ReusePort {
			continue
		}
		shared = append(shared, l)
		fd, err := l.Copy()
		if err != nil {
			return nil, err
		}
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		unix.Close(fd)
		if err != nil {
			return nil, fmt.Errorf("set SO_REUSEPORT on %s: %w", l, err)
		}
		out.Shared = append(out.Shared, l.Addr.String())
	}
	// The selector, target: old, before any new process listens (the bind guard is not armed yet, so draind's
	// placeholder may bind).
	if err := attachEarly(steering, p, shared); err != nil {
		return nil, err
	}
	for _, l := range ls {
		if err := objs.Put(l.NetnsCookie, l.Addr.Port(), svc); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// serviceOf finds process p's cgroup v2 directory, the hierarchy's root, and the cgroup's identity for the bind
// guard: its id (inode number) and depth below the root.
func serviceOf(p *proc.Process) (dir, root string, svc loader.Service, err error) {
	if dir, err = proc.CgroupDir(p.PID); err != nil {
		return "", "", svc, err
	}
	return serviceAt(dir)
}

// serviceAt is serviceOf for a cgroup v2 directory.
func serviceAt(dir string) (_, root string, svc loader.Service, err error) {
	if root, err = proc.Cgroup2Root(); err != nil {
		return "", "", svc, err
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return "", "", svc, fmt.Errorf("read cgroup %s: %w", dir, err)
	}
	rel, err := filepath.Rel(root, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return "", "", svc, fmt.Errorf("read cgroup %s: not below %s", dir, root)
	}
	level := 0
	if rel != "." {
		level = len(strings.Split(rel, string(filepath.Separator)))
	}
	return dir, root, loader.Service{Cgroup: st.Ino, Level: uint32(level)}, nil
}

// PrepareCgroup prepares a service before it starts (its processes then never listen with MPTCP, and listen with
// SO_REUSEPORT from the first one on): it attaches the bind programs to cgroup v2 directory dir for ports in the
// network namespace nsfd. Nothing listens yet, so there is nothing to share and no selector to attach: a later
// `handoff --exec` (or prepare --from) attaches it before the next version listens. Idempotent.
func PrepareCgroup(objs *loader.Prepare, dir string, nsfd int, ports []uint16) (*Prepared, error) {
	if len(ports) == 0 {
		return nil, fmt.Errorf("%w: preparing a cgroup needs its ports", ErrNoMatch)
	}
	dir, root, svc, err := serviceAt(dir)
	if err != nil {
		return nil, err
	}
	cookie, err := netnsCookie(nsfd)
	if err != nil {
		return nil, err
	}
	out := &Prepared{Cgroup: dir}
	if out.Attached, err = objs.Attach(dir, root); err != nil {
		return nil, err
	}
	for _, port := range ports {
		if err := objs.Put(cookie, port, svc); err != nil {
			return nil, err
		}
		out.Ports = append(out.Ports, port)
	}
	return out, nil
}

// Unprepared says what Unprepare did, and what stays.
type Unprepared struct {
	Ports    []uint16 // prepared ports forgotten
	Detached []string // cgroups the programs were detached from
	Stays    []string // what is not undone, and why
}

// Unprepare undoes Prepare or PrepareCgroup for cgroup v2 directory dir (the service's: that of its old or its new
// version): the ports (all the cgroup's if none given) are no longer prepared, and once none is left in the cgroup
// its programs are detached (and the root's guard once none is left anywhere). SO_REUSEPORT stays on the listeners
// that have it: clearing it on a listening socket is not safe (the port's bind bucket keeps it).
func Unprepare(objs *loader.Prepare, dir string, ports []uint16) (*Unprepared, error) {
	dir, root, svc, err := serviceAt(dir)
	if err != nil {
		return nil, err
	}
	entries, err := objs.Entries()
	if err != nil {
		return nil, err
	}
	out := &Unprepared{}
	left, leftAnywhere := 0, 0
	netnsLeft := map[uint64]bool{}
	var mine []loader.PreparedKey
	for k, v := range entries {
		if v.Cgroup == svc.Cgroup && (len(ports) == 0 || slices.Contains(ports, k.Port)) {
			mine = append(mine, k)
			continue
		}
		leftAnywhere++
		netnsLeft[k.Netns] = true
		if v.Cgroup == svc.Cgroup {
			left++
		}
	}
	for _, port := range ports {
		if !slices.ContainsFunc(mine, func(k loader.PreparedKey) bool { return k.Port == port }) {
			return nil, fmt.Errorf("%w: port %d is not prepared in cgroup %s", ErrNoMatch, port, dir)
		}
	}
	if len(mine) == 0 {
		return nil, fmt.Errorf("%w: nothing is prepared in cgroup %s", ErrNoMatch, dir)
	}
	for _, k := range mine {
		if err := objs.Delete(k); err != nil {
			return out, err
		}
		out.Ports = append(out.Ports, k.Port)
		if !netnsLeft[k.Netns] {
			if err := objs.ForgetNetns(k.Netns); err != nil {
				return out, err
			}
		}
	}
	slices.Sort(out.Ports)
	if left == 0 {
		if ok, err := objs.Detach(dir); err != nil {
			return out, err
		} else if ok {
			out.Detached = append(out.Detached, dir)
		}
	}
	if leftAnywhere == 0 {
		if ok, err := objs.Detach(root); err != nil {
			return out, err
		} else if ok {
			out.Detached = append(out.Detached, root+" (bind guard)")
		}
	}
	out.Stays = append(out.Stays, "SO_REUSEPORT on the listeners that have it: clearing it on a listening socket is unsafe (the port's bind bucket keeps it)",
		"draind's selector on a group no handoff has flipped since prepare (target: the old listeners, so it changes nothing): the next handoff of the port ends it")
	return out, nil
}

// Hold gives the reuseport groups of process p's listeners on addrs (as Listener.Addr prints them) draind's
// selector with p's listeners as target, as Prepare does for the listeners it makes shareable: a new process that
// listens next gets no connection before a handoff flips. The listeners must have SO_REUSEPORT. It returns the
// listeners held.
func Hold(steering *loader.Objects, p *proc.Process, addrs []string) ([]string, error) {
	if len(addrs) == 0 {
		return nil, nil
	}
	side, err := Discover(p)
	if err != nil {
		return nil, err
	}
	defer side.Close()
	var ls []*Listener
	var held []string
	for _, l := range side.Listeners {
		if !slices.Contains(addrs, l.Addr.String()) {
			continue
		}
		if !l.ReusePort {
			return nil, fmt.Errorf("%w: %s has no SO_REUSEPORT", ErrIncompatible, l)
		}
		ls = append(ls, l)
		held = append(held, l.Addr.String())
	}
	for _, a := range addrs {
		if !slices.Contains(held, a) {
			return nil, fmt.Errorf("%w: process %d does not listen on %s", ErrNoMatch, p.PID, a)
		}
	}
	// They listened with SO_REUSEPORT, so each has its group already (no placeholder needed, which the bind guard of
	// a prepared port would refuse).
	byAddr := map[netip.AddrPort][]*Listener{}
	for _, l := range ls {
		byAddr[l.Addr] = append(byAddr[l.Addr], l)
	}
	for addr, old := range byAddr {
		st, err := Begin(steering, []Pair{{Addr: addr, Old: old}}, Options{})
		if err != nil {
			return nil, err
		}
		st.Abandon()
	}
	return held, nil
}
