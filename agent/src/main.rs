//! `airlock-agent` command line. See docs/agent-cli.md.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use airlock_agent::{
    clock,
    config::{AgentConfig, LoadError, LogFormat, DEFAULT_CONFIG_PATH},
    dataplane::{self, Dataplane, PinLayout},
    events,
    maps::Maps,
    store::{SledStore, StateStore as _},
};
use airlock_ebpf_common::layout::{Counter, Reason};
use airlock_policy::{Expiry, Flow, FlowEntry, Ingress, Protocol};
use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use tracing::{error, info, warn};

/// The Airlock appliance agent: enforces the patient-network boundary with XDP.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Agent configuration file (TOML).
    #[arg(long, short, env = "AIRLOCK_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH, global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load or re-attach the boundary on every port, then report counters and drop events
    /// until SIGTERM/SIGINT. Exiting never detaches.
    Run {
        /// Log format (overrides the config file).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Write "enforcing" to this file once every port enforces.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Add, remove or list flow entries (works with or without `run`).
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Print the dataplane counters per verdict reason.
    Stats {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove the boundary from every port: forwarding off, links and maps unpinned.
    /// Stop `run` first, and run it in the appliance's network namespace.
    Detach {
        /// Remove the pins even when they name interfaces that are not in this
        /// namespace (forwarding is still switched off here).
        #[arg(long)]
        force: bool,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Enroll with the controller: a key pair is generated here (the private key never
    /// leaves this machine) and its CSR sent with the one-time token; prints the appliance id.
    Enroll(EnrollArgs),
    /// The controller link.
    #[command(subcommand)]
    Controller(ControllerCommand),
    /// Policy files: check, diff, and apply locally (until the controller drives the agent).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Qualify this box: kernel BTF and XDP, ports and drivers, WireGuard, CPU
    /// crypto, memory, disk, TPM, clock. Exit 1 when a check fails.
    Hwcheck {
        /// Hardware profile to check against (ports, drivers, minimums).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A/B image updates: apply a signed bundle to the inactive slot (trial boot),
    /// show the slots' boot entries. See image/README.md.
    #[command(subcommand)]
    Update(UpdateCommand),
}

#[derive(Debug, Subcommand)]
enum UpdateCommand {
    /// Verify a signed update bundle, then write it to the inactive root slot and
    /// install its trial boot entry (the next boot tries it; the previous slot
    /// boots again if it is not marked good within its tries).
    Apply {
        /// The bundle file (or a block device holding it).
        bundle: PathBuf,
        /// Boot tries the new slot gets before the previous one boots again (1-9).
        #[arg(long, default_value_t = airlock_agent::update::DEFAULT_TRIES)]
        tries: u32,
        /// Try again a release whose trial boots already failed here.
        #[arg(long)]
        retry: bool,
        #[command(flatten)]
        system: UpdateSystem,
    },
    /// The running slot and release, and every slot's boot entry with its state.
    Status {
        #[command(flatten)]
        system: UpdateSystem,
    },
}

/// Where the running system's pieces are (defaults: the appliance's).
#[derive(Debug, Args)]
struct UpdateSystem {
    /// The ESP's EFI/Linux directory.
    #[arg(long, default_value = "/efi/EFI/Linux")]
    uki_dir: PathBuf,
    /// The update signing key (public, 64 hex digits).
    #[arg(long, default_value = "/usr/share/airlock/image-signing.pub")]
    public_key: PathBuf,
    /// The running image's release number.
    #[arg(long, default_value = "/usr/share/airlock/release")]
    release_file: PathBuf,
    /// The kernel command line (airlock.slot=).
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// Directory of the slots' block devices by GPT name.
    #[arg(long, default_value = "/dev/disk/by-partlabel")]
    partitions: PathBuf,
}

impl UpdateSystem {
    fn system(&self) -> airlock_agent::update::System {
        airlock_agent::update::System {
            uki_dir: self.uki_dir.clone(),
            public_key: self.public_key.clone(),
            release_file: self.release_file.clone(),
            cmdline: self.cmdline.clone(),
            partitions: self.partitions.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file (TOML) and print every problem with its line.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Show what a new policy opens, closes and changes, per appliance.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The candidate.
        new: PathBuf,
    },
    /// Make this appliance's flow entries equal the policy's (minimal changes, closing first).
    Apply {
        /// The policy file.
        file: PathBuf,
        /// The appliance in the policy (default: the config's appliance.name).
        #[arg(long)]
        appliance: Option<String>,
    },
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The controller's main URL, e.g. https://10.90.0.1:8443 (default: [controller] url).
    #[arg(long)]
    controller: Option<String>,
    /// The controller CA's fingerprint, sha256:<hex> (default: [controller] ca_fingerprint).
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// A file holding the one-time enrollment token.
    #[arg(long, conflicts_with = "token_stdin", required_unless_present_any = ["token_stdin", "token"])]
    token_file: Option<PathBuf>,
    /// Read the one-time enrollment token from standard input.
    #[arg(long)]
    token_stdin: bool,
    /// Refused: a token on the command line is visible to everyone in ps.
    #[arg(long, hide = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ControllerCommand {
    /// Enrollment, certificate expiry, applied bundle version and last refusal.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration file and print every problem.
    Check,
}

#[derive(Debug, Args)]
struct FlowArgs {
    /// Source address (the host that starts the flow).
    #[arg(long)]
    src: IpAddr,
    /// Destination address.
    #[arg(long)]
    dst: IpAddr,
    /// tcp, udp or icmp (echo).
    #[arg(long)]
    proto: Protocol,
    /// Destination port (tcp and udp only).
    #[arg(long)]
    dport: Option<u16>,
}

#[derive(Debug, Subcommand)]
enum FlowCommand {
    /// Allow one exact flow (and its replies).
    Add {
        #[command(flatten)]
        flow: FlowArgs,
        /// Policy rule id recorded with the entry and its counters.
        #[arg(long)]
        rule_id: u32,
        /// Policy version recorded with the entry.
        #[arg(long, default_value_t = 0)]
        policy_version: u32,
        /// Lifetime, e.g. 30s, 15m, 2h; the kernel stops passing it afterwards.
        #[arg(long, value_parser = clock::parse_duration, required_unless_present = "infrastructure", conflicts_with = "infrastructure")]
        ttl: Option<Duration>,
        /// An infrastructure rule without expiry (DNS, NTP to internal servers).
        #[arg(long)]
        infrastructure: bool,
        /// The side the flow starts from.
        #[arg(long, value_enum, default_value = "patient")]
        ingress: IngressArg,
        /// Do not allow replies.
        #[arg(long)]
        no_reply: bool,
    },
    /// Remove one flow entry.
    Remove {
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// List flow entries with their counters.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum IngressArg {
    Patient,
    Uplink,
}

/// The longest lifetime a timed entry may have.
const MAX_TTL: Duration = Duration::from_secs(90 * 86_400);

/// Bad input (exit 2) versus failures (exit 1).
#[derive(Debug)]
enum Failure {
    Usage(anyhow::Error),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Usage(e.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A closed pipe (`flow list | head`) ends a CLI command quietly, as
        // for other Unix tools, instead of panicking in println!.
        // SAFETY: restoring the default disposition of a signal.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let (code, e) = match f {
                Failure::Usage(e) => (2, e),
                Failure::Other(e) => (1, e),
            };
            eprintln!("airlock-agent: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(code)
        }
    }
}

fn load_config(path: &std::path::Path) -> Result<AgentConfig, Failure> {
    AgentConfig::load(path).map_err(|e| match e {
        LoadError::Invalid(_) => usage(e),
        LoadError::Read { .. } => usage(e),
    })
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    use airlock_agent::policy_cmd::{self, PolicyCmdError};
    let policy_err = |e: PolicyCmdError| match e {
        PolicyCmdError::Invalid(_)
        | PolicyCmdError::Read { .. }
        | PolicyCmdError::UnknownAppliance { .. } => usage(e),
        other => Failure::Other(other.into()),
    };
    // Updates need no agent configuration either.
    if let Command::Update(cmd) = cli.command {
        return update(cmd);
    }
    // Checking and diffing files needs no agent configuration.
    match &cli.command {
        Command::Hwcheck { profile, json } => {
            return airlock_agent::hwcheck::command(profile.as_deref(), &cli.config, *json)
                .map_err(usage)?
                .then_some(())
                .ok_or_else(|| Failure::Other(anyhow::anyhow!("this box does not qualify")));
        }
        Command::Policy(PolicyCommand::Check { file }) => {
            println!("{}", policy_cmd::check(file, policy_cmd::now()).map_err(policy_err)?);
            return Ok(());
        }
        Command::Policy(PolicyCommand::Diff { old, new }) => {
            print!("{}", policy_cmd::diff(old, new, policy_cmd::now()).map_err(policy_err)?);
            return Ok(());
        }
        _ => {}
    }
    let cfg = load_config(&cli.config)?;
    match cli.command {
        Command::Config(ConfigCommand::Check) => {
            println!("{}: ok ({} ports)", cli.config.display(), cfg.ports.len());
            Ok(())
        }
        Command::Run { log_format, ready_file } => {
            init_tracing(log_format.unwrap_or(cfg.log.format));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run(cfg, ready_file))?;
            Ok(())
        }
        Command::Flow(cmd @ FlowCommand::List { .. }) => flow(&cfg.pins(), cmd),
        Command::Flow(cmd) => {
            // A running agent lists the maps again before its next change.
            note_external_write(&cfg);
            let done = flow(&cfg.pins(), cmd);
            note_external_write(&cfg);
            done
        }
        Command::Enroll(args) => enroll(&cfg, args),
        Command::Controller(ControllerCommand::Status { json }) => controller_status(&cfg, json),
        Command::Stats { json } => stats(&cfg.pins(), json),
        Command::Policy(PolicyCommand::Apply { file, appliance }) => {
            // On stderr: how each layer was changed, and any fallback.
            init_tracing(cfg.log.format);
            let name = appliance.unwrap_or_else(|| cfg.appliance.name.clone());
            let mut maps = Maps::open(&cfg.pins().maps())?;
            let store =
                SledStore::open(&cfg.appliance.state_dir).map_err(|e| policy_err(e.into()))?;
            let (removed, upserted) =
                policy_cmd::apply(&file, &name, &cfg, &mut maps, &store, policy_cmd::now())
                    .map_err(policy_err)?;
            println!(
                "applied {} to {name}: {removed} removed, {upserted} added or changed",
                file.display()
            );
            Ok(())
        }
        Command::Policy(_) | Command::Hwcheck { .. } | Command::Update(_) => Ok(()),
        Command::Detach { force } => {
            let n = dataplane::detach(&cfg, force)?;
            println!("detached: forwarding off, {n} pins removed");
            Ok(())
        }
    }
}

/// `update apply|status`: no agent configuration needed.
fn update(cmd: UpdateCommand) -> Result<(), Failure> {
    use airlock_agent::update::{self, ApplyOptions, UpdateError};
    match cmd {
        UpdateCommand::Apply { bundle, tries, retry, system } => {
            if !(1..=update::MAX_TRIES).contains(&tries) {
                return Err(usage(anyhow::anyhow!("--tries must be 1-{}", update::MAX_TRIES)));
            }
            let started = std::time::Instant::now();
            let mut progress = |l: &str| println!("airlock-update: {l}");
            match update::apply(
                &bundle,
                &system.system(),
                ApplyOptions { tries, retry, expect_release: None },
                &mut progress,
            ) {
                Ok(done) => {
                    println!(
                        "airlock-update: applied release {} ({}) to slot {} in {:.1} s; trial boot \
                         entry {} is the default for the next boot",
                        done.release,
                        done.image_version,
                        done.slot,
                        started.elapsed().as_secs_f64(),
                        done.entry
                    );
                    Ok(())
                }
                Err(e @ (UpdateError::Io { .. } | UpdateError::ReadBack { .. })) => {
                    Err(Failure::Other(e.into()))
                }
                Err(e) => Err(usage(anyhow::anyhow!("refused: {e}"))),
            }
        }
        UpdateCommand::Status { system } => {
            print!("{}", update::status(&system.system()).map_err(anyhow::Error::from)?);
            Ok(())
        }
    }
}

/// Tells a running agent that this process writes the flow maps (it lists
/// them again before its next change).
fn note_external_write(cfg: &AgentConfig) {
    if let Err(e) = airlock_agent::applier::note_external_write(&cfg.appliance.state_dir) {
        eprintln!("airlock-agent: warning: cannot tell a running agent that the maps changed: {e}");
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn parse_flow(a: &FlowArgs) -> Result<Flow, Failure> {
    Flow::new(a.src, a.dst, a.proto, a.dport).map_err(usage)
}

fn flow(layout: &PinLayout, cmd: FlowCommand) -> Result<(), Failure> {
    let mut maps = Maps::open(&layout.maps())?;
    match cmd {
        FlowCommand::Add {
            flow,
            rule_id,
            policy_version,
            ttl,
            infrastructure,
            ingress,
            no_reply,
        } => {
            let f = parse_flow(&flow)?;
            let expiry = match ttl {
                Some(d) if d > MAX_TTL => {
                    return Err(usage(anyhow::anyhow!(
                        "--ttl {}s is longer than the {}-day maximum; standing rules are --infrastructure",
                        d.as_secs(),
                        MAX_TTL.as_secs() / 86_400
                    )))
                }
                Some(d) => Expiry::At(clock::monotonic_ns().saturating_add(d.as_secs() * 1_000_000_000)),
                None => Expiry::Infrastructure,
            };
            let ingress = match ingress {
                IngressArg::Patient => Ingress::Patient,
                IngressArg::Uplink => Ingress::Uplink,
            };
            let e = FlowEntry::new(
                f,
                rule_id,
                policy_version,
                ingress,
                !no_reply,
                expiry,
                infrastructure,
            )
            .map_err(usage)?;
            maps.upsert(&e)?;
            match ttl {
                Some(d) => println!("allowed {f} (rule {rule_id}) for {}s", d.as_secs()),
                None => println!("allowed {f} (rule {rule_id}, infrastructure, no expiry)"),
            }
        }
        FlowCommand::Remove { flow } => {
            let f = parse_flow(&flow)?;
            if maps.remove(&f)? {
                println!("removed {f}");
            } else {
                return Err(usage(anyhow::anyhow!("no entry for {f}")));
            }
        }
        FlowCommand::List { json } => list(&maps, json)?,
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct ListedJson {
    flow: Option<String>,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<Protocol>,
    dport: Option<u16>,
    rule_id: Option<u32>,
    policy_version: Option<u32>,
    ingress: Option<Ingress>,
    allow_reply: Option<bool>,
    infrastructure: Option<bool>,
    expires_in_secs: Option<f64>,
    state: &'static str,
    error: Option<String>,
    #[serde(flatten)]
    counters: airlock_agent::maps::FlowCounters,
}

fn list(maps: &Maps, json: bool) -> Result<()> {
    let now = clock::monotonic_ns();
    let rows: Vec<ListedJson> = maps
        .list()?
        .into_iter()
        .map(|(entry, counters, _)| match entry {
            Ok(e) => {
                let (infra, left) = match e.expiry {
                    Expiry::Infrastructure => (true, None),
                    Expiry::At(t) => (false, Some((t as f64 - now as f64) / 1e9)),
                };
                ListedJson {
                    flow: Some(e.flow.to_string()),
                    src: Some(e.flow.src()),
                    dst: Some(e.flow.dst()),
                    proto: Some(e.flow.protocol()),
                    dport: e.flow.port(),
                    rule_id: Some(e.rule_id),
                    policy_version: Some(e.policy_version),
                    ingress: Some(e.ingress),
                    allow_reply: Some(e.allow_reply),
                    infrastructure: Some(infra),
                    expires_in_secs: left.map(|s| s.max(0.0)),
                    state: if e.is_live(now) { "live" } else { "expired" },
                    error: None,
                    counters,
                }
            }
            Err(err) => ListedJson {
                flow: None,
                src: None,
                dst: None,
                proto: None,
                dport: None,
                rule_id: None,
                policy_version: None,
                ingress: None,
                allow_reply: None,
                infrastructure: None,
                expires_in_secs: None,
                state: "invalid",
                error: Some(err.to_string()),
                counters,
            },
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no flow entries: everything is dropped");
    }
    for r in rows {
        let what = r.flow.or(r.error).unwrap_or_default();
        let exp = match (r.infrastructure, r.expires_in_secs) {
            (Some(true), _) => "infrastructure".to_owned(),
            (_, Some(s)) => format!("{s:.0}s left"),
            _ => "-".to_owned(),
        };
        println!(
            "{what:<52} rule {:<6} {:<8} {:<16} fwd {}p/{}B  reply {}p/{}B",
            r.rule_id.unwrap_or_default(),
            r.state,
            exp,
            r.counters.packets,
            r.counters.bytes,
            r.counters.reply_packets,
            r.counters.reply_bytes
        );
    }
    Ok(())
}

fn stats(layout: &PinLayout, json: bool) -> Result<(), Failure> {
    let maps = Maps::open(&layout.maps())?;
    let stats = maps.stats()?;
    if json {
        let reasons: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(r, c)| {
                (r.as_str().to_owned(), serde_json::json!({"packets": c.packets, "bytes": c.bytes}))
            })
            .collect();
        let out = serde_json::json!({"reasons": reasons, "flows": maps.len()?});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (r, c) in &stats {
            println!("{:<20} {:>12} packets {:>14} bytes", r.as_str(), c.packets, c.bytes);
        }
        println!("flow entries: {}", maps.len()?);
    }
    Ok(())
}

async fn run(cfg: AgentConfig, ready_file: Option<PathBuf>) -> Result<()> {
    use tokio::{
        io::unix::AsyncFd,
        signal::unix::{signal, SignalKind},
        time::interval,
    };
    let span = tracing::info_span!("agent", appliance = %cfg.appliance.name);
    let _enter = span.enter();
    info!(ports = cfg.ports.len(), pin_dir = %cfg.appliance.pin_dir.display(), "starting");
    let mut dp = Dataplane::install(&cfg).context("installing the boundary")?;
    apply_last_known_good(&cfg, &mut dp);
    dp.open_gate(&cfg).context("turning forwarding on")?;
    if let Some(f) = &ready_file {
        std::fs::write(f, "enforcing\n").with_context(|| format!("writing {}", f.display()))?;
    }
    info!(forwarding = airlock_agent::netif::forwarding(), "enforcing");
    let mut link = airlock_agent::controller::Link::start(&cfg, &mut dp);

    let ring = Maps::open_events(&cfg.pins().maps())?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // until the AsyncFd (which owns the ring buffer) is dropped.
    let mut events = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer fd: {e}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut budget = interval(Duration::from_secs(1));
    let mut counters = interval(Duration::from_secs(cfg.log.counters_interval_secs));
    let mut gc = interval(Duration::from_secs(cfg.dataplane.gc_interval_secs));
    let mut last: std::collections::BTreeMap<Reason, Counter> = dp.maps.stats()?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: exiting; the boundary stays attached"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; the boundary stays attached"); break; }
            ev = link.recv() => link.handle(ev, &cfg, &mut dp),
            _ = budget.tick() => {
                if let Err(e) = dp.maps.refill_event_budget(cfg.dataplane.events_per_second) {
                    warn!(error = %e, "cannot refill the drop-event budget");
                }
            }
            _ = counters.tick() => {
                let now = dp.maps.stats()?;
                log_counters(&last, &now);
                last = now;
            }
            _ = gc.tick() => {
                match dp.applier.remove_expired(&mut dp.maps, clock::monotonic_ns()) {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "expired flow entries removed"),
                    Err(e) => warn!(error = %e, "expiry sweep failed"),
                }
                if let Err(e) = dp.refresh_local_addrs() {
                    warn!(error = %e, "cannot refresh local addresses");
                }
                let problems = dp.problems(&cfg);
                if !problems.is_empty() {
                    // Fail closed first, then try to restore the boundary.
                    if let Err(e) = airlock_agent::netif::set_forwarding(false) {
                        error!(error = %e, "cannot switch forwarding off");
                    }
                    error!(?problems, "boundary degraded: forwarding off; re-attaching");
                    match Dataplane::install(&cfg).and_then(|new| new.open_gate(&cfg).map(|()| new)) {
                        Ok(new) => {
                            dp = new;
                            info!(forwarding = airlock_agent::netif::forwarding(), "boundary restored");
                        }
                        Err(e) => error!(error = %format!("{e:#}"), "re-attach failed; forwarding stays off"),
                    }
                }
            }
            guard = events.readable_mut() => {
                let mut guard = guard.context("ring buffer")?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    match events::decode(&item) {
                        Some(d) => {
                            info!(
                                target: "airlock::drop",
                                reason = d.reason, role = d.role, ifindex = d.ifindex,
                                src = ?d.src, dst = ?d.dst, proto = d.proto,
                                sport = d.sport, dport = d.dport, ethertype = d.ethertype, len = d.len,
                                "dropped"
                            );
                            link.note_drop(&d, &dp);
                        }
                        None => warn!(len = item.len(), "undecodable drop event"),
                    }
                }
                guard.clear_ready();
            }
        }
    }
    Ok(())
}

/// Applies the stored state (a local policy or a controller bundle, whose
/// signature is checked again), if any, before forwarding is turned on. A
/// missing, unreadable or inapplicable state applies no flows: the maps keep
/// what they hold (empty on a fresh appliance: everything dropped), and the
/// nftables table is installed with no flows (its final drop drops all).
fn apply_last_known_good(cfg: &AgentConfig, dp: &mut Dataplane) {
    use airlock_agent::store::Stored;
    let now = airlock_agent::policy_cmd::now();
    let empty_table = |dp: &mut Dataplane| match dp.applier.install_empty_table(cfg, now) {
        Ok(outcome) => info!(?outcome, "nftables table installed with no flows"),
        Err(e) => error!(
            error = %airlock_agent::controller::chain(&e),
            "cannot install the nftables table"
        ),
    };
    let lkg = match SledStore::open(&cfg.appliance.state_dir).and_then(|s| s.load_state()) {
        Ok(Some(l)) => l,
        Ok(None) => {
            info!("no last-known-good policy stored");
            empty_table(dp);
            return;
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "cannot read the last-known-good policy; applying nothing");
            empty_table(dp);
            return;
        }
    };
    let restored =
        airlock_agent::controller::lkg::restore(&lkg, cfg, &mut dp.applier, &mut dp.maps, now);
    match (restored, &lkg) {
        (Ok((removed, upserted)), Stored::Policy(l)) => info!(
            policy_version = l.policy.version,
            appliance = %l.appliance,
            removed,
            upserted,
            "last-known-good policy applied"
        ),
        (Ok((removed, upserted)), Stored::Bundle(b)) => info!(
            bundle_version = b.bundle.version,
            appliance = %b.appliance,
            removed,
            upserted,
            "last-known-good bundle applied"
        ),
        (Err(e), _) => {
            error!(
                error = %airlock_agent::controller::chain(&e),
                "cannot apply the last-known-good state; applying nothing"
            );
            empty_table(dp);
        }
    }
}

fn enroll(cfg: &AgentConfig, a: EnrollArgs) -> Result<(), Failure> {
    use airlock_agent::controller::{self, client::Endpoint, mgmt, ControllerError, Token};
    if a.token.is_some() {
        return Err(usage(anyhow::anyhow!(
            "--token is refused: a token on the command line is visible to every user in ps; \
             use --token-file FILE or --token-stdin"
        )));
    }
    let from_cfg = |f: fn(&airlock_agent::config::ControllerConfig) -> &String| {
        cfg.controller.as_ref().map(|c| f(c).clone())
    };
    let url = a.controller.or_else(|| from_cfg(|c| &c.url)).ok_or_else(|| {
        usage(anyhow::anyhow!("--controller URL is required (or [controller] url in the config)"))
    })?;
    let fp = a.ca_fingerprint.or_else(|| from_cfg(|c| &c.ca_fingerprint)).ok_or_else(|| {
        usage(anyhow::anyhow!(
            "--ca-fingerprint is required (or [controller] ca_fingerprint in the config)"
        ))
    })?;
    let ep = Endpoint::parse(&url).map_err(usage)?;
    controller::parse_pin(&fp).map_err(usage)?;
    let token = match a.token_file {
        Some(f) => Token::from_file(&f),
        None => Token::from_stdin(),
    }
    .map_err(usage)?;
    init_tracing(cfg.log.format);
    // A boundary that is already up drops the controller's answers otherwise.
    note_external_write(cfg);
    if let Ok(mut maps) = Maps::open(&cfg.pins().maps()) {
        if let Err(e) = mgmt::ensure(&mut maps, cfg, &[ep]) {
            warn!(error = %e, "cannot let the controller's answers through the boundary");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let id = rt.block_on(controller::enroll(cfg, &url, &fp, &token)).map_err(|e| match e {
        ControllerError::AlreadyEnrolled(_) => usage(e),
        e if e.is_refusal() => usage(e),
        e => Failure::Other(e.into()),
    })?;
    if let Ok(mut maps) = Maps::open(&cfg.pins().maps()) {
        let _ = mgmt::ensure(&mut maps, cfg, &[]);
    }
    note_external_write(cfg);
    println!("{}", id.record.appliance);
    Ok(())
}

fn controller_status(cfg: &AgentConfig, json: bool) -> Result<(), Failure> {
    use airlock_agent::{controller, store::StateStore};
    let dir = &cfg.appliance.state_dir;
    let store = if dir.exists() { SledStore::open(dir).ok() } else { None };
    let mut v = controller::status(cfg, store.as_ref().map(|s| s as &dyn StateStore));
    if store.is_none() && dir.exists() {
        // A running agent keeps the store open while its controller link is on.
        v.last_known_good = "unknown".to_owned();
        v.errors.push("the state store is in use (by the running agent?)".to_owned());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let now = controller::unix_now() as i64;
    match &v.appliance {
        Some(a) => println!("enrolled: yes, appliance {a}"),
        None => println!("enrolled: no"),
    }
    if let (Some(u), Some(agent)) = (&v.controller_url, &v.agent_url) {
        println!("controller: {u} (agent listener {agent})");
    }
    if let Some(t) = v.cert_not_after {
        let due = if v.cert_renewal_due == Some(true) { ", renewal due" } else { "" };
        println!("certificate: expires at {t} (in {} days){due}", (t - now).div_euclid(86_400));
    }
    match (v.last_known_good.as_str(), v.applied_version) {
        ("bundle", Some(n)) => println!(
            "last-known-good: bundle version {n}{}",
            v.policy_version.map(|p| format!(" (policy version {p})")).unwrap_or_default()
        ),
        ("policy", _) => println!(
            "last-known-good: local policy file (policy version {})",
            v.policy_version.unwrap_or_default()
        ),
        ("unknown", _) => println!("last-known-good: unknown (the state store is in use)"),
        _ => println!("last-known-good: none (everything is dropped)"),
    }
    if let Some(r) = &v.last_refusal {
        println!("last refusal: bundle version {}: {}", r.version, r.reason);
    }
    if v.enrolled {
        let seen = v.last_contact.map(|t| format!(", last contact {}s ago", now - t as i64));
        println!(
            "stream: {}{}",
            if v.stream_connected { "connected" } else { "not connected" },
            seen.unwrap_or_default()
        );
    }
    for e in &v.errors {
        println!("error: {e}");
    }
    Ok(())
}

fn log_counters(
    last: &std::collections::BTreeMap<Reason, Counter>,
    now: &std::collections::BTreeMap<Reason, Counter>,
) {
    let mut parts = Vec::new();
    for (r, c) in now {
        let before = last.get(r).map_or(0, |c| c.packets);
        let d = c.packets.saturating_sub(before);
        if d > 0 {
            parts.push(format!("{}={d}", r.as_str()));
        }
    }
    if !parts.is_empty() {
        info!(target: "airlock::counters", deltas = %parts.join(" "), "counters");
    }
}
