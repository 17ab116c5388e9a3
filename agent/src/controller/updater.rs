//! The image updater: takes an update the controller offers in its answer to
//! a report, downloads the bundle over the agent's mTLS connection, checks it
//! against the offer, installs it on the inactive slot with
//! [`crate::update::apply`] and reboots into its trial boot.
//!
//! ```text
//! report::report_task ──offer (watch)──▶ updater_task
//!   decide(offer, release_state, failures) ─▶ Download | Ignore(why)
//!   free space (statvfs) ─▶ GET offer.path ─▶ <download_dir>/<release>.bundle.part
//!     (SHA-256 while writing, in a blocking thread; 60 s without data: stalled)
//!   size + SHA-256 = offer ─▶ rename to <release>.bundle ─▶ update::apply (blocking thread)
//!   ─▶ bundle removed ─▶ status: pending ─▶ reboot_command
//! updater_task ──UpdaterStatus (watch)──▶ Link: the next report's release state
//! ```
//!
//! A failed download is retried with backoff ([`retry_delay`]: 30 s doubling
//! to 10 min); a bundle that does not match its offer or that `apply`
//! refuses is not tried again in this agent run ([`Failures`]). Either way
//! the failure is reported (`last_failure`).
//!
//! What it is not: it never touches the dataplane (the run loop alone owns
//! it, and an update writes only the inactive slot and the ESP), so an update
//! problem can never open or close the boundary; it does not decide which
//! slot boots (systemd-boot's boot counting does) and it does not mark a slot
//! good (systemd-bless-boot does).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use airlock_proto::release::{ReleaseState, UpdateFailure, UpdateOffer};
use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, error, info, warn, Instrument as _};

use super::{chain, client, unix_now, Shared};
use crate::{
    config::AgentConfig,
    update::{self, Applied, ApplyOptions, System, UpdateError},
};

/// The first retry of a failed download waits this long.
pub const RETRY_BASE: Duration = Duration::from_secs(30);
/// No retry waits longer.
pub const RETRY_MAX: Duration = Duration::from_secs(600);
/// A download with no data for this long has stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);
/// The slowest average rate a whole download may take (16 KiB/s: 200 MiB in
/// 3.6 hours), plus [`TOTAL_SLACK`].
pub const MIN_RATE: u64 = 16 * 1024;
/// Added to every download's time limit.
pub const TOTAL_SLACK: Duration = Duration::from_secs(600);
/// The largest bundle an offer may name (a slot image and two UKIs).
pub const MAX_BUNDLE: u64 = 64 << 30;
/// Time between installing and rebooting, for a report to tell the
/// controller that the release is pending.
pub const REBOOT_GRACE: Duration = Duration::from_secs(5);
/// How long the reboot command may run.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Download progress is logged every this many bytes.
const LOG_EVERY: u64 = 32 << 20;

/// The wait before retry `attempt` (0 = the first retry) of a failed download.
pub fn retry_delay(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    RETRY_BASE.saturating_mul(factor).min(RETRY_MAX)
}

/// Offers that failed for good in this agent run, by (release, bundle
/// SHA-256), with the reason. A corrected bundle (another SHA-256) is tried.
pub type Failures = BTreeMap<(u64, String), String>;

fn key(offer: &UpdateOffer) -> (u64, String) {
    (offer.release, offer.sha256.to_ascii_lowercase())
}

/// Why an offer is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignore {
    /// `[update] enabled = false`.
    #[error("updates are disabled on this appliance ([update] enabled = false)")]
    Disabled,
    /// The agent does not run on an A/B appliance image.
    #[error("not an A/B appliance image (no airlock.slot= on the kernel command line)")]
    NoImage,
    /// The offer itself is unusable.
    #[error("the offer is malformed: {0}")]
    BadOffer(&'static str),
    /// Not newer than the running release.
    #[error("release {offered} is not newer than the running release {running}")]
    NotNewer {
        /// The offered release.
        offered: u64,
        /// The running release.
        running: u64,
    },
    /// Its trial boots failed here before.
    #[error("release {0} already failed its trial boots on this appliance")]
    FailedTrial(u64),
    /// It (or a newer release) is installed and waits for its trial boot.
    #[error("release {0} is installed and waits for its trial boot")]
    Pending(u64),
    /// The running slot is not yet marked good: writing the other slot would
    /// overwrite the only known-good one.
    #[error("the running slot is on trial; updates wait until it is marked good")]
    RunningOnTrial,
    /// This offer already failed in this agent run.
    #[error("this bundle already failed in this agent run: {0}")]
    FailedHere(String),
}

impl Ignore {
    /// Whether the controller should hear about it (as `last_failure`): the
    /// offer will never be taken as things stand.
    pub fn is_reported(&self) -> bool {
        matches!(self, Ignore::Disabled | Ignore::BadOffer(_))
    }
}

/// What to do with an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Download and install it.
    Download,
    /// Leave it.
    Ignore(Ignore),
}

fn check_offer(o: &UpdateOffer) -> Result<(), &'static str> {
    if o.sha256.len() != 64 || !o.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("sha256 is not 64 hex digits");
    }
    if o.size == 0 || o.size > MAX_BUNDLE {
        return Err("size is 0 or larger than 64 GiB");
    }
    if !o.path.starts_with('/')
        || o.path.starts_with("//")
        || o.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        || o.path.parse::<hyper::http::uri::PathAndQuery>().is_err()
    {
        return Err("path is not an absolute URL path");
    }
    Ok(())
}

/// Decides about an offer from the running system's state and the offers
/// that failed in this agent run. Pure.
pub fn decide(
    offer: &UpdateOffer,
    state: Option<&ReleaseState>,
    failed: &Failures,
    enabled: bool,
) -> Decision {
    let ignore = |why| Decision::Ignore(why);
    let Some(s) = state else { return ignore(Ignore::NoImage) };
    if !enabled {
        return ignore(Ignore::Disabled);
    }
    if let Err(why) = check_offer(offer) {
        return ignore(Ignore::BadOffer(why));
    }
    if offer.release <= s.release {
        return ignore(Ignore::NotNewer { offered: offer.release, running: s.release });
    }
    if s.failed_trials.contains(&offer.release) {
        return ignore(Ignore::FailedTrial(offer.release));
    }
    if let Some(p) = s.pending.filter(|p| *p >= offer.release) {
        return ignore(Ignore::Pending(p));
    }
    if s.on_trial {
        return ignore(Ignore::RunningOnTrial);
    }
    if let Some(why) = failed.get(&key(offer)) {
        return ignore(Ignore::FailedHere(why.clone()));
    }
    Decision::Download
}

/// The updater's own part of the reported release state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdaterStatus {
    /// The release being downloaded or written now.
    pub in_progress: Option<u64>,
    /// The release this run installed (waiting for its trial boot).
    pub pending: Option<u64>,
    /// The last offer that did not reach its trial boot, and why.
    pub last_failure: Option<UpdateFailure>,
}

impl UpdaterStatus {
    /// Adds it to the state read from the system (whose `pending`, from the
    /// ESP, wins).
    pub fn merge_into(&self, state: &mut ReleaseState) {
        state.in_progress = self.in_progress;
        state.pending = state.pending.or(self.pending.filter(|p| *p > state.release));
        state.last_failure.clone_from(&self.last_failure);
    }
}

/// Why a download or install failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdaterError {
    /// Connecting, or the controller refused the download.
    #[error("the download failed")]
    Client(#[source] client::ClientError),
    /// No data for [`STALL_LIMIT`].
    #[error("the download stalled: no data for {0} s")]
    Stalled(u64),
    /// Slower than [`MIN_RATE`] on average.
    #[error("the download took longer than its limit of {0} s")]
    TooSlow(u64),
    /// The connection broke.
    #[error("the download broke off")]
    Broken(#[source] hyper::Error),
    /// Local files.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not enough room for the bundle.
    #[error("{dir} has {free} bytes free; the bundle needs {need}")]
    NoSpace {
        /// The download directory.
        dir: String,
        /// Bytes available.
        free: u64,
        /// The bundle's size.
        need: u64,
    },
    /// The controller sent another size than it offered.
    #[error("the controller sent {got} bytes; the offer says {expected}")]
    Size {
        /// The offer's size.
        expected: u64,
        /// What arrived (or the announced length).
        got: u64,
    },
    /// The bytes are not the offered ones.
    #[error("the download's SHA-256 is {actual}; the offer says {expected}")]
    Checksum {
        /// The offer's hash.
        expected: String,
        /// The download's.
        actual: String,
    },
    /// `update::apply` refused or failed.
    #[error("installing the bundle failed")]
    Apply(#[source] UpdateError),
    /// A blocking task died.
    #[error("{0} did not finish")]
    Task(&'static str),
    /// The controller stopped offering this bundle while it downloaded; it
    /// was deleted without being installed.
    #[error("the offer was withdrawn during the download; nothing was installed")]
    Withdrawn,
    /// The reboot command failed.
    #[error("the reboot command {command:?} failed: {why}; the update boots at the next restart")]
    Reboot {
        /// The command.
        command: Vec<String>,
        /// Its exit status or error.
        why: String,
    },
}

impl UpdaterError {
    /// True when retrying the same offer cannot help: the bundle itself is
    /// wrong or refused.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            UpdaterError::Size { .. } | UpdaterError::Checksum { .. } | UpdaterError::Apply(_)
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpdaterError {
    let what = what.into();
    move |source| UpdaterError::Io { what, source }
}

/// How the updater runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Take offers at all.
    pub enabled: bool,
    /// The running system's paths.
    pub system: System,
    /// Where bundles are downloaded.
    pub download_dir: PathBuf,
    /// Run after an install; empty: no reboot.
    pub reboot_command: Vec<String>,
    /// Tries the trial entry gets.
    pub tries: u32,
    /// A download with no data for this long fails.
    pub stall_limit: Duration,
    /// Wait between installing and rebooting.
    pub reboot_grace: Duration,
}

impl Settings {
    /// From the agent configuration.
    pub fn from_config(cfg: &AgentConfig) -> Self {
        Self {
            enabled: cfg.update.enabled,
            system: cfg.update.system(),
            download_dir: cfg.update.download_dir(&cfg.appliance.state_dir),
            reboot_command: cfg.update.reboot_command.clone(),
            tries: update::DEFAULT_TRIES,
            stall_limit: STALL_LIMIT,
            reboot_grace: REBOOT_GRACE,
        }
    }
}

/// Bytes available to an unprivileged writer in `dir`'s file system.
pub fn free_bytes(dir: &Path) -> Result<u64, std::io::Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated path and a zeroed out-parameter of the right type.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statvfs only writes `st`.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // fsblkcnt_t and c_ulong are narrower than u64 on some targets.
    #[allow(clippy::useless_conversion)]
    let free = u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize));
    Ok(free)
}

/// Creates the download directory (0700) and removes bundles an earlier run
/// left behind (a crash or power cut during a download or apply).
fn prepare_dir(dir: &Path) -> Result<(), UpdaterError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    let entries = fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".bundle") || name.ends_with(".bundle.part") {
            match fs::remove_file(e.path()) {
                Ok(()) => debug!(file = %name, "removed a bundle left behind"),
                Err(err) => warn!(file = %name, error = %err, "cannot remove a bundle left behind"),
            }
        }
    }
    Ok(())
}

/// Writes and hashes what the download receives, off the runtime's thread.
fn spawn_writer(
    path: PathBuf,
    mut rx: mpsc::Receiver<Bytes>,
) -> tokio::task::JoinHandle<Result<(u64, String), UpdaterError>> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::OpenOptionsExt as _;
        let shown = path.display().to_string();
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(format!("creating {shown}")))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(b) = rx.blocking_recv() {
            h.update(&b);
            f.write_all(&b).map_err(io(format!("writing {shown}")))?;
            n += b.len() as u64;
        }
        f.sync_all().map_err(io(format!("syncing {shown}")))?;
        Ok((n, update::hex(&h.finalize())))
    })
}

/// The time a whole download of `size` bytes may take.
pub fn total_limit(size: u64) -> Duration {
    TOTAL_SLACK + Duration::from_secs(size / MIN_RATE)
}

/// Downloads the offer into `part`, checking its size and SHA-256.
async fn fetch(
    shared: &Shared,
    offer: &UpdateOffer,
    part: &Path,
    stall: Duration,
) -> Result<(), UpdaterError> {
    let (len, mut body) = client::open_download(shared.tls(), &shared.agent, &offer.path)
        .await
        .map_err(UpdaterError::Client)?;
    if let Some(l) = len.filter(|l| *l != offer.size) {
        return Err(UpdaterError::Size { expected: offer.size, got: l });
    }
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let writer = spawn_writer(part.to_owned(), rx);
    let limit = total_limit(offer.size);
    let deadline = Instant::now() + limit;
    let mut got = 0u64;
    let mut next_log = LOG_EVERY;
    let read: Result<(), UpdaterError> = loop {
        let wait = stall.min(deadline.saturating_duration_since(Instant::now()));
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) if Instant::now() >= deadline => {
                break Err(UpdaterError::TooSlow(limit.as_secs()))
            }
            Err(_) => break Err(UpdaterError::Stalled(stall.as_secs())),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(UpdaterError::Broken(e)),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        got += data.len() as u64;
        if got > offer.size {
            break Err(UpdaterError::Size { expected: offer.size, got });
        }
        if tx.send(data).await.is_err() {
            // The writer failed: its error follows.
            break Ok(());
        }
        if got >= next_log {
            info!(mib = got >> 20, of_mib = offer.size.div_ceil(1 << 20), "downloading");
            next_log = got + LOG_EVERY;
        }
    };
    drop(tx);
    let written = writer.await.map_err(|_| UpdaterError::Task("the download writer"))?;
    read?;
    let (n, sha) = written?;
    if n != offer.size {
        return Err(UpdaterError::Size { expected: offer.size, got: n });
    }
    if !sha.eq_ignore_ascii_case(&offer.sha256) {
        return Err(UpdaterError::Checksum { expected: offer.sha256.clone(), actual: sha });
    }
    Ok(())
}

/// Downloads an offer to `<dir>/<release>.bundle` (via `.bundle.part`).
pub async fn download(
    shared: &Shared,
    offer: &UpdateOffer,
    dir: &Path,
    stall: Duration,
) -> Result<PathBuf, UpdaterError> {
    prepare_dir(dir)?;
    let free =
        free_bytes(dir).map_err(io(format!("checking the free space in {}", dir.display())))?;
    if free < offer.size {
        return Err(UpdaterError::NoSpace {
            dir: dir.display().to_string(),
            free,
            need: offer.size,
        });
    }
    let part = dir.join(format!("{}.bundle.part", offer.release));
    if let Err(e) = fetch(shared, offer, &part, stall).await {
        let _ = fs::remove_file(&part);
        return Err(e);
    }
    let done = dir.join(format!("{}.bundle", offer.release));
    fs::rename(&part, &done).map_err(io(format!("renaming {}", part.display())))?;
    Ok(done)
}

/// Runs the reboot command (nothing when it is empty).
async fn reboot(command: &[String], grace: Duration) -> Result<(), UpdaterError> {
    let Some((program, args)) = command.split_first() else { return Ok(()) };
    tokio::time::sleep(grace).await;
    info!(command = ?command, "rebooting into the trial boot");
    let (program, args) = (program.clone(), args.to_vec());
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(program).args(args).stdin(std::process::Stdio::null()).status()
    });
    let failed = |why: String| UpdaterError::Reboot { command: command.to_vec(), why };
    match tokio::time::timeout(REBOOT_TIMEOUT, run).await {
        Err(_) => Err(failed(format!("no exit within {} s", REBOOT_TIMEOUT.as_secs()))),
        Ok(Err(_)) => Err(UpdaterError::Task("the reboot command")),
        Ok(Ok(Err(e))) => Err(failed(e.to_string())),
        Ok(Ok(Ok(s))) if !s.success() => Err(failed(s.to_string())),
        Ok(Ok(Ok(_))) => Ok(()),
    }
}

struct Retry {
    key: (u64, String),
    attempt: u32,
    at: Instant,
}

/// The updater task's state.
struct Updater {
    shared: Arc<Shared>,
    /// The newest offer (what the last report answer said), looked at again
    /// before installing and before rebooting: a stopped rollout stops there.
    offers: watch::Receiver<Option<UpdateOffer>>,
    settings: Settings,
    status: watch::Sender<UpdaterStatus>,
    failed: Failures,
    retry: Option<Retry>,
    /// The last reason an offer was ignored, or the state unreadable (logged once).
    last_note: Option<String>,
}

impl Updater {
    fn set(&self, f: impl FnOnce(&mut UpdaterStatus)) {
        self.status.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    fn note(&mut self, text: String, log: impl FnOnce(&str)) {
        if self.last_note.as_deref() != Some(text.as_str()) {
            log(&text);
            self.last_note = Some(text);
        }
    }

    /// Whether the newest report answer still offers exactly this bundle.
    fn still_offered(&self, offer: &UpdateOffer) -> bool {
        self.offers
            .borrow()
            .as_ref()
            .is_some_and(|o| o.release == offer.release && o.sha256 == offer.sha256)
    }

    fn fail(&self, release: u64, reason: String) {
        self.set(|s| {
            s.in_progress = None;
            if s.last_failure.as_ref().is_none_or(|f| f.release != release || f.reason != reason) {
                s.last_failure = Some(UpdateFailure { release, reason, at: unix_now() });
            }
        });
    }

    async fn handle(&mut self, offer: &UpdateOffer) {
        let k = key(offer);
        match &self.retry {
            Some(r) if r.key == k && Instant::now() < r.at => return,
            Some(r) if r.key != k => self.retry = None,
            _ => {}
        }
        let state = match update::read_release_state(&self.settings.system) {
            Ok(s) => s,
            Err(e) => {
                let text = format!("cannot read the image state: {}", chain(&e));
                self.note(text, |t| warn!(release = offer.release, "{t}; the offer waits"));
                return;
            }
        };
        match decide(offer, state.as_ref(), &self.failed, self.settings.enabled) {
            Decision::Ignore(why) => {
                let text = why.to_string();
                if why.is_reported() {
                    self.fail(offer.release, text.clone());
                }
                self.note(text, |t| {
                    info!(release = offer.release, reason = t, "update offer ignored")
                });
            }
            Decision::Download => {
                self.last_note = None;
                let span = tracing::info_span!(
                    "update",
                    release = offer.release,
                    size = offer.size,
                    image_version = %offer.image_version
                );
                self.install(offer).instrument(span).await;
            }
        }
    }

    async fn install(&mut self, offer: &UpdateOffer) {
        info!(
            attempt = self.retry.as_ref().map_or(0, |r| r.attempt + 1),
            "update offered: downloading"
        );
        self.set(|s| s.in_progress = Some(offer.release));
        match self.download_and_apply(offer).await {
            Ok(done) => {
                info!(slot = %done.slot, entry = %done.entry, "update installed; the next boot tries it");
                self.retry = None;
                self.set(|s| {
                    s.in_progress = None;
                    s.pending = Some(done.release);
                    s.last_failure = None;
                });
                if self.settings.reboot_command.is_empty() {
                    info!("no reboot command configured: the update boots at the next restart");
                } else if !self.still_offered(offer) {
                    info!("the offer was withdrawn after the install: not rebooting; the update boots at the next restart");
                } else if let Err(e) =
                    reboot(&self.settings.reboot_command, self.settings.reboot_grace).await
                {
                    let reason = chain(&e);
                    error!(error = %reason, "cannot reboot into the update");
                    self.fail(offer.release, reason);
                }
            }
            Err(e) => {
                let reason = chain(&e);
                if e.is_final() {
                    error!(error = %reason, "update failed; this bundle is not tried again until the agent restarts");
                    self.failed.insert(key(offer), reason.clone());
                    self.retry = None;
                } else {
                    let attempt = match &self.retry {
                        Some(r) if r.key == key(offer) => r.attempt + 1,
                        _ => 0,
                    };
                    let wait = retry_delay(attempt);
                    warn!(error = %reason, retry_in_secs = wait.as_secs(), "update download failed; will retry");
                    self.retry =
                        Some(Retry { key: key(offer), attempt, at: Instant::now() + wait });
                }
                self.fail(offer.release, reason);
            }
        }
    }

    async fn download_and_apply(&self, offer: &UpdateOffer) -> Result<Applied, UpdaterError> {
        let dir = &self.settings.download_dir;
        let bundle = download(&self.shared, offer, dir, self.settings.stall_limit).await?;
        if !self.still_offered(offer) {
            if let Err(e) = fs::remove_file(&bundle) {
                warn!(file = %bundle.display(), error = %e, "cannot remove the withdrawn bundle");
            }
            return Err(UpdaterError::Withdrawn);
        }
        info!(file = %bundle.display(), "download complete and matches the offer; applying");
        let (sys, tries, path) =
            (self.settings.system.clone(), self.settings.tries, bundle.clone());
        let release = offer.release;
        let span = tracing::Span::current();
        let applied = tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            let opts = ApplyOptions { tries, retry: false, expect_release: Some(release) };
            update::apply(&path, &sys, opts, &mut |l| {
                info!("{l}");
            })
        })
        .await;
        if let Err(e) = fs::remove_file(&bundle) {
            warn!(file = %bundle.display(), error = %e, "cannot remove the applied bundle");
        }
        applied.map_err(|_| UpdaterError::Task("update apply"))?.map_err(UpdaterError::Apply)
    }
}

/// Takes offers from the report task until it goes away; publishes the
/// updater's status for the reports.
pub async fn updater_task(
    shared: Arc<Shared>,
    settings: Settings,
    mut offers: watch::Receiver<Option<UpdateOffer>>,
    status: watch::Sender<UpdaterStatus>,
) {
    let mut u = Updater {
        shared,
        offers: offers.clone(),
        settings,
        status,
        failed: Failures::new(),
        retry: None,
        last_note: None,
    };
    loop {
        // Only a retry still ahead arms the timer: one that is due waits for
        // the next offer (an offer ignored meanwhile must not spin this loop).
        let retry_at = u.retry.as_ref().map(|r| r.at).filter(|at| *at > Instant::now());
        tokio::select! {
            changed = offers.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
        }
        let offer = offers.borrow_and_update().clone();
        match offer {
            Some(o) => u.handle(&o).await,
            None => u.last_note = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(release: u64) -> UpdateOffer {
        UpdateOffer {
            release,
            image_version: format!("0.1.0+r{release}"),
            size: 4096,
            sha256: "ab".repeat(32),
            path: format!("/agent/v1/releases/{release}/bundle"),
        }
    }

    fn state(release: u64) -> ReleaseState {
        ReleaseState { release, slot: "a".into(), ..ReleaseState::default() }
    }

    #[test]
    fn offers_are_taken_only_when_newer_and_not_failed_or_pending() {
        let none = Failures::new();
        let o = offer(5);
        assert_eq!(decide(&o, Some(&state(4)), &none, true), Decision::Download);
        let ign = |d: Decision| match d {
            Decision::Ignore(i) => i,
            Decision::Download => panic!("taken"),
        };
        assert_eq!(ign(decide(&o, None, &none, true)), Ignore::NoImage);
        assert_eq!(ign(decide(&o, Some(&state(4)), &none, false)), Ignore::Disabled);
        assert_eq!(
            ign(decide(&o, Some(&state(5)), &none, true)),
            Ignore::NotNewer { offered: 5, running: 5 }
        );
        assert!(matches!(ign(decide(&o, Some(&state(6)), &none, true)), Ignore::NotNewer { .. }));
        let failed = ReleaseState { failed_trials: vec![3, 5], ..state(4) };
        assert_eq!(ign(decide(&o, Some(&failed), &none, true)), Ignore::FailedTrial(5));
        for p in [5, 6] {
            let pending = ReleaseState { pending: Some(p), ..state(4) };
            assert_eq!(ign(decide(&o, Some(&pending), &none, true)), Ignore::Pending(p));
        }
        // A newer offer than the pending release replaces it.
        let pending = ReleaseState { pending: Some(5), ..state(4) };
        assert_eq!(decide(&offer(6), Some(&pending), &none, true), Decision::Download);
        let trial = ReleaseState { on_trial: true, ..state(4) };
        assert_eq!(ign(decide(&o, Some(&trial), &none, true)), Ignore::RunningOnTrial);
        // Remembered by release and bundle hash (either case).
        let mut here = Failures::new();
        here.insert((5, "ab".repeat(32)), "signature".into());
        assert_eq!(
            ign(decide(&o, Some(&state(4)), &here, true)),
            Ignore::FailedHere("signature".into())
        );
        let upper = UpdateOffer { sha256: "AB".repeat(32), ..offer(5) };
        assert!(matches!(ign(decide(&upper, Some(&state(4)), &here, true)), Ignore::FailedHere(_)));
        let other = UpdateOffer { sha256: "cd".repeat(32), ..offer(5) };
        assert_eq!(decide(&other, Some(&state(4)), &here, true), Decision::Download);
        // Only what never changes on its own is reported.
        assert!(Ignore::Disabled.is_reported() && Ignore::BadOffer("x").is_reported());
        assert!(!Ignore::Pending(5).is_reported() && !Ignore::RunningOnTrial.is_reported());
    }

    #[test]
    fn malformed_offers_are_ignored() {
        let none = Failures::new();
        let bad = [
            UpdateOffer { sha256: "ab".into(), ..offer(5) },
            UpdateOffer { sha256: "zz".repeat(32), ..offer(5) },
            UpdateOffer { size: 0, ..offer(5) },
            UpdateOffer { size: MAX_BUNDLE + 1, ..offer(5) },
            UpdateOffer { path: "agent/v1/x".into(), ..offer(5) },
            UpdateOffer { path: "//evil.example/x".into(), ..offer(5) },
            UpdateOffer { path: "/a b".into(), ..offer(5) },
            UpdateOffer { path: "https://evil.example/x".into(), ..offer(5) },
        ];
        for o in bad {
            assert!(
                matches!(
                    decide(&o, Some(&state(4)), &none, true),
                    Decision::Ignore(Ignore::BadOffer(_))
                ),
                "{o:?}"
            );
        }
    }

    #[test]
    fn retries_back_off_from_30_s_to_10_min() {
        let secs: Vec<u64> = (0..7).map(|a| retry_delay(a).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
        // 200 MiB may take hours; a tiny bundle still gets the slack.
        assert!(total_limit(200 << 20) > Duration::from_secs(3 * 3600));
        assert_eq!(total_limit(1), TOTAL_SLACK);
    }

    #[test]
    fn the_updaters_status_completes_the_system_state() {
        let mut st = ReleaseState { pending: None, ..state(4) };
        let fail = UpdateFailure { release: 5, reason: "x".into(), at: 1 };
        UpdaterStatus { in_progress: Some(5), pending: None, last_failure: Some(fail.clone()) }
            .merge_into(&mut st);
        assert_eq!((st.in_progress, st.pending), (Some(5), None));
        assert_eq!(st.last_failure, Some(fail));
        let mut st = state(4);
        UpdaterStatus { pending: Some(5), ..UpdaterStatus::default() }.merge_into(&mut st);
        assert_eq!(st.pending, Some(5));
        // After the reboot into it, the installed release runs: not pending.
        let mut st = state(5);
        UpdaterStatus { pending: Some(5), ..UpdaterStatus::default() }.merge_into(&mut st);
        assert_eq!(st.pending, None);
    }

    #[test]
    fn free_space_is_read_from_the_file_system() {
        assert!(free_bytes(&std::env::temp_dir()).unwrap() > 0);
        assert!(free_bytes(Path::new("/nonexistent/airlock")).is_err());
    }
}
