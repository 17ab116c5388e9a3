//! One appliance: state and alarms, ports and roles, live rates, recent
//! drops with their cause, WireGuard, its image and update state, the
//! bundle it should enforce, revoke.

use axum::{
    extract::{Path, State},
    response::{IntoResponse, Redirect, Response},
    Form,
};
use maud::{html, Markup};
use serde::Deserialize;

use airlock_proto::admin::ApplianceState;

use crate::{
    auth::Action,
    state::AppState,
    ui::{
        layout::{self, Nav},
        view::Severity,
        Page, PageErr, St, Viewer,
    },
};

use super::dashboard::{enforcing_badge, policy_cell, rate_charts, rates};

fn record(st: &AppState, id: &str) -> Result<crate::appliances::ApplianceRecord, PageErr> {
    st.appliances
        .get(id)
        .map_err(PageErr::from)?
        .ok_or_else(|| PageErr::NotFound(format!("There is no appliance {id:?}.")))
}

fn live_body(st: &AppState, id: &str, now: u64) -> Page {
    let rec = record(st, id)?;
    let s = super::status_of(st, &rec, now);
    let report = st.hub.last_report(id);
    let r = rates(st, Some(&[id]), now);
    let health = report.as_ref().map(|(r, _)| &r.health);
    let image = report.as_ref().and_then(|(r, _)| r.release.as_ref());
    let progress = crate::releases::progress(st.releases.rollout().as_ref(), id, image);
    Ok(html! {
        div #appliance-live data-live={ "/ui/live/appliances/" (id) } {
            div.grid {
                section.panel aria-labelledby="state-h" {
                    h2 #state-h { "State" }
                    dl.facts {
                        dt { "Lifecycle" } dd { (format!("{:?}", s.state).to_lowercase()) }
                        dt { "Boundary" } dd { (enforcing_badge(&s)) }
                        dt { "Policy" } dd { (policy_cell(&s)) }
                        dt { "Last report" } dd { @match s.last_seen { Some(t) => (layout::when(now, t)), None => span.empty { "never" } } }
                        dt { "Bundle stream" } dd { @if s.connected { (layout::badge("ok", "connected")) } @else { (layout::badge("muted", "not connected")) } }
                        dt { "Flow entries" } dd { (health.map_or(0, |h| h.flows)) }
                        dt { "Enrolled" } dd { @match rec.enrolled_at { Some(t) => (layout::utc(t)), None => span.empty { "not yet" } } }
                        dt { "Certificate expires" } dd { @match rec.cert_expires_at { Some(t) => (layout::utc(t)), None => span.empty { "—" } } }
                    }
                }
                section.panel aria-labelledby="al-h" {
                    h2 #al-h { "Alarms" }
                    @if s.alarms.is_empty() { p.empty { "No alarms." } }
                    @else { ul.alarms { @for a in &s.alarms { li.critical[a.severity == Severity::Critical] { (a.text) } } } }
                    @if let Some(h) = health.filter(|h| !h.problems.is_empty()) {
                        h3 { "Problems the agent reports" }
                        ul { @for p in &h.problems { li { (p) } } }
                    }
                }
            }
            (super::updates::image_block(image, progress, now))
            section aria-labelledby="ports-h" {
                h2 #ports-h { "Ports" }
                @match health.filter(|h| !h.ports.is_empty()) {
                    None => p.empty { "The agent has not reported its ports yet." },
                    Some(h) => div.table-wrap { table {
                        thead { tr { th scope="col" { "Port" } th scope="col" { "Role" } th scope="col" { "XDP" } th scope="col" { "Boundary" } } }
                        tbody { @for p in &h.ports { tr {
                            th scope="row" { code { (p.name) } }
                            td { (p.role) }
                            td { (p.xdp_mode) }
                            td { @if p.attached { (layout::badge("ok", "attached")) } @else { (layout::badge("bad", "NOT attached")) } }
                        } } }
                    } },
                }
            }
            section aria-labelledby="traffic-h" {
                h2 #traffic-h { "Traffic, last " (super::dashboard::CHART_MINUTES) " minutes" }
                (rate_charts("one", &r))
            }
            section aria-labelledby="drops-h" {
                h2 #drops-h { "Recent drops" }
                @match health.filter(|h| !h.recent_drops.is_empty()) {
                    None => p.empty { "No drop reported recently." },
                    Some(h) => div.table-wrap { table {
                        thead { tr { th scope="col" { "When" } th scope="col" { "Port" } th scope="col" { "Cause" } th scope="col" { "Packet" } } }
                        tbody { @for d in h.recent_drops.iter().rev() { tr {
                            td { (layout::when(now, d.at)) }
                            td { code { (d.port) } }
                            td { (d.cause) " " span.hint { "(" (super::dashboard::reason_label(&d.reason)) ")" } }
                            td.mono {
                                (d.src.as_deref().unwrap_or("?")) " → " (d.dst.as_deref().unwrap_or("?"))
                                @if d.proto != 0 { " " (proto_name(d.proto)) }
                                @if d.dport != 0 { " port " (d.dport) }
                            }
                        } } }
                    } },
                }
            }
            section aria-labelledby="wg-h" {
                h2 #wg-h { "WireGuard" }
                p { "Public key: "
                    @match report.as_ref().and_then(|(r, _)| r.wireguard_public_key.as_deref()) {
                        Some(k) => code.mono #wg-key { (k) },
                        None => span.empty { "not reported yet" },
                    }
                }
                @match health.filter(|h| !h.tunnels.is_empty()) {
                    None => p.empty { "No tunnel is configured." },
                    Some(h) => div.table-wrap { table {
                        thead { tr { th scope="col" { "Service" } th scope="col" { "Last handshake" } th.num scope="col" { "Received" } th.num scope="col" { "Sent" } } }
                        tbody { @for t in &h.tunnels { tr {
                            th scope="row" { (t.service) }
                            td { @match t.handshake_age_secs { Some(a) => { (layout::span(a)) " ago" }, None => span.empty { "never" } } }
                            td.num { (bytes(t.rx_bytes)) }
                            td.num { (bytes(t.tx_bytes)) }
                        } } }
                    } },
                }
            }
        }
    })
}

/// A protocol number as its name.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        other => format!("proto {other}"),
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

fn bundle_section(st: &AppState, id: &str, now: u64) -> Markup {
    let b = st.policies.stored_bundle(id).ok().flatten();
    let opened = b.as_ref().and_then(|b| b.verify(&st.policies.verifying_key(), id, None).ok());
    html! {
        section aria-labelledby="bundle-h" {
            h2 #bundle-h { "Bundle it should enforce" }
            @match opened {
                None => p.empty { "No bundle yet (everything is dropped)." },
                Some(b) => {
                    p { "Bundle " strong { (b.version) } " from policy version "
                        a href={ "/policy/versions/" (b.policy_version) } { (b.policy_version) }
                        ", signed " (layout::when(now, b.issued_at)) ", " (b.entries.len()) " flow entries." }
                    @if !b.entries.is_empty() {
                        div.table-wrap { table {
                            thead { tr { th scope="col" { "Flow" } th scope="col" { "Rule" } th scope="col" { "Replies" } th scope="col" { "Until" } } }
                            tbody { @for e in b.entries.iter().take(200) { tr {
                                td.mono { (e.flow.to_string()) }
                                td { (e.rule_id) }
                                td { @if e.allow_reply { "yes" } @else { "no" } }
                                td { @match e.expires_unix { Some(t) => (layout::utc(t)), None => "standing (infrastructure)" } }
                            } } }
                        } }
                        @if b.entries.len() > 200 { p.hint { "The first 200 of " (b.entries.len()) " entries." } }
                    }
                }
            }
        }
    }
}

/// `GET /appliances/{id}`.
pub async fn page(State(st): St, v: Viewer, Path(id): Path<String>) -> Page {
    v.require(Action::ReadAppliances)?;
    let now = st.now();
    let live = live_body(&st, &id, now)?;
    let rec = record(&st, &id)?;
    Ok(layout::page(
        &v,
        Nav::Dashboard,
        &format!("Appliance {id}"),
        html! {
            p { a href="/" { "← Dashboard" } }
            h1 { "Appliance " code { (id) } }
            (live)
            (bundle_section(&st, &id, now))
            @if v.may(Action::ManageAppliances) && rec.state != ApplianceState::Revoked {
                section.panel aria-labelledby="revoke-h" {
                    h2 #revoke-h { "Revoke" }
                    p { "Revoking refuses this appliance's certificate at once and ends its bundle stream. "
                        "The appliance keeps enforcing its last bundle; nothing opens. It needs a new enrollment to return." }
                    form.stack method="post" action={ "/appliances/" (id) "/revoke" } {
                        input type="hidden" name="csrf" value=(v.csrf);
                        label { input type="checkbox" name="confirm" value="yes" required; " I want to revoke " (id) }
                        div.actions { button.danger type="submit" { "Revoke " (id) } }
                    }
                }
            }
        },
    ))
}

/// `GET /ui/live/appliances/{id}`.
pub async fn live(State(st): St, v: Viewer, Path(id): Path<String>) -> Page {
    v.require(Action::ReadAppliances)?;
    live_body(&st, &id, st.now())
}

/// The revoke form.
#[derive(Debug, Deserialize)]
pub struct RevokeForm {
    csrf: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /appliances/{id}/revoke`.
pub async fn revoke(
    State(st): St,
    v: Viewer,
    Path(id): Path<String>,
    Form(f): Form<RevokeForm>,
) -> Result<Response, PageErr> {
    v.check_csrf(&f.csrf)?;
    v.require(Action::ManageAppliances)?;
    if f.confirm != "yes" {
        return Err(PageErr::BadRequest("Tick the confirmation to revoke.".into()));
    }
    crate::api::revoke(&st, &id, &v.subject.user)?;
    Ok(Redirect::to(&format!("/appliances/{id}")).into_response())
}
