//! `cargo xtask lab up|status|down`.
//!
//! State lives in `/run/airlock-lab/<prefix>/`: `lab.json` (what teardown
//! needs: the agent's and the controller's pids, configs and pins, and who
//! runs the lab), `status.json` (the [`LabStatus`] at start), `agent/` (the
//! agent's config, ready file and log) and `controller/` (the controller's
//! data directory: store, key file, `ca.pem`, log, and `controller.out`, 0600,
//! which holds the first start's bootstrap credential).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use airlock_testbed::{
    addr, names, AgentRecord, ControllerRecord, Lab, LabOptions, LabStatus, Topology, BPFFS,
    HOST_IF, LAB_APPLIANCE, MGMT_PORT, PATIENT_PORT,
};
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::step::{self, Step};

pub const DEFAULT_PREFIX: &str = "al";
const STATE_ROOT: &str = "/run/airlock-lab";
const STATS_EVERY: Duration = Duration::from_secs(5);

/// `lab.json`.
#[derive(Debug, Serialize, Deserialize)]
struct LabRecord {
    prefix: String,
    /// The xtask process that runs a foreground lab.
    xtask_pid: u32,
    /// Started with --detach (nobody tears it down but `lab down`).
    detached: bool,
    agent: AgentRecord,
    /// The controller (absent: a lab started with --no-controller).
    #[serde(default)]
    controller: Option<ControllerRecord>,
}

impl LabRecord {
    fn status(&self) -> LabStatus {
        LabStatus::probe_with(&self.prefix, Some(&self.agent), self.controller.as_ref())
    }
}

/// The status of lab `prefix` when it runs completely (all namespaces, the
/// agent and controller alive), so that `lab up` can say so instead of failing.
fn healthy_lab(prefix: &str) -> Option<LabStatus> {
    let record = read_record(prefix).ok()??;
    let status = record.status();
    (status.state == airlock_testbed::LabState::Running && record.agent.is_alive())
        .then_some(status)
}

fn state_dir(prefix: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(prefix)
}

fn read_record(prefix: &str) -> Result<Option<LabRecord>> {
    let path = state_dir(prefix).join("lab.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a lab record", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn up(prefix: &str, detach: bool, policy: Option<&Path>, controller: bool) -> Result<()> {
    names::validate_prefix(prefix)?;
    let existing = names::lab_namespaces(prefix);
    if let Some(status) = healthy_lab(prefix) {
        println!("lab '{prefix}' is already up and enforcing; nothing to do");
        println!("{status}");
        println!("  (`cargo xtask lab down --prefix {prefix}` removes it)");
        return Ok(());
    }
    if state_dir(prefix).exists() || !existing.is_empty() {
        bail!(
            "a lab with prefix '{prefix}' exists already ({}); \
             see `cargo xtask lab status --prefix {prefix}` or remove it with \
             `cargo xtask lab down --prefix {prefix}`",
            if existing.is_empty() {
                format!("state in {}", state_dir(prefix).display())
            } else {
                format!("namespaces {}", existing.join(", "))
            }
        );
    }
    install_signal_handlers()?;
    crate::setup::run()?;
    bail_if_interrupted()?;
    let bins = build(controller)?;
    bail_if_interrupted()?;
    let dir = state_dir(prefix);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = start(prefix, &bins, &dir, detach, policy);
    if result.is_err() || !detach {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: removing {}: {e}", dir.display());
        }
    }
    result
}

/// The binaries `lab up` runs.
struct Bins {
    agent: PathBuf,
    /// `None`: --no-controller.
    controller: Option<PathBuf>,
}

fn build(controller: bool) -> Result<Bins> {
    let mut args = vec!["build", "-p", "airlock-agent"];
    if controller {
        args.extend(["-p", "airlock-controller"]);
    }
    let step = Step::start(format!("building (cargo {})", args.join(" ")));
    step::run(step::cargo().args(&args))?;
    step.ok();
    let debug = airlock_testbed::target_dir().join("debug");
    Ok(Bins {
        agent: debug.join("airlock-agent"),
        controller: controller.then(|| debug.join("airlock-controller")),
    })
}

/// Whether the host link's host address is free (another interactive lab
/// may hold it).
fn host_link_free() -> bool {
    let out = std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]).output();
    out.is_ok_and(|o| {
        let want = format!(" {}/", addr::HOST_LINK_HOST_V4);
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains(&want)
    })
}

fn start(prefix: &str, bins: &Bins, dir: &Path, detach: bool, policy: Option<&Path>) -> Result<()> {
    let managed = bins.controller.is_some();
    let host_link = managed && host_link_free();
    if managed && !host_link {
        println!(
            "note: {} is in use on this host (another lab?): the controller is reachable \
             only from inside its namespace",
            addr::HOST_LINK_HOST_V4
        );
    }
    let what = match (managed, policy) {
        (true, Some(p)) => format!(
            "building lab '{prefix}', starting the controller, applying {} through its API, \
             starting the agent (it enrolls itself)",
            p.display()
        ),
        (true, None) => format!(
            "building lab '{prefix}', starting the controller and the agent (it enrolls itself)"
        ),
        (false, Some(p)) => {
            format!("building lab '{prefix}', starting the agent, applying {}", p.display())
        }
        (false, None) => format!("building lab '{prefix}' and starting the agent"),
    };
    let step = Step::start(what);
    let lab = Lab::start_with(LabOptions {
        state_dir: Some(dir.join("agent")),
        agent_bin: Some(bins.agent.clone()),
        die_with_parent: !detach,
        policy: policy.map(Path::to_owned),
        controller: managed,
        controller_dir: Some(dir.join("controller")),
        controller_bin: bins.controller.clone(),
        host_link,
        report_interval_secs: 5,
        ..LabOptions::new(prefix)
    })?;
    let record = LabRecord {
        prefix: prefix.to_owned(),
        xtask_pid: std::process::id(),
        detached: detach,
        agent: lab.agent().record().clone(),
        controller: lab.controller().map(|c| c.record().clone()),
    };
    write_json(&dir.join("lab.json"), &record)?;
    let status = lab.status();
    write_json(&dir.join("status.json"), &status)?;
    step.ok_with(if managed { "enrolled and enforcing" } else { "enforcing" });
    print_summary(&status, &record.agent, policy);
    if let Some(c) = lab.controller() {
        print_controller(c, prefix, host_link, policy);
    }
    print_footer(&status, detach);
    if detach {
        lab.into_detached();
        return Ok(());
    }
    let outcome = watch(&lab);
    let step = Step::start(format!("tearing down lab '{prefix}'"));
    drop(lab);
    step.ok();
    outcome
}

/// Prints the counters every 5 s until a signal or the agent's death.
fn watch(lab: &Lab) -> Result<()> {
    println!("counters every {}s (Ctrl-C stops and removes the lab):", STATS_EVERY.as_secs());
    let start = Instant::now();
    let mut next = start + STATS_EVERY;
    let record = lab.agent().record();
    let controller = lab.controller().map(|c| c.record());
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!();
            return Ok(());
        }
        if !record.is_alive() {
            bail!("the agent exited; log tail:\n{}", record.log_tail(20));
        }
        if let Some(c) = controller.filter(|c| !c.is_alive()) {
            bail!("the controller exited; log tail:\n{}", c.log_tail(20));
        }
        if Instant::now() >= next {
            next += STATS_EVERY;
            let t = start.elapsed().as_secs();
            match lab.agent().stats() {
                Ok(s) => println!("  +{t:>4}s {}", s.summary()),
                Err(e) => println!("  +{t:>4}s stats failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_summary(status: &LabStatus, agent: &AgentRecord, policy: Option<&Path>) {
    let managed = status.controller.is_some();
    let nsenter = format!(
        "nsenter --net=/run/netns/{} {} --config {}",
        agent.netns,
        agent.bin.display(),
        agent.config.display()
    );
    println!();
    match policy {
        Some(p) if managed => println!(
            "lab '{}' is up; the appliance enrolled with the controller and enforces its policy \
             ({}) on both layers (eBPF and nftables), everything else is dropped",
            status.lab,
            p.display()
        ),
        Some(p) => println!(
            "lab '{}' is up; the appliance enforces {} on both layers (eBPF and nftables), \
             everything else is dropped",
            status.lab,
            p.display()
        ),
        None => println!(
            "lab '{}' is up; the appliance enforces default-drop (no flow allowed yet)",
            status.lab
        ),
    }
    println!("  {:<10} {:<12} {:<10} addresses ({HOST_IF})", "host", "namespace", "role");
    for h in &status.hosts {
        let role = serde_json::to_value(h.role).ok();
        let role = role.as_ref().and_then(|r| r.as_str()).unwrap_or("?");
        let addrs: Vec<String> = h
            .ipv4
            .iter()
            .map(ToString::to_string)
            .chain(h.ipv6.iter().map(ToString::to_string))
            .collect();
        println!("  {:<10} {:<12} {role:<10} {}", h.name, h.namespace, addrs.join(" "));
    }
    if managed {
        println!(
            "  appliance ports: {PATIENT_PORT} (patient side), uplink0 (uplink side), \
             {MGMT_PORT} (role management: only the agent's own link to the controller)"
        );
    } else {
        println!("  appliance ports: {PATIENT_PORT} (patient side), uplink0 (uplink side)");
    }
    println!(
        "  agent: pid {}, log {}, pins {}",
        agent.pid,
        agent.log.display(),
        agent.pin_dir.display()
    );
    println!();
    println!("  run on a host:  ip netns exec {}-p1 ping -c1 10.78.0.100", status.lab);
    match policy {
        Some(_) => println!(
            "  try the flow:   ip netns exec {0}-ext python3 -m http.server 443 --bind 10.78.0.100 &\n                  \
             ip netns exec {0}-p1 curl http://10.78.0.100:443/   (p1 passes; {0}-p2 does not)",
            status.lab
        ),
        None if managed => {}
        None => println!(
            "  allow a flow:   {nsenter} flow add --src 10.77.0.11 --dst 10.78.0.100 \
             --proto tcp --dport 443 --rule-id 1 --ttl 5m\n                  \
             (eBPF only: the nftables table, installed with no flows, still drops it; \
             ip netns exec {0}-app nft delete table inet airlock leaves the eBPF layer alone)",
            status.lab
        ),
    }
    match policy {
        Some(p) if !managed => println!(
            "  change policy:  {nsenter} policy diff {0} NEW.toml, then: policy apply NEW.toml \
             --appliance {LAB_APPLIANCE}",
            p.display()
        ),
        _ => {}
    }
    println!("  counters:       {nsenter} stats");
    if managed {
        println!("  sync state:     {nsenter} controller status");
    }
}

/// The controller's part of the summary: where it is, how to reach it and,
/// on its first start, the bootstrap credential (shown once here).
fn print_controller(
    c: &airlock_testbed::Controller,
    prefix: &str,
    host_link: bool,
    policy: Option<&Path>,
) {
    let r = c.record();
    let ca = r.ca_pem.display();
    let host_url = format!("https://{}:{}", addr::HOST_LINK_CONTROLLER_V4, addr::CONTROLLER_PORT);
    println!();
    println!(
        "controller: {} (in namespace {}; agents stream from {})",
        r.url, r.netns, r.agent_url
    );
    if host_link {
        println!("  from this host: {host_url} (host link {})", Topology::host_link_name(prefix));
    }
    println!("  CA fingerprint: {}   (CA certificate: {ca})", r.ca_fingerprint);
    if let Some(p) = c.bootstrap_password() {
        println!(
            "  bootstrap admin credential (shown once; there is no default password): \
             user {}, password {}",
            airlock_testbed::ADMIN_USER,
            p.expose()
        );
        println!(
            "    (the controller's own output with it: {}, mode 0600, removed by `lab down`)",
            r.stdout.display()
        );
    }
    let base = if host_link { host_url.as_str() } else { r.url.as_str() };
    let curl = if host_link {
        format!("curl --cacert {ca}")
    } else {
        format!("ip netns exec {} curl --cacert {ca}", r.netns)
    };
    println!(
        "  web UI:         {base}/  (a browser on this host; trust {ca}, or compare the CA \
         fingerprint above with the one on the login page; sign in as admin)"
    );
    println!("  API:            {curl} {base}/api/v1/openapi.json");
    if host_link {
        println!(
            "                  ip netns exec {} curl --cacert {ca} {}/api/v1/openapi.json",
            r.netns, r.url
        );
    }
    println!(
        "  log in:         {curl} -H content-type:application/json \
         -d '{{\"user\":\"admin\",\"password\":\"PASSWORD\"}}' {base}/api/v1/login   (-> token)"
    );
    println!("  appliance:      {curl} -H \"authorization: Bearer TOKEN\" {base}/api/v1/appliances/{LAB_APPLIANCE}");
    let example = policy.map_or_else(|| "NEW.toml".to_owned(), |p| p.display().to_string());
    println!(
        "  change policy:  python3 -c 'import json,sys; print(json.dumps({{\"text\": open(sys.argv[1]).read()}}))' {example} \\\n                  \
         | {curl} -H \"authorization: Bearer TOKEN\" -H content-type:application/json --data @- {base}/api/v1/policy"
    );
    println!("  controller log: {}", r.log.display());
}

fn print_footer(status: &LabStatus, detach: bool) {
    println!("  status:         cargo xtask lab status --prefix {} [--json]", status.lab);
    if detach {
        println!("  stop:           cargo xtask lab down --prefix {}", status.lab);
    } else {
        println!("  stop:           Ctrl-C (or `cargo xtask lab down --prefix {}`)", status.lab);
    }
    println!();
}

pub fn status(prefix: &str, json: bool) -> Result<()> {
    names::validate_prefix(prefix)?;
    let record = read_record(prefix)?;
    if record.is_none() && names::lab_namespaces(prefix).is_empty() {
        bail!("no lab '{prefix}' (start one with `cargo xtask lab up --prefix {prefix}`)");
    }
    let status = match &record {
        Some(r) => r.status(),
        None => LabStatus::probe(prefix, None),
    };
    let text = if json {
        status.to_json() + "\n"
    } else {
        let how = match &record {
            Some(r) if r.detached => {
                format!("detached; stop with `cargo xtask lab down --prefix {prefix}`")
            }
            Some(r) => format!("in the foreground of xtask pid {}", r.xtask_pid),
            None => format!(
                "no lab record in {}: leftovers? `cargo xtask lab down --prefix {prefix}`",
                state_dir(prefix).display()
            ),
        };
        format!("{status}{how}\n")
    };
    // A closed pipe (`| head`) is not worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}

pub fn down(prefix: &str) -> Result<()> {
    names::validate_prefix(prefix)?;
    let record = match read_record(prefix) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warning: {e:#}; removing what is there");
            None
        }
    };
    let mut did_something = false;
    if let Some(r) = &record {
        if !r.detached && r.xtask_pid != std::process::id() && stop_foreground(r.xtask_pid) {
            did_something = true;
        }
        if r.agent.is_alive() || r.agent.pin_dir.exists() || r.agent.state_dir.exists() {
            let step = Step::start(format!("stopping agent (pid {}) and detaching", r.agent.pid));
            r.agent.teardown()?;
            step.ok();
            did_something = true;
        }
        if let Some(c) = &r.controller {
            if c.is_alive() || c.data_dir.exists() {
                let step = Step::start(format!("stopping the controller (pid {})", c.pid));
                c.teardown()?;
                step.ok();
                did_something = true;
            }
        }
    }
    let pins = Path::new(BPFFS).join(format!("airlock-{prefix}"));
    if pins.exists() {
        let step = Step::start(format!("removing leftover pins {}", pins.display()));
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        step.ok();
        did_something = true;
    }
    if !names::lab_namespaces(prefix).is_empty() {
        let step = Step::start(format!("deleting namespaces {prefix}-*"));
        let gone = Topology::destroy_by_prefix(prefix)?;
        step.ok_with(gone.join(" "));
        did_something = true;
    }
    let dir = state_dir(prefix);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        did_something = true;
    }
    if did_something {
        println!("lab '{prefix}' is down");
    } else {
        println!("no lab '{prefix}': nothing to do");
    }
    Ok(())
}

/// Asks a foreground `lab up` to tear its lab down itself (SIGINT) and
/// waits for it. False if there is no such process.
fn stop_foreground(pid: u32) -> bool {
    let is_xtask = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).next().is_some_and(|a| a.ends_with(b"xtask")));
    let Ok(raw) = libc::pid_t::try_from(pid) else { return false };
    if !is_xtask {
        return false;
    }
    let step = Step::start(format!("asking the foreground lab (xtask pid {pid}) to stop"));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(raw, libc::SIGINT) };
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    step.ok();
    true
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag that the foreground loop checks.
fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an
        // atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

fn bail_if_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
