package proc

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrNoCgroup2 is returned when no cgroup v2 hierarchy is mounted, or a process has no place in it.
var ErrNoCgroup2 = errors.New("no cgroup v2")

// Cgroup2Root returns where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on a unified system,
// /sys/fs/cgroup/unified on a hybrid one), from /proc/self/mountinfo.
func Cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup v2: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		fields := strings.Fields(sc.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	return "", fmt.Errorf("find cgroup v2: %w is mounted", ErrNoCgroup2)
}

// CgroupDir returns the cgroup v2 directory of process pid.
func CgroupDir(pid int) (string, error) {
	root, err := Cgroup2Root()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return "", fmt.Errorf("read cgroup of process %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(root, rel), nil
		}
	}
	return "", fmt.Errorf("read cgroup of process %d: %w entry", pid, ErrNoCgroup2)
}
