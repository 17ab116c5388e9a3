//! Running helper programs (`ip`, `nsenter`, the agent) with errors that say
//! what ran and what it printed on stderr.

use std::process::{Command, Stdio};

use crate::{Error, Result};

/// The command line, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; its stdout on success.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn { cmd: describe(cmd), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS...` in the root namespace.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    output(Command::new("ip").args(args))
}

/// `ip -n NS ARGS...`: `ip` enters the namespace itself (no remount of /sys).
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    output(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Sets sysctls in a namespace: one `ip netns exec NS sysctl -q -w K=V ...`.
pub(crate) fn sysctl_in(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "sysctl", "-q", "-w"]);
    for (k, v) in settings {
        cmd.arg(format!("{k}={v}"));
    }
    output(&mut cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_its_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("sh -c echo oops >&2; exit 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
        assert!(msg.contains('3'), "{msg}");
    }

    #[test]
    fn success_returns_stdout() {
        let out = output(Command::new("sh").args(["-c", "echo hi"])).expect("runs");
        assert_eq!(out, "hi\n");
    }
}
