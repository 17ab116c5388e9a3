//! Lab prefixes and the namespace names derived from them.
//!
//! Every namespace of a lab is named `<prefix>-<node>` (`al-p1`, `al-app`, ...).
//! A prefix is 1 to [`MAX_PREFIX_LEN`] lowercase letters and digits starting
//! with a letter, and never contains `-`: so `<prefix>-` identifies one lab's
//! namespaces exactly, and names built from the prefix (future WireGuard
//! interfaces such as `wg-<prefix>-x`, which share one global UAPI socket
//! directory) stay within the kernel's 15-byte interface-name limit.

use std::{
    hash::{BuildHasher, Hasher},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{Error, Result};

/// Longest lab prefix.
pub const MAX_PREFIX_LEN: usize = 8;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Checks that `prefix` can name a lab (see the module docs).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let bad = |reason| Err(Error::InvalidPrefix { prefix: prefix.to_owned(), reason });
    if prefix.is_empty() {
        return bad("empty");
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return bad("longer than 8 characters");
    }
    if !prefix.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("must start with a lowercase letter");
    }
    if !prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return bad("only lowercase letters and digits are allowed");
    }
    Ok(())
}

/// A fresh 5-character prefix (`t` and 4 base-36 characters) no existing
/// namespace uses, for tests that run in parallel and repeatedly.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        // RandomState is seeded randomly per process; mixing in the pid, the
        // time and a counter keeps prefixes distinct across and within runs.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let prefix = format!("t{}", base36(h.finish(), 4));
        if lab_namespaces(&prefix).is_empty() {
            return prefix;
        }
    }
}

fn base36(mut n: u64, digits: usize) -> String {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..digits)
        .map(|_| {
            let c = ALPHABET[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect()
}

/// `<prefix>-<node>`.
pub fn namespace_name(prefix: &str, node: &str) -> String {
    format!("{prefix}-{node}")
}

/// Whether `name` is one of the lab's namespaces: `<prefix>-` then one or
/// more lowercase letters or digits.
pub fn belongs_to_lab(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('-')).is_some_and(|node| {
        !node.is_empty() && node.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    })
}

/// The existing namespaces of the lab `prefix`, sorted.
pub fn lab_namespaces(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| belongs_to_lab(prefix, n))
        .collect();
    names.sort();
    names
}

/// Whether the named namespace exists.
pub fn namespace_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        for ok in ["al", "t3f9a", "a", "lab12345"] {
            validate_prefix(ok).expect(ok);
        }
        for bad in ["", "Al", "1a", "a-b", "a_b", "lab123456", "é"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unique_prefixes_are_valid_and_distinct() {
        let a: Vec<String> = (0..50).map(|_| unique_prefix()).collect();
        for p in &a {
            validate_prefix(p).expect(p);
            assert_eq!(p.len(), 5);
        }
        let set: std::collections::BTreeSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
    }

    #[test]
    fn lab_membership_is_exact() {
        assert!(belongs_to_lab("al", "al-p1"));
        assert!(belongs_to_lab("al", "al-app"));
        assert!(!belongs_to_lab("al", "alx-p1"));
        assert!(!belongs_to_lab("al", "al-"));
        assert!(!belongs_to_lab("al", "al-p1-x"));
        assert!(!belongs_to_lab("al", "al"));
        assert_eq!(namespace_name("al", "psw"), "al-psw");
    }

    #[test]
    fn longest_names_fit_an_interface_name() {
        // e.g. a future `wg-<prefix>-x` interface
        let p = "a".repeat(MAX_PREFIX_LEN);
        assert!(format!("wg-{p}-x").len() <= 15);
    }
}
