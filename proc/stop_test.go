package proc_test

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/draind/draind/proc"
	"github.com/draind/draind/testenv"
)

// TestStop: Stop returns with every thread of a multi-threaded server stopped and Cont runs it again; a process that
// was stopped already is left alone (Cont does not continue it); a process gone is an error that continues what was
// stopped.
func TestStop(t *testing.T) {
	testenv.Require(t)
	s := testenv.StartServerForTest(t, nil, testenv.ServerOptions{Addr: "127.0.0.1:0"})
	other := testenv.StartServerForTest(t, nil, testenv.ServerOptions{Addr: "127.0.0.1:0", ID: "other"})
	p, err := proc.Open(s.PID)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	q, err := proc.Open(other.PID)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	requireStopped := func(p *proc.Process, want bool) {
		t.Helper()
		if got, err := proc.ThreadsStopped(p.PID); err != nil || got != want {
			t.Fatalf("process %d: every thread stopped %v (%v), want %v", p.PID, got, err, want)
		}
	}

	requireStopped(p, false)
	st, err := proc.Stop(context.Background(), []*proc.Process{p}, proc.StopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	requireStopped(p, true)
	if err := st.Cont(); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 5*time.Second, func() bool { ok, _ := proc.ThreadsStopped(p.PID); return !ok })
	if err := st.Cont(); err != nil {
		t.Fatalf("second Cont: %v", err)
	}

	// Stopped by somebody else: Stop leaves it out, and Cont does not continue it.
	if err := q.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 5*time.Second, func() bool { ok, _ := proc.ThreadsStopped(q.PID); return ok })
	st, err = proc.Stop(context.Background(), []*proc.Process{p, q}, proc.StopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if pids := st.PIDs(); len(pids) != 1 || pids[0] != p.PID {
		t.Fatalf("stopped %v, want only %d", pids, p.PID)
	}
	if err := st.Cont(); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 5*time.Second, func() bool { ok, _ := proc.ThreadsStopped(p.PID); return !ok })
	requireStopped(q, true)
	if err := q.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}

	// Before sees what is about to be stopped; its error stops nothing.
	var before []int
	if _, err := proc.Stop(context.Background(), []*proc.Process{p}, proc.StopOptions{Before: func(pids []int) error {
		before = pids
		return errors.New("no record")
	}}); err == nil || len(before) != 1 || before[0] != p.PID {
		t.Fatalf("stop with a failing Before: %v, Before saw %v", err, before)
	}
	requireStopped(p, false)

	// A process that exited: an error, and the one stopped before it runs again.
	if err := other.Kill(); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 5*time.Second, other.Exited)
	if _, err := proc.Stop(context.Background(), []*proc.Process{p, q}, proc.StopOptions{}); !errors.Is(err, proc.ErrNoProcess) {
		t.Fatalf("stop with a process gone: %v, want ErrNoProcess", err)
	}
	testenv.WaitFor(t, 5*time.Second, func() bool { ok, _ := proc.ThreadsStopped(p.PID); return !ok })
}
