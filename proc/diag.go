package proc

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
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

// Listening returns the TCP sockets in LISTEN state in p's network namespace: inode -> accept queue length. It asks
// sock_diag for that state only, without TCP info: dumping every socket would cost memory in proportion to all the
// connections of the namespace (hundreds of megabytes at a million).
func Listening(p *Process) (map[uint64]uint32, error) {
	nsfd, err := p.NetNS()
	if err != nil {
		return nil, err
	}
	defer unix.Close(nsfd)
	s, err := nl.GetNetlinkSocketAt(netns.NsHandle(nsfd), netns.None(), unix.NETLINK_INET_DIAG)
	if err != nil {
		return nil, fmt.Errorf("open sock_diag in netns of %d: %w", p.PID, err)
	}
	defer s.Close()
	for range 5 {
		out, interrupted, err := dumpListening(s)
		if err != nil {
			return nil, fmt.Errorf("dump listening sockets: %w", err)
		}
		if !interrupted {
			return out, nil
		}
	}
	return nil, fmt.Errorf("dump listening sockets: %w", netlink.ErrDumpInterrupted)
}

// listenRequest is struct inet_diag_req_v2 for TCP sockets of one family in LISTEN state.
type listenRequest struct{ family uint8 }

func (r *listenRequest) Len() int { return 56 }

func (r *listenRequest) Serialize() []byte {
	b := make([]byte, 56)
	b[0], b[1] = r.family, unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(b[4:], 1<<TCPListen) // idiag_states
	return b
}

func dumpListening(s *nl.NetlinkSocket) (map[uint64]uint32, bool, error) {
	out := map[uint64]uint32{}
	interrupted := false
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		req := nl.NewNetlinkRequest(nl.SOCK_DIAG_BY_FAMILY, unix.NLM_F_DUMP)
		req.AddData(&listenRequest{family: fam})
		if err := s.Send(req); err != nil {
			return nil, false, err
		}
	recv:
		for {
			msgs, _, err := s.Receive()
			if err != nil {
				return nil, false, err
			}
			for _, m := range msgs {
				if m.Header.Seq != req.Seq {
					continue
				}
				if m.Header.Flags&unix.NLM_F_DUMP_INTR != 0 {
					interrupted = true
				}
				switch m.Header.Type {
				case unix.NLMSG_DONE:
					break recv
				case unix.NLMSG_ERROR:
					if len(m.Data) >= 4 {
						if errno := int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
							return nil, false, unix.Errno(-errno)
						}
					}
					break recv
				}
				// struct inet_diag_msg: family, state, timer, retrans, id (48 bytes), expires, rqueue, wqueue, uid, inode.
				if len(m.Data) < 72 || m.Data[1] != TCPListen {
					continue
				}
				out[uint64(binary.NativeEndian.Uint32(m.Data[68:]))] = binary.NativeEndian.Uint32(m.Data[56:])
			}
		}
	}
	return out, interrupted, nil
}
