//! Appliance image updates, read-only: the uploaded releases, the rollout in
//! force and each enrolled appliance's image and progress (from its last
//! report); and the "Image" block of the appliance page. Uploads and the
//! rollout are changed through the API (`airlockctl release …`).

use axum::extract::State;
use maud::{html, Markup};

use airlock_proto::{admin::RolloutProgress, release::ReleaseState};

use crate::{
    auth::Action,
    ui::{
        layout::{self, Nav},
        Page, St, Viewer,
    },
};

/// A rollout stage for people, with its badge class.
pub fn progress_badge(p: RolloutProgress) -> Markup {
    let (class, text) = match p {
        RolloutProgress::NotTargeted => ("muted", "not in the rollout"),
        RolloutProgress::NoImage => ("muted", "no image reported"),
        RolloutProgress::Done => ("ok", "done"),
        RolloutProgress::Offered => ("warn", "offered"),
        RolloutProgress::Installing => ("warn", "installing"),
        RolloutProgress::Pending => ("warn", "installed, waiting for reboot"),
        RolloutProgress::FailedTrial => ("bad", "FAILED trial boot"),
    };
    layout::badge(class, text)
}

fn opt(v: Option<u64>) -> Markup {
    html! { @match v { Some(v) => (v), None => span.empty { "—" } } }
}

fn size(n: u64) -> String {
    match n {
        0..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

/// The "Image" block of an appliance page.
pub fn image_block(image: Option<&ReleaseState>, progress: RolloutProgress, now: u64) -> Markup {
    html! {
        section.panel aria-labelledby="image-h" {
            h2 #image-h { "Image" }
            @match image {
                None => p.empty { "No A/B image reported (no report yet, or an agent outside the appliance image)." },
                Some(i) => dl.facts {
                    dt { "Release" } dd { (i.release) }
                    dt { "Slot" } dd { (i.slot) }
                    dt { "On trial" } dd { @if i.on_trial { (layout::badge("warn", "on trial")) } @else { "no" } }
                    dt { "Pending" } dd { (opt(i.pending)) }
                    dt { "In progress" } dd { (opt(i.in_progress)) }
                    dt { "Failed trials" } dd {
                        @if i.failed_trials.is_empty() { span.empty { "none" } }
                        @else { (i.failed_trials.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")) }
                    }
                    dt { "Last failure" } dd {
                        @match &i.last_failure {
                            None => span.empty { "none" },
                            Some(f) => { "release " (f.release) ", " (layout::when(now, f.at)) ": " (f.reason) },
                        }
                    }
                    dt { "Rollout" } dd { (progress_badge(progress)) }
                }
            }
        }
    }
}

/// `GET /updates`.
pub async fn page(State(st): St, v: Viewer) -> Page {
    v.require(Action::ReadReleases)?;
    let now = st.now();
    let o = crate::api::releases_overview(&st);
    Ok(layout::page(
        &v,
        Nav::Updates,
        "Image updates",
        html! {
            h1 { "Image updates" }
            p.hint { "Appliances offered a release install it on their inactive slot and boot it on trial at their next reboot. "
                "Upload bundles and start or stop the rollout with " code { "airlockctl release" } "." }
            @if !o.uploads_enabled {
                p { (layout::badge("muted", "uploads off")) " The controller has no " code { "update_key" } " configured." }
            }
            section aria-labelledby="rollout-h" {
                h2 #rollout-h { "Rollout" }
                @match &o.rollout {
                    None => p.empty { "No rollout: no release is offered." },
                    Some(r) => p {
                        "Release " strong { (r.release) } " is offered to "
                        @match &r.appliances {
                            None => "every enrolled appliance",
                            Some(l) => { @for (i, a) in l.iter().enumerate() {
                                @if i > 0 { ", " }
                                a href={ "/appliances/" (a) } { code { (a) } }
                            } },
                        }
                        "; started by " (r.started_by) " " (layout::when(now, r.started_at)) "."
                    },
                }
            }
            section aria-labelledby="rel-h" {
                h2 #rel-h { "Releases" }
                @if o.releases.is_empty() { p.empty { "No release uploaded yet." } }
                @else { div.table-wrap { table {
                    thead { tr { th scope="col" { "Release" } th scope="col" { "Image version" } th.num scope="col" { "Size" } th scope="col" { "SHA-256" } th scope="col" { "Uploaded" } } }
                    tbody { @for r in &o.releases { tr {
                        th scope="row" { (r.release) }
                        td { (r.image_version) }
                        td.num { (size(r.size)) }
                        td.mono { (r.sha256.chars().take(16).collect::<String>()) "…" }
                        td { (layout::when(now, r.uploaded_at)) " by " (r.uploaded_by) }
                    } } }
                } } }
            }
            section aria-labelledby="app-h" {
                h2 #app-h { "Appliances" }
                @if o.appliances.is_empty() { p.empty { "No enrolled appliance." } }
                @else { div.table-wrap { table {
                    thead { tr {
                        th scope="col" { "Appliance" } th scope="col" { "Release" } th scope="col" { "Slot" }
                        th scope="col" { "On trial" } th scope="col" { "Pending" } th scope="col" { "In progress" }
                        th scope="col" { "Failed trials" } th scope="col" { "Progress" } th scope="col" { "Last failure" }
                    } }
                    tbody { @for a in &o.appliances { tr {
                        th scope="row" { a href={ "/appliances/" (a.appliance) } { code { (a.appliance) } } }
                        @match &a.image {
                            None => { td colspan="6" { span.empty { "no image reported" } } },
                            Some(i) => {
                                td { (i.release) }
                                td { (i.slot) }
                                td { @if i.on_trial { "yes" } @else { "no" } }
                                td { (opt(i.pending)) }
                                td { (opt(i.in_progress)) }
                                td { @if i.failed_trials.is_empty() { span.empty { "—" } } @else { (i.failed_trials.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")) } }
                            },
                        }
                        td { (progress_badge(a.progress)) }
                        td { @match a.image.as_ref().and_then(|i| i.last_failure.as_ref()) {
                            None => span.empty { "—" },
                            Some(f) => { "release " (f.release) ", " (layout::when(now, f.at)) ": " (f.reason) },
                        } }
                    } } }
                } } }
            }
        },
    ))
}
