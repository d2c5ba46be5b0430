package drain

import (
	"time"

	"github.com/draind/draind/loader"
)

// Records runs the iterator once and hands fn what it wrote.
func (t *Tracker) Records(fn func(*loader.SockRec)) (time.Duration, error) {
	return t.snapshot(fn)
}

// Tracker returns the Counter's Tracker.
func (c *Counter) Tracker() *Tracker { return c.t }
