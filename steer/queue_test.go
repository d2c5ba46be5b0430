package steer

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRelisten: a listener left shut down (what a draind killed between the two halves of a queue move leaves)
// listens again, on the same port; one that listens is left alone, and so is an fd that now holds another socket.
func TestRelisten(t *testing.T) {
	// A port chosen by the bind: one bound to port 0 gets a new port when it listens again (moveQueue reports that).
	free, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := free.Addr().String()
	free.Close()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	m := Moving{PID: os.Getpid(), FD: fd, Cookie: cookie, Backlog: 16}
	accepting := func() int {
		t.Helper()
		v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	if again, err := Relisten(m); err != nil || again {
		t.Fatalf("relisten a listening socket: %v, %v; want false, nil", again, err)
	}
	if err := unix.Shutdown(fd, unix.SHUT_RD); err != nil {
		t.Fatal(err)
	}
	if accepting() != 0 {
		t.Fatal("still listening after shutdown")
	}
	if again, err := Relisten(Moving{PID: m.PID, FD: m.FD, Cookie: cookie + 1, Backlog: 16}); err != nil || again || accepting() != 0 {
		t.Fatalf("relisten another socket's fd: %v, %v", again, err)
	}
	if again, err := Relisten(m); err != nil || !again || accepting() != 1 {
		t.Fatalf("relisten a shut down listener: %v, %v, listening %d; want true, nil, 1", again, err, accepting())
	}
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatalf("connect to the listener after it listens again: %v", err)
	}
	c.Close()
}
