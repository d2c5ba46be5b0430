package steer

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/draind/draind/loader"
)

// Steering is the steering of one handoff: for each pair, the group's selector, the slots holding the listeners,
// and the generations of the old and the new side.
type Steering struct {
	objs   *loader.Objects
	log    *slog.Logger
	mu     sync.Mutex // serializes updates (the readiness probe's dialer may run concurrently)
	groups []*group
}

type group struct {
	id     uint32
	pair   Pair
	oldGen uint32
	newGen uint32
	slots  map[uint64]uint32 // listener cookie -> slot
}

// Options for Begin. The zero value logs to slog.Default().
type Options struct {
	Logger *slog.Logger
}

// Begin puts every listener of pairs in the socket array and attaches a selector to each group with the OLD side as
// target, so nothing changes for clients yet. On error, everything Begin did is undone.
func Begin(objs *loader.Objects, pairs []Pair, opts Options) (_ *Steering, err error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Steering{objs: objs, log: opts.Logger}
	defer func() {
		if err != nil {
			if uerr := s.Undo(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undo steering: %w", uerr))
			}
		}
	}()
	unlock, err := objs.Lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	for _, p := range pairs {
		g, err := s.begin(p)
		if g != nil {
			s.groups = append(s.groups, g)
		}
		if err != nil {
			return nil, fmt.Errorf("steer %s: %w", p.Addr, err)
		}
	}
	return s, nil
}

func keyOf(l *Listener) loader.GroupKey {
	k := loader.GroupKey{NetnsCookie: l.NetnsCookie, Port: l.Addr.Port(), Family: uint16(l.Family)}
	k.Addr = l.Addr.Addr().As16()
	return k
}

func (s *Steering) begin(p Pair) (*group, error) {
	key := keyOf(p.Old[0])
	id, created, err := s.findGroup(key)
	if err != nil {
		return nil, err
	}
	if err := takeLease(leaseDir(s.objs, id), id); err != nil {
		return nil, err
	}
	g := &group{id: id, pair: p, slots: map[uint64]uint32{}}
	var gv loader.Group
	if created {
		if err := s.objs.GroupKeys.Put(id, key); err != nil {
			return g, fmt.Errorf("write group key: %w", err)
		}
		// Reset the counters of a recycled id.
		if err := s.objs.Stats.Put(id, make([]loader.Counters, ebpfCPUs())); err != nil {
			return g, fmt.Errorf("reset counters: %w", err)
		}
	} else {
		// A group left by a draind that is gone: keep only members whose listeners are old or new now.
		if err := s.objs.Groups.Lookup(id, &gv); err != nil {
			return g, fmt.Errorf("read group: %w", err)
		}
	}

	// Copies of the listeners' fds, closed when Begin returns (see DESIGN.md: a copy kept by draind would keep a
	// closed listener alive with its queue stuck).
	var copies []int
	defer func() {
		for _, fd := range copies {
			unix.Close(fd)
		}
	}()
	cookies, used, err := s.memberSlots()
	if err != nil {
		return g, err
	}
	for _, l := range append(append([]*Listener{}, p.Old...), p.New...) {
		fd, err := l.Copy()
		if err != nil {
			return g, err
		}
		copies = append(copies, fd)
		if slot, ok := cookies[l.Cookie]; ok {
			g.slots[l.Cookie] = slot
			continue
		}
		slot, err := s.insert(l, fd, used)
		if err != nil {
			return g, err
		}
		used[slot] = true
		cookies[l.Cookie] = slot
		g.slots[l.Cookie] = slot
	}

	// Generations: members already in the group keep theirs (a drain of an older generation may still run).
	gens := map[uint64]uint32{}
	for i := range members(&gv) {
		m := gv.Members[i]
		if m.Gen == 0 {
			continue
		}
		alive := false
		for c, slot := range cookies {
			if slot == m.Slot {
				gens[c], alive = m.Gen, true
			}
		}
		if !alive {
			gv.Members[i].Gen = 0
		}
	}
	g.oldGen = gens[p.Old[0].Cookie]
	if g.oldGen == 0 {
		g.oldGen = freeGen(&gv, 0)
	}
	g.newGen = freeGen(&gv, g.oldGen)
	for _, l := range p.Old {
		if gens[l.Cookie] == 0 {
			if err := addMember(&gv, g.slots[l.Cookie], g.oldGen); err != nil {
				return g, err
			}
		}
	}
	for _, l := range p.New {
		if gens[l.Cookie] != 0 {
			return g, fmt.Errorf("%w: %s is already a member of group %d", ErrAlreadyActive, l, id)
		}
		if err := addMember(&gv, g.slots[l.Cookie], g.newGen); err != nil {
			return g, err
		}
	}
	gv.TargetGen = g.oldGen
	if err := s.objs.Groups.Put(id, gv); err != nil {
		return g, fmt.Errorf("write group: %w", err)
	}

	prog, err := s.objs.LoadSelector(id)
	if err != nil {
		return g, err
	}
	defer prog.Close() // the group holds its own reference once attached
	if err := unix.SetsockoptInt(copies[0], unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog.FD()); err != nil {
		return g, fmt.Errorf("attach selector to %s: %w", p.Old[0], err)
	}
	s.log.Debug("steering ready", "addr", p.Addr, "group", id, "old_gen", g.oldGen, "new_gen", g.newGen)
	return g, nil
}

// findGroup returns the group id of key, or a free one (created=true).
func (s *Steering) findGroup(key loader.GroupKey) (id uint32, created bool, err error) {
	keys, err := s.objs.AllGroupKeys()
	if err != nil {
		return 0, false, fmt.Errorf("read group keys: %w", err)
	}
	free := -1
	for i, k := range keys {
		if k == key {
			return uint32(i), false, nil
		}
		if k.NetnsCookie == 0 && free < 0 {
			free = i
		}
	}
	if free < 0 {
		return 0, false, fmt.Errorf("allocate group: all %d in use", loader.MaxGroups)
	}
	return uint32(free), true, nil
}

// leases are the group leases this process holds: lease dir -> its flock'd fd and how many handoffs of this process
// use it (a daemon runs A->B and B->C on one group at once; which handoffs may share a group is its business).
var leases = struct {
	sync.Mutex
	m map[string]*lease
}{m: map[string]*lease{}}

type lease struct {
	fd   int
	refs int
}

// takeLease locks the group's lease directory for the life of a handoff, so two draind processes never steer one
// group at once. A lease that is not held (its draind died) is taken over; one this process holds is shared.
func takeLease(dir string, id uint32) error {
	leases.Lock()
	defer leases.Unlock()
	if l := leases.m[dir]; l != nil {
		l.refs++
		return nil
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create lease: %w", err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open lease: %w", err)
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("take lease of group %d: %w by another draind", id, ErrAlreadyActive)
		}
		return fmt.Errorf("lock lease: %w", err)
	}
	leases.m[dir] = &lease{fd: fd, refs: 1}
	return nil
}

// releaseLease drops one use of the lease, and the lease itself with the last one (which it reports).
func releaseLease(dir string) (last bool) {
	leases.Lock()
	defer leases.Unlock()
	l := leases.m[dir]
	if l == nil {
		return true
	}
	if l.refs--; l.refs > 0 {
		return false
	}
	unix.Close(l.fd)
	delete(leases.m, dir)
	return true
}

func leaseDir(objs *loader.Objects, id uint32) string {
	return filepath.Join(objs.PinDir(), "group-"+strconv.Itoa(int(id)))
}

// slotCookies maps the cookie of every socket in the array to its slot.
func (s *Steering) slotCookies() (map[uint64]uint32, error) {
	out := map[uint64]uint32{}
	var cookie uint64
	for slot := uint32(0); slot < loader.MaxSockets; slot++ {
		err := s.objs.Sockets.Lookup(slot, &cookie)
		if err == nil {
			out[cookie] = slot
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, fmt.Errorf("read socket array: %w", err)
		}
	}
	return out, nil
}

// memberSlots returns the slots that group members point at (used) and the cookies of the sockets in them: the
// listeners draind put in the array. Reading every group is one batch; only their slots are looked up.
func (s *Steering) memberSlots() (cookies map[uint64]uint32, used map[uint32]bool, err error) {
	groups, err := s.objs.AllGroups()
	if err != nil {
		return nil, nil, fmt.Errorf("read groups: %w", err)
	}
	cookies, used = map[uint64]uint32{}, map[uint32]bool{}
	for i := range groups {
		for _, m := range members(&groups[i]) {
			if m.Gen == 0 || m.Slot >= loader.MaxSockets || used[m.Slot] {
				continue
			}
			used[m.Slot] = true
			var c uint64
			err := s.objs.Sockets.Lookup(m.Slot, &c)
			switch {
			case err == nil:
				cookies[c] = m.Slot
			case !errors.Is(err, ebpf.ErrKeyNotExist):
				return nil, nil, fmt.Errorf("read socket array: %w", err)
			}
		}
	}
	return cookies, used, nil
}

// insert puts listener l (fd: draind's copy) in a free slot of the socket array and returns the slot. A slot no
// member points at may still hold a socket (a draind that died between the two writes): the insert then fails with
// EEXIST and the next slot is tried; if l itself is such a socket (EBUSY), a full scan of the array finds its slot.
func (s *Steering) insert(l *Listener, fd int, used map[uint32]bool) (uint32, error) {
	for slot := uint32(0); slot < loader.MaxSockets; slot++ {
		if used[slot] {
			continue
		}
		err := s.objs.Sockets.Update(slot, uint64(fd), ebpf.UpdateNoExist)
		switch {
		case err == nil:
			return slot, nil
		case errors.Is(err, ebpf.ErrKeyExist):
			continue
		case errors.Is(err, unix.EBUSY):
			all, serr := s.slotCookies()
			if serr != nil {
				return 0, serr
			}
			if slot, ok := all[l.Cookie]; ok {
				return slot, nil
			}
		}
		return 0, fmt.Errorf("put %s in socket array: %w", l, explainInsert(err))
	}
	return 0, fmt.Errorf("allocate slot: all %d in use", loader.MaxSockets)
}

// freeGen returns the smallest generation in 1..255 not used by gv's members and not except. Generations stay
// below 256 so that a flip of target_gen changes one byte (see bpf/selector.bpf.c).
func freeGen(gv *loader.Group, except uint32) uint32 {
	for g := uint32(1); g < 256; g++ {
		if g == except {
			continue
		}
		used := false
		for _, m := range members(gv) {
			used = used || m.Gen == g
		}
		if !used {
			return g
		}
	}
	return 0
}

func addMember(gv *loader.Group, slot, gen uint32) error {
	if gen == 0 {
		return fmt.Errorf("add member: no free generation")
	}
	for i := range members(gv) {
		if gv.Members[i].Gen == 0 {
			gv.Members[i] = loader.Member{Slot: slot, Gen: gen}
			return nil
		}
	}
	if gv.NumMembers >= loader.MaxMembers {
		return fmt.Errorf("add member: group already has %d listeners", loader.MaxMembers)
	}
	gv.Members[gv.NumMembers] = loader.Member{Slot: slot, Gen: gen}
	gv.NumMembers++
	return nil
}

func explainInsert(err error) error {
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w (the socket is already in another BPF socket map)", err)
	case errors.Is(err, unix.ENOTSUP), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.Errno(524)):
		return fmt.Errorf("%w (not a plain TCP listener in a reuseport group)", err)
	}
	return err
}

// update applies fn to the group value of every group of this handoff, under draind's lock.
func (s *Steering) update(fn func(g *group, gv *loader.Group)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	unlock, err := s.objs.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	for _, g := range s.groups {
		var gv loader.Group
		if err := s.objs.Groups.Lookup(g.id, &gv); err != nil {
			return fmt.Errorf("read group %d: %w", g.id, err)
		}
		fn(g, &gv)
		if err := s.objs.Groups.Put(g.id, gv); err != nil {
			return fmt.Errorf("write group %d: %w", g.id, err)
		}
	}
	return nil
}

// Flip sends new connections (and migrating ones) to the new side.
func (s *Steering) Flip() error {
	return s.update(func(g *group, gv *loader.Group) { gv.TargetGen, gv.ProbePort = g.newGen, 0 })
}

// SetProbe makes a connection from local source port reach the new side of every group even while the target is
// the old side: draind's readiness probe of the new process through the shared address. 0 clears it.
func (s *Steering) SetProbe(port uint16) error {
	return s.update(func(g *group, gv *loader.Group) { gv.ProbePort, gv.ProbeGen = uint32(port), g.newGen })
}

// GroupIDs lists the group ids this handoff steers (for counters).
func (s *Steering) GroupIDs() []uint32 {
	var out []uint32
	for _, g := range s.groups {
		out = append(out, g.id)
	}
	return out
}

// OldAlive reports whether any old listener is still in its group (an old listener leaves the socket array when
// it closes).
func (s *Steering) OldAlive() bool {
	for _, g := range s.groups {
		if s.inArray(g, g.pair.Old) {
			return true
		}
	}
	return false
}

// inArray reports whether any of ls is in its slot of the socket array (a closed listener leaves it).
func (s *Steering) inArray(g *group, ls []*Listener) bool {
	for _, l := range ls {
		var c uint64
		if slot, ok := g.slots[l.Cookie]; ok && s.objs.Sockets.Lookup(slot, &c) == nil && c == l.Cookie {
			return true
		}
	}
	return false
}

// Undo steers back to the old side, detaches the selectors draind attached and forgets every slot and group this
// handoff created, leaving the kernel as Begin found it (the pinned maps stay, for the owner of the loader.Objects to
// remove when unused). Safe to call more than once.
func (s *Steering) Undo() error {
	return s.release(false)
}

// Abandon lets go of the steering without changing it (a daemon that stops leaves it for the next one, which
// Adopts it): only this process's leases are released.
func (s *Steering) Abandon() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.groups {
		releaseLease(leaseDir(s.objs, g.id))
	}
	s.groups = nil
}

// Finish ends a handoff whose old side is gone: the new side keeps the group alone, so the selector is detached
// and slots and groups are freed. When old listeners are still open it leaves steering in place (target: new) and
// says so.
func (s *Steering) Finish() error {
	if s.OldAlive() {
		return fmt.Errorf("finish steering: %w; steering left in place (pinned under %s)", ErrOldAlive, s.objs.PinDir())
	}
	return s.release(true)
}

func (s *Steering) release(toNew bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	unlock, err := s.objs.Lock()
	if err != nil {
		return err
	}
	var errs []error
	for _, g := range s.groups {
		errs = append(errs, s.releaseGroup(g, toNew))
	}
	s.groups = nil
	unlock()
	return errors.Join(errs...)
}

// releaseGroup gives the group back to one side: the new one (Finish) or the old one (Undo). Only what this
// handoff added goes: the dropped side's members and slots. When only the target generation is left in the group,
// the selector is detached and the group freed; otherwise the selector stays for the other generations' drains (an
// old listener that closes needs it to migrate its queue).
func (s *Steering) releaseGroup(g *group, toNew bool) error {
	last := releaseLease(leaseDir(s.objs, g.id))
	var gv loader.Group
	if err := s.objs.Groups.Lookup(g.id, &gv); err != nil {
		return fmt.Errorf("read group %d: %w", g.id, err)
	}
	keep, drop, dropped := g.oldGen, g.newGen, g.pair.New
	if toNew {
		keep, drop, dropped = g.newGen, g.oldGen, g.pair.Old
	}
	var errs []error
	if gv.TargetGen == drop {
		// Only when this handoff's dropped side is the target: a later generation's handoff (B->C while A->B
		// drains) may own the target now.
		gv.TargetGen = keep
	}
	gv.ProbePort = 0
	others := false
	var theirs []uint32 // slots of other handoffs' members, freed with the group
	for i := range members(&gv) {
		m := &gv.Members[i]
		switch {
		case m.Gen == 0:
		case m.Gen == drop:
			m.Gen = 0
		case m.Gen != gv.TargetGen:
			others = true
		}
	}
	if !others {
		if err := s.detach(g, toNew); err != nil {
			errs = append(errs, err)
		}
		dropped = append(slices.Clone(g.pair.Old), g.pair.New...)
		// The members left are a later generation's (A->B ending after B->C): their slots go with the group.
		for _, m := range members(&gv) {
			if m.Gen != 0 {
				theirs = append(theirs, m.Slot)
			}
		}
		gv = loader.Group{}
	}
	if err := s.objs.Groups.Put(g.id, gv); err != nil {
		errs = append(errs, fmt.Errorf("write group %d: %w", g.id, err))
	}
	for _, l := range dropped {
		if s.inArray(g, []*Listener{l}) {
			slot := g.slots[l.Cookie]
			if err := s.objs.Sockets.Delete(slot); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("clear slot %d: %w", slot, err))
			}
		}
	}
	for _, slot := range theirs {
		if err := s.objs.Sockets.Delete(slot); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("clear slot %d: %w", slot, err))
		}
	}
	if !others {
		if err := s.objs.GroupKeys.Put(g.id, loader.GroupKey{}); err != nil {
			errs = append(errs, fmt.Errorf("free group %d: %w", g.id, err))
		}
		if last {
			os.Remove(leaseDir(s.objs, g.id))
		}
	}
	return errors.Join(errs...)
}

// members is the used part of a group's member array.
func members(gv *loader.Group) []loader.Member {
	return gv.Members[:min(int(gv.NumMembers), loader.MaxMembers)]
}

// detach removes the selector from the group through any listener of it that is still open, preferring the side
// that keeps the group.
func (s *Steering) detach(g *group, toNew bool) error {
	order := append(append([]*Listener{}, g.pair.Old...), g.pair.New...)
	if toNew {
		order = append(append([]*Listener{}, g.pair.New...), g.pair.Old...)
	}
	for _, l := range order {
		if l.Holder == nil {
			continue // closed before this draind adopted the steering
		}
		fd, err := l.Copy()
		if err != nil {
			continue
		}
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
		unix.Close(fd)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("detach selector from %s: %w", l, err)
	}
	// No listener of this handoff is left. Either the group is gone with them (and the selector with it), or a later
	// generation's listeners serve it (A->B ending after B->C): the selector stays attached to them, and with the
	// group freed it selects nothing (the kernel chooses, as without it) until the next handoff replaces it.
	s.log.Info("selector left attached to a later generation's listeners; it no longer selects", "addr", g.pair.Addr, "group", g.id)
	return nil
}

// Superseded reports whether a later handoff took every group over from this one's new side (B->C while A->B
// drains): the target is neither side of this handoff. The new process may then exit without this handoff failing.
func (s *Steering) Superseded() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.groups) == 0 {
		return false
	}
	for _, g := range s.groups {
		var gv loader.Group
		if s.objs.Groups.Lookup(g.id, &gv) != nil || gv.TargetGen == g.oldGen || gv.TargetGen == g.newGen {
			return false
		}
	}
	return true
}

func ebpfCPUs() int {
	n, err := ebpf.PossibleCPU()
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// Pairs lists the pairs this handoff steers.
func (s *Steering) Pairs() []Pair {
	var out []Pair
	for _, g := range s.groups {
		out = append(out, g.pair)
	}
	return out
}

// GroupState is one group of a handoff's steering, as a draind process that takes the handoff over needs it.
type GroupState struct {
	ID     uint32      `json:"id"`
	Addr   string      `json:"addr"`
	OldGen uint32      `json:"old_gen"`
	NewGen uint32      `json:"new_gen"`
	Old    []SlotState `json:"old"` // the old side's listeners
	New    []SlotState `json:"new"` // the new side's
}

// SlotState is one listener of a group and its slot in the socket array.
type SlotState struct {
	Cookie uint64 `json:"cookie"`
	Slot   uint32 `json:"slot"`
}

// State describes the steering, for Adopt.
func (s *Steering) State() []GroupState {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []GroupState
	for _, g := range s.groups {
		gs := GroupState{ID: g.id, Addr: g.pair.Addr.String(), OldGen: g.oldGen, NewGen: g.newGen}
		for _, l := range g.pair.Old {
			gs.Old = append(gs.Old, SlotState{Cookie: l.Cookie, Slot: g.slots[l.Cookie]})
		}
		for _, l := range g.pair.New {
			gs.New = append(gs.New, SlotState{Cookie: l.Cookie, Slot: g.slots[l.Cookie]})
		}
		out = append(out, gs)
	}
	return out
}

// Flipped reports whether every group of the steering has the new side as its target, and whether any has.
func (s *Steering) Flipped() (all, any bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	all = true
	for _, g := range s.groups {
		var gv loader.Group
		if err := s.objs.Groups.Lookup(g.id, &gv); err != nil {
			return false, false, fmt.Errorf("read group %d: %w", g.id, err)
		}
		on := gv.TargetGen == g.newGen
		all, any = all && on, any || on
	}
	return all, any, nil
}

// Adopt takes over the steering described by states, left in the kernel by a draind process that is gone (or that
// handed it over), without changing it. old and new are the two sides as discovered now (nil: that process is gone);
// listeners that are gone are kept as closed ones, but the groups must still exist with the new generation in them.
func Adopt(objs *loader.Objects, states []GroupState, old, new *Side, opts Options) (_ *Steering, err error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Steering{objs: objs, log: opts.Logger}
	defer func() {
		if err != nil {
			for _, g := range s.groups {
				releaseLease(leaseDir(objs, g.id))
			}
			s.groups = nil
		}
	}()
	unlock, err := objs.Lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	byCookie := map[uint64]*Listener{}
	for _, side := range []*Side{old, new} {
		if side == nil {
			continue
		}
		for _, l := range side.Listeners {
			byCookie[l.Cookie] = l
		}
	}
	for _, st := range states {
		addr, err := netip.ParseAddrPort(st.Addr)
		if err != nil {
			return nil, fmt.Errorf("adopt group %d: %w", st.ID, err)
		}
		if st.ID >= loader.MaxGroups {
			return nil, fmt.Errorf("adopt group %d: no such group", st.ID)
		}
		var key loader.GroupKey
		var gv loader.Group
		if err := objs.GroupKeys.Lookup(st.ID, &key); err != nil {
			return nil, fmt.Errorf("adopt group %d: %w", st.ID, err)
		}
		if err := objs.Groups.Lookup(st.ID, &gv); err != nil {
			return nil, fmt.Errorf("adopt group %d: %w", st.ID, err)
		}
		if key.NetnsCookie == 0 || key.Port != addr.Port() {
			return nil, fmt.Errorf("adopt group %d (%s): the group was freed", st.ID, addr)
		}
		hasGen := func(gen uint32) bool {
			for _, m := range members(&gv) {
				if m.Gen == gen {
					return true
				}
			}
			return false
		}
		if !hasGen(st.NewGen) {
			return nil, fmt.Errorf("adopt group %d (%s): the new side is no longer a member", st.ID, addr)
		}
		if err := takeLease(leaseDir(objs, st.ID), st.ID); err != nil {
			return nil, err
		}
		g := &group{id: st.ID, pair: Pair{Addr: addr}, oldGen: st.OldGen, newGen: st.NewGen, slots: map[uint64]uint32{}}
		s.groups = append(s.groups, g)
		for _, side := range []struct {
			refs []SlotState
			out  *[]*Listener
			old  bool
		}{{st.Old, &g.pair.Old, true}, {st.New, &g.pair.New, false}} {
			for _, r := range side.refs {
				g.slots[r.Cookie] = r.Slot
				l := byCookie[r.Cookie]
				if l == nil {
					// A closed listener (an old process may close its own; a new one that died closed all of
					// them): keep its cookie for the slot bookkeeping; the caller decides what its absence means.
					l = &Listener{Cookie: r.Cookie, Addr: addr}
				}
				*side.out = append(*side.out, l)
			}
		}
	}
	return s, nil
}
