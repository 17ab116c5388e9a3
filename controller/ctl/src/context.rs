//! Who and where: the controller URL, how it is trusted and the session
//! token, from flags, the environment and the saved session; `login` and
//! `logout`.

use airlock_proto::admin::{Login, SessionToken};
use anyhow::Result;

use crate::{
    client::{Client, Endpoint},
    prompt, render, session,
    session::Saved,
    tls::{self, Trust},
};

/// Options every command takes.
#[derive(Debug)]
pub struct Globals {
    /// `--controller` / `AIRLOCK_URL`.
    pub controller: Option<String>,
    /// `--ca-fingerprint` / `AIRLOCK_CA_FINGERPRINT`.
    pub ca_fingerprint: Option<String>,
}

/// Failures decided before or instead of a request, with their exit code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Bad input (exit 2).
    #[error("{0}")]
    BadInput(String),
    /// A file could not be read (exit 2).
    #[error("cannot read {path}")]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The operator said no, or the controller refused (exit 2).
    #[error("{0}")]
    Refused(String),
    /// No usable session (exit 3).
    #[error("not logged in: {0}")]
    NotLoggedIn(String),
}

impl Refusal {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Refusal::NotLoggedIn(_) => 3,
            Refusal::BadInput(_) | Refusal::File { .. } | Refusal::Refused(_) => 2,
        }
    }
}

const LOGIN_HINT: &str =
    "run `airlockctl login --controller https://HOST:PORT --ca-fingerprint sha256:...` \
     (or set AIRLOCK_URL, AIRLOCK_CA_FINGERPRINT and AIRLOCK_TOKEN)";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn parse_pin(s: &str) -> Result<[u8; 32], Refusal> {
    airlock_proto::parse_fingerprint(s).ok_or_else(|| {
        Refusal::BadInput(format!(
            "{s:?} is not a CA fingerprint: expected sha256: followed by 64 hex digits \
             (`airlock-controller ca-fingerprint` prints it)"
        ))
    })
}

/// The saved session, when it belongs to `ep`.
fn saved_for(saved: Option<Saved>, ep: &Endpoint) -> Option<Saved> {
    saved.filter(|s| Endpoint::parse(&s.controller).ok().as_ref() == Some(ep))
}

/// A client for an authenticated command.
pub fn api_client(g: &Globals) -> Result<Client> {
    let saved = session::load(&session::path()?)?;
    let url = match (&g.controller, &saved) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => s.controller.clone(),
        (None, None) => return Err(Refusal::NotLoggedIn(LOGIN_HINT.into()).into()),
    };
    let ep = Endpoint::parse(&url)?;
    // The saved CA and token are used only for the controller they came from.
    let same = saved_for(saved, &ep);
    let trust = match (&g.ca_fingerprint, &same) {
        (Some(fp), _) => Trust::Pin(parse_pin(fp)?),
        (None, Some(s)) => Trust::Ca(s.ca_pem.clone()),
        (None, None) => {
            return Err(Refusal::NotLoggedIn(format!(
                "nothing is saved for {}; {LOGIN_HINT}",
                ep.url()
            ))
            .into())
        }
    };
    let env_token = std::env::var("AIRLOCK_TOKEN").ok().filter(|t| !t.trim().is_empty());
    let token = match (env_token, &same) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(Saved { token: Some(t), expires_at, .. })) => {
            if let Some(end) = expires_at.filter(|e| *e <= now()) {
                return Err(Refusal::NotLoggedIn(format!(
                    "the session ended at {}; log in again",
                    render::utc(end)
                ))
                .into());
            }
            t.clone()
        }
        _ => return Err(Refusal::NotLoggedIn(LOGIN_HINT.into()).into()),
    };
    Ok(Client::new(ep, &trust, Some(token))?)
}

/// `airlockctl login`.
pub async fn login(g: &Globals, user: &str, password_stdin: bool) -> Result<()> {
    let path = session::path()?;
    let saved = session::load(&path)?;
    let url =
        g.controller.clone().or_else(|| saved.as_ref().map(|s| s.controller.clone())).ok_or_else(
            || Refusal::BadInput("which controller? pass --controller https://HOST:PORT".into()),
        )?;
    let ep = Endpoint::parse(&url)?;
    let same = saved_for(saved, &ep);
    let trust =
        match (&g.ca_fingerprint, &same) {
            (Some(fp), _) => Trust::Pin(parse_pin(fp)?),
            (None, Some(s)) => Trust::Ca(s.ca_pem.clone()),
            (None, None) => return Err(Refusal::BadInput(
                "pass --ca-fingerprint sha256:... (the controller prints it at its first start; \
                 `airlock-controller ca-fingerprint` prints it again)"
                    .into(),
            )
            .into()),
        };
    if user.trim().is_empty() {
        return Err(Refusal::BadInput("--user must not be empty".into()).into());
    }
    let password = if password_stdin {
        prompt::password_from_stdin()?
    } else {
        prompt::password(&format!("Password for {user} at {}: ", ep.url()))?
    };
    let client = Client::new(ep.clone(), &trust, None)?;
    let answer = client
        .post_raw("/api/v1/login", &Login { user: user.to_owned(), password })
        .await
        .map_err(|e| match e.api() {
            // A wrong password is refused input here, not an ended session.
            Some((401, body)) => anyhow::Error::from(Refusal::Refused(body.message.clone())),
            _ => anyhow::Error::from(e).context(format!("cannot log in to {}", ep.url())),
        })?;
    let s: SessionToken =
        serde_json::from_slice(&answer.body).map_err(crate::client::ClientError::Decode)?;
    let (ca_pem, ca_fingerprint) = match (&trust, &same) {
        (Trust::Pin(pin), _) => {
            // The verifier already accepted this chain because of the pin;
            // the matching certificate is the CA saved from now on.
            let ca = tls::find_pinned(&answer.chain, pin).ok_or_else(|| {
                Refusal::Refused(
                    "the controller's chain changed between handshake and login".into(),
                )
            })?;
            (tls::to_pem(ca), airlock_proto::ca_fingerprint(ca))
        }
        (Trust::Ca(pem), Some(saved)) => (pem.clone(), saved.ca_fingerprint.clone()),
        (Trust::Ca(pem), None) => (pem.clone(), String::new()),
    };
    let saved = Saved {
        controller: ep.url(),
        user: user.to_owned(),
        token: Some(s.token),
        expires_at: Some(s.expires_at),
        ca_fingerprint,
        ca_pem,
    };
    session::save(&path, &saved)?;
    println!(
        "Logged in to {} as {user}. The session ends after {} unused, and at {} at the latest.",
        saved.controller,
        render::span(s.idle_timeout_secs),
        render::utc(s.expires_at)
    );
    println!("Saved to {} (CA {}).", path.display(), saved.ca_fingerprint);
    Ok(())
}

/// `airlockctl logout`.
pub async fn logout(g: &Globals) -> Result<()> {
    let path = session::path()?;
    let Some(mut saved) = session::load(&path)? else {
        println!("Not logged in.");
        return Ok(());
    };
    let Some(token) = saved.token.take() else {
        println!("Not logged in.");
        return Ok(());
    };
    let ep = Endpoint::parse(&saved.controller)?;
    if g.controller.as_deref().is_some_and(|u| Endpoint::parse(u).ok().as_ref() != Some(&ep)) {
        return Err(Refusal::BadInput(format!(
            "the saved session is for {}, not for --controller; logout ends the saved session",
            saved.controller
        ))
        .into());
    }
    let client = Client::new(ep, &Trust::Ca(saved.ca_pem.clone()), Some(token))?;
    let ended = client.send(hyper::Method::POST, "/api/v1/logout", None).await;
    saved.expires_at = None;
    session::save(&path, &saved)?;
    match ended {
        Ok(a) if (200..300).contains(&a.status) => {
            println!("Logged out of {}.", saved.controller);
        }
        Ok(a) => eprintln!(
            "The token is forgotten, but the controller answered HTTP {}; the session there \
             ends at its idle timeout.",
            a.status
        ),
        Err(e) => eprintln!(
            "The token is forgotten, but the controller was not reached ({e}); the session \
             there ends at its idle timeout."
        ),
    }
    Ok(())
}
