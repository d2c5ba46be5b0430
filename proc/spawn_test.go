package proc

import (
	"errors"
	"net"
	"os"
	"slices"
	"testing"
)

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe, plain := dir+"/server", dir+"/data"
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plain, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"HOME=/", "PATH=relative:" + dir}
	if p, err := LookPath("server", env); err != nil || p != exe {
		t.Errorf("LookPath(server) = %q, %v; want %q (from the given PATH)", p, err, exe)
	}
	if p, err := LookPath(exe, nil); err != nil || p != exe {
		t.Errorf("LookPath(%s) = %q, %v", exe, p, err)
	}
	for _, name := range []string{"data", plain, "", "no-such-command-xyz"} {
		if p, err := LookPath(name, env); !errors.Is(err, ErrNotFound) {
			t.Errorf("LookPath(%q) = %q, %v; want ErrNotFound", name, p, err)
		}
	}
}

func TestIdentityAndListeningPorts(t *testing.T) {
	self, err := Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	like, err := Identity(self)
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	if like.UID != uint32(os.Geteuid()) || like.GID != uint32(os.Getegid()) || like.Dir != wd || !slices.Contains(like.Env, "PATH="+os.Getenv("PATH")) {
		t.Errorf("Identity(self) = uid %d gid %d dir %q (%d env entries); want uid %d gid %d dir %q", like.UID, like.GID, like.Dir, len(like.Env), os.Geteuid(), os.Getegid(), wd)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ports, err := ListeningPorts(os.Getpid())
	if err != nil || !slices.Contains(ports, port) {
		t.Errorf("ListeningPorts(self) = %v, %v; want it to hold %d", ports, err, port)
	}
	ln.Close()
	if ports, _ := ListeningPorts(os.Getpid()); slices.Contains(ports, port) {
		t.Errorf("ListeningPorts(self) = %v after the listener closed", ports)
	}
}
