package handoff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// waitReady checks that the new side is ready before the flip: each of its listeners is still listening, and the
// ready URL (if any) answers 2xx within the ready timeout, asked from inside the new process's network namespace.
func (h *run) waitReady(ctx context.Context, newDied <-chan struct{}) error {
	for _, g := range h.st.Pairs() {
		for _, l := range g.New {
			fd, err := l.Copy()
			if err != nil {
				return fmt.Errorf("new listener %s is gone: %w", l, err)
			}
			v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
			unix.Close(fd)
			if err != nil || v == 0 {
				return fmt.Errorf("new listener %s is not listening", l)
			}
		}
	}
	if h.opts.ReadyURL == "" {
		return nil
	}
	nsfd, err := h.newP.NetNS()
	if err != nil {
		return fmt.Errorf("check readiness: %w", err)
	}
	defer unix.Close(nsfd)
	client := &http.Client{
		Timeout: time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return dialInNetNS(ctx, netns.NsHandle(nsfd), network, addr, h.st.SetProbe)
			},
			DisableKeepAlives: true,
		},
	}
	defer h.st.SetProbe(0)
	rctx, cancel := context.WithTimeout(ctx, h.opts.ReadyTimeout)
	defer cancel()
	last := "no answer"
	for {
		req, err := http.NewRequestWithContext(rctx, http.MethodGet, h.opts.ReadyURL, nil)
		if err != nil {
			return fmt.Errorf("check readiness: %w", err)
		}
		resp, err := client.Do(req)
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
			resp.Body.Close()
			if resp.StatusCode >= 200 && resp.StatusCode < 300 {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		select {
		case <-newDied:
			return fmt.Errorf("new process %d exited before it was ready", h.opts.To)
		case <-rctx.Done():
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted while waiting for readiness")
			}
			return fmt.Errorf("new process not ready: %s did not answer 2xx within %s (last: %s)", h.opts.ReadyURL, h.opts.ReadyTimeout, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// dialInNetNS opens a TCP connection whose socket lives in network namespace ns: the socket is created on a thread
// switched into ns (a socket stays in the namespace it was created in), then used from anywhere. Before it
// connects, the socket is bound to an ephemeral port and probe is told that port, so that the selector sends this
// one connection to the new side even when the URL is the shared, handed-off address.
func dialInNetNS(ctx context.Context, ns netns.NsHandle, network, addr string, probe func(port uint16) error) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("get netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("enter netns: %w", err)}
			return
		}
		d := net.Dialer{ControlContext: func(_ context.Context, network, _ string, c syscall.RawConn) error {
			var err error
			cerr := c.Control(func(fd uintptr) { err = bindProbe(int(fd), network, probe) })
			return errors.Join(cerr, err)
		}}
		d.SetMultipathTCP(false)
		c, err := d.DialContext(ctx, network, addr)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread() // otherwise the thread stays locked and dies with this goroutine
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func bindProbe(fd int, network string, probe func(port uint16) error) error {
	var sa unix.Sockaddr = &unix.SockaddrInet4{}
	if network == "tcp6" {
		sa = &unix.SockaddrInet6{}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind probe socket: %w", err)
	}
	local, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("bind probe socket: %w", err)
	}
	var port int
	switch a := local.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	return probe(uint16(port))
}
