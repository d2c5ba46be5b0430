package api

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestPeerConn: the daemon's side of a connection knows who called (SO_PEERCRED) and keeps at most MaxFDs passed
// file descriptors, closing the others.
func TestPeerConn(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l := NewPeerListener(ul)
	defer l.Close()
	pidfd := func() int {
		fd, err := unix.PidfdOpen(os.Getpid(), 0)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	for _, n := range []int{MaxFDs, MaxFDs + 1} {
		var fds []int
		for range n {
			fds = append(fds, pidfd())
		}
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		rc := &rightsConn{UnixConn: c, fds: fds}
		if _, err := rc.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		for _, fd := range fds {
			unix.Close(fd)
		}
		sc, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		pc := sc.(*PeerConn)
		buf := make([]byte, 16)
		if m, err := pc.Read(buf); err != nil || string(buf[:m]) != "hello" {
			t.Fatalf("read %q, %v", buf[:m], err)
		}
		if pc.Cred.Pid != int32(os.Getpid()) || pc.Cred.Uid != uint32(os.Getuid()) {
			t.Fatalf("credentials %+v", pc.Cred)
		}
		got, err := pc.TakeFDs()
		switch {
		case n <= MaxFDs && (err != nil || len(got) != n):
			t.Fatalf("%d fds passed: took %v, %v", n, got, err)
		case n > MaxFDs && (err == nil || !strings.Contains(err.Error(), "more than")):
			t.Fatalf("%d fds passed: took %v, %v; want an error", n, got, err)
		}
		for _, fd := range got {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				t.Fatalf("received fd %d: %v", fd, err)
			}
			unix.Close(fd)
		}
		pc.Close()
		c.Close()
	}
}
