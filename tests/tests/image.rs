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

    let first = boot_and_check(&disk, &scratch.0, 1);
    let said = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));
    assert!(
        said(&first, "airlock-state: first boot: formatting"),
        "first boot did not format the state"
    );
    assert!(
        said(&first, "airlock-factory-policy: applied"),
        "first boot did not apply the factory policy"
    );

    let second = boot_and_check(&disk, &scratch.0, 2);
    assert!(!said(&second, "first boot: formatting"), "the second boot formatted the state again");
    assert!(
        !said(&second, "airlock-factory-policy: applied"),
        "the factory policy ran again on the second boot"
    );
}
