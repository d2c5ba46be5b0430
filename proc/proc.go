// Package proc holds race-free handles on processes (pidfds) and reads what draind needs from them: their
// descendants, their socket file descriptors, copies of those (pidfd_getfd), their network namespace.
package proc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Sentinel errors.
var (
	ErrNoProcess    = errors.New("no such process")
	ErrNotPermitted = errors.New("not permitted (draind needs root, or CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_BPF)")
)

// Process is a process held by a pidfd, so that a PID reused after the process exits can never be mistaken for it.
type Process struct {
	PID   int
	fd    int
	close sync.Once
}

// Open resolves pid to a pidfd.
func Open(pid int) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("open process %d: %w", pid, ErrNoProcess)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("open process %d: %w", pid, ErrNoProcess)
		}
		return nil, fmt.Errorf("open process %d: %w", pid, err)
	}
	p := &Process{PID: pid, fd: fd}
	// A zombie still has a pidfd; treat it as gone.
	if p.Exited() {
		p.Close()
		return nil, fmt.Errorf("open process %d: %w (it has exited)", pid, ErrNoProcess)
	}
	return p, nil
}

// FD is the pidfd.
func (p *Process) FD() int { return p.fd }

// Exited reports whether the process has exited (its pidfd is readable).
func (p *Process) Exited() bool {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0 && fds[0].Revents&unix.POLLIN != 0
}

// Alive is the opposite of Exited, checked with a null signal as well.
func (p *Process) Alive() bool {
	if p.Exited() {
		return false
	}
	return unix.PidfdSendSignal(p.fd, 0, nil, 0) == nil
}

// Signal sends sig through the pidfd.
func (p *Process) Signal(sig syscall.Signal) error {
	if err := unix.PidfdSendSignal(p.fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal process %d: %w", p.PID, ErrNoProcess)
		}
		return fmt.Errorf("signal process %d: %w", p.PID, err)
	}
	return nil
}

// WaitExit waits until the process exits or ctx ends; it reports whether the exit was seen. It sleeps in poll(2) on
// the pidfd and an eventfd that ctx's end writes to: no periodic wakeups.
func (p *Process) WaitExit(ctx context.Context) bool {
	if p.Exited() {
		return true
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return p.pollExit(ctx)
	}
	defer unix.Close(efd)
	woken := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(woken)
		unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	})
	defer func() {
		if !stop() {
			<-woken // the write must not land on a closed (or reused) fd
		}
	}()
	for {
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}, {Fd: int32(efd), Events: unix.POLLIN}}
		_, err := unix.Poll(fds, -1)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return p.pollExit(ctx)
		case fds[0].Revents != 0:
			return true
		case fds[1].Revents != 0:
			return p.Exited()
		}
	}
}

// pollExit is WaitExit without an eventfd: poll the pidfd in short slices so that ctx is honoured.
func (p *Process) pollExit(ctx context.Context) bool {
	for {
		if p.Exited() {
			return true
		}
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(fds, 20); err == nil && n > 0 {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
	}
}

// pidfsMagic is the filesystem type of pidfds (Linux >= 6.9).
const pidfsMagic = 0x50494446

// Ino is the process's pidfs inode number (fstat of its pidfd): an identity that is never reused and is the same in
// every PID namespace. BPF programs find the process by it (struct pid's ino).
func (p *Process) Ino() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(p.fd, &st); err != nil {
		return 0, fmt.Errorf("stat pidfd of process %d: %w", p.PID, err)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(p.fd, &fs); err != nil || fs.Type != pidfsMagic {
		return 0, fmt.Errorf("stat pidfd of process %d: not a pidfs file (needs Linux 6.9 or later)", p.PID)
	}
	return st.Ino, nil
}

// NetNSIno is the inode number of the process's network namespace.
func (p *Process) NetNSIno() (uint64, error) {
	fd, err := p.NetNS()
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("stat netns of process %d: %w", p.PID, err)
	}
	return st.Ino, nil
}

// GetFD copies the process's file descriptor fd into draind (pidfd_getfd). The caller closes the copy.
func (p *Process) GetFD(fd int) (int, error) {
	c, err := unix.PidfdGetfd(p.fd, fd, 0)
	if err != nil {
		switch {
		case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
			return -1, fmt.Errorf("copy fd %d of process %d: %w: %w", fd, p.PID, ErrNotPermitted, err)
		case errors.Is(err, unix.ESRCH):
			return -1, fmt.Errorf("copy fd %d of process %d: %w", fd, p.PID, ErrNoProcess)
		}
		return -1, fmt.Errorf("copy fd %d of process %d: %w", fd, p.PID, err)
	}
	return c, nil
}

// NetNS opens the process's network namespace. The caller closes the returned fd.
func (p *Process) NetNS() (int, error) {
	// PIDFD_GET_NET_NAMESPACE (Linux 6.11) is race-free; fall back to /proc plus a liveness check.
	const pidfdGetNetNamespace = 0xff<<8 | 4
	fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(p.fd), pidfdGetNetNamespace, 0)
	if errno == 0 {
		return int(fd), nil
	}
	nfd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", p.PID), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
		return -1, fmt.Errorf("open netns of process %d: %w", p.PID, ErrNotPermitted)
	}
	if err != nil {
		return -1, fmt.Errorf("open netns of process %d: %w", p.PID, err)
	}
	if !p.Alive() {
		unix.Close(nfd)
		return -1, fmt.Errorf("open netns of process %d: %w", p.PID, ErrNoProcess)
	}
	return nfd, nil
}

// Close closes the pidfd. Safe to call twice.
func (p *Process) Close() error {
	p.close.Do(func() { unix.Close(p.fd) })
	return nil
}

// Tree returns pid and all its descendants (read from /proc, so a snapshot), leaving out the subtrees rooted at
// exclude (nginx's binary upgrade starts the new master as a child of the old one: it is not part of the old side).
func Tree(pid int, exclude ...int) []int {
	if out, ok := treeFromChildren(pid, exclude); ok {
		return out
	}
	return treeFromScan(pid, exclude)
}

// treeFromScan walks the tree from every process's parent (/proc/*/stat).
func treeFromScan(pid int, exclude []int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return []int{pid}
	}
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		pp, err := ppid(p)
		if err != nil {
			continue
		}
		children[pp] = append(children[pp], p)
	}
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		for _, c := range children[out[i]] {
			if !slices.Contains(exclude, c) {
				out = append(out, c)
			}
		}
	}
	return out
}

// treeFromChildren walks the tree through /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN), which reads only the
// tree's own processes instead of every process's stat. ok is false when the kernel has no such files.
func treeFromChildren(pid int, exclude []int) (out []int, ok bool) {
	out = []int{pid}
	for i := 0; i < len(out); i++ {
		dir := "/proc/" + strconv.Itoa(out[i]) + "/task"
		tasks, err := os.ReadDir(dir)
		if err != nil {
			if i == 0 {
				return nil, false
			}
			continue // exited meanwhile
		}
		for _, t := range tasks {
			b, err := os.ReadFile(dir + "/" + t.Name() + "/children")
			if errors.Is(err, os.ErrNotExist) && i == 0 {
				return nil, false
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil && !slices.Contains(exclude, c) && !slices.Contains(out, c) {
					out = append(out, c)
				}
			}
		}
	}
	return out, true
}

func ppid(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	f := statFields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("parse stat of %d", pid)
	}
	return strconv.Atoi(f[1])
}

// statFields returns the fields of a /proc/.../stat line after the command name (state, ppid, ...); the name may
// contain spaces and parentheses, so they start after the last ')'. nil if the line has none.
func statFields(stat string) []string {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(stat[i+1:])
}

// State returns the state letter of process pid (R, S, D, T, t, Z...), or 0 if it is gone.
func State(pid int) byte {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	return taskState(string(b))
}

// SocketFD is one socket in a process's fd table.
type SocketFD struct {
	PID   int
	FD    int
	Inode uint64
}

// Sockets lists the socket file descriptors of a process from /proc/PID/fd.
func Sockets(pid int) ([]SocketFD, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("list fds of process %d: %w", pid, ErrNoProcess)
		}
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("list fds of process %d: %w", pid, ErrNotPermitted)
		}
		return nil, fmt.Errorf("list fds of process %d: %w", pid, err)
	}
	var out []SocketFD
	for _, e := range entries {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		ino, ok := strings.CutPrefix(link, "socket:[")
		if !ok {
			continue
		}
		n, err1 := strconv.ParseUint(strings.TrimSuffix(ino, "]"), 10, 64)
		fd, err2 := strconv.Atoi(e.Name())
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, SocketFD{PID: pid, FD: fd, Inode: n})
	}
	return out, nil
}

// Info is what the kernel says about a process through its pidfd (PIDFD_GET_INFO, Linux 6.13).
type Info struct {
	PID  int    // thread-group id, in draind's PID namespace
	PPID int    // parent's, in draind's PID namespace
	RUID uint32 // real user id
	EUID uint32 // effective user id
}

// pidfdInfo mirrors struct pidfd_info (include/uapi/linux/pidfd.h), version 0 (64 bytes).
type pidfdInfo struct {
	Mask                     uint64
	CgroupID                 uint64
	PID, TGID, PPID          uint32
	RUID, RGID, EUID, EGID   uint32
	SUID, SGID, FSUID, FSGID uint32
	ExitCode                 int32
	CoredumpMask             uint32
	Spare                    uint32
}

const (
	pidfdGetInfo   = 0xc040ff0b // _IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info)
	pidfdInfoPID   = 1 << 0
	pidfdInfoCreds = 1 << 1
)

// ErrNotPidfd is returned by FromPidfd for a file descriptor that is not a pidfd.
var ErrNotPidfd = errors.New("not a pidfd")

// pidfdGetInfoOf asks the kernel about the process behind pidfd fd. The fd is checked to be a pidfs file first: an
// fd another process passed must not get an arbitrary ioctl from draind.
func pidfdGetInfoOf(fd int) (Info, error) {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil || fs.Type != pidfsMagic {
		return Info{}, ErrNotPidfd
	}
	in := pidfdInfo{Mask: pidfdInfoPID | pidfdInfoCreds}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), pidfdGetInfo, uintptr(unsafe.Pointer(&in)))
	switch {
	case errno == unix.ESRCH:
		return Info{}, ErrNoProcess
	case errno == unix.ENOTTY || errno == unix.EBADF || errno == unix.EINVAL:
		return Info{}, ErrNotPidfd
	case errno != 0:
		return Info{}, errno
	}
	return Info{PID: int(in.TGID), PPID: int(in.PPID), RUID: in.RUID, EUID: in.EUID}, nil
}

// Info asks the kernel about the process: its PID as draind sees it, and its owner.
func (p *Process) Info() (Info, error) {
	in, err := pidfdGetInfoOf(p.fd)
	if err != nil {
		return Info{}, fmt.Errorf("read process %d: %w", p.PID, err)
	}
	return in, nil
}

// FromPidfd takes ownership of fd, a pidfd another process passed to draind (SCM_RIGHTS), and returns the process
// with its PID as draind sees it, whatever PID namespace the sender is in. fd is closed on error.
func FromPidfd(fd int) (*Process, error) {
	in, err := pidfdGetInfoOf(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("open passed process: %w", err)
	}
	if in.PID == 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("open passed process: %w (not in draind's PID namespace)", ErrNoProcess)
	}
	p := &Process{PID: in.PID, fd: fd}
	if p.Exited() {
		p.Close()
		return nil, fmt.Errorf("open passed process %d: %w (it has exited)", in.PID, ErrNoProcess)
	}
	return p, nil
}
