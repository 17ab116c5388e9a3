//! `cargo xtask image update-bundle`: a signed A/B update bundle from a built
//! slot (see image/README.md and agent/src/update.rs, which reads it).
//!
//! Every image build keeps its slot in `<out>/slot/`: `root.img` (erofs + the
//! dm-verity hash tree), `uki-a.efi` and `uki-b.efi` (the same kernel and
//! initramfs with each slot's command line and root hash) and `slot.json`.
//! The bundle is a ustar archive of those files (the slot's description
//! dropped) plus `manifest.json` and `manifest.json.sig` (Ed25519 over the
//! manifest's bytes, with the image signing key whose public half is in the
//! image's verity-protected root).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{ensure, Context as _, Result};

use crate::step::{run, secs, Step};

/// A built root slot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SlotInfo {
    pub file: PathBuf,
    pub size: u64,
    pub root_hash: String,
    pub hash_offset: u64,
}

/// `<out>/slot/slot.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Kept {
    release: u64,
    image_version: String,
    size: u64,
    root_hash: String,
    hash_offset: u64,
}

/// Keeps the slot and both UKIs next to the image for `update-bundle`.
pub fn keep_slot(
    dir: &Path,
    version: &str,
    release: u64,
    slot: &SlotInfo,
    uki_a: &Path,
    uki_b: &Path,
) -> Result<()> {
    let step = Step::start("update slot: root.img, uki-a.efi, uki-b.efi in slot/");
    let out = dir.join("slot");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    fs::create_dir_all(&out)?;
    fs::rename(&slot.file, out.join("root.img")).context("moving the slot image")?;
    fs::copy(uki_a, out.join("uki-a.efi"))?;
    fs::copy(uki_b, out.join("uki-b.efi"))?;
    let kept = Kept {
        release,
        image_version: version.to_owned(),
        size: slot.size,
        root_hash: slot.root_hash.clone(),
        hash_offset: slot.hash_offset,
    };
    fs::write(out.join("slot.json"), serde_json::to_string_pretty(&kept)? + "\n")?;
    step.ok_with(format!("release {release}"));
    Ok(())
}

fn sha256(p: &Path) -> Result<String> {
    let out = crate::step::capture(Command::new("sha256sum").arg(p))?;
    out.split_whitespace().next().map(str::to_owned).context("sha256sum printed nothing")
}

/// `cargo xtask image update-bundle`.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// The build output holding slot/ (an image built by `cargo xtask image`).
    #[arg(long, default_value_os_t = crate::image::image_dir())]
    pub from: PathBuf,
    /// The bundle to write (default <from>/airlock-update-<release>.bundle).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Builds and signs the bundle; returns its path.
pub fn bundle(args: &BundleArgs) -> Result<PathBuf> {
    let started = Instant::now();
    let slot = args.from.join("slot");
    let kept: Kept =
        serde_json::from_str(&fs::read_to_string(slot.join("slot.json")).with_context(|| {
            format!("no built slot in {} (run cargo xtask image)", slot.display())
        })?)?;
    let step = Step::start(format!("bundle: checksums of release {}", kept.release));
    let root = slot.join("root.img");
    let size = fs::metadata(&root)?.len();
    ensure!(size == kept.size, "{} changed since the build", root.display());
    let file = |name: &str| -> Result<serde_json::Value> {
        let p = slot.join(name);
        Ok(serde_json::json!({ "size": fs::metadata(&p)?.len(), "sha256": sha256(&p)? }))
    };
    let manifest = serde_json::json!({
        "format": 1,
        "release": kept.release,
        "image_version": kept.image_version,
        "root": {
            "size": size,
            "sha256": sha256(&root)?,
            "root_hash": kept.root_hash,
            "hash_offset": kept.hash_offset,
        },
        "ukis": { "uki-a.efi": file("uki-a.efi")?, "uki-b.efi": file("uki-b.efi")? },
    });
    step.ok();
    let step = Step::start("bundle: sign the manifest (Ed25519) and write the tar");
    let key_path = crate::image_sign::key_path();
    let (key, new) = crate::image_sign::load_or_create(&key_path)?;
    ensure!(
        !new,
        "no signing key at {} (the image was built with another one): set AIRLOCK_IMAGE_SIGNING_KEY",
        key_path.display()
    );
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    let stage = args.from.join("bundle-stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(&stage)?;
    fs::write(stage.join("manifest.json"), &text)?;
    fs::write(
        stage.join("manifest.json.sig"),
        crate::image_sign::sign(&key, text.as_bytes()) + "\n",
    )?;
    for f in ["root.img", "uki-a.efi", "uki-b.efi"] {
        fs::hard_link(slot.join(f), stage.join(f))
            .or_else(|_| fs::copy(slot.join(f), stage.join(f)).map(drop))?;
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.from.join(format!("airlock-update-{}.bundle", kept.release)));
    let tmp = out.with_extension("partial");
    run(Command::new("tar")
        .args(["--format=ustar", "--owner=0", "--group=0", "--numeric-owner", "--mode=0644"])
        .arg(format!("--mtime=@{}", 1_748_736_000))
        .arg("-cf")
        .arg(&tmp)
        .arg("-C")
        .arg(&stage)
        .args(["manifest.json", "manifest.json.sig", "root.img", "uki-a.efi", "uki-b.efi"]))?;
    fs::rename(&tmp, &out)?;
    fs::remove_dir_all(&stage)?;
    let len = fs::metadata(&out)?.len();
    step.ok_with(format!("{} ({} MiB)", out.display(), len >> 20));
    println!(
        "==> update bundle {} release {} ({} MiB), built in {}",
        out.display(),
        kept.release,
        len >> 20,
        secs(started.elapsed())
    );
    Ok(out)
}
