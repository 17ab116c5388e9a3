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
    /// The controller binary is not where it was looked for.
    #[error(
        "controller binary {} not found: build it with `cargo build -p airlock-controller` \
         or set AIRLOCK_CONTROLLER_BIN",
        path.display()
    )]
    ControllerBinaryMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The controller exited before it was serving.
    #[error("controller exited before serving ({status}); log tail:\n{log_tail}")]
    ControllerExited {
        /// How it ended.
        status: ExitStatus,
        /// The last lines of its log.
        log_tail: String,
    },
    /// The controller did not write its ready file in time.
    #[error("controller not serving after {waited:?}; log tail:\n{log_tail}")]
    ControllerNotReady {
        /// How long we waited.
        waited: Duration,
        /// The last lines of its log.
        log_tail: String,
    },
    /// An operation that needs a running controller process found none.
    #[error("the controller is not running")]
    ControllerNotRunning,
    /// The controller did not exit in time after a signal.
    #[error("controller (pid {pid}) still running {waited:?} after the signal")]
    ControllerStuck {
        /// The process.
        pid: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The controller's output or files are not what the harness expects.
    #[error("unexpected controller output: {0}")]
    ControllerOutput(String),
    /// An HTTPS exchange with the controller failed below HTTP (connect, TLS, I/O).
    #[error("{what}")]
    Http {
        /// What was being done (`POST /api/v1/login`, `connecting to ...`).
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The controller answered with an error status.
    #[error("{method} {path}: HTTP {status}: {body}")]
    Api {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
        /// The status code.
        status: u16,
        /// The error body (the API's error JSON; it never holds secrets).
        body: String,
    },
    /// Something the lab waits for did not happen in time.
    #[error("{what} not reached after {waited:?}: {last}")]
    NotConverged {
        /// What was awaited.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
        /// The last state seen.
        last: String,
    },
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
