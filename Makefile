GO ?= go
BIN ?= bin/draind

.PHONY: build generate test demo check-generate lint bench-count bench bench-long fuzz

build:
	$(GO) build -o $(BIN) ./cmd/draind

# Regenerates the committed bpf2go output (loader/*_bpfel.go, loader/*_bpfel.o). Needs clang and libbpf-dev.
generate:
	$(GO) generate ./loader/...

# Fails when the committed bpf2go output differs from what the C sources give.
check-generate: generate
	git diff --exit-code -- loader/

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

# The test command (run as root: the tests steer real sockets with BPF in network namespaces they create).
# Packages run one at a time: their end-to-end tests each start servers, load and handoffs on a 2-core machine.
test: lint
	$(GO) test -p 1 -count=1 -timeout 30m ./...
	$(MAKE) fuzz FUZZTIME=30s

# The API request decoder under the fuzzer (the test command runs it for 30s). Each new input is minimized for at
# most 2s: with Go's default of 60s, minimizing took all of a 30s run after its first 3s (19,168 inputs tried in 15s
# against 224,878 with 2s).
FUZZTIME ?= 2m
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecodeHandoff -fuzztime $(FUZZTIME) -fuzzminimizetime 2s ./api

demo: build
	./$(BIN) demo

# The counting benchmarks (root): reaction time of the signal after the last close, kernel events vs 1s polling
# (100 handoffs each); one old server holding 100,000 connections draining to zero; the two snapshot kinds at 19,000
# sockets.
bench-count:
	$(GO) test -run '^$$' -bench Reaction -benchtime 100x -timeout 30m ./cmd/draind
	$(GO) test -run '^$$' -bench Scale100k -benchtime 1x -timeout 30m ./cmd/draind
	$(GO) test -run '^$$' -bench Snapshot -benchtime 20x -timeout 30m ./drain

# The comparison bench (root): draind against stop-then-start, SO_REUSEPORT + SIGTERM, tcp_migrate_req and a
# tableflip server, in private network namespaces with load from a separate process. Writes bench/results/results.md,
# results.json and SVG plots. `bench` takes a few minutes on 2 cores; `bench-long` about 55 minutes.
bench:
	$(GO) run ./bench/cmd/drainbench --out bench/results

bench-long:
	$(GO) run ./bench/cmd/drainbench --long --out bench/results
