//! [`Controller`]: the real `airlock-controller serve` in the lab's
//! controller namespace, with the embedded defaults (built-in KMS, its own
//! CA, a one-time bootstrap credential on the first start).
//!
//! Like the agent it runs in the namespace's network but the host's mount
//! namespace (`nsenter --net=`), in its own session. Its standard output goes
//! to a 0600 file (`controller.out`) because the first start prints the
//! bootstrap admin password there; the harness reads it once, keeps it in
//! memory for its own logins and never prints it. Logs (stderr, `tracing`,
//! free of secrets by the controller's design) go to `controller.log`.

use std::{
    fs,
    io::{Read as _, Seek as _},
    net::SocketAddr,
    os::unix::{
        fs::{DirBuilderExt as _, OpenOptionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    agent::{process_alive, send_signal, wait_gone, Signal},
    cmd,
    controller_api::{ControllerApi, Secret},
    host::controller_bin,
    status::ControllerStatus,
    topology::addr,
    Error, Result,
};

/// Default wait for "serving" (the first start generates the CA and hashes
/// the bootstrap password).
pub const CONTROLLER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The bootstrap admin user the controller creates on its first start.
pub const ADMIN_USER: &str = "admin";

/// How to start a controller.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Network namespace name to run in (the lab's `<p>-ctl`).
    pub netns: String,
    /// Its data directory (store, key file, `ca.pem`) and the harness's files
    /// (config, ready file, output, log); created 0700, removed on drop.
    pub data_dir: PathBuf,
    /// The binary ([`controller_bin`] when `None`).
    pub bin: Option<PathBuf>,
    /// The main listener (API, UI, enrollment).
    pub listen: SocketAddr,
    /// The agent (mTLS) listener.
    pub agent_listen: SocketAddr,
    /// The URL agents enroll at and admins use.
    pub public_url: String,
    /// The URL agents stream from.
    pub agent_url: String,
    /// Extra names for the server certificate (`--server-name`).
    pub server_names: Vec<String>,
    /// Where the harness connects to the main listener, inside `netns`.
    pub api_addr: SocketAddr,
    /// How long to wait for "serving".
    pub ready_timeout: Duration,
    /// Kill the controller with the thread that started it (off for
    /// `lab up --detach`).
    pub die_with_parent: bool,
    /// The image update public key file (`update_key`), for tests that
    /// upload update bundles.
    pub update_key: Option<PathBuf>,
}

impl ControllerOptions {
    /// The lab's controller: on 10.90.0.100 (main 8443, agents 8444). With
    /// `host_link` the main listener also answers on the host link
    /// (10.91.0.2), whose address the certificate then carries too.
    pub fn for_lab(
        netns: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        host_link: bool,
    ) -> Self {
        let main = SocketAddr::from((addr::CONTROLLER_V4, addr::CONTROLLER_PORT));
        let agent = SocketAddr::from((addr::CONTROLLER_V4, addr::CONTROLLER_AGENT_PORT));
        let (listen, server_names) = if host_link {
            // The namespace has only these two links: all addresses are both.
            (
                SocketAddr::from(([0, 0, 0, 0], addr::CONTROLLER_PORT)),
                vec![addr::CONTROLLER_V4.to_string(), addr::HOST_LINK_CONTROLLER_V4.to_string()],
            )
        } else {
            (main, vec![addr::CONTROLLER_V4.to_string()])
        };
        ControllerOptions {
            netns: netns.into(),
            data_dir: data_dir.into(),
            bin: None,
            listen,
            agent_listen: agent,
            public_url: format!("https://{main}"),
            agent_url: format!("https://{agent}"),
            server_names,
            api_addr: main,
            ready_timeout: CONTROLLER_READY_TIMEOUT,
            die_with_parent: true,
            // Releases can be uploaded in the lab once `cargo xtask image` has
            // made its signing key.
            update_key: Some(crate::host::target_dir().join("image/image-signing.pub"))
                .filter(|k| k.is_file()),
        }
    }
}

/// Everything needed to find, query and tear down a controller, also from
/// another process (saved by `lab up --detach`, used by `lab status` and
/// `lab down`). Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRecord {
    /// Process id (of the controller itself: nsenter execs it).
    pub pid: u32,
    /// The binary.
    pub bin: PathBuf,
    /// Network namespace name.
    pub netns: String,
    /// Data directory (also holds the files below).
    pub data_dir: PathBuf,
    /// Configuration file.
    pub config: PathBuf,
    /// Standard output (0600: the first start's bootstrap credential).
    pub stdout: PathBuf,
    /// Log (standard error).
    pub log: PathBuf,
    /// Ready file.
    pub ready_file: PathBuf,
    /// The CA certificate (`<data_dir>/ca.pem`, public).
    pub ca_pem: PathBuf,
    /// The main URL.
    pub url: String,
    /// The agent URL.
    pub agent_url: String,
    /// The CA fingerprint agents pin.
    pub ca_fingerprint: String,
    /// Where the main listener answers inside `netns`.
    pub api_addr: SocketAddr,
}

/// A running `airlock-controller serve`. Dropping it kills the process and
/// removes its data directory; when the thread is panicking, the log tail is
/// printed first (never the output file, which may hold the credential).
#[derive(Debug)]
pub struct Controller {
    record: ControllerRecord,
    listen: SocketAddr,
    agent_listen: SocketAddr,
    server_names: Vec<String>,
    child: Option<Child>,
    /// The admin password printed at the first start.
    bootstrap: Option<Secret>,
    ready_timeout: Duration,
    die_with_parent: bool,
    detached: bool,
}

impl Controller {
    /// Writes the config, starts the controller and waits until it serves.
    /// Fails if the data directory holds a controller already whose admin
    /// password the harness cannot know (it starts fresh controllers only).
    pub fn start(opts: ControllerOptions) -> Result<Controller> {
        let bin = match opts.bin {
            Some(b) if b.is_file() => b,
            Some(path) => return Err(Error::ControllerBinaryMissing { path }),
            None => controller_bin()?,
        };
        let dir = opts.data_dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io("creating", &dir, e))?;
        let config = dir.join("controller.toml");
        let mut text = format!(
            "# Written by airlock-testbed.\npublic_url = {}\nagent_url = {}\n",
            toml_str(&opts.public_url),
            toml_str(&opts.agent_url)
        );
        if let Some(key) = &opts.update_key {
            text.push_str(&format!("update_key = {}\n", toml_str(&key.display().to_string())));
        }
        fs::write(&config, text).map_err(|e| Error::io("writing", &config, e))?;
        let mut ctl = Controller {
            record: ControllerRecord {
                pid: 0,
                bin,
                netns: opts.netns,
                config,
                stdout: dir.join("controller.out"),
                log: dir.join("controller.log"),
                ready_file: dir.join("ready"),
                ca_pem: dir.join("ca.pem"),
                data_dir: dir,
                url: opts.public_url,
                agent_url: opts.agent_url,
                ca_fingerprint: String::new(),
                api_addr: opts.api_addr,
            },
            listen: opts.listen,
            agent_listen: opts.agent_listen,
            server_names: opts.server_names,
            child: None,
            bootstrap: None,
            ready_timeout: opts.ready_timeout,
            die_with_parent: opts.die_with_parent,
            detached: false,
        };
        // From here on, Drop cleans up whatever happens.
        ctl.spawn()?;
        if ctl.bootstrap.is_none() {
            return Err(Error::ControllerOutput(
                "no bootstrap credential: the data directory held a controller already".into(),
            ));
        }
        Ok(ctl)
    }

    fn spawn(&mut self) -> Result<()> {
        let r = &self.record;
        match fs::remove_file(&r.ready_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("removing", &r.ready_file, e));
            }
            _ => {}
        }
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&r.stdout)
            .map_err(|e| Error::io("opening", &r.stdout, e))?;
        let out_start = out.metadata().map_err(|e| Error::io("reading", &r.stdout, e))?.len();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&r.log)
            .map_err(|e| Error::io("opening", &r.log, e))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}/{}", crate::names::NETNS_DIR, r.netns))
            .arg(&r.bin)
            .arg("--config")
            .arg(&r.config)
            .arg("--data-dir")
            .arg(&r.data_dir)
            .arg("serve")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--agent-listen")
            .arg(self.agent_listen.to_string())
            .arg("--ready-file")
            .arg(&r.ready_file);
        for name in &self.server_names {
            cmd.arg("--server-name").arg(name);
        }
        // Plain text in the log file (tracing colours it otherwise).
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        cmd.stdin(Stdio::null()).stdout(out).stderr(log);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid and prctl, which are async-signal-safe (see Agent).
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
        let ready = self.wait_ready()?;
        let fingerprint = ready_value(&ready, "fingerprint")?;
        if !self.record.ca_fingerprint.is_empty() && self.record.ca_fingerprint != fingerprint {
            return Err(Error::ControllerOutput(format!(
                "the CA changed across a restart ({} -> {fingerprint})",
                self.record.ca_fingerprint
            )));
        }
        self.record.ca_fingerprint = fingerprint;
        if let Some(p) = bootstrap_password(&read_from(&self.record.stdout, out_start)?) {
            self.bootstrap = Some(p);
        }
        Ok(())
    }

    /// Waits for the ready file; its text.
    fn wait_ready(&mut self) -> Result<String> {
        let start = Instant::now();
        loop {
            let ready = fs::read_to_string(&self.record.ready_file).unwrap_or_default();
            if ready.starts_with("serving\n") && ready.contains("fingerprint=") {
                return Ok(ready);
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::ControllerExited { status, log_tail: self.log_tail(40) });
                }
            }
            if start.elapsed() > self.ready_timeout {
                return Err(Error::ControllerNotReady {
                    waited: self.ready_timeout,
                    log_tail: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new API client logged in as the bootstrap admin.
    pub fn client(&self) -> Result<ControllerApi> {
        let password = self.bootstrap.as_ref().ok_or(Error::ControllerNotRunning)?;
        let mut api = self.record.client()?;
        api.login(ADMIN_USER, password)?;
        Ok(api)
    }

    /// The bootstrap admin password of the first start (secret: for the
    /// operator's terminal only, never for logs).
    pub fn bootstrap_password(&self) -> Option<&Secret> {
        self.bootstrap.as_ref()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Paths, URLs and pid.
    pub fn record(&self) -> &ControllerRecord {
        &self.record
    }

    /// Whether the process still runs (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` to the controller.
    pub fn kill(&mut self, signal: Signal) -> Result<()> {
        if !self.is_running() {
            return Err(Error::ControllerNotRunning);
        }
        send_signal(self.record.pid, signal)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.record.pid;
        let child = self.child.as_mut().ok_or(Error::ControllerNotRunning)?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(status);
                }
                Ok(None) if start.elapsed() > timeout => {
                    return Err(Error::ControllerStuck { pid, waited: timeout });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(source) => return Err(Error::Process { action: "waiting for", pid, source }),
            }
        }
    }

    /// SIGTERM (the controller flushes its store), then waits (SIGKILL after 10 s).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.kill(Signal::Term)?;
        match self.wait(STOP_GRACE) {
            Err(Error::ControllerStuck { .. }) => {
                send_signal(self.record.pid, Signal::Kill)?;
                self.wait(STOP_GRACE)
            }
            other => other,
        }
    }

    /// Stops the controller if it runs and starts it again on the same data
    /// directory (same CA, keys, users, policies and appliances; sessions are
    /// gone: log in again).
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        self.spawn()
    }

    /// The whole log (standard error).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.record.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        self.record.log_tail(n)
    }

    /// Leaves the controller running after this value is dropped; returns
    /// what [`ControllerRecord::teardown`] needs later.
    pub fn into_detached(mut self) -> ControllerRecord {
        self.detached = true;
        self.child = None;
        self.record.clone()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- airlock-controller log ({}), last lines ---\n{}",
                self.record.log.display(),
                self.log_tail(40)
            );
        }
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                if let Err(e) = child.kill() {
                    eprintln!("airlock-testbed: cannot kill controller {}: {e}", self.record.pid);
                }
            }
            let _ = child.wait();
        }
        self.record.remove_data();
    }
}

impl ControllerRecord {
    /// A client for the main listener (not logged in: the harness keeps no
    /// password on disk).
    pub fn client(&self) -> Result<ControllerApi> {
        let ca =
            fs::read_to_string(&self.ca_pem).map_err(|e| Error::io("reading", &self.ca_pem, e))?;
        ControllerApi::new(&self.netns, self.api_addr, &ca, &self.ca_fingerprint)
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process runs and is this controller (its command line
    /// names our data directory, so a reused pid does not count).
    pub fn is_alive(&self) -> bool {
        process_alive(self.pid)
            && fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|c| {
                let dir = self.data_dir.to_string_lossy();
                c.split(|&b| b == 0).any(|arg| arg == dir.as_bytes())
            })
    }

    /// The status section of [`crate::LabStatus`].
    pub fn status(&self) -> ControllerStatus {
        ControllerStatus {
            namespace: self.netns.clone(),
            url: self.url.clone(),
            agent_url: self.agent_url.clone(),
            ca_fingerprint: self.ca_fingerprint.clone(),
            pid: self.pid,
            alive: self.is_alive(),
            data_dir: self.data_dir.clone(),
            log: self.log.clone(),
        }
    }

    /// Stops a (possibly detached) controller: SIGTERM, then SIGKILL after
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
            Err(Error::ControllerStuck { pid: self.pid, waited: grace * 2 })
        }
    }

    /// Stops the controller and removes its data directory. Idempotent.
    pub fn teardown(&self) -> Result<()> {
        self.terminate(STOP_GRACE)?;
        self.remove_data();
        Ok(())
    }

    fn remove_data(&self) {
        if let Err(e) = fs::remove_dir_all(&self.data_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("airlock-testbed: removing {}: {e}", self.data_dir.display());
            }
        }
    }
}

/// `key=value` from the ready file.
fn ready_value(ready: &str, key: &str) -> Result<String> {
    ready
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .ok_or_else(|| Error::ControllerOutput(format!("the ready file has no {key}")))
}

/// The file's text from byte `offset` on.
fn read_from(path: &Path, offset: u64) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(|e| Error::io("reading", path, e))?;
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(|e| Error::io("reading", path, e))?;
    Ok(s)
}

/// The password in the first start's "bootstrap admin credential" line.
fn bootstrap_password(stdout: &str) -> Option<Secret> {
    stdout
        .lines()
        .filter(|l| l.contains("bootstrap admin credential"))
        .find_map(|l| l.rsplit_once(", password ").map(|(_, p)| p.trim()))
        .filter(|p| !p.is_empty() && !p.contains(char::is_whitespace))
        .map(Secret::new)
}

/// A TOML basic string (a JSON string literal is one).
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_line_is_parsed() {
        let out = "Airlock controller at https://10.90.0.100:8443\n\
                   CA fingerprint (pin it on appliances): sha256:ab\n\
                   First start: bootstrap admin credential (shown once, change it): \
                   user admin, password Zx9_-abc\n";
        assert_eq!(bootstrap_password(out).map(|s| s.expose().to_owned()), Some("Zx9_-abc".into()));
        assert!(bootstrap_password("Airlock controller at https://x\n").is_none());
    }

    #[test]
    fn ready_file_values() {
        let r = "serving\nurl=https://a:1\nagent_url=https://a:2\nfingerprint=sha256:00\n";
        assert_eq!(ready_value(r, "url").unwrap(), "https://a:1");
        assert_eq!(ready_value(r, "agent_url").unwrap(), "https://a:2");
        assert_eq!(ready_value(r, "fingerprint").unwrap(), "sha256:00");
        assert!(ready_value(r, "nope").is_err());
    }

    #[test]
    fn lab_options_cover_the_host_link() {
        let o = ControllerOptions::for_lab("al-ctl", "/tmp/x", false);
        assert_eq!(o.listen.to_string(), "10.90.0.100:8443");
        assert_eq!(o.public_url, "https://10.90.0.100:8443");
        assert_eq!(o.agent_url, "https://10.90.0.100:8444");
        let o = ControllerOptions::for_lab("al-ctl", "/tmp/x", true);
        assert_eq!(o.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(o.server_names, ["10.90.0.100", "10.91.0.2"]);
        assert_eq!(o.api_addr.to_string(), "10.90.0.100:8443");
    }
}
