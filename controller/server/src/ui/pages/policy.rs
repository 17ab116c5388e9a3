//! The policy: the current version, the editor (every problem shown next to
//! its line, nothing applied), the dry-run diff per appliance, apply, the
//! version history with who/when/why, rollback, and convergence.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
    Form,
};
use maud::{html, Markup};
use serde::Deserialize;

use airlock_proto::admin::{
    ApplianceState, PolicyDiff, PolicyFormat, PolicyProblem, PolicyUpload, PolicyVersion,
};

use crate::{
    auth::Action,
    policy::PolicyError,
    state::AppState,
    ui::{
        layout::{self, Nav},
        Page, PageErr, St, Viewer,
    },
};

/// What the editor starts from when there is no policy yet.
const STARTER: &str = r#"# The first policy. Every flow not listed here is dropped.
version = 1
description = "Describe this policy"

[[site]]
name = "main-campus"

[[appliance]]
name = "appliance-1"
site = "main-campus"
ports = { patient = ["patient0"], uplink = ["uplink0"] }
"#;

fn format_name(f: PolicyFormat) -> &'static str {
    match f {
        PolicyFormat::Toml => "toml",
        PolicyFormat::Json => "json",
    }
}

/// The text with numbered lines and each problem right under its line.
pub fn listing(text: &str, problems: &[PolicyProblem]) -> Markup {
    html! {
        div.listing {
            ol aria-label="Policy text by line" {
                @for (i, line) in text.lines().enumerate() {
                    @let n = i + 1;
                    @let here: Vec<&PolicyProblem> = problems.iter().filter(|p| p.line == Some(n)).collect();
                    li #{ "L" (n) } .bad[!here.is_empty()] {
                        span.ln aria-hidden="true" { (n) }
                        code { (line) }
                    }
                    @for p in here {
                        li.problem {
                            span.ln aria-hidden="true" { "▲" }
                            span { strong { "Line " (n) @if let Some(c) = p.column { ", column " (c) } ": " } (p.message)
                                " " span.hint { "(" (p.path) ")" }
                                @if let Some(h) = &p.hint { br; "Hint: " (h) } }
                        }
                    }
                }
            }
        }
    }
}

fn problem_summary(problems: &[PolicyProblem]) -> Markup {
    html! {
        div #problems.notice.bad role="alert" {
            p { strong { (problems.len()) " problem" @if problems.len() != 1 { "s" } " — nothing was applied." } }
            ul {
                @for p in problems {
                    li {
                        @match p.line {
                            Some(n) => a href={ "#L" (n) } data-line=(n) { "Line " (n) @if let Some(c) = p.column { ", column " (c) } },
                            None => span { (p.path) },
                        }
                        ": " (p.message)
                        @if let Some(h) = &p.hint { " — " span.hint { (h) } }
                    }
                }
            }
        }
    }
}

/// A policy text on its way to being applied.
pub struct Draft<'a> {
    /// The text.
    pub text: &'a str,
    /// Its form.
    pub format: PolicyFormat,
    /// Why.
    pub comment: &'a str,
    /// The version it was written against.
    pub base: Option<u32>,
}

fn editor(v: &Viewer, d: &Draft<'_>, problems: &[PolicyProblem], notice: Option<Markup>) -> Markup {
    layout::page(
        v,
        Nav::Policy,
        "Edit the policy",
        html! {
            h1 { "Edit the policy" }
            @if let Some(n) = notice { (n) }
            @if !problems.is_empty() { (problem_summary(problems)) }
            form.stack.wide method="post" action="/policy/preview" {
                input type="hidden" name="csrf" value=(v.csrf);
                input type="hidden" name="format" value=(format_name(d.format));
                input type="hidden" name="base" value=(d.base.map_or(String::new(), |b| b.to_string()));
                div {
                    label for="policy-text" { "Policy (" (format_name(d.format).to_uppercase()) ")" }
                    textarea #policy-text name="text" spellcheck="false" autocapitalize="off" required
                        aria-invalid=[(!problems.is_empty()).then_some("true")]
                        aria-describedby=[(!problems.is_empty()).then_some("problems")] { (d.text) }
                }
                div {
                    label for="comment" { "Why " span.hint { "(kept in the history; needed to apply)" } }
                    input #comment type="text" name="comment" value=(d.comment) maxlength="500";
                }
                div.actions {
                    button type="submit" { "Check and preview the change" }
                    a href="/policy" { "Cancel" }
                }
                p.hint { "Nothing is applied until you confirm on the next page." }
            }
            @if !problems.is_empty() {
                h2 { "Your text with the problems marked" }
                (listing(d.text, problems))
            }
        },
    )
}

/// The diff, per appliance.
pub fn diff_view(diff: &PolicyDiff) -> Markup {
    let opens: usize = diff.appliances.iter().map(|a| a.opens.len()).sum();
    let closes: usize = diff.appliances.iter().map(|a| a.closes.len()).sum();
    let changes: usize = diff.appliances.iter().map(|a| a.changes.len()).sum();
    html! {
        div.diff #diff {
            p { "Compared with " @match diff.from_version { Some(v) => { "version " (v) }, None => "no policy (everything dropped)" }
                ": " strong.open { (opens) " open" } ", " strong.close { (closes) " close" } ", " strong.change { (changes) " change" }
                " on " (diff.appliances.len()) " appliance" @if diff.appliances.len() != 1 { "s" } "." }
            @for a in &diff.appliances {
                section.panel {
                    h3 { "Appliance " code { (a.appliance) } }
                    @if a.opens.is_empty() && a.closes.is_empty() && a.changes.is_empty() { p.empty { "No change." } }
                    @if !a.opens.is_empty() { p { "Opens:" } ul { @for f in &a.opens { li.open { "+ " (f) } } } }
                    @if !a.closes.is_empty() { p { "Closes:" } ul { @for f in &a.closes { li.close { "− " (f) } } } }
                    @if !a.changes.is_empty() { p { "Changes:" } ul { @for f in &a.changes { li.change { "~ " (f) } } } }
                }
            }
        }
    }
}

fn preview_page(
    v: &Viewer,
    d: &Draft<'_>,
    diff: &PolicyDiff,
    comment_error: Option<&str>,
    notice: Option<Markup>,
) -> Markup {
    layout::page(
        v,
        Nav::Policy,
        "Review the change",
        html! {
            h1 { "Review the change to version " (diff.to_version) }
            @if let Some(n) = notice { (n) }
            p.notice.ok role="status" { "The policy is valid. Nothing is applied yet: review what opens and closes." }
            (diff_view(diff))
            form.stack method="post" action="/policy/apply" {
                input type="hidden" name="csrf" value=(v.csrf);
                input type="hidden" name="format" value=(format_name(d.format));
                input type="hidden" name="base" value=(d.base.map_or(String::new(), |b| b.to_string()));
                input type="hidden" name="text" value=(d.text);
                div {
                    label for="comment" { "Why" }
                    input #comment type="text" name="comment" value=(d.comment) required maxlength="500"
                        aria-invalid=[comment_error.map(|_| "true")] aria-describedby="comment-err";
                    @if let Some(e) = comment_error { div #comment-err.field-error role="alert" { (e) } }
                }
                div.actions {
                    button type="submit" { "Apply version " (diff.to_version) }
                    button.secondary type="submit" formaction="/policy/preview" formnovalidate name="back" value="1" { "Back to the editor" }
                }
            }
        },
    )
}

/// `GET /policy`.
pub async fn current(State(st): St, v: Viewer) -> Page {
    v.require(Action::ReadPolicy)?;
    let now = st.now();
    let cur = st.policies.current()?;
    Ok(layout::page(
        &v,
        Nav::Policy,
        "Policy",
        html! {
            h1 { "Policy" }
            @match &cur {
                None => {
                    p.notice.warn { "No policy has been applied: every appliance drops everything." }
                    @if v.may(Action::WritePolicy) { p { a.button href="/policy/edit" { "Write the first policy" } } }
                }
                Some(p) => {
                    (version_facts(p, now))
                    @if v.may(Action::WritePolicy) { p.actions { a.button href="/policy/edit" { "Edit" } a href="/policy/versions" { "History" } } }
                    (convergence(&st, p.version, now)?)
                    h2 { "Text" }
                    (listing(&p.text, &[]))
                }
            }
        },
    ))
}

fn version_facts(p: &PolicyVersion, now: u64) -> Markup {
    html! {
        dl.facts.panel {
            dt { "Version" } dd { strong { (p.version) } }
            dt { "By" } dd { (p.author) }
            dt { "When" } dd { (layout::utc(p.created_at)) " (" (layout::ago(now, p.created_at)) ")" }
            dt { "Why" } dd { @if p.comment.is_empty() { span.empty { "no comment" } } @else { (p.comment) } }
            @if let Some(r) = p.rollback_of { dt { "Rollback of" } dd { a href={ "/policy/versions/" (r) } { "version " (r) } } }
        }
    }
}

/// Which enrolled appliances enforce `version` (live region).
fn convergence(st: &AppState, version: u32, now: u64) -> Page {
    let recs = st.appliances.list().map_err(PageErr::from)?;
    let enrolled: Vec<_> = recs
        .iter()
        .filter(|r| r.state == ApplianceState::Enrolled)
        .map(|r| super::status_of(st, r, now))
        .collect();
    let on = enrolled.iter().filter(|s| s.policy_version == Some(version) && s.converged()).count();
    let is_current = st.policies.current_version()? == Some(version);
    Ok(html! {
        section #convergence.panel data-live={ "/ui/live/convergence/" (version) } data-every="2" aria-labelledby="conv-h" {
            h2 #conv-h { "Appliances on version " (version) }
            @if !is_current {
                p.empty { "This is not the current version." }
            } @else if enrolled.is_empty() {
                p.empty { "No enrolled appliance yet." }
            } @else {
                p { strong { (on) " of " (enrolled.len()) } " enrolled appliances enforce it." }
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Appliance" } th scope="col" { "Policy version enforced" } th scope="col" { "State" } } }
                    tbody { @for s in enrolled.iter().take(100) { tr {
                        th scope="row" { a href={ "/appliances/" (s.id) } { (s.id) } }
                        td { @match s.policy_version { Some(p) => (p), None => span.empty { "none" } } }
                        td { @if s.policy_version == Some(version) && s.converged() { (layout::badge("ok", "converged")) }
                             @else { (layout::badge("warn", "pending")) } }
                    } } }
                } }
                @if enrolled.len() > 100 { p.hint { "The first 100 of " (enrolled.len()) "; the dashboard lists all." } }
            }
        }
    })
}

/// `GET /ui/live/convergence/{v}`.
pub async fn convergence_live(State(st): St, v: Viewer, Path(version): Path<u32>) -> Page {
    v.require(Action::ReadPolicy)?;
    convergence(&st, version, st.now())
}

/// `GET /policy/edit`.
pub async fn edit(State(st): St, v: Viewer) -> Page {
    v.require(Action::WritePolicy)?;
    let cur = st.policies.current()?;
    let d = match &cur {
        Some(p) => Draft { text: &p.text, format: p.format, comment: "", base: Some(p.version) },
        None => Draft { text: STARTER, format: PolicyFormat::Toml, comment: "", base: None },
    };
    Ok(editor(&v, &d, &[], None))
}

/// The editor's and the preview's form.
#[derive(Debug, Deserialize)]
pub struct DraftForm {
    csrf: String,
    text: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    base: String,
    #[serde(default)]
    back: Option<String>,
}

impl DraftForm {
    /// The draft, once the form's token and the viewer's role are checked.
    fn accepted(&self, v: &Viewer) -> Result<Draft<'_>, PageErr> {
        v.check_csrf(&self.csrf)?;
        v.require(Action::WritePolicy)?;
        self.draft()
    }

    fn draft(&self) -> Result<Draft<'_>, PageErr> {
        let format = match self.format.as_deref() {
            None | Some("toml") => PolicyFormat::Toml,
            Some("json") => PolicyFormat::Json,
            Some(_) => return Err(PageErr::BadRequest("Unknown policy format.".into())),
        };
        let base = match self.base.trim() {
            "" => None,
            b => Some(b.parse().map_err(|_| PageErr::BadRequest("Bad base version.".into()))?),
        };
        Ok(Draft { text: &self.text, format, comment: self.comment.trim(), base })
    }
}

fn upload(d: &Draft<'_>) -> PolicyUpload {
    PolicyUpload {
        text: d.text.replace("\r\n", "\n"),
        format: d.format,
        comment: d.comment.to_owned(),
    }
}

/// Checks a draft: the editor with its problems, or the preview (422 with
/// `comment_error` shown at the "why" field when that is what is missing).
pub fn check_and_preview(
    st: &AppState,
    v: &Viewer,
    d: &Draft<'_>,
    notice: Option<Markup>,
    comment_error: Option<&str>,
) -> Response {
    match st.policies.diff(&upload(d), st.now()) {
        Ok(diff) => {
            let status = if comment_error.is_some() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::OK
            };
            (status, preview_page(v, d, &diff, comment_error, notice)).into_response()
        }
        Err(PolicyError::Invalid(problems)) => {
            (StatusCode::UNPROCESSABLE_ENTITY, editor(v, d, &problems, notice)).into_response()
        }
        Err(e) => PageErr::from(e).into_response(),
    }
}

/// `POST /policy/preview`.
pub async fn preview(
    State(st): St,
    v: Viewer,
    Form(f): Form<DraftForm>,
) -> Result<Response, PageErr> {
    let d = f.accepted(&v)?;
    if f.back.is_some() {
        return Ok(editor(&v, &d, &[], None).into_response());
    }
    Ok(check_and_preview(&st, &v, &d, None, None))
}

/// `POST /policy/apply`.
pub async fn apply(
    State(st): St,
    v: Viewer,
    Form(f): Form<DraftForm>,
) -> Result<Response, PageErr> {
    let d = f.accepted(&v)?;
    if d.comment.is_empty() {
        return Ok(check_and_preview(&st, &v, &d, None, Some("Say why: the history keeps it.")));
    }
    match st.policies.apply_on(&upload(&d), &v.subject.user, d.base, &st.enrolled(), st.now()) {
        Ok((summary, bundles)) => {
            crate::api::publish_all(&st, bundles);
            tracing::info!(version = summary.version, by = %v.subject.user, "policy applied from the web UI");
            Ok(Redirect::to(&format!("/policy/versions/{}?applied=1", summary.version))
                .into_response())
        }
        Err(PolicyError::Conflict { current }) => {
            let d2 = Draft { base: current, ..d };
            let notice = html! { p.notice.warn role="alert" {
            "Someone applied version " (current.map_or("?".into(), |c| c.to_string()))
            " while you were reviewing. Nothing of yours was applied; here is your change compared with the new current version." } };
            Ok(check_and_preview(&st, &v, &d2, Some(notice), None))
        }
        Err(PolicyError::Invalid(problems)) => {
            Ok((StatusCode::UNPROCESSABLE_ENTITY, editor(&v, &d, &problems, None)).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// `GET /policy/versions`.
pub async fn history(State(st): St, v: Viewer) -> Page {
    v.require(Action::ReadPolicy)?;
    let now = st.now();
    let mut h = st.policies.history()?;
    h.sort_by_key(|s| std::cmp::Reverse(s.version));
    let current = st.policies.current_version()?;
    Ok(layout::page(
        &v,
        Nav::History,
        "Policy history",
        html! {
            h1 { "Policy history" }
            @if h.is_empty() { p.empty { "No version yet." } }
            @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Version" } th scope="col" { "By" } th scope="col" { "When" } th scope="col" { "Why" } } }
                    tbody { @for s in &h { tr {
                        th scope="row" { a href={ "/policy/versions/" (s.version) } { "Version " (s.version) }
                            @if Some(s.version) == current { " " (layout::badge("ok", "current")) } }
                        td { (s.author) }
                        td { (layout::when(now, s.created_at)) }
                        td { (s.comment) @if let Some(r) = s.rollback_of { " " span.hint { "(rollback to " (r) ")" } } }
                    } } }
                } }
            }
        },
    ))
}

/// `?applied=1` after an apply or rollback.
#[derive(Debug, Deserialize, Default)]
pub struct VersionQuery {
    applied: Option<String>,
}

/// `GET /policy/versions/{v}`.
pub async fn version(
    State(st): St,
    v: Viewer,
    Path(n): Path<u32>,
    Query(q): Query<VersionQuery>,
) -> Page {
    v.require(Action::ReadPolicy)?;
    let now = st.now();
    let p = st.policies.version(n)?;
    let current = st.policies.current_version()?;
    Ok(layout::page(
        &v,
        Nav::History,
        &format!("Policy version {n}"),
        html! {
            p { a href="/policy/versions" { "← History" } }
            h1 { "Policy version " (n) @if Some(n) == current { " " (layout::badge("ok", "current")) } }
            @if q.applied.is_some() {
                p.notice.ok role="status" { "Version " (n) " is applied. The appliances below pick it up within seconds." }
            }
            (version_facts(&p, now))
            (convergence(&st, n, now)?)
            @if Some(n) != current && v.may(Action::WritePolicy) {
                p.actions { a.button.secondary href={ "/policy/versions/" (n) "/rollback" } { "Review a rollback to version " (n) } }
            }
            h2 { "Text" }
            (listing(&p.text, &[]))
        },
    ))
}

/// `GET /policy/versions/{v}/rollback`: what a rollback would do, and the form.
pub async fn rollback_review(State(st): St, v: Viewer, Path(n): Path<u32>) -> Page {
    v.require(Action::WritePolicy)?;
    let now = st.now();
    let p = st.policies.version(n)?;
    let up = PolicyUpload { text: p.text.clone(), format: p.format, comment: String::new() };
    let diff = match st.policies.diff(&up, now) {
        Ok(d) => d,
        Err(PolicyError::Invalid(problems)) => {
            // A version valid when stored but not under today's rules.
            return Ok(layout::page(
                &v,
                Nav::History,
                &format!("Roll back to version {n}"),
                html! {
                    h1 { "Version " (n) " cannot be restored as it is" }
                    (problem_summary(&problems))
                    p { a href="/policy/edit" { "Edit the current policy instead" } }
                },
            ));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(layout::page(
        &v,
        Nav::History,
        &format!("Roll back to version {n}"),
        html! {
            p { a href={ "/policy/versions/" (n) } { "← Version " (n) } }
            h1 #rb-h { "Roll back to version " (n) }
            p { "A rollback stores the text of version " (n) " as a new version " (diff.to_version) ". It would do this:" }
            (diff_view(&diff))
            form.stack method="post" action="/policy/rollback" {
                input type="hidden" name="csrf" value=(v.csrf);
                input type="hidden" name="to_version" value=(n);
                div {
                    label for="rb-comment" { "Why" }
                    input #rb-comment type="text" name="comment" required maxlength="500";
                }
                div.actions { button type="submit" { "Roll back to version " (n) } }
            }
        },
    ))
}

/// The rollback form.
#[derive(Debug, Deserialize)]
pub struct RollbackForm {
    csrf: String,
    to_version: u32,
    #[serde(default)]
    comment: String,
}

/// `POST /policy/rollback`.
pub async fn rollback(
    State(st): St,
    v: Viewer,
    Form(f): Form<RollbackForm>,
) -> Result<Response, PageErr> {
    v.check_csrf(&f.csrf)?;
    v.require(Action::WritePolicy)?;
    let comment = f.comment.trim();
    if comment.is_empty() {
        return Err(PageErr::BadRequest("Say why you roll back: the history keeps it.".into()));
    }
    let (summary, bundles) =
        st.policies.rollback(f.to_version, comment, &v.subject.user, &st.enrolled(), st.now())?;
    crate::api::publish_all(&st, bundles);
    tracing::info!(version = summary.version, to = f.to_version, by = %v.subject.user, "policy rolled back from the web UI");
    Ok(Redirect::to(&format!("/policy/versions/{}?applied=1", summary.version)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_sit_under_their_line() {
        let text = "a = 1\nb = 2\nc = 3";
        let p = PolicyProblem {
            line: Some(2),
            column: Some(5),
            path: "b".into(),
            message: "b is <wrong>".into(),
            hint: Some("use 3".into()),
        };
        let html = listing(text, &[p]).into_string();
        let l2 = html.find("id=\"L2\"").unwrap();
        let prob = html.find("b is &lt;wrong&gt;").expect("escaped message");
        let l3 = html.find("id=\"L3\"").unwrap();
        assert!(l2 < prob && prob < l3, "the problem follows line 2: {html}");
        assert!(html.contains("Line 2, column 5"));
        assert!(html.contains("Hint: use 3"));
    }
}
