// Command draind hands a TCP server's listening sockets over from an old process to a new one with zero failed
// connections, drains the old process and signals it.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/draind/draind/testenv"
)

// Exit codes (documented in README.md).
const (
	exitOK         = 0 // drained and signalled
	exitError      = 1 // internal error
	exitBadInput   = 2 // bad input or missing privilege; nothing was changed
	exitRolledBack = 3 // rolled back after steering started; the old process keeps serving and was not signalled
	exitTimedOut   = 4 // the drain deadline passed (the old process was signalled or killed by --on-timeout), or a --signal-at flip drain was interrupted
)

const usage = `usage: draind <command> [flags]

commands:
  handoff   hand the listeners of --from over to --to, drain --from, signal it (through the daemon if it runs)
  prepare   make a server without SO_REUSEPORT upgradable on the same port (before starting the new version)
  unprepare undo prepare (what is safe to undo) for a service's cgroup
  serve     run the daemon: a local API for handoffs, which survive the daemon's restarts
  status    list the daemon's handoffs in progress
  abort     roll back one of the daemon's handoffs (before its old process was signalled)
  demo      a real handoff under load between two built-in servers in a private network namespace

Run "draind <command> -h" for the flags of a command.
`

func main() {
	testenv.RunChildIfRequested() // draind demo's servers and load clients are draind itself
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitBadInput
	}
	switch args[0] {
	case "handoff":
		return cmdHandoff(args[1:], stdout, stderr)
	case "prepare":
		return cmdPrepare(args[1:], stdout, stderr)
	case "unprepare":
		return cmdUnprepare(args[1:], stdout, stderr)
	case "serve":
		return cmdServe(args[1:], stdout, stderr)
	case "status":
		return cmdStatus(args[1:], stdout, stderr)
	case "abort":
		return cmdAbort(args[1:], stdout, stderr)
	case "demo":
		return cmdDemo(args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "draind: unknown command %q\n%s", args[0], usage)
	return exitBadInput
}

// badInput returns the function a command uses to refuse its arguments: one line on stderr, exit code 2.
func badInput(stderr io.Writer) func(format string, a ...any) int {
	return func(format string, a ...any) int {
		fmt.Fprintf(stderr, "draind: "+format+"\n", a...)
		return exitBadInput
	}
}

// printJSON writes v as indented JSON (the --json output of every command).
func printJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
