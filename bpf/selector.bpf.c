//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// The draind selector: an SK_REUSEPORT program (attach type SELECT_OR_MIGRATE) that decides which listener of a
// reuseport group gets each new connection, and where connections queued on a closing listener migrate to.
//
// One copy of this program is loaded per reuseport group draind steers; the copy knows its group through the
// constant group_id (set at load time). All copies share the maps below, which stay pinned under draind's bpffs
// directory so steering survives draind exiting.

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Upper bounds. Userspace (loader/) mirrors them; keep in sync.
#define MAX_SOCKETS 1024 // slots in the socket array, shared by all groups
#define MAX_GROUPS 256   // reuseport groups draind can steer at once
#define MAX_MEMBERS 32   // listeners draind put in one group (all generations together)

// sockets: REUSEPORT_SOCKARRAY of the listeners draind took with pidfd_getfd. Key: slot number, value: socket
// (userspace writes an fd, reads back the socket cookie). A closing listener leaves this map by itself, so a
// lookup of a slot whose listener is gone fails and the selector moves on.
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u32);
	__type(value, __u64);
} sockets SEC(".maps");

// A listener draind put in a group: which slot of `sockets` holds it and which generation (handoff side) it
// belongs to. Generation 0 marks an unused entry.
struct member {
	__u32 slot;
	__u32 gen;
};

// The steering state of one group. Userspace flips `target_gen` by rewriting the value with only that field
// changed; generations stay below 256, so a flip changes a single byte and a concurrent reader sees either the old
// or the new target, never a mix. Members are added into free entries (gen 0) and removed by setting gen to 0,
// never moved, so a reader racing an update sees at worst an entry it skips.
struct group {
	__u32 target_gen;  // generation that receives new and migrating connections
	__u32 num_members; // valid entries in members[]
	__u32 probe_port;  // if not 0: a SYN from this source port (draind's readiness probe) goes to probe_gen
	__u32 probe_gen;   // generation the readiness probe must reach (the new side, before the flip)
	struct member members[MAX_MEMBERS];
};

// groups: ARRAY indexed by group id (the constant group_id of each program copy).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_GROUPS);
	__type(key, __u32);
	__type(value, struct group);
} groups SEC(".maps");

// Which reuseport group a group id stands for. Written and read by userspace only (draind finds the group of a
// listener it meets again, e.g. after a restart); the selector never reads it.
struct group_key {
	__u64 netns_cookie; // SO_NETNS_COOKIE of the listeners; 0 marks a free group id
	__u8 addr[16];      // bound address (IPv4 as IPv4-mapped IPv6)
	__u16 port;         // bound port, host byte order
	__u16 family;       // AF_INET or AF_INET6
	__u32 pad;
};

// group_keys: ARRAY indexed by group id.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_GROUPS);
	__type(key, __u32);
	__type(value, struct group_key);
} group_keys SEC(".maps");

// Decision counters, per CPU and per group. Userspace sums the CPUs.
struct counters {
	__u64 selected; // a listener of the target generation took the connection
	__u64 fallback; // no target listener was usable; another of draind's listeners (the other side) took it
	__u64 failed;   // none of draind's listeners could take it; left to the kernel's hash (only when none is alive)
	__u64 migrated; // the connection was migrating off a closing listener (counted in addition to the above)
	__u64 probed;   // draind's own readiness probe, sent to the new side before the flip
};

// stats: PERCPU_ARRAY indexed by group id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_GROUPS);
	__type(key, __u32);
	__type(value, struct counters);
} stats SEC(".maps");

// Set by the loader before loading each copy.
volatile const __u32 group_id = 0;

// A pick in progress: what pick_one needs, on pick's stack.
struct pick_state {
	struct sk_reuseport_md *ctx;
	struct group *g;
	__u32 gen;
	__u32 same;
	__u32 start;
	__u32 n;
	int found;
};

// pick_one tries member (start + i) % n: bpf_loop's callback, which stops the loop by returning 1. In bpf_loop
// (Linux 5.17) the verifier checks the loop's body a few times per call site, where an open-coded loop was checked
// once per iteration: 1,115 instructions processed instead of 24,612, and BenchmarkLoadSelector (loader/) 1.4 ms
// instead of 8.2 ms, paid by the first handoff of each group. Its run time per connection did not grow (scenario 5).
static long pick_one(__u64 i, void *data)
{
	struct pick_state *p = data;
	__u32 idx = (p->start + (__u32)i) % p->n;
	if (idx >= MAX_MEMBERS)
		return 1;
	struct member *m = &p->g->members[idx];
	if (m->gen == 0)
		return 0;
	if ((m->gen == p->gen) != (p->same != 0))
		return 0;
	__u32 slot = m->slot;
	// Fails with ENOENT when the slot is empty (listener closed) and with EBADFD when the socket is not in this
	// group: both mean "try the next one".
	if (bpf_sk_select_reuseport(p->ctx, &sockets, &slot, 0) == 0) {
		p->found = 1;
		return 1;
	}
	return 0;
}

// pick tries the members of generation gen (same=1) or of every other generation (same=0), starting at the one the
// connection's hash points to, and selects the first whose socket is still in the map.
static __always_inline int pick(struct sk_reuseport_md *ctx, struct group *g, __u32 gen, int same)
{
	__u32 n = g->num_members;
	if (n > MAX_MEMBERS)
		n = MAX_MEMBERS;
	if (n == 0)
		return 0;
	struct pick_state p = {.ctx = ctx, .g = g, .gen = gen, .same = same, .start = ctx->hash % n, .n = n};
	bpf_loop(n, pick_one, &p, 0);
	return p.found;
}

SEC("sk_reuseport/migrate")
int draind_select(struct sk_reuseport_md *ctx)
{
	__u32 key = group_id;
	struct group *g = bpf_map_lookup_elem(&groups, &key);
	struct counters *c = bpf_map_lookup_elem(&stats, &key);
	if (!g || !c)
		return SK_PASS;

	if (ctx->migrating_sk) {
		c->migrated++;
	} else if (g->probe_port) {
		// The SYN's transport header starts at offset 0: its first two bytes are the source port.
		__u16 sport = 0;
		if (bpf_skb_load_bytes(ctx, 0, &sport, sizeof(sport)) == 0 && bpf_ntohs(sport) == g->probe_port &&
		    pick(ctx, g, g->probe_gen, 1)) {
			c->probed++;
			return SK_PASS;
		}
	}

	__u32 target = g->target_gen;
	if (pick(ctx, g, target, 1)) {
		c->selected++;
		return SK_PASS;
	}
	if (pick(ctx, g, target, 0)) {
		c->fallback++;
		return SK_PASS;
	}
	// None of draind's listeners is alive in this group: let the kernel choose among whatever listens.
	c->failed++;
	return SK_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
