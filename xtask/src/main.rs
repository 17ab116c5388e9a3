//! `cargo xtask`: Airlock's task runner (setup, lab, test, bench, image).
//!
//! Every task prints one `==> ...` line per step and how it ended, so a CI
//! log reads as a list of steps.

mod check;
mod image;
mod image_files;
mod image_sign;
mod image_update;
mod lab;
mod setup;
mod sizing;
mod step;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Airlock's task runner. Run as root: the lab and the tests use network
/// namespaces, bpffs and XDP.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need (apt packages, rustup
    /// components, bpf-linker built against nightly's LLVM) and mount
    /// bpffs. Idempotent; quick when everything is present.
    Setup,
    /// The lab: a simulated hospital in network namespaces with the real
    /// agent enforcing on the appliance.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Setup, fmt, clippy (host and eBPF), build the agent, run every test.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        quick: bool,
        /// Also the image update test: A/B update, rollback, refusals (8
        /// QEMU boots and two more image builds; see image/README.md).
        #[arg(long)]
        image: bool,
    },
    /// Benchmarks (root): per-packet cost of the XDP boundary
    /// (BPF_PROG_TEST_RUN), and policy change → applied on the agent in the
    /// lab with its controller (release builds).
    Bench,
    /// Build the bootable appliance image (target/image/airlock.img; see
    /// image/README.md), or write provisioning data into one.
    Image {
        #[command(subcommand)]
        command: Option<ImageCommand>,
        /// Hardware profile the image is built for.
        #[arg(long, default_value = image::DEFAULT_PROFILE)]
        profile: std::path::PathBuf,
        /// Update release number (default: image.toml's `release`).
        #[arg(long)]
        release: Option<u64>,
        /// Output directory (default target/image).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// TEST ONLY: an agent configuration the agent refuses (the rollback test's bundle).
        #[arg(long, hide = true)]
        test_break_agent: bool,
    },
    /// State-partition size for the audit trail's retention (hardware/SIZING.md).
    Sizing(sizing::SizingArgs),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Write the first-boot provisioning file (controller URL, CA fingerprint,
    /// one-time enrollment token) into an image's AIRLOCK-CFG partition.
    Provision(image::ProvisionArgs),
    /// Check an image's signed manifest (Ed25519) and its checksum.
    Verify {
        /// The image (its manifest.json, manifest.json.sig next to it).
        #[arg(long, default_value_os_t = image::default_image())]
        image: std::path::PathBuf,
        /// Public key file (64 hex digits), default image-signing.pub next to the image.
        #[arg(long)]
        public_key: Option<std::path::PathBuf>,
    },
    /// A signed A/B update bundle (root slot + UKIs + signed manifest) from a
    /// built image, for `airlock-agent update apply`.
    UpdateBundle(image_update::BundleArgs),
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Build the lab, start the controller and the agent (which enrolls
    /// itself and enforces the controller's policy). In the foreground it
    /// prints the agent's counters every 5 s and tears everything down on Ctrl-C.
    Up {
        /// Return once the agent enforces; the lab keeps running until
        /// `cargo xtask lab down`.
        #[arg(long)]
        detach: bool,
        /// Namespace prefix: namespaces are <prefix>-p1, -p2, -psw, -app, -ext, -ctl.
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
        /// The policy the appliance enforces (both layers), default policies/lab.toml;
        /// applied through the controller's API (locally with --no-controller).
        #[arg(long, conflicts_with = "no_policy")]
        policy: Option<std::path::PathBuf>,
        /// Start with no policy: default deny (with --no-controller, flows can be
        /// added by hand with `airlock-agent flow add`).
        #[arg(long)]
        no_policy: bool,
        /// No controller: the agent alone, policies applied from local files.
        #[arg(long)]
        no_controller: bool,
    },
    /// Show the lab: namespaces, addresses, agent, controller. Exit 1 if there is none.
    Status {
        /// Print the stable JSON document (see airlock_testbed::LabStatus).
        #[arg(long)]
        json: bool,
        /// Namespace prefix.
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Stop the agent and the controller, detach the boundary, delete the
    /// namespaces and the lab's state. Idempotent.
    Down {
        /// Namespace prefix.
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    step::ensure_cargo_bin_on_path();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Lab(LabCommand::Up { detach, prefix, policy, no_policy, no_controller }) => {
            let policy = (!no_policy).then(|| {
                policy
                    .unwrap_or_else(|| airlock_testbed::workspace_root().join("policies/lab.toml"))
            });
            lab::up(&prefix, detach, policy.as_deref(), !no_controller)
        }
        Command::Lab(LabCommand::Status { json, prefix }) => lab::status(&prefix, json),
        Command::Lab(LabCommand::Down { prefix }) => lab::down(&prefix),
        Command::Test { quick, image } => check::run(quick, image),
        Command::Bench => check::bench(),
        Command::Image { command: None, profile, release, out, test_break_agent } => {
            let opts = image::BuildOptions { release, out, test_break_agent };
            crate::setup::run().and_then(|()| image::build_with(&profile, &opts)).map(|_| ())
        }
        Command::Image { command: Some(ImageCommand::UpdateBundle(args)), .. } => {
            image_update::bundle(&args).map(|_| ())
        }
        Command::Image { command: Some(ImageCommand::Provision(args)), .. } => {
            image::provision(&args)
        }
        Command::Image { command: Some(ImageCommand::Verify { image, public_key }), .. } => {
            image_sign::verify_image(&image, public_key.as_deref())
        }
        Command::Sizing(args) => sizing::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
