//! [`Lab`]: a [`Topology`] with the agent enforcing on the appliance.

use std::{path::PathBuf, time::Duration};

use crate::{
    agent::{Agent, AgentOptions, AgentRecord, DEFAULT_READY_TIMEOUT},
    agent_formats::AgentConfig,
    status::LabStatus,
    topology::{Node, Topology},
    Result,
};

/// How to start a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Namespace prefix (see [`crate::names`]).
    pub prefix: String,
    /// The agent's state directory (default: `$TMPDIR/airlock-testbed-<prefix>`).
    pub state_dir: Option<PathBuf>,
    /// The agent configuration (default: [`AgentConfig::for_lab`]).
    pub config: AgentConfig,
    /// The agent binary (default: [`crate::agent_bin`]).
    pub agent_bin: Option<PathBuf>,
    /// How long to wait for "enforcing".
    pub ready_timeout: Duration,
    /// See [`AgentOptions::die_with_parent`].
    pub die_with_parent: bool,
}

impl LabOptions {
    /// Defaults for `prefix`.
    pub fn new(prefix: &str) -> Self {
        LabOptions {
            prefix: prefix.to_owned(),
            state_dir: None,
            config: AgentConfig::for_lab(prefix),
            agent_bin: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            die_with_parent: true,
        }
    }
}

/// The simulated hospital with a running agent. Dropping it stops and
/// detaches the agent, then deletes the namespaces.
#[derive(Debug)]
pub struct Lab {
    // Field order is drop order: the agent goes before its namespace.
    agent: Agent,
    topology: Topology,
}

impl Lab {
    /// Builds the topology `prefix` and starts the agent with defaults.
    pub fn start(prefix: &str) -> Result<Lab> {
        Self::start_with(LabOptions::new(prefix))
    }

    /// Builds the topology and starts the agent; it returns once the agent
    /// enforces (and so has turned forwarding on).
    pub fn start_with(opts: LabOptions) -> Result<Lab> {
        let topology = Topology::build(&opts.prefix)?;
        let state_dir = opts.state_dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("airlock-testbed-{}", opts.prefix))
        });
        let agent = Agent::start(AgentOptions {
            netns: topology.ns(Node::Appliance).name().to_owned(),
            state_dir,
            config: opts.config,
            bin: opts.agent_bin,
            ready_timeout: opts.ready_timeout,
            die_with_parent: opts.die_with_parent,
        })?;
        Ok(Lab { agent, topology })
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

    /// The lab's status with its agent section.
    pub fn status(&self) -> LabStatus {
        LabStatus::probe(self.topology.prefix(), Some(self.agent.record()))
    }

    /// Leaves everything running after this value is dropped; returns the
    /// prefix and the agent record for a later teardown.
    pub fn into_detached(self) -> (String, AgentRecord) {
        let Lab { agent, topology } = self;
        let record = agent.into_detached();
        (topology.into_detached(), record)
    }
}
