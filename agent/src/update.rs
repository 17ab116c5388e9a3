//! A/B updates of the appliance image: signed bundles, the two root slots and
//! systemd-boot's trial entries with boot counting.
//!
//! A bundle is a ustar archive of `manifest.json`, `manifest.json.sig`
//! (Ed25519 over the manifest's bytes, hex, as `cargo xtask image` signs the
//! image), `root.img` (erofs + its dm-verity hash tree) and `uki-a.efi`,
//! `uki-b.efi` (the same kernel with each slot's command line and root hash).
//! Built by `cargo xtask image update-bundle`.
//!
//! `update apply` ([`apply`]) verifies everything before it writes anything:
//! the signature with the key in the verity-protected root, the manifest,
//! that the release is newer than the running one, that the file sizes match
//! the manifest and fit the partition, and the SHA-256 of the slot image and
//! of the UKI it installs. Then it removes the inactive slot's old boot entry,
//! writes the slot, drops the page cache and reads it back, and installs the
//! UKI as `airlock-<release>-<slot>+<tries>.efi`. systemd-boot boots the
//! entry with the highest release that has tries left, counting each try in
//! the file name; `systemd-bless-boot` renames it to `airlock-<release>-<slot>.efi`
//! once `boot-complete.target` is reached (the image's boot check: the agent
//! enforces its policy). When the tries run out, the entry sorts last and the
//! previous slot boots again.
//!
//! The bundle format (tar index, manifest and its signature) is
//! `airlock_proto::release`, shared with the controller, which checks a
//! bundle the same way before it offers it. The pure parts here
//! (applicability, entry names, the reported [`release_state`]) take values;
//! [`apply`] and [`read_release_state`] do the IO around them. Downloading an
//! offered bundle is the controller link's updater (`controller::updater`).
//!
//! What it is not: nothing here touches the dataplane; an update writes only
//! the inactive slot and the ESP, so enforcement never depends on it.

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

pub use airlock_proto::release::{
    hex, open_verified, read_member, tar_index, verify_manifest, FileRef, Manifest, Member,
    ReleaseError, ReleaseState, RootRef, VerifiedBundle, FORMAT, MANIFEST, MAX_UKI, ROOT_IMAGE,
    SIGNATURE,
};
/// Tries a trial entry gets unless told otherwise: one power cut during the
/// trial is tolerated, two failed boots in a row return to the previous slot
/// (the boundary stays closed meanwhile, so a quick return matters).
pub const DEFAULT_TRIES: u32 = 2;
/// systemd-boot's boot counters are single digits here (1..=9).
pub const MAX_TRIES: u32 = 9;

/// Where the running system keeps what `apply` needs.
#[derive(Debug, Clone)]
pub struct System {
    /// The ESP's `EFI/Linux` directory (UKIs, one per slot).
    pub uki_dir: PathBuf,
    /// The update key (64 hex digits), in the verity-protected root.
    pub public_key: PathBuf,
    /// The running image's release number, in the verity-protected root.
    pub release_file: PathBuf,
    /// The kernel command line (`airlock.slot=a|b`).
    pub cmdline: PathBuf,
    /// Directory holding the slots' block devices by GPT name
    /// (`airlock-root-a`, `airlock-root-b`).
    pub partitions: PathBuf,
}

impl Default for System {
    fn default() -> Self {
        System {
            uki_dir: "/efi/EFI/Linux".into(),
            public_key: "/usr/share/airlock/image-signing.pub".into(),
            release_file: "/usr/share/airlock/release".into(),
            cmdline: "/proc/cmdline".into(),
            partitions: "/dev/disk/by-partlabel".into(),
        }
    }
}

/// Why an update was refused or failed. Every refusal before [`Applied`]
/// happens before anything is written, unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] ReleaseError),
    #[error("the update key {0} is not an Ed25519 public key (64 hex digits)")]
    BadKey(PathBuf),
    #[error(
        "release {bundle} is not newer than the running release {running}: downgrades \
         and re-installs are refused"
    )]
    Downgrade { bundle: u64, running: u64 },
    #[error(
        "release {release} already failed its trial boots on this appliance (boot entry \
         {entry}); pass --retry to try it again"
    )]
    FailedBefore { release: u64, entry: String },
    #[error(
        "the running slot {slot} is itself on trial (boot entry {entry}) and not yet marked \
         good: updating now would overwrite the only known-good slot"
    )]
    RunningOnTrial { slot: Slot, entry: String },
    #[error("the slot image ({size} bytes) does not fit partition {partition} ({capacity} bytes)")]
    TooLarge { size: u64, partition: String, capacity: u64 },
    #[error("{file} does not match the signed manifest (sha256 {actual}, expected {expected})")]
    Checksum { file: String, expected: String, actual: String },
    #[error(
        "slot {slot} read back differs from the bundle (sha256 {actual}, expected {expected}); \
         no boot entry was installed for it"
    )]
    ReadBack { slot: Slot, expected: String, actual: String },
    #[error("cannot tell the running system: {0}")]
    Running(String),
    #[error("the bundle is release {bundle}, but release {expected} was offered")]
    NotTheOffered { expected: u64, bundle: u64 },
    #[error("another update is writing slot {0} now")]
    Busy(Slot),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpdateError {
    let what = what.into();
    move |source| UpdateError::Io { what, source }
}

/// A root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// The slot's GPT partition name.
    pub fn partition(self) -> String {
        format!("airlock-root-{}", self.letter())
    }

    /// The bundle's UKI for this slot.
    pub fn uki_file(self) -> String {
        format!("uki-{}.efi", self.letter())
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// A UKI on the ESP: `airlock-<release>-<slot>[+<left>[-<done>]].efi`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub release: u64,
    pub slot: Slot,
    /// None: marked good (no counter). Some(0): the tries ran out.
    pub tries_left: Option<u32>,
    pub tries_done: u32,
}

impl BootEntry {
    /// A new trial entry's file name.
    pub fn trial(release: u64, slot: Slot, tries: u32) -> BootEntry {
        BootEntry { release, slot, tries_left: Some(tries), tries_done: 0 }
    }

    pub fn file_name(&self) -> String {
        let base = format!("airlock-{}-{}", self.release, self.slot);
        match self.tries_left {
            None => format!("{base}.efi"),
            Some(l) if self.tries_done == 0 => format!("{base}+{l}.efi"),
            Some(l) => format!("{base}+{l}-{}.efi", self.tries_done),
        }
    }

    /// Parses a file name in `EFI/Linux`; None for anything else.
    pub fn parse(name: &str) -> Option<BootEntry> {
        let stem = name.strip_suffix(".efi")?.strip_prefix("airlock-")?;
        let (main, counter) = match stem.split_once('+') {
            Some((m, c)) => (m, Some(c)),
            None => (stem, None),
        };
        let (release, slot) = main.split_once('-')?;
        if release.is_empty() || !release.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let release = release.parse().ok()?;
        let slot = Slot::parse(slot)?;
        let num = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
        };
        let (tries_left, tries_done) = match counter {
            None => (None, 0),
            Some(c) => match c.split_once('-') {
                Some((l, d)) => (Some(num(l)?), num(d)?),
                None => (Some(num(c)?), 0),
            },
        };
        Some(BootEntry { release, slot, tries_left, tries_done })
    }

    /// Marked good by systemd-bless-boot.
    pub fn is_good(&self) -> bool {
        self.tries_left.is_none()
    }

    /// The tries ran out: systemd-boot sorts it last and boots another.
    pub fn is_failed(&self) -> bool {
        self.tries_left == Some(0)
    }

    pub fn state(&self) -> String {
        match self.tries_left {
            None => "good".to_owned(),
            Some(0) => format!("failed ({} tries used)", self.tries_done),
            Some(l) => format!("on trial ({l} tries left, {} used)", self.tries_done),
        }
    }
}

/// The running system as far as the update cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    pub slot: Slot,
    pub release: u64,
}

/// What [`apply`] will do, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: Slot,
    /// Entries of the target slot to remove before its partition is written
    /// (they would boot a slot being overwritten).
    pub remove: Vec<String>,
    /// The trial entry to install last.
    pub entry: BootEntry,
}

/// Decides whether a verified manifest may be applied and how.
pub fn plan(
    m: &Manifest,
    running: Running,
    entries: &[String],
    partition_capacity: u64,
    tries: u32,
    retry: bool,
) -> Result<Plan, UpdateError> {
    if m.release <= running.release {
        return Err(UpdateError::Downgrade { bundle: m.release, running: running.release });
    }
    let parsed: Vec<(String, BootEntry)> =
        entries.iter().filter_map(|n| BootEntry::parse(n).map(|e| (n.clone(), e))).collect();
    if let Some((name, _)) = parsed
        .iter()
        .find(|(_, e)| e.slot == running.slot && e.release == running.release && !e.is_good())
    {
        return Err(UpdateError::RunningOnTrial { slot: running.slot, entry: name.clone() });
    }
    if !retry {
        if let Some((name, _)) =
            parsed.iter().find(|(_, e)| e.release == m.release && e.is_failed())
        {
            return Err(UpdateError::FailedBefore { release: m.release, entry: name.clone() });
        }
    }
    let target = running.slot.other();
    if m.root.size > partition_capacity {
        return Err(UpdateError::TooLarge {
            size: m.root.size,
            partition: target.partition(),
            capacity: partition_capacity,
        });
    }
    // The target slot's entries, and any half-written entry a power cut left behind.
    let remove = parsed
        .iter()
        .filter(|(_, e)| e.slot == target)
        .map(|(n, _)| n.clone())
        .chain(entries.iter().filter(|n| is_partial_entry(n)).cloned())
        .collect();
    Ok(Plan {
        target,
        remove,
        entry: BootEntry::trial(m.release, target, tries.clamp(1, MAX_TRIES)),
    })
}

/// An entry being written (`airlock-….efi.new`): systemd-boot ignores it.
fn is_partial_entry(name: &str) -> bool {
    name.strip_suffix(".new").and_then(BootEntry::parse).is_some()
}

/// The slot and release of the running system: `airlock.slot=` on the
/// command line, the release file of its root.
pub fn parse_running(cmdline: &str, release: &str) -> Result<Running, UpdateError> {
    let slot = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("airlock.slot="))
        .and_then(Slot::parse)
        .ok_or_else(|| {
            UpdateError::Running("no airlock.slot=a|b on the kernel command line".into())
        })?;
    let release = release
        .trim()
        .parse()
        .map_err(|_| UpdateError::Running(format!("release file holds {:?}", release.trim())))?;
    Ok(Running { slot, release })
}

/// The image state the agent reports, from the kernel command line, the
/// running root's release file and the names in `EFI/Linux`.
///
/// `Ok(None)`: no `airlock.slot=` on the command line, i.e. not an A/B
/// appliance image (an agent on a lab host). An A/B system whose release file
/// does not parse is an error. `in_progress` and `last_failure` are the
/// updater's to fill in.
///
/// - `on_trial`: the running slot's entry for the running release still has
///   a tries counter (not yet marked good by systemd-bless-boot);
/// - `failed_trials`: releases whose entries ran out of tries (the running
///   one excepted: it may be booting on its last try);
/// - `pending`: the highest release above the running one with a trial entry
///   for the other slot that has tries left (installed, not booted yet).
pub fn release_state(
    cmdline: &str,
    release: &str,
    entries: &[String],
) -> Result<Option<ReleaseState>, UpdateError> {
    if !cmdline.split_whitespace().any(|w| w.starts_with("airlock.slot=")) {
        return Ok(None);
    }
    let running = parse_running(cmdline, release)?;
    let parsed: Vec<BootEntry> = entries.iter().filter_map(|n| BootEntry::parse(n)).collect();
    let is_running = |e: &BootEntry| e.slot == running.slot && e.release == running.release;
    let on_trial = parsed.iter().any(|e| is_running(e) && !e.is_good());
    let mut failed_trials: Vec<u64> =
        parsed.iter().filter(|e| e.is_failed() && !is_running(e)).map(|e| e.release).collect();
    failed_trials.sort_unstable();
    failed_trials.dedup();
    let pending = parsed
        .iter()
        .filter(|e| {
            e.slot == running.slot.other()
                && e.release > running.release
                && e.tries_left.is_some_and(|l| l > 0)
        })
        .map(|e| e.release)
        .max();
    Ok(Some(ReleaseState {
        release: running.release,
        slot: running.slot.to_string(),
        on_trial,
        failed_trials,
        in_progress: None,
        pending,
        last_failure: None,
    }))
}

/// [`release_state`] of the system `sys` describes: reads the command line,
/// and only on an A/B image the release file and one directory listing.
pub fn read_release_state(sys: &System) -> Result<Option<ReleaseState>, UpdateError> {
    let cmdline = fs::read_to_string(&sys.cmdline)
        .map_err(io(format!("reading {}", sys.cmdline.display())))?;
    if !cmdline.split_whitespace().any(|w| w.starts_with("airlock.slot=")) {
        return Ok(None);
    }
    let release = fs::read_to_string(&sys.release_file)
        .map_err(io(format!("reading {}", sys.release_file.display())))?;
    release_state(&cmdline, &release, &list_entries(&sys.uki_dir)?)
}

/// SHA-256 of `len` bytes from `r`, optionally copied into `w`.
fn hash_copy(
    r: &mut impl Read,
    len: u64,
    mut w: Option<&mut fs::File>,
    what: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<String, UpdateError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    let mut next_report = 0u64;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        r.read_exact(&mut buf[..n]).map_err(io(format!("{what}: reading")))?;
        h.update(&buf[..n]);
        if let Some(w) = w.as_deref_mut() {
            w.write_all(&buf[..n]).map_err(io(format!("{what}: writing")))?;
        }
        left -= n as u64;
        let done = len - left;
        if done >= next_report {
            progress(&format!("{what}: {} of {} MiB", done >> 20, len.div_ceil(1 << 20)));
            next_report = done + (32 << 20);
        }
    }
    Ok(hex(&h.finalize()))
}

/// Lists `EFI/Linux`.
pub fn list_entries(dir: &Path) -> Result<Vec<String>, UpdateError> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    v.sort();
    Ok(v)
}

/// The result of a successful apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub slot: Slot,
    pub release: u64,
    pub image_version: String,
    pub entry: String,
}

/// Options of `update apply`.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    pub tries: u32,
    /// Try a release again whose trial already failed here.
    pub retry: bool,
    /// The release the bundle must carry (the controller's offer): another
    /// one is refused before anything is written.
    pub expect_release: Option<u64>,
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))
}

/// Verifies a bundle and, only when everything checks, writes the inactive
/// slot and installs its trial boot entry. `progress` gets one line per step.
pub fn apply(
    bundle: &Path,
    sys: &System,
    opts: ApplyOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Applied, UpdateError> {
    let mut f = fs::File::open(bundle).map_err(io(format!("opening {}", bundle.display())))?;
    let key = fs::read_to_string(&sys.public_key)
        .map_err(io(format!("reading the update key {}", sys.public_key.display())))?;
    let VerifiedBundle { members, manifest: m } =
        open_verified(&mut f, &key).map_err(|e| match e {
            ReleaseError::BadKey => UpdateError::BadKey(sys.public_key.clone()),
            e => UpdateError::Bundle(e),
        })?;
    progress(&format!("signature ok: release {} ({})", m.release, m.image_version));
    if let Some(expected) = opts.expect_release.filter(|r| *r != m.release) {
        return Err(UpdateError::NotTheOffered { expected, bundle: m.release });
    }
    let cmdline = fs::read_to_string(&sys.cmdline)
        .map_err(io(format!("reading {}", sys.cmdline.display())))?;
    let release = fs::read_to_string(&sys.release_file)
        .map_err(io(format!("reading {}", sys.release_file.display())))?;
    let running = parse_running(&cmdline, &release)?;
    let entries = list_entries(&sys.uki_dir)?;
    let target_dev = sys.partitions.join(running.slot.other().partition());
    let mut dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target_dev)
        .map_err(io(format!("opening {}", target_dev.display())))?;
    // One writer per slot: the controller's updater, update media and a
    // technician's `update apply` may otherwise race on the same slot.
    if !try_lock(&dev) {
        return Err(UpdateError::Busy(running.slot.other()));
    }
    let capacity = dev.seek(SeekFrom::End(0)).map_err(io("sizing the target partition"))?;
    let plan = plan(&m, running, &entries, capacity, opts.tries, opts.retry)?;
    let uki_name = plan.target.uki_file();
    progress(&format!(
        "running slot {} release {}; target slot {} ({} MiB partition)",
        running.slot,
        running.release,
        plan.target,
        capacity >> 20
    ));
    // Every byte that will be written is checked first.
    let root = members[ROOT_IMAGE];
    f.seek(SeekFrom::Start(root.offset)).map_err(io("reading the bundle"))?;
    let got = hash_copy(&mut f, root.size, None, "checking root.img", progress)?;
    if got != m.root.sha256 {
        return Err(UpdateError::Checksum {
            file: ROOT_IMAGE.into(),
            expected: m.root.sha256.clone(),
            actual: got,
        });
    }
    let uki = read_member(
        &mut f,
        &members,
        if plan.target == Slot::A { "uki-a.efi" } else { "uki-b.efi" },
        MAX_UKI,
    )?;
    let got = hex(&Sha256::digest(&uki));
    if got != m.ukis[&uki_name].sha256 {
        return Err(UpdateError::Checksum {
            file: uki_name,
            expected: m.ukis[&plan.target.uki_file()].sha256.clone(),
            actual: got,
        });
    }
    progress("bundle verified: writing");

    // 1. No entry may boot the slot while it is rewritten.
    for name in &plan.remove {
        let p = sys.uki_dir.join(name);
        fs::remove_file(&p).map_err(io(format!("removing {}", p.display())))?;
        progress(&format!("removed the old entry {name} of slot {}", plan.target));
    }
    sync_dir(&sys.uki_dir)?;
    // 2. The slot, then a read-back past the page cache.
    f.seek(SeekFrom::Start(root.offset)).map_err(io("reading the bundle"))?;
    dev.seek(SeekFrom::Start(0)).map_err(io("seeking the target partition"))?;
    let what = format!("writing slot {}", plan.target);
    let written = hash_copy(&mut f, root.size, Some(&mut dev), &what, progress)?;
    dev.sync_all().map_err(io("syncing the target partition"))?;
    drop_cache(&dev);
    dev.seek(SeekFrom::Start(0)).map_err(io("seeking the target partition"))?;
    let back = hash_copy(&mut dev, root.size, None, "reading the slot back", progress)?;
    if written != m.root.sha256 || back != m.root.sha256 {
        return Err(UpdateError::ReadBack {
            slot: plan.target,
            expected: m.root.sha256.clone(),
            actual: if written == m.root.sha256 { back } else { written },
        });
    }
    drop(dev);
    // 3. The trial entry: written under a name systemd-boot ignores, then renamed.
    let name = plan.entry.file_name();
    let tmp = sys.uki_dir.join(format!("{name}.new"));
    {
        let mut out = fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        out.write_all(&uki).map_err(io(format!("writing {}", tmp.display())))?;
        out.sync_all().map_err(io(format!("syncing {}", tmp.display())))?;
    }
    let fin = sys.uki_dir.join(&name);
    fs::rename(&tmp, &fin).map_err(io(format!("renaming to {}", fin.display())))?;
    sync_dir(&sys.uki_dir)?;
    progress(&format!("installed the trial entry {name}"));
    Ok(Applied {
        slot: plan.target,
        release: m.release,
        image_version: m.image_version,
        entry: name,
    })
}

/// Takes an exclusive advisory lock on the target slot's device, held until
/// it is closed; false when another process holds it.
fn try_lock(f: &fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid fd; flock has no memory effects.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Drops the written range from the page cache so the read-back reads the disk.
fn drop_cache(f: &fs::File) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid fd; advice only.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// `update status`: the running slot and release, and every boot entry.
pub fn status(sys: &System) -> Result<String, UpdateError> {
    let cmdline = fs::read_to_string(&sys.cmdline)
        .map_err(io(format!("reading {}", sys.cmdline.display())))?;
    let release = fs::read_to_string(&sys.release_file)
        .map_err(io(format!("reading {}", sys.release_file.display())))?;
    let running = parse_running(&cmdline, &release)?;
    let mut out = format!("running: slot {} release {}\n", running.slot, running.release);
    for name in list_entries(&sys.uki_dir)? {
        if let Some(e) = BootEntry::parse(&name) {
            out.push_str(&format!(
                "entry {name}: slot {} release {} {}\n",
                e.slot,
                e.release,
                e.state()
            ));
        }
    }
    Ok(out)
}

/// Test bundles and file-backed systems, shared with the updater's tests.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use airlock_proto::release::testing::{manifest_for, members, sign, tar};
    use ed25519_dalek::SigningKey;

    pub(crate) struct Fixture {
        pub(crate) dir: PathBuf,
        pub(crate) sys: System,
        pub(crate) key: SigningKey,
        pub(crate) root: Vec<u8>,
        pub(crate) uki_a: Vec<u8>,
        pub(crate) uki_b: Vec<u8>,
    }

    pub(crate) const PART: u64 = 64 * 1024;

    impl Fixture {
        pub(crate) fn new(tag: &str) -> Fixture {
            let dir =
                std::env::temp_dir().join(format!("airlock-update-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            let parts = dir.join("by-partlabel");
            let uki_dir = dir.join("EFI/Linux");
            fs::create_dir_all(&parts).unwrap();
            fs::create_dir_all(&uki_dir).unwrap();
            let key = SigningKey::from_bytes(&[7; 32]);
            fs::write(dir.join("key.pub"), hex(key.verifying_key().as_bytes()) + "\n").unwrap();
            fs::write(dir.join("release"), "1\n").unwrap();
            fs::write(dir.join("cmdline"), "root=/dev/mapper/airlock-root airlock.slot=a ro\n")
                .unwrap();
            fs::write(parts.join("airlock-root-a"), vec![0xaa; PART as usize]).unwrap();
            fs::write(parts.join("airlock-root-b"), vec![0x55; PART as usize]).unwrap();
            fs::write(uki_dir.join("airlock-1-a.efi"), b"uki a release 1").unwrap();
            let sys = System {
                uki_dir,
                public_key: dir.join("key.pub"),
                release_file: dir.join("release"),
                cmdline: dir.join("cmdline"),
                partitions: parts,
            };
            let root: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
            Fixture {
                dir,
                sys,
                key,
                root,
                uki_a: b"uki a r2".to_vec(),
                uki_b: b"uki b r2".to_vec(),
            }
        }

        pub(crate) fn manifest(&self, release: u64) -> Manifest {
            manifest_for(release, &self.root, &self.uki_a, &self.uki_b)
        }

        /// `m` pretty-printed (as the image build writes it), signed by `key`
        /// (unsigned when `None`), with this root image and the fixture's UKIs.
        pub(crate) fn bundle(
            &self,
            m: &Manifest,
            key: Option<&SigningKey>,
            root: &[u8],
        ) -> PathBuf {
            let mj = serde_json::to_vec_pretty(m).unwrap();
            let sig = key.map(|k| sign(k, &mj));
            let data = tar(&members(&mj, sig.as_deref(), root, &self.uki_a, &self.uki_b));
            let p = self.dir.join(format!("bundle-{}.tar", &hex(&Sha256::digest(&data))[..16]));
            fs::write(&p, data).unwrap();
            p
        }

        pub(crate) fn apply(&self, bundle: &Path) -> Result<Applied, UpdateError> {
            apply(
                bundle,
                &self.sys,
                ApplyOptions { tries: 3, retry: false, expect_release: None },
                &mut |_| {},
            )
        }

        /// Slot b's bytes and the ESP listing: what a refusal must leave alone.
        pub(crate) fn snapshot(&self) -> (Vec<u8>, Vec<String>) {
            (
                fs::read(self.sys.partitions.join("airlock-root-b")).unwrap(),
                list_entries(&self.sys.uki_dir).unwrap(),
            )
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_signed_bundle_writes_the_inactive_slot_and_a_trial_entry() {
        let fx = Fixture::new("ok");
        let b = fx.bundle(&fx.manifest(2), Some(&fx.key), &fx.root.clone());
        let mut lines = Vec::new();
        let done = apply(
            &b,
            &fx.sys,
            ApplyOptions { tries: 2, retry: false, expect_release: None },
            &mut |l| lines.push(l.to_owned()),
        )
        .unwrap();
        assert_eq!(done.slot, Slot::B);
        assert_eq!(done.entry, "airlock-2-b+2.efi");
        let slot_b = fs::read(fx.sys.partitions.join("airlock-root-b")).unwrap();
        assert_eq!(&slot_b[..fx.root.len()], &fx.root[..]);
        assert!(slot_b[fx.root.len()..].iter().all(|&x| x == 0x55), "past the image: untouched");
        assert_eq!(
            fs::read(fx.sys.partitions.join("airlock-root-a")).unwrap(),
            vec![0xaa; PART as usize],
            "the running slot is never written"
        );
        assert_eq!(
            list_entries(&fx.sys.uki_dir).unwrap(),
            vec!["airlock-1-a.efi".to_owned(), "airlock-2-b+2.efi".to_owned()]
        );
        assert_eq!(fs::read(fx.sys.uki_dir.join("airlock-2-b+2.efi")).unwrap(), fx.uki_b);
        assert!(lines.iter().any(|l| l.contains("signature ok: release 2")), "{lines:?}");
        let st = status(&fx.sys).unwrap();
        assert!(st.contains("running: slot a release 1"), "{st}");
        assert!(
            st.contains("entry airlock-2-b+2.efi: slot b release 2 on trial (2 tries left"),
            "{st}"
        );
    }

    #[test]
    fn refusals_write_nothing_and_say_why() {
        let fx = Fixture::new("refuse");
        let before = fx.snapshot();
        let other = SigningKey::from_bytes(&[9; 32]);
        let mut tampered = fx.root.clone();
        tampered[5000] ^= 1;
        let mut short_manifest = fx.manifest(2);
        short_manifest.root.size -= 4096;
        let big_root = vec![3u8; (PART + 4096) as usize];
        let mut big = fx.manifest(2);
        big.root.size = big_root.len() as u64;
        big.root.sha256 = hex(&Sha256::digest(&big_root));
        let cases: Vec<(&str, PathBuf, &str)> = vec![
            ("unsigned", fx.bundle(&fx.manifest(2), None, &fx.root), "not signed"),
            ("wrong key", fx.bundle(&fx.manifest(2), Some(&other), &fx.root), "does not verify"),
            (
                "tampered",
                fx.bundle(&fx.manifest(2), Some(&fx.key), &tampered),
                "does not match the signed manifest",
            ),
            ("downgrade", fx.bundle(&fx.manifest(1), Some(&fx.key), &fx.root), "not newer"),
            (
                "wrong size",
                fx.bundle(&short_manifest, Some(&fx.key), &fx.root),
                "bytes in the bundle but the manifest says",
            ),
            (
                "too large",
                fx.bundle(&big, Some(&fx.key), &big_root),
                "does not fit partition airlock-root-b",
            ),
        ];
        for (what, bundle, expect) in cases {
            let e = fx.apply(&bundle).expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            assert_eq!(fx.snapshot(), before, "{what}: something was written");
        }
        // A changed manifest byte after signing.
        let mut m = fx.manifest(2);
        let mj = serde_json::to_vec_pretty(&m).unwrap();
        let sig = sign(&fx.key, &mj);
        m.release = 3;
        let mj2 = serde_json::to_vec_pretty(&m).unwrap();
        let p = fx.dir.join("edited.tar");
        fs::write(&p, tar(&members(&mj2, Some(&sig), &fx.root, &fx.uki_a, &fx.uki_b))).unwrap();
        assert!(matches!(fx.apply(&p), Err(UpdateError::Bundle(ReleaseError::BadSignature))));
        fs::write(&p, b"not a tar at all, just some bytes").unwrap();
        assert!(matches!(fx.apply(&p), Err(UpdateError::Bundle(ReleaseError::NotABundle(_)))));
        assert_eq!(fx.snapshot(), before);
    }

    #[test]
    fn another_release_than_offered_or_a_busy_slot_is_refused_before_writing() {
        let fx = Fixture::new("offered");
        let before = fx.snapshot();
        let b = fx.bundle(&fx.manifest(2), Some(&fx.key), &fx.root);
        let opts = |expect| ApplyOptions { tries: 2, retry: false, expect_release: expect };
        let e = apply(&b, &fx.sys, opts(Some(3)), &mut |_| {}).unwrap_err();
        assert!(matches!(e, UpdateError::NotTheOffered { expected: 3, bundle: 2 }), "{e}");
        assert_eq!(fx.snapshot(), before);
        // Another writer holds slot b.
        let other = fs::File::open(fx.sys.partitions.join("airlock-root-b")).unwrap();
        assert!(try_lock(&other));
        let e = apply(&b, &fx.sys, opts(Some(2)), &mut |_| {}).unwrap_err();
        assert!(matches!(e, UpdateError::Busy(Slot::B)), "{e}");
        assert_eq!(fx.snapshot(), before);
        drop(other);
        let done = apply(&b, &fx.sys, opts(Some(2)), &mut |_| {}).unwrap();
        assert_eq!(done.release, 2);
    }

    #[test]
    fn a_tampered_uki_is_refused() {
        let mut fx = Fixture::new("uki");
        let m = fx.manifest(2);
        fx.uki_b = b"uki b r2 but changed".to_vec();
        let before = fx.snapshot();
        let mj = serde_json::to_vec_pretty(&m).unwrap();
        let sig = sign(&fx.key, &mj);
        let mut uki_b = b"uki b r2".to_vec();
        uki_b[0] = b'X';
        let p = fx.dir.join("t.tar");
        fs::write(&p, tar(&members(&mj, Some(&sig), &fx.root, &fx.uki_a, &uki_b))).unwrap();
        let e = fx.apply(&p).unwrap_err().to_string();
        assert!(e.contains("uki-b.efi does not match"), "{e}");
        assert_eq!(fx.snapshot(), before);
    }

    #[test]
    fn a_trial_running_slot_or_a_failed_release_is_refused() {
        let fx = Fixture::new("trial");
        let b = fx.bundle(&fx.manifest(2), Some(&fx.key), &fx.root);
        fs::rename(
            fx.sys.uki_dir.join("airlock-1-a.efi"),
            fx.sys.uki_dir.join("airlock-1-a+2-1.efi"),
        )
        .unwrap();
        let before = fx.snapshot();
        assert!(matches!(fx.apply(&b), Err(UpdateError::RunningOnTrial { .. })));
        assert_eq!(fx.snapshot(), before);
        fs::rename(
            fx.sys.uki_dir.join("airlock-1-a+2-1.efi"),
            fx.sys.uki_dir.join("airlock-1-a.efi"),
        )
        .unwrap();
        fs::write(fx.sys.uki_dir.join("airlock-2-b+0-3.efi"), b"failed").unwrap();
        let e = fx.apply(&b).unwrap_err().to_string();
        assert!(
            e.contains("already failed its trial boots") && e.contains("airlock-2-b+0-3.efi"),
            "{e}"
        );
        let done = apply(
            &b,
            &fx.sys,
            ApplyOptions { tries: 1, retry: true, expect_release: None },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(done.entry, "airlock-2-b+1.efi");
        assert_eq!(
            list_entries(&fx.sys.uki_dir).unwrap(),
            vec!["airlock-1-a.efi".to_owned(), "airlock-2-b+1.efi".to_owned()],
            "the failed entry of the target slot is removed before the slot is written"
        );
    }

    #[test]
    fn boot_entry_names_round_trip() {
        for (name, e) in [
            (
                "airlock-1-a.efi",
                BootEntry { release: 1, slot: Slot::A, tries_left: None, tries_done: 0 },
            ),
            ("airlock-2-b+3.efi", BootEntry::trial(2, Slot::B, 3)),
            (
                "airlock-12-b+1-2.efi",
                BootEntry { release: 12, slot: Slot::B, tries_left: Some(1), tries_done: 2 },
            ),
            (
                "airlock-2-b+0-3.efi",
                BootEntry { release: 2, slot: Slot::B, tries_left: Some(0), tries_done: 3 },
            ),
        ] {
            assert_eq!(BootEntry::parse(name), Some(e.clone()), "{name}");
            assert_eq!(e.file_name(), name);
        }
        assert!(BootEntry::parse("airlock-2-b+0-3.efi").unwrap().is_failed());
        for bad in [
            "airlock-a.efi",
            "airlock-1-c.efi",
            "airlock-1-a.efi.new",
            "other.efi",
            "airlock-x-a.efi",
            "airlock-1-a+.efi",
            "airlock-1-a+1-.efi",
        ] {
            assert_eq!(BootEntry::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn slot_selection_and_the_running_system() {
        let r = parse_running("ro airlock.slot=b quiet", "7\n").unwrap();
        assert_eq!(r, Running { slot: Slot::B, release: 7 });
        assert!(parse_running("ro quiet", "7").is_err());
        assert!(parse_running("airlock.slot=a", "seven").is_err());
        let fx = Fixture::new("plan");
        let m = fx.manifest(8);
        let p = plan(
            &m,
            r,
            &["airlock-7-b.efi".into(), "airlock-5-a.efi".into(), "airlock-6-a+2.efi.new".into()],
            PART,
            3,
            false,
        )
        .unwrap();
        assert_eq!(p.target, Slot::A);
        assert_eq!(
            p.remove,
            vec!["airlock-5-a.efi".to_owned(), "airlock-6-a+2.efi.new".to_owned()]
        );
        assert_eq!(p.entry.file_name(), "airlock-8-a+3.efi");
        let p = plan(&m, r, &[], PART, 42, false).unwrap();
        assert_eq!(p.entry.tries_left, Some(MAX_TRIES));
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn release_state_running_a_with_b_installed_is_pending() {
        let st = release_state(
            "root=/dev/mapper/airlock-root airlock.slot=a ro",
            "4\n",
            &names(&["airlock-4-a.efi", "airlock-5-b+2.efi", "loader.conf", "other.efi"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            st,
            ReleaseState {
                release: 4,
                slot: "a".into(),
                on_trial: false,
                failed_trials: vec![],
                in_progress: None,
                pending: Some(5),
                last_failure: None,
            }
        );
        // A trial entry that used its tries is not pending, and neither is an
        // older release or one for the running slot.
        let st = release_state(
            "airlock.slot=a",
            "4",
            &names(&["airlock-4-a.efi", "airlock-3-b+1.efi", "airlock-6-a+2.efi"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(st.pending, None);
    }

    #[test]
    fn release_state_running_b_on_trial() {
        for entry in ["airlock-5-b+1-1.efi", "airlock-5-b+0-2.efi"] {
            let st =
                release_state("quiet airlock.slot=b", "5", &names(&["airlock-4-a.efi", entry]))
                    .unwrap()
                    .unwrap();
            assert_eq!((st.release, st.slot.as_str()), (5, "b"), "{entry}");
            assert!(st.on_trial, "{entry}");
            assert!(st.failed_trials.is_empty(), "the running release is not failed: {entry}");
            assert_eq!(st.pending, None);
        }
        let st =
            release_state("airlock.slot=b", "5", &names(&["airlock-5-b.efi"])).unwrap().unwrap();
        assert!(!st.on_trial, "marked good");
    }

    #[test]
    fn release_state_after_a_failed_trial() {
        // Release 5 on slot b used its tries; slot a (release 4) booted again.
        let st = release_state(
            "airlock.slot=a",
            "4",
            &names(&["airlock-4-a.efi", "airlock-5-b+0-2.efi", "airlock-5-b+0-2.efi.new"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(st.failed_trials, vec![5]);
        assert_eq!(st.pending, None);
        assert!(!st.on_trial);
    }

    #[test]
    fn release_state_on_a_lab_host_is_none() {
        assert_eq!(release_state("ro quiet", "", &[]).unwrap(), None);
        assert_eq!(release_state("", "garbage", &names(&["airlock-5-b+0-2.efi"])).unwrap(), None);
        // An A/B command line with an unreadable release is an error, not a lab host.
        assert!(release_state("airlock.slot=a", "x", &[]).is_err());
        assert!(release_state("airlock.slot=c", "4", &[]).is_err());
        // Read from files: a lab host needs no release file.
        let dir = std::env::temp_dir().join(format!("airlock-rs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cmdline"), "ro quiet\n").unwrap();
        let sys = System {
            uki_dir: dir.join("missing"),
            public_key: dir.join("missing"),
            release_file: dir.join("missing"),
            cmdline: dir.join("cmdline"),
            partitions: dir.join("missing"),
        };
        assert_eq!(read_release_state(&sys).unwrap(), None);
        let fx = Fixture::new("state");
        let st = read_release_state(&fx.sys).unwrap().unwrap();
        assert_eq!((st.release, st.slot.as_str(), st.on_trial), (1, "a", false));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn manifests_are_checked_after_their_signature() {
        let fx = Fixture::new("manifest");
        let signed = |m: &Manifest| {
            let mj = serde_json::to_vec(m).unwrap();
            let s = sign(&fx.key, &mj);
            (mj, s)
        };
        let pk = hex(fx.key.verifying_key().as_bytes());
        let (mj, s) = signed(&fx.manifest(2));
        assert_eq!(verify_manifest(&mj, &s, &pk).unwrap().release, 2);
        assert!(matches!(verify_manifest(&mj, &s, "12"), Err(ReleaseError::BadKey)));
        let mut m = fx.manifest(2);
        m.format = 2;
        let (mj, s) = signed(&m);
        assert!(verify_manifest(&mj, &s, &pk).unwrap_err().to_string().contains("format 2"));
        let mut m = fx.manifest(2);
        m.ukis.remove("uki-a.efi");
        let (mj, s) = signed(&m);
        assert!(verify_manifest(&mj, &s, &pk).unwrap_err().to_string().contains("uki-a.efi"));
        let mut m = fx.manifest(2);
        m.root.hash_offset = 100;
        let (mj, s) = signed(&m);
        assert!(verify_manifest(&mj, &s, &pk).unwrap_err().to_string().contains("hash_offset"));
    }
}
