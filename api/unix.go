package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"golang.org/x/sys/unix"
)

// PeerConn is the daemon's side of one API connection: the caller's credentials (SO_PEERCRED, taken when the
// connection was accepted) and the file descriptors it passed (SCM_RIGHTS).
type PeerConn struct {
	*net.UnixConn
	Cred unix.Ucred

	mu      sync.Mutex
	fds     []int
	tooMany bool // more than MaxFDs were passed: the extra ones were closed at once
	oob     []byte
	release func() // gives the listener's connection slot back
	closed  sync.Once
}

// Read reads like the plain connection, keeping the file descriptors that come with the bytes.
func (c *PeerConn) Read(b []byte) (int, error) {
	n, oobn, flags, _, err := c.ReadMsgUnix(b, c.oob)
	if oobn > 0 {
		c.keep(c.oob[:oobn], flags&unix.MSG_CTRUNC != 0)
	}
	return n, err
}

// keep records the fds of a control message, closing any beyond MaxFDs (a caller may not make the daemon hold
// more).
func (c *PeerConn) keep(oob []byte, truncated bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	c.mu.Lock()
	defer c.mu.Unlock()
	if truncated {
		c.tooMany = true
	}
	if err != nil {
		return
	}
	for i := range msgs {
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if len(c.fds) < MaxFDs {
				c.fds = append(c.fds, fd)
				continue
			}
			unix.Close(fd)
			c.tooMany = true
		}
	}
}

// TakeFDs hands the passed file descriptors over to the caller, who closes them. It fails if more than MaxFDs were
// passed.
func (c *PeerConn) TakeFDs() ([]int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fds := c.fds
	c.fds = nil
	if c.tooMany {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("%w: more than %d file descriptors passed", ErrInvalid, MaxFDs)
	}
	return fds, nil
}

// Close closes the connection and any passed file descriptor nobody took.
func (c *PeerConn) Close() error {
	fds, _ := c.TakeFDs()
	for _, fd := range fds {
		unix.Close(fd)
	}
	c.closed.Do(func() {
		if c.release != nil {
			c.release()
		}
	})
	return c.UnixConn.Close()
}

// MaxConns is how many API connections the daemon serves at once; more wait to be accepted.
const MaxConns = 64

// PeerListener accepts PeerConns, at most MaxConns at a time.
type PeerListener struct {
	*net.UnixListener
	slots chan struct{}
}

// NewPeerListener wraps l.
func NewPeerListener(l *net.UnixListener) *PeerListener {
	return &PeerListener{UnixListener: l, slots: make(chan struct{}, MaxConns)}
}

// Accept waits for a free connection slot and the next connection, and reads its caller's credentials.
func (l *PeerListener) Accept() (net.Conn, error) {
	l.slots <- struct{}{}
	c, err := l.AcceptUnix()
	if err != nil {
		<-l.slots
		return nil, err
	}
	pc := &PeerConn{UnixConn: c, oob: make([]byte, unix.CmsgSpace(4*(MaxFDs+1))), release: func() { <-l.slots }}
	raw, err := c.SyscallConn()
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("read peer credentials: %w", err)
	}
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		var cred *unix.Ucred
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if cerr == nil {
			pc.Cred = *cred
		}
	}); err != nil || cerr != nil {
		pc.Close()
		return nil, fmt.Errorf("read peer credentials: %w", errors.Join(err, cerr))
	}
	return pc, nil
}

type peerKey struct{}

// WithPeer is an http.Server ConnContext: it makes the PeerConn available to handlers through Peer.
func WithPeer(ctx context.Context, c net.Conn) context.Context {
	if pc, ok := c.(*PeerConn); ok {
		return context.WithValue(ctx, peerKey{}, pc)
	}
	return ctx
}

// Peer returns the connection a request came on (set by WithPeer), or nil.
func Peer(ctx context.Context) *PeerConn {
	pc, _ := ctx.Value(peerKey{}).(*PeerConn)
	return pc
}

// rightsConn is the client's side of a connection: its first write carries the pidfds.
type rightsConn struct {
	*net.UnixConn
	fds  []int
	sent bool
}

func (c *rightsConn) Write(b []byte) (int, error) {
	if c.sent || len(c.fds) == 0 || len(b) == 0 {
		return c.UnixConn.Write(b)
	}
	c.sent = true
	n, _, err := c.WriteMsgUnix(b, unix.UnixRights(c.fds...), nil)
	if err != nil || n == len(b) {
		return n, err
	}
	m, err := c.UnixConn.Write(b[n:])
	return n + m, err
}
