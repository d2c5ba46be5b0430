package api

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/draind/draind/drain"
)

func TestDecodeHandoff(t *testing.T) {
	good := `{"from":{"pidfd":0},"to":{"pidfd":1},"ports":[8080],"signal":"QUIT","timeout":"90s","on_timeout":"kill","signal_at":"flip","queue":"keep","ready_url":"http://127.0.0.1:8080/ready"}`
	req, err := DecodeHandoff(strings.NewReader(good), 2)
	if err != nil {
		t.Fatal(err)
	}
	o := req.Options()
	if *req.From.PIDFD != 0 || *req.To.PIDFD != 1 || o.Timeout != 90*time.Second || o.Signal != 3 || o.OnTimeout != "kill" || o.SignalAt != drain.SignalFlip || o.Queue != drain.QueueKeep || o.Ports[0] != 8080 {
		t.Fatalf("decoded %+v, options %+v", req, o)
	}
	if _, err := DecodeHandoff(strings.NewReader(`{"from":{"pid":10},"to":{"pid":11}}`), 0); err != nil {
		t.Fatalf("pids: %v", err)
	}
	bad := []struct{ body, want string }{
		{`{"from":{"pidfd":0},"to":{"pidfd":1}}`, "pidfd 1 not passed (1 passed)"},
		{`{"from":{"pidfd":-1},"to":{"pid":3}}`, "pidfd -1 not passed"},
		{`{"from":{"pidfd":0},"to":{"pidfd":0}}`, "same pidfd"},
		{`{"from":{"pid":5},"to":{"pid":5}}`, "same process"},
		{`{"from":{"pid":5,"pidfd":0},"to":{"pid":6}}`, "not both"},
		{`{"from":{},"to":{"pid":6}}`, "a pidfd or a pid > 0 is required"},
		{`{"from":{"pid":-3},"to":{"pid":6}}`, "a pidfd or a pid > 0 is required"},
		{`{"from":{"pid":5},"to":{"pid":6},"ports":[0]}`, "port 0"},
		{`{"from":{"pid":5},"to":{"pid":6},"ports":[80,80]}`, "port 80 twice"},
		{`{"from":{"pid":5},"to":{"pid":6},"ports":[70000]}`, "cannot unmarshal"},
		{`{"from":{"pid":5},"to":{"pid":6},"signal":"NOPE"}`, "unknown signal"},
		{`{"from":{"pid":5},"to":{"pid":6},"on_timeout":"explode"}`, "want signal, kill or abort"},
		{`{"from":{"pid":5},"to":{"pid":6},"signal_at":"soon"}`, "want drained or flip"},
		{`{"from":{"pid":5},"to":{"pid":6},"signal_at":"flip","on_timeout":"abort"}`, "signal-at flip rules out"},
		{`{"from":{"pid":5},"to":{"pid":6},"queue":"drop"}`, "want move or keep"},
		{`{"from":{"pid":5},"to":{"pid":6},"timeout":"-1s"}`, "negative"},
		{`{"from":{"pid":5},"to":{"pid":6},"timeout":90}`, "duration must be a string"},
		{`{"from":{"pid":5},"to":{"pid":6},"timeout":"200h"}`, "is over 168h0m0s"},
		{`{"from":{"pid":5},"to":{"pid":6},"exit_wait":"2h"}`, "at most 1h0m0s"},
		{`{"from":{"pid":5},"to":{"pid":6},"ready_url":"ftp://x"}`, "not an http:// URL"},
		{`{"from":{"pid":5},"to":{"pid":6},"color":"red"}`, "unknown field"},
		{`{"from":{"pid":5},"to":{"pid":6}} {}`, "data after the request"},
		{`{"from":`, "unexpected EOF"},
		{``, "EOF"},
		{`{"from":{"pid":5},"to":{"pid":6},"ready_url":"` + strings.Repeat("a", MaxRequestBytes) + `"}`, "request too large"},
	}
	for _, c := range bad {
		_, err := DecodeHandoff(strings.NewReader(c.body), 1)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%.60s: error %v, want %q", c.body, err, c.want)
		}
	}
	_, err = DecodeHandoff(strings.NewReader(bad[len(bad)-1].body), 0)
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized body: %v, want ErrTooLarge", err)
	}
}

// FuzzDecodeHandoff: no input makes the decoder panic, and whatever it accepts passes its own check again and
// converts to handoff options (CI runs it for 30s: make fuzz).
func FuzzDecodeHandoff(f *testing.F) {
	for _, s := range []string{
		`{"from":{"pidfd":0},"to":{"pidfd":1}}`,
		`{"from":{"pid":10},"to":{"pid":11},"ports":[80,443],"signal":"15","timeout":"1m","kill_after":"5s","exit_wait":"1s","ready_url":"http://[::1]:80/r","ready_timeout":"2s","on_timeout":"abort"}`,
		`{"from":{"pidfd":1},"to":{"pidfd":0},"signal":"sigquit"}`,
		`[]`, `null`, `{"from":null}`, `{"timeout":"9999999h"}`,
	} {
		f.Add([]byte(s), 2)
	}
	f.Fuzz(func(t *testing.T, body []byte, nfds int) {
		if nfds < 0 || nfds > MaxFDs {
			nfds = 2
		}
		req, err := DecodeHandoff(strings.NewReader(string(body)), nfds)
		if err != nil {
			return
		}
		if err := req.Check(nfds); err != nil {
			t.Fatalf("accepted %q, then its check fails: %v", body, err)
		}
		o := req.Options()
		if o.Timeout < 0 || len(o.Ports) > MaxPorts {
			t.Fatalf("accepted %q with options %+v", body, o)
		}
	})
}
