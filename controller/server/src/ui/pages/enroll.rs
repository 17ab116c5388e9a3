//! Enrollment: create an appliance and show its one-time token once, with
//! the exact commands that provision it.

use axum::{extract::State, http::StatusCode, response::IntoResponse, Form};
use maud::{html, Markup};
use serde::Deserialize;

use airlock_proto::admin::{ApplianceState, CreateAppliance};

use crate::{
    appliances::ApplianceError,
    auth::Action,
    state::AppState,
    ui::{
        layout::{self, Nav},
        PageErr, St, Viewer,
    },
};

/// Token lifetimes offered, in hours.
const TTLS: &[(u64, &str)] = &[(1, "1 hour"), (24, "24 hours"), (72, "3 days"), (168, "7 days")];

fn form_page(v: &Viewer, id: &str, ttl_h: u64, error: Option<&str>) -> Markup {
    layout::page(
        v,
        Nav::Enroll,
        "Enroll an appliance",
        html! {
            h1 { "Enroll an appliance" }
            p { "Creates the appliance and a one-time enrollment token. The appliance generates its keys itself; "
                "the token lets it ask for its certificate once." }
            form.stack method="post" action="/appliances" {
                input type="hidden" name="csrf" value=(v.csrf);
                div {
                    label for="id" { "Appliance id " span.hint { "(its name in the policy)" } }
                    input #id type="text" name="id" value=(id) required maxlength="63"
                        pattern="[a-z0-9][a-z0-9-]{0,62}" autocomplete="off"
                        aria-invalid=[error.map(|_| "true")] aria-describedby="id-hint id-err";
                    div #id-hint.hint { "1–63 characters: a–z, 0–9 and '-', starting with a letter or digit." }
                    @if let Some(e) = error { div #id-err.field-error role="alert" { (e) } }
                }
                div {
                    label for="ttl" { "Token valid for" }
                    select #ttl name="ttl_hours" {
                        @for (h, label) in TTLS {
                            option value=(h) selected[*h == ttl_h] { (label) }
                        }
                    }
                }
                div.actions { button type="submit" { "Create and show the token" } }
            }
        },
    )
}

/// `GET /appliances/new`.
pub async fn form(v: Viewer) -> Result<Markup, PageErr> {
    v.require(Action::ManageAppliances)?;
    Ok(form_page(&v, "", 24, None))
}

/// The enrollment form.
#[derive(Debug, Deserialize)]
pub struct EnrollForm {
    csrf: String,
    id: String,
    #[serde(default)]
    ttl_hours: Option<u64>,
}

fn in_policy(st: &AppState, id: &str) -> Option<bool> {
    let c = st.policies.current_checked().ok()??;
    Some(c.0.appliances.iter().any(|a| a.name == id))
}

/// `POST /appliances`.
pub async fn create(
    State(st): St,
    v: Viewer,
    Form(f): Form<EnrollForm>,
) -> Result<axum::response::Response, PageErr> {
    v.check_csrf(&f.csrf)?;
    v.require(Action::ManageAppliances)?;
    let id = f.id.trim().to_owned();
    let ttl_h = f.ttl_hours.unwrap_or(24);
    if !TTLS.iter().any(|(h, _)| *h == ttl_h) {
        return Err(PageErr::BadRequest("Choose one of the offered token lifetimes.".into()));
    }
    let before = st.appliances.get(&id).ok().flatten().map(|r| r.state);
    let req = CreateAppliance { id: id.clone(), token_ttl_secs: Some(ttl_h * 3600) };
    let t = match crate::api::create_token(&st, &req, &v.subject.user) {
        Ok(t) => t,
        Err(e @ (ApplianceError::BadId(_) | ApplianceError::Revoked(_))) => {
            let msg = match e {
                ApplianceError::Revoked(_) => {
                    format!("{id} was revoked; choose a new id for the replacement.")
                }
                other => other.to_string(),
            };
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, form_page(&v, &id, ttl_h, Some(&msg)))
                .into_response());
        }
        Err(e) => return Err(e.into()),
    };
    let now = st.now();
    let provision = format!(
        "AIRLOCK_ENROLLMENT_TOKEN=<the token> cargo xtask image provision --image airlock.img \\\n  --controller {} --ca-fingerprint {}",
        t.controller_url, t.ca_fingerprint
    );
    Ok(layout::page(
        &v,
        Nav::Enroll,
        &format!("Token for {id}"),
        html! {
            h1 { "Enrollment token for " code { (id) } }
            p.notice.warn role="status" {
                strong { "Shown once. " }
                "Copy it now: the controller keeps only its hash. It works once and expires "
                (layout::utc(t.expires_at)) " (in " (layout::span(t.expires_at.saturating_sub(now))) ")."
            }
            @if before == Some(ApplianceState::Enrolled) {
                p.notice { (id) " is already enrolled; this token re-enrolls it (for example on replacement hardware)." }
            }
            @match in_policy(&st, &id) {
                Some(false) => p.notice.warn { "The current policy does not name " code { (id) } ": until it does, the appliance drops everything. " a href="/policy/edit" { "Edit the policy" } },
                None => p.notice.warn { "There is no valid policy yet: the appliance will drop everything until one names it." },
                Some(true) => {},
            }
            div.panel {
                label for="token" { "One-time token" }
                div.secret {
                    input #token type="text" readonly value=(t.token) aria-describedby="token-hint";
                    button.secondary type="button" data-copy="token" hidden { "Copy" }
                }
                p #token-hint.hint { "Treat it like a password: do not e-mail it or paste it into tickets." }
            }
            h2 { "Provision the appliance" }
            p { "Either on the running appliance (serial console), then paste the token and press Ctrl-D:" }
            pre.cmd #cmd-enroll { (t.command) }
            p { "or into the image before flashing it:" }
            pre.cmd #cmd-image { (provision) }
            p { "CA fingerprint the appliance pins: " code.mono { (t.ca_fingerprint) } }
            p.actions { a.button href={ "/appliances/" (id) } { "Go to " (id) } a.button.secondary href="/appliances/new" { "Enroll another" } }
        },
    )
    .into_response())
}
