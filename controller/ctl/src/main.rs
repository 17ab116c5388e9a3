//! `airlockctl`: the admin CLI over the controller's HTTPS API (`/api/v1`).
//!
//! What it is: a thin client — login with a CA pinned by fingerprint,
//! appliances and their one-time enrollment tokens, policy versions
//! (validate, diff, apply, history, rollback), appliance image releases
//! (upload, list, rollout, stop). Every decision (validation,
//! numbering, signing, who may do what) is the controller's; airlockctl
//! renders answers for humans, or as JSON with `--json`.
//!
//! What it is not: no local policy compiler, no second trust store (the CA
//! saved at login is the only root), no secret ever taken as an argument.
//!
//! Exit codes: 0 ok, 1 failure, 2 bad input or refused, 3 not logged in or
//! the session ended.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod appliances;
mod client;
mod context;
mod policy;
mod prompt;
mod release;
mod render;
mod session;
mod tls;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{client::ClientError, context::Refusal, prompt::PromptError, tls::HandshakeProblem};

const AFTER_HELP: &str = "\
Environment (for scripts): AIRLOCK_URL (the controller), AIRLOCK_CA_FINGERPRINT (pin instead of the
saved CA), AIRLOCK_TOKEN (a session token instead of the saved one). The session is saved in
$XDG_CONFIG_HOME/airlock/ctl.toml (or ~/.config/airlock/ctl.toml), mode 0600.

Exit codes: 0 ok, 1 failure, 2 bad input or refused, 3 not logged in or the session ended.";

/// Airlock's admin CLI: appliances, enrollment tokens, policy versions and image releases on a controller.
#[derive(Debug, Parser)]
#[command(name = "airlockctl", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// The controller, https://HOST[:PORT] (default: the one saved at login).
    #[arg(long, env = "AIRLOCK_URL", global = true, value_name = "URL")]
    controller: Option<String>,
    /// The controller CA's fingerprint (sha256:HEX) to pin; needed for login,
    /// optional afterwards (the CA saved at login is used).
    #[arg(long, env = "AIRLOCK_CA_FINGERPRINT", global = true, value_name = "FINGERPRINT")]
    ca_fingerprint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log in: pin the controller's CA by fingerprint and save a session.
    ///
    /// The password is read from the terminal without echo, or with
    /// --password-stdin from the first line of standard input; never from an
    /// argument. The CA certificate the fingerprint matched is saved and is the
    /// only root trusted afterwards.
    Login {
        /// The user.
        #[arg(long, default_value = "admin")]
        user: String,
        /// Read the password from standard input (for scripts).
        #[arg(long)]
        password_stdin: bool,
    },
    /// End the session on the controller and forget its token (the URL and CA stay saved).
    Logout,
    /// Appliances and their enrollment tokens.
    #[command(subcommand, visible_alias = "appliance")]
    Appliances(appliances::Cmd),
    /// Policy versions: validate, diff, apply, history, rollback.
    #[command(subcommand)]
    Policy(policy::Cmd),
    /// Appliance image releases: upload a signed update bundle, list, roll out, stop.
    #[command(subcommand, visible_alias = "releases")]
    Release(release::Cmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let globals =
        context::Globals { controller: cli.controller, ca_fingerprint: cli.ca_fingerprint };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("airlockctl: cannot start the I/O runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Login { user, password_stdin } => {
                context::login(&globals, &user, password_stdin).await
            }
            Command::Logout => context::logout(&globals).await,
            Command::Appliances(c) => appliances::run(&globals, c).await,
            Command::Policy(c) => policy::run(&globals, c).await,
            Command::Release(c) => release::run(&globals, c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error and its causes, one per line; below a classified handshake
/// failure (whose message already explains it), rustls internals are left out.
fn report(e: &anyhow::Error) {
    for (i, c) in e.chain().enumerate() {
        if i == 0 {
            eprintln!("airlockctl: {c}");
        } else {
            eprintln!("  because: {c}");
        }
        if c.downcast_ref::<ClientError>().is_some_and(explains_itself) {
            return;
        }
    }
}

fn explains_itself(e: &ClientError) -> bool {
    matches!(e, ClientError::Tls { problem, .. } if *problem != HandshakeProblem::Other)
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for c in e.chain() {
        if let Some(r) = c.downcast_ref::<Refusal>() {
            return r.exit_code();
        }
        if let Some(PromptError::NoTerminal(_)) = c.downcast_ref::<PromptError>() {
            return 2;
        }
        if let Some(c) = c.downcast_ref::<ClientError>() {
            return match c {
                ClientError::Api { status: 401, .. } => 3,
                ClientError::Api { status, .. } if (400..500).contains(status) => 2,
                ClientError::Url { .. } => 2,
                ClientError::Tls { problem: HandshakeProblem::PinMismatch, .. } => 2,
                _ => 1,
            };
        }
    }
    1
}
