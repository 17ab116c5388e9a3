//! The bundle stream: `GET /agent/v1/stream` kept open, its NDJSON lines
//! parsed, bundles handed to the run loop (which alone touches the
//! dataplane), reconnected with exponential backoff and full jitter.
//!
//! The decisions are plain functions with time and randomness passed in:
//! [`backoff_delay`], [`LineBuffer`], [`Watchdog`] and [`decide`].

use std::{sync::Arc, time::Duration};

use airlock_proto::{
    agent::{Refusal, StreamMessage},
    BundleError, PolicyBundle, SignedBundle,
};
use ed25519_dalek::VerifyingKey;
use http_body_util::BodyExt as _;
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, info, warn};

use super::{client, Shared};

/// The first reconnect waits up to this long.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// No reconnect waits longer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// No wait is shorter (a controller that refuses at once is not hammered).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A stream with no complete line for this long is dead (heartbeats come every 10 s).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// The longest line accepted (a bundle of ~100k entries is ~25 MB).
pub const MAX_LINE: usize = 64 << 20;

/// The wait before reconnect attempt `attempt` (0 = first): uniform in
/// `[0, min(BACKOFF_MAX, BACKOFF_BASE * 2^attempt)]` ("full jitter"), drawn
/// from `random`, and never below [`BACKOFF_MIN`].
pub fn backoff_delay(attempt: u32, random: u64) -> Duration {
    let base = BACKOFF_BASE.as_millis() as u64;
    let cap = base.saturating_mul(1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX));
    let cap = cap.min(BACKOFF_MAX.as_millis() as u64);
    Duration::from_millis((random % (cap + 1)).max(BACKOFF_MIN.as_millis() as u64))
}

/// A random u64 for jitter (not a secret).
pub fn jitter() -> u64 {
    let mut b = [0u8; 8];
    // Without randomness the waits become their caps: still bounded.
    if getrandom::fill(&mut b).is_err() {
        return u64::MAX;
    }
    u64::from_le_bytes(b)
}

/// A line longer than [`MAX_LINE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a stream line is longer than {MAX_LINE} bytes")]
pub struct LineTooLong;

/// Splits a byte stream into lines, whatever the chunk boundaries.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    scanned: usize,
    max: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::with_max(MAX_LINE)
    }
}

impl LineBuffer {
    /// A buffer refusing lines longer than `max` bytes.
    pub fn with_max(max: usize) -> Self {
        Self { buf: Vec::new(), scanned: 0, max }
    }

    /// Appends a chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete, non-empty line (without `\n` or `\r\n`), if any.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, LineTooLong>> {
        loop {
            let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                return (self.buf.len() > self.max).then_some(Err(LineTooLong));
            };
            let end = self.scanned + i;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            self.scanned = 0;
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > self.max {
                return Some(Err(LineTooLong));
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Some(Ok(line));
            }
        }
    }
}

/// Declares the stream dead after [`SILENCE_LIMIT`] without a complete message.
#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    last: Instant,
    limit: Duration,
}

impl Watchdog {
    /// Starts counting at `now`.
    pub fn new(now: Instant, limit: Duration) -> Self {
        Self { last: now, limit }
    }
    /// A complete message arrived at `now`.
    pub fn message(&mut self, now: Instant) {
        self.last = now;
    }
    /// When the stream is dead unless a message arrives.
    pub fn deadline(&self) -> Instant {
        self.last + self.limit
    }
    /// True when the stream is dead at `now`.
    pub fn is_dead(&self, now: Instant) -> bool {
        now >= self.deadline()
    }
}

/// What to do with a bundle from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Verified and newer: apply it.
    Apply(Box<PolicyBundle>),
    /// The version already applied: nothing to do.
    AlreadyApplied,
    /// Refused; recorded and reported.
    Refuse(Refusal),
}

/// Verifies a bundle for `appliance` with `key` against the `applied` version.
pub fn decide(
    signed: &SignedBundle,
    key: &VerifyingKey,
    appliance: &str,
    applied: Option<u64>,
) -> Decision {
    match signed.verify(key, appliance, applied) {
        Ok(b) if Some(b.version) == applied => Decision::AlreadyApplied,
        Ok(b) => Decision::Apply(Box::new(b)),
        Err(e) => Decision::Refuse(refusal(signed.version, &e)),
    }
}

/// A refusal record for a bundle error.
pub fn refusal(version: u64, e: &BundleError) -> Refusal {
    Refusal { version, reason: e.to_string() }
}

/// What the stream task tells the run loop.
#[derive(Debug)]
pub enum SyncEvent {
    /// A bundle arrived (not yet verified: the loop decides with [`decide`]).
    Bundle(Box<SignedBundle>),
    /// The stream is open.
    Connected,
    /// The stream ended; the task reconnects.
    Disconnected,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("the controller closed the stream")]
    Closed,
    #[error("no message for {}s", SILENCE_LIMIT.as_secs())]
    Silent,
    #[error("the stream broke")]
    Broken(#[source] hyper::Error),
    #[error(transparent)]
    TooLong(#[from] LineTooLong),
    #[error("the run loop stopped")]
    LoopGone,
}

/// Keeps the stream open until the loop goes away.
pub async fn stream_task(shared: Arc<Shared>, tx: mpsc::Sender<SyncEvent>) {
    let mut attempt = 0u32;
    loop {
        match client::open_stream(shared.tls(), &shared.agent).await {
            Ok(body) => {
                info!(url = %shared.agent.authority(), "bundle stream connected");
                if tx.send(SyncEvent::Connected).await.is_err() {
                    return;
                }
                let (end, got_messages) = read_stream(body, &tx).await;
                if matches!(end, StreamEnd::LoopGone) {
                    return;
                }
                if got_messages {
                    attempt = 0;
                }
                warn!(reason = %end, "bundle stream lost; reconnecting");
                if tx.send(SyncEvent::Disconnected).await.is_err() {
                    return;
                }
            }
            Err(e) => warn!(
                error = %super::chain(&e),
                attempt,
                "cannot open the bundle stream; the last-known-good state stays enforced"
            ),
        }
        let wait = backoff_delay(attempt, jitter());
        debug!(wait_ms = wait.as_millis() as u64, "reconnecting later");
        tokio::time::sleep(wait).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn read_stream(
    mut body: hyper::body::Incoming,
    tx: &mpsc::Sender<SyncEvent>,
) -> (StreamEnd, bool) {
    let mut lines = LineBuffer::default();
    let mut dog = Watchdog::new(Instant::now(), SILENCE_LIMIT);
    let mut got = false;
    loop {
        let frame = match tokio::time::timeout_at(dog.deadline(), body.frame()).await {
            Err(_) => return (StreamEnd::Silent, got),
            Ok(None) => return (StreamEnd::Closed, got),
            Ok(Some(Err(e))) => return (StreamEnd::Broken(e), got),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        lines.push(&data);
        while let Some(line) = lines.next_line() {
            let line = match line {
                Ok(l) => l,
                Err(e) => return (e.into(), got),
            };
            match serde_json::from_slice::<StreamMessage>(&line) {
                Ok(StreamMessage::Heartbeat { at }) => debug!(at, "heartbeat"),
                Ok(StreamMessage::Bundle(b)) => {
                    debug!(version = b.version, "bundle received");
                    if tx.send(SyncEvent::Bundle(Box::new(b))).await.is_err() {
                        return (StreamEnd::LoopGone, got);
                    }
                }
                Err(e) => {
                    warn!(error = %e, len = line.len(), "a stream line is not a message; ignored");
                    continue;
                }
            }
            got = true;
            dog.message(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{engine::general_purpose::STANDARD as B64, Engine as _};

    #[test]
    fn backoff_grows_to_a_minute_with_full_jitter() {
        for attempt in 0..100 {
            let cap = BACKOFF_MAX.min(BACKOFF_BASE * 2u32.saturating_pow(attempt.min(31)));
            assert!(backoff_delay(attempt, u64::MAX) <= cap);
            assert!(backoff_delay(attempt, 0) >= BACKOFF_MIN);
            for r in [1, 7, 999, 123_456_789, u64::MAX / 3] {
                let d = backoff_delay(attempt, r);
                assert!(d >= BACKOFF_MIN && d <= cap, "{attempt} {r} {d:?}");
            }
        }
        assert_eq!(backoff_delay(0, 1000), Duration::from_millis(1000));
        assert_eq!(backoff_delay(0, 1001), BACKOFF_MIN); // 0 ms, floored
        assert_eq!(backoff_delay(3, 5000), Duration::from_millis(5000));
        assert_eq!(backoff_delay(3, 8000), Duration::from_millis(8000));
        assert_eq!(backoff_delay(6, 60_000), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX, 60_000), BACKOFF_MAX);
        // Jitter spreads: different randomness, different waits.
        assert_ne!(backoff_delay(10, 12_345), backoff_delay(10, 54_321));
    }

    #[test]
    fn lines_survive_any_chunking() {
        let text =
            b"{\"type\":\"heartbeat\",\"at\":1}\n\n{\"type\":\"heartbeat\",\"at\":2}\r\n{\"ty";
        for split in 0..text.len() {
            let mut lb = LineBuffer::default();
            let mut out = Vec::new();
            for chunk in [&text[..split], &text[split..]] {
                lb.push(chunk);
                while let Some(l) = lb.next_line() {
                    out.push(l.unwrap());
                }
            }
            assert_eq!(
                out,
                [
                    b"{\"type\":\"heartbeat\",\"at\":1}".to_vec(),
                    b"{\"type\":\"heartbeat\",\"at\":2}".to_vec()
                ],
                "split at {split}"
            );
            // The partial line waits for its end.
            lb.push(b"pe\":\"heartbeat\",\"at\":3}\n");
            assert_eq!(lb.next_line(), Some(Ok(b"{\"type\":\"heartbeat\",\"at\":3}".to_vec())));
            assert_eq!(lb.next_line(), None);
        }
        // Byte by byte.
        let mut lb = LineBuffer::default();
        let mut n = 0;
        for b in text.iter() {
            lb.push(&[*b]);
            while let Some(l) = lb.next_line() {
                assert!(l.is_ok());
                n += 1;
            }
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn an_endless_line_is_refused_complete_or_not() {
        let mut lb = LineBuffer::with_max(8);
        lb.push(b"12345678\n");
        assert_eq!(lb.next_line(), Some(Ok(b"12345678".to_vec())));
        lb.push(b"123456789");
        assert_eq!(lb.next_line(), Some(Err(LineTooLong)));
        let mut lb = LineBuffer::with_max(8);
        lb.push(b"123456789\n");
        assert_eq!(lb.next_line(), Some(Err(LineTooLong)));
    }

    #[test]
    fn silence_kills_the_stream_and_messages_keep_it() {
        let t0 = Instant::now();
        let mut dog = Watchdog::new(t0, SILENCE_LIMIT);
        assert!(!dog.is_dead(t0 + Duration::from_secs(29)));
        assert!(dog.is_dead(t0 + Duration::from_secs(30)));
        dog.message(t0 + Duration::from_secs(25));
        assert!(!dog.is_dead(t0 + Duration::from_secs(54)));
        assert!(dog.is_dead(t0 + Duration::from_secs(55)));
        assert_eq!(dog.deadline(), t0 + Duration::from_secs(55));
    }

    fn signed(version: u64, appliance: &str, key: &ed25519_dalek::SigningKey) -> SignedBundle {
        PolicyBundle {
            format: airlock_proto::BUNDLE_FORMAT,
            appliance: appliance.into(),
            version,
            policy_version: 3,
            issued_at: 1_800_000_000,
            entries: vec![],
        }
        .sign(key)
    }

    #[test]
    fn bundles_are_applied_once_and_refused_with_a_reason() {
        let k = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let vk = k.verifying_key();
        let b5 = signed(5, "ward-3", &k);
        assert!(matches!(decide(&b5, &vk, "ward-3", None), Decision::Apply(b) if b.version == 5));
        assert!(matches!(decide(&b5, &vk, "ward-3", Some(4)), Decision::Apply(_)));
        assert_eq!(decide(&b5, &vk, "ward-3", Some(5)), Decision::AlreadyApplied);
        let refused = |d: Decision| match d {
            Decision::Refuse(r) => r,
            other => panic!("accepted: {other:?}"),
        };
        let older = refused(decide(&b5, &vk, "ward-3", Some(6)));
        assert_eq!(older.version, 5);
        assert!(older.reason.contains("older"), "{}", older.reason);
        let foreign = refused(decide(&signed(7, "ward-4", &k), &vk, "ward-3", Some(5)));
        assert!(foreign.reason.contains("ward-4"), "{}", foreign.reason);
        let other_key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let forged = refused(decide(&signed(7, "ward-3", &other_key), &vk, "ward-3", Some(5)));
        assert!(forged.reason.contains("signature"), "{}", forged.reason);
        let mut unsigned = signed(7, "ward-3", &k);
        unsigned.signature = String::new();
        assert!(matches!(decide(&unsigned, &vk, "ward-3", None), Decision::Refuse(_)));
        unsigned.signature = B64.encode([0u8; 64]);
        assert!(matches!(decide(&unsigned, &vk, "ward-3", None), Decision::Refuse(_)));
    }

    #[test]
    fn stream_lines_decode_as_the_protocol_says() {
        let k = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let b = signed(1, "ward-3", &k);
        let line = serde_json::to_string(&StreamMessage::Bundle(b.clone())).unwrap();
        assert!(line.starts_with("{\"type\":\"bundle\""), "{line}");
        let mut lb = LineBuffer::default();
        lb.push(format!("{line}\n{{\"type\":\"heartbeat\",\"at\":9}}\n").as_bytes());
        let first = lb.next_line().unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<StreamMessage>(&first).unwrap(),
            StreamMessage::Bundle(b)
        );
        let second = lb.next_line().unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<StreamMessage>(&second).unwrap(),
            StreamMessage::Heartbeat { at: 9 }
        );
    }
}
