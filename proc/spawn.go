package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotFound is returned when the command to start cannot be found or is not executable.
var ErrNotFound = errors.New("command not found")

// Like is what a process started "like" another one takes from it (Identity reads it; StartLike uses it).
type Like struct {
	UID, GID uint32
	Groups   []uint32
	Env      []string // the environment the process started with (/proc/PID/environ)
	Dir      string   // its working directory, as /proc/PID/cwd resolves it
	Cgroup   string   // its cgroup v2 directory
}

// Identity reads the user, groups, environment, working directory and cgroup of process p.
func Identity(p *Process) (*Like, error) {
	dir := "/proc/" + strconv.Itoa(p.PID)
	status, err := os.ReadFile(dir + "/status")
	if err != nil {
		return nil, fmt.Errorf("read identity of process %d: %w", p.PID, explain(err))
	}
	l := &Like{}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		switch k {
		case "Uid", "Gid":
			if len(f) < 2 {
				return nil, fmt.Errorf("read identity of process %d: bad %s line %q", p.PID, k, line)
			}
			n, err := strconv.ParseUint(f[1], 10, 32) // the effective id
			if err != nil {
				return nil, fmt.Errorf("read identity of process %d: bad %s line %q", p.PID, k, line)
			}
			if k == "Uid" {
				l.UID = uint32(n)
			} else {
				l.GID = uint32(n)
			}
		case "Groups":
			for _, g := range f {
				n, err := strconv.ParseUint(g, 10, 32)
				if err != nil {
					return nil, fmt.Errorf("read identity of process %d: bad Groups line %q", p.PID, line)
				}
				l.Groups = append(l.Groups, uint32(n))
			}
		}
	}
	env, err := os.ReadFile(dir + "/environ")
	if err != nil {
		return nil, fmt.Errorf("read environment of process %d: %w", p.PID, explain(err))
	}
	for _, kv := range bytes.Split(env, []byte{0}) {
		if len(kv) > 0 {
			l.Env = append(l.Env, string(kv))
		}
	}
	if l.Dir, err = os.Readlink(dir + "/cwd"); err != nil {
		return nil, fmt.Errorf("read working directory of process %d: %w", p.PID, explain(err))
	}
	if l.Cgroup, err = CgroupDir(p.PID); err != nil {
		return nil, err
	}
	if !p.Alive() { // everything above may have come from a reused PID
		return nil, fmt.Errorf("read identity of process %d: %w", p.PID, ErrNoProcess)
	}
	return l, nil
}

func explain(err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return ErrNoProcess
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w: %w", ErrNotPermitted, err)
	}
	return err
}

// LookPath finds the executable file of command name as a process with environment env would: a name with a slash
// is used as it is, any other is searched in env's PATH (the default search path when it has none).
func LookPath(name string, env []string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("find command: %w: empty name", ErrNotFound)
	}
	check := func(p string) error {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return fmt.Errorf("%s is not an executable file", p)
		}
		return nil
	}
	if strings.Contains(name, "/") {
		if err := check(name); err != nil {
			return "", fmt.Errorf("find command %s: %w: %w", name, ErrNotFound, err)
		}
		return name, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, d := range filepath.SplitList(path) {
		if d == "" || !filepath.IsAbs(d) {
			continue // a relative PATH entry would depend on draind's working directory
		}
		if p := filepath.Join(d, name); check(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("find command %s: %w in PATH %s", name, ErrNotFound, path)
}

// StartLike starts the command argv (argv[0] found with LookPath in the old process's environment) as a sibling of
// process old: with old's user, groups, environment, working directory, cgroup v2 and network namespace, in a
// session of its own (so a terminal's Ctrl-C to the caller does not reach it), stdin on /dev/null and stdout and
// stderr on the same files as old's (a service's journal, say), or /dev/null where old has none. The caller waits
// for the returned command (it is the caller's child) or leaves it to be reparented when the caller exits.
func StartLike(old *Process, like *Like, argv []string) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("start command: %w: no command", ErrNotFound)
	}
	path, err := LookPath(argv[0], like.Env)
	if err != nil {
		return nil, err
	}
	nsfd, err := old.NetNS()
	if err != nil {
		return nil, err
	}
	defer unix.Close(nsfd)
	var oldNS, ownNS unix.Stat_t
	if err := unix.Fstat(nsfd, &oldNS); err != nil {
		return nil, fmt.Errorf("stat network namespace of process %d: %w", old.PID, err)
	}
	if err := unix.Stat("/proc/thread-self/ns/net", &ownNS); err != nil {
		return nil, fmt.Errorf("stat own network namespace: %w", err)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", os.DevNull, err)
	}
	defer devnull.Close()
	var out [2]*os.File
	for i, fd := range []int{1, 2} {
		c, err := old.GetFD(fd)
		if err != nil {
			out[i] = devnull
			continue
		}
		out[i] = os.NewFile(uintptr(c), "fd"+strconv.Itoa(fd)+" of "+strconv.Itoa(old.PID))
		defer out[i].Close()
	}
	cmd := &exec.Cmd{
		Path: path, Args: argv, Env: like.Env, Dir: like.Dir,
		Stdin: devnull, Stdout: out[0], Stderr: out[1],
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	// The cgroup and the namespace are entered only when they are not the caller's already (a service's own
	// ExecReload= runs in both, as its user, who may not have the right to move a process or to enter a namespace).
	if own, err := CgroupDir(os.Getpid()); err != nil || own != like.Cgroup {
		cg, err := os.Open(like.Cgroup)
		if err != nil {
			return nil, fmt.Errorf("open cgroup %s: %w", like.Cgroup, err)
		}
		defer cg.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cg.Fd())
	}
	// Root takes old's identity, groups included; anyone else can only be themselves (a different identity is
	// refused by the kernel: EPERM).
	if os.Geteuid() == 0 || uint32(os.Geteuid()) != like.UID || uint32(os.Getegid()) != like.GID {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: like.UID, Gid: like.GID, Groups: like.Groups}
	}
	start := cmd.Start
	if oldNS.Ino != ownNS.Ino || oldNS.Dev != ownNS.Dev {
		start = func() error { return InNetNS(nsfd, cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", path, err)
	}
	return cmd, nil
}

// InNetNS runs fn on a thread switched into network namespace nsfd (a socket created there is in nsfd, a child
// process started there is born in it), then switches the thread back.
func InNetNS(nsfd int, fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open network namespace: %w", err)
	}
	defer orig.Close()
	if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter network namespace: %w", err)
	}
	err = fn()
	if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
		runtime.UnlockOSThread()
	} // else the thread stays locked and ends with its goroutine: it is in the wrong namespace
	return err
}
