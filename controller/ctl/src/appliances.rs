//! `airlockctl appliances …`: list, show, create (issue a one-time
//! enrollment token), revoke.

use anyhow::Result;
use clap::Subcommand;

use airlock_proto::admin::{ApplianceState, ApplianceView, CreateAppliance, EnrollmentToken};

use crate::{
    context::{api_client, Globals, Refusal},
    prompt, render,
};

/// Longest token lifetime the controller grants.
const MAX_TTL: u64 = 7 * 86_400;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Every appliance: state, desired and applied bundle version, last seen, connected.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One appliance in detail.
    Show {
        /// The appliance id.
        id: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create an appliance (or re-provision one) and print its one-time enrollment token.
    ///
    /// The token is shown once: the controller keeps only its hash and
    /// airlockctl does not save it. It enrolls one appliance, once, before it
    /// expires.
    Create {
        /// The appliance id: its name in the policy (a-z, 0-9, '-').
        id: String,
        /// How long the token stays valid: 90s, 30m, 24h, 7d (1 minute to 7 days).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        token_ttl: String,
    },
    /// Revoke an appliance: its certificate is refused at its next handshake.
    Revoke {
        /// The appliance id.
        id: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

pub async fn run(g: &Globals, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::List { json } => list(g, json).await,
        Cmd::Show { id, json } => show(g, &id, json).await,
        Cmd::Create { id, token_ttl } => create(g, &id, &token_ttl).await,
        Cmd::Revoke { id, yes } => revoke(g, &id, yes).await,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The controller's id rule, checked before the id goes into a URL path.
fn check_id(id: &str) -> Result<(), Refusal> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Refusal::BadInput(format!(
            "{:?} is not an appliance id: use 1-63 characters a-z, 0-9 and '-', not starting with '-'",
            id.chars().take(80).collect::<String>()
        )))
    }
}

fn state(s: ApplianceState) -> &'static str {
    match s {
        ApplianceState::Pending => "pending",
        ApplianceState::Enrolled => "enrolled",
        ApplianceState::Revoked => "revoked",
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn list(g: &Globals, json: bool) -> Result<()> {
    let all: Vec<ApplianceView> = api_client(g)?.get("/api/v1/appliances").await?;
    if json {
        return print_json(&all);
    }
    if all.is_empty() {
        println!("No appliances yet; create one with `airlockctl appliances create ID`.");
        return Ok(());
    }
    let now = now();
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                state(a.state).to_owned(),
                opt(a.desired_version),
                opt(a.applied_version),
                a.last_seen.map_or_else(|| "never".to_owned(), |t| render::ago(t, now)),
                if a.connected { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(&["ID", "STATE", "DESIRED", "APPLIED", "LAST SEEN", "CONNECTED"], &rows)
    );
    Ok(())
}

async fn show(g: &Globals, id: &str, json: bool) -> Result<()> {
    check_id(id)?;
    let a: ApplianceView = api_client(g)?.get(&format!("/api/v1/appliances/{id}")).await?;
    if json {
        return print_json(&a);
    }
    let now = now();
    let when = |t: Option<u64>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| format!("{} ({})", render::utc(t), render::ago(t, now)),
        )
    };
    let sync = match (a.desired_version, a.applied_version) {
        (Some(d), Some(p)) if d == p => " (in sync)",
        (Some(_), _) => " (not applied yet)",
        _ => "",
    };
    println!("id:               {}", a.id);
    println!("state:            {}", state(a.state));
    println!("enrolled:         {}", when(a.enrolled_at));
    println!("certificate ends: {}", when(a.cert_expires_at));
    println!("desired bundle:   {}", opt(a.desired_version));
    println!("applied bundle:   {}{sync}", opt(a.applied_version));
    println!("last seen:        {}", when(a.last_seen));
    println!("connected:        {}", if a.connected { "yes" } else { "no" });
    if let Some(r) = &a.refused {
        println!("refused bundle:   version {}: {}", r.version, r.reason);
    }
    if let Some(h) = &a.health {
        println!(
            "health:           enforcing {}, forwarding {}, {} flow entries",
            if h.enforcing { "yes" } else { "NO" },
            if h.forwarding { "on" } else { "off" },
            h.flows
        );
        for p in &h.problems {
            println!("  problem: {p}");
        }
    }
    Ok(())
}

async fn create(g: &Globals, id: &str, ttl: &str) -> Result<()> {
    check_id(id)?;
    let secs =
        render::parse_duration(ttl).filter(|s| (60..=MAX_TTL).contains(s)).ok_or_else(|| {
            Refusal::BadInput(format!(
                "--token-ttl {ttl:?}: give a duration from 1m to 7d, like 30m, 24h or 7d"
            ))
        })?;
    let t: EnrollmentToken = api_client(g)?
        .post(
            "/api/v1/appliances",
            &CreateAppliance { id: id.to_owned(), token_ttl_secs: Some(secs) },
        )
        .await?;
    println!(
        "Enrollment token for appliance {}, valid until {} ({}):",
        t.appliance,
        render::utc(t.expires_at),
        render::span(t.expires_at.saturating_sub(now()))
    );
    println!();
    println!("    {}", t.token);
    println!();
    println!(
        "This is the only time the token is shown: the controller stores only a hash of it and \
         airlockctl does not save it. It enrolls one appliance, once. Lost it? Run this command \
         again for a new one."
    );
    println!();
    println!("On the appliance, run this and give it the token on standard input (paste it, then Enter):");
    println!();
    println!("    {}", t.command);
    Ok(())
}

async fn revoke(g: &Globals, id: &str, yes: bool) -> Result<()> {
    check_id(id)?;
    let client = api_client(g)?;
    let refused = format!("not confirmed; appliance {id} was not revoked");
    let question = format!(
        "Revoke appliance {id}? Its certificate is refused from its next connection, it gets \
         no more policy, and the id cannot enroll again."
    );
    if !yes && !prompt::confirm(&question).map_err(|e| prompt::unconfirmed(e, &refused))? {
        return Err(Refusal::Refused(refused).into());
    }
    let a: ApplianceView = client.post_empty(&format!("/api/v1/appliances/{id}/revoke")).await?;
    println!("Appliance {} is {}.", a.id, state(a.state));
    Ok(())
}
