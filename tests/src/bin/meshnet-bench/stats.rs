//! Summaries of repeated measurements: every figure the report quotes is a median over
//! repeats, with the spread (min–max) beside it.

use serde_json::{json, Value};

/// How far the repeats of a figure may lie from their median, relative, for the median to be
/// believed: a figure whose spread leaves ±10 % of it is void, and so is a target that uses it.
pub const SPREAD_LIMIT: f64 = 0.10;

/// The median and spread of repeated measurements of one figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

impl Stat {
    /// Summarises `values` (one per repeat). Empty input gives NaNs.
    #[must_use]
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Self { median: f64::NAN, min: f64::NAN, max: f64::NAN, values: values.to_vec() };
        }
        Self { median: median_sorted(&v), min: v[0], max: v[v.len() - 1], values: values.to_vec() }
    }

    /// Whether the repeats disagree too much to believe the median: the lowest or the highest
    /// lies more than `limit` (relative) from it. A figure that was not measured is void too.
    #[must_use]
    pub fn void(&self, limit: f64) -> bool {
        let ok = self.median.is_finite()
            && self.min >= self.median - limit * self.median.abs()
            && self.max <= self.median + limit * self.median.abs();
        !ok
    }

    /// The spread as percentages of the median, `(below, above)`: `(-12.0, 3.5)`.
    #[must_use]
    pub fn spread_pct(&self) -> (f64, f64) {
        let m = self.median.abs();
        ((self.min - self.median) / m * 100.0, (self.max - self.median) / m * 100.0)
    }

    #[must_use]
    pub fn json(&self) -> Value {
        json!({ "median": round(self.median), "min": round(self.min), "max": round(self.max), "values": self.values.iter().map(|x| round(*x)).collect::<Vec<_>>() })
    }

    /// Reads back what [`Stat::json`] wrote.
    #[must_use]
    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            median: v.get("median")?.as_f64()?,
            min: v.get("min")?.as_f64()?,
            max: v.get("max")?.as_f64()?,
            values: v.get("values")?.as_array()?.iter().filter_map(Value::as_f64).collect(),
        })
    }
}

/// Keeps four significant decimals, so that the JSON stays readable.
#[must_use]
pub fn round(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let digits = 4 - (x.abs().log10().floor() as i32) - 1;
    let digits = digits.clamp(0, 9);
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

#[must_use]
pub fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
#[must_use]
pub fn quantile_sorted<T: Copy>(v: &[T], q: f64) -> T {
    assert!(!v.is_empty());
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The mean of integer samples after dropping those above the 99th percentile: the few
/// runs an interrupt landed in would otherwise dominate a mean of 30-ns events.
#[must_use]
pub fn trimmed_mean(samples: &mut [u32]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let cut = quantile_sorted(samples, 0.99);
    let kept: Vec<u32> = samples.iter().copied().filter(|s| *s <= cut).collect();
    kept.iter().map(|s| f64::from(*s)).sum::<f64>() / kept.len() as f64
}

/// Per-repeat ratios `a[i] / b[i]` of two figures measured side by side.
#[must_use]
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values by construction
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(Stat::of(&[5.0, 1.0, 3.0]).median, 3.0);
        assert!(Stat::of(&[]).median.is_nan());
    }

    #[test]
    fn void_when_a_repeat_leaves_ten_percent_of_the_median() {
        // The floor: 1,223 conn/s with repeats from 803 to 11,108.
        assert!(Stat::of(&[803.0, 1_223.0, 11_108.0]).void(SPREAD_LIMIT));
        assert!(!Stat::of(&[9_500.0, 10_000.0, 10_400.0]).void(SPREAD_LIMIT));
        // Exactly at the edge is still believed; just past it on either side is not.
        assert!(!Stat::of(&[90.0, 100.0, 110.0]).void(SPREAD_LIMIT));
        assert!(Stat::of(&[89.9, 100.0, 100.0]).void(SPREAD_LIMIT));
        assert!(Stat::of(&[100.0, 100.0, 110.1]).void(SPREAD_LIMIT));
        assert!(Stat::of(&[]).void(SPREAD_LIMIT));
        let (lo, hi) = Stat::of(&[90.0, 100.0, 105.0]).spread_pct();
        assert!((lo + 10.0).abs() < 1e-9 && (hi - 5.0).abs() < 1e-9);
    }

    #[test]
    fn stat_round_trips_through_json() {
        let s = Stat::of(&[1.25, 2.5, 3.75]);
        assert_eq!(Stat::from_json(&s.json()), Some(s));
    }

    #[test]
    fn quantiles_and_trimmed_mean() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile_sorted(&v, 0.5), 50);
        assert_eq!(quantile_sorted(&v, 0.99), 99);
        let mut w = v.clone();
        w.push(1_000_000);
        // The outlier goes, the mean of 1..=99 plus 100 stays near 50.
        assert!((trimmed_mean(&mut w) - 50.0).abs() < 1.0);
        assert_eq!(round(123.456_78), 123.5);
        assert_eq!(round(0.012_345_6), 0.012_35);
    }
}
