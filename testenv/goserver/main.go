// Command goserver is an unmodified Go HTTP server for draind's tests of prepared mode: http.ListenAndServe with Go's
// defaults (MPTCP where the kernel allows it, no SO_REUSEPORT, no signal handling), answering every request with its
// -id and a newline.
package main

import (
	"flag"
	"log"
	"net/http"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	id := flag.String("id", "", "what it answers")
	flag.Parse()
	body := []byte(*id + "\n")
	http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { w.Write(body) })
	log.Fatal(http.ListenAndServe(*addr, nil))
}
