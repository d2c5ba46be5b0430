package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns` keeps its named namespaces.
const netnsDir = "/run/netns"

// NetNS is a named network namespace, created the way `ip netns add` does it: a bind mount of the namespace file
// under /run/netns, so `ip netns exec NAME ...` and `nsenter --net=PATH` work on it. Its loopback interface is up.
//
// A nil *NetNS stands for the namespace of the calling process wherever a *NetNS is accepted.
type NetNS struct {
	Name string // e.g. "draind-test-1a2b3c4d"
	Path string // e.g. "/run/netns/draind-test-1a2b3c4d"

	mu     sync.Mutex
	closed bool
}

// NewNetNS creates a fresh network namespace named draind-test-<random> with loopback up.
func NewNetNS() (*NetNS, error) {
	if err := prepareNetnsDir(); err != nil {
		return nil, fmt.Errorf("create netns: %w", err)
	}
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("create netns: %w", err)
	}
	name := "draind-test-" + hex.EncodeToString(rnd[:])
	path := filepath.Join(netnsDir, name)

	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns: %w", err)
	}
	f.Close()

	// unshare(CLONE_NEWNET) switches only the calling thread, so do it on a locked thread of its own. If switching
	// back fails the goroutine exits while still locked, and the runtime discards the thread.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := createNetNS(path)
		if !errors.Is(err, errThreadTainted) {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		_ = unix.Unmount(path, unix.MNT_DETACH)
		_ = os.Remove(path)
		return nil, fmt.Errorf("create netns: %w", err)
	}
	return &NetNS{Name: name, Path: path}, nil
}

var errThreadTainted = errors.New("thread left in another network namespace")

// createNetNS runs on a locked OS thread: it moves the thread into a new network namespace, brings lo up, bind-mounts
// the namespace on path and moves the thread back.
func createNetNS(path string) error {
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open current netns: %w", err)
	}
	defer unix.Close(orig)

	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("unshare: %w", err)
	}
	err = setupNetNS(path)
	if rerr := unix.Setns(orig, unix.CLONE_NEWNET); rerr != nil {
		return errors.Join(err, fmt.Errorf("%w: setns: %v", errThreadTainted, rerr))
	}
	return err
}

func setupNetNS(path string) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	if err := unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s: %w", path, err)
	}
	return nil
}

var netnsDirMu sync.Mutex

// prepareNetnsDir makes /run/netns a shared mount point like iproute2 does, so namespaces mounted there are visible
// to other mount namespaces. A flock on the directory serialises this between processes (go test runs packages in
// parallel), so the directory is not bind-mounted onto itself twice.
func prepareNetnsDir() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()

	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return err
	}
	dir, err := os.Open(netnsDir)
	if err != nil {
		return err
	}
	defer dir.Close()
	if err := unix.Flock(int(dir.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", netnsDir, err)
	}
	defer unix.Flock(int(dir.Fd()), unix.LOCK_UN)

	err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("make %s shared: %w", netnsDir, err)
	}
	// Not a mount point yet.
	if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind mount %s: %w", netnsDir, err)
	}
	if err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", netnsDir, err)
	}
	return nil
}

// NetNSForTest creates a network namespace that is deleted when the test ends. It fails the test on error.
func NetNSForTest(t testing.TB) *NetNS {
	t.Helper()
	ns, err := NewNetNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Close(); err != nil {
			t.Error(err)
		}
	})
	return ns
}

// Close deletes the namespace's name. The namespace itself lives on while processes are still in it. Close is safe to
// call more than once.
func (n *NetNS) Close() error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	var errs []error
	if err := unix.Unmount(n.Path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, err)
	}
	if err := os.Remove(n.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete netns %s: %w", n.Name, err)
	}
	return nil
}

// String returns the namespace's name, or "current" for nil.
func (n *NetNS) String() string {
	if n == nil {
		return "current"
	}
	return n.Name
}

// Do runs fn on a locked OS thread switched into the namespace and switches the thread back afterwards, also when fn
// returns an error or panics (the panic is re-raised in the caller). Goroutines started by fn run in the namespace
// of the process, not in n; processes forked by fn (exec.Cmd.Start) and sockets created by fn itself are in n.
// For a nil n, fn runs in the caller's goroutine.
//
// fn runs in a goroutine of its own, so it must not call t.FailNow (t.Fatal) or runtime.Goexit; Do reports that as
// an error.
func (n *NetNS) Do(fn func() error) error {
	if n == nil {
		return fn()
	}
	type result struct {
		err      error
		panicked bool
		panicVal any
		goexit   bool
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		restore, err := enterNetNS(n.Path)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("enter netns %s: %w", n.Name, err)}
			return
		}
		var r result
		returned := false
		defer func() {
			if !returned {
				if p := recover(); p != nil {
					r.panicked, r.panicVal = true, p
				} else {
					r.goexit = true
				}
			}
			if err := restore(); err != nil {
				// Leave the thread locked: the runtime destroys it when this goroutine exits.
				r.err = errors.Join(r.err, fmt.Errorf("restore netns: %w", err))
			} else {
				runtime.UnlockOSThread()
			}
			done <- r
		}()
		r.err = fn()
		returned = true
	}()
	r := <-done
	if r.panicked {
		panic(r.panicVal)
	}
	if r.goexit {
		return errors.Join(r.err, fmt.Errorf("netns %s: function called runtime.Goexit (t.FailNow?)", n.Name))
	}
	return r.err
}

// enterNetNS switches the calling (locked) thread into the namespace at path and returns the function that switches
// it back.
func enterNetNS(path string) (restore func() error, err error) {
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open current netns: %w", err)
	}
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(orig)
		return nil, fmt.Errorf("open netns: %w", err)
	}
	defer unix.Close(target)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		unix.Close(orig)
		return nil, fmt.Errorf("setns: %w", err)
	}
	return func() error {
		defer unix.Close(orig)
		return unix.Setns(orig, unix.CLONE_NEWNET)
	}, nil
}

// Sysctl writes a sysctl as seen from inside the namespace. key is a path below /proc/sys
// ("net/ipv4/tcp_migrate_req") or the dotted form ("net.ipv4.tcp_migrate_req").
func (n *NetNS) Sysctl(key, value string) error {
	path := sysctlPath(key)
	err := n.Do(func() error {
		return os.WriteFile(path, []byte(value), 0)
	})
	if err != nil {
		return fmt.Errorf("set sysctl %s in netns %s: %w", key, n, err)
	}
	return nil
}

// SysctlValue reads a sysctl as seen from inside the namespace; key as for Sysctl. Surrounding space is trimmed.
func (n *NetNS) SysctlValue(key string) (string, error) {
	path := sysctlPath(key)
	var b []byte
	err := n.Do(func() error {
		var err error
		b, err = os.ReadFile(path)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s in netns %s: %w", key, n, err)
	}
	return strings.TrimSpace(string(b)), nil
}

func sysctlPath(key string) string {
	key = strings.TrimPrefix(key, "/proc/sys/")
	if !strings.Contains(key, "/") {
		key = strings.ReplaceAll(key, ".", "/")
	}
	return filepath.Join("/proc/sys", key)
}
