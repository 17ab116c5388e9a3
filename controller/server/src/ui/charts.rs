//! Small time-series charts rendered as inline SVG on the server: no chart
//! library, no script, styled by class (the CSP forbids inline style). Each
//! chart has a text title and description for screen readers, and a legend
//! that states the latest value of each line, so no meaning rests on colour.

use maud::{html, Markup, PreEscaped};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// One value per bucket (`None`: no data).
    pub values: Vec<Option<f64>>,
}

const W: f64 = 600.0;
const H: f64 = 150.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 20.0;

/// A "nice" axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
pub fn nice_max(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|m| *m >= v).unwrap_or(10.0 * p)
}

/// The polylines' `points`, one string per run of buckets with data.
pub fn segments(values: &[Option<f64>], max: f64) -> Vec<String> {
    let n = values.len().max(2) - 1;
    let x = |i: usize| LEFT + (W - LEFT - RIGHT) * i as f64 / n as f64;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v / max).clamp(0.0, 1.0));
    let mut out = Vec::new();
    let mut cur = String::new();
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(&format!("{:.1},{:.1}", x(i), y(*v)));
            }
            None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // A single point draws nothing as a polyline: widen it to a short dash.
    out.into_iter()
        .map(|s| {
            if s.contains(' ') {
                s
            } else {
                let (px, py) = s.split_once(',').unwrap_or(("0", "0"));
                let px: f64 = px.parse().unwrap_or(0.0);
                format!("{:.1},{py} {:.1},{py}", px - 2.0, px + 2.0)
            }
        })
        .collect()
}

fn latest(values: &[Option<f64>]) -> Option<f64> {
    values.iter().rev().flatten().next().copied()
}

/// A line chart of rates over the last `minutes`, titled `title`, values in `unit`.
pub fn chart(id: &str, title: &str, unit: &str, minutes: u64, lines: &[Line]) -> Markup {
    let peak = lines.iter().flat_map(|l| l.values.iter().flatten()).fold(0.0f64, |a, b| a.max(*b));
    let max = nice_max(peak);
    let summary = if lines.is_empty() {
        format!("No data in the last {minutes} minutes.")
    } else {
        lines
            .iter()
            .map(|l| {
                format!(
                    "{}: now {}",
                    l.label,
                    latest(&l.values).map_or("no data".into(), |v| format!(
                        "{} {unit}",
                        super::layout::count(v)
                    ))
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
            + &format!(". Peak {} {unit}.", super::layout::count(peak))
    };
    let plot_h = H - TOP - BOTTOM;
    html! {
        figure.chart {
            figcaption #{ (id) "-t" } { (title) }
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-labelledby={ (id) "-t " (id) "-d" } {
                desc #{ (id) "-d" } { (summary) }
                @for k in 0..=2u32 {
                    @let y = TOP + plot_h * f64::from(k) / 2.0;
                    line.grid-line x1=(LEFT) x2=(W - RIGHT) y1=(y) y2=(y) {}
                    text.axis x=(LEFT - 4.0) y=(y + 4.0) text-anchor="end" {
                        (super::layout::count(max * f64::from(2 - k) / 2.0))
                    }
                }
                text.axis x=(LEFT) y=(H - 4.0) { "−" (minutes) " min" }
                text.axis x=(W - RIGHT) y=(H - 4.0) text-anchor="end" { "now" }
                @for (i, l) in lines.iter().enumerate() {
                    @for pts in segments(&l.values, max) {
                        polyline class={ "s" (i % 6) } points=(pts) {}
                    }
                }
            }
            @if lines.is_empty() {
                p.empty { "No reports with counters yet." }
            } @else {
                ul.legend {
                    @for (i, l) in lines.iter().enumerate() {
                        li {
                            span class={ "sw s" (i % 6) } {}
                            (l.label) ": "
                            strong { (latest(&l.values).map_or("–".into(), super::layout::count)) }
                            (PreEscaped("&nbsp;")) (unit)
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.3), 0.5);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(120.0), 200.0);
        assert_eq!(nice_max(5000.0), 5000.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
    }

    #[test]
    fn gaps_split_lines_and_single_points_stay_visible() {
        let v = [Some(0.0), Some(10.0), None, Some(5.0), None];
        let s = segments(&v, 10.0);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], format!("{:.1},{:.1} {:.1},{:.1}", LEFT, H - BOTTOM, LEFT + 137.0, TOP));
        assert!(s[1].contains(' '), "a lone point becomes a dash: {}", s[1]);
        assert!(segments(&[None, None], 1.0).is_empty());
    }

    #[test]
    fn the_chart_describes_itself_in_text() {
        let m = chart(
            "c1",
            "Drops per second",
            "pkt/s",
            15,
            &[Line { label: "default deny".into(), values: vec![Some(3.0), Some(120.0)] }],
        )
        .into_string();
        assert!(m.contains("role=\"img\""));
        assert!(m.contains("default deny: now 120 pkt/s. Peak 120 pkt/s."), "{m}");
        assert!(!m.contains("style="), "no inline style under the CSP");
        let empty = chart("c2", "Passes", "pkt/s", 15, &[]).into_string();
        assert!(empty.contains("No reports with counters yet."));
    }
}
