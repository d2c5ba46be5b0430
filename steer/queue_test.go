package steer

import (
	"context"
	"errors"
	"net"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/draind/draind/testenv"
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

// TestRelistenRaceWithoutStop is the reason MoveQueues stops the old listener's holders: shutdown(2) and listen(2)
// on a copy of a listener that a Go accept loop waits on, with nothing stopped, make that loop's accept fail
// (EINVAL: the socket is not listening in between), which ends net/http's Serve. It runs batches of 1,000 cycles
// until an accept failed (at most 20 batches) and logs how often.
func TestRelistenRaceWithoutStop(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// A copy of the fd, as draind's pidfd_getfd copy (os.File.Fd would make the shared file blocking).
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	if err := rc.Control(func(s uintptr) { fd, err = unix.Dup(int(s)) }); err != nil || fd < 0 {
		t.Fatalf("copy the listener's fd: %v", err)
	}
	defer unix.Close(fd)
	var failed atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				failed.Add(1)
				continue
			}
			c.Close()
		}
	}()
	cycles := 0
	for batch := 0; batch < 20 && failed.Load() == 0; batch++ {
		for range 1000 {
			if err := unix.Shutdown(fd, unix.SHUT_RD); err != nil {
				t.Fatal(err)
			}
			if err := unix.Listen(fd, 16); err != nil {
				t.Fatal(err)
			}
			cycles++
		}
		time.Sleep(10 * time.Millisecond) // the last wake-up's accept
	}
	ln.Close()
	<-done
	t.Logf("%d shutdown+listen cycles: %d failed accepts", cycles, failed.Load())
	if failed.Load() == 0 {
		t.Fatal("no accept failed: the window MoveQueues closes by stopping the holders was not seen")
	}
}

// TestSettle: MoveQueues leaves alone a queue that the old side empties itself fast enough, and moves one that it
// empties too slowly or not at all (settle returns those), on real loopback listeners with real connections waiting
// in their queues.
func TestSettle(t *testing.T) {
	const conns = 3
	closed := map[int]*bool{} // per fd of a listen below: settle closed it
	listen := func() (net.Listener, queued) {
		t.Helper()
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		for range conns {
			c, err := net.Dial("tcp4", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
		}
		// A copy of the fd, as draind's pidfd_getfd copy (os.File.Fd would make the shared file blocking).
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		fd, derr := -1, error(nil)
		if err := rc.Control(func(s uintptr) { fd, derr = unix.Dup(int(s)) }); err != nil || derr != nil {
			t.Fatalf("copy the listener's fd: %v", errors.Join(err, derr))
		}
		// Closed here unless settle closed it (a queue it leaves alone): never twice, since the fd number may be
		// reused meanwhile.
		done := new(bool)
		closed[fd] = done
		t.Cleanup(func() {
			if !*done {
				unix.Close(fd)
			}
		})
		testenv.WaitFor(t, 5*time.Second, func() bool {
			n, _, err := acceptQueue(fd)
			return err == nil && n == conns
		})
		return ln, queued{fd: fd, first: conns, at: time.Now()}
	}
	acceptEvery := func(ln net.Listener, every time.Duration) {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				t.Cleanup(func() { c.Close() })
				time.Sleep(every)
			}
		}()
	}
	fds := func(qs []queued) []int {
		var out []int
		for _, q := range qs {
			out = append(out, q.fd)
		}
		slices.Sort(out)
		return out
	}
	// settleFds runs settle and notes which fds it closed.
	settleFds := func(ctx context.Context, qs []queued, grace time.Duration) ([]queued, int, error) {
		move, emptied, err := settle(ctx, qs, grace)
		for _, q := range qs {
			if !slices.ContainsFunc(move, func(m queued) bool { return m.fd == q.fd }) {
				*closed[q.fd] = true
			}
		}
		return move, emptied, err
	}
	waitAccepted := func(q queued) {
		t.Helper()
		testenv.WaitFor(t, 5*time.Second, func() bool {
			n, _, err := acceptQueue(q.fd)
			return err == nil && n < conns
		})
	}
	// A server that accepts one connection every 2 ms is left to empty its queue within a generous grace (it has
	// accepted one when settle starts, so settle sees it progress, whenever its first look comes); one that does not
	// accept is moved.
	fast, qf := listen()
	_, qn := listen()
	acceptEvery(fast, 2*time.Millisecond)
	waitAccepted(qf)
	move, emptied, err := settleFds(t.Context(), []queued{qf, qn}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fds(move), fds([]queued{qn}); !slices.Equal(got, want) || emptied != conns {
		t.Fatalf("settle: move %v, emptied %d; want the stuck listener's fd %v, %d emptied", got, emptied, want, conns)
	}
	if n, _, err := acceptQueue(qn.fd); err != nil || n != conns {
		t.Fatalf("the stuck listener's queue: %d, %v; want %d", n, err, conns)
	}
	// One connection every 150 ms, with a grace of 300 ms: after the first accept the rest would take 300 ms more, so
	// settle moves the queue at about 100 ms (when elapsed + 2 × elapsed passes the grace), before the second accept.
	// (Waiting the whole grace, settle would see the queue emptied at 300 ms.)
	slow, qs := listen()
	acceptEvery(slow, 150*time.Millisecond)
	waitAccepted(qs)
	move, emptied, err = settleFds(t.Context(), []queued{qs}, 300*time.Millisecond)
	if err != nil || len(move) != 1 || emptied != 0 {
		t.Fatalf("settle of a slow server: move %d, emptied %d, %v; want it moved", len(move), emptied, err)
	}
	if n, _, err := acceptQueue(qs.fd); err != nil || n != conns-1 {
		t.Fatalf("the slow listener's queue when settle moved it: %d, %v; want %d (moved before its second accept)", n, err, conns-1)
	}
	// A cancelled context ends the wait with an error, and hands back the listeners still queued.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, q4 := listen()
	move, _, err = settleFds(ctx, []queued{q4}, time.Hour)
	if !errors.Is(err, context.Canceled) || len(move) != 1 {
		t.Fatalf("settle with a cancelled context: move %d, %v; want 1 and context.Canceled", len(move), err)
	}
}
