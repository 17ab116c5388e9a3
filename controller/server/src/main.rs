//! `airlock-controller`: serve, and the operator's store commands (KMS
//! rotation, backup, restore).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use airlock_controller::{ca::Ca, config::ControllerConfig, state::system_clock};
use airlock_kms::SecretString;
use airlock_store::Store;

/// The Airlock controller.
#[derive(Debug, Parser)]
#[command(name = "airlock-controller", version, about)]
struct Cli {
    /// Configuration file (TOML). Every field has a default.
    #[arg(long, short, env = "AIRLOCK_CONTROLLER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (overrides the file).
    #[arg(long, env = "AIRLOCK_CONTROLLER_DATA", global = true)]
    data_dir: Option<PathBuf>,
    /// A file holding the KMS secret (passphrase, PKCS#11 PIN or Vault token),
    /// when the KMS needs one. Never pass secrets as arguments.
    #[arg(long, env = "AIRLOCK_KMS_SECRET_FILE", global = true)]
    kms_secret_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Serve {
        /// Main HTTPS listener (overrides the file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Agent mTLS listener (overrides the file).
        #[arg(long)]
        agent_listen: Option<SocketAddr>,
        /// Extra certificate name (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// The URL admins and enrolling agents use (needed when --listen is 0.0.0.0).
        #[arg(long)]
        public_url: Option<String>,
        /// The URL agents stream from (needed when --agent-listen is 0.0.0.0).
        #[arg(long)]
        agent_url: Option<String>,
        /// Write "serving" and the URLs here once listening (for scripts).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Key management.
    #[command(subcommand)]
    Kms(KmsCommand),
    /// Write an encrypted, integrity-checked archive of the store.
    Backup {
        /// The archive to write.
        out: PathBuf,
    },
    /// Restore an archive into an empty data directory (verified first).
    Restore {
        /// The archive.
        archive: PathBuf,
    },
    /// Print the CA fingerprint agents pin.
    CaFingerprint,
}

#[derive(Debug, Subcommand)]
enum KmsCommand {
    /// New key-encryption-key version; every data key is rewrapped, old data stays readable.
    Rotate,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-controller: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn load(cli: &Cli) -> Result<ControllerConfig> {
    let mut cfg = match &cli.config {
        Some(p) => ControllerConfig::load(p)?,
        None => ControllerConfig::default(),
    };
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

fn secret(cli: &Cli) -> Result<Option<SecretString>> {
    match &cli.kms_secret_file {
        Some(p) => {
            let s =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(Some(SecretString::from(s.trim_end_matches(['\n', '\r']).to_owned())))
        }
        None => Ok(None),
    }
}

fn open_store(cli: &Cli, cfg: &ControllerConfig) -> Result<Store> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let kms = airlock_kms::open(&cfg.kms(), secret(cli)?.as_ref()).context("opening the KMS")?;
    Store::open(&cfg.data_dir.join("store"), kms).context("opening the store")
}

fn run(cli: Cli) -> Result<()> {
    let mut cfg = load(&cli)?;
    match &cli.command {
        Command::Serve {
            listen,
            agent_listen,
            server_names,
            public_url,
            agent_url,
            ready_file,
        } => {
            if public_url.is_some() {
                cfg.public_url = public_url.clone();
            }
            if agent_url.is_some() {
                cfg.agent_url = agent_url.clone();
            }
            if let Some(l) = listen {
                cfg.listen = *l;
            }
            if let Some(l) = agent_listen {
                cfg.agent_listen = *l;
            }
            cfg.server_names.extend(server_names.iter().cloned());
            cfg.check()?;
            let store = open_store(&cli, &cfg)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(serve(cfg, store, ready_file.clone()))
        }
        Command::Kms(KmsCommand::Rotate) => {
            let store = open_store(&cli, &cfg)?;
            let r = store.rotate_kek().context("rotating the key-encryption key")?;
            println!("{r:?}");
            Ok(())
        }
        Command::Backup { out } => {
            let store = open_store(&cli, &cfg)?;
            let r = store.backup(out).context("writing the backup")?;
            println!("{r:?}");
            Ok(())
        }
        Command::Restore { archive } => {
            let kms =
                airlock_kms::open(&cfg.kms(), secret(&cli)?.as_ref()).context("opening the KMS")?;
            let r =
                Store::restore(archive, &cfg.data_dir.join("store"), kms).context("restoring")?;
            println!("{r:?}");
            Ok(())
        }
        Command::CaFingerprint => {
            let store = open_store(&cli, &cfg)?;
            println!("{}", Ca::load_or_create(&store, system_clock())?.fingerprint());
            Ok(())
        }
    }
}

async fn serve(cfg: ControllerConfig, store: Store, ready_file: Option<PathBuf>) -> Result<()> {
    let started = airlock_controller::run::start(cfg, store).await?;
    let state = started.state;
    println!("Airlock controller at {}", state.public_url);
    println!("CA fingerprint (pin it on appliances): {}", state.ca.fingerprint());
    if let Some(p) = started.bootstrap {
        // Printed once, to the operator's terminal; never logged, stored only as a hash.
        println!("First start: bootstrap admin credential (shown once, change it): user admin, password {p}");
    }
    if let Some(f) = ready_file {
        let text = format!(
            "serving\nurl={}\nagent_url={}\nfingerprint={}\n",
            state.public_url,
            state.agent_url,
            state.ca.fingerprint()
        );
        std::fs::write(&f, text).with_context(|| format!("writing {}", f.display()))?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
    }
    state.store.flush().context("flushing the store")?;
    Ok(())
}
