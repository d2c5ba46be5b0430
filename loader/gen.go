package loader

//go:generate go tool bpf2go -tags linux -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type group -type member -type counters -type group_key selector ../bpf/selector.bpf.c
//go:generate go tool bpf2go -tags linux -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type prepared_key -type service prepare ../bpf/prepare.bpf.c
//go:generate go tool bpf2go -tags linux -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type sock_rec -type task_rec -type event -type mark -type port_key -type mark_count -type held_rec counter ../bpf/counter.bpf.c
