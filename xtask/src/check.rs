//! `cargo xtask test` (what CI runs) and `cargo xtask bench`.

use std::{process::Command, time::Duration};

use anyhow::{bail, Result};

use crate::step::{self, secs, Step};

/// One step's outcome for the summary.
struct Outcome {
    name: &'static str,
    took: Duration,
    result: Result<(), String>,
}

/// `image`: also the image update test (8 QEMU boots and two image
/// builds; see image/README.md).
pub fn run(quick: bool, image_update: bool) -> Result<()> {
    let mut outcomes = Vec::new();
    let mut record = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        let step = Step::start(name);
        let result = f();
        let took = match &result {
            Ok(()) => step.ok(),
            Err(e) => {
                eprintln!("    {e:#}");
                step.failed()
            }
        };
        let ok = result.is_ok();
        outcomes.push(Outcome { name, took, result: result.map_err(|e| format!("{e:#}")) });
        ok
    };

    let mut ok = record("setup", &mut crate::setup::run);
    if ok && !quick {
        record("cargo fmt --all --check", &mut || {
            step::run(step::cargo().args(["fmt", "--all", "--check"]))
        });
        record("clippy (host crates)", &mut || {
            step::run(step::cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "airlock-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        });
        record("clippy (eBPF programs, nightly, bpfel-unknown-none)", &mut ebpf_clippy);
    }
    if ok {
        ok = record("build the agent", &mut || {
            step::run(step::cargo().args(["build", "-p", "airlock-agent"]))
        });
    }
    // A failed image build fails the run but does not hide the other tests'
    // results (the boot test then reports the missing image itself).
    let mut image = None;
    if ok {
        record("appliance image (cargo xtask image; base cached under target/image)", &mut || {
            image = Some(crate::image::build(std::path::Path::new(crate::image::DEFAULT_PROFILE))?);
            Ok(())
        });
    }
    if ok {
        record("cargo test (workspace, privileged tests, image boot test)", &mut || {
            let bin = airlock_testbed::target_dir().join("debug").join("airlock-agent");
            let mut cargo = step::cargo();
            if let Some(image) = &image {
                cargo.env("AIRLOCK_IMAGE", image);
            }
            step::run(
                cargo
                    .env("AIRLOCK_AGENT_BIN", bin)
                    .env("AIRLOCK_QEMU_DIR", crate::setup::qemu_dir())
                    .args(["test", "--workspace", "--exclude", "airlock-ebpf"])
                    .args(image_update.then_some("--features=airlock-testbed/image-update")),
            )
        });
    }

    if ok && !quick {
        record("fuzz smoke (policy_toml, 20 s)", &mut fuzz_smoke);
    }

    println!("\n==> summary");
    for o in &outcomes {
        let verdict = if o.result.is_ok() { "ok" } else { "FAILED" };
        println!("    {:<54} {verdict:<7} {:>7}", o.name, secs(o.took));
    }
    let total: Duration = outcomes.iter().map(|o| o.took).sum();
    println!("    {:<54} {:<7} {:>7}", "total", "", secs(total));
    let failed: Vec<&str> = outcomes.iter().filter(|o| o.result.is_err()).map(|o| o.name).collect();
    if !failed.is_empty() {
        bail!("{} step(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

/// The eBPF crate only builds for bpfel-unknown-none with nightly and
/// build-std, from its own directory.
fn ebpf_clippy() -> Result<()> {
    let dir = airlock_testbed::workspace_root().join("ebpf/programs");
    step::run(
        Command::new("cargo")
            .current_dir(dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["+nightly", "clippy", "-p", "airlock-ebpf", "--target", "bpfel-unknown-none"])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
    )
}

/// A short run of each fuzz target over its committed corpus; new inputs go to
/// a scratch corpus so the tree stays clean. A crash fails the step.
fn fuzz_smoke() -> Result<()> {
    let root = airlock_testbed::workspace_root();
    let scratch = std::env::temp_dir().join(format!("airlock-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = step::run(
        Command::new("cargo")
            .current_dir(&root)
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["+nightly", "fuzz", "run", "policy_toml"])
            .arg(&scratch)
            .arg(root.join("fuzz/corpus/policy_toml"))
            .args(["--", "-max_total_time=20"]),
    );
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

pub fn bench() -> Result<()> {
    crate::setup::run()?;
    let step = Step::start("cargo bench -p airlock-agent --bench dataplane");
    step::run(step::cargo().args(["bench", "-p", "airlock-agent", "--bench", "dataplane"]))?;
    step.ok();
    println!(
        "results: the Markdown table above, and {}",
        airlock_testbed::target_dir().join("bench-dataplane.json").display()
    );
    let step = Step::start("cargo bench -p airlock-agent --bench apply");
    step::run(step::cargo().args(["bench", "-p", "airlock-agent", "--bench", "apply"]))?;
    step.ok();
    sync_bench()
}

/// Policy change → applied on the agent, in the lab with its controller,
/// with release builds of both.
fn sync_bench() -> Result<()> {
    let step = Step::start("cargo build --release -p airlock-agent -p airlock-controller");
    step::run(step::cargo().args([
        "build",
        "--release",
        "-p",
        "airlock-agent",
        "-p",
        "airlock-controller",
    ]))?;
    step.ok();
    let release = airlock_testbed::target_dir().join("release");
    let step = Step::start("cargo bench -p airlock-testbed --bench sync");
    step::run(
        step::cargo()
            .env("AIRLOCK_AGENT_BIN", release.join("airlock-agent"))
            .env("AIRLOCK_CONTROLLER_BIN", release.join("airlock-controller"))
            .args(["bench", "-p", "airlock-testbed", "--bench", "sync"]),
    )?;
    step.ok();
    println!(
        "results: the table above, and {}",
        airlock_testbed::target_dir().join("bench-sync.json").display()
    );
    Ok(())
}
