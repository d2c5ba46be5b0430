// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// The few kernel types draind's tracing programs read, declared with preserve_access_index so that every field
// access is relocated (CO-RE) against the running kernel's BTF: only the names matter, not the layout here. This
// replaces a multi-megabyte vmlinux.h.

#pragma once

#include <linux/types.h>

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

struct sock_common {
	__u16 skc_num; // local port, host byte order
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
};

struct socket;

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
	__u32 sk_ack_backlog; // connections waiting in a listener's accept queue
	struct socket *sk_socket;
};

struct file;

struct socket {
	struct file *file;
	struct sock *sk;
};

struct inode {
	unsigned long i_ino;
};

typedef struct {
	__s64 counter;
} atomic64_t;

typedef struct {
	atomic64_t refcnt; // references - 1 (Linux >= 6.13)
} file_ref_t;

struct file {
	struct inode *f_inode;
	void *private_data;
	file_ref_t f_ref;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

typedef struct {
	int counter;
} atomic_t;

struct files_struct {
	atomic_t count;
	struct fdtable *fdt;
};

// struct pid: ino is the pidfs inode number of the process, which is what fstat(2) on a pidfd reports. Unique for the
// life of the system (never reused) and the same in every PID namespace.
struct pid {
	__u64 ino;
};

struct task_struct {
	int tgid;
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct pid *thread_pid;
	struct files_struct *files;
};

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__task {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
};

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

struct tcp_sock;

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
};

#pragma clang attribute pop
