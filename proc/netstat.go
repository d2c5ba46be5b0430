package proc

import (
	"bufio"
	"fmt"
	"io"
	"os"
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
