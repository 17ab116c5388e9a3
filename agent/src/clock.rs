//! The clock the agent reads (the only place it reads one) and duration
//! parsing. Flow expiries are CLOCK_MONOTONIC nanoseconds: the kernel compares
//! them with `bpf_ktime_get_coarse_ns` (the same clock, at most one tick late),
//! which costs ~25 ns a packet less than a precise read. CLOCK_MONOTONIC stops
//! during suspend, so an appliance must not suspend (the image masks
//! sleep.target); see ARCHITECTURE.md.

use std::time::Duration;

/// Nanoseconds of CLOCK_MONOTONIC now.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and a valid out pointer; cannot fail for MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// A duration like `30s`, `5m`, `2h`, `1d` or `1500ms` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: use a positive number with s, m, h or d (e.g. 30s, 5m, 2h)")]
pub struct DurationError(pub String);

/// Parses `30s`, `5m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_owned());
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        Some((_, c)) if c.is_ascii_digit() => (s, 1),
        _ => return Err(err()),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    if n == 0 {
        return Err(err());
    }
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        for bad in ["", "0s", "-1s", "s", "1x", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn monotonic_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
