//! Boot test: the real appliance image (target/image/airlock.img, built by
//! `cargo xtask image`) boots headless in qemu-system-x86_64 (TCG, OVMF) and
//! enforces: the agent logs `enforcing`, both ports carry its XDP programs in
//! native mode, nftables holds its table, the kernel's WireGuard module loads,
//! `airlock-agent hwcheck` passes against the VM's profile, no login prompt
//! appears, and an ACPI power-off ends it cleanly.
//!
//! What runs inside is the image as flashed: the checks are the image's own
//! boot report (airlock-boot-report.service), nothing test-only is added. The
//! test boots a sparse copy enlarged to 2 GiB (a disk bigger than the image,
//! as on real hardware), with its own copy of the OVMF variables.
//!
//! Needs: root, `cargo xtask setup` (QEMU unpacked under ~/.cache/airlock,
//! OVMF). Environment: AIRLOCK_IMAGE (default target/image/airlock.img, built
//! if missing), AIRLOCK_QEMU_DIR (default ~/.cache/airlock/qemu-7.2).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// TCG on 2 shared cores: ~30 s measured to a running service when the host
/// is idle; a busy CI host can be several times slower.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(120);

fn image() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_IMAGE") {
        return PathBuf::from(p);
    }
    let p = airlock_testbed::target_dir().join("image/airlock.img");
    if !p.exists() {
        let status = Command::new("cargo")
            .current_dir(airlock_testbed::workspace_root())
            .args(["run", "--quiet", "-p", "xtask", "--", "image"])
            .status()
            .expect("running cargo xtask image");
        assert!(status.success(), "cargo xtask image failed");
    }
    p
}

fn qemu_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_QEMU_DIR").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/airlock/qemu-7.2")
        },
        PathBuf::from,
    )
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = airlock_testbed::target_dir()
            .join("image/test")
            .join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The VM: QEMU with the serial console collected line by line. Killed on drop.
struct Vm {
    child: Child,
    console: Arc<Mutex<Vec<String>>>,
    qmp: PathBuf,
    started: Instant,
}

impl Vm {
    fn boot(disk: &Path, scratch: &Path) -> Vm {
        Vm::boot_with(disk, scratch, None)
    }

    /// Boots with an optional second disk (update media).
    fn boot_with(disk: &Path, scratch: &Path, media: Option<&Path>) -> Vm {
        let q = qemu_dir();
        let vars = scratch.join("OVMF_VARS.fd");
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF vars (apt ovmf)");
        let qmp = scratch.join("qmp.sock");
        let mut cmd = Command::new(q.join("usr/bin/qemu-system-x86_64"));
        cmd.arg("-L").arg(q.join("usr/share/qemu"));
        cmd.args(["-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"]);
        cmd.args(["-m", "1024", "-nodefaults", "-display", "none", "-serial", "stdio"]);
        cmd.arg("-drive")
            .arg("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd");
        cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
        cmd.arg("-drive").arg(format!("if=none,id=disk,format=raw,file={}", disk.display()));
        cmd.args(["-device", "virtio-blk-pci,drive=disk,bootindex=1"]);
        if let Some(m) = media {
            cmd.arg("-drive").arg(format!("if=none,id=media,format=raw,file={}", m.display()));
            cmd.args(["-device", "virtio-blk-pci,drive=media"]);
        }
        // Patient (eth0) and uplink (eth1): fixed PCI slots fix the kernel's
        // order; no option ROM, so the firmware does not try to PXE boot.
        for (i, slot) in [(0, 3), (1, 4)] {
            cmd.arg("-netdev").arg(format!("user,id=n{i},restrict=on"));
            cmd.arg("-device").arg(format!(
                "virtio-net-pci,netdev=n{i},addr={slot:#x},romfile=,mac=52:54:00:a1:00:0{i}"
            ));
        }
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.arg("-no-reboot");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {:?}: {e} (run `cargo xtask setup`)", cmd.get_program())
        });
        let console = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let console = Arc::clone(&console);
            thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
                    if std::env::var_os("AIRLOCK_VM_CONSOLE").is_some() {
                        eprintln!("vm| {text}");
                    }
                    console.lock().map(|mut c| c.push(text)).ok();
                }
            });
        }
        Vm { child, console, qmp, started }
    }

    fn lines(&self) -> Vec<String> {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let l = self.lines();
        l[l.len().saturating_sub(60)..].join("\n")
    }

    /// Waits for a console line matching `pred`; on timeout or QEMU exit,
    /// panics with the console's tail.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lines().iter().any(|l| pred(l)) {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(200));
                panic!("QEMU exited ({status}) before {what}; console tail:\n{}", self.tail());
            }
            if Instant::now() > deadline {
                panic!("no {what} within {timeout:?}; console tail:\n{}", self.tail());
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for QEMU to exit by itself (a reboot, with -no-reboot).
    #[cfg_attr(not(feature = "image-update"), allow(dead_code))]
    fn wait_exit(&mut self, what: &str) -> Duration {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.started.elapsed();
            }
            if Instant::now() > deadline {
                panic!("no {what} within {BOOT_TIMEOUT:?}; console tail:\n{}", self.tail());
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// ACPI power button through QMP, then waits for QEMU to exit.
    fn power_off(&mut self) -> std::process::ExitStatus {
        let mut s = UnixStream::connect(&self.qmp).expect("QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut buf = [0u8; 4096];
        let _greeting = s.read(&mut buf).expect("QMP greeting");
        s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").expect("QMP");
        let _ = s.read(&mut buf).expect("QMP reply");
        s.write_all(b"{\"execute\":\"system_powerdown\"}\n").expect("QMP");
        let deadline = Instant::now() + POWER_OFF_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("no power-off within {POWER_OFF_TIMEOUT:?}; console tail:\n{}", self.tail());
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The report lines (without the marker), between begin and end.
fn report(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split_once("AIRLOCK-REPORT ").map(|(_, r)| r.trim().to_owned()))
        .collect()
}

/// The boot report's agent state line, when the agent is not running.
fn agent_not_active(line: &str) -> bool {
    line.split_once("AIRLOCK-REPORT agent: ").is_some_and(|(_, state)| state.trim() != "active")
}

/// One boot of `disk` to the end of its boot report, the checks, and a clean
/// power-off. Returns the console.
fn boot_and_check(disk: &Path, scratch: &Path, boot: u32) -> Vec<String> {
    let mut vm = Vm::boot(disk, scratch);
    let enforcing = vm.wait_for("`enforcing` from the agent", BOOT_TIMEOUT, |l| {
        l.contains("INFO") && l.contains("enforcing") && !l.contains("AIRLOCK-REPORT")
            || agent_not_active(l)
    });
    if vm.lines().iter().any(|l| agent_not_active(l)) {
        vm.wait_for("the end of the boot report", BOOT_TIMEOUT, |l| {
            l.contains("AIRLOCK-REPORT end")
        });
        panic!("boot {boot}: the agent failed to start; console tail:\n{}", vm.tail());
    }
    eprintln!(
        "boot {boot}: QEMU start to the agent's `enforcing`: {:.1} s",
        enforcing.as_secs_f64()
    );
    let ended = vm
        .wait_for("the end of the boot report", BOOT_TIMEOUT, |l| l.contains("AIRLOCK-REPORT end"));
    eprintln!("boot {boot}: boot report complete: {:.1} s", ended.as_secs_f64());
    let lines = vm.lines();
    let r = report(&lines);
    let all = r.join("\n");
    let has = |needle: &str| r.iter().any(|l| l.contains(needle));

    assert!(has("begin slot=a"), "the image boots slot a:\n{all}");
    assert!(has("agent: active"), "{all}");
    for port in ["eth0", "eth1"] {
        let line = r
            .iter()
            .find(|l| l.starts_with(&format!("port {port} xdp:")))
            .unwrap_or_else(|| panic!("no XDP line for {port}:\n{all}"));
        assert!(line.contains("prog/xdp id"), "{port} has no XDP program: {line}");
        assert!(line.contains("xdp: xdp "), "{port} is not in native (driver) mode: {line}");
        let hw = r
            .iter()
            .find(|l| l.contains(&format!("port.{port}")))
            .unwrap_or_else(|| panic!("no hwcheck line for {port}:\n{all}"));
        assert!(hw.starts_with("PASS") && hw.contains("XDP attached now (native)"), "{hw}");
    }
    assert!(has("nft: table inet airlock"), "nftables does not hold the agent's table:\n{all}");
    assert!(has("wireguard: module loaded"), "the WireGuard module did not load:\n{all}");
    assert!(has("result: PASS"), "hwcheck does not pass in the VM:\n{all}");
    assert!(
        lines.iter().any(|l| l.contains("airlock-state: open and mounted at /var/lib/airlock")),
        "the encrypted state partition was not opened:\n{}",
        vm.tail()
    );
    assert!(
        !lines.iter().any(|l| l.trim_end().ends_with("login:")),
        "a login prompt appeared on the console"
    );
    let status = vm.power_off();
    assert!(status.success(), "QEMU exit status {status}");
    assert!(
        vm.lines().iter().any(|l| l.contains("reboot: Power down")),
        "boot {boot}: the kernel did not power off cleanly; console tail:\n{}",
        vm.tail()
    );
    vm.lines()
}

/// Runs `cargo xtask ARGS` from the workspace.
#[cfg(feature = "image-update")]
fn xtask(args: &[&str]) {
    let status = Command::new("cargo")
        .current_dir(airlock_testbed::workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--"])
        .args(args)
        .status()
        .expect("running cargo xtask");
    assert!(status.success(), "cargo xtask {} failed", args.join(" "));
}

/// First boot of a fresh copy: the state partition is formatted, the factory
/// policy applied, the boundary enforced on both layers. Second boot of the
/// same disk: the state is opened (not formatted again) and the agent itself
/// re-applies the stored (last-known-good) policy, so nftables holds its table
/// without the first-boot service.
#[test]
fn the_image_boots_enforces_and_keeps_its_state_across_a_reboot() {
    let image = image();
    let scratch = Scratch::new("boot");
    let disk = scratch.0.join("disk.img");
    let status =
        Command::new("cp").args(["--sparse=always"]).arg(&image).arg(&disk).status().expect("cp");
    assert!(status.success(), "copying {}", image.display());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.set_len(2 << 30))
        .expect("enlarging the disk copy");

    // First-boot enrollment settings, written as a technician does at flash time.
    let token = "it-token-Qx7Vb2NcM4pLr9Ws";
    let status = Command::new("cargo")
        .current_dir(airlock_testbed::workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--", "image", "provision", "--image"])
        .arg(&disk)
        .args(["--controller", "https://10.0.2.2:8443", "--ca-fingerprint", &"ab".repeat(32)])
        .env("AIRLOCK_ENROLLMENT_TOKEN", token)
        .status()
        .expect("cargo xtask image provision");
    assert!(status.success(), "cargo xtask image provision failed");

    let first = boot_and_check(&disk, &scratch.0, 1);
    let said = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));
    assert!(
        said(&first, "airlock-provision: enrollment token moved"),
        "the provisioned token was not taken"
    );
    assert!(
        said(&first, "airlock-provision: controller https://10.0.2.2:8443"),
        "the agent did not get the provisioned controller"
    );
    let config = config_files(&disk);
    assert!(config.contains("ENROLL~1.TOK") || config.contains("enrollment.token"), "{config}");
    let prov = config_file(&disk, "provision.toml");
    assert!(prov.contains("controller_url = \"https://10.0.2.2:8443\""), "{prov}");
    assert!(!prov.contains("enrollment_token"), "the token stayed in provision.toml:\n{prov}");
    assert!(
        said(&first, "airlock-state: first boot: formatting"),
        "first boot did not format the state"
    );
    assert!(
        said(&first, "airlock-factory-policy: applied"),
        "first boot did not apply the factory policy"
    );

    let second = boot_and_check(&disk, &scratch.0, 2);
    for lines in [&first, &second] {
        assert!(!said(lines, token), "the enrollment token appeared on the console");
    }
    assert!(
        said(&second, "airlock-provision: controller https://10.0.2.2:8443"),
        "second boot: the agent lost the provisioned controller"
    );
    assert!(!said(&second, "first boot: formatting"), "the second boot formatted the state again");
    assert!(
        !said(&second, "airlock-factory-policy: applied"),
        "the factory policy ran again on the second boot"
    );
}

/// The A/B update test (`cargo xtask test --image`).
#[cfg(feature = "image-update")]
mod update {
    use super::*;

    /// The update bundles the update test applies: release 2 (healthy) and
    /// release 3 built with `--test-break-agent` (its agent refuses its
    /// configuration, so its trial boots fail the boot check). Rebuilt when older
    /// than the image under test; same signing key as the image.
    fn update_bundles(image: &Path) -> (PathBuf, PathBuf) {
        let image_time = std::fs::metadata(image).and_then(|m| m.modified()).expect("image mtime");
        let dir = airlock_testbed::target_dir().join("image/update-test");
        let mut out = Vec::new();
        for (release, name, extra) in
            [(2, "r2", None), (3, "r3-broken", Some("--test-break-agent"))]
        {
            let from = dir.join(name);
            let bundle = from.join(format!("airlock-update-{release}.bundle"));
            let fresh =
                std::fs::metadata(&bundle).and_then(|m| m.modified()).is_ok_and(|t| t > image_time);
            if !fresh {
                let started = Instant::now();
                let from_s = from.display().to_string();
                let release_s = release.to_string();
                let mut args = vec!["image", "--release", &release_s, "--out", &from_s];
                args.extend(extra);
                xtask(&args);
                xtask(&["image", "update-bundle", "--from", &from_s]);
                eprintln!(
                    "update bundle release {release} ({name}) built in {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
            out.push(bundle);
        }
        (out.remove(0), out.remove(0))
    }

    /// A sparse copy of the image, enlarged to 2 GiB.
    fn disk_copy(image: &Path, scratch: &Path) -> PathBuf {
        let disk = scratch.join("disk.img");
        let status = Command::new("cp")
            .args(["--sparse=always"])
            .arg(image)
            .arg(&disk)
            .status()
            .expect("cp");
        assert!(status.success(), "copying {}", image.display());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| f.set_len(2 << 30))
            .expect("enlarging the disk copy");
        disk
    }

    /// The UKIs in the ESP's EFI/Linux, read from the host with mtools.
    fn esp_entries(disk: &Path) -> Vec<String> {
        let (offset, _) = partition(disk, "esp");
        let out = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-b")
            .arg("-i")
            .arg(format!("{}@@{offset}", disk.display()))
            .arg("::/EFI/Linux")
            .output()
            .expect("mdir");
        assert!(out.status.success(), "mdir: {}", String::from_utf8_lossy(&out.stderr));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().rsplit('/').next().map(str::to_owned))
            .filter(|n| !n.is_empty())
            .collect();
        v.sort();
        v
    }

    /// SHA-256 of a partition's bytes.
    fn partition_sha256(disk: &Path, name: &str) -> String {
        let (offset, size) = partition(disk, name);
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if='{}' bs=1M skip={} count={} status=none | sha256sum",
                disk.display(),
                offset >> 20,
                size >> 20
            ))
            .output()
            .expect("dd | sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Update media: a disk with one GPT partition named airlock-update holding
    /// the bundle's bytes (how a technician carries a bundle on a USB stick).
    fn media(bundle: &Path, scratch: &Path, tag: &str) -> PathBuf {
        let path = scratch.join(format!("media-{tag}.img"));
        let len = std::fs::metadata(bundle).expect("bundle").len();
        let sectors = len.div_ceil(1 << 20) * 2048 + 2048;
        let f = std::fs::File::create(&path).expect("media file");
        f.set_len((sectors + 2048 + 34) * 512).expect("media size");
        drop(f);
        let mut sf = Command::new("sfdisk")
            .args(["--no-reread", "--no-tell-kernel", "-q"])
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sfdisk");
        sf.stdin
            .take()
            .expect("sfdisk stdin")
            .write_all(
                format!("label: gpt\nstart=2048, size={sectors}, name=\"airlock-update\"\n")
                    .as_bytes(),
            )
            .expect("writing the partition table");
        assert!(sf.wait().expect("sfdisk").success(), "sfdisk on the media");
        let status = Command::new("dd")
            .arg(format!("if={}", bundle.display()))
            .arg(format!("of={}", path.display()))
            .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"])
            .status()
            .expect("dd");
        assert!(status.success());
        path
    }

    fn said(lines: &[String], what: &str) -> bool {
        lines.iter().any(|l| l.contains(what))
    }

    /// The A/B update on the real image, through its update media path (the
    /// agent's `update apply` inside the VM, real systemd-boot boot counting,
    /// real systemd-bless-boot):
    ///
    /// 1. a tampered bundle is refused and nothing is written (slot b's bytes and
    ///    the ESP unchanged);
    /// 2. release 3, whose agent cannot become healthy, is written to slot b and
    ///    boots on trial twice; both trials fail the boot check, the tries run
    ///    out, and the machine is back on slot a, enforcing;
    /// 3. release 2 is written to slot b, with a power cut during the write
    ///    (no entry for slot b is left; slot a boots and applies it again); a
    ///    power cut during its trial boot costs one try (`+1-1`) and nothing
    ///    else; the next boot is healthy and systemd-bless-boot marks it good
    ///    (`airlock-2-b.efi`).
    ///
    /// 8 boots and two image builds: behind `cargo xtask test --image` (see
    /// image/README.md), not in the default CI run.
    #[test]
    fn updates_boot_on_trial_roll_back_when_unhealthy_and_refuse_tampered_bundles() {
        let test_started = Instant::now();
        let image = image();
        let (r2, r3) = update_bundles(&image);
        let scratch = Scratch::new("update");
        let disk = disk_copy(&image, &scratch.0);
        let entries = |want: &[&str]| {
            let got = esp_entries(&disk);
            assert_eq!(got, want, "ESP EFI/Linux entries");
        };
        entries(&["airlock-1-a.efi"]);
        eprintln!("bundle size: {} MiB", std::fs::metadata(&r2).expect("bundle").len() >> 20);

        // 1. Tampered: one byte of the slot image changed after signing.
        let tampered = scratch.0.join("tampered.bundle");
        std::fs::copy(&r2, &tampered).expect("copying the bundle");
        {
            use std::os::unix::fs::FileExt as _;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tampered)
                .expect("bundle copy");
            let at = f.metadata().expect("bundle copy").len() / 3;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).expect("reading the bundle copy");
            f.write_all_at(&[b[0] ^ 0x01], at).expect("tampering with the bundle copy");
        }
        let slot_b_before = partition_sha256(&disk, "airlock-root-b");
        let mut vm =
            Vm::boot_with(&disk, &scratch.0, Some(&media(&tampered, &scratch.0, "tampered")));
        vm.wait_for("the tampered bundle's refusal", BOOT_TIMEOUT, |l| {
            l.contains("airlock-agent: refused") || l.contains("airlock-update: applied")
        });
        let lines = vm.lines();
        assert!(
            said(&lines, "root.img does not match the signed manifest"),
            "the tampered bundle was not refused for its checksum:\n{}",
            vm.tail()
        );
        assert!(said(&lines, "AIRLOCK-REPORT agent: active"), "{}", vm.tail());
        assert!(vm.power_off().success());
        assert_eq!(partition_sha256(&disk, "airlock-root-b"), slot_b_before, "slot b was written");
        entries(&["airlock-1-a.efi"]);
        eprintln!("update: tampered bundle refused, nothing written");

        // 2. Release 3 (unhealthy) to slot b, two failed trials, back to slot a.
        let mut vm = Vm::boot_with(&disk, &scratch.0, Some(&media(&r3, &scratch.0, "r3")));
        vm.wait_for("release 3 applied", BOOT_TIMEOUT, |l| {
            l.contains("airlock-update: applied release 3") || l.contains("airlock-agent: refused")
        });
        let applied =
            vm.lines().into_iter().find(|l| l.contains("airlock-update: applied release 3"));
        let applied = applied.unwrap_or_else(|| panic!("release 3 refused:\n{}", vm.tail()));
        eprintln!("update: {applied}");
        vm.wait_exit("reboot after the update");
        entries(&["airlock-1-a.efi", "airlock-3-b+2.efi"]);
        for try_no in 1..=2 {
            let mut vm = Vm::boot(&disk, &scratch.0);
            let failed = vm.wait_for("the boot check's failure on the trial", BOOT_TIMEOUT, |l| {
                l.contains("airlock-boot-check: FAILED: trial boot of slot b")
                    || l.contains("airlock-boot-check: slot")
            });
            assert!(
                said(&vm.lines(), "airlock-boot-check: FAILED: trial boot of slot b (release 3)"),
                "trial {try_no} of release 3 did not fail its boot check:\n{}",
                vm.tail()
            );
            let rebooted = vm.wait_exit("the reboot after a failed trial");
            eprintln!(
                "update: failed trial {try_no} of release 3: boot check failed at {:.0} s, reboot at {:.0} s",
                failed.as_secs_f64(),
                rebooted.as_secs_f64()
            );
        }
        entries(&["airlock-1-a.efi", "airlock-3-b+0-2.efi"]);

        // Back on slot a, enforcing; release 2 from media on this boot, with a
        // power cut while it writes slot b.
        let media_r2 = media(&r2, &scratch.0, "r2");
        let mut vm = Vm::boot_with(&disk, &scratch.0, Some(&media_r2));
        let enforcing = vm.wait_for("the report after the rollback", BOOT_TIMEOUT, |l| {
            l.contains("AIRLOCK-REPORT end")
        });
        let r = report(&vm.lines());
        let all = r.join("\n");
        assert!(r.iter().any(|l| l == "begin slot=a"), "not back on slot a:\n{all}");
        assert!(r.iter().any(|l| l == "agent: active"), "{all}");
        assert!(r.iter().any(|l| l.contains("nft: table inet airlock")), "{all}");
        assert!(
            r.iter().any(|l| l.contains("entry airlock-3-b+0-2.efi: slot b release 3 failed")),
            "{all}"
        );
        eprintln!(
            "update: rolled back to slot a, report complete at {:.0} s",
            enforcing.as_secs_f64()
        );
        vm.wait_for("release 2 being written to slot b", BOOT_TIMEOUT, |l| {
            l.contains("airlock-update: writing slot b: 33 of")
                || l.contains("airlock-agent: refused")
        });
        drop(vm);
        // No entry boots the half-written slot (the failed one was removed
        // before the write); the next boot is slot a again, which applies the
        // media once more.
        entries(&["airlock-1-a.efi"]);
        eprintln!("update: power cut while slot b was written: only slot a's entry left");
        let mut vm = Vm::boot_with(&disk, &scratch.0, Some(&media_r2));
        vm.wait_for("release 2 applied", BOOT_TIMEOUT, |l| {
            l.contains("airlock-update: applied release 2") || l.contains("airlock-agent: refused")
        });
        assert!(
            report(&vm.lines()).iter().any(|l| l == "begin slot=a"),
            "after the power cut during the write: not slot a:\n{}",
            vm.tail()
        );
        let applied =
            vm.lines().into_iter().find(|l| l.contains("airlock-update: applied release 2"));
        let applied = applied.unwrap_or_else(|| panic!("release 2 refused:\n{}", vm.tail()));
        eprintln!("update: {applied}");
        vm.wait_exit("reboot after the update");
        entries(&["airlock-1-a.efi", "airlock-2-b+2.efi"]);

        // 3. A power cut during the trial boot costs one try and nothing else.
        let mut vm = Vm::boot(&disk, &scratch.0);
        vm.wait_for("the kernel of slot b", BOOT_TIMEOUT, |l| {
            l.contains("Command line:") && l.contains("airlock.slot=b")
        });
        drop(vm);
        entries(&["airlock-1-a.efi", "airlock-2-b+1-1.efi"]);
        let mut vm = Vm::boot(&disk, &scratch.0);
        let done = vm.wait_for("the report of the trial boot", BOOT_TIMEOUT, |l| {
            l.contains("AIRLOCK-REPORT end")
        });
        let lines = vm.lines();
        let r = report(&lines);
        let all = r.join("\n");
        assert!(r.iter().any(|l| l == "begin slot=b"), "{all}");
        assert!(r.iter().any(|l| l == "agent: active"), "{all}");
        assert!(r.iter().any(|l| l.contains("nft: table inet airlock")), "{all}");
        assert!(r.iter().any(|l| l.contains("running: slot b release 2")), "{all}");
        assert!(
            r.iter().any(|l| l.contains("entry airlock-2-b.efi: slot b release 2 good")),
            "the trial was not marked good:\n{all}"
        );
        assert!(said(&lines, "healthy on its trial boot"), "{}", vm.tail());
        eprintln!(
            "update: trial boot of release 2 marked good, report at {:.0} s",
            done.as_secs_f64()
        );
        assert!(vm.power_off().success());
        entries(&["airlock-1-a.efi", "airlock-2-b.efi"]);
        eprintln!("update test: {:.0} s", test_started.elapsed().as_secs_f64());
    }
}

/// The AIRLOCK-CFG partition's root listing (mtools, from the host).
fn config_files(disk: &Path) -> String {
    let (offset, _) = partition(disk, "airlock-config");
    let out = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .arg("::/")
        .output()
        .expect("mdir");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file on the AIRLOCK-CFG partition.
fn config_file(disk: &Path, name: &str) -> String {
    let (offset, _) = partition(disk, "airlock-config");
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .arg(format!("::/{name}"))
        .output()
        .expect("mtype");
    assert!(out.status.success(), "mtype {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (offset, size) in bytes of a named GPT partition.
fn partition(disk: &Path, name: &str) -> (u64, u64) {
    let out = Command::new("sfdisk").arg("-J").arg(disk).output().expect("sfdisk -J");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk JSON");
    let p = v["partitiontable"]["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no partition {name} in {}", disk.display()));
    let sectors = |k: &str| p[k].as_u64().expect("sfdisk: partition start and size") * 512;
    (sectors("start"), sectors("size"))
}
