package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// PreparedKey is a (network namespace cookie, port) whose TCP binds get SO_REUSEPORT in prepared cgroups.
type PreparedKey = preparePreparedKey

// Service is the cgroup whose processes may bind a prepared (network namespace, port): its id and depth.
type Service = prepareService

// Prepare is the prepared mode's BPF side: the bind programs and their pinned map of prepared (netns, port) pairs,
// and their attachments to cgroups, pinned so that they outlive draind. Everything lives under its own directory,
// PinDir+"-prepare", apart from the steering maps (which are removed when no handoff runs).
type Prepare struct {
	objs prepareObjects
	dir  string
	log  *slog.Logger
	once sync.Once
	err  error
}

// OpenPrepare loads the bind programs with the pinned map (created the first time).
func OpenPrepare(opts Options) (*Prepare, error) {
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := ensureBPFFS(filepath.Dir(opts.PinDir), opts.Logger); err != nil {
		return nil, err
	}
	p := &Prepare{dir: opts.PinDir + "-prepare", log: opts.Logger}
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create pin dir %s: %w", p.dir, wrapPerm(err))
	}
	spec, err := loadPrepare()
	if err != nil {
		return nil, fmt.Errorf("load prepare spec: %w", err)
	}
	spec.Maps[prepareMapPrepared].Pinning = ebpf.PinByName
	spec.Maps[prepareMapPreparedNetns].Pinning = ebpf.PinByName
	if err := spec.LoadAndAssign(&p.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: p.dir}}); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			opts.Logger.Error("bind programs rejected by the verifier", "log", fmt.Sprintf("%+v", verr))
		}
		return nil, fmt.Errorf("load bind programs: %w", wrapPerm(err))
	}
	return p, nil
}

// Put makes TCP binds to port in the network namespace with cookie netns get SO_REUSEPORT in the service's cgroup,
// refuses them everywhere else, and refuses MPTCP sockets in that namespace (in the cgroups the programs are attached
// to).
func (p *Prepare) Put(netns uint64, port uint16, svc Service) error {
	if err := p.objs.Prepared.Put(PreparedKey{Netns: netns, Port: port}, svc); err != nil {
		return fmt.Errorf("prepare port %d: %w", port, err)
	}
	if err := p.objs.PreparedNetns.Put(netns, uint8(1)); err != nil {
		return fmt.Errorf("prepare port %d: %w", port, err)
	}
	return nil
}

// Attach attaches the bind programs and the MPTCP refusal to the cgroup v2 directory dir, and the bind guard to the
// hierarchy's root, unless a draind already did (their links are pinned by the cgroup's inode number). It reports
// whether it attached them to dir now.
func (p *Prepare) Attach(dir, root string) (bool, error) {
	if _, err := p.attach(root, []attachment{
		{"guard4", ebpf.AttachCGroupInet4Bind, p.objs.DraindGuard4},
		{"guard6", ebpf.AttachCGroupInet6Bind, p.objs.DraindGuard6},
	}); err != nil {
		return false, err
	}
	return p.attach(dir, []attachment{
		{"bind4", ebpf.AttachCGroupInet4Bind, p.objs.DraindBind4},
		{"bind6", ebpf.AttachCGroupInet6Bind, p.objs.DraindBind6},
		{"sock_create", ebpf.AttachCGroupInetSockCreate, p.objs.DraindNoMptcp},
	})
}

type attachment struct {
	name string
	typ  ebpf.AttachType
	prog *ebpf.Program
}

func (p *Prepare) attach(dir string, as []attachment) (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false, fmt.Errorf("attach bind programs to %s: %w", dir, err)
	}
	attached := false
	for _, a := range as {
		pin := filepath.Join(p.dir, "cgroup-"+strconv.FormatUint(st.Ino, 10)+"-"+a.name)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			l.Close() // attached by an earlier draind: the pin keeps it
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: a.typ, Program: a.prog})
		if err != nil {
			return attached, fmt.Errorf("attach %s program to %s: %w", a.name, dir, wrapPerm(err))
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return attached, fmt.Errorf("pin %s link: %w", a.name, err)
		}
		attached = true
	}
	return attached, nil
}

// Dir is where the prepared mode's pins live.
func (p *Prepare) Dir() string { return p.dir }

// Close releases draind's handles (the pins stay). Safe to call twice.
func (p *Prepare) Close() error {
	p.once.Do(func() { p.err = p.objs.Close() })
	return p.err
}

// Entries lists the prepared (network namespace, port) pairs and their services.
func (p *Prepare) Entries() (map[PreparedKey]Service, error) {
	out := map[PreparedKey]Service{}
	var k PreparedKey
	var v Service
	it := p.objs.Prepared.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read prepared ports: %w", err)
	}
	return out, nil
}

// Delete forgets a prepared pair (its binds get no SO_REUSEPORT and are no longer guarded).
func (p *Prepare) Delete(k PreparedKey) error {
	if err := p.objs.Prepared.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget prepared port %d: %w", k.Port, err)
	}
	return nil
}

// Detach removes the pinned links of the programs attached to the cgroup v2 directory dir (the bind programs and the
// MPTCP refusal, or the guard on the root), which detaches them. It reports whether there were any.
func (p *Prepare) Detach(dir string) (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false, fmt.Errorf("detach from %s: %w", dir, err)
	}
	pins, err := filepath.Glob(filepath.Join(p.dir, "cgroup-"+strconv.FormatUint(st.Ino, 10)+"-*"))
	if err != nil {
		return false, err
	}
	for _, pin := range pins {
		if err := os.Remove(pin); err != nil {
			return false, fmt.Errorf("detach from %s: %w", dir, err)
		}
	}
	return len(pins) > 0, nil
}

// ForgetNetns stops refusing MPTCP in the network namespace with cookie netns.
func (p *Prepare) ForgetNetns(netns uint64) error {
	if err := p.objs.PreparedNetns.Delete(netns); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget prepared namespace: %w", err)
	}
	return nil
}
