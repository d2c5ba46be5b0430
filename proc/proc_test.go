package proc_test

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/draind/draind/proc"
)

// TestWaitExit: WaitExit returns false when its context ends and true once the process exits, promptly in both
// cases; Ino is stable and differs between processes.
func TestWaitExit(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	p, err := proc.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	again, err := proc.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	self, err := proc.Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	a, err1 := p.Ino()
	b, err2 := again.Ino()
	c, err3 := self.Ino()
	if err1 != nil || err2 != nil || err3 != nil || a != b || a == 0 || a == c {
		t.Fatalf("ino of two pidfds of one process: %d (%v), %d (%v); of another: %d (%v)", a, err1, b, err2, c, err3)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	start := time.Now()
	if p.WaitExit(ctx) {
		t.Fatal("WaitExit saw an exit of a running process")
	}
	cancel()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("WaitExit returned %v after its context ended", d)
	}

	go func() {
		time.Sleep(50 * time.Millisecond)
		cmd.Process.Kill()
	}()
	if !p.WaitExit(context.Background()) || !p.Exited() {
		t.Fatal("WaitExit missed the exit")
	}
	cmd.Wait()
}
