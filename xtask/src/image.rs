//! `cargo xtask image`: the bootable appliance image, and `image provision`.
//!
//! The recipe (see image/README.md), with no loop devices and no mounts:
//! mmdebstrap base tarball (cached, keyed by image/image.toml) → unpack, add
//! image/rootfs/, the agent and the generated files, customize in a chroot
//! (image/customize.sh) → erofs + dm-verity hash tree (one root slot) → a UKI
//! (systemd-stub + kernel + initramfs + command line with the root hash) → ESP
//! (systemd-boot) and provisioning partition as vfat files filled with mtools →
//! GPT with sfdisk, pieces copied in at their offsets.

use std::{
    fmt::Write as _,
    fs,
    io::{Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::step::{self, capture, run, secs, Step};

const MIB: u64 = 1 << 20;

/// GPT partition type GUIDs.
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const TYPE_LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Partition names (GPT PARTLABEL), also used by the image's units and scripts.
pub const PART_ESP: &str = "esp";
pub const PART_CONFIG: &str = "airlock-config";
pub const PART_ROOT_A: &str = "airlock-root-a";
pub const PART_ROOT_B: &str = "airlock-root-b";
pub const PART_STATE: &str = "airlock-state";

/// image/image.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipe {
    /// The update release number: an appliance only takes a higher one.
    release: u64,
    suite: String,
    mirror: String,
    source_date_epoch: u64,
    packages: Vec<String>,
    partitions: Sizes,
}

/// Partition sizes in MiB.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sizes {
    esp: u64,
    config: u64,
    root: u64,
    state: u64,
}

/// The hardware profile images are built for unless told otherwise.
pub const DEFAULT_PROFILE: &str = "hardware/profiles/qemu-virtual.toml";

/// `target/image`: the cache, the scratch tree and the outputs.
pub fn image_dir() -> PathBuf {
    airlock_testbed::target_dir().join("image")
}

/// The default output.
pub fn default_image() -> PathBuf {
    image_dir().join("airlock.img")
}

/// What `cargo xtask image` may change from the defaults.
#[derive(Debug, Default, Clone)]
pub struct BuildOptions {
    /// Release number (default: image.toml's `release`).
    pub release: Option<u64>,
    /// Output directory (default target/image; the base cache stays there).
    pub out: Option<PathBuf>,
    /// Test only: an agent configuration the agent refuses, for the rollback
    /// test's bundle (an update whose agent never becomes healthy).
    pub test_break_agent: bool,
}

/// Builds the image for a hardware profile.
pub fn build(profile_path: &Path) -> Result<PathBuf> {
    build_with(profile_path, &BuildOptions::default())
}

/// Builds the image (and the update slot: `<out>/slot/`) for a hardware profile.
pub fn build_with(profile_path: &Path, opts: &BuildOptions) -> Result<PathBuf> {
    let started = Instant::now();
    let root = airlock_testbed::workspace_root();
    let recipe_path = root.join("image/image.toml");
    let mut recipe: Recipe = toml::from_str(
        &fs::read_to_string(&recipe_path)
            .with_context(|| format!("reading {}", recipe_path.display()))?,
    )
    .with_context(|| format!("{} is not a valid recipe", recipe_path.display()))?;
    let profile_path = &if profile_path.is_relative() && !profile_path.exists() {
        root.join(profile_path)
    } else {
        profile_path.to_owned()
    };
    let profile = airlock_hardware::Profile::load(profile_path)?;
    if let Some(r) = opts.release {
        recipe.release = r;
    }
    ensure!(recipe.release >= 1, "release must be 1 or more");
    let dir = opts.out.clone().unwrap_or_else(image_dir);
    let work = dir.join("work");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let base = ensure_base(&recipe, &image_dir().join("cache"))?;
    let agent = build_agent()?;
    let step = Step::start("signing key (Ed25519)");
    let key_path = crate::image_sign::key_path();
    let (key, new) = crate::image_sign::load_or_create(&key_path)?;
    let public = crate::image_sign::public_hex(&key);
    if new {
        step.ok_with(format!(
            "NEW development key at {} (release images are signed by the release process's key)",
            key_path.display()
        ));
    } else {
        step.ok_with(format!("{} (public {}…)", key_path.display(), &public[..16]));
    }
    let rootfs = work.join("rootfs");
    let version = image_version(&recipe);
    prepare_rootfs(&base, &rootfs, &agent, &profile, profile_path, &version)?;
    fs::write(rootfs.join("usr/share/airlock/image-signing.pub"), format!("{public}\n"))?;
    fs::write(rootfs.join("usr/share/airlock/release"), format!("{}\n", recipe.release))?;
    if opts.test_break_agent {
        let step = Step::start("TEST ONLY: an agent configuration the agent refuses");
        fs::write(
            rootfs.join("etc/airlock/agent.toml"),
            "# TEST ONLY (cargo xtask image --test-break-agent): the agent refuses this.\n\
             [appliance]\nname = \"\"\n",
        )?;
        step.ok();
    }
    customize(&rootfs)?;
    let lock = packages_lock(&rootfs, &dir)?;
    let (kernel, initrd) = take_boot_files(&rootfs, &work)?;
    let slot = root_slot(&recipe, &rootfs, &work)?;
    ensure!(
        slot.len <= recipe.partitions.root * MIB,
        "the root slot needs {} MiB but image.toml gives it {} MiB: raise partitions.root",
        slot.len.div_ceil(MIB),
        recipe.partitions.root
    );
    let uki_a = uki(&rootfs, &work, &kernel, &initrd, 'a', &slot, &version, &recipe, &profile)?;
    let uki_b = uki(&rootfs, &work, &kernel, &initrd, 'b', &slot, &version, &recipe, &profile)?;
    let entry = format!("airlock-{}-a.efi", recipe.release);
    let esp = esp(&recipe, &work, &rootfs, &[(entry.as_str(), &uki_a)])?;
    let config = config_partition(&recipe, &work)?;
    let image = dir.join("airlock.img");
    let layout = assemble(&recipe, &image, &esp, &config, &slot.file)?;
    let sha = write_manifest(&dir, &image, &version, &recipe, &slot, &layout, &lock)?;
    crate::image_update::keep_slot(
        &dir,
        &version,
        recipe.release,
        &slot_info(&slot),
        &uki_a,
        &uki_b,
    )?;
    let manifest = fs::read(dir.join("manifest.json"))?;
    fs::write(dir.join("manifest.json.sig"), crate::image_sign::sign(&key, &manifest) + "\n")?;
    fs::write(dir.join("image-signing.pub"), format!("{public}\n"))?;
    let size = fs::metadata(&image)?.len();
    println!(
        "==> image {} ({} MiB, sha256 {}), built in {}",
        image.display(),
        size / MIB,
        &sha[..16],
        secs(started.elapsed())
    );
    Ok(image)
}

fn build_agent() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("AIRLOCK_IMAGE_AGENT_BIN") {
        let step = Step::start("agent: prebuilt binary from AIRLOCK_IMAGE_AGENT_BIN");
        let bin = PathBuf::from(bin);
        ensure!(bin.is_file(), "AIRLOCK_IMAGE_AGENT_BIN={} is not a file", bin.display());
        step.ok_with(bin.display());
        return Ok(bin);
    }
    let step = Step::start("agent: cargo build --release -p airlock-agent");
    run(step::cargo().args(["build", "--release", "-p", "airlock-agent"]))?;
    step.ok();
    Ok(airlock_testbed::target_dir().join("release/airlock-agent"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A UUID derived from the recipe and a purpose (reproducible builds).
fn stable_uuid(recipe: &Recipe, purpose: &str) -> String {
    let h = Sha256::digest(format!("airlock {} {purpose}", recipe.source_date_epoch));
    let mut b: [u8; 16] = h[..16].try_into().unwrap_or_default();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex(&b);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..])
}

fn image_version(recipe: &Recipe) -> String {
    let commit =
        capture(Command::new("git").current_dir(airlock_testbed::workspace_root()).args([
            "rev-parse",
            "--short=12",
            "HEAD",
        ]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("{}+{}.{commit}", env!("CARGO_PKG_VERSION"), recipe.source_date_epoch)
}

/// The mmdebstrap tarball, built once per recipe.
fn ensure_base(recipe: &Recipe, cache: &Path) -> Result<PathBuf> {
    let mut pkgs = recipe.packages.clone();
    pkgs.sort();
    let key = sha256_hex(
        format!(
            "{} {} {} {}",
            recipe.suite,
            recipe.mirror,
            recipe.source_date_epoch,
            pkgs.join(",")
        )
        .as_bytes(),
    );
    let tar = cache.join(format!("base-{}.tar", &key[..16]));
    let step = Step::start(format!("base: Debian {} + {} packages", recipe.suite, pkgs.len()));
    if tar.is_file() {
        step.ok_with(format!("cached {}", tar.display()));
        return Ok(tar);
    }
    step.ok_with("not cached: running mmdebstrap (1.5 min idle, up to 6 min on a busy 2-core box)");
    fs::create_dir_all(cache)?;
    // Only the current base is kept.
    for e in fs::read_dir(cache)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("base-") {
            let _ = fs::remove_file(e.path());
        }
    }
    let step = Step::start("base: mmdebstrap");
    let tmp = cache.join("base.tar.partial");
    run(Command::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", recipe.source_date_epoch.to_string())
        .args(["--variant=apt", "--mode=root", "--format=tar", "--components=main"])
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/info/*",
        ])
        .arg(format!("--include={}", pkgs.join(",")))
        .arg(&recipe.suite)
        .arg(&tmp)
        .arg(&recipe.mirror))?;
    fs::rename(&tmp, &tar)?;
    step.ok();
    Ok(tar)
}

/// Unpacks the base and adds the overlay, the agent and the generated files.
fn prepare_rootfs(
    base: &Path,
    rootfs: &Path,
    agent: &Path,
    profile: &airlock_hardware::Profile,
    profile_path: &Path,
    version: &str,
) -> Result<()> {
    let step =
        Step::start("rootfs: unpack the base, add image/rootfs, the agent, generated config");
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    fs::create_dir_all(rootfs)?;
    run(Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(base)
        .arg("-C")
        .arg(rootfs))?;
    let overlay = airlock_testbed::workspace_root().join("image/rootfs");
    run(Command::new("cp").arg("-a").arg(format!("{}/.", overlay.display())).arg(rootfs))?;
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(agent)
        .arg(rootfs.join("usr/bin/airlock-agent")))?;
    for (rel, text) in crate::image_files::generated(profile, version) {
        let path = rootfs.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    fs::copy(profile_path, rootfs.join("usr/share/airlock/hardware-profile.toml"))
        .context("copying the hardware profile")?;
    step.ok();
    Ok(())
}

/// image/customize.sh in a chroot, in a private mount namespace (its /proc,
/// /sys and /dev mounts vanish with it).
fn customize(rootfs: &Path) -> Result<()> {
    let step = Step::start("rootfs: customize in a chroot (units, no login, initramfs)");
    let script = airlock_testbed::workspace_root().join("image/customize.sh");
    let stdin = fs::File::open(&script).with_context(|| format!("opening {}", script.display()))?;
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-ec"])
        .arg(
            "mount -t proc proc \"$1/proc\"; mount -t sysfs sysfs \"$1/sys\"; \
             mount --rbind /dev \"$1/dev\"; exec chroot \"$1\" /bin/sh -s",
        )
        .arg("sh")
        .arg(rootfs)
        .stdin(stdin))?;
    step.ok();
    Ok(())
}

/// The installed package versions, next to the image.
fn packages_lock(rootfs: &Path, dir: &Path) -> Result<String> {
    let out = capture(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", rootfs.join("var/lib/dpkg").display()))
            .args(["-W", "-f=${Package}=${Version}\\n"]),
    )?;
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    let text = lines.join("\n") + "\n";
    fs::write(dir.join("packages.lock"), &text)?;
    Ok(text)
}

/// Moves the kernel and initramfs out of the root (they go into the UKI).
fn take_boot_files(rootfs: &Path, work: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = rootfs.join("boot");
    let mut kernel = None;
    let mut initrd = None;
    for e in fs::read_dir(&boot)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("vmlinuz-") {
            let dst = work.join("vmlinuz");
            fs::copy(e.path(), &dst)?;
            kernel = Some(dst);
        } else if name.starts_with("initrd.img-") {
            let dst = work.join("initrd.img");
            fs::copy(e.path(), &dst)?;
            initrd = Some(dst);
        }
        let p = e.path();
        if p.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    match (kernel, initrd) {
        (Some(k), Some(i)) => Ok((k, i)),
        _ => bail!("no vmlinuz-* and initrd.img-* in {}", boot.display()),
    }
}

/// What the update bundle needs to know about a built slot.
fn slot_info(slot: &Slot) -> crate::image_update::SlotInfo {
    crate::image_update::SlotInfo {
        file: slot.file.clone(),
        size: slot.len,
        root_hash: slot.root_hash.clone(),
        hash_offset: slot.hash_offset,
    }
}

/// One root slot: erofs followed by its dm-verity hash tree.
#[derive(Debug)]
struct Slot {
    file: PathBuf,
    len: u64,
    root_hash: String,
    hash_offset: u64,
}

fn root_slot(recipe: &Recipe, rootfs: &Path, work: &Path) -> Result<Slot> {
    let step = Step::start("root: mkfs.erofs (lz4hc) + veritysetup format");
    let erofs = work.join("root.erofs");
    let _ = fs::remove_file(&erofs);
    capture(
        Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg(format!("-T{}", recipe.source_date_epoch))
            .arg(format!("-U{}", stable_uuid(recipe, "root")))
            .arg(&erofs)
            .arg(rootfs),
    )?;
    let hash_offset = fs::metadata(&erofs)?.len();
    ensure!(hash_offset % 4096 == 0, "erofs size {hash_offset} is not a multiple of 4096");
    let tree = work.join("root.verity");
    let _ = fs::remove_file(&tree);
    let salt = sha256_hex(format!("airlock verity {}", recipe.source_date_epoch).as_bytes());
    let out = capture(
        Command::new("veritysetup")
            .args(["format", "--data-block-size=4096", "--hash-block-size=4096"])
            .arg(format!("--salt={salt}"))
            .arg(format!("--uuid={}", stable_uuid(recipe, "verity")))
            .arg(&erofs)
            .arg(&tree),
    )?;
    let root_hash = out
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_owned())
        .context("veritysetup printed no root hash")?;
    let slot = work.join("root-slot.img");
    fs::rename(&erofs, &slot)?;
    let mut f = fs::OpenOptions::new().append(true).open(&slot)?;
    std::io::copy(&mut fs::File::open(&tree)?, &mut f)?;
    let len = f.metadata()?.len();
    step.ok_with(format!(
        "{} MiB erofs + {} KiB hash tree, root hash {}…",
        hash_offset / MIB,
        (len - hash_offset) / 1024,
        &root_hash[..16]
    ));
    Ok(Slot { file: slot, len, root_hash, hash_offset })
}

/// The kernel command line of a slot.
fn cmdline(slot_name: char, slot: &Slot, profile: &airlock_hardware::Profile) -> String {
    let mut c = format!(
        "root=/dev/mapper/airlock-root rootfstype=erofs ro airlock.slot={slot_name} \
         airlock.root=PARTLABEL=airlock-root-{slot_name} airlock.roothash={} \
         airlock.hashoffset={} systemd.volatile=state systemd.gpt_auto=0 net.ifnames=0 \
         panic=10 console=tty0 console={}",
        slot.root_hash, slot.hash_offset, profile.console
    );
    if !profile.kernel_args.is_empty() {
        c.push(' ');
        c.push_str(&profile.kernel_args.join(" "));
    }
    c
}

/// A unified kernel image: systemd-stub with os-release, command line,
/// kernel and initramfs as PE sections after the stub's own.
#[allow(clippy::too_many_arguments)]
fn uki(
    rootfs: &Path,
    work: &Path,
    kernel: &Path,
    initrd: &Path,
    slot_name: char,
    slot: &Slot,
    version: &str,
    recipe: &Recipe,
    profile: &airlock_hardware::Profile,
) -> Result<PathBuf> {
    let step = Step::start(format!("UKI for slot {slot_name} (systemd-stub + kernel + initramfs)"));
    let stub = rootfs.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub");
    let osrel = work.join(format!("os-release-{slot_name}"));
    let base = fs::read_to_string(rootfs.join("usr/lib/os-release"))?;
    fs::write(
        &osrel,
        format!(
            "{base}IMAGE_ID=airlock\nIMAGE_VERSION={release}\nAIRLOCK_BUILD={version}\n\
             PRETTY_NAME=\"Airlock appliance release {release} ({version}, slot {slot_name})\"\n",
            release = recipe.release
        ),
    )?;
    let cmd = work.join(format!("cmdline-{slot_name}"));
    fs::write(&cmd, cmdline(slot_name, slot, profile))?;
    let mut at = stub_end(&stub)?;
    let mut objcopy = Command::new("objcopy");
    for (name, file) in [
        (".osrel", osrel.as_path()),
        (".cmdline", cmd.as_path()),
        (".linux", kernel),
        (".initrd", initrd),
    ] {
        at = at.next_multiple_of(4096);
        objcopy
            .arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={at:#x}"));
        at += fs::metadata(file)?.len();
    }
    let out = work.join(format!("airlock-{slot_name}.efi"));
    run(objcopy.arg(&stub).arg(&out))?;
    step.ok_with(format!("{} MiB", fs::metadata(&out)?.len().div_ceil(MIB)));
    Ok(out)
}

/// Where the stub's last section ends (VMA).
fn stub_end(stub: &Path) -> Result<u64> {
    let out = capture(Command::new("objdump").arg("-h").arg(stub))?;
    let mut end = 0;
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 7 && f[0].parse::<u32>().is_ok() {
            let size = u64::from_str_radix(f[2], 16)?;
            let vma = u64::from_str_radix(f[3], 16)?;
            end = end.max(vma + size);
        }
    }
    ensure!(end > 0, "no sections in {}", stub.display());
    Ok(end)
}

fn mtools(image: &Path) -> Command {
    let mut c = Command::new("mcopy");
    c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(image);
    c
}

fn vfat(recipe: &Recipe, file: &Path, mib: u64, label: &str) -> Result<()> {
    let _ = fs::remove_file(file);
    let volid = &stable_uuid(recipe, label)[..8];
    capture(
        Command::new("mkfs.vfat")
            .args(["-C", "--invariant", "-n", label, "-i", volid])
            .args(if mib >= 64 { &["-F", "32"][..] } else { &[][..] })
            .arg(file)
            .arg((mib * 1024).to_string()),
    )?;
    Ok(())
}

fn mmd(image: &Path, dirs: &[&str]) -> Result<()> {
    run(Command::new("mmd")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(image)
        .args(dirs.iter().map(|d| format!("::{d}"))))
}

/// The ESP: systemd-boot as the removable-media loader, the slots' UKIs.
fn esp(recipe: &Recipe, work: &Path, rootfs: &Path, ukis: &[(&str, &Path)]) -> Result<PathBuf> {
    let step = Step::start("ESP: vfat with systemd-boot and the UKI");
    let file = work.join("esp.img");
    vfat(recipe, &file, recipe.partitions.esp, "ESP")?;
    mmd(&file, &["/EFI", "/EFI/BOOT", "/EFI/Linux", "/loader"])?;
    let loader = work.join("loader.conf");
    // No menu, no editing the command line (it carries the root hash).
    fs::write(&loader, "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n")?;
    let boot = rootfs.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    run(mtools(&file).arg(&boot).arg("::/EFI/BOOT/BOOTX64.EFI"))?;
    run(mtools(&file).arg(&loader).arg("::/loader/loader.conf"))?;
    for (name, uki) in ukis {
        run(mtools(&file).arg(uki).arg(format!("::/EFI/Linux/{name}")))?;
    }
    step.ok();
    Ok(file)
}

/// The provisioning partition, empty but for its README.
fn config_partition(recipe: &Recipe, work: &Path) -> Result<PathBuf> {
    let step = Step::start("provisioning partition: vfat AIRLOCK-CFG");
    let file = work.join("config.img");
    vfat(recipe, &file, recipe.partitions.config, "AIRLOCK-CFG")?;
    let readme = work.join("README.TXT");
    fs::write(&readme, crate::image_files::CONFIG_README)?;
    run(mtools(&file).arg(&readme).arg("::/README.TXT"))?;
    step.ok();
    Ok(file)
}

/// Partition offsets in bytes.
#[derive(Debug, serde::Serialize)]
struct Layout {
    parts: Vec<(String, u64, u64)>,
}

fn assemble(
    recipe: &Recipe,
    image: &Path,
    esp: &Path,
    config: &Path,
    slot: &Path,
) -> Result<Layout> {
    let step = Step::start("disk: GPT (sfdisk) and the pieces at their offsets");
    let p = &recipe.partitions;
    let parts = [
        (PART_ESP, p.esp, TYPE_ESP, Some(esp)),
        (PART_CONFIG, p.config, TYPE_LINUX_DATA, Some(config)),
        (PART_ROOT_A, p.root, TYPE_ROOT_X86_64, Some(slot)),
        (PART_ROOT_B, p.root, TYPE_ROOT_X86_64, None),
        (PART_STATE, p.state, TYPE_LINUX_DATA, None),
    ];
    let total = MIB * (1 + parts.iter().map(|x| x.1).sum::<u64>() + 1);
    let tmp = image.with_extension("img.partial");
    let _ = fs::remove_file(&tmp);
    let f = fs::File::create(&tmp)?;
    f.set_len(total)?;
    drop(f);
    let mut script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n",
        stable_uuid(recipe, "disk")
    );
    let mut at = MIB;
    let mut layout = Layout { parts: Vec::new() };
    for (name, mib, ty, _) in &parts {
        let _ = writeln!(
            script,
            "start={}, size={}, type={ty}, uuid={}, name=\"{name}\"",
            at / 512,
            mib * MIB / 512,
            stable_uuid(recipe, name)
        );
        layout.parts.push(((*name).to_owned(), at, mib * MIB));
        at += mib * MIB;
    }
    let mut sf = Command::new("sfdisk");
    sf.args(["--no-reread", "--no-tell-kernel", "-q"]).arg(&tmp);
    let line = step::describe(&sf);
    let mut child = sf
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}` (install fdisk)"))?;
    child.stdin.take().context("sfdisk stdin")?.write_all(script.as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "`{line}` failed ({status})");
    let mut disk = fs::OpenOptions::new().write(true).open(&tmp)?;
    for ((_, _, _, piece), (_, offset, size)) in parts.iter().zip(&layout.parts) {
        let Some(piece) = piece else { continue };
        let len = fs::metadata(piece)?.len();
        ensure!(len <= *size, "{} ({len} bytes) does not fit its partition", piece.display());
        disk.seek(SeekFrom::Start(*offset))?;
        std::io::copy(&mut fs::File::open(piece)?, &mut disk)?;
    }
    disk.sync_all()?;
    fs::rename(&tmp, image)?;
    step.ok_with(format!("{} MiB", total / MIB));
    Ok(layout)
}

#[allow(clippy::too_many_arguments)]
fn write_manifest(
    dir: &Path,
    image: &Path,
    version: &str,
    recipe: &Recipe,
    slot: &Slot,
    layout: &Layout,
    lock: &str,
) -> Result<String> {
    let step = Step::start("manifest and checksum");
    let sha = file_sha256(image)?;
    let manifest = serde_json::json!({
        "format": 1,
        "image_version": version,
        "release": recipe.release,
        "source_date_epoch": recipe.source_date_epoch,
        "image_sha256": sha,
        "root_slot": {
            "sha256": file_sha256(&slot.file)?,
            "size": slot.len,
            "root_hash": slot.root_hash,
            "hash_offset": slot.hash_offset,
        },
        "partitions": layout.parts.iter().map(|(n, o, s)| serde_json::json!({"name": n, "offset": o, "size": s})).collect::<Vec<_>>(),
        "packages_sha256": sha256_hex(lock.as_bytes()),
    });
    fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest)? + "\n")?;
    fs::write(
        image.with_extension("img.sha256"),
        format!("{sha}  {}\n", image.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()),
    )?;
    step.ok();
    Ok(sha)
}

/// sha256sum (coreutils): fast, and the same tool a technician checks with.
fn file_sha256(p: &Path) -> Result<String> {
    let out = capture(Command::new("sha256sum").arg(p))?;
    out.split_whitespace().next().map(str::to_owned).context("sha256sum printed nothing")
}

/// `cargo xtask image provision`.
#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// The image file to write into (its AIRLOCK-CFG partition).
    #[arg(long, default_value_os_t = default_image())]
    pub image: PathBuf,
    /// One-time enrollment token from the controller (env keeps it out of
    /// shell history).
    #[arg(long, env = "AIRLOCK_ENROLLMENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The controller's URL, https://host[:port].
    #[arg(long)]
    pub controller: String,
    /// SHA-256 fingerprint of the controller's CA certificate (64 hex digits,
    /// colons and a `sha256:` prefix allowed).
    #[arg(long)]
    pub ca_fingerprint: String,
    /// The appliance's own address on the port that reaches the controller,
    /// IPv4 CIDR (e.g. 192.0.2.10/24). Without it the image configures no
    /// address and the port must get one some other way.
    #[arg(long, requires = "interface")]
    pub address: Option<String>,
    /// The default gateway towards the controller (IPv4), with --address.
    #[arg(long, requires = "address")]
    pub gateway: Option<String>,
    /// The port --address goes on (its name in the hardware profile, e.g.
    /// eth1): the management port, or the uplink when there is none.
    #[arg(long, requires = "address")]
    pub interface: Option<String>,
}

/// The provisioning file's text, or every problem with the inputs.
pub fn provision_text(args: &ProvisionArgs) -> Result<String> {
    let mut problems = Vec::new();
    let url = args.controller.trim();
    let host = url.strip_prefix("https://").unwrap_or_default();
    // The agent takes the controller's main listener as https://HOST[:PORT], no path
    // (agent/src/controller/client.rs); the appliance checks it again at boot.
    let host = host.strip_suffix('/').unwrap_or(host);
    if host.is_empty()
        || host.starts_with(['/', ':'])
        || host.contains(['/', '?', '#', '@'])
        || url.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c.is_control())
    {
        problems.push(format!("--controller {url:?}: must be https://host[:port], no path"));
    }
    let fp: String = args
        .ca_fingerprint
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if fp.len() != 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
        problems.push(
            "--ca-fingerprint: must be the CA certificate's SHA-256, 64 hex digits".to_owned(),
        );
    }
    let t = &args.token;
    if !(16..=512).contains(&t.len())
        || !t.chars().all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c))
    {
        problems.push(
            "--token: must be 16-512 characters of letters, digits and -._~+/= (as the controller prints it)"
                .to_owned(),
        );
    }
    let network = network_lines(args, &mut problems);
    if !problems.is_empty() {
        bail!("bad provisioning input:\n  {}", problems.join("\n  "));
    }
    Ok(format!(
        "# Airlock first-boot provisioning, written by `cargo xtask image provision`.\n\
         # Read by the agent's enrollment; the token is single-use and removed after it.\n\
         format = 1\n\
         controller_url = \"{url}\"\n\
         controller_ca_sha256 = \"{fp}\"\n\
         {network}\
         enrollment_token = \"{t}\"\n"
    ))
}

/// `interface`, `address` and `gateway` lines (all or none), checked here as
/// strictly as the image's provisioning script checks them again at boot.
fn network_lines(args: &ProvisionArgs, problems: &mut Vec<String>) -> String {
    let Some(address) = args.address.as_deref().map(str::trim) else { return String::new() };
    let iface = args.interface.as_deref().unwrap_or_default().trim();
    if iface.is_empty()
        || iface.len() > 15
        || !iface.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.push(format!(
            "--interface {iface:?}: a port name as in the hardware profile (e.g. eth1)"
        ));
    }
    let cidr = address.split_once('/').and_then(|(ip, len)| {
        let ip: std::net::Ipv4Addr = ip.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| (1..=32).contains(l))?;
        (!ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()).then_some((ip, len))
    });
    if cidr.is_none() {
        problems.push(format!(
            "--address {address:?}: an IPv4 address with prefix, e.g. 192.0.2.10/24"
        ));
    }
    let mut out = format!("interface = \"{iface}\"\naddress = \"{address}\"\n");
    if let Some(gw) = args.gateway.as_deref().map(str::trim) {
        match gw.parse::<std::net::Ipv4Addr>() {
            Ok(g) if !g.is_unspecified() && Some(g) != cidr.map(|c| c.0) => {
                out.push_str(&format!("gateway = \"{g}\"\n"));
            }
            _ => problems
                .push(format!("--gateway {gw:?}: an IPv4 address other than the appliance's own")),
        }
    }
    out
}

/// Byte offset of a named GPT partition in a disk image (sfdisk -J).
pub fn partition_offset(image: &Path, name: &str) -> Result<u64> {
    let out = capture(Command::new("sfdisk").arg("-J").arg(image))
        .with_context(|| format!("{} has no readable partition table", image.display()))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let table = &v["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    table["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["start"].as_u64())
        .map(|start| start * sector)
        .with_context(|| {
            format!("{} has no partition named {name}: not an Airlock image?", image.display())
        })
}

pub fn provision(args: &ProvisionArgs) -> Result<()> {
    let step = Step::start(format!("provisioning {}", args.image.display()));
    let text = provision_text(args)?;
    let offset = partition_offset(&args.image, PART_CONFIG)?;
    // The token is a secret: a private file, removed right after.
    let dir = image_dir().join("work");
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("provision-{}.toml", std::process::id()));
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
    }
    let target = format!("{}@@{offset}", args.image.display());
    let result = run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-o", "-i", &target])
        .arg(&tmp)
        .arg(format!("::/{}", crate::image_files::PROVISION_FILE)));
    let _ = fs::remove_file(&tmp);
    result?;
    step.ok_with(format!(
        "{}/{} on partition {PART_CONFIG} (controller {}, token not shown)",
        crate::image_files::PROVISION_MOUNT,
        crate::image_files::PROVISION_FILE,
        args.controller.trim()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(controller: &str, fp: &str, token: &str) -> ProvisionArgs {
        ProvisionArgs {
            image: PathBuf::from("x.img"),
            token: token.to_owned(),
            controller: controller.to_owned(),
            ca_fingerprint: fp.to_owned(),
            address: None,
            gateway: None,
            interface: None,
        }
    }

    #[test]
    fn network_settings_are_checked_and_written_together() {
        let fp = "ab".repeat(32);
        let mut a = args("https://10.0.2.2:8443", &fp, "tok-0123456789abcdef");
        assert!(!provision_text(&a).unwrap().contains("address"));
        a.address = Some("10.0.2.15/24".into());
        a.gateway = Some("10.0.2.2".into());
        a.interface = Some("eth1".into());
        let text = provision_text(&a).unwrap();
        assert!(
            text.contains(
                "interface = \"eth1\"\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\n"
            ),
            "{text}"
        );
        for (addr, gw, iface, what) in [
            ("10.0.2.15", "10.0.2.2", "eth1", "--address"),
            ("10.0.2.15/33", "10.0.2.2", "eth1", "--address"),
            ("fe80::1/64", "10.0.2.2", "eth1", "--address"),
            ("10.0.2.15/24", "10.0.2.15", "eth1", "--gateway"),
            ("10.0.2.15/24", "gw", "eth1", "--gateway"),
            ("10.0.2.15/24", "10.0.2.2", "eth1; reboot", "--interface"),
            ("10.0.2.15/24", "10.0.2.2", "a-very-long-interface-name", "--interface"),
        ] {
            a.address = Some(addr.into());
            a.gateway = Some(gw.into());
            a.interface = Some(iface.into());
            let e = provision_text(&a).expect_err(what).to_string();
            assert!(e.contains(what), "{addr} {gw} {iface}: {e}");
        }
    }

    #[test]
    fn provisioning_input_is_checked_as_the_agent_will() {
        let fp = "AB:".repeat(31) + "AB";
        let text = provision_text(&args("https://10.0.2.2:8443", &fp, "tok-0123456789abcdef"))
            .expect("valid input");
        assert!(text.contains("controller_url = \"https://10.0.2.2:8443\"\n"), "{text}");
        assert!(text.contains(&format!("controller_ca_sha256 = \"{}\"\n", "ab".repeat(32))));
        for bad in ["http://h", "https://", "https://h/path", "https://h:1?x", "https://u@h"] {
            let e = provision_text(&args(bad, &fp, "tok-0123456789abcdef")).expect_err(bad);
            assert!(e.to_string().contains("--controller"), "{bad}: {e}");
        }
        let e = provision_text(&args("https://h", "12", "short")).expect_err("two problems");
        assert!(e.to_string().contains("--ca-fingerprint") && e.to_string().contains("--token"));
    }
}
