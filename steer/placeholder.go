package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"github.com/draind/draind/loader"
	"github.com/draind/draind/proc"
)

// attachEarly gives the reuseport group of each of old's listeners (which just got SO_REUSEPORT) draind's selector
// with the old side as target, before any new process listens: a new process that joins the group later gets no
// connection until a handoff flips the target. A listener that got SO_REUSEPORT after it started listening has no
// group yet; a placeholder listener of draind's own on the same address forms it, the selector is attached, and the
// placeholder closes again (what reached it meanwhile migrates to the old listener). The steering is left in the
// kernel and the pinned maps for the handoff to adopt.
func attachEarly(objs *loader.Objects, p *proc.Process, ls []*Listener) error {
	self, err := proc.Open(os.Getpid())
	if err != nil {
		return err
	}
	defer self.Close()
	nsfd, err := p.NetNS()
	if err != nil {
		return err
	}
	defer unix.Close(nsfd)
	byAddr := map[netip.AddrPort][]*Listener{}
	var order []netip.AddrPort
	for _, l := range ls {
		if byAddr[l.Addr] == nil {
			order = append(order, l.Addr)
		}
		byAddr[l.Addr] = append(byAddr[l.Addr], l)
	}
	for _, addr := range order {
		old := byAddr[addr]
		fd, err := placeholder(old[0], nsfd)
		if err != nil {
			return err
		}
		ph, err := inspect(self, proc.SocketFD{FD: fd})
		if err != nil || ph == nil {
			unix.Close(fd)
			return fmt.Errorf("inspect placeholder for %s: %w", addr, errors.Join(err, errors.New("not a listener")))
		}
		st, err := Begin(objs, []Pair{{Addr: addr, Old: old, New: []*Listener{ph}}}, Options{})
		unix.Close(fd) // leaves the group, and the socket array; the group keeps the selector, target: old
		if err != nil {
			return fmt.Errorf("attach selector to %s: %w", addr, err)
		}
		st.Abandon()
	}
	return nil
}

// netnsCookie returns the cookie of network namespace nsfd (what bpf_get_netns_cookie gives there).
func netnsCookie(nsfd int) (cookie uint64, err error) {
	err = proc.InNetNS(nsfd, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("read network namespace cookie: %w", err)
		}
		defer unix.Close(fd)
		if cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE); err != nil {
			return fmt.Errorf("read network namespace cookie: %w", err)
		}
		return nil
	})
	return cookie, err
}

// placeholder opens a TCP listener of draind's own on l's address, in the network namespace nsfd, with SO_REUSEPORT
// and owned by l's owner (one reuseport group has one owner): it joins (or forms) l's reuseport group.
func placeholder(l *Listener, nsfd int) (fd int, err error) {
	fd = -1
	err = proc.InNetNS(nsfd, func() error {
		prev, err := unix.SetfsuidRetUid(int(l.UID))
		if err != nil {
			return fmt.Errorf("take the listener owner's uid: %w", err)
		}
		defer unix.Setfsuid(prev)
		if fd, err = unix.Socket(l.Family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP); err != nil {
			return fmt.Errorf("create placeholder listener: %w", err)
		}
		var sa unix.Sockaddr
		if l.Addr.Addr().Is4() {
			sa = &unix.SockaddrInet4{Port: int(l.Addr.Port()), Addr: l.Addr.Addr().As4()}
		} else {
			sa = &unix.SockaddrInet6{Port: int(l.Addr.Port()), Addr: l.Addr.Addr().As16()}
		}
		// SO_REUSEADDR too: the old listener's connections in TIME_WAIT were accepted before it had SO_REUSEPORT,
		// and only SO_REUSEADDR on both sides lets a bind pass them (a server sets it on its listener as a rule).
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err == nil {
			err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}
		if err == nil {
			if err = unix.Bind(fd, sa); err == nil {
				err = unix.Listen(fd, 16)
			}
		}
		if err != nil {
			unix.Close(fd)
			fd = -1
			return fmt.Errorf("placeholder listener on %s: %w", l.Addr, err)
		}
		return nil
	})
	return fd, err
}
