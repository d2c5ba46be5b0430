//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Prepared mode: servers that never set SO_REUSEPORT (Go, Python, Node defaults). draind attaches these programs to
// the service's cgroup (v2) so that a new version started in it can bind the port the old one holds:
//
// - draind_bind4/draind_bind6 (cgroup/bind4, cgroup/bind6) give a TCP bind to a prepared (network namespace, port)
//   SO_REUSEPORT, as if the server had asked for it. draind sets it on the old process's listeners itself (through
//   its pidfd_getfd copies), so old and new form one reuseport group, which draind then steers as in the default
//   mode.
//
// - draind_guard4/draind_guard6 (cgroup/bind4, cgroup/bind6, attached to the root cgroup) refuse binds to a prepared
//   (network namespace, port) from processes outside the service's cgroup: once the old listener has SO_REUSEPORT,
//   any process of the same user could otherwise join its reuseport group.
// - draind_no_mptcp (cgroup/sock_create) refuses MPTCP sockets in a prepared network namespace: an MPTCP listener
//   can be neither put in a socket map nor carry the selector. Go >= 1.24 listens with MPTCP by default and falls
//   back to plain TCP when the MPTCP socket cannot be created, so a new Go version started in the cgroup listens
//   with plain TCP.
//
// Binds to other ports, other namespaces and other socket types are left alone.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// From <sys/socket.h> (not includable for the BPF target).
#define SOL_SOCKET 1
#define SO_REUSEPORT 15
#define SOCK_STREAM 1
#define IPPROTO_MPTCP_ 262 // linux/in.h names it IPPROTO_MPTCP in an enum on recent headers only

// prepared: the (network namespace cookie, port) pairs whose TCP binds get SO_REUSEPORT. Value: the service's cgroup,
// the only one whose processes may bind the pair (see draind_guard4/6).
struct prepared_key {
	__u64 netns; // bpf_get_netns_cookie of the binding socket
	__u16 port;  // host byte order
	__u16 pad[3];
};

struct service {
	__u64 cgroup; // cgroup v2 id (the directory's inode number)
	__u32 level;  // its depth below the root (the root is 0)
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct prepared_key);
	__type(value, struct service);
} prepared SEC(".maps");

// prepared_netns: the network namespaces (cookies) with prepared ports, where MPTCP sockets are refused.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} prepared_netns SEC(".maps");

// Keep the key and value types in BTF for bpf2go.
const struct prepared_key *unused_prepared_key __attribute__((unused));
const struct service *unused_service __attribute__((unused));

static __always_inline int on_bind(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0)
		return 1;
	struct prepared_key k = {
		.netns = bpf_get_netns_cookie(ctx),
		.port = bpf_ntohs(ctx->user_port),
	};
	if (!bpf_map_lookup_elem(&prepared, &k))
		return 1;
	int one = 1;
	bpf_setsockopt(ctx, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	return 1; // allow the bind either way: a failed setsockopt shows as the bind's own EADDRINUSE
}

SEC("cgroup/bind4")
int draind_bind4(struct bpf_sock_addr *ctx)
{
	return on_bind(ctx);
}

SEC("cgroup/bind6")
int draind_bind6(struct bpf_sock_addr *ctx)
{
	return on_bind(ctx);
}

static __always_inline int guard(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	struct prepared_key k = {
		.netns = bpf_get_netns_cookie(ctx),
		.port = bpf_ntohs(ctx->user_port),
	};
	struct service *svc = bpf_map_lookup_elem(&prepared, &k);
	if (!svc)
		return 1;
	if (bpf_get_current_ancestor_cgroup_id(svc->level) == svc->cgroup)
		return 1;
	return 0; // EPERM: outside the service's cgroup
}

SEC("cgroup/bind4")
int draind_guard4(struct bpf_sock_addr *ctx)
{
	return guard(ctx);
}

SEC("cgroup/bind6")
int draind_guard6(struct bpf_sock_addr *ctx)
{
	return guard(ctx);
}

SEC("cgroup/sock_create")
int draind_no_mptcp(struct bpf_sock *ctx)
{
	if (ctx->protocol != IPPROTO_MPTCP_)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	if (bpf_map_lookup_elem(&prepared_netns, &netns))
		return 0; // EPERM: Go falls back to plain TCP
	return 1;
}
