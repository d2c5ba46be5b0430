package drain

// FastCount takes a fast snapshot (a full one when the fast one cannot count what c watches).
func (c *Counter) FastCount() (Count, error) { return c.count(true) }

// FullCount takes a full snapshot.
func (c *Counter) FullCount() (Count, error) { return c.count(false) }
