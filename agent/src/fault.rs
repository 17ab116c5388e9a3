//! Fault injection for crash tests: when the environment variable
//! `AIRLOCK_FAULT` names a point the agent passes, the agent kills itself
//! there with SIGKILL (no cleanup, exactly like a crash). Unset in
//! production; the end-to-end tests set it to prove that a crash at that point
//! converges on restart.

/// The variable naming the fault point.
pub const VAR: &str = "AIRLOCK_FAULT";

/// Crashes here if `AIRLOCK_FAULT` equals `name`.
pub fn point(name: &str) {
    if std::env::var(VAR).is_ok_and(|v| v == name) {
        tracing::warn!(point = name, "fault injection: SIGKILL");
        // SAFETY: signalling our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
