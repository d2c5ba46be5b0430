package drain

import "github.com/draind/draind/loader"

// FastCount takes a fast snapshot (a full one when the fast one cannot count what c watches).
func (c *Counter) FastCount() (Count, error) { return c.count(true) }

// FullCount takes a full snapshot.
func (c *Counter) FullCount() (Count, error) { return c.count(false) }

// Events reads the event counts of c's root mark.
func (c *Counter) Events() (loader.MarkCount, error) { return c.events() }
