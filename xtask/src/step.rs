//! Progress lines and running programs.

use std::{
    fmt::Display,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// One step: prints `==> title` when it starts and how it ended.
#[derive(Debug)]
pub struct Step {
    start: Instant,
}

impl Step {
    pub fn start(title: impl Display) -> Step {
        println!("==> {title}");
        Step { start: Instant::now() }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// `    ok (1.2s)`.
    pub fn ok(self) -> Duration {
        let d = self.elapsed();
        println!("    ok ({})", secs(d));
        d
    }

    /// `    ok, <note> (0.0s)`.
    pub fn ok_with(self, note: impl Display) -> Duration {
        let d = self.elapsed();
        println!("    ok, {note} ({})", secs(d));
        d
    }

    /// `    FAILED (1.2s)`.
    pub fn failed(self) -> Duration {
        let d = self.elapsed();
        println!("    FAILED ({})", secs(d));
        d
    }
}

/// `1.2s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited output; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let status = cmd.status().with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly; its stdout, or an error with its stderr.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` (the rustup proxy, so `+nightly` works) in the workspace root.
///
/// Without incremental compilation: xtask builds are whole runs (CI, the lab),
/// where the incremental cache only costs disk (2.4 GiB on a fresh clone's
/// test run). Edit-compile loops with plain `cargo` keep it.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(airlock_testbed::workspace_root()).env("CARGO_INCREMENTAL", "0");
    cmd
}

/// `$HOME/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"))
}

/// Puts `~/.cargo/bin` on PATH for every program we start (rustup, cargo,
/// bpf-linker, which aya-build's nested cargo needs to find).
pub fn ensure_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // Single-threaded here: main calls this before anything else runs.
        std::env::set_var("PATH", joined);
    }
}
