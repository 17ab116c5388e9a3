//! `airlockctl release …`: upload an appliance image update bundle, list
//! releases with each appliance's image, start and stop the rollout.
//!
//! The controller verifies every bundle (signature, manifest, checksums)
//! with its own update key; airlockctl only streams the file and renders
//! answers. Appliances install an offered release on their inactive slot;
//! nothing here reboots an appliance.

use std::io::{IsTerminal as _, Write as _};

use anyhow::Result;
use clap::Subcommand;

use airlock_proto::admin::{
    ReleaseView, ReleasesOverview, RolloutProgress, RolloutView, StartRollout,
};

use crate::{
    context::{api_client, Globals, Refusal},
    prompt, render,
};

/// The largest bundle the controller accepts.
const MAX_BUNDLE: u64 = 1 << 30;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Upload a signed update bundle (as `cargo xtask image update-bundle` writes it).
    ///
    /// The controller verifies its signature with its update key and the
    /// checksums of every image in it; a bundle that does not verify is
    /// refused (exit 2) and nothing is stored. Uploading the same bundle
    /// again changes nothing.
    Upload {
        /// The bundle file.
        file: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every release, the rollout, and each enrolled appliance's image and progress.
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Offer a release to every enrolled appliance, or to the ones named.
    ///
    /// Appliances that run an older release download it with their next
    /// report and install it on their inactive slot; an appliance where it
    /// failed its trial boot is not offered it again. Replaces the rollout in
    /// force. Asks for confirmation unless --yes.
    Rollout {
        /// The release number.
        release: u64,
        /// Only this appliance (repeatable); default: every enrolled appliance.
        #[arg(long = "appliance", value_name = "ID")]
        appliances: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Stop offering the rollout's release (installs under way finish).
    Stop,
}

pub async fn run(g: &Globals, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Upload { file, json } => upload(g, &file, json).await,
        Cmd::List { json } => list(g, json).await,
        Cmd::Rollout { release, appliances, yes } => rollout(g, release, appliances, yes).await,
        Cmd::Stop => stop(g).await,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `1.5 KiB`, `200.0 MiB`.
pub fn size(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

/// What is shown while uploading: on a terminal one line rewritten at every
/// percent, elsewhere a line at every quarter.
fn progress_printer(name: String) -> impl FnMut(u64, u64) + Send + Unpin + 'static {
    let tty = std::io::stderr().is_terminal();
    let mut shown = None;
    move |sent, total| {
        let pct = sent.saturating_mul(100).checked_div(total).unwrap_or(100);
        let step = if tty { pct } else { pct / 25 * 25 };
        if shown == Some(step) {
            return;
        }
        shown = Some(step);
        let line = format!("Uploading {name}: {pct:>3}% ({} of {})", size(sent), size(total));
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r{line}{}", if sent >= total { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

async fn upload(g: &Globals, file: &str, json: bool) -> Result<()> {
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|source| Refusal::File { path: file.to_owned(), source })?;
    let total =
        f.metadata().await.map_err(|source| Refusal::File { path: file.to_owned(), source })?.len();
    if total > MAX_BUNDLE {
        return Err(Refusal::BadInput(format!(
            "{file} is {}; the controller accepts bundles up to {}",
            size(total),
            size(MAX_BUNDLE)
        ))
        .into());
    }
    let client = api_client(g)?;
    // Before sending hundreds of MiB: can this controller take it at all?
    let o: ReleasesOverview = client.get("/api/v1/releases").await?;
    if !o.uploads_enabled {
        return Err(Refusal::Refused(
            "the controller has no image update key: set `update_key` in its configuration \
             to the image update public key file (image-signing.pub) and restart it"
                .into(),
        )
        .into());
    }
    let (status, v): (u16, ReleaseView) = client
        .upload("/api/v1/releases", f, total, progress_printer(file.to_owned()))
        .await
        .map_err(|e| match e.api() {
            Some((422, body)) => anyhow::Error::from(Refusal::Refused(format!(
                "{file}: {}; nothing was stored",
                body.message
            ))),
            _ => anyhow::Error::from(e),
        })?;
    if json {
        return print_json(&v);
    }
    let what = if status == 200 { "Already stored" } else { "Uploaded" };
    println!(
        "{what}: release {} ({}), {}, SHA-256 {}.",
        v.release,
        v.image_version,
        size(v.size),
        v.sha256
    );
    println!("Offer it with `airlockctl release rollout {}`.", v.release);
    Ok(())
}

fn progress_word(p: RolloutProgress) -> &'static str {
    match p {
        RolloutProgress::NotTargeted => "-",
        RolloutProgress::NoImage => "no image reported",
        RolloutProgress::Done => "done",
        RolloutProgress::Offered => "offered",
        RolloutProgress::Installing => "installing",
        RolloutProgress::Pending => "installed, waiting for reboot",
        RolloutProgress::FailedTrial => "FAILED trial boot",
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn describe_rollout(r: &RolloutView) -> String {
    let to = match &r.appliances {
        None => "every enrolled appliance".to_owned(),
        Some(l) => l.join(", "),
    };
    format!(
        "release {} to {to} (started by {} at {})",
        r.release,
        r.started_by,
        render::utc(r.started_at)
    )
}

/// The text of `release list`.
pub fn overview_text(o: &ReleasesOverview, now: u64) -> String {
    let mut out = String::new();
    if o.releases.is_empty() {
        out.push_str("No releases yet; upload one with `airlockctl release upload FILE`.\n");
    } else {
        let rows: Vec<Vec<String>> = o
            .releases
            .iter()
            .map(|r| {
                vec![
                    r.release.to_string(),
                    r.image_version.clone(),
                    size(r.size),
                    r.sha256.chars().take(16).collect(),
                    render::utc(r.uploaded_at),
                    r.uploaded_by.clone(),
                ]
            })
            .collect();
        out.push_str(&render::table(
            &["RELEASE", "IMAGE VERSION", "SIZE", "SHA-256", "UPLOADED", "BY"],
            &rows,
        ));
    }
    out.push('\n');
    match &o.rollout {
        None => out.push_str("Rollout: none (no release is offered).\n"),
        Some(r) => out.push_str(&format!("Rollout: {}.\n", describe_rollout(r))),
    }
    if !o.uploads_enabled {
        out.push_str("Uploads are off: the controller has no `update_key`.\n");
    }
    if o.appliances.is_empty() {
        return out;
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = o
        .appliances
        .iter()
        .map(|a| {
            let i = a.image.as_ref();
            let failure = i.and_then(|i| i.last_failure.as_ref()).map_or_else(
                || "-".to_owned(),
                |f| format!("release {} {}: {}", f.release, render::ago(f.at, now), f.reason),
            );
            vec![
                a.appliance.clone(),
                opt(i.map(|i| i.release)),
                i.map_or_else(|| "-".to_owned(), |i| i.slot.clone()),
                i.map_or("-", |i| if i.on_trial { "yes" } else { "no" }).to_owned(),
                opt(i.and_then(|i| i.pending)),
                opt(i.and_then(|i| i.in_progress)),
                i.filter(|i| !i.failed_trials.is_empty()).map_or_else(
                    || "-".to_owned(),
                    |i| i.failed_trials.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                ),
                progress_word(a.progress).to_owned(),
                failure,
            ]
        })
        .collect();
    out.push_str(&render::table(
        &[
            "APPLIANCE",
            "RELEASE",
            "SLOT",
            "ON TRIAL",
            "PENDING",
            "IN PROGRESS",
            "FAILED TRIALS",
            "ROLLOUT",
            "LAST FAILURE",
        ],
        &rows,
    ));
    out
}

async fn list(g: &Globals, json: bool) -> Result<()> {
    let o: ReleasesOverview = api_client(g)?.get("/api/v1/releases").await?;
    if json {
        return print_json(&o);
    }
    print!("{}", overview_text(&o, now()));
    Ok(())
}

async fn rollout(g: &Globals, release: u64, appliances: Vec<String>, yes: bool) -> Result<()> {
    let client = api_client(g)?;
    let o: ReleasesOverview = client.get("/api/v1/releases").await?;
    let Some(r) = o.releases.iter().find(|r| r.release == release) else {
        return Err(Refusal::BadInput(format!(
            "no release {release} has been uploaded (`airlockctl release list` shows them)"
        ))
        .into());
    };
    let to = if appliances.is_empty() {
        format!("every enrolled appliance ({})", o.appliances.len())
    } else {
        appliances.join(", ")
    };
    let refused = "not confirmed; the rollout was not changed";
    let mut question = format!(
        "Offer release {release} ({}) to {to}? Appliances running an older release install it on their inactive slot.",
        r.image_version
    );
    if let Some(cur) = &o.rollout {
        question = format!("This replaces the rollout of release {}. {question}", cur.release);
    }
    if !yes && !prompt::confirm(&question).map_err(|e| prompt::unconfirmed(e, refused))? {
        return Err(Refusal::Refused(refused.to_owned()).into());
    }
    let body = StartRollout { release, appliances: (!appliances.is_empty()).then_some(appliances) };
    let v: RolloutView = client.put("/api/v1/rollout", &body).await?;
    println!("Rollout: {}.", describe_rollout(&v));
    println!("`airlockctl release list` shows each appliance's progress.");
    Ok(())
}

async fn stop(g: &Globals) -> Result<()> {
    api_client(g)?.delete("/api/v1/rollout").await?;
    println!("No release is offered any more; installs under way finish.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use airlock_proto::{
        admin::ApplianceImage,
        release::{ReleaseState, UpdateFailure},
    };

    use super::*;

    #[test]
    fn the_list_shows_releases_the_rollout_and_each_image() {
        let o = ReleasesOverview {
            uploads_enabled: true,
            releases: vec![ReleaseView {
                release: 7,
                image_version: "0.1.0+r7".into(),
                size: 200 * 1_048_576,
                sha256: "ab".repeat(32),
                uploaded_by: "admin".into(),
                uploaded_at: 0,
            }],
            rollout: Some(RolloutView {
                release: 7,
                appliances: Some(vec!["ward-1".into()]),
                started_by: "admin".into(),
                started_at: 60,
            }),
            appliances: vec![ApplianceImage {
                appliance: "ward-1".into(),
                reported_at: Some(100),
                image: Some(ReleaseState {
                    release: 6,
                    slot: "b".into(),
                    on_trial: false,
                    failed_trials: vec![5],
                    in_progress: None,
                    pending: None,
                    last_failure: Some(UpdateFailure {
                        release: 7,
                        reason: "checksum mismatch".into(),
                        at: 40,
                    }),
                }),
                progress: RolloutProgress::Offered,
            }],
        };
        let t = overview_text(&o, 100);
        assert!(t.contains("7        0.1.0+r7       200.0 MiB  abababababababab"), "{t}");
        assert!(
            t.contains(
                "Rollout: release 7 to ward-1 (started by admin at 1970-01-01 00:01:00 UTC)."
            ),
            "{t}"
        );
        assert!(t.contains("ward-1     6        b     no        -        -            5              offered  release 7 60 s ago: checksum mismatch"), "{t}");
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(200 * 1_048_576), "200.0 MiB");
        assert_eq!(size(1 << 30), "1.0 GiB");
    }
}
