// Package drain counts the in-flight connections of the old side of a handoff, decides when it has drained (or
// when its deadline has passed), and signals it through its pidfd.
package drain

import (
	"fmt"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/proc"
)

// Count is what the old side still has on the handed-off ports.
type Count struct {
	Conns  int // connections held by the process tree (accepted, not listening), in any state sock_diag lists
	Queued int // connections waiting in the accept queues of its listeners on those ports
}

// Total is Conns+Queued: the drain is over when it is zero.
func (c Count) Total() int { return c.Conns + c.Queued }

// Counter counts the in-flight connections of a process tree on some local ports, in the tree root's network
// namespace, the way `ss` sees them: sockets found in the tree's fd tables, joined with sock_diag.
type Counter struct {
	p       *proc.Process
	exclude []int
	ports   []uint16
	h       *netlink.Handle
}

// NewCounter prepares counting for p's tree on ports, leaving out the subtrees rooted at exclude (the new process,
// when it is a descendant of the old one). The caller keeps p open while counting.
func NewCounter(p *proc.Process, ports []uint16, exclude ...int) (*Counter, error) {
	h, err := proc.DiagHandle(p)
	if err != nil {
		return nil, fmt.Errorf("open counter: %w", err)
	}
	return &Counter{p: p, exclude: exclude, ports: slices.Clone(ports), h: h}, nil
}

// Count takes one exact snapshot.
func (c *Counter) Count() (Count, error) {
	if c.p.Exited() {
		return Count{}, nil // it holds nothing any more, and its PID may now be another process's
	}
	inodes := map[uint32]bool{}
	for _, pid := range proc.Tree(c.p.PID, c.exclude...) {
		socks, err := proc.Sockets(pid)
		if err != nil {
			continue // exited meanwhile: it holds nothing
		}
		for _, s := range socks {
			inodes[uint32(s.Inode)] = true
		}
	}
	var n Count
	if len(inodes) == 0 {
		return n, nil
	}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := proc.DiagTCP(c.h, fam)
		if err != nil {
			return Count{}, fmt.Errorf("count connections: %w", err)
		}
		for _, s := range socks {
			if s.INode == 0 || !inodes[s.INode] || !slices.Contains(c.ports, s.ID.SourcePort) {
				continue
			}
			if s.State == proc.TCPListen {
				n.Queued += int(s.RQueue)
			} else {
				n.Conns++
			}
		}
	}
	return n, nil
}

// Close releases the sock_diag handle. Safe to call twice.
func (c *Counter) Close() error {
	if c.h != nil {
		c.h.Close()
		c.h = nil
	}
	return nil
}
