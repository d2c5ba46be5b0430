package steer

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/draind/draind/proc"
)

func side(pid int, ls ...*Listener) *Side {
	p := &proc.Process{PID: pid}
	for _, l := range ls {
		l.Holder = p
	}
	return &Side{Proc: p, Listeners: ls}
}

var nextCookie uint64

func lst(addr string, mod ...func(*Listener)) *Listener {
	nextCookie++
	l := &Listener{Addr: netip.MustParseAddrPort(addr), ReusePort: true, NetnsCookie: 1, UID: 0, Cookie: nextCookie}
	for _, m := range mod {
		m(l)
	}
	return l
}

func TestPairListeners(t *testing.T) {
	noReuse := func(l *Listener) { l.ReusePort = false }
	mptcp := func(l *Listener) { l.MPTCP = true }
	otherNS := func(l *Listener) { l.NetnsCookie = 2 }
	otherUID := func(l *Listener) { l.UID = 1000 }
	cases := []struct {
		name     string
		old, new *Side
		ports    []uint16
		pairs    int
		err      error
		msg      string
	}{
		{"one pair", side(1, lst("127.0.0.1:80")), side(2, lst("127.0.0.1:80")), nil, 1, nil, ""},
		{"two ports", side(1, lst("127.0.0.1:80"), lst("[::]:443")), side(2, lst("[::]:443"), lst("127.0.0.1:80")), nil, 2, nil, ""},
		{"several listeners per side", side(1, lst("0.0.0.0:80"), lst("0.0.0.0:80")), side(2, lst("0.0.0.0:80"), lst("0.0.0.0:80"), lst("0.0.0.0:80")), nil, 1, nil, ""},
		{"new lacks a port", side(1, lst("127.0.0.1:80"), lst("127.0.0.1:443")), side(2, lst("127.0.0.1:80")), nil, 0, ErrNoMatch, "does not listen on 127.0.0.1:443"},
		{"--port restricts", side(1, lst("127.0.0.1:80"), lst("127.0.0.1:443")), side(2, lst("127.0.0.1:80")), []uint16{80}, 1, nil, ""},
		{"--port not listened", side(1, lst("127.0.0.1:80")), side(2, lst("127.0.0.1:80")), []uint16{8443}, 0, ErrNoMatch, "does not listen on port 8443"},
		{"different address", side(1, lst("127.0.0.1:80")), side(2, lst("0.0.0.0:80")), nil, 0, ErrNoMatch, "it listens on 0.0.0.0:80"},
		{"no SO_REUSEPORT", side(1, lst("127.0.0.1:80", noReuse)), side(2, lst("127.0.0.1:80")), nil, 0, ErrIncompatible, "SO_REUSEPORT"},
		{"MPTCP", side(1, lst("127.0.0.1:80")), side(2, lst("127.0.0.1:80", mptcp)), nil, 0, ErrIncompatible, "MPTCP"},
		{"netns", side(1, lst("127.0.0.1:80")), side(2, lst("127.0.0.1:80", otherNS)), nil, 0, ErrIncompatible, "different network namespaces"},
		{"same socket on both sides", side(1, lst("127.0.0.1:80", func(l *Listener) { l.Cookie = 99 })), side(2, lst("127.0.0.1:80", func(l *Listener) { l.Cookie = 99 })), nil, 0, ErrIncompatible, "same socket"},
		{"uid", side(1, lst("127.0.0.1:80")), side(2, lst("127.0.0.1:80", otherUID)), nil, 0, ErrIncompatible, "uid 1000"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pairs, err := PairListeners(c.old, c.new, c.ports)
			if c.err != nil {
				if !errors.Is(err, c.err) || !strings.Contains(err.Error(), c.msg) {
					t.Fatalf("err = %v, want %v containing %q", err, c.err, c.msg)
				}
				return
			}
			if err != nil || len(pairs) != c.pairs {
				t.Fatalf("pairs %d, err %v; want %d pairs", len(pairs), err, c.pairs)
			}
			for _, p := range pairs {
				if len(p.Old) == 0 || len(p.New) == 0 || p.Old[0].Addr != p.New[0].Addr {
					t.Fatalf("bad pair %+v", p)
				}
			}
		})
	}
}
