// Package steer finds the listening sockets of an old and a new process, pairs them, and steers their reuseport
// groups with draind's selector: new connections to the new process, established ones left where they are.
package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/proc"
)

// Sentinel errors for bad input; the messages wrap them with details.
var (
	ErrNoListeners   = errors.New("no listening TCP sockets")
	ErrNoMatch       = errors.New("no matching listeners")
	ErrIncompatible  = errors.New("listeners cannot share a reuseport group")
	ErrSamePID       = errors.New("old and new are the same process")
	ErrAlreadyActive = errors.New("listener already being handed off")
	ErrOldAlive      = errors.New("old listeners still open")
)

// Listener is one listening socket held by a process (or one of its descendants).
type Listener struct {
	Holder      *proc.Process // process whose fd table holds it
	FD          int           // fd number in Holder
	Inode       uint64
	Cookie      uint64 // SO_COOKIE
	NetnsCookie uint64 // SO_NETNS_COOKIE
	Addr        netip.AddrPort
	Family      int
	ReusePort   bool
	UID         uint32
	MPTCP       bool
	Queue       uint32 // connections waiting in its accept queue
	Backlog     uint32
}

func (l *Listener) String() string {
	if l.Holder == nil {
		return fmt.Sprintf("%s (closed)", l.Addr)
	}
	return fmt.Sprintf("%s (pid %d fd %d)", l.Addr, l.Holder.PID, l.FD)
}

// Copy returns a copy of the listener's fd in draind, after checking the fd still is the same socket.
func (l *Listener) Copy() (int, error) {
	fd, err := l.Holder.GetFD(l.FD)
	if err != nil {
		return -1, err
	}
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil || c != l.Cookie {
		unix.Close(fd)
		return -1, fmt.Errorf("copy listener %s: fd now holds another socket", l)
	}
	return fd, nil
}

// Side is what one process (and its descendants) listens on.
type Side struct {
	Proc      *proc.Process
	Listeners []*Listener
	holders   []*proc.Process // descendants opened for their fds
}

// Close closes the pidfds of descendants opened during discovery (not Proc, which the caller owns).
func (s *Side) Close() error {
	for _, h := range s.holders {
		h.Close()
	}
	s.holders = nil
	return nil
}

// Discover lists the listening TCP sockets of p and its descendants (except the subtrees of exclude), joining the
// fd tables with sock_diag run in p's network namespace. MPTCP listeners are reported with MPTCP set (they cannot
// be steered).
func Discover(p *proc.Process, exclude ...int) (*Side, error) {
	listening, err := listeningInodes(p)
	if err != nil {
		return nil, fmt.Errorf("discover listeners of %d: %w", p.PID, err)
	}

	side := &Side{Proc: p}
	seen := map[uint64]bool{}
	var others []proc.SocketFD // socket fds that are not TCP listeners (checked for MPTCP if nothing else is found)
	for _, pid := range proc.Tree(p.PID, exclude...) {
		socks, err := proc.Sockets(pid)
		if err != nil {
			if pid == p.PID {
				side.Close()
				return nil, fmt.Errorf("discover listeners of %d: %w", p.PID, err)
			}
			continue // a descendant that exited meanwhile
		}
		holder := p
		for _, s := range socks {
			if seen[s.Inode] {
				continue
			}
			if !listening[s.Inode] {
				if pid == p.PID {
					others = append(others, s)
				}
				continue
			}
			if holder.PID != pid {
				h, err := proc.Open(pid)
				if err != nil {
					break
				}
				side.holders = append(side.holders, h)
				holder = h
			}
			l, err := inspect(holder, s)
			if err != nil {
				if errors.Is(err, proc.ErrNotPermitted) {
					side.Close()
					return nil, fmt.Errorf("discover listeners of %d: %w", p.PID, err)
				}
				continue // closed meanwhile
			}
			if l != nil {
				seen[s.Inode] = true
				side.Listeners = append(side.Listeners, l)
			}
		}
	}
	if len(side.Listeners) == 0 {
		for _, s := range others {
			if l, err := inspect(p, s); err == nil && l != nil && l.MPTCP {
				side.Listeners = append(side.Listeners, l)
			}
		}
	}
	if len(side.Listeners) == 0 {
		side.Close()
		return nil, fmt.Errorf("discover listeners of %d: %w", p.PID, ErrNoListeners)
	}
	slices.SortFunc(side.Listeners, func(a, b *Listener) int { return strings.Compare(a.Addr.String(), b.Addr.String()) })
	return side, nil
}

// listeningInodes returns the inodes of the TCP sockets in LISTEN state in p's network namespace.
func listeningInodes(p *proc.Process) (map[uint64]bool, error) {
	socks, err := proc.Listening(p)
	if err != nil {
		return nil, err
	}
	out := make(map[uint64]bool, len(socks))
	for ino := range socks {
		out[ino] = true
	}
	return out, nil
}

// inspect copies the fd and reads what steering needs. It returns nil, nil for sockets that are not listeners.
func inspect(holder *proc.Process, s proc.SocketFD) (*Listener, error) {
	fd, err := holder.GetFD(s.FD)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v == 0 {
		return nil, nil
	}
	protocol, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	if protocol != unix.IPPROTO_TCP && protocol != unix.IPPROTO_MPTCP {
		return nil, nil
	}
	l := &Listener{Holder: holder, FD: s.FD, Inode: s.Inode, MPTCP: protocol == unix.IPPROTO_MPTCP}
	if l.Family, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	rp, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
	if err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	l.ReusePort = rp != 0
	if l.Cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	if l.NetnsCookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE); err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		l.Addr = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		l.Addr = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	default:
		return nil, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("inspect socket: %w", err)
	}
	l.UID = st.Uid
	if !l.MPTCP {
		if queue, backlog, err := acceptQueue(fd); err == nil {
			l.Queue, l.Backlog = queue, backlog
		}
	}
	return l, nil
}

// acceptQueue returns what waits in listener fd's accept queue and the queue's limit (the listen backlog): for a
// listener, TCP_INFO reports them in unacked and sacked.
func acceptQueue(fd int) (queued, backlog uint32, err error) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, 0, err
	}
	return info.Unacked, info.Sacked, nil
}

// Pair is the old and new listeners of one address.
type Pair struct {
	Addr netip.AddrPort
	Old  []*Listener
	New  []*Listener
}

// PairListeners pairs old and new listeners by address and port, keeping only ports (if any are given), and checks
// that each pair can share one reuseport group. Every old listener must have a partner unless ports restrict the
// handoff: signalling the old process would otherwise cut the ports nobody took over.
func PairListeners(old, new *Side, ports []uint16) ([]Pair, error) {
	byAddr := func(ls []*Listener) (map[netip.AddrPort][]*Listener, []netip.AddrPort) {
		m := map[netip.AddrPort][]*Listener{}
		var order []netip.AddrPort
		for _, l := range ls {
			if len(ports) > 0 && !slices.Contains(ports, l.Addr.Port()) {
				continue
			}
			if _, ok := m[l.Addr]; !ok {
				order = append(order, l.Addr)
			}
			m[l.Addr] = append(m[l.Addr], l)
		}
		return m, order
	}
	oldBy, order := byAddr(old.Listeners)
	newBy, _ := byAddr(new.Listeners)

	for _, p := range ports {
		found := false
		for a := range oldBy {
			found = found || a.Port() == p
		}
		if !found {
			return nil, fmt.Errorf("pair listeners: %w: process %d does not listen on port %d (it listens on %s)", ErrNoMatch, old.Proc.PID, p, addrs(old.Listeners))
		}
	}
	var pairs []Pair
	for _, a := range order {
		nl := newBy[a]
		if len(nl) == 0 {
			hint := ""
			if len(ports) == 0 {
				hint = "; use --port to hand off only some ports"
			}
			return nil, fmt.Errorf("pair listeners: %w: new process %d does not listen on %s (it listens on %s)%s", ErrNoMatch, new.Proc.PID, a, addrs(new.Listeners), hint)
		}
		p := Pair{Addr: a, Old: oldBy[a], New: nl}
		if err := p.check(); err != nil {
			return nil, fmt.Errorf("pair listeners: %w", err)
		}
		pairs = append(pairs, p)
	}
	if len(pairs) == 0 {
		return nil, fmt.Errorf("pair listeners: %w", ErrNoMatch)
	}
	return pairs, nil
}

// check applies the kernel's rules for one reuseport group, naming the rule that fails.
func (p Pair) check() error {
	for _, o := range p.Old {
		for _, n := range p.New {
			if o.Cookie == n.Cookie {
				return fmt.Errorf("%w: %s and %s are the same socket (inherited): there is nothing to hand over", ErrIncompatible, o, n)
			}
		}
	}
	all := append(slices.Clone(p.Old), p.New...)
	ref := all[0]
	for _, l := range all {
		switch {
		case l.MPTCP:
			return fmt.Errorf("%w: %s is an MPTCP listener; draind steers plain TCP only (a Go >= 1.24 server listens with MPTCP by default: use ListenConfig.SetMultipathTCP(false) or GODEBUG=multipathtcp=0)", ErrIncompatible, l)
		case !l.ReusePort:
			return fmt.Errorf("%w: %s does not have SO_REUSEPORT set", ErrIncompatible, l)
		case l.NetnsCookie != ref.NetnsCookie:
			return fmt.Errorf("%w: %s and %s are in different network namespaces", ErrIncompatible, ref, l)
		case l.UID != ref.UID:
			return fmt.Errorf("%w: %s is owned by uid %d and %s by uid %d", ErrIncompatible, ref, ref.UID, l, l.UID)
		}
	}
	return nil
}

func addrs(ls []*Listener) string {
	var out []string
	for _, l := range ls {
		s := l.Addr.String()
		if l.MPTCP {
			s += " (MPTCP)"
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		return "nothing"
	}
	return strings.Join(out, ", ")
}
