package drain

import "github.com/draind/draind/loader"

// Records runs the iterator once and returns what it wrote.
func (t *Tracker) Records() ([]loader.SockRec, error) {
	var out []loader.SockRec
	_, err := t.snapshot(func(r *loader.SockRec) { out = append(out, *r) })
	return out, err
}

// Tracker returns the Counter's Tracker.
func (c *Counter) Tracker() *Tracker { return c.t }
