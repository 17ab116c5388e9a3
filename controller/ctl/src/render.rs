//! Text for humans: tables, times, durations, located policy problems and
//! policy diffs. Pure functions (the current time is a parameter), so the
//! output is tested as text.

use std::fmt::Write as _;

use airlock_proto::admin::{PolicyDiff, PolicyProblem};

/// Left-aligned columns separated by two spaces; no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let heads: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for r in std::iter::once(&heads).chain(rows) {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{c:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A duration in the largest fitting unit: `45 s`, `12 min`, `3 h`, `2 d`.
pub fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s if s < 2 * 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// `12 s ago` (or `in 3 min` for a time after `now`).
pub fn ago(t: u64, now: u64) -> String {
    if t <= now {
        format!("{} ago", span(now - t))
    } else {
        format!("in {}", span(t - now))
    }
}

/// Parses `90`, `90s`, `30m`, `24h`, `7d` into seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "s" | "sec" | "secs" => 1,
        "m" | "min" | "mins" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A policy problem as `FILE:LINE:COL: message (hint)`; without a location,
/// `FILE: path: message (hint)`.
pub fn problem(file: &str, p: &PolicyProblem) -> String {
    let mut s = match (p.line, p.column) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}: {}", p.message),
        (Some(l), None) => format!("{file}:{l}: {}", p.message),
        _ if !p.path.is_empty() => format!("{file}: {}: {}", p.path, p.message),
        _ => format!("{file}: {}", p.message),
    };
    if let Some(h) = p.hint.as_deref().filter(|h| !h.is_empty()) {
        let _ = write!(s, " ({h})");
    }
    s
}

/// A policy diff per appliance: `+` opens, `-` closes, `~` changes.
pub fn diff(d: &PolicyDiff) -> String {
    let mut out = match d.from_version {
        Some(v) => format!("Changes from version {v} to version {}:\n", d.to_version),
        None => {
            format!("Changes from no policy (everything dropped) to version {}:\n", d.to_version)
        }
    };
    let (mut opens, mut closes, mut changes, mut touched) = (0, 0, 0, 0);
    for a in &d.appliances {
        if a.opens.is_empty() && a.closes.is_empty() && a.changes.is_empty() {
            continue;
        }
        touched += 1;
        let _ = writeln!(out, "  {}", a.appliance);
        for (mark, list) in [('+', &a.opens), ('-', &a.closes), ('~', &a.changes)] {
            for f in list {
                let _ = writeln!(out, "    {mark} {f}");
            }
        }
        opens += a.opens.len();
        closes += a.closes.len();
        changes += a.changes.len();
    }
    if touched == 0 {
        out.push_str("  no changes: nothing opens, closes or changes\n");
    } else {
        let _ = writeln!(
            out,
            "{opens} open, {closes} close, {changes} change, on {touched} appliance(s)"
        );
    }
    out
}

/// True when the diff changes nothing.
pub fn diff_is_empty(d: &PolicyDiff) -> bool {
    d.appliances.iter().all(|a| a.opens.is_empty() && a.closes.is_empty() && a.changes.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::admin::ApplianceDiff;

    #[test]
    fn tables_align_and_times_are_utc() {
        let t = table(&["ID", "STATE"], &[vec!["ward-1".into(), "enrolled".into()]]);
        assert_eq!(t, "ID      STATE\nward-1  enrolled\n");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_210_096), "2024-02-29 12:34:56 UTC");
        assert_eq!(utc(1_893_456_000), "2030-01-01 00:00:00 UTC");
        assert_eq!(ago(100, 130), "30 s ago");
        assert_eq!(ago(200_000, 100), "in 2 d");
        assert_eq!(span(3 * 3600), "3 h");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("24h"), Some(86_400));
        assert_eq!(parse_duration("30m"), Some(1800));
        assert_eq!(parse_duration("7d"), Some(604_800));
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("5 min"), Some(300));
        for bad in ["", "h", "1y", "-1h", "99999999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn problems_are_located_like_compiler_errors() {
        let p = PolicyProblem {
            line: Some(3),
            column: Some(8),
            path: "site[0].name".into(),
            message: "invalid type".into(),
            hint: Some("use a string".into()),
        };
        assert_eq!(problem("bad.toml", &p), "bad.toml:3:8: invalid type (use a string)");
        let p = PolicyProblem { line: None, column: None, hint: None, ..p };
        assert_eq!(problem("bad.toml", &p), "bad.toml: site[0].name: invalid type");
    }

    #[test]
    fn diffs_mark_opens_closes_and_changes() {
        let d = PolicyDiff {
            from_version: Some(1),
            to_version: 2,
            appliances: vec![
                ApplianceDiff {
                    appliance: "a".into(),
                    opens: vec!["x".into()],
                    closes: vec!["y".into()],
                    changes: vec!["z".into()],
                },
                ApplianceDiff {
                    appliance: "b".into(),
                    opens: vec![],
                    closes: vec![],
                    changes: vec![],
                },
            ],
        };
        let text = diff(&d);
        assert!(text.contains("    + x\n    - y\n    ~ z\n"), "{text}");
        assert!(!text.contains("  b\n"), "unchanged appliances are not listed: {text}");
        assert!(text.ends_with("1 open, 1 close, 1 change, on 1 appliance(s)\n"), "{text}");
        assert!(!diff_is_empty(&d));
    }
}
