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
    #[cfg(feature = "image-update")]
    fn boot(disk: &Path, scratch: &Path) -> Vm {
        Vm::boot_with(disk, scratch, None)
    }

    /// Boots with an optional second disk (update media).
    #[cfg(feature = "image-update")]
    fn boot_with(disk: &Path, scratch: &Path, media: Option<&Path>) -> Vm {
        Vm::boot_in(disk, scratch, media, None)
    }

    /// Boots, optionally inside network namespace `netns`: then the uplink
    /// (eth1) reaches that namespace's loopback as 10.0.2.2 (QEMU user-mode
    /// networking), where [`VmController`] listens. The patient port (eth0)
    /// stays isolated.
    fn boot_in(disk: &Path, scratch: &Path, media: Option<&Path>, netns: Option<&str>) -> Vm {
        let q = qemu_dir();
        let vars = scratch.join("OVMF_VARS.fd");
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF vars (apt ovmf)");
        let qmp = scratch.join("qmp.sock");
        let qemu = q.join("usr/bin/qemu-system-x86_64");
        // `ip netns exec` execs QEMU in place: the child is QEMU itself.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&qemu);
                c
            }
            None => Command::new(&qemu),
        };
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
            let restrict = if i == 1 && netns.is_some() { "off" } else { "on" };
            cmd.arg("-netdev").arg(format!("user,id=n{i},restrict={restrict}"));
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
/// Boots, waits for the agent and the boot report and checks them, runs
/// `during` with the VM still up, then powers off. The console lines.
fn boot_and_check(
    disk: &Path,
    scratch: &Path,
    boot: u32,
    netns: Option<&str>,
    during: &mut dyn FnMut(&mut Vm),
) -> Vec<String> {
    let mut vm = Vm::boot_in(disk, scratch, None, netns);
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
    during(&mut vm);
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

/// A real controller for the VM, in its own network namespace, listening on
/// that namespace's loopback; a VM started in the namespace
/// ([`Vm::boot_in`]) reaches it as 10.0.2.2 through its uplink port.
struct VmController {
    // Dropped in this order: the controller, then its namespace.
    ctl: airlock_testbed::Controller,
    ns: airlock_testbed::NetNs,
}

/// The appliance the VM enrolls as, and its policy.
const VM_APPLIANCE: &str = "vm-appliance";
const VM_POLICY: &str = r#"version = 1
description = "Image boot test: the QEMU virtual appliance"

[[site]]
name = "test-site"

[[appliance]]
name = "vm-appliance"
site = "test-site"
ports = { patient = ["eth0"], uplink = ["eth1"] }

[[host]]
name = "ward-pc"
appliance = "vm-appliance"
addresses = ["10.77.0.11"]
"#;

/// How the appliance is provisioned to reach [`VmController`].
const VM_CONTROLLER_URL: &str = "https://10.0.2.2:8443";

impl VmController {
    /// Starts the controller, applies [`VM_POLICY`] and issues an enrollment
    /// token for [`VM_APPLIANCE`]. The logged-in API client and the token.
    /// `update_key`: the image update key, for tests that roll out updates.
    fn start(
        scratch: &Path,
        update_key: Option<PathBuf>,
    ) -> (VmController, airlock_testbed::ControllerApi, String) {
        use std::net::SocketAddr;
        let ns = airlock_testbed::NetNs::unique().expect("a namespace for the controller");
        let main = SocketAddr::from(([127, 0, 0, 1], 8443));
        let opts = airlock_testbed::ControllerOptions {
            netns: ns.name().to_owned(),
            data_dir: scratch.join("controller"),
            bin: None,
            listen: main,
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            public_url: VM_CONTROLLER_URL.to_owned(),
            agent_url: "https://10.0.2.2:8444".to_owned(),
            server_names: vec!["10.0.2.2".to_owned(), "127.0.0.1".to_owned()],
            api_addr: main,
            ready_timeout: airlock_testbed::CONTROLLER_READY_TIMEOUT,
            die_with_parent: true,
            update_key,
        };
        let ctl = airlock_testbed::Controller::start(opts).expect("starting the controller");
        let mut api = ctl.client().expect("logging in to the controller");
        api.apply_policy(VM_POLICY, "image boot test").expect("applying the VM policy");
        let token = api.create_appliance(VM_APPLIANCE).expect("an enrollment token").token;
        (VmController { ctl, ns }, api, token)
    }

    fn netns(&self) -> &str {
        self.ns.name()
    }

    fn ca_fingerprint(&self) -> String {
        self.ctl.record().ca_fingerprint.clone()
    }
}

/// Writes the first-boot settings into `disk` as a technician does at flash
/// time: the controller, its CA fingerprint, the token and the uplink address.
fn provision(disk: &Path, ctl: &VmController, token: &str) {
    let status = Command::new("cargo")
        .current_dir(airlock_testbed::workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--", "image", "provision", "--image"])
        .arg(disk)
        .args(["--controller", VM_CONTROLLER_URL, "--ca-fingerprint", &ctl.ca_fingerprint()])
        .args(["--address", "10.0.2.15/24", "--gateway", "10.0.2.2", "--interface", "eth1"])
        .env("AIRLOCK_ENROLLMENT_TOKEN", token)
        .status()
        .expect("cargo xtask image provision");
    assert!(status.success(), "cargo xtask image provision failed");
}

/// Waits (with the VM up) until the controller sees the appliance enrolled,
/// enforcing its newest bundle; returns how long after `since` that was.
fn wait_enrolled_and_applied(
    api: &mut airlock_testbed::ControllerApi,
    vm: &Vm,
    since: Instant,
) -> (Duration, airlock_testbed::ApplianceView) {
    let view = api.wait_applied(VM_APPLIANCE, BOOT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the appliance did not enroll and apply its bundle: {e}\nconsole tail:\n{}",
            vm.tail()
        )
    });
    (since.elapsed(), view)
}

/// First boot of a fresh copy, provisioned for a real controller: the state
/// partition is formatted, the boundary enforced on both layers (the factory
/// policy is skipped: the policy comes from the controller); the agent enrolls with the provisioned token over the
/// uplink, through its own boundary, and enforces the controller's bundle.
/// Second boot of the same disk: the state is opened (not formatted again),
/// the agent re-applies the stored (last-known-good) policy by itself and
/// reconnects with its certificate (no token left).
#[test]
fn the_image_boots_enrolls_with_the_controller_and_keeps_its_state_across_a_reboot() {
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

    let (ctl, mut api, token) = VmController::start(&scratch.0, None);
    provision(&disk, &ctl, &token);

    let booted = Instant::now();
    let first = boot_and_check(&disk, &scratch.0, 1, Some(ctl.netns()), &mut |vm| {
        let (took, view) = wait_enrolled_and_applied(&mut api, vm, booted);
        let health = view.health.as_ref().expect("a health report");
        assert!(health.enforcing, "enrolled but not enforcing: {:?}", health.problems);
        assert!(
            health.ports.iter().any(|p| p.name == "eth1" && p.role == "uplink" && p.attached),
            "{:?}",
            health.ports
        );
        eprintln!(
            "boot 1: enrolled and enforcing bundle {:?} {:.0} s after QEMU started",
            view.applied_version,
            took.as_secs_f64()
        );
    });
    let said = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));
    assert!(
        said(&first, "airlock-provision: enrollment token moved"),
        "the provisioned token was not taken"
    );
    assert!(said(&first, "airlock-provision: address 10.0.2.15/24 on eth1"), "no uplink address");
    assert!(
        said(&first, &format!("airlock-provision: controller {VM_CONTROLLER_URL}")),
        "the agent did not get the provisioned controller"
    );
    // Enrolled: the agent deleted the one-time token file.
    let config = config_files(&disk);
    assert!(
        !config.contains("ENROLL~1.TOK") && !config.contains("enrollment.token"),
        "the used token file is still there:\n{config}"
    );
    let prov = config_file(&disk, "provision.toml");
    assert!(prov.contains(&format!("controller_url = \"{VM_CONTROLLER_URL}\"")), "{prov}");
    assert!(!prov.contains("enrollment_token"), "the token stayed in provision.toml:\n{prov}");
    assert!(
        said(&first, "airlock-state: first boot: formatting"),
        "first boot did not format the state"
    );
    // Provisioned for a controller: its policy comes from there only (a local
    // factory policy applied after enrollment would replace the bundle).
    assert!(
        said(
            &first,
            "airlock-factory-policy: skipped: the appliance takes its policy from its controller"
        ),
        "first boot: the factory policy was not skipped for a controller-managed appliance"
    );
    assert!(!said(&first, "airlock-factory-policy: applied"), "the factory policy was applied");

    let seen_before = api.appliance(VM_APPLIANCE).expect("the appliance").last_seen;
    let booted = Instant::now();
    let second = boot_and_check(&disk, &scratch.0, 2, Some(ctl.netns()), &mut |vm| {
        let view = api
            .wait_for(VM_APPLIANCE, "a report from the second boot", BOOT_TIMEOUT, |v| {
                v.last_seen > seen_before && airlock_testbed::is_applied(v)
            })
            .unwrap_or_else(|e| panic!("no report after the reboot: {e}\n{}", vm.tail()));
        eprintln!(
            "boot 2: reconnected, bundle {:?} applied, {:.0} s after QEMU started",
            view.applied_version,
            booted.elapsed().as_secs_f64()
        );
    });
    for lines in [&first, &second] {
        assert!(!said(lines, &token), "the enrollment token appeared on the console");
    }
    assert!(
        said(&second, "no token left (enrolled"),
        "second boot: the agent was not enrolled with the provisioned controller"
    );
    assert!(!said(&second, "first boot: formatting"), "the second boot formatted the state again");
    assert!(
        !said(&second, "airlock-factory-policy:"),
        "the factory policy unit ran again on the second boot"
    );
    assert!(api.appliance(VM_APPLIANCE).expect("the appliance").refused.is_none());
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

    /// Polls the controller's view of the appliance's image until `done`.
    fn wait_image(
        api: &mut airlock_testbed::ControllerApi,
        vm: &Vm,
        what: &str,
        done: impl Fn(&airlock_proto::release::ReleaseState) -> bool,
    ) -> airlock_proto::release::ReleaseState {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(o) = api.releases() {
                let me = o.appliances.into_iter().find(|a| a.appliance == VM_APPLIANCE);
                if let Some(img) = me.as_ref().and_then(|a| a.image.clone()) {
                    if done(&img) {
                        return img;
                    }
                }
                last = format!("{me:?}");
            }
            thread::sleep(Duration::from_millis(500));
        }
        panic!("the controller never saw {what}; last: {last}\nconsole tail:\n{}", vm.tail());
    }

    /// The controller-driven update on the real image: a tampered bundle is
    /// refused at upload; release 2 is uploaded and rolled out; the enrolled
    /// appliance reports release 1 on slot a, is offered release 2 in a
    /// report answer, downloads it over mTLS through its own boundary,
    /// verifies and writes slot b and reboots; the trial boot of slot b is
    /// healthy, systemd-bless-boot marks it good, and the controller sees
    /// release 2 on slot b with the rollout done. Then release 3 (its agent
    /// cannot become healthy) is rolled out: written to slot a, two failed
    /// trial boots, back on release 2; the controller sees the failed trial
    /// and offers release 3 no more. 7 boots.
    #[test]
    fn a_controller_rollout_updates_the_appliance_through_a_trial_boot() {
        let test_started = Instant::now();
        let image = image();
        let (r2, r3) = update_bundles(&image);
        let scratch = Scratch::new("rollout");
        let disk = disk_copy(&image, &scratch.0);
        let key = image.parent().expect("the image's directory").join("image-signing.pub");
        let (ctl, mut api, token) = VmController::start(&scratch.0, Some(key));
        provision(&disk, &ctl, &token);

        let bundle = std::fs::read(&r2).expect("the release 2 bundle");
        let mut tampered = bundle.clone();
        let at = tampered.len() / 3;
        tampered[at] ^= 0x01;
        let (status, body) = api.upload_release(tampered).expect("uploading");
        assert_eq!(status, 422, "a tampered bundle was accepted: {body}");
        let upload = Instant::now();
        let (status, body) = api.upload_release(bundle).expect("uploading");
        assert!(matches!(status, 200 | 201), "upload refused: {status} {body}");
        eprintln!(
            "rollout: {} MiB bundle uploaded and verified in {:.1} s",
            std::fs::metadata(&r2).map(|m| m.len() >> 20).unwrap_or(0),
            upload.elapsed().as_secs_f64()
        );
        api.start_rollout(2).expect("starting the rollout");

        let mut vm = Vm::boot_in(&disk, &scratch.0, None, Some(ctl.netns()));
        let (took, _) = wait_enrolled_and_applied(&mut api, &vm, vm.started);
        eprintln!("rollout: enrolled and enforcing {:.0} s after QEMU started", took.as_secs_f64());
        let installing = Instant::now();
        let rebooted = vm.wait_exit("the reboot after the controller's update");
        eprintln!(
            "rollout: offered, downloaded, written and rebooting {:.0} s after enrollment \
             ({:.0} s after QEMU started)",
            installing.elapsed().as_secs_f64(),
            rebooted.as_secs_f64()
        );
        assert!(
            vm.lines().iter().any(|l| l.contains("installed the trial entry airlock-2-b+")),
            "the VM rebooted without installing release 2:\n{}",
            vm.tail()
        );
        let entries = esp_entries(&disk);
        assert_eq!(entries, ["airlock-1-a.efi", "airlock-2-b+2.efi"], "ESP entries");

        let mut vm = Vm::boot_in(&disk, &scratch.0, None, Some(ctl.netns()));
        let img = wait_image(&mut api, &vm, "release 2 on slot b, marked good", |i| {
            i.release == 2 && i.slot == "b" && !i.on_trial
        });
        assert!(img.failed_trials.is_empty() && img.last_failure.is_none(), "{img:?}");
        let o = api.releases().expect("the releases");
        let me = o.appliances.iter().find(|a| a.appliance == VM_APPLIANCE).expect("appliance");
        assert_eq!(me.progress, airlock_testbed::RolloutProgress::Done, "{me:?}");
        eprintln!(
            "rollout: the trial boot of release 2 is good and reported {:.0} s after QEMU started",
            vm.started.elapsed().as_secs_f64()
        );
        assert!(vm.power_off().success());
        assert_eq!(esp_entries(&disk), ["airlock-1-a.efi", "airlock-2-b.efi"], "ESP entries");

        // Release 3, whose agent cannot become healthy, rolled out the same
        // way: written to slot a, two failed trial boots, back on release 2,
        // and the controller stops offering it.
        let (status, body) = api.upload_release(std::fs::read(&r3).expect("r3")).expect("upload");
        assert!(matches!(status, 200 | 201), "upload refused: {status} {body}");
        api.start_rollout(3).expect("starting the rollout of release 3");
        let mut vm = Vm::boot_in(&disk, &scratch.0, None, Some(ctl.netns()));
        vm.wait_exit("the reboot after installing release 3");
        assert!(
            vm.lines().iter().any(|l| l.contains("installed the trial entry airlock-3-a+")),
            "the VM rebooted without installing release 3:\n{}",
            vm.tail()
        );
        assert_eq!(esp_entries(&disk), ["airlock-2-b.efi", "airlock-3-a+2.efi"], "ESP entries");
        for try_no in 1..=2 {
            let mut vm = Vm::boot_in(&disk, &scratch.0, None, Some(ctl.netns()));
            vm.wait_exit("the reboot after a failed trial");
            assert!(
                said(&vm.lines(), "airlock-boot-check: FAILED: trial boot of slot a (release 3)"),
                "trial {try_no} of release 3 did not fail its boot check:\n{}",
                vm.tail()
            );
        }
        assert_eq!(esp_entries(&disk), ["airlock-2-b.efi", "airlock-3-a+0-2.efi"], "ESP entries");
        let mut vm = Vm::boot_in(&disk, &scratch.0, None, Some(ctl.netns()));
        let img = wait_image(&mut api, &vm, "release 3's failed trial", |i| {
            i.release == 2 && i.slot == "b" && i.failed_trials.contains(&3)
        });
        let o = api.releases().expect("the releases");
        let me = o.appliances.iter().find(|a| a.appliance == VM_APPLIANCE).expect("appliance");
        assert_eq!(me.progress, airlock_testbed::RolloutProgress::FailedTrial, "{me:?}");
        // Two more report intervals: no offer, so no second download.
        thread::sleep(Duration::from_secs(25));
        assert!(
            !said(&vm.lines(), "downloading"),
            "release 3 was downloaded again after its failed trial:\n{}",
            vm.tail()
        );
        eprintln!(
            "rollout: release 3 failed its two trials; back on release 2 ({img:?}), not offered again"
        );
        assert!(vm.power_off().success());
        eprintln!("rollout test: {:.0} s", test_started.elapsed().as_secs_f64());
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
