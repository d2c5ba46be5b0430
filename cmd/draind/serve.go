package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"go.yaml.in/yaml/v3"

	"github.com/draind/draind/api"
	"github.com/draind/draind/daemon"
	"github.com/draind/draind/loader"
)

// serveConfig is the optional YAML file of `draind serve --config`; flags given on the command line win.
type serveConfig struct {
	Socket      string `yaml:"socket"`
	SocketGroup string `yaml:"socket_group"`
	StateDir    string `yaml:"state_dir"`
	PinDir      string `yaml:"pin_dir"`
	LogLevel    string `yaml:"log_level"`    // debug, info, warn, error
	MetricsAddr string `yaml:"metrics_addr"` // host:port of /metrics, or "off"
}

func cmdServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := serveConfig{Socket: api.DefaultSocket, StateDir: daemon.DefaultStateDir, PinDir: loader.DefaultPinDir, LogLevel: "info", MetricsAddr: daemon.DefaultMetricsAddr}
	config := fs.String("config", "", "YAML file with socket, socket_group, state_dir, pin_dir, log_level (flags win)")
	fs.StringVar(&cfg.Socket, "socket", cfg.Socket, "unix socket of the API")
	fs.StringVar(&cfg.SocketGroup, "socket-group", "", "group (name or GID) allowed to connect to the socket (mode 0660; default root)")
	fs.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "directory of the state file (handoffs in progress)")
	fs.StringVar(&cfg.PinDir, "pin-dir", cfg.PinDir, "bpffs directory for the pinned maps")
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "debug, info, warn or error")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", cfg.MetricsAddr, "address of the Prometheus /metrics endpoint, or off")
	if err := fs.Parse(args); err != nil {
		return exitBadInput
	}
	fail := badInput(stderr)
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *config != "" {
		var file serveConfig
		b, err := os.ReadFile(*config)
		if err != nil {
			return fail("read config: %v", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		dec.KnownFields(true)
		if err := dec.Decode(&file); err != nil && err != io.EOF {
			return fail("read config %s: %v", *config, err)
		}
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, pair := range map[string][2]*string{
			"socket": {&cfg.Socket, &file.Socket}, "socket-group": {&cfg.SocketGroup, &file.SocketGroup},
			"state-dir": {&cfg.StateDir, &file.StateDir}, "pin-dir": {&cfg.PinDir, &file.PinDir}, "log-level": {&cfg.LogLevel, &file.LogLevel},
			"metrics-addr": {&cfg.MetricsAddr, &file.MetricsAddr},
		} {
			if !set[name] && *pair[1] != "" {
				*pair[0] = *pair[1]
			}
		}
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return fail("log level %q: %v", cfg.LogLevel, err)
	}
	gid := 0
	if cfg.SocketGroup != "" {
		g, err := strconv.Atoi(cfg.SocketGroup)
		if err != nil {
			grp, lerr := user.LookupGroup(cfg.SocketGroup)
			if lerr != nil {
				return fail("socket group: %v", lerr)
			}
			g, _ = strconv.Atoi(grp.Gid)
		}
		gid = g
	}
	logger := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d, err := daemon.New(daemon.Options{
		Socket: cfg.Socket, SocketGID: gid, StateDir: cfg.StateDir, PinDir: cfg.PinDir, MetricsAddr: cfg.MetricsAddr, Logger: logger,
		Ready: func() { notifySystemd(ctx, logger) },
	})
	if err != nil {
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	defer d.Close()
	if err := d.Serve(ctx); err != nil {
		fmt.Fprintf(stderr, "draind: %v\n", err)
		return exitError
	}
	sddaemon.SdNotify(false, sddaemon.SdNotifyStopping)
	return exitOK
}

// notifySystemd says READY=1 when started by systemd (Type=notify), and pets its watchdog if WatchdogSec= is set.
func notifySystemd(ctx context.Context, log *slog.Logger) {
	if ok, err := sddaemon.SdNotify(false, sddaemon.SdNotifyReady); err != nil {
		log.Warn("notify systemd", "err", err)
	} else if ok {
		log.Info("told systemd we are ready")
	}
	interval, err := sddaemon.SdWatchdogEnabled(false)
	if err != nil || interval <= 0 {
		return
	}
	go func() {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				sddaemon.SdNotify(false, sddaemon.SdNotifyWatchdog)
			}
		}
	}()
}
