package proc

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TCP states as sock_diag reports them.
const (
	TCPListen = 10
)

// DiagHandle opens a sock_diag handle in the network namespace of p (sock_diag only sees its own namespace).
func DiagHandle(p *Process) (*netlink.Handle, error) {
	nsfd, err := p.NetNS()
	if err != nil {
		return nil, err
	}
	defer unix.Close(nsfd)
	h, err := netlink.NewHandleAt(netns.NsHandle(nsfd), unix.NETLINK_INET_DIAG)
	if err != nil {
		return nil, fmt.Errorf("open sock_diag in netns of %d: %w", p.PID, err)
	}
	return h, nil
}

// DiagTCP dumps the TCP sockets of one family (AF_INET or AF_INET6), retrying when the dump was interrupted.
func DiagTCP(h *netlink.Handle, family uint8) ([]*netlink.Socket, error) {
	var err error
	for range 5 {
		var socks []*netlink.Socket
		if socks, err = h.SocketDiagTCP(family); err == nil {
			return socks, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, fmt.Errorf("dump tcp sockets: %w", err)
}
