package drain

import (
	"syscall"
	"testing"
)

func TestParseSignal(t *testing.T) {
	good := map[string]syscall.Signal{
		"TERM": syscall.SIGTERM, "sigterm": syscall.SIGTERM, "SIGQUIT": syscall.SIGQUIT, "usr2": syscall.SIGUSR2,
		"15": syscall.SIGTERM, "9": syscall.SIGKILL, "34": syscall.Signal(34),
	}
	for in, want := range good {
		got, err := ParseSignal(in)
		if err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "NOPE", "SIG", "0", "-1", "65", "1.5"} {
		if got, err := ParseSignal(in); err == nil {
			t.Errorf("ParseSignal(%q) = %v, want an error", in, got)
		}
	}
	if n := SignalName(syscall.SIGTERM); n != "TERM" {
		t.Errorf("SignalName(SIGTERM) = %q", n)
	}
}

func TestParseOnTimeout(t *testing.T) {
	for in, want := range map[string]OnTimeout{"": TimeoutSignal, "signal": TimeoutSignal, "kill": TimeoutKill, "abort": TimeoutAbort} {
		if got, err := ParseOnTimeout(in); err != nil || got != want {
			t.Errorf("ParseOnTimeout(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseOnTimeout("explode"); err == nil {
		t.Error("ParseOnTimeout(explode) accepted")
	}
}
