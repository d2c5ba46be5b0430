//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// The draind counter: exact snapshots of what a process tree holds on some ports, and kernel events that say when
// such a snapshot may have changed.
//
// - draind_sockets (iter/task_file), the full snapshot, walks every task's file table. Userspace marks some
//   processes (the roots of the trees it counts, and the subtrees it cuts out of them); for a task with a marked
//   ancestor (itself included) the iterator emits one record per TCP socket on a watched (netns, port): the
//   socket's inode, state, accept queue and the marks on the task's way up, nearest first, from which userspace
//   decides which counts the socket belongs to.
//   When one of those marks is "tracked" (the old side of a handoff, whose drain draind waits for) it also tags the
//   socket (socket local storage `sock_marks`), so that the tracepoint below can tell the socket's later state
//   changes from the others'.
// - draind_state (tp_btf/inet_sock_set_state) fires on every TCP state change; for a tagged socket it counts the
//   change for its mark and sends a wakeup through the ring buffer.
//   It also wakes a tracked tree that starts listening on a watched port (an untagged listener entering LISTEN, in
//   the context of its listen(2) call): the new listener must be tagged, so that its connections are born tagged.
//   A connection accepted from a listener's queue where it waited since before the listener's tagging is not tagged
//   either: userspace takes full snapshots until two in a row (since the last listener opened or closed) saw nothing
//   queued on the tree's listeners.
//   This event program is attached only while some tree is tracked (loader.Counter.WatchEvents): it runs on every TCP
//   state change of the host while attached.
//
// - draind_held (iter/tcp, in one network namespace) lists the tagged connections that a socket file still holds.
//   With the tag cloned from a tagged listener to the connections born on it, this finds the connections a tree
//   holds where no fd table shows them (in flight over SCM_RIGHTS, io_uring fixed files) before draind signals it.
//   It walks the whole established hash table, so draind runs it only while `mark_live` says that some connection
//   with the tree's tag may still be held: the snapshot and the tracepoint keep that count per mark as they tag
//   connections, as connections are born tagged, and as their files are released.
// - draind_tasks (iter/task), the fast snapshot, visits every task once; for a task with a marked ancestor it walks
//   its fd table itself (bpf_loop) and writes per-port sums of its sockets instead of one record per socket. It
//   does not tag, so userspace uses it between full snapshots, when no new socket can have come to the tree. It
//   takes no reference on each file and skips the files of unmarked processes without looking at them, which
//   makes it two to three times faster than the full snapshot at 100,000 sockets.
//
// Fields are read with direct (CO-RE relocated, fault-safe) loads rather than bpf_probe_read_kernel: a snapshot of
// 100,000 sockets is dominated by cache misses on the sockets, and a helper call per field would add to them.
//
// Userspace reads the counts in `mark_events` to know how far a count can have moved since its last snapshot;
// the ring buffer only wakes it up, so a lost ring buffer record delays a wakeup but never falsifies a count.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "kernel.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// Upper bounds. Userspace (loader/, drain/) mirrors them; keep in sync.
#define MAX_MARKS 4096      // mark ids are 1..MAX_MARKS-1
#define MAX_PORTS 4096      // watched (netns, port) pairs
#define MAX_DEPTH 32        // ancestors looked at above a task
#define PATH_MARKS 6        // marks reported per task, nearest first
#define MAX_SLOTS 32        // watched (netns, port) pairs the fast snapshot sums separately

// TCP states (include/net/tcp_states.h).
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10

#define AF_INET 2
#define AF_INET6 10

// Flags of a mark.
#define MARK_TRACK 1 // tag the sockets below it and count their events
#define MARK_CUT 2   // its subtree is cut out of the trees above: a tracked mark above it does not tag its sockets

// marks: processes userspace marked, keyed by their pidfs inode number (fstat of a pidfd), which is unique, never
// reused and the same in every PID namespace.
struct mark {
	__u32 id;
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_MARKS);
	__type(key, __u64);
	__type(value, struct mark);
} marks SEC(".maps");

// ports: the (network namespace inode, local port) pairs whose sockets are counted. Value: the pair's slot, a small
// number userspace gives each pair (the fast snapshot sums per slot; pairs with a slot >= MAX_SLOTS need the full
// snapshot).
struct port_key {
	__u32 netns;
	__u16 port; // host byte order
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, struct port_key);
	__type(value, __u32);
} ports SEC(".maps");

// sock_marks: the tag of a socket held under a tracked mark: the id of the nearest tracked mark above the process
// that held it at the last snapshot (0: none any more). Socket local storage: found in O(1) from the socket, and
// freed with it. BPF_F_CLONE: a connection that arrives on a tagged listener is born with the listener's tag, so the
// tree's connections are tagged even when no fd table ever holds them (accepted through io_uring as a fixed file).
struct sock_mark {
	__u32 mark;
	__u32 live; // 1: counted in mark_live[mark] (see there); mark and live change together (one 64-bit word)
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sock_mark);
} sock_marks SEC(".maps");

// mark_events: per mark id, how many events may have changed the counts under it (never reset: userspace takes
// differences).
//   changes: state changes of tagged sockets that may mean their fd was closed; each lowers a count by at most one.
//   resnaps: events after which only a new snapshot tells the count (a listener opening or closing).
struct mark_count {
	__u64 changes;
	__u64 resnaps;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_MARKS);
	__type(key, __u32);
	__type(value, struct mark_count);
} mark_events SEC(".maps");

// mark_live: per mark id, how many connections tagged with it may still be held by a socket file: each counted
// connection has `live` set in its tag. A connection is counted from its tagging by a snapshot (any state but LISTEN
// and CLOSE) or from its birth on a tagged listener (queued: it may be accepted where no fd table shows it) until
// its file is released (close(2), the last reference dropped: it is no longer held) or it reaches CLOSE, or until a
// snapshot retags it. A count is raised before its connection is flagged and lowered after it is unflagged, and the
// flag changes with compare-and-swap, so a count is never below the number of connections that draind_held would
// report for its mark: zero means there is nothing to look for. (It can stay above: a reset that races with a
// snapshot's tagging leaves a connection counted; draind then walks, as it would without the count.) Never reset:
// connections keep their tag when their mark id is freed, and are counted under it until they go.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_MARKS);
	__type(key, __u32);
	__type(value, __s64);
} mark_live SEC(".maps");

// events: wakeups for userspace, one record per counted event.
struct event {
	__u32 mark;
	__u16 port;
	__u8 kind; // EVENT_*
	__u8 oldstate;
	__u8 newstate;
	__u8 pad[3];
};

#define EVENT_STATE 1    // a tagged socket may have been closed
#define EVENT_LISTENER 2 // a tagged listener closed
#define EVENT_LISTEN 3   // a process under a tracked mark started listening on a watched port

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

// sock_rec: what the iterator writes for each counted socket.
struct sock_rec {
	__u64 ino;               // socket inode, as in /proc/PID/fd and sock_diag
	__u16 marks[PATH_MARKS]; // mark ids from the holding process up, nearest first; 0 ends the list
	__u32 queue;             // accept queue length (listeners; 0 otherwise)
	__u32 netns;             // network namespace inode
	__u16 port;              // local port, host byte order
	__u8 state;              // TCP state
	__u8 family;             // AF_INET or AF_INET6
};

// path: the marks above a task.
struct path {
	__u16 marks[PATH_MARKS];
	__u32 tracked; // id of the nearest tracked mark, 0 if none
};

// task_rec: what the fast snapshot writes. For each marked task and slot, one REC_SUM record with the sums over the
// sockets only this fd holds (their file has a single reference: they cannot be counted twice). A socket whose file
// has several references (dup'd, inherited, a shared listener) gets a REC_SHARED record of its own, which userspace
// counts once per distinct socket.
struct task_rec {
	__u64 sock;              // REC_SHARED: the socket's address, the key for counting it once; REC_SUM: 0
	__u16 marks[PATH_MARKS]; // as in sock_rec
	__u16 slot;              // the (netns, port) pair's slot
	__u8 kind;               // REC_*
	__u8 state;              // REC_SHARED: TCP state
	__u32 conns;             // REC_SUM: non-listening sockets in a state ss lists
	__u32 queued;            // accept queue lengths of listeners
};

#define REC_SUM 1
#define REC_SHARED 2

// held_rec: what draind_held writes for each tagged connection that some file still holds.
struct held_rec {
	__u64 sock; // the socket's address
	__u32 mark; // its tag
	__u16 port; // local port, host byte order
	__u8 state; // TCP state
	__u8 pad;
};

// Keep the record types in BTF for bpf2go (they are only used through sizeof otherwise).
const struct event *unused_event __attribute__((unused));
const struct sock_rec *unused_sock_rec __attribute__((unused));
const struct task_rec *unused_task_rec __attribute__((unused));
const struct held_rec *unused_held_rec __attribute__((unused));

// Per-run cache of the current task's path: the iterator visits a task's files one after another. Userspace runs
// one iteration at a time, so a global is enough.
__u64 cached_task;
struct path cached_path;

// run_id: set by userspace before each fast snapshot, for `walked`.
volatile __u64 run_id;

// walked: the fd tables shared between processes (files_struct->count > 1) that the current fast snapshot already
// walked (value: its run_id), so that processes created with CLONE_FILES are not counted twice.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} walked SEC(".maps");

// up is the state of a walk up the process tree.
struct up {
	struct task_struct *task;
	struct path *p;
	__u32 n;
	__u32 cut; // a MARK_CUT mark was passed: no tracked mark above it counts
};

static long up_one(__u64 i, void *data)
{
	struct up *u = data;
	struct task_struct *task = u->task;
	if (!task)
		return 1;
	__u64 ino = task->group_leader->thread_pid->ino;
	struct mark *m = bpf_map_lookup_elem(&marks, &ino);
	if (m) {
		__u32 n = u->n;
		if (n < PATH_MARKS) {
			u->p->marks[n] = m->id;
			u->n = n + 1;
		}
		if (!u->p->tracked && !u->cut && (m->flags & MARK_TRACK))
			u->p->tracked = m->id;
		if (m->flags & MARK_CUT)
			u->cut = 1;
	}
	struct task_struct *parent = task->real_parent;
	if (parent == task || task->tgid <= 1)
		return 1;
	u->task = parent;
	return 0;
}

// path_of fills p with the marks found walking up from task (itself included). bpf_loop keeps the verifier from
// exploring every iteration (and every way the marks can fall) separately.
static __always_inline void path_of(struct task_struct *task, struct path *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	struct up u = {.task = task, .p = p};
	bpf_loop(MAX_DEPTH, up_one, &u, 0);
}

static __always_inline void notify(__u32 mark, __u8 kind, __u16 port, __u8 oldstate, __u8 newstate)
{
	struct mark_count *we = bpf_map_lookup_elem(&mark_events, &mark);
	if (!we)
		return;
	if (kind == EVENT_STATE)
		__sync_fetch_and_add(&we->changes, 1);
	else
		__sync_fetch_and_add(&we->resnaps, 1);
	struct event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return; // userspace still sees the count above at its next wakeup or reconciliation
	ev->mark = mark;
	ev->port = port;
	ev->kind = kind;
	ev->oldstate = oldstate;
	ev->newstate = newstate;
	ev->pad[0] = ev->pad[1] = ev->pad[2] = 0;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void add_live(__u32 mark, __s64 delta)
{
	__s64 *n = bpf_map_lookup_elem(&mark_live, &mark);
	if (n)
		__sync_fetch_and_add(n, delta);
}

// retag sets a socket's tag to mark, counted in mark_live or not (live), and moves the counts to match (see
// mark_live). Compare-and-swap, since the tracepoint may change the same tag on another CPU (once per state change);
// after a few lost races in a row it gives up, leaving the tag as it is and the counts too high, never too low.
static __always_inline void retag(struct sock_mark *t, __u32 mark, __u32 live)
{
	__u64 *w = (__u64 *)t;
	__u64 want = (__u64)live << 32 | mark;
	for (int i = 0; i < 4; i++) {
		__u64 old = *(volatile __u64 *)w;
		if (old == want)
			return;
		if (live)
			add_live(mark, 1);
		if (__sync_val_compare_and_swap(w, old, want) == old) {
			if (old >> 32)
				add_live((__u32)old, -1);
			return;
		}
		if (live && i < 3)
			add_live(mark, -1); // try again (the last time, keep the count: too high is safe)
	}
}

// released reports whether sk's socket file is being released (its last reference is gone: close(2) of its last
// fd, or the exit of its last holder): from here on no file holds the connection.
static __always_inline int released(struct sock *sk)
{
	struct socket *so = sk->sk_socket;
	if (!so)
		return 0; // not accepted yet, or orphaned already
	struct file *f = so->file;
	return f && f->f_ref.refcnt.counter < 0; // FILE_REF_DEAD and the other released values are negative
}

// tcp_port_key fills pk with sk's (netns, local port) and reports whether sk is a TCP socket over IPv4 or IPv6.
static __always_inline int tcp_port_key(struct sock *sk, struct port_key *pk)
{
	__u16 family = sk->__sk_common.skc_family;
	if (sk->sk_protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6))
		return 0;
	pk->netns = sk->__sk_common.skc_net.net->ns.inum;
	pk->port = sk->__sk_common.skc_num;
	pk->pad = 0;
	return 1;
}

SEC("iter/task_file")
int draind_sockets(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;

	if (!task || !file)
		return 0;
	if (ctx->meta->seq_num == 0 || cached_task != (__u64)task) {
		cached_task = (__u64)task;
		path_of(task, &cached_path);
	}
	if (!cached_path.marks[0])
		return 0;

	struct socket *sock = bpf_sock_from_file(file);
	if (!sock)
		return 0;
	struct sock *sk = sock->sk;
	struct port_key pk;
	if (!sk || !tcp_port_key(sk, &pk) || !bpf_map_lookup_elem(&ports, &pk))
		return 0;
	__u16 family = sk->__sk_common.skc_family;

	struct sock_rec rec = {
		.ino = file->f_inode->i_ino,
		.netns = pk.netns,
		.port = pk.port,
		.state = sk->__sk_common.skc_state,
		.family = family,
	};
	__builtin_memcpy(rec.marks, cached_path.marks, sizeof(rec.marks));
	if (rec.state == TCP_LISTEN)
		rec.queue = sk->sk_ack_backlog;
	bpf_seq_write(seq, &rec, sizeof(rec));

	if (cached_path.tracked && rec.state != TCP_CLOSE) {
		// The file is held (the iterator holds a reference): a connection is live until released.
		struct sock_mark *t = bpf_sk_storage_get(&sock_marks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (t)
			retag(t, cached_path.tracked, rec.state != TCP_LISTEN);
	} else if (!cached_path.tracked) {
		// Held outside every tracked tree (the new side took it, e.g. a queued connection that migrated to its
		// listener): no longer the tracked tree's, whatever tag it was born with.
		struct sock_mark *t = bpf_sk_storage_get(&sock_marks, sk, 0, 0);
		if (t)
			retag(t, 0, 0);
	}
	return 0;
}

// on_listen wakes the tracked tree of the current task (the one calling listen(2)) when sk, an untagged socket that
// starts listening, is on a watched port. The port is checked first: it is one lookup, where the walk up the process
// tree is one per ancestor.
static __always_inline void on_listen(struct sock *sk)
{
	struct port_key pk;
	if (!tcp_port_key(sk, &pk) || !bpf_map_lookup_elem(&ports, &pk))
		return;
	struct path p;
	path_of(bpf_get_current_task_btf(), &p);
	if (p.tracked)
		notify(p.tracked, EVENT_LISTEN, pk.port, TCP_CLOSE, TCP_LISTEN);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(draind_state, struct sock *sk, int oldstate, int newstate)
{
	struct sock_mark *t = bpf_sk_storage_get(&sock_marks, sk, 0, 0);
	__u32 mark = t ? t->mark : 0;
	if (!mark) {
		if (newstate == TCP_LISTEN)
			on_listen(sk);
		return 0;
	}
	if (oldstate == TCP_LISTEN && newstate != TCP_CLOSE) {
		// A connection born on a tagged listener (its state copied from the listener's), tag included: count it,
		// whatever flag it was born with. Nobody else sees it yet.
		add_live(mark, 1);
		t->live = 1;
	} else if (t->live) {
		if (newstate == TCP_CLOSE || released(sk))
			retag(t, mark, 0);
	} else if (newstate != TCP_CLOSE && newstate != TCP_LISTEN && sk->sk_socket && !released(sk)) {
		retag(t, mark, 1); // a closed socket connecting again
	}
	if (oldstate == TCP_LISTEN) {
		notify(mark, EVENT_LISTENER, sk->__sk_common.skc_num, oldstate, newstate);
		return 0;
	}
	// No socket file: closed already (a later step of its teardown, counted when its fd was closed), or still in an
	// accept queue (counted in the listener's queue, which its changes do not alter).
	if (!sk->sk_socket)
		return 0;
	// A counted socket stops counting when its fd is closed or it is reset. close(2) moves it to FIN_WAIT1 (we close
	// first), LAST_ACK (the peer did) or CLOSE (unread data: reset); a reset moves it to CLOSE. Other changes (the
	// peer's FIN, ACKs of our FIN) cannot lower the count and wake nobody.
	// close(2) after shutdown(2) calls tcp_set_state with the state it already has (FIN_WAIT1/2, CLOSING, LAST_ACK).
	if (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK || newstate == TCP_CLOSE || oldstate == newstate)
		notify(mark, EVENT_STATE, sk->__sk_common.skc_num, oldstate, newstate);
	return 0;
}

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

// file_sock returns the socket of file fp (read through bpf_rdonly_cast), or NULL if fp is not a socket's file. A
// socket's file points to its struct socket, which points back to the file (no need to read f_op, whose value,
// socket_file_ops, is not in kallsyms).
static __always_inline struct sock *file_sock(struct file *fp)
{
	struct file *f = bpf_rdonly_cast(fp, bpf_core_type_id_kernel(struct file));
	struct socket *so = bpf_rdonly_cast(f->private_data, bpf_core_type_id_kernel(struct socket));
	if (so->file != fp)
		return NULL;
	struct sock *skp = so->sk;
	if (!skp)
		return NULL;
	return bpf_rdonly_cast(skp, bpf_core_type_id_kernel(struct sock));
}

// The task's flags (PF_*), read through a CO-RE flavor of task_struct (the ___ suffix is ignored when relocating).
struct task_struct___flags {
	unsigned int flags;
} __attribute__((preserve_access_index));

#define PF_KTHREAD 0x00200000

// walk is the state of one task's fd table walk.
struct walk {
	struct file **fds;
	struct seq_file *seq;
	__u16 marks[PATH_MARKS];
	__s32 err; // -1: a slot >= MAX_SLOTS; -2: the output of one task did not fit; -3: too many fds for bpf_loop
	__u32 conns[MAX_SLOTS];
	__u32 queued[MAX_SLOTS];
};

static long walk_fd(__u64 i, void *data)
{
	struct walk *w = data;
	struct file *fp;

	if (bpf_probe_read_kernel(&fp, sizeof(fp), &w->fds[i]) || !fp)
		return 0;
	struct sock *sk = file_sock(fp);
	if (!sk)
		return 0;
	struct file *f = bpf_rdonly_cast(fp, bpf_core_type_id_kernel(struct file));
	struct port_key pk;
	if (!tcp_port_key(sk, &pk))
		return 0;
	__u32 *slotp = bpf_map_lookup_elem(&ports, &pk);
	if (!slotp)
		return 0;
	__u32 slot = *slotp;
	if (slot >= MAX_SLOTS) {
		w->err = -1;
		return 1;
	}
	__u8 state = sk->__sk_common.skc_state;
	__u32 queued = state == TCP_LISTEN ? sk->sk_ack_backlog : 0;
	if (f->f_ref.refcnt.counter != 0) {
		struct task_rec r = {
			.sock = (__u64)sk,
			.slot = slot,
			.kind = REC_SHARED,
			.state = state,
			.queued = queued,
		};
		__builtin_memcpy(r.marks, w->marks, sizeof(r.marks));
		if (bpf_seq_write(w->seq, &r, sizeof(r))) {
			w->err = -2;
			return 1;
		}
		return 0;
	}
	if (state == TCP_LISTEN)
		w->queued[slot] += queued;
	else if (state != TCP_CLOSE)
		w->conns[slot]++;
	return 0;
}

// emit_slot writes the sums of slot i, if any.
static long emit_slot(__u64 i, void *data)
{
	struct walk *w = data;
	if (i >= MAX_SLOTS)
		return 1;
	__u32 conns = w->conns[i], queued = w->queued[i];
	if (!conns && !queued)
		return 0;
	struct task_rec r = {.slot = i, .kind = REC_SUM, .conns = conns, .queued = queued};
	__builtin_memcpy(r.marks, w->marks, sizeof(r.marks));
	bpf_seq_write(w->seq, &r, sizeof(r));
	return 0;
}

SEC("iter/task")
int draind_tasks(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct seq_file *seq = ctx->meta->seq;

	if (!task)
		return 0;
	// Threads share their leader's fd table (unless created without CLONE_FILES): walk it once. Kernel threads
	// (most tasks of an idle machine) hold no socket files: skip them before walking up their ancestry.
	if (task != task->group_leader && task->files == task->group_leader->files)
		return 0;
	if (((struct task_struct___flags *)task)->flags & PF_KTHREAD)
		return 0;
	struct path p;
	path_of(task, &p);
	if (!p.marks[0])
		return 0;
	struct files_struct *files = task->files;
	if (!files)
		return 0;
	if (files->count.counter > 1) {
		// Shared with other tasks: threads (skipped above) or processes created with CLONE_FILES. Walk it once.
		__u64 key = (__u64)files, run = run_id;
		__u64 *seen = bpf_map_lookup_elem(&walked, &key);
		if (seen && *seen == run)
			return 0;
		bpf_map_update_elem(&walked, &key, &run, BPF_ANY);
	}
	struct fdtable *fdt = files->fdt;
	struct walk w = {.fds = fdt->fd, .seq = seq};
	__builtin_memcpy(w.marks, p.marks, sizeof(w.marks));
	if (bpf_loop(fdt->max_fds, walk_fd, &w, 0) < 0)
		w.err = -3;
	if (w.err) {
		// Tell userspace to use the full snapshot: a record with slot 0xffff.
		struct task_rec r = {.slot = 0xffff, .kind = REC_SUM};
		bpf_seq_write(seq, &r, sizeof(r));
		return 0;
	}
	bpf_loop(MAX_SLOTS, emit_slot, &w, 0);
	return 0;
}

// draind_held (iter/tcp, run in one network namespace) reports the tagged connections that a socket file still
// holds (not closed, accepted: not waiting in a queue). Userspace runs it when a tracked tree's count reaches zero:
// a connection reported here is held where no fd table shows it (a file in flight in an SCM_RIGHTS message, or an
// io_uring fixed file), and the tree has not drained yet.
SEC("iter/tcp")
int draind_held(struct bpf_iter__tcp *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; // a request or time-wait socket: nobody holds it
	struct sock *sk = (struct sock *)tp;
	__u8 state = sk->__sk_common.skc_state;
	if (state == TCP_LISTEN || state == TCP_CLOSE || !sk->sk_socket)
		return 0;
	struct sock_mark *t = bpf_sk_storage_get(&sock_marks, tp, 0, 0);
	if (!t || !t->mark)
		return 0;
	struct port_key pk;
	if (!tcp_port_key(sk, &pk) || !bpf_map_lookup_elem(&ports, &pk))
		return 0;
	struct held_rec r = {.sock = (__u64)sk, .mark = t->mark, .port = pk.port, .state = state};
	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}
