//! `cargo xtask setup`: everything building and testing need, idempotently.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::step::{capture, cargo_bin_dir, run as run_cmd, Step};

/// Debian packages the lab and the tests use.
const APT_PACKAGES: &[&str] = &[
    "nftables",
    "iproute2",
    "bpftool",
    "wireguard-tools",
    "wireguard-go",
    "python3-scapy",
    "iperf3",
    "wrk", // the controller API benchmark's load generator
    "netsniff-ng",
    "tcpdump",
    "ethtool",
    "iputils-ping",
    "util-linux",
    // The controller store's PKCS#11 KMS backend is tested against a SoftHSM2 token.
    "softhsm2",
    // The appliance image (cargo xtask image) and its boot test.
    "mmdebstrap",
    "erofs-utils",
    "cryptsetup-bin",
    "systemd-boot-efi",
    "dosfstools",
    "mtools",
    "fdisk",
    "binutils",
    "ovmf",
    // What qemu-system-x86 7.2 links against (qemu itself is unpacked, see `qemu`).
    "libaio1",
    "libbpf1",
    "libcapstone4",
    "libfdt1",
    "libfuse3-3",
    "libibverbs1",
    "libjpeg62-turbo",
    "libnuma1",
    "libpixman-1-0",
    "libpmem1",
    "libpng16-16",
    "librdmacm1",
    "libsasl2-2",
    "libseccomp2",
    "libslirp0",
    "liburing2",
    "libvdeplug2",
    // The web UI's browser tests (airlock_testbed::Browser): headless Chromium
    // through chromedriver; certutil imports the controller's CA per session.
    "chromium",
    "chromium-driver",
    "libnss3-tools",
];

/// Debian 12's QEMU, unpacked (not installed: its qemu-system-common conflicts
/// with the qemu-utils 10 from backports on these machines). The boot test runs
/// `<dir>/usr/bin/qemu-system-x86_64 -L <dir>/usr/share/qemu ...`.
const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86/bookworm",
    "qemu-system-common/bookworm",
    "qemu-system-data/bookworm",
    "seabios/bookworm",
    "ipxe-qemu/bookworm",
];

/// Where `setup` unpacks QEMU: outside the repository, like bpf-linker.
pub fn qemu_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/airlock/qemu-7.2")
}

/// Rustup components per toolchain.
const COMPONENTS: &[(&str, &[&str])] =
    &[("stable", &["rustfmt", "clippy"]), ("nightly", &["rust-src", "clippy"])];

/// bpf-linker must use the LLVM of the nightly that builds the eBPF crate; its
/// major version is read from nightly's `libLLVM.so.<major>.*` (22 today).
const BPF_LINKER_VERSION: &str = "^0.13";

pub fn run() -> Result<()> {
    disk_space();
    apt_packages()?;
    browser()?;
    rust_components()?;
    bpf_linker()?;
    cargo_fuzz()?;
    qemu()?;
    bpffs()
}

/// What a fresh clone's `cargo xtask test` leaves under target/ and fuzz/
/// (measured, README "Disk"), with some headroom for the tests' scratch files.
const DISK_NEEDED_GIB: u64 = 12;

/// Warns early when the disk is too small for a full run, rather than letting
/// a build fail half-way with ENOSPC. A warm tree needs far less, so this is a
/// warning, not a refusal.
fn disk_space() {
    let target = airlock_testbed::target_dir();
    let probe = if target.exists() { target } else { airlock_testbed::workspace_root() };
    let step = Step::start(format!("checking free disk space at {}", probe.display()));
    let free = capture(Command::new("df").args(["--output=avail", "-B1"]).arg(&probe))
        .ok()
        .and_then(|out| out.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()));
    match free {
        Some(bytes) => {
            let gib = bytes / (1 << 30);
            step.ok_with(format!("{gib} GiB free"));
            if gib < DISK_NEEDED_GIB {
                eprintln!(
                    "    WARNING: a run from a fresh clone needs about {DISK_NEEDED_GIB} GiB; \
                     builds may fail with \"No space left on device\" \
                     (`cargo clean` frees what earlier builds left)"
                );
            }
        }
        None => {
            step.ok_with("unknown (df gave no answer)");
        }
    }
}

fn qemu() -> Result<()> {
    let dir = qemu_dir();
    let bin = dir.join("usr/bin/qemu-system-x86_64");
    let step = Step::start(format!("checking qemu-system-x86_64 in {}", dir.display()));
    if let Ok(v) = capture(Command::new(&bin).arg("--version")) {
        step.ok_with(v.lines().next().unwrap_or_default().to_owned());
        return Ok(());
    }
    step.ok_with("missing");
    let step = Step::start("unpacking Debian 12's QEMU (apt-get download + dpkg -x)");
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let debs = partial.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    run_cmd(Command::new("apt-get").current_dir(&debs).arg("download").args(QEMU_PACKAGES))?;
    for e in std::fs::read_dir(&debs)?.flatten() {
        run_cmd(Command::new("dpkg").arg("-x").arg(e.path()).arg(&partial))?;
    }
    std::fs::remove_dir_all(&debs)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir)?;
    let v = capture(Command::new(&bin).arg("--version"))?;
    step.ok_with(v.lines().next().unwrap_or_default().to_owned());
    Ok(())
}

/// Chromium and chromedriver come from the same Debian source package; a
/// driver for another major version cannot start sessions.
fn browser() -> Result<()> {
    let step = Step::start("checking chromium and chromedriver versions");
    let chromium = capture(Command::new("chromium").arg("--version"))?;
    let driver = capture(Command::new("chromedriver").arg("--version"))?;
    let (c, d) = (major_version(&chromium), major_version(&driver));
    if c.is_none() || c != d {
        bail!("chromium ({}) and chromedriver ({}) differ", chromium.trim(), driver.trim());
    }
    step.ok_with(format!("{} / {}", chromium.trim(), first_two_words(&driver)));
    Ok(())
}

/// `Chromium 156.0.8078.79 built on Debian …` → 156.
fn major_version(version: &str) -> Option<u32> {
    version
        .split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok().filter(|_| w.contains('.')))
}

fn first_two_words(s: &str) -> String {
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// cargo-fuzz runs the fuzz targets' smoke test.
fn cargo_fuzz() -> Result<()> {
    let step = Step::start("checking cargo-fuzz");
    if let Ok(v) = capture(Command::new("cargo").args(["fuzz", "--version"])) {
        step.ok_with(v.trim());
        return Ok(());
    }
    step.ok_with("missing");
    let step = Step::start("installing cargo-fuzz from crates.io (~1 min)");
    run_cmd(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
        "install",
        "cargo-fuzz",
        "--locked",
    ]))?;
    step.ok();
    Ok(())
}

fn apt_packages() -> Result<()> {
    let step = Step::start(format!("checking apt packages ({})", APT_PACKAGES.len()));
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        step.ok_with("all present");
        return Ok(());
    }
    step.ok_with(format!("missing: {}", missing.join(" ")));
    let step = Step::start(format!("installing apt packages: {}", missing.join(" ")));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args);
        cmd
    };
    run_cmd(&mut apt(&["update"]))?;
    run_cmd(apt(&["install", "-y", "--no-install-recommends"]).args(&missing))?;
    step.ok();
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

fn rust_components() -> Result<()> {
    let step = Step::start("checking the nightly toolchain (builds the eBPF programs)");
    if capture(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_ok() {
        step.ok_with("present");
    } else {
        println!("    installing nightly (minimal profile)");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        step.ok();
    }
    for (toolchain, wanted) in COMPONENTS {
        let step = Step::start(format!("checking rustup components for {toolchain}"));
        let installed = capture(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            toolchain,
            "--installed",
        ]))?;
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|c| !installed.lines().any(|l| component_matches(l.trim(), c)))
            .collect();
        if missing.is_empty() {
            step.ok_with(format!("{} present", wanted.join(", ")));
            continue;
        }
        println!("    adding: {}", missing.join(" "));
        run_cmd(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", toolchain])
                .args(&missing),
        )?;
        step.ok();
    }
    Ok(())
}

/// `clippy-x86_64-unknown-linux-gnu` and `rust-src` both name their
/// component; a target triple starts with an architecture that has a digit
/// (x86_64, aarch64, i686, riscv64gc), a component name part never does.
fn component_matches(line: &str, component: &str) -> bool {
    line == component
        || line.strip_prefix(component).and_then(|rest| rest.strip_prefix('-')).is_some_and(
            |triple| {
                triple.split('-').count() >= 3
                    && triple
                        .split('-')
                        .next()
                        .is_some_and(|arch| arch.contains(|c: char| c.is_ascii_digit()))
            },
        )
}

fn bpf_linker() -> Result<()> {
    let step = Step::start("checking bpf-linker");
    let mut candidates = vec![PathBuf::from("bpf-linker")];
    candidates.extend(cargo_bin_dir().map(|d| d.join("bpf-linker")));
    for bin in &candidates {
        if let Ok(v) = capture(Command::new(bin).arg("--version")) {
            step.ok_with(v.trim());
            return Ok(());
        }
    }
    step.ok_with("missing");
    let (prefix, major) = llvm_prefix()?;
    let step = Step::start(format!("building bpf-linker against nightly's LLVM {major} (~1 min)"));
    run_cmd(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")]),
    )?;
    step.ok();
    Ok(())
}

/// `$HOME/.cache/airlock/llvm` whose `lib/` links to nightly's libLLVM, as
/// `libLLVM.so` (to link against) and under its own name (to run with); also
/// returns LLVM's major version.
fn llvm_prefix() -> Result<(PathBuf, u32)> {
    let sysroot =
        capture(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let sys_lib = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&sys_lib)
        .with_context(|| format!("reading {}", sys_lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-") && n.ends_with("-nightly"));
    let Some(lib) = lib else {
        bail!(
            "no libLLVM.so.*-rust-*-nightly in {}: is the nightly toolchain installed?",
            sys_lib.display()
        );
    };
    let major =
        llvm_major(&lib).with_context(|| format!("cannot read the LLVM version from {lib}"))?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".cache/airlock/llvm");
    let dir = prefix.join("lib");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = dir.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        symlink(sys_lib.join(&lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok((prefix, major))
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn llvm_major(lib: &str) -> Option<u32> {
    lib.strip_prefix("libLLVM.so.")?.split(['.', '-']).next()?.parse().ok()
}

fn bpffs() -> Result<()> {
    let step = Step::start(format!("checking bpffs at {}", airlock_testbed::BPFFS));
    if airlock_testbed::bpffs_mounted() {
        step.ok_with("mounted");
        return Ok(());
    }
    airlock_testbed::ensure_bpffs().context("mounting bpffs")?;
    step.ok_with("mounted now");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_library_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.23-rust-1.99.0-nightly"), Some(23));
        assert_eq!(llvm_major("libfoo.so"), None);
    }

    #[test]
    fn browser_major_versions() {
        assert_eq!(
            major_version("Chromium 156.0.8078.79 built on Debian GNU/Linux 12 (bookworm)"),
            Some(156)
        );
        assert_eq!(
            major_version("ChromeDriver 156.0.8078.79 (abc-refs/branch-heads/1@{#1})"),
            Some(156)
        );
        assert_eq!(major_version("no version here"), None);
    }

    #[test]
    fn components_match_with_or_without_target() {
        assert!(component_matches("clippy-x86_64-unknown-linux-gnu", "clippy"));
        assert!(component_matches("rust-src", "rust-src"));
        assert!(component_matches("rustfmt-x86_64-unknown-linux-gnu", "rustfmt"));
        assert!(!component_matches("rust-std-x86_64-unknown-linux-gnu", "rust-src"));
        assert!(!component_matches("rust-src-extra", "rust-src"));
        assert!(!component_matches("rust-docs-x86_64-unknown-linux-gnu", "rust"));
    }
}
