package proc

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
)

// TcpExt reads the kernel's TcpExt counters (ListenOverflows, TCPMigrateReqSuccess, ...) of the network namespace
// process pid is in.
func TcpExt(pid int) (map[string]float64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/net/netstat")
	if err != nil {
		return nil, fmt.Errorf("read kernel counters: %w", err)
	}
	defer f.Close()
	return ParseTcpExt(f)
}

// ParseTcpExt reads the TcpExt section of /proc/net/netstat: a line of names, then a line of values.
func ParseTcpExt(r io.Reader) (map[string]float64, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var names []string
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0] != "TcpExt:" {
			continue
		}
		if names == nil {
			names = fields[1:]
			continue
		}
		vals := fields[1:]
		if len(vals) != len(names) {
			return nil, fmt.Errorf("read kernel counters: %d TcpExt names, %d values", len(names), len(vals))
		}
		out := make(map[string]float64, len(names))
		for i, n := range names {
			v, err := strconv.ParseFloat(vals[i], 64)
			if err != nil {
				return nil, fmt.Errorf("read kernel counters: %s: %w", n, err)
			}
			out[n] = v
		}
		return out, nil
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read kernel counters: %w", err)
	}
	return nil, fmt.Errorf("read kernel counters: no TcpExt section")
}

// ListeningPorts returns the TCP ports process pid or one of its descendants listens on, read from /proc only (its
// fds and its network namespace's /proc/net/tcp and tcp6): what the process's owner may read, without privileges.
func ListeningPorts(pid int) ([]uint16, error) {
	inodes := map[string]bool{}
	for _, p := range Tree(pid) {
		dir := "/proc/" + strconv.Itoa(p) + "/fd"
		entries, err := os.ReadDir(dir)
		if err != nil {
			if p == pid {
				return nil, fmt.Errorf("read fds of process %d: %w", pid, explain(err))
			}
			continue // a descendant that exited, or one of another user
		}
		for _, e := range entries {
			if l, err := os.Readlink(dir + "/" + e.Name()); err == nil {
				if ino, ok := strings.CutPrefix(l, "socket:["); ok {
					inodes[strings.TrimSuffix(ino, "]")] = true
				}
			}
		}
	}
	var ports []uint16
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/net/" + f)
		if err != nil {
			return nil, fmt.Errorf("read listeners of process %d: %w", pid, explain(err))
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
			fs := strings.Fields(line)
			if len(fs) < 10 || fs[3] != "0A" || !inodes[fs[9]] {
				continue
			}
			_, hexPort, _ := strings.Cut(fs[1], ":")
			if n, err := strconv.ParseUint(hexPort, 16, 16); err == nil && !slices.Contains(ports, uint16(n)) {
				ports = append(ports, uint16(n))
			}
		}
	}
	return ports, nil
}
