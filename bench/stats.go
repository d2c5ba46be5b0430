package bench

import (
	"math"
	"slices"
)

// Percentiles summarizes a set of durations in nanoseconds. N == 0 means no samples (every field is then zero).
type Percentiles struct {
	N    int   `json:"n"`
	P50  int64 `json:"p50_ns"`
	P99  int64 `json:"p99_ns"`
	P999 int64 `json:"p999_ns"`
	Max  int64 `json:"max_ns"`
}

// Percentile returns the nearest-rank p-quantile (0 < p <= 1) of sorted, which must be sorted ascending: the
// smallest value v such that at least p of the samples are <= v. It returns 0 for an empty slice.
func Percentile(sorted []int64, p float64) int64 {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	rank := int(math.Ceil(p*float64(n) - 1e-9)) // 1-based; the epsilon keeps 0.99*100 at 99
	rank = min(max(rank, 1), n)
	return sorted[rank-1]
}

// Summarize sorts samples in place and returns their percentiles.
func Summarize(samples []int64) Percentiles {
	if len(samples) == 0 {
		return Percentiles{}
	}
	slices.Sort(samples)
	return Percentiles{
		N:    len(samples),
		P50:  Percentile(samples, 0.50),
		P99:  Percentile(samples, 0.99),
		P999: Percentile(samples, 0.999),
		Max:  samples[len(samples)-1],
	}
}

// Spread is the minimum, median and maximum of a figure over repeats (or pooled samples). N == 0: no value.
type Spread struct {
	N   int     `json:"n"`
	Min float64 `json:"min"`
	Med float64 `json:"median"`
	Max float64 `json:"max"`
}

// SpreadOf returns the spread of vs (not modified). The median of an even count is the mean of the middle two.
func SpreadOf(vs []float64) Spread {
	if len(vs) == 0 {
		return Spread{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return Spread{N: n, Min: s[0], Med: med, Max: s[n-1]}
}

// Ratio returns a/b, or NaN when b is zero.
func Ratio(a, b float64) float64 {
	if b == 0 {
		return math.NaN()
	}
	return a / b
}
