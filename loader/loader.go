// Package loader loads draind's BPF objects, keeps the shared maps pinned under a bpffs directory (mounting bpffs
// when it is missing) and probes the kernel for what draind needs.
package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Limits of the BPF objects; they mirror the constants in bpf/selector.bpf.c.
const (
	MaxSockets = 1024
	MaxGroups  = 256
	MaxMembers = 32
)

// DefaultPinDir is where the shared maps are pinned unless Options.PinDir says otherwise.
const DefaultPinDir = "/sys/fs/bpf/draind"

// Sentinel errors, for errors.Is.
var (
	ErrNotPermitted = errors.New("operation not permitted: draind needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN to mount bpffs)")
)

// Exported forms of the generated types, for steer/ and metrics/.
type (
	Group    = selectorGroup
	Member   = selectorMember
	GroupKey = selectorGroupKey
	Counters = selectorCounters
)

// Options configures Open. The zero value pins under DefaultPinDir and logs to slog.Default().
type Options struct {
	PinDir string
	Logger *slog.Logger
}

// Objects are the pinned maps shared by every selector copy, plus the spec to load copies from.
type Objects struct {
	Sockets   *ebpf.Map // REUSEPORT_SOCKARRAY: slot -> listener
	Groups    *ebpf.Map // ARRAY: group id -> Group
	GroupKeys *ebpf.Map // ARRAY: group id -> GroupKey
	Stats     *ebpf.Map // PERCPU_ARRAY: group id -> Counters

	pinDir string
	spec   *ebpf.CollectionSpec
	log    *slog.Logger
	lockMu sync.Mutex
	lockFD int
	pins   [len(mapNames)]pinFile // each map's pin as last checked by repin, in mapNames order; under lockMu
	once   sync.Once

	progMu sync.Mutex
	progs  map[uint32]*ebpf.Program // loaded selector copies, by group id: loading one takes milliseconds
}

// mapNames lists the shared maps in the order they are pinned.
var mapNames = [...]string{selectorMapSockets, selectorMapGroups, selectorMapGroupKeys, selectorMapStats}

// Open mounts bpffs if needed, then opens the pinned maps under the pin directory, creating and pinning them the
// first time.
func Open(opts Options) (*Objects, error) {
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := ensureBPFFS(filepath.Dir(opts.PinDir), opts.Logger); err != nil {
		return nil, err
	}
	spec, err := loadSelector()
	if err != nil {
		return nil, fmt.Errorf("load selector spec: %w", err)
	}
	o := &Objects{pinDir: opts.PinDir, spec: spec, log: opts.Logger, lockFD: -1}
	unlock, err := o.Lock()
	if err != nil {
		return nil, err
	}
	defer unlock()

	maps := make(map[string]*ebpf.Map, len(mapNames))
	closeAll := func() {
		for _, m := range maps {
			m.Close()
		}
	}
	for _, name := range mapNames {
		m, err := openOrCreate(spec.Maps[name], filepath.Join(o.pinDir, name))
		if err != nil {
			closeAll()
			return nil, err
		}
		maps[name] = m
	}
	o.Sockets, o.Groups, o.GroupKeys, o.Stats = maps[selectorMapSockets], maps[selectorMapGroups], maps[selectorMapGroupKeys], maps[selectorMapStats]
	return o, nil
}

func openOrCreate(spec *ebpf.MapSpec, path string) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		if err := spec.Compatible(m); err != nil {
			m.Close()
			return nil, fmt.Errorf("open pinned map %s: incompatible with this draind (remove it once no handoff runs): %w", path, err)
		}
		return m, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open pinned map %s: %w", path, wrapPerm(err))
	}
	m, err = ebpf.NewMap(spec)
	if err != nil {
		return nil, fmt.Errorf("create map %s: %w", spec.Name, wrapPerm(err))
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, fmt.Errorf("pin map %s: %w", path, wrapPerm(err))
	}
	return m, nil
}

// PinDir is the directory holding the pins.
func (o *Objects) PinDir() string { return o.pinDir }

// Lock takes draind's exclusive lock on the shared maps (an flock on the pin directory, so separate draind
// processes exclude each other too). Every read-modify-write of Groups, GroupKeys or slot allocation happens under
// it. The returned function releases it.
func (o *Objects) Lock() (func(), error) {
	o.lockMu.Lock()
	for {
		if err := os.MkdirAll(o.pinDir, 0o700); err != nil {
			o.lockMu.Unlock()
			return nil, fmt.Errorf("create pin dir %s: %w", o.pinDir, wrapPerm(err))
		}
		fd, err := unix.Open(o.pinDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			o.lockMu.Unlock()
			return nil, fmt.Errorf("open pin dir %s: %w", o.pinDir, wrapPerm(err))
		}
		if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
			unix.Close(fd)
			o.lockMu.Unlock()
			return nil, fmt.Errorf("lock pin dir %s: %w", o.pinDir, err)
		}
		// The directory may have been removed by RemoveUnusedPins while we waited: then lock the new one.
		var held, now unix.Stat_t
		if unix.Fstat(fd, &held) == nil && unix.Stat(o.pinDir, &now) == nil && held.Ino == now.Ino {
			o.lockFD = fd
			unlock := func() {
				unix.Close(o.lockFD)
				o.lockFD = -1
				o.lockMu.Unlock()
			}
			if err := o.repin(); err != nil {
				unlock()
				return nil, err
			}
			return unlock, nil
		}
		unix.Close(fd)
	}
}

// pinFile identifies a pin file. bpffs gives every new pin a new inode, numbered from a counter that wraps only after
// 2^32 inodes (system-wide) and stamped with its creation time, so a pin removed and recreated differs in one of the
// fields, while one that stays has the same map behind it.
type pinFile struct {
	dev, ino uint64
	ctime    unix.Timespec
}

func statPin(path string) (pinFile, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return pinFile{}, err
	}
	return pinFile{dev: st.Dev, ino: st.Ino, ctime: st.Ctim}, nil
}

// repin restores the pins of the open maps when another draind removed them as unused after this one opened
// them, so that every draind keeps sharing one set of maps. Pins of other maps mean the state is no longer shared:
// an error. Lock runs it several times per handoff: a pin whose file is still the one checked last time (one stat)
// is not opened and compared again.
func (o *Objects) repin() error {
	if o.Sockets == nil {
		return nil // Open is still creating them
	}
	for i, m := range [...]*ebpf.Map{o.Sockets, o.Groups, o.GroupKeys, o.Stats} {
		path := filepath.Join(o.pinDir, mapNames[i])
		// The stat comes before the check, so a pin replaced after it differs at the next Lock.
		f, statErr := statPin(path)
		if statErr == nil && f == o.pins[i] {
			continue
		}
		o.pins[i] = pinFile{}
		pinned, err := ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			m.Unpin()
			if err := m.Pin(path); err != nil {
				return fmt.Errorf("restore pin %s: %w", path, err)
			}
			continue // checked, and remembered, at the next Lock
		}
		if err != nil {
			return fmt.Errorf("check pin %s: %w", path, err)
		}
		a, errA := pinned.Info()
		b, errB := m.Info()
		pinned.Close()
		if errA != nil || errB != nil {
			return fmt.Errorf("check pin %s: %w", path, errors.Join(errA, errB))
		}
		idA, _ := a.ID()
		idB, _ := b.ID()
		if idA != idB {
			return fmt.Errorf("check pin %s: it is another map than the one this draind opened (pins were recreated)", path)
		}
		if statErr == nil {
			o.pins[i] = f
		}
	}
	return nil
}

// LoadSelector returns the selector program for a group id, loading it the first time (the verifier takes about
// 1.4 ms; a long-lived draind hands off the same ports again and again). The caller owns the returned
// program (a duplicate of the cached one) and closes it.
func (o *Objects) LoadSelector(groupID uint32) (*ebpf.Program, error) {
	o.progMu.Lock()
	defer o.progMu.Unlock()
	if p := o.progs[groupID]; p != nil {
		c, err := p.Clone()
		if err != nil {
			return nil, fmt.Errorf("load selector: %w", err)
		}
		return c, nil
	}
	p, err := o.loadSelector(groupID)
	if err != nil {
		return nil, err
	}
	c, err := p.Clone()
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("load selector: %w", err)
	}
	if o.progs == nil {
		o.progs = map[uint32]*ebpf.Program{}
	}
	o.progs[groupID] = p
	return c, nil
}

func (o *Objects) loadSelector(groupID uint32) (*ebpf.Program, error) {
	spec := o.spec.Copy()
	if err := spec.Variables[selectorVarGroupId].Set(groupID); err != nil {
		return nil, fmt.Errorf("set group id: %w", err)
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"draind_select"`
	}
	err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{
		MapReplacements: map[string]*ebpf.Map{
			selectorMapSockets:   o.Sockets,
			selectorMapGroups:    o.Groups,
			selectorMapGroupKeys: o.GroupKeys,
			selectorMapStats:     o.Stats,
		},
	})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			o.log.Error("selector rejected by the verifier", "log", fmt.Sprintf("%+v", verr))
		}
		return nil, fmt.Errorf("load selector: %w", wrapPerm(err))
	}
	// Only the program is ours; the maps were replacements and stay owned by o.
	return objs.Prog, nil
}

// Unused reports whether no group is allocated and no socket slot is filled. The group keys are read in one batch;
// the socket array is looked up slot by slot (the kernel has no batch operations for REUSEPORT_SOCKARRAY), and only
// when no group is allocated.
func (o *Objects) Unused() (bool, error) {
	keys, err := o.AllGroupKeys()
	if err != nil {
		return false, fmt.Errorf("read group keys: %w", err)
	}
	for i := range keys {
		if keys[i].NetnsCookie != 0 {
			return false, nil
		}
	}
	var cookie uint64
	for slot := uint32(0); slot < MaxSockets; slot++ {
		if err := o.Sockets.Lookup(slot, &cookie); err == nil {
			return false, nil
		}
	}
	return true, nil
}

// RemoveUnusedPins removes the pins and the pin directory when no group is in use. It takes Lock, except when the
// pin directory is gone already: groups and slots are only allocated under Lock, which restores the directory and
// the pins, so the maps were not put in use since they were found unused and removed, and Lock would only restore
// the pins for them to be checked and removed again. The owner of the Objects calls it: a standalone handoff at its
// end, a daemon when it stops (it keeps its pins while it runs, so that other draind processes share its maps).
func (o *Objects) RemoveUnusedPins() (removed bool, err error) {
	if _, err := os.Lstat(o.pinDir); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	unlock, err := o.Lock()
	if err != nil {
		return false, err
	}
	defer unlock()
	unused, err := o.Unused()
	if err != nil || !unused {
		return false, err
	}
	entries, err := os.ReadDir(o.pinDir)
	if err != nil {
		return false, fmt.Errorf("remove pins: %w", err)
	}
	for _, e := range entries { // the maps, and lease directories of freed groups
		if err := os.Remove(filepath.Join(o.pinDir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("remove pin %s: %w", e.Name(), err)
		}
	}
	if err := os.Remove(o.pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("remove pin dir: %w", err)
	}
	return true, nil
}

// Close releases draind's handles on the maps (the pins stay). Safe to call twice.
func (o *Objects) Close() error {
	o.once.Do(func() {
		o.progMu.Lock()
		for _, p := range o.progs {
			p.Close()
		}
		o.progs = nil
		o.progMu.Unlock()
		for _, m := range []*ebpf.Map{o.Sockets, o.Groups, o.GroupKeys, o.Stats} {
			if m != nil {
				m.Close()
			}
		}
	})
	return nil
}

func wrapPerm(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: %w", ErrNotPermitted, err)
	}
	return err
}

const bpffsMagic = 0xcafe4a11

// ensureBPFFS mounts bpffs at dir (normally /sys/fs/bpf) when dir is not on a bpffs already.
func ensureBPFFS(dir string, log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == bpffsMagic {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create bpffs mount point %s: %w", dir, wrapPerm(err))
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, wrapPerm(err))
	}
	log.Info("mounted bpffs", "path", dir)
	return nil
}

// AllGroups reads the whole Groups array (MaxGroups values, indexed by group id), in one batch when the kernel can.
func (o *Objects) AllGroups() ([]Group, error) { return readAll[Group](o.Groups, MaxGroups) }

// AllGroupKeys reads the whole GroupKeys array likewise.
func (o *Objects) AllGroupKeys() ([]GroupKey, error) {
	return readAll[GroupKey](o.GroupKeys, MaxGroups)
}

// readAll reads every element of an array map of n entries: with BPF_MAP_LOOKUP_BATCH (a handful of syscalls instead
// of n), or one by one where the kernel cannot batch.
func readAll[V any](m *ebpf.Map, n int) ([]V, error) {
	out := make([]V, n)
	keys := make([]uint32, n)
	vals := make([]V, n)
	var cursor ebpf.MapBatchCursor
	got := 0
	for got < n {
		c, err := m.BatchLookup(&cursor, keys[got:], vals[got:], nil)
		got += c
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := range n {
				if err := m.Lookup(uint32(i), &out[i]); err != nil {
					return nil, fmt.Errorf("read map %s: %w", m, err)
				}
			}
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read map %s: %w", m, err)
		}
		if c == 0 {
			break
		}
	}
	for i := range got {
		if int(keys[i]) < n {
			out[keys[i]] = vals[i]
		}
	}
	return out, nil
}
