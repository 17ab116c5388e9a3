//! Counter history for the dashboard's charts: the last reports' cumulative
//! packet counters per appliance, turned into rates per time bucket.
//!
//! Pure and bounded: each appliance keeps at most [`SAMPLES`] samples, and
//! counter names are interned once, so 1,000 appliances cost a few MiB. Time
//! is passed in. A counter that goes down (the agent reloaded its dataplane)
//! starts a new series instead of producing a negative rate.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

/// Samples kept per appliance (30 min at the default 10 s report interval).
pub const SAMPLES: usize = 180;

/// A counter the sample does not have.
const MISSING: u64 = u64::MAX;

#[derive(Debug, Clone)]
struct Sample {
    at: u64,
    /// Indexed by the interned name; [`MISSING`] for names not reported.
    values: Vec<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    names: Vec<String>,
    index: HashMap<String, usize>,
    series: HashMap<String, Vec<Sample>>,
    /// The sum over all appliances, kept as reports arrive: bucket start
    /// (a multiple of [`STEP`]) → per-name rate; so the fleet's chart costs
    /// the same at 10 or 10,000 appliances.
    total: BTreeMap<u64, Vec<Option<f64>>>,
}

/// The bucket width of the fleet-wide sum, in seconds.
pub const STEP: u64 = 10;
/// How long the fleet-wide sum is kept, in seconds.
const KEEP: u64 = 2 * 3600;

/// Spreads the rates of the interval `a`→`b` over the `step`-wide buckets
/// (aligned to multiples of `step`) that overlap `[from, to)`, calling
/// `add(bucket start, name index, rate × overlap / step)`.
fn spread(
    a: &Sample,
    b: &Sample,
    from: u64,
    to: u64,
    step: u64,
    mut add: impl FnMut(u64, usize, f64),
) {
    let (lo, hi) = (a.at.max(from), b.at.min(to));
    if hi <= lo {
        return;
    }
    let dt = (b.at - a.at) as f64;
    let mut bs = lo - lo % step;
    while bs < hi {
        let be = bs + step;
        let overlap = (hi.min(be) - lo.max(bs)) as f64;
        for (i, (&va, &vb)) in a.values.iter().zip(&b.values).enumerate() {
            if va == MISSING || vb == MISSING || vb < va {
                continue; // not reported, or reset: no rate for this interval
            }
            add(bs, i, (vb - va) as f64 / dt * overlap / step as f64);
        }
        bs = be;
    }
}

/// The history of every appliance's counters.
#[derive(Debug, Default)]
pub struct Telemetry {
    inner: Mutex<Inner>,
}

/// Rates per bucket for one chart: `(name, per-bucket packets per second)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates {
    /// Start of the first bucket (Unix seconds).
    pub from: u64,
    /// Bucket width in seconds.
    pub step: u64,
    /// Each counter's rate per bucket (`None`: no data for that bucket).
    pub lines: BTreeMap<String, Vec<Option<f64>>>,
}

impl Telemetry {
    /// Records an appliance's cumulative counters as reported at `at`.
    pub fn record(&self, appliance: &str, at: u64, counters: &BTreeMap<String, u64>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        let mut values = vec![MISSING; inner.names.len()];
        for (name, v) in counters {
            let i = match inner.index.get(name) {
                Some(&i) => i,
                None => {
                    inner.names.push(name.clone());
                    inner.index.insert(name.clone(), inner.names.len() - 1);
                    values.push(MISSING);
                    inner.names.len() - 1
                }
            };
            values[i] = (*v).min(MISSING - 1);
        }
        let s = inner.series.entry(appliance.to_owned()).or_default();
        if s.last().is_some_and(|l| l.at >= at) {
            return; // same second or clock went back: keep the older sample
        }
        let sample = Sample { at, values };
        if let Some(prev) = s.last() {
            let names = inner.names.len();
            let total = &mut inner.total;
            spread(prev, &sample, 0, u64::MAX, STEP, |bs, i, v| {
                let cells = total.entry(bs).or_insert_with(|| vec![None; names]);
                if cells.len() < names {
                    cells.resize(names, None);
                }
                cells[i] = Some(cells[i].unwrap_or(0.0) + v);
            });
            let horizon = at.saturating_sub(KEEP);
            while inner.total.first_key_value().is_some_and(|(k, _)| *k < horizon) {
                inner.total.pop_first();
            }
        }
        if s.len() == SAMPLES {
            s.remove(0);
        }
        s.push(sample);
    }

    /// Forgets an appliance.
    pub fn forget(&self, appliance: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).series.remove(appliance);
    }

    /// Rates of `appliances` (all when `None`), summed, in `buckets` buckets of
    /// `step` seconds: the last one ends at `now` rounded down to `step`
    /// (a bucket still filling is not shown).
    pub fn rates(&self, appliances: Option<&[&str]>, now: u64, step: u64, buckets: usize) -> Rates {
        let step = step.max(1);
        let buckets = buckets.max(1);
        let end = now - now % step;
        let from = end.saturating_sub(step * buckets as u64);
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut sums: Vec<Vec<Option<f64>>> = vec![vec![None; buckets]; g.names.len()];
        let mut add = |bs: u64, i: usize, v: f64| {
            if let Some(cell) =
                sums.get_mut(i).and_then(|l| l.get_mut(((bs - from) / step) as usize))
            {
                *cell = Some(cell.unwrap_or(0.0) + v);
            }
        };
        match appliances {
            None if step == STEP => {
                for (bs, cells) in g.total.range(from..end) {
                    for (i, v) in cells.iter().enumerate() {
                        if let Some(v) = v {
                            add(*bs, i, *v);
                        }
                    }
                }
            }
            _ => {
                let ids: Vec<&Vec<Sample>> = match appliances {
                    Some(ids) => ids.iter().filter_map(|id| g.series.get(*id)).collect(),
                    None => g.series.values().collect(),
                };
                for samples in ids {
                    for w in samples.windows(2) {
                        spread(&w[0], &w[1], from, end, step, &mut add);
                    }
                }
            }
        }
        let lines = g
            .names
            .iter()
            .cloned()
            .zip(sums)
            .filter(|(_, v)| v.iter().any(Option::is_some))
            .collect();
        Rates { from, step, lines }
    }
}

impl Rates {
    /// Sums the lines whose names `keep` accepts into one line.
    pub fn sum_where(&self, keep: impl Fn(&str) -> bool) -> Vec<Option<f64>> {
        let n = self.lines.values().next().map_or(0, Vec::len);
        let mut out = vec![None; n];
        for (name, line) in &self.lines {
            if !keep(name) {
                continue;
            }
            for (o, v) in out.iter_mut().zip(line) {
                if let Some(v) = v {
                    *o = Some(o.unwrap_or(0.0) + v);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn rates_per_bucket_summed_over_appliances() {
        let t = Telemetry::default();
        // a: 10 pkt/s of passes, b: 5 pkt/s, both reporting every 10 s.
        for i in 0..=6u64 {
            t.record("a", 1000 + i * 10, &c(&[("pass_flow", i * 100)]));
            t.record("b", 1000 + i * 10, &c(&[("pass_flow", i * 50), ("drop_no_flow", i)]));
        }
        let r = t.rates(None, 1060, 10, 6);
        assert_eq!(r.from, 1000);
        assert_eq!(r.lines["pass_flow"], vec![Some(15.0); 6]);
        assert_eq!(r.lines["drop_no_flow"], vec![Some(0.1); 6]);
        let only_a = t.rates(Some(&["a"]), 1060, 10, 6);
        assert_eq!(only_a.lines["pass_flow"], vec![Some(10.0); 6]);
        assert!(!only_a.lines.contains_key("drop_no_flow"), "a never reported drops");
    }

    #[test]
    fn uneven_intervals_and_gaps() {
        let t = Telemetry::default();
        t.record("a", 100, &c(&[("x", 0)]));
        t.record("a", 115, &c(&[("x", 150)])); // 10/s over [100,115]
        let r = t.rates(None, 140, 10, 4); // buckets [100,110) [110,120) [120,130) [130,140)
        assert_eq!(r.lines["x"], vec![Some(10.0), Some(5.0), None, None]);
    }

    #[test]
    fn a_reset_gives_no_negative_rate_and_history_is_bounded() {
        let t = Telemetry::default();
        t.record("a", 10, &c(&[("x", 500)]));
        t.record("a", 20, &c(&[("x", 10)])); // agent restarted
        t.record("a", 20, &c(&[("x", 99)])); // same second: ignored
        t.record("a", 30, &c(&[("x", 110)]));
        let r = t.rates(None, 30, 10, 2);
        assert_eq!(r.lines["x"], vec![None, Some(10.0)]);
        for i in 0..(SAMPLES as u64 + 50) {
            t.record("b", 100 + i, &c(&[("x", i)]));
        }
        assert_eq!(t.inner.lock().unwrap().series["b"].len(), SAMPLES);
        t.forget("b");
        assert!(!t.inner.lock().unwrap().series.contains_key("b"));
    }

    #[test]
    fn the_running_fleet_sum_equals_a_full_scan() {
        let t = Telemetry::default();
        // Uneven, unaligned report times, resets and counters that appear late.
        let mut x = 7u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x >> 33
        };
        for a in 0..20u64 {
            let id = format!("a{a}");
            let mut at = 1_000 + a;
            let mut total = 0u64;
            for k in 0..60u64 {
                at += 3 + next() % 15;
                total = if next() % 40 == 0 { 0 } else { total + next() % 5000 };
                let mut c = vec![("pass_flow", total)];
                if k > 20 {
                    c.push(("drop_no_flow", k * 3));
                }
                t.record(&id, at, &c.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect());
            }
        }
        let ids: Vec<String> = (0..20).map(|a| format!("a{a}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        for now in [1_300, 1_555, 1_900] {
            let fast = t.rates(None, now, STEP, 60);
            let scan = t.rates(Some(&refs), now, STEP, 60);
            assert_eq!(fast.from, scan.from);
            assert_eq!(
                fast.lines.keys().collect::<Vec<_>>(),
                scan.lines.keys().collect::<Vec<_>>()
            );
            for (name, line) in &fast.lines {
                for (f, s) in line.iter().zip(&scan.lines[name]) {
                    match (f, s) {
                        (Some(f), Some(s)) => {
                            assert!((f - s).abs() < 1e-6 * s.abs().max(1.0), "{name}: {f} vs {s}")
                        }
                        (f, s) => assert_eq!(f.is_some(), s.is_some(), "{name}"),
                    }
                }
            }
        }
    }

    #[test]
    fn sum_where_adds_matching_lines() {
        let t = Telemetry::default();
        t.record("a", 0, &c(&[("pass_flow", 0), ("pass_reply", 0), ("drop_x", 0)]));
        t.record("a", 10, &c(&[("pass_flow", 10), ("pass_reply", 20), ("drop_x", 30)]));
        let r = t.rates(None, 10, 10, 1);
        assert_eq!(r.sum_where(|n| n.starts_with("pass_")), vec![Some(3.0)]);
        assert_eq!(r.sum_where(|n| n == "nothing"), vec![None]);
    }
}
