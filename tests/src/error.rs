//! The testbed's one error type.

use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

/// Everything that can go wrong while building a lab or driving the agent.
///
/// Command failures carry the command line and its stderr (the useful part of
/// a failed `ip` or agent call); agent start-up failures carry the tail of the
/// agent's log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A lab prefix that cannot name namespaces and interfaces.
    #[error("invalid lab prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A namespace with this name exists already.
    #[error("network namespace {0} exists already (leftover lab? try `cargo xtask lab down`)")]
    NamespaceExists(String),
    /// The appliance namespace forwards although it was just switched off.
    #[error("{ns}: {key} is {value} after switching it off (the lab must fail closed)")]
    ForwardingOn {
        /// The namespace.
        ns: String,
        /// The sysctl.
        key: &'static str,
        /// What it reads.
        value: String,
    },
    /// A program could not be started at all.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A program ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// How it ended.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A file or directory operation failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done ("writing", "creating", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Entering a network namespace failed.
    #[error("cannot enter network namespace {}", path.display())]
    Setns {
        /// /run/netns/NAME.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A system call on a process failed (signal, wait).
    #[error("{action} process {pid}")]
    Process {
        /// What was being done.
        action: &'static str,
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// JSON that could not be produced or parsed.
    #[error("{what}: bad JSON")]
    Json {
        /// Whose JSON.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The agent binary is not where it was looked for.
    #[error(
        "agent binary {} not found: build it with `cargo build -p airlock-agent` \
         or set AIRLOCK_AGENT_BIN",
        path.display()
    )]
    AgentBinaryMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The agent exited before it reported "enforcing".
    #[error("agent exited before enforcing ({status}); log tail:\n{log_tail}")]
    AgentExited {
        /// How it ended.
        status: ExitStatus,
        /// The last lines of its log.
        log_tail: String,
    },
    /// The agent did not report "enforcing" in time.
    #[error("agent not enforcing after {waited:?}; log tail:\n{log_tail}")]
    AgentNotReady {
        /// How long we waited.
        waited: Duration,
        /// The last lines of its log.
        log_tail: String,
    },
    /// The agent did not exit in time after a signal.
    #[error("agent (pid {pid}) still running {waited:?} after the signal")]
    AgentStuck {
        /// The process.
        pid: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// An operation that needs a running agent process found none.
    #[error("the agent is not running")]
    AgentNotRunning,
    /// A thread running in a namespace could not be started.
    #[error("cannot start a thread for namespace {ns}")]
    Thread {
        /// The namespace.
        ns: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The testbed's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }
}
