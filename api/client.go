package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/draind/draind/steer"
)

// Client talks to the daemon over its unix socket. The zero value uses DefaultSocket.
type Client struct {
	Socket string
}

func (c *Client) socket() string {
	if c.Socket == "" {
		return DefaultSocket
	}
	return c.Socket
}

// Available reports whether a daemon socket exists at the client's path.
func (c *Client) Available() bool {
	st, err := os.Stat(c.socket())
	return err == nil && st.Mode()&os.ModeSocket != 0
}

// http returns a client whose one connection passes fds with its first write.
func (c *Client) http(fds []int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "unix", c.socket())
			if err != nil {
				return nil, fmt.Errorf("connect to draind at %s: %w", c.socket(), err)
			}
			return &rightsConn{UnixConn: conn.(*net.UnixConn), fds: fds}, nil
		},
	}}
}

func (c *Client) do(ctx context.Context, method, path string, body any, fds []int) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode request: %w", err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://draind"+path, r)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http(fds).Do(req)
	if err != nil {
		return nil, fmt.Errorf("call draind: %w", err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		return nil, readError(resp)
	}
	return resp, nil
}

// readError turns a refused request's body into an *Error.
func readError(resp *http.Response) error {
	var e Error
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &e) != nil || e.Message == "" {
		return &Error{Message: fmt.Sprintf("draind: %s: %s", resp.Status, strings.TrimSpace(string(b))), Kind: KindInternal}
	}
	return &e
}

// Handoff asks for a handoff. fds are the pidfds the request's ProcRefs point at. on (optional) gets every event as
// it comes; Handoff returns the last one (EventResult). If the request is refused before the handoff starts, the
// error is an *Error.
func (c *Client) Handoff(ctx context.Context, req HandoffRequest, fds []int, on func(Event)) (Event, error) {
	resp, err := c.do(ctx, http.MethodPost, "/v1/handoffs", req, fds)
	if err != nil {
		return Event{}, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return Event{}, fmt.Errorf("read handoff events: %w", err)
		}
		if on != nil {
			on(ev)
		}
		if ev.Type == EventResult {
			return ev, nil
		}
	}
	err = sc.Err()
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return Event{}, fmt.Errorf("read handoff events: %w: draind ended the stream before the result (if it stopped, the handoff goes on when it restarts)", err)
}

// Prepare asks the daemon to prepare a server (POST /v1/prepare); fds are the pidfds req.From may point at.
func (c *Client) Prepare(ctx context.Context, req PrepareRequest, fds []int) (*PrepareResult, error) {
	var out PrepareResult
	if err := c.call(ctx, "/v1/prepare", req, fds, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Unprepare asks the daemon to undo Prepare for a process's cgroup (POST /v1/unprepare).
func (c *Client) Unprepare(ctx context.Context, req PrepareRequest, fds []int) (*steer.Unprepared, error) {
	var out steer.Unprepared
	if err := c.call(ctx, "/v1/unprepare", req, fds, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// call POSTs body and decodes the JSON answer into out.
func (c *Client) call(ctx context.Context, path string, body any, fds []int, out any) error {
	resp, err := c.do(ctx, http.MethodPost, path, body, fds)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("read answer of %s: %w", path, err)
	}
	return nil
}

// List returns the handoffs in progress.
func (c *Client) List(ctx context.Context) ([]Handoff, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v1/handoffs", nil, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []Handoff
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("read handoffs: %w", err)
	}
	return out, nil
}

// Abort rolls a handoff back: steering goes back to the old process, which is not signalled. It is refused once the
// old process was signalled.
func (c *Client) Abort(ctx context.Context, id string) error {
	resp, err := c.do(ctx, http.MethodDelete, "/v1/handoffs/"+id, nil, nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}
