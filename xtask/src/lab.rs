//! `cargo xtask lab up|status|down`.
//!
//! State lives in `/run/airlock-lab/<prefix>/`: `lab.json` (what teardown
//! needs: the agent's pid, config and pins, and who runs the lab),
//! `status.json` (the [`LabStatus`] at start) and `agent/` (the agent's
//! config, ready file and log).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use airlock_testbed::{
    names, AgentRecord, Lab, LabOptions, LabStatus, Topology, BPFFS, HOST_IF, PATIENT_PORT,
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
}

/// The status of lab `prefix` when it runs completely (all namespaces, the
/// agent alive), so that `lab up` can say so instead of failing.
fn healthy_lab(prefix: &str) -> Option<LabStatus> {
    let record = read_record(prefix).ok()??;
    let status = LabStatus::probe(prefix, Some(&record.agent));
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

pub fn up(prefix: &str, detach: bool, policy: Option<&Path>) -> Result<()> {
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
    let bin = build_agent()?;
    bail_if_interrupted()?;
    let dir = state_dir(prefix);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = start(prefix, &bin, &dir, detach, policy);
    if result.is_err() || !detach {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: removing {}: {e}", dir.display());
        }
    }
    result
}

fn build_agent() -> Result<PathBuf> {
    let step = Step::start("building the agent (cargo build -p airlock-agent)");
    step::run(step::cargo().args(["build", "-p", "airlock-agent"]))?;
    step.ok();
    Ok(airlock_testbed::target_dir().join("debug").join("airlock-agent"))
}

fn start(prefix: &str, bin: &Path, dir: &Path, detach: bool, policy: Option<&Path>) -> Result<()> {
    let step = Step::start(format!("building lab '{prefix}' and starting the agent"));
    let lab = Lab::start_with(LabOptions {
        state_dir: Some(dir.join("agent")),
        agent_bin: Some(bin.to_owned()),
        die_with_parent: !detach,
        ..LabOptions::new(prefix)
    })?;
    let record = LabRecord {
        prefix: prefix.to_owned(),
        xtask_pid: std::process::id(),
        detached: detach,
        agent: lab.agent().record().clone(),
    };
    write_json(&dir.join("lab.json"), &record)?;
    let status = lab.status();
    write_json(&dir.join("status.json"), &status)?;
    step.ok_with("enforcing");
    if let Some(p) = policy {
        let step = Step::start(format!("applying {} to both layers", p.display()));
        let out =
            lab.agent().apply_policy(p).with_context(|| format!("applying {}", p.display()))?;
        step.ok_with(out.trim());
    }
    print_summary(&status, &record.agent, detach, policy);
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
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!();
            return Ok(());
        }
        if !record.is_alive() {
            bail!("the agent exited; log tail:\n{}", record.log_tail(20));
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

fn print_summary(status: &LabStatus, agent: &AgentRecord, detach: bool, policy: Option<&Path>) {
    let nsenter = format!(
        "nsenter --net=/run/netns/{} {} --config {}",
        agent.netns,
        agent.bin.display(),
        agent.config.display()
    );
    println!();
    match policy {
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
    println!("  appliance ports: {PATIENT_PORT} (patient side), uplink0 (uplink side)");
    println!(
        "  agent: pid {}, log {}, pins {}",
        agent.pid,
        agent.log.display(),
        agent.pin_dir.display()
    );
    println!();
    println!("  run on a host:  ip netns exec {}-p1 ping -c1 10.78.0.100", status.lab);
    match policy {
        Some(p) => {
            println!(
                "  try the flow:   ip netns exec {0}-ext python3 -m http.server 443 --bind 10.78.0.100 &\n                  \
                 ip netns exec {0}-p1 curl http://10.78.0.100:443/   (p1 passes; {0}-p2 does not)",
                status.lab
            );
            println!("  change policy:  {nsenter} policy diff {0} NEW.toml, then: policy apply NEW.toml --appliance lab-appliance", p.display());
        }
        None => println!(
            "  allow a flow:   {nsenter} flow add --src 10.77.0.11 --dst 10.78.0.100 \
             --proto tcp --dport 443 --rule-id 1 --ttl 5m"
        ),
    }
    println!("  counters:       {nsenter} stats");
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
    let status = LabStatus::probe(prefix, record.as_ref().map(|r| &r.agent));
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
