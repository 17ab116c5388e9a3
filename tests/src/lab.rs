//! [`Lab`]: a [`Topology`] with the agent enforcing on the appliance and,
//! optionally, the controller managing it.
//!
//! With a controller, [`Lab::start_with`] does what an operator does on a
//! fresh installation: starts the controller (first start: CA, bootstrap
//! admin), logs in with the bootstrap credential, creates the appliance
//! [`LAB_APPLIANCE`] with a one-time enrollment token, applies the lab's
//! policy through the API, provisions the token in a 0600 file and starts the
//! agent with a `[controller]` section. The agent enrolls by itself, streams
//! its signed bundle and enforces it; `start_with` returns once the
//! controller reports the newest bundle applied.

use std::{
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::PathBuf,
    time::Duration,
};

use crate::{
    agent::{Agent, AgentOptions, AgentRecord, DEFAULT_READY_TIMEOUT, LAB_APPLIANCE},
    agent_formats::{AgentConfig, ControllerSection},
    controller::{Controller, ControllerOptions, ControllerRecord},
    controller_api::ControllerApi,
    status::LabStatus,
    topology::{Node, Topology, TopologyOptions},
    Error, Result,
};

/// Default wait until a managed appliance has enrolled and applied its bundle.
pub const DEFAULT_CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Namespace prefix (see [`crate::names`]).
    pub prefix: String,
    /// The agent's state directory (default: `$TMPDIR/airlock-testbed-<prefix>`).
    pub state_dir: Option<PathBuf>,
    /// The agent configuration (default: [`AgentConfig::for_lab`]; with a
    /// controller the lab adds the management port and `[controller]`).
    pub config: AgentConfig,
    /// The agent binary (default: [`crate::agent_bin`]).
    pub agent_bin: Option<PathBuf>,
    /// How long to wait for "enforcing".
    pub ready_timeout: Duration,
    /// See [`AgentOptions::die_with_parent`] (also for the controller).
    pub die_with_parent: bool,
    /// The policy the appliance starts with: through the controller's API
    /// when the lab has one, else applied locally (`policy apply`). `None`:
    /// none (default deny).
    pub policy: Option<PathBuf>,
    /// Start the controller and let the appliance enroll with it (default off).
    pub controller: bool,
    /// The controller's data directory (default:
    /// `$TMPDIR/airlock-testbed-<prefix>-controller`).
    pub controller_dir: Option<PathBuf>,
    /// The controller binary (default: [`crate::controller_bin`]).
    pub controller_bin: Option<PathBuf>,
    /// The host link to the controller (interactive lab only; see [`TopologyOptions`]).
    pub host_link: bool,
    /// The agent's `controller.report_interval_secs`.
    pub report_interval_secs: u64,
    /// How long to wait for enrollment and the first bundle.
    pub converge_timeout: Duration,
}

impl LabOptions {
    /// Defaults for `prefix`: no controller, no policy.
    pub fn new(prefix: &str) -> Self {
        LabOptions {
            prefix: prefix.to_owned(),
            state_dir: None,
            config: AgentConfig::for_lab(prefix),
            agent_bin: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            die_with_parent: true,
            policy: None,
            controller: false,
            controller_dir: None,
            controller_bin: None,
            host_link: false,
            report_interval_secs: 2,
            converge_timeout: DEFAULT_CONVERGE_TIMEOUT,
        }
    }

    /// Defaults for `prefix` with the controller and the sample policy
    /// `policies/lab.toml` applied through it.
    pub fn with_controller(prefix: &str) -> Self {
        LabOptions {
            controller: true,
            policy: Some(crate::workspace_root().join("policies/lab.toml")),
            ..Self::new(prefix)
        }
    }
}

/// The simulated hospital with a running agent (and controller). Dropping it
/// stops and detaches the agent, stops the controller, then deletes the
/// namespaces.
#[derive(Debug)]
pub struct Lab {
    // Field order is drop order: the processes go before their namespaces.
    agent: Agent,
    controller: Option<Controller>,
    topology: Topology,
}

impl Lab {
    /// Builds the topology `prefix` and starts the agent with defaults.
    pub fn start(prefix: &str) -> Result<Lab> {
        Self::start_with(LabOptions::new(prefix))
    }

    /// Builds the topology and starts the agent (and the controller); it
    /// returns once the agent enforces (and so has turned forwarding on) and,
    /// with a controller, once the controller reports the appliance's bundle
    /// applied.
    pub fn start_with(opts: LabOptions) -> Result<Lab> {
        if !opts.controller {
            let topology = Topology::build_with(
                &opts.prefix,
                TopologyOptions { controller: false, host_link: opts.host_link },
            )?;
            let state_dir = state_dir_of(&opts);
            let agent = start_agent(&opts, &state_dir, opts.config.clone())?;
            if let Some(p) = &opts.policy {
                agent.apply_policy(p)?;
            }
            return Ok(Lab { agent, controller: None, topology });
        }
        let pending = Self::start_controller(opts)?;
        let mut api = pending.controller.client()?;
        let token = api.create_appliance(LAB_APPLIANCE)?;
        if let Some(p) = &pending.opts.policy {
            api.apply_policy_file(p, "lab start")?;
        }
        pending.enroll(&token.token)
    }

    /// The first half of a managed lab: the topology and the controller,
    /// with no appliance record, no policy and no agent yet — for tests that
    /// enroll the appliance the way an admin does (the web UI) and then hand
    /// the token to [`PendingLab::enroll`]. `opts.policy` is not applied.
    pub fn start_controller(mut opts: LabOptions) -> Result<PendingLab> {
        opts.controller = true;
        let topology = Topology::build_with(
            &opts.prefix,
            TopologyOptions { controller: true, host_link: opts.host_link },
        )?;
        let ctl_ns = topology.controller().ok_or(Error::ControllerNotRunning)?;
        let dir = opts.controller_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("airlock-testbed-{}-controller", opts.prefix))
        });
        let mut copts = ControllerOptions::for_lab(ctl_ns.name(), dir, opts.host_link);
        copts.bin = opts.controller_bin.clone();
        copts.die_with_parent = opts.die_with_parent;
        let controller = Controller::start(copts)?;
        Ok(PendingLab { controller, topology, opts })
    }

    /// The namespaces.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The agent, to signal or restart it.
    pub fn agent_mut(&mut self) -> &mut Agent {
        &mut self.agent
    }

    /// The controller, in a lab with one.
    pub fn controller(&self) -> Option<&Controller> {
        self.controller.as_ref()
    }

    /// The controller, to signal or restart it.
    pub fn controller_mut(&mut self) -> Option<&mut Controller> {
        self.controller.as_mut()
    }

    /// A new admin API client, logged in (a lab with a running controller).
    pub fn api(&self) -> Result<ControllerApi> {
        self.controller.as_ref().ok_or(Error::ControllerNotRunning)?.client()
    }

    /// The lab's status with its agent and controller sections.
    pub fn status(&self) -> LabStatus {
        LabStatus::probe_with(
            self.topology.prefix(),
            Some(self.agent.record()),
            self.controller.as_ref().map(Controller::record),
        )
    }

    /// Leaves everything running after this value is dropped; returns the
    /// prefix and the records for a later teardown.
    pub fn into_detached(self) -> (String, AgentRecord, Option<ControllerRecord>) {
        let Lab { agent, controller, topology } = self;
        let record = agent.into_detached();
        let controller = controller.map(Controller::into_detached);
        (topology.into_detached(), record, controller)
    }
}

/// A managed lab whose appliance has not enrolled yet (see
/// [`Lab::start_controller`]). Dropping it stops the controller and deletes
/// the namespaces.
#[derive(Debug)]
pub struct PendingLab {
    // Field order is drop order.
    controller: Controller,
    topology: Topology,
    opts: LabOptions,
}

impl PendingLab {
    /// The running controller.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// The namespaces.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Provisions `token` on the appliance and starts its agent, which
    /// enrolls by itself; returns once the controller reports the
    /// appliance's newest bundle applied.
    pub fn enroll(self, token: &str) -> Result<Lab> {
        let PendingLab { controller, topology, opts } = self;
        let state_dir = state_dir_of(&opts);
        let token_file = provision_token(&state_dir, token)?;
        let config = opts.config.clone().with_controller(ControllerSection {
            url: controller.record().url.clone(),
            ca_fingerprint: controller.record().ca_fingerprint.clone(),
            enrollment_token_file: Some(token_file),
            report_interval_secs: opts.report_interval_secs,
        });
        let agent = start_agent(&opts, &state_dir, config)?;
        let mut api = controller.client()?;
        if let Err(e) = api.wait_applied(LAB_APPLIANCE, opts.converge_timeout) {
            return Err(Error::NotConverged {
                what: "enrollment and the first bundle",
                waited: opts.converge_timeout,
                last: format!(
                    "{e}\n--- agent log ---\n{}\n--- controller log ---\n{}",
                    agent.log_tail(20),
                    controller.log_tail(20)
                ),
            });
        }
        Ok(Lab { agent, controller: Some(controller), topology })
    }
}

fn state_dir_of(opts: &LabOptions) -> PathBuf {
    opts.state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("airlock-testbed-{}", opts.prefix)))
}

fn start_agent(
    opts: &LabOptions,
    state_dir: &std::path::Path,
    config: AgentConfig,
) -> Result<Agent> {
    let agent = Agent::start(AgentOptions {
        netns: Node::Appliance.namespace(&opts.prefix),
        state_dir: state_dir.to_path_buf(),
        config,
        bin: opts.agent_bin.clone(),
        ready_timeout: opts.ready_timeout,
        die_with_parent: opts.die_with_parent,
    });
    agent.inspect_err(|_| {
        // The token file may be all that is there.
        let _ = std::fs::remove_dir_all(state_dir);
    })
}

/// Writes the enrollment token to `<dir>/enrollment-token` (0600; the
/// agent deletes it once enrolled); its path.
fn provision_token(dir: &std::path::Path, token: &str) -> Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("creating", dir, e))?;
    let path = dir.join("enrollment-token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("writing", &path, e))?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())
        .map_err(|e| Error::io("writing", &path, e))?;
    Ok(path)
}
