//! [`Agent`]: runs `airlock-agent` in the appliance namespace and drives its
//! command line (contract: docs/agent-cli.md).
//!
//! The agent runs in the appliance's network namespace but the host's mount
//! namespace (`nsenter --net=`), so its bpffs pins are the host's.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    agent_formats::{AgentConfig, AgentStats},
    cmd,
    host::{agent_bin, ensure_bpffs, BPFFS},
    status::AgentStatus,
    Error, Result,
};

/// Default wait for "enforcing".
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A signal for [`Agent::kill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: orderly exit (the boundary stays attached).
    Term,
    /// SIGINT: as SIGTERM.
    Int,
    /// SIGKILL: a crash.
    Kill,
    /// SIGSTOP: a hung agent.
    Stop,
    /// SIGCONT: resume after SIGSTOP.
    Cont,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Network namespace name to run in (the appliance's).
    pub netns: String,
    /// Directory for the config, ready file and log; created, and removed
    /// when the [`Agent`] is dropped.
    pub state_dir: PathBuf,
    /// The configuration to write.
    pub config: AgentConfig,
    /// The binary ([`agent_bin`] when `None`).
    pub bin: Option<PathBuf>,
    /// How long to wait for "enforcing".
    pub ready_timeout: Duration,
    /// Kill the agent when the thread that started it dies (tests: an
    /// interrupted `cargo test` leaves no agent behind). Off for `lab up
    /// --detach`, whose agent must outlive xtask.
    pub die_with_parent: bool,
}

impl AgentOptions {
    /// Options with the lab configuration for `prefix` and default timeout.
    pub fn new(netns: impl Into<String>, state_dir: impl Into<PathBuf>, prefix: &str) -> Self {
        AgentOptions {
            netns: netns.into(),
            state_dir: state_dir.into(),
            config: AgentConfig::for_lab(prefix),
            bin: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            die_with_parent: true,
        }
    }
}

/// Everything needed to find, query and tear down an agent, also from
/// another process (saved by `lab up --detach`, used by `lab down`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Process id (of the agent itself: nsenter execs it).
    pub pid: u32,
    /// The agent binary.
    pub bin: PathBuf,
    /// Network namespace name.
    pub netns: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Configuration file.
    pub config: PathBuf,
    /// Log file (stdout and stderr).
    pub log: PathBuf,
    /// Ready file.
    pub ready_file: PathBuf,
    /// Pin directory.
    pub pin_dir: PathBuf,
}

/// The appliance name of the lab's policies (policies/lab.toml).
pub const LAB_APPLIANCE: &str = "lab-appliance";

/// Where the agent pins its XDP links, relative to its pin directory
/// (`v<LAYOUT_VERSION>/links`; the agent's contract test checks it).
pub const LINK_PINS: &str = "v1/links";

/// A running `airlock-agent run`. Dropping it kills the process, runs
/// `airlock-agent detach` (failures are logged to stderr) and removes the
/// state directory; when the thread is panicking, the log tail is printed
/// first.
#[derive(Debug)]
pub struct Agent {
    record: AgentRecord,
    child: Option<Child>,
    ready_timeout: Duration,
    detached: bool,
    die_with_parent: bool,
}

impl Agent {
    /// Writes the config, starts the agent and waits until it is enforcing.
    pub fn start(opts: AgentOptions) -> Result<Agent> {
        ensure_bpffs()?;
        let bin = match opts.bin {
            Some(b) if b.is_file() => b,
            Some(path) => return Err(Error::AgentBinaryMissing { path }),
            None => agent_bin()?,
        };
        let dir = opts.state_dir;
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let config = dir.join("agent.toml");
        let mut agent_config = opts.config;
        if agent_config.state_dir.is_none() {
            agent_config.state_dir = Some(dir.join("store"));
        }
        fs::write(&config, agent_config.render()).map_err(|e| Error::io("writing", &config, e))?;
        let mut agent = Agent {
            record: AgentRecord {
                pid: 0,
                bin,
                netns: opts.netns,
                log: dir.join("agent.log"),
                ready_file: dir.join("ready"),
                state_dir: dir,
                config,
                pin_dir: agent_config.pin_dir,
            },
            child: None,
            ready_timeout: opts.ready_timeout,
            detached: false,
            die_with_parent: opts.die_with_parent,
        };
        // From here on, Drop cleans up whatever happens.
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let r = &self.record;
        match fs::remove_file(&r.ready_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("removing", &r.ready_file, e));
            }
            _ => {}
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .map_err(|e| Error::io("opening", &r.log, e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("opening", &r.log, e))?;
        let mut cmd = r.nsenter();
        cmd.arg("run")
            .arg("--ready-file")
            .arg(&r.ready_file)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid and prctl, which are async-signal-safe. Its own session
        // keeps the agent out of the terminal's Ctrl-C; PDEATHSIG (kept across
        // nsenter's exec) kills it with the thread that started it unless it
        // must outlive us.
        let die_with_parent = self.die_with_parent;
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            cmd.spawn().map_err(|source| Error::Spawn { cmd: cmd::describe(&cmd), source })?;
        self.record.pid = child.id();
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            let ready = fs::read_to_string(&self.record.ready_file).unwrap_or_default();
            if ready.trim() == "enforcing" {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::AgentExited { status, log_tail: self.log_tail(40) });
                }
            }
            if start.elapsed() > self.ready_timeout {
                return Err(Error::AgentNotReady {
                    waited: self.ready_timeout,
                    log_tail: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Paths and pid (what `lab up --detach` saves).
    pub fn record(&self) -> &AgentRecord {
        &self.record
    }

    /// Whether the process still runs (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` to the agent.
    pub fn kill(&mut self, signal: Signal) -> Result<()> {
        if !self.is_running() {
            return Err(Error::AgentNotRunning);
        }
        send_signal(self.record.pid, signal)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.record.pid;
        let child = self.child.as_mut().ok_or(Error::AgentNotRunning)?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(status);
                }
                Ok(None) if start.elapsed() > timeout => {
                    return Err(Error::AgentStuck { pid, waited: timeout });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(source) => return Err(Error::Process { action: "waiting for", pid, source }),
            }
        }
    }

    /// SIGTERM, then waits (SIGKILL after 10 s). The boundary stays pinned.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.kill(Signal::Term)?;
        match self.wait(STOP_GRACE) {
            Err(Error::AgentStuck { .. }) => {
                send_signal(self.record.pid, Signal::Kill)?;
                self.wait(STOP_GRACE)
            }
            other => other,
        }
    }

    /// Stops the agent if it runs, starts it again with the same
    /// configuration and waits until it is enforcing.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        self.spawn()
    }

    /// `airlock-agent policy apply FILE` for the lab's appliance
    /// ([`LAB_APPLIANCE`], the name the lab policies use); its stdout.
    pub fn apply_policy(&self, file: &std::path::Path) -> Result<String> {
        self.cli(&["policy", "apply", &file.to_string_lossy(), "--appliance", LAB_APPLIANCE])
    }

    /// Removes the pinned XDP links, which detaches the programs from the
    /// ports while forwarding stays on (tests of the nftables layer alone).
    /// Stop the agent first: it holds the links open. Returns how many.
    pub fn unpin_links(&self) -> Result<usize> {
        let dir = self.record.pin_dir.join(LINK_PINS);
        let mut n = 0;
        for e in fs::read_dir(&dir).map_err(|e| Error::io("reading", &dir, e))?.flatten() {
            fs::remove_file(e.path()).map_err(|err| Error::io("removing", e.path(), err))?;
            n += 1;
        }
        Ok(n)
    }

    /// Runs `airlock-agent --config CFG ARGS...` in the appliance namespace
    /// (`["flow", "add", ...]`, `["stats", "--json"]`); its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        self.record.cli(args)
    }

    /// `stats --json`, parsed.
    pub fn stats(&self) -> Result<AgentStats> {
        self.record.stats()
    }

    /// The whole log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.record.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        self.record.log_tail(n)
    }

    /// Leaves the agent running (and pinned) after this value is dropped;
    /// returns what [`AgentRecord::teardown`] needs later.
    pub fn into_detached(mut self) -> AgentRecord {
        self.detached = true;
        self.child = None;
        self.record.clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- airlock-agent log ({}), last lines ---\n{}",
                self.record.log.display(),
                self.log_tail(60)
            );
        }
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                if let Err(e) = child.kill() {
                    eprintln!("airlock-testbed: cannot kill agent {}: {e}", self.record.pid);
                }
            }
            let _ = child.wait();
        }
        self.record.detach_and_clean();
    }
}

impl AgentRecord {
    /// `nsenter --net=/run/netns/NS BIN --config CFG`.
    fn nsenter(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}/{}", crate::names::NETNS_DIR, self.netns))
            .arg(&self.bin)
            .arg("--config")
            .arg(&self.config);
        cmd
    }

    /// Runs `airlock-agent --config CFG ARGS...` in the namespace; its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        cmd::output(self.nsenter().args(args))
    }

    /// `stats --json`, parsed.
    pub fn stats(&self) -> Result<AgentStats> {
        AgentStats::parse(&self.cli(&["stats", "--json"])?)
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process runs and is this agent (its command line names
    /// our config file, so a reused pid does not count).
    pub fn is_alive(&self) -> bool {
        process_alive(self.pid)
            && fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|c| {
                let config = self.config.to_string_lossy();
                c.split(|&b| b == 0).any(|arg| arg == config.as_bytes())
            })
    }

    /// The status section of [`crate::LabStatus`].
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            pid: self.pid,
            alive: self.is_alive(),
            namespace: self.netns.clone(),
            config: self.config.clone(),
            log: self.log.clone(),
            pin_dir: self.pin_dir.clone(),
            bpffs: PathBuf::from(BPFFS),
            pinned: self.pin_dir.exists(),
        }
    }

    /// Stops a (possibly detached) agent: SIGTERM, then SIGKILL after
    /// `grace`; waits until it is gone.
    pub fn terminate(&self, grace: Duration) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        send_signal(self.pid, Signal::Term)?;
        if wait_gone(self.pid, grace) {
            return Ok(());
        }
        send_signal(self.pid, Signal::Kill)?;
        if wait_gone(self.pid, grace) {
            Ok(())
        } else {
            Err(Error::AgentStuck { pid: self.pid, waited: grace * 2 })
        }
    }

    /// Stops the agent, runs `detach`, removes leftover pins and the state
    /// directory. Idempotent; failures of the cleanup steps are logged.
    pub fn teardown(&self) -> Result<()> {
        self.terminate(STOP_GRACE)?;
        self.detach_and_clean();
        Ok(())
    }

    /// `detach` (logged if it fails), then removes what is left.
    fn detach_and_clean(&self) {
        if self.config.is_file() {
            if let Err(e) = self.cli(&["detach"]) {
                eprintln!("airlock-testbed: airlock-agent detach: {e}");
            }
        }
        if self.pin_dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.pin_dir) {
                eprintln!("airlock-testbed: removing pins {}: {e}", self.pin_dir.display());
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.state_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("airlock-testbed: removing {}: {e}", self.state_dir.display());
            }
        }
    }
}

pub(crate) fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| Error::Process {
        action: "signalling",
        pid,
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(raw_pid, signal.raw()) } != 0 {
        return Err(Error::Process {
            action: "signalling",
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

pub(crate) fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !process_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !process_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_liveness() {
        let me = AgentRecord {
            pid: std::process::id(),
            bin: "/bin/false".into(),
            netns: "x".into(),
            state_dir: "/nonexistent".into(),
            config: "/nonexistent/agent.toml".into(),
            log: "/nonexistent/agent.log".into(),
            ready_file: "/nonexistent/ready".into(),
            pin_dir: "/nonexistent/pins".into(),
        };
        assert!(process_alive(me.pid));
        // Alive, but not an agent with this config.
        assert!(!me.is_alive());
        assert!(!me.status().alive);
        assert!(!process_alive(u32::MAX / 2));
    }
}
