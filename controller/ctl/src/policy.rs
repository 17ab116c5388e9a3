//! `airlockctl policy …`: show, history, validate, diff, apply, rollback.
//! Every change shows what it opens and closes first; nothing is applied
//! without a confirmation or `--yes`.

use std::path::Path;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};

use airlock_proto::admin::{
    PolicyDiff, PolicyFormat, PolicyUpload, PolicyVersion, PolicyVersionSummary, Rollback,
    ValidationReport,
};

use crate::{
    client::{Client, ClientError},
    context::{api_client, Globals, Refusal},
    prompt, render,
};

/// A policy file's written form.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// TOML.
    Toml,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Print the current policy text (or an older version's); details go to stderr.
    Show {
        /// This version instead of the current one.
        #[arg(long)]
        version: Option<u32>,
        /// Print the stored version as the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every stored version, newest first.
    History {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a policy file on the controller; every problem as FILE:LINE:COL: message (hint).
    ///
    /// Exits 2 when the policy is invalid.
    Validate {
        /// The policy file (.toml or .json).
        file: String,
        /// The format, when the extension does not tell.
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// What applying a policy file would change, per appliance: + opens, - closes, ~ changes.
    Diff {
        /// The policy file (.toml or .json).
        file: String,
        /// The format, when the extension does not tell.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store a policy file as the next version and push it to the appliances.
    ///
    /// Shows the diff first and asks for confirmation unless --yes. An invalid
    /// policy is refused (exit 2) with every problem located; nothing is applied.
    Apply {
        /// The policy file (.toml or .json).
        file: String,
        /// Why (kept in the version history).
        #[arg(long, short)]
        comment: String,
        /// The format, when the extension does not tell.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Restore an older version's content as a new version (history is kept).
    ///
    /// Shows what the rollback changes and asks for confirmation unless --yes.
    Rollback {
        /// The version whose content to restore.
        version: u32,
        /// Why (kept in the version history).
        #[arg(long, short)]
        comment: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

pub async fn run(g: &Globals, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Show { version, json } => show(g, version, json).await,
        Cmd::History { json } => history(g, json).await,
        Cmd::Validate { file, format } => validate(g, &file, format).await,
        Cmd::Diff { file, format, json } => diff(g, &file, format, json).await,
        Cmd::Apply { file, comment, format, yes } => apply(g, &file, format, comment, yes).await,
        Cmd::Rollback { version, comment, yes } => rollback(g, version, comment, yes).await,
    }
}

/// Reads a policy file; the format from `--format` or the extension.
fn read(file: &str, format: Option<Format>) -> Result<PolicyUpload, Refusal> {
    let format = match format {
        Some(Format::Toml) => PolicyFormat::Toml,
        Some(Format::Json) => PolicyFormat::Json,
        None => match Path::new(file).extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => PolicyFormat::Toml,
            Some(e) if e.eq_ignore_ascii_case("json") => PolicyFormat::Json,
            _ => {
                return Err(Refusal::BadInput(format!(
                    "cannot tell the format of {file} from its name; pass --format toml or --format json"
                )))
            }
        },
    };
    let text = std::fs::read_to_string(file)
        .map_err(|source| Refusal::File { path: file.to_owned(), source })?;
    Ok(PolicyUpload { text, format, comment: String::new() })
}

/// Prints every located problem and turns them into the refusal (exit 2).
fn invalid(
    file: &str,
    problems: &[airlock_proto::admin::PolicyProblem],
    then: &str,
) -> anyhow::Error {
    for p in problems {
        eprintln!("{}", render::problem(file, p));
    }
    Refusal::Refused(format!("{file}: the policy has {} problem(s){then}", problems.len())).into()
}

/// An `invalid_policy` refusal rendered against `file`; other errors as they are.
fn located(file: &str, e: ClientError) -> anyhow::Error {
    match e.api() {
        Some((_, body)) if body.error == "invalid_policy" && !body.problems.is_empty() => {
            invalid(file, &body.problems, "; nothing was applied")
        }
        _ => e.into(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn describe(v: &PolicyVersionSummary) -> String {
    let mut s = format!("version {} by {} at {}", v.version, v.author, render::utc(v.created_at));
    if let Some(r) = v.rollback_of {
        s.push_str(&format!(", a rollback to version {r}"));
    }
    if !v.comment.is_empty() {
        s.push_str(&format!(": {}", v.comment));
    }
    s
}

async fn show(g: &Globals, version: Option<u32>, json: bool) -> Result<()> {
    let client = api_client(g)?;
    let p: PolicyVersion = match version {
        Some(v) => client.get(&format!("/api/v1/policy/versions/{v}")).await?,
        None => client.get("/api/v1/policy").await?,
    };
    if json {
        return print_json(&p);
    }
    let summary = PolicyVersionSummary {
        version: p.version,
        author: p.author,
        created_at: p.created_at,
        comment: p.comment,
        rollback_of: p.rollback_of,
    };
    eprintln!("# {}", describe(&summary));
    print!("{}", p.text);
    if !p.text.ends_with('\n') {
        println!();
    }
    Ok(())
}

async fn history(g: &Globals, json: bool) -> Result<()> {
    let all: Vec<PolicyVersionSummary> = api_client(g)?.get("/api/v1/policy/versions").await?;
    if json {
        return print_json(&all);
    }
    if all.is_empty() {
        println!(
            "No policy versions yet; apply one with `airlockctl policy apply FILE --comment WHY`."
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .enumerate()
        .map(|(i, v)| {
            vec![
                if i == 0 { format!("{} (current)", v.version) } else { v.version.to_string() },
                render::utc(v.created_at),
                v.author.clone(),
                v.rollback_of.map_or_else(|| "-".to_owned(), |r| r.to_string()),
                v.comment.clone(),
            ]
        })
        .collect();
    print!("{}", render::table(&["VERSION", "CREATED", "AUTHOR", "ROLLBACK OF", "COMMENT"], &rows));
    Ok(())
}

async fn validate(g: &Globals, file: &str, format: Option<Format>) -> Result<()> {
    let upload = read(file, format)?;
    let r: ValidationReport = api_client(g)?.post("/api/v1/policy/validate", &upload).await?;
    if r.ok {
        println!("{file}: valid");
        Ok(())
    } else {
        Err(invalid(file, &r.problems, ""))
    }
}

async fn fetch_diff(client: &Client, file: &str, upload: &PolicyUpload) -> Result<PolicyDiff> {
    client.post("/api/v1/policy/diff", upload).await.map_err(|e| located(file, e))
}

async fn diff(g: &Globals, file: &str, format: Option<Format>, json: bool) -> Result<()> {
    let upload = read(file, format)?;
    let d = fetch_diff(&api_client(g)?, file, &upload).await?;
    if json {
        return print_json(&d);
    }
    print!("{}", render::diff(&d));
    Ok(())
}

fn confirm_or_refuse(yes: bool, question: &str, refused: &str) -> Result<()> {
    if yes || prompt::confirm(question).map_err(|e| prompt::unconfirmed(e, refused))? {
        Ok(())
    } else {
        Err(Refusal::Refused(refused.to_owned()).into())
    }
}

async fn apply(
    g: &Globals,
    file: &str,
    format: Option<Format>,
    comment: String,
    yes: bool,
) -> Result<()> {
    if comment.trim().is_empty() {
        return Err(
            Refusal::BadInput("--comment must say why (it is kept in the history)".into()).into()
        );
    }
    let mut upload = read(file, format)?;
    upload.comment = comment;
    let client = api_client(g)?;
    let d = fetch_diff(&client, file, &upload).await?;
    print!("{}", render::diff(&d));
    if render::diff_is_empty(&d) {
        println!("(Applying stores a new version with the same effect.)");
    }
    confirm_or_refuse(
        yes,
        &format!("Apply {file} as version {} and push it to the appliances?", d.to_version),
        "not confirmed; nothing was applied",
    )?;
    let v: PolicyVersionSummary =
        client.post("/api/v1/policy", &upload).await.map_err(|e| located(file, e))?;
    println!("Applied: {}.", describe(&v));
    println!("Enrolled appliances get their signed bundles now; `airlockctl appliances list` shows when they applied them.");
    Ok(())
}

async fn rollback(g: &Globals, version: u32, comment: String, yes: bool) -> Result<()> {
    if comment.trim().is_empty() {
        return Err(
            Refusal::BadInput("--comment must say why (it is kept in the history)".into()).into()
        );
    }
    let client = api_client(g)?;
    let old: PolicyVersion = client.get(&format!("/api/v1/policy/versions/{version}")).await?;
    let upload = PolicyUpload { text: old.text, format: old.format, comment: String::new() };
    let label = format!("version {version}");
    let d = fetch_diff(&client, &label, &upload).await?;
    println!("Rolling back restores the content of version {version} as a new version.");
    print!("{}", render::diff(&d));
    confirm_or_refuse(
        yes,
        &format!("Store the content of version {version} as version {} and push it?", d.to_version),
        "not confirmed; nothing was rolled back",
    )?;
    let v: PolicyVersionSummary =
        client.post("/api/v1/policy/rollback", &Rollback { to_version: version, comment }).await?;
    println!("Rolled back: {}.", describe(&v));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_comes_from_the_flag_or_the_extension() {
        let e = read("policy.yaml", None).unwrap_err();
        assert!(e.to_string().contains("--format"), "{e}");
        let e = read("/nonexistent/p.toml", None).unwrap_err();
        assert!(matches!(e, Refusal::File { .. }), "{e}");
        assert_eq!(e.exit_code(), 2);
    }
}
