//! The dashboard: every appliance's state, the alarms, and live packet
//! rates as charts; searchable and paged so it stays usable at thousands of
//! appliances.

use axum::extract::{Query, State};
use maud::{html, Markup};
use serde::Deserialize;

use airlock_proto::admin::ApplianceState;

use crate::{
    auth::Action,
    state::AppState,
    telemetry::Rates,
    ui::{
        charts::{self, Line},
        layout::{self, Nav},
        url_encode,
        view::{Severity, Status},
        Page, St, Viewer,
    },
};

/// Appliances per page.
pub const PAGE_SIZE: usize = 50;
/// Chart window and resolution.
pub const CHART_MINUTES: u64 = 15;
const CHART_STEP: u64 = 10;

/// `?q=&page=`.
#[derive(Debug, Deserialize, Default, Clone)]
pub struct DashQuery {
    /// Substring of the appliance id.
    #[serde(default)]
    pub q: String,
    /// 1-based page.
    #[serde(default)]
    pub page: Option<usize>,
    /// Only appliances with alarms.
    #[serde(default)]
    pub alarms: Option<String>,
}

impl DashQuery {
    fn query_string(&self, page: usize) -> String {
        let mut s = format!("?page={page}");
        if !self.q.is_empty() {
            s.push_str(&format!("&q={}", url_encode(&self.q)));
        }
        if self.alarms.is_some() {
            s.push_str("&alarms=1");
        }
        s
    }
}

/// A counter's name for people.
pub fn reason_label(name: &str) -> String {
    match name {
        "pass_flow" => "allowed flows".into(),
        "pass_reply" => "replies".into(),
        "pass_arp" => "ARP".into(),
        "pass_nd" => "neighbour discovery".into(),
        "drop_no_flow" => "default deny".into(),
        "drop_expired" => "expired rule".into(),
        other => other.strip_prefix("drop_").unwrap_or(other).replace('_', " "),
    }
}

/// The two charts: passes, and drops by reason (the five largest, the rest summed).
pub fn rate_charts(id: &str, r: &Rates) -> Markup {
    let passes: Vec<Line> = ["pass_flow", "pass_reply"]
        .iter()
        .filter_map(|n| r.lines.get(*n).map(|v| Line { label: reason_label(n), values: v.clone() }))
        .collect();
    let peak = |v: &Vec<Option<f64>>| v.iter().flatten().fold(0.0f64, |a, b| a.max(*b));
    let mut drops: Vec<(&String, &Vec<Option<f64>>)> =
        r.lines.iter().filter(|(n, _)| n.starts_with("drop_")).collect();
    drops.sort_by(|a, b| peak(b.1).total_cmp(&peak(a.1)).then(a.0.cmp(b.0)));
    let mut lines: Vec<Line> = drops
        .iter()
        .take(5)
        .map(|(n, v)| Line { label: reason_label(n), values: (*v).clone() })
        .collect();
    if drops.len() > 5 {
        let rest: Vec<&str> = drops[5..].iter().map(|(n, _)| n.as_str()).collect();
        lines.push(Line { label: "other".into(), values: r.sum_where(|n| rest.contains(&n)) });
    }
    html! {
        div.grid {
            div.panel { (charts::chart(&format!("{id}-pass"), "Packets passed per second", "pkt/s", CHART_MINUTES, &passes)) }
            div.panel { (charts::chart(&format!("{id}-drop"), "Packets dropped per second, by reason", "pkt/s", CHART_MINUTES, &lines)) }
        }
    }
}

/// The chart data for `ids` (all when `None`).
pub fn rates(st: &AppState, ids: Option<&[&str]>, now: u64) -> Rates {
    st.telemetry.rates(ids, now, CHART_STEP, (CHART_MINUTES * 60 / CHART_STEP) as usize)
}

fn state_badge(s: &Status) -> Markup {
    match s.state {
        ApplianceState::Pending => layout::badge("muted", "pending enrollment"),
        ApplianceState::Revoked => layout::badge("bad", "revoked"),
        ApplianceState::Enrolled => layout::badge("ok", "enrolled"),
    }
}

/// The enforcing cell.
pub fn enforcing_badge(s: &Status) -> Markup {
    match (s.state, s.enforcing) {
        (ApplianceState::Enrolled, Some(true)) => layout::badge("ok", "enforcing"),
        (ApplianceState::Enrolled, Some(false)) => layout::badge("bad", "NOT enforcing"),
        (ApplianceState::Enrolled, None) => layout::badge("warn", "no report"),
        _ => html! { span.empty { "—" } },
    }
}

/// The policy cell: applied versus desired.
pub fn policy_cell(s: &Status) -> Markup {
    html! {
        @match (s.applied, s.desired) {
            (_, None) => span.empty { "—" },
            (Some(a), Some(d)) if a >= d => {
                (layout::badge("ok", "up to date")) " "
                span.hint { "policy v" (s.policy_version.unwrap_or(0)) ", bundle " (a) }
            },
            (a, Some(d)) => {
                (layout::badge("warn", "behind")) " "
                span.hint { "bundle " (a.map_or("none".into(), |a| a.to_string())) " of " (d) }
            },
        }
    }
}

fn body(st: &AppState, q: &DashQuery, now: u64) -> Page {
    let all = super::all(st, now)?;
    let enrolled: Vec<&Status> =
        all.iter().filter(|s| s.state == ApplianceState::Enrolled).collect();
    let enforcing = enrolled.iter().filter(|s| s.enforcing == Some(true)).count();
    let behind = enrolled.iter().filter(|s| !s.converged()).count();
    let critical =
        all.iter().filter(|s| s.alarms.iter().any(|a| a.severity == Severity::Critical)).count();
    let with_alarms = all.iter().filter(|s| !s.alarms.is_empty()).count();
    let needle = q.q.trim().to_ascii_lowercase();
    let matching: Vec<&Status> = all
        .iter()
        .filter(|s| needle.is_empty() || s.id.contains(&needle))
        .filter(|s| q.alarms.is_none() || !s.alarms.is_empty())
        .collect();
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let shown = &matching[(page - 1) * PAGE_SIZE..matching.len().min(page * PAGE_SIZE)];
    let alarm_rows: Vec<(&str, &crate::ui::view::Alarm)> =
        all.iter().flat_map(|s| s.alarms.iter().map(move |a| (s.id.as_str(), a))).collect();
    let mut alarm_rows = alarm_rows;
    alarm_rows.sort_by_key(|(_, a)| a.severity);
    let r = rates(st, None, now);
    Ok(html! {
        div #dashboard data-live={ "/ui/live/dashboard" (q.query_string(page)) } {
            div.cards {
                div.card { span.n { (all.len()) } span.l { "appliances" } }
                div.card.bad[enforcing < enrolled.len()] { span.n { (enforcing) " / " (enrolled.len()) } span.l { "enrolled and enforcing" } }
                div.card.warn[behind > 0] { span.n { (behind) } span.l { "behind their policy" } }
                div.card.bad[critical > 0] { span.n { (with_alarms) } span.l { "with alarms (" (critical) " critical)" } }
            }
            section.panel aria-labelledby="alarms-h" {
                h2 #alarms-h { "Alarms" }
                @if alarm_rows.is_empty() {
                    p.empty { "No alarms." }
                } @else {
                    ul.alarms {
                        @for (id, a) in alarm_rows.iter().take(20) {
                            li.critical[a.severity == Severity::Critical] {
                                strong { @if a.severity == Severity::Critical { "Critical: " } @else { "Warning: " } }
                                a href={ "/appliances/" (id) } { (id) } " — " (a.text)
                            }
                        }
                    }
                    @if alarm_rows.len() > 20 {
                        p { (alarm_rows.len() - 20) " more. " a href="/?alarms=1" { "Show the appliances with alarms" } }
                    }
                }
            }
            section aria-labelledby="traffic-h" {
                h2 #traffic-h { "Traffic at the boundary, last " (CHART_MINUTES) " minutes" }
                (rate_charts("all", &r))
            }
            section aria-labelledby="appl-h" {
                h2 #appl-h { "Appliances" }
                p.hint { (matching.len()) " of " (all.len()) " shown"
                    @if pages > 1 { ", page " (page) " of " (pages) } "." }
                div.table-wrap {
                    table {
                        thead { tr {
                            th scope="col" { "Appliance" } th scope="col" { "State" } th scope="col" { "Boundary" }
                            th scope="col" { "Policy" } th scope="col" { "Last seen" } th scope="col" { "Tunnels" } th scope="col" { "Alarms" }
                        } }
                        tbody {
                            @for s in shown {
                                tr {
                                    th scope="row" { a href={ "/appliances/" (s.id) } { (s.id) } }
                                    td { (state_badge(s)) }
                                    td { (enforcing_badge(s)) }
                                    td { (policy_cell(s)) }
                                    td { @match s.last_seen { Some(t) => (layout::when(now, t)), None => span.empty { "never" } } }
                                    td { @if s.tunnels.1 == 0 { span.empty { "none" } } @else { (s.tunnels.0) " of " (s.tunnels.1) " up" } }
                                    td { @if s.alarms.is_empty() { span.empty { "none" } } @else { (layout::badge(if s.alarms[0].severity == Severity::Critical { "bad" } else { "warn" }, &s.alarms.len().to_string())) } }
                                }
                            }
                            @if shown.is_empty() {
                                tr { td colspan="7" { span.empty { @if all.is_empty() { "No appliances yet. " a href="/appliances/new" { "Enroll the first one." } } @else { "No appliance matches." } } } }
                            }
                        }
                    }
                }
                @if pages > 1 {
                    nav.pager aria-label="Pages" {
                        @if page > 1 { a href={ "/" (q.query_string(page - 1)) } rel="prev" { "← Previous" } }
                        span { "Page " (page) " of " (pages) }
                        @if page < pages { a href={ "/" (q.query_string(page + 1)) } rel="next" { "Next →" } }
                    }
                }
            }
        }
    })
}

/// `GET /`.
pub async fn page(State(st): St, v: Viewer, Query(q): Query<DashQuery>) -> Page {
    v.require(Action::ReadAppliances)?;
    let now = st.now();
    let inner = body(&st, &q, now)?;
    Ok(layout::page(
        &v,
        Nav::Dashboard,
        "Dashboard",
        html! {
            h1 { "Dashboard" }
            form.search method="get" action="/" role="search" {
                div {
                    label for="q" { "Find an appliance" }
                    input #q type="search" name="q" value=(q.q) placeholder="appliance id";
                }
                div {
                    label { input type="checkbox" name="alarms" value="1" checked[q.alarms.is_some()]; " only with alarms" }
                }
                button type="submit" { "Search" }
                @if !q.q.is_empty() || q.alarms.is_some() { a href="/" { "Clear" } }
            }
            (inner)
        },
    ))
}

/// `GET /ui/live/dashboard`: the live region alone.
pub async fn live(State(st): St, v: Viewer, Query(q): Query<DashQuery>) -> Page {
    v.require(Action::ReadAppliances)?;
    body(&st, &q, st.now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_words() {
        assert_eq!(reason_label("drop_no_flow"), "default deny");
        assert_eq!(reason_label("drop_ipv4_options"), "ipv4 options");
        assert_eq!(reason_label("pass_flow"), "allowed flows");
    }

    #[test]
    fn paging_links_keep_the_search() {
        let q = DashQuery { q: "ward 7".into(), page: Some(2), alarms: Some("1".into()) };
        assert_eq!(q.query_string(3), "?page=3&q=ward%207&alarms=1");
    }
}
