package bench

import (
	"math"
	"testing"
)

func TestPercentile(t *testing.T) {
	hundred := make([]int64, 100)
	for i := range hundred {
		hundred[i] = int64(i + 1) // 1..100
	}
	thousand := make([]int64, 1000)
	for i := range thousand {
		thousand[i] = int64(i + 1)
	}
	for _, tc := range []struct {
		name   string
		sorted []int64
		p      float64
		want   int64
	}{
		{"empty", nil, 0.99, 0},
		{"one", []int64{7}, 0.5, 7},
		{"one p99.9", []int64{7}, 0.999, 7},
		{"median of two is the lower (nearest rank)", []int64{1, 2}, 0.5, 1},
		{"p50 of 1..100", hundred, 0.5, 50},
		{"p99 of 1..100", hundred, 0.99, 99},
		{"p99.9 of 1..100 is the max", hundred, 0.999, 100},
		{"p100", hundred, 1, 100},
		{"p99.9 of 1..1000", thousand, 0.999, 999},
		{"tiny p is the min", hundred, 0.0001, 1},
	} {
		if got := Percentile(tc.sorted, tc.p); got != tc.want {
			t.Errorf("%s: Percentile(%v) = %d, want %d", tc.name, tc.p, got, tc.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	if got := Summarize(nil); got != (Percentiles{}) {
		t.Errorf("Summarize(nil) = %+v, want zero", got)
	}
	s := []int64{5, 3, 9, 1, 7}
	got := Summarize(s)
	want := Percentiles{N: 5, P50: 5, P99: 9, P999: 9, Max: 9}
	if got != want {
		t.Errorf("Summarize = %+v, want %+v", got, want)
	}
	if s[0] != 1 || s[4] != 9 {
		t.Errorf("Summarize did not sort in place: %v", s)
	}
}

func TestSpreadOf(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want Spread
	}{
		{nil, Spread{}},
		{[]float64{4}, Spread{N: 1, Min: 4, Med: 4, Max: 4}},
		{[]float64{3, 1, 2}, Spread{N: 3, Min: 1, Med: 2, Max: 3}},
		{[]float64{4, 1, 3, 2}, Spread{N: 4, Min: 1, Med: 2.5, Max: 4}},
	} {
		in := append([]float64(nil), tc.in...)
		if got := SpreadOf(tc.in); got != tc.want {
			t.Errorf("SpreadOf(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
		for i := range in {
			if in[i] != tc.in[i] {
				t.Errorf("SpreadOf modified its input: %v, was %v", tc.in, in)
			}
		}
	}
}

func TestRatio(t *testing.T) {
	if got := Ratio(3, 4); got != 0.75 {
		t.Errorf("Ratio(3, 4) = %v", got)
	}
	if got := Ratio(3, 0); !math.IsNaN(got) {
		t.Errorf("Ratio(3, 0) = %v, want NaN", got)
	}
}
