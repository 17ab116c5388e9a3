//! `airlock-agent hwcheck`: does this box qualify as an appliance?
//!
//! Reads the kernel's view of the machine (sysfs, procfs, one BPF program
//! load) and compares it with a hardware profile's minimums when one is given.
//! It changes nothing: it never attaches to a port (a running boundary stays
//! as it is); the XDP column reports what is attached now and whether the
//! port's driver has native XDP.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

use airlock_hardware::{Profile, TpmRequirement, XdpMode};
use serde::Serialize;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Meets the requirement.
    Pass,
    /// Works, but worth a look (not a qualification failure).
    Warn,
    /// Does not qualify.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked, e.g. `kernel.btf` or `port.eth0`.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The profile checked against, if any.
    pub profile: Option<String>,
    /// True when no check failed.
    pub pass: bool,
    /// The checks, in a fixed order.
    pub checks: Vec<Check>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.profile {
            Some(p) => writeln!(f, "hardware check against profile {p}")?,
            None => writeln!(f, "hardware check (no profile: minimums not checked)")?,
        }
        for c in &self.checks {
            writeln!(f, "{:<4} {:<18} {}", c.status, c.name, c.detail)?;
        }
        write!(f, "{}", if self.pass { "result: PASS" } else { "result: FAIL" })
    }
}

/// A port to look at: its name and, from a profile, the expected driver and mode.
#[derive(Debug, Clone)]
pub struct PortSpec {
    /// Interface name.
    pub name: String,
    /// Expected kernel driver.
    pub driver: Option<String>,
    /// Expected XDP mode.
    pub xdp: Option<XdpMode>,
}

/// Where the checks read from (a test points it at a fake tree).
#[derive(Debug, Clone)]
pub struct Sources {
    /// Usually `/`.
    pub root: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self { root: PathBuf::from("/") }
    }
}

impl Sources {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p)).ok()
    }
}

/// Drivers with XDP in the driver (native mode) in Linux 6.1, among those an
/// appliance is likely to meet.
const NATIVE_XDP_DRIVERS: &[&str] = &[
    "igc",
    "igb",
    "ixgbe",
    "ixgbevf",
    "i40e",
    "ice",
    "virtio_net",
    "veth",
    "tun",
    "mlx4_core",
    "mlx5_core",
    "bnxt_en",
    "ena",
    "nfp",
    "qede",
    "sfc",
    "stmmac",
    "mvneta",
    "mvpp2",
    "tsnep",
    "fec",
    "atlantic",
    "xennet",
    "hv_netvsc",
    "lan743x",
];

/// hwcheck's input problems (bad profile).
#[derive(Debug, thiserror::Error)]
pub enum HwcheckError {
    /// The profile is unreadable or invalid.
    #[error(transparent)]
    Profile(#[from] airlock_hardware::LoadError),
}

/// `airlock-agent hwcheck`: ports from the profile, else from the agent's
/// configuration when it is readable, else none. Prints the report; returns
/// whether the box qualifies.
pub fn command(profile: Option<&Path>, config: &Path, json: bool) -> Result<bool, HwcheckError> {
    let profile = profile.map(Profile::load).transpose()?;
    let ports: Vec<PortSpec> = match &profile {
        Some(p) => p
            .boundary_ports()
            .map(|p| PortSpec {
                name: p.name.clone(),
                driver: Some(p.driver.clone()),
                xdp: Some(p.xdp),
            })
            .collect(),
        None => crate::config::AgentConfig::load(config)
            .map(|c| {
                c.ports
                    .iter()
                    .map(|p| PortSpec { name: p.name.clone(), driver: None, xdp: None })
                    .collect()
            })
            .unwrap_or_default(),
    };
    let report = check(&Sources::default(), profile.as_ref(), &ports);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!("{report}");
    }
    Ok(report.pass)
}

/// Runs every check. `ports` are the ports to qualify (from the profile, or
/// the agent's configuration).
pub fn check(src: &Sources, profile: Option<&Profile>, ports: &[PortSpec]) -> Report {
    let mut checks = Vec::new();
    let mut add = |name: &str, status: Status, detail: String| {
        checks.push(Check { name: name.to_owned(), status, detail })
    };

    let release = src.read("/proc/sys/kernel/osrelease").unwrap_or_default();
    add("kernel", Status::Pass, format!("Linux {}", release.trim()));
    match std::fs::metadata(src.path("/sys/kernel/btf/vmlinux")) {
        Ok(m) => add(
            "kernel.btf",
            Status::Pass,
            format!("/sys/kernel/btf/vmlinux, {} KiB", m.len() / 1024),
        ),
        Err(_) => add(
            "kernel.btf",
            Status::Fail,
            "no /sys/kernel/btf/vmlinux (kernel without BTF)".into(),
        ),
    }
    if src.root == Path::new("/") {
        match load_trivial_xdp() {
            Ok(()) => add("bpf.xdp", Status::Pass, "an XDP program loads (BPF_PROG_LOAD)".into()),
            Err(e) => add("bpf.xdp", Status::Fail, format!("cannot load an XDP program: {e}")),
        }
    }
    let bpffs = src
        .read("/proc/mounts")
        .is_some_and(|m| m.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")));
    add(
        "bpf.fs",
        if bpffs { Status::Pass } else { Status::Warn },
        if bpffs {
            "bpffs mounted".into()
        } else {
            "no bpffs mounted (the agent mounts one)".into()
        },
    );

    for p in ports {
        let (status, detail) = port_check(src, p);
        add(&format!("port.{}", p.name), status, detail);
    }

    let wg = if src.path("/sys/module/wireguard").exists() {
        (Status::Pass, "kernel module loaded".to_owned())
    } else if module_available(src, "wireguard") {
        (Status::Pass, "kernel module available (not loaded yet)".to_owned())
    } else {
        (Status::Fail, "no kernel module (the image's kernel has one)".to_owned())
    };
    add("wireguard", wg.0, wg.1);

    let cpuinfo = src.read("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count() as u32;
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let min_cpus = profile.map_or(1, |p| p.minimum.cpus);
    add(
        "cpu",
        if cpus >= min_cpus { Status::Pass } else { Status::Fail },
        format!("{cpus} logical CPUs ({model}); minimum {min_cpus}"),
    );
    let has = |f: &str| flags.contains(&f);
    let aes_needed = profile.is_some_and(|p| p.minimum.aes);
    add(
        "cpu.crypto",
        match (has("aes"), aes_needed) {
            (true, _) => Status::Pass,
            (false, true) => Status::Fail,
            (false, false) => Status::Warn,
        },
        format!(
            "AES-NI {}, AVX2 {} (ChaCha20-Poly1305 SIMD for WireGuard), SHA-NI {}",
            yes(has("aes")),
            yes(has("avx2")),
            yes(has("sha_ni"))
        ),
    );

    let mem_kib = src
        .read("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(0);
    // The firmware and kernel keep some memory: allow 10% below the nominal size.
    let min_mib = profile.map_or(512, |p| p.minimum.memory_mib);
    add(
        "memory",
        if mem_kib / 1024 >= min_mib * 9 / 10 { Status::Pass } else { Status::Fail },
        format!("{} MiB; minimum {min_mib} MiB", mem_kib / 1024),
    );

    let (disk, disk_bytes) = largest_disk(src);
    let min_gib = profile.map_or(1, |p| p.minimum.storage_gib);
    add(
        "disk",
        if disk_bytes >= min_gib << 30 { Status::Pass } else { Status::Fail },
        format!("{disk}: {:.1} GiB; minimum {min_gib} GiB", disk_bytes as f64 / f64::from(1 << 30)),
    );

    let tpm = src.path("/dev/tpmrm0").exists();
    let need = profile.map_or(TpmRequirement::Optional, |p| p.tpm);
    add(
        "tpm",
        match (tpm, need) {
            (true, _) | (false, TpmRequirement::None) => Status::Pass,
            (false, TpmRequirement::Optional) => Status::Warn,
            (false, TpmRequirement::Required) => Status::Fail,
        },
        match (tpm, need) {
            (true, _) => "TPM 2.0 at /dev/tpmrm0".into(),
            (false, TpmRequirement::None) => {
                "none (not expected by this profile: the state key is not sealed)".into()
            }
            (false, _) => "no /dev/tpmrm0: the state key cannot be sealed".into(),
        },
    );

    let clocksource = src
        .read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let (synced, now) = clock_state();
    let sane = now >= 1_735_689_600; // 2025-01-01: certificates need a real date.
    add(
        "clock",
        match (sane, synced) {
            (false, _) => Status::Fail,
            (true, true) => Status::Pass,
            (true, false) => Status::Warn,
        },
        format!(
            "source {clocksource}; {}; {}",
            if synced { "NTP synchronized" } else { "not NTP synchronized" },
            if sane { "date plausible" } else { "date before 2025: set the clock" }
        ),
    );

    let pass = checks.iter().all(|c| c.status != Status::Fail);
    Report { profile: profile.map(|p| p.name.clone()), pass, checks }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn port_check(src: &Sources, p: &PortSpec) -> (Status, String) {
    let dev = src.path(&format!("/sys/class/net/{}", p.name));
    if !dev.exists() {
        return (Status::Fail, "no such interface".into());
    }
    let driver = std::fs::read_link(dev.join("device/driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none (virtual)".into());
    let native = NATIVE_XDP_DRIVERS.contains(&driver.as_str());
    let attached = if src.root == Path::new("/") { attached_xdp(&p.name) } else { None };
    let mut status = Status::Pass;
    let mut notes = vec![format!("driver {driver}")];
    if let Some(want) = &p.driver {
        if *want != driver {
            status = Status::Fail;
            notes.push(format!("profile expects {want}"));
        }
    }
    notes.push(format!("native XDP {}", if native { "supported" } else { "not supported" }));
    if p.xdp == Some(XdpMode::Native) && !native {
        status = Status::Fail;
        notes.push("profile wants native mode".into());
    }
    notes.push(match attached {
        Some(mode) => format!("XDP attached now ({mode})"),
        None => "no XDP attached now".into(),
    });
    (status, notes.join(", "))
}

/// The XDP mode attached to `port` now, from `ip -d -j link`.
pub(crate) fn attached_xdp(port: &str) -> Option<String> {
    let out = Command::new("ip").args(["-d", "-j", "link", "show", "dev", port]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let xdp = v.get(0)?.get("xdp")?;
    Some(
        match xdp.get("mode").and_then(serde_json::Value::as_u64) {
            Some(1) => "native",
            Some(2) => "generic",
            Some(3) => "offload",
            _ => "unknown mode",
        }
        .to_owned(),
    )
}

fn module_available(src: &Sources, name: &str) -> bool {
    let release = src.read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = src.path(&format!("/lib/modules/{}", release.trim()));
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let deps = std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default();
    let needle = format!("/{name}.ko");
    builtin
        .lines()
        .chain(deps.lines())
        .any(|l| l.split(':').next().is_some_and(|m| m.contains(&needle)))
}

/// The largest real disk (not loop, ram, zram or device-mapper) and its size.
fn largest_disk(src: &Sources) -> (String, u64) {
    let Ok(dir) = std::fs::read_dir(src.path("/sys/block")) else {
        return ("no disks".into(), 0);
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "sr", "nbd"].iter().any(|p| name.starts_with(p)) {
                return None;
            }
            let sectors: u64 =
                std::fs::read_to_string(e.path().join("size")).ok()?.trim().parse().ok()?;
            Some((name, sectors * 512))
        })
        .max_by_key(|(_, b)| *b)
        .unwrap_or_else(|| ("no disks".into(), 0))
}

/// (NTP synchronized, seconds since the epoch).
fn clock_state() -> (bool, i64) {
    // SAFETY: adjtimex with modes = 0 only reads; tx is a valid, zeroed struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    let synced = state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (synced, now)
}

/// Loads `r0 = XDP_PASS; exit` and closes it: the kernel has BPF and XDP and
/// this process may load programs.
fn load_trivial_xdp() -> std::io::Result<()> {
    // mov64 r0, 2 (XDP_PASS); exit
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    attr.prog_name[..7].copy_from_slice(b"hwcheck");
    // SAFETY: attr points to a correctly laid out bpf_attr prefix that lives
    // across the call; the kernel only reads it and the buffers it names.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoad,
            std::mem::size_of::<ProgLoad>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a file descriptor the kernel just gave us.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_machine() -> tempdir::Dir {
        let d = tempdir::Dir::new();
        d.write("proc/sys/kernel/osrelease", "6.1.0-99-amd64\n");
        d.write("sys/kernel/btf/vmlinux", "btf");
        d.write("proc/mounts", "bpf /sys/fs/bpf bpf rw 0 0\n");
        d.write(
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse aes avx2\n\nprocessor\t: 1\n",
        );
        d.write("proc/meminfo", "MemTotal:        2048000 kB\n");
        d.write("sys/block/vda/size", "4194304\n");
        d.write("sys/block/loop0/size", "99999999999\n");
        d.write("sys/devices/system/clocksource/clocksource0/current_clocksource", "tsc\n");
        d.write(
            "lib/modules/6.1.0-99-amd64/modules.dep",
            "kernel/drivers/net/wireguard/wireguard.ko: \n",
        );
        d.mkdir("sys/class/net/eth0/device");
        d.mkdir("bus/virtio_net");
        std::os::unix::fs::symlink(
            d.0.join("bus/virtio_net"),
            d.0.join("sys/class/net/eth0/device/driver"),
        )
        .unwrap();
        d
    }

    fn profile(tpm: &str, cpus: u32) -> Profile {
        Profile::parse(&format!(
            "name = \"t\"\ndescription = \"t\"\nconsole = \"ttyS0\"\ntpm = \"{tpm}\"\n\
             [minimum]\ncpus = {cpus}\nmemory_mib = 2000\nstorage_gib = 2\naes = true\n\
             [[port]]\nname = \"eth0\"\nrole = \"patient\"\ndriver = \"virtio_net\"\nxdp = \"native\"\n\
             [[port]]\nname = \"eth1\"\nrole = \"uplink\"\ndriver = \"igc\"\nxdp = \"native\"\n"
        ))
        .unwrap()
    }

    fn specs(p: &Profile) -> Vec<PortSpec> {
        p.ports
            .iter()
            .map(|p| PortSpec {
                name: p.name.clone(),
                driver: Some(p.driver.clone()),
                xdp: Some(p.xdp),
            })
            .collect()
    }

    fn status(r: &Report, name: &str) -> Status {
        r.checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name}: {r}")).status
    }

    #[test]
    fn a_machine_that_meets_the_profile_passes_but_for_the_missing_port() {
        let d = fake_machine();
        let p = profile("none", 2);
        let r = check(&Sources { root: d.0.clone() }, Some(&p), &specs(&p));
        assert_eq!(status(&r, "kernel.btf"), Status::Pass);
        assert_eq!(status(&r, "port.eth0"), Status::Pass, "{r}");
        assert_eq!(status(&r, "port.eth1"), Status::Fail, "{r}");
        assert_eq!(status(&r, "wireguard"), Status::Pass, "{r}");
        assert_eq!(status(&r, "cpu"), Status::Pass);
        assert_eq!(status(&r, "cpu.crypto"), Status::Pass);
        assert_eq!(status(&r, "memory"), Status::Pass);
        assert_eq!(status(&r, "disk"), Status::Pass, "{r}");
        assert_eq!(status(&r, "tpm"), Status::Pass);
        assert!(!r.pass);
        assert!(r.to_string().ends_with("result: FAIL"));
    }

    #[test]
    fn minimums_and_tpm_fail_with_the_reason() {
        let d = fake_machine();
        let p = profile("required", 8);
        let r = check(&Sources { root: d.0.clone() }, Some(&p), &[]);
        assert_eq!(status(&r, "cpu"), Status::Fail);
        assert_eq!(status(&r, "tpm"), Status::Fail);
        let cpu = r.checks.iter().find(|c| c.name == "cpu").unwrap();
        assert!(
            cpu.detail.contains("2 logical CPUs") && cpu.detail.contains("minimum 8"),
            "{cpu:?}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pass"], false);
        assert_eq!(json["checks"][0]["status"], "pass");
    }

    #[test]
    fn a_missing_btf_and_wireguard_fail() {
        let d = fake_machine();
        std::fs::remove_file(d.0.join("sys/kernel/btf/vmlinux")).unwrap();
        std::fs::remove_file(d.0.join("lib/modules/6.1.0-99-amd64/modules.dep")).unwrap();
        let r = check(&Sources { root: d.0.clone() }, None, &[]);
        assert_eq!(status(&r, "kernel.btf"), Status::Fail);
        assert_eq!(status(&r, "wireguard"), Status::Fail);
        assert_eq!(status(&r, "tpm"), Status::Warn);
    }

    /// This machine, for real (root in CI): BTF is there and an XDP program loads.
    #[test]
    fn this_machine_has_btf_and_loads_xdp() {
        let r = check(&Sources::default(), None, &[]);
        assert_eq!(status(&r, "kernel.btf"), Status::Pass, "{r}");
        assert_eq!(status(&r, "bpf.xdp"), Status::Pass, "{r}");
    }

    mod tempdir {
        use std::path::PathBuf;

        /// A scratch directory removed on drop.
        pub struct Dir(pub PathBuf);

        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "airlock-hwcheck-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn write(&self, rel: &str, text: &str) {
                let p = self.0.join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            }
            pub fn mkdir(&self, rel: &str) {
                std::fs::create_dir_all(self.0.join(rel)).unwrap();
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
