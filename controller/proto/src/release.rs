//! The appliance image update: the signed bundle's format and the update
//! wire types.
//!
//! The agent applies bundles (`airlock-agent update apply`, or when the
//! controller offers one); the controller checks a bundle with the same code
//! before it offers it to any appliance. A bundle is a ustar archive of
//! `manifest.json`, `manifest.json.sig` (Ed25519 over the manifest's bytes,
//! hex), `root.img` (erofs + its dm-verity hash tree) and `uki-a.efi`,
//! `uki-b.efi`. Built by `cargo xtask image update-bundle`.
//!
//! What it is not: nothing here writes a disk or decides which slot boots
//! (the agent's `update` module does).

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom},
};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The only bundle format this version reads.
pub const FORMAT: u32 = 1;
/// The manifest's member name.
pub const MANIFEST: &str = "manifest.json";
/// The signature's member name.
pub const SIGNATURE: &str = "manifest.json.sig";
/// The slot image's member name.
pub const ROOT_IMAGE: &str = "root.img";
/// The two UKIs, one per slot.
pub const UKI_FILES: [&str; 2] = ["uki-a.efi", "uki-b.efi"];
/// The largest manifest read.
pub const MAX_MANIFEST: u64 = 64 * 1024;
/// Members read at most: a bundle has five (the limit bounds the index
/// built before the signature is checked).
pub const MAX_MEMBERS: usize = 16;
/// The largest UKI accepted.
pub const MAX_UKI: u64 = 256 * 1024 * 1024;

/// Why a bundle is not a valid signed bundle.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not an update bundle: {0}")]
    NotABundle(String),
    #[error("the bundle has no {0}")]
    Missing(&'static str),
    #[error("the bundle is not signed (no {SIGNATURE})")]
    Unsigned,
    #[error(
        "the bundle's signature does not verify with the update key \
         (signed by another key, or the manifest was changed)"
    )]
    BadSignature,
    #[error("the update key is not an Ed25519 public key (64 hex digits)")]
    BadKey,
    #[error("invalid manifest: {0}")]
    Manifest(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReleaseError {
    let what = what.into();
    move |source| ReleaseError::Io { what, source }
}

/// One file named by the manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub size: u64,
    pub sha256: String,
}

/// The slot image: erofs followed by its dm-verity hash tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RootRef {
    pub size: u64,
    pub sha256: String,
    pub root_hash: String,
    pub hash_offset: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Increases with every image; an appliance only takes a higher one.
    pub release: u64,
    pub image_version: String,
    pub root: RootRef,
    /// `uki-a.efi`, `uki-b.efi`.
    pub ukis: BTreeMap<String, FileRef>,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let t = text.trim();
    if t.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks the signature over the manifest's bytes, then parses and checks
/// the manifest. Nothing in an unsigned or wrongly signed manifest is looked at.
pub fn verify_manifest(
    manifest: &[u8],
    signature_hex: &str,
    public_key_hex: &str,
) -> Result<Manifest, ReleaseError> {
    let pk = unhex::<32>(public_key_hex).ok_or(ReleaseError::BadKey)?;
    let vk = VerifyingKey::from_bytes(&pk).map_err(|_| ReleaseError::BadKey)?;
    let sig = unhex::<64>(signature_hex).ok_or(ReleaseError::BadSignature)?;
    vk.verify_strict(manifest, &Signature::from_bytes(&sig))
        .map_err(|_| ReleaseError::BadSignature)?;
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| ReleaseError::Manifest(e.to_string()))?;
    let bad = |what: &str| Err(ReleaseError::Manifest(what.to_owned()));
    if m.format != FORMAT {
        return bad(&format!("format {} (this agent reads format {FORMAT})", m.format));
    }
    if m.release == 0 {
        return bad("release must be 1 or more");
    }
    if !is_hex(&m.root.sha256, 64) || !is_hex(&m.root.root_hash, 64) {
        return bad("root.sha256 and root.root_hash must be 64 lowercase hex digits");
    }
    if m.root.hash_offset == 0
        || !m.root.hash_offset.is_multiple_of(4096)
        || m.root.hash_offset >= m.root.size
    {
        return bad("root.hash_offset must be a non-zero multiple of 4096 below root.size");
    }
    for name in UKI_FILES {
        match m.ukis.get(name) {
            Some(f) if is_hex(&f.sha256, 64) && f.size > 0 && f.size <= MAX_UKI => {}
            _ => return bad(&format!("ukis.\"{name}\" is missing or invalid")),
        }
    }
    if m.ukis.len() != 2 {
        return bad("ukis must name exactly uki-a.efi and uki-b.efi");
    }
    Ok(m)
}

/// One member of a ustar archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub offset: u64,
    pub size: u64,
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The regular files of a ustar archive, by name, with where their data is.
pub fn tar_index(r: &mut (impl Read + Seek)) -> Result<BTreeMap<String, Member>, ReleaseError> {
    let mut out = BTreeMap::new();
    let mut at = 0u64;
    let not = |what: &str| ReleaseError::NotABundle(what.to_owned());
    let mut headers = 0usize;
    loop {
        let mut h = [0u8; 512];
        r.seek(SeekFrom::Start(at)).map_err(io("reading the bundle"))?;
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => break,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(not("shorter than a tar header"))
            }
            Err(e) => return Err(io("reading the bundle")(e)),
        }
        if h.iter().all(|&b| b == 0) {
            break;
        }
        headers += 1;
        if headers > MAX_MEMBERS {
            return Err(not("more members than a bundle has"));
        }
        let sum = octal(&h[148..156]).ok_or_else(|| not("bad tar header checksum field"))?;
        let calc: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) })
            .sum();
        if sum != calc {
            return Err(not("tar header checksum mismatch"));
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = std::str::from_utf8(&h[..name_end]).map_err(|_| not("member name"))?;
        let name = name.trim_start_matches("./").to_owned();
        let size = octal(&h[124..136]).ok_or_else(|| not("member size"))?;
        let kind = h[156];
        if (kind == b'0' || kind == 0)
            && !name.is_empty()
            && out.insert(name.clone(), Member { offset: at + 512, size }).is_some()
        {
            return Err(ReleaseError::NotABundle(format!("{name} appears twice")));
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    if out.is_empty() {
        return Err(not("no files"));
    }
    Ok(out)
}

/// One member's bytes, refused when larger than `limit`.
pub fn read_member(
    f: &mut (impl Read + Seek),
    members: &BTreeMap<String, Member>,
    name: &'static str,
    limit: u64,
) -> Result<Vec<u8>, ReleaseError> {
    let m = members.get(name).ok_or(ReleaseError::Missing(name))?;
    if m.size > limit {
        return Err(ReleaseError::NotABundle(format!("{name} is larger than {limit} bytes")));
    }
    f.seek(SeekFrom::Start(m.offset)).map_err(io("reading the bundle"))?;
    let mut v = vec![0u8; usize::try_from(m.size).unwrap_or(0)];
    f.read_exact(&mut v).map_err(io(format!("reading {name} from the bundle")))?;
    Ok(v)
}

/// A bundle whose manifest verified: where its members are, and the manifest.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub members: BTreeMap<String, Member>,
    pub manifest: Manifest,
}

/// Indexes a bundle and verifies its manifest's signature and contents, and
/// that every file the manifest names is in the archive with its size. The
/// file contents' SHA-256 is the applier's to check (it reads them anyway).
pub fn open_verified(
    r: &mut (impl Read + Seek),
    public_key_hex: &str,
) -> Result<VerifiedBundle, ReleaseError> {
    let members = tar_index(r)?;
    let manifest = read_member(r, &members, MANIFEST, MAX_MANIFEST)?;
    let sig = match read_member(r, &members, SIGNATURE, 1024) {
        Err(ReleaseError::Missing(_)) => return Err(ReleaseError::Unsigned),
        other => other?,
    };
    let sig = std::str::from_utf8(&sig).map_err(|_| ReleaseError::BadSignature)?;
    let manifest = verify_manifest(&manifest, sig, public_key_hex)?;
    let named = std::iter::once((ROOT_IMAGE, manifest.root.size))
        .chain(manifest.ukis.iter().map(|(n, f)| (n.as_str(), f.size)));
    for (name, want) in named {
        let got = members.get(name).map(|x| x.size).ok_or_else(|| {
            ReleaseError::NotABundle(format!("{name} is named by the manifest but missing"))
        })?;
        if got != want {
            return Err(ReleaseError::NotABundle(format!(
                "{name} is {got} bytes in the bundle but the manifest says {want}"
            )));
        }
    }
    Ok(VerifiedBundle { members, manifest })
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- wire types ------------------------------------------------------------

/// The image an appliance runs and how its updates went; part of the agent's
/// report. `None` in the report: not an A/B appliance image (an agent on a
/// lab host), which is never offered an update.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseState {
    /// The running image's release number.
    pub release: u64,
    /// The running root slot, `a` or `b`.
    pub slot: String,
    /// The running slot boots on trial (not yet marked good).
    pub on_trial: bool,
    /// Releases whose trial boots failed here; the controller stops offering them.
    #[serde(default)]
    pub failed_trials: Vec<u64>,
    /// The release being downloaded or written now.
    #[serde(default)]
    pub in_progress: Option<u64>,
    /// The release installed on the other slot, waiting for its trial boot.
    #[serde(default)]
    pub pending: Option<u64>,
    /// The last offered update that did not reach its trial boot, and why.
    #[serde(default)]
    pub last_failure: Option<UpdateFailure>,
}

/// An offered update the agent could not install.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateFailure {
    pub release: u64,
    /// The agent's message (no secrets: paths, sizes, checksums).
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

/// What the controller answers a report with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReportResponse {
    /// An image update for this appliance, when a rollout names it and it
    /// runs an older release.
    #[serde(default)]
    pub update: Option<UpdateOffer>,
}

/// An image update offered to one appliance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateOffer {
    pub release: u64,
    pub image_version: String,
    /// The bundle's size in bytes.
    pub size: u64,
    /// SHA-256 of the whole bundle file (hex); the agent checks the download
    /// against it, then verifies the bundle's own signature as for a local file.
    pub sha256: String,
    /// Path on the agent (mTLS) listener to download it from.
    pub path: String,
}

/// Helpers for tests, never used by production code: a tiny ustar writer and
/// signed bundles built from a fixed layout. Compiled for this crate's tests
/// and, through the `test-support` feature, for the dev-dependencies of the
/// agent, the controller and airlockctl.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    use ed25519_dalek::{Signer as _, SigningKey};
    use sha2::{Digest as _, Sha256};

    use super::{hex, FileRef, Manifest, RootRef, FORMAT, MANIFEST, ROOT_IMAGE, SIGNATURE};

    /// The UKIs `signed_bundle` puts in its bundles.
    pub const UKI_A: &[u8] = b"uki a";
    pub const UKI_B: &[u8] = b"uki b";

    /// A ustar archive of `files`, in order, with the two zero end blocks.
    pub fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..108].copy_from_slice(b"0000644\0");
            h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    /// A valid manifest of `release` naming these files (image version
    /// `0.1.0+r<release>`, a placeholder root hash, the hash tree at 4096).
    pub fn manifest_for(release: u64, root: &[u8], uki_a: &[u8], uki_b: &[u8]) -> Manifest {
        let f = |d: &[u8]| FileRef { size: d.len() as u64, sha256: hex(&Sha256::digest(d)) };
        Manifest {
            format: FORMAT,
            release,
            image_version: format!("0.1.0+r{release}"),
            root: RootRef {
                size: root.len() as u64,
                sha256: hex(&Sha256::digest(root)),
                root_hash: "cd".repeat(32),
                hash_offset: 4096,
            },
            ukis: [("uki-a.efi".to_owned(), f(uki_a)), ("uki-b.efi".to_owned(), f(uki_b))].into(),
        }
    }

    /// The hex Ed25519 signature over `manifest_json`, as `manifest.json.sig` holds it.
    pub fn sign(key: &SigningKey, manifest_json: &[u8]) -> String {
        hex(&key.sign(manifest_json).to_bytes())
    }

    /// A bundle's members in the image build's order; no signature member
    /// when `signature` is `None`.
    pub fn members<'a>(
        manifest_json: &'a [u8],
        signature: Option<&'a str>,
        root: &'a [u8],
        uki_a: &'a [u8],
        uki_b: &'a [u8],
    ) -> Vec<(&'a str, &'a [u8])> {
        let mut files: Vec<(&str, &[u8])> = vec![(MANIFEST, manifest_json)];
        if let Some(s) = signature {
            files.push((SIGNATURE, s.as_bytes()));
        }
        files.extend([(ROOT_IMAGE, root), ("uki-a.efi", uki_a), ("uki-b.efi", uki_b)]);
        files
    }

    /// A valid bundle of `release` with this root image and `UKI_A`, `UKI_B`,
    /// signed by `key` (compact JSON manifest).
    pub fn signed_bundle(key: &SigningKey, release: u64, root: &[u8]) -> Vec<u8> {
        let m = manifest_for(release, root, UKI_A, UKI_B);
        let mj = serde_json::to_vec(&m).expect("a manifest serializes");
        let sig = sign(key, &mj);
        tar(&members(&mj, Some(&sig), root, UKI_A, UKI_B))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{manifest_for, members, sign, tar};
    use super::*;
    use ed25519_dalek::SigningKey;

    fn bundle(key: &SigningKey, root: &[u8], drop: Option<&str>, lie_size: bool) -> Vec<u8> {
        let mut m = manifest_for(3, root, b"ua", b"ub");
        m.root.size += u64::from(lie_size);
        let mj = serde_json::to_vec(&m).unwrap();
        let sig = sign(key, &mj);
        let mut files = members(&mj, Some(&sig), root, b"ua", b"ub");
        files.retain(|(n, _)| Some(*n) != drop);
        tar(&files)
    }

    #[test]
    fn a_signed_bundle_opens_and_every_defect_is_named() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let pk = hex(key.verifying_key().as_bytes());
        let root = vec![1u8; 2 * 4096];
        let open = |b: Vec<u8>, pk: &str| open_verified(&mut std::io::Cursor::new(b), pk);
        let ok = open(bundle(&key, &root, None, false), &pk).unwrap();
        assert_eq!(ok.manifest.release, 3);
        assert_eq!(ok.members[ROOT_IMAGE].size, root.len() as u64);

        let other = hex(SigningKey::from_bytes(&[8; 32]).verifying_key().as_bytes());
        let e = open(bundle(&key, &root, None, false), &other).unwrap_err();
        assert!(matches!(e, ReleaseError::BadSignature), "{e}");
        let e = open(bundle(&key, &root, Some(SIGNATURE), false), &pk).unwrap_err();
        assert!(matches!(e, ReleaseError::Unsigned), "{e}");
        let e = open(bundle(&key, &root, Some("uki-b.efi"), false), &pk).unwrap_err();
        assert!(e.to_string().contains("uki-b.efi is named by the manifest but missing"), "{e}");
        let e = open(bundle(&key, &root, None, true), &pk).unwrap_err();
        assert!(e.to_string().contains("root.img is 8192 bytes"), "{e}");
        let many: Vec<(String, Vec<u8>)> = (0..20).map(|i| (format!("f{i}"), vec![0u8])).collect();
        let many: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
        let e = open(testing::tar(&many), &pk).unwrap_err();
        assert!(e.to_string().contains("more members than a bundle has"), "{e}");
        let e = open(b"not a tar at all".to_vec(), &pk).unwrap_err();
        assert!(matches!(e, ReleaseError::NotABundle(_)), "{e}");
        let e = open(bundle(&key, &root, None, false), "12").unwrap_err();
        assert!(matches!(e, ReleaseError::BadKey), "{e}");
    }
}
