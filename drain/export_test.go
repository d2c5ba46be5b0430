package drain

import "github.com/draind/draind/loader"

// FastCount takes a fast snapshot (a full one when the fast one cannot count what c watches).
func (c *Counter) FastCount() (Count, error) { return c.count(true) }

// FullCount takes a full snapshot.
func (c *Counter) FullCount() (Count, error) { return c.count(false) }

// Events reads the event counts of c's root mark.
func (c *Counter) Events() (loader.MarkCount, error) { return c.events() }

// Live reads how many connections tagged with c's root mark the kernel counts as possibly held.
func (c *Counter) Live() (int64, error) { return c.t.k.Live(c.root.id) }

// HeldWalk counts, walking c's network namespace whatever Live says, the connections tagged with c's root mark that a
// socket file holds (in an fd table or not).
func (c *Counter) HeldWalk() (int, error) { return c.walkHeld(c.root.id) }
