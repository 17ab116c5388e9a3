//! `airlockctl` end to end: a real controller in-process (real TLS, real
//! encrypted store with the built-in KMS) driven through the real binary,
//! with HOME and XDG_CONFIG_HOME in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use airlock_controller::{config::ControllerConfig, run::Started};
use airlock_proto::admin::{ApplianceState, ApplianceView, PolicyVersion, PolicyVersionSummary};

const BIN: &str = env!("CARGO_BIN_EXE_airlockctl");
const LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/lab.toml");

struct Lab {
    started: Started,
    password: String,
    home: tempfile::TempDir,
    _data: tempfile::TempDir,
    // Last: the controller's tasks live on it.
    _rt: tokio::runtime::Runtime,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

fn lab() -> Lab {
    lab_with(None)
}

fn lab_with(update_key: Option<PathBuf>) -> Lab {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cfg = ControllerConfig {
        data_dir: data.path().into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        agent_listen: "127.0.0.1:0".parse().unwrap(),
        update_key,
        ..ControllerConfig::default()
    };
    let kms = airlock_kms::open(&cfg.kms(), None).unwrap();
    let store = airlock_store::Store::open(&data.path().join("store"), kms).unwrap();
    let started = rt.block_on(airlock_controller::run::start(cfg, store)).unwrap();
    let password = started.bootstrap.clone().expect("first start: bootstrap password");
    Lab { started, password, home: tempfile::tempdir().unwrap(), _data: data, _rt: rt }
}

impl Lab {
    fn url(&self) -> String {
        self.started.state.public_url.clone()
    }

    fn fingerprint(&self) -> String {
        self.started.state.ca.fingerprint()
    }

    fn session_file(&self) -> PathBuf {
        self.home.path().join("xdg/airlock/ctl.toml")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("xdg"))
            .env_remove("AIRLOCK_URL")
            .env_remove("AIRLOCK_TOKEN")
            .env_remove("AIRLOCK_CA_FINGERPRINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, mut c: Command, stdin: Option<&str>) -> Out {
        if stdin.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().unwrap();
        if let Some(s) = stdin {
            // The command may refuse and exit before it reads stdin (a wrong
            // pin is refused before any password is asked for).
            match child.stdin.take().unwrap().write_all(s.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r.unwrap(),
            }
        }
        let o = child.wait_with_output().unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        }
    }

    fn ctl(&self, args: &[&str]) -> Out {
        self.run(self.command(args), None)
    }

    fn login_with(&self, fingerprint: &str, password: &str) -> Out {
        let c = self.command(&[
            "login",
            "--controller",
            &self.url(),
            "--ca-fingerprint",
            fingerprint,
            "--user",
            "admin",
            "--password-stdin",
        ]);
        self.run(c, Some(&format!("{password}\n")))
    }

    fn login(&self) {
        let o = self.login_with(&self.fingerprint(), &self.password);
        assert_eq!(o.code, 0, "{o:?}");
    }

    fn saved(&self) -> toml::Table {
        toml::from_str(&std::fs::read_to_string(self.session_file()).unwrap()).unwrap()
    }

    fn saved_token(&self) -> String {
        self.saved()["token"].as_str().unwrap().to_owned()
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.home.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    }
}

fn ok(o: &Out) {
    assert_eq!(o.code, 0, "{o:?}");
}

#[test]
fn login_pins_the_ca_saves_a_private_session_and_logout_ends_it() {
    let l = lab();
    let st = &l.started.state;

    let o = l.ctl(&["appliances", "list"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("not logged in"), "{o:?}");

    // A fingerprint that matches nothing in the chain: refused before the
    // password is sent, and nothing is saved.
    let wrong = format!("sha256:{}", "00".repeat(32));
    let o = l.login_with(&wrong, &l.password);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(
        o.stderr.contains("the controller's certificate does not match the pinned fingerprint"),
        "{o:?}"
    );
    assert_eq!(st.metrics.logins_failed.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(!l.session_file().exists());

    let o = l.login_with("sha256:abc", &l.password);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("is not a CA fingerprint"), "{o:?}");

    let o = l.login_with(&l.fingerprint(), "not-the-password");
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("wrong user or password"), "{o:?}");
    assert!(!l.session_file().exists());

    // The right pin: the CA from the presented chain is saved, 0600, no password.
    let o = l.login_with(&l.fingerprint(), &l.password);
    ok(&o);
    assert!(o.stdout.contains(&format!("Logged in to {} as admin", l.url())), "{o:?}");
    let mode = std::fs::metadata(l.session_file()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let saved = l.saved();
    assert_eq!(saved["ca_pem"].as_str().unwrap().trim(), st.ca.cert_pem().trim());
    assert_eq!(saved["ca_fingerprint"].as_str().unwrap(), l.fingerprint());
    assert_eq!(saved["controller"].as_str().unwrap(), l.url());
    let text = std::fs::read_to_string(l.session_file()).unwrap();
    assert!(!text.contains(&l.password), "the password is never saved");
    let token = l.saved_token();
    assert!(st.sessions.authenticate(&token, st.now()).is_some(), "a live server-side session");

    let o = l.ctl(&["appliances", "list"]);
    ok(&o);
    assert!(o.stdout.contains("No appliances yet"), "{o:?}");

    // Afterwards the saved CA is the only root: another controller (another
    // CA) at the saved URL is refused, with the reason.
    let other = lab();
    let mut s = l.saved();
    s.insert("controller".into(), other.url().into());
    std::fs::write(l.session_file(), toml::to_string(&s).unwrap()).unwrap();
    let o = l.ctl(&["appliances", "list"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("not signed by the controller CA saved at login"), "{o:?}");
    s.insert("controller".into(), l.url().into());
    std::fs::write(l.session_file(), toml::to_string(&s).unwrap()).unwrap();

    // A token the controller does not know: the session ended (exit 3).
    let mut c = l.command(&["policy", "history"]);
    c.env("AIRLOCK_TOKEN", "bogus");
    let o = l.run(c, None);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("the session ended; log in again"), "{o:?}");

    let o = l.ctl(&["logout"]);
    ok(&o);
    assert!(st.sessions.authenticate(&token, st.now()).is_none(), "ended on the controller");
    assert!(!l.saved().contains_key("token"), "and forgotten locally");
    let o = l.ctl(&["appliances", "list"]);
    assert_eq!(o.code, 3, "{o:?}");

    // The saved CA lets the same controller be logged into again without the pin.
    let c = l.command(&["login", "--password-stdin"]);
    let o = l.run(c, Some(&format!("{}\n", l.password)));
    ok(&o);
    ok(&l.ctl(&["appliances", "list"]));
}

#[test]
fn scripts_use_the_environment_without_a_saved_session() {
    let l = lab();
    let st = &l.started.state;
    let token = st.sessions.login(&st.store, "admin", &l.password, st.now()).unwrap().token;
    let mut c = l.command(&["appliances", "list", "--json"]);
    c.env("AIRLOCK_URL", l.url())
        .env("AIRLOCK_CA_FINGERPRINT", l.fingerprint())
        .env("AIRLOCK_TOKEN", &token);
    let o = l.run(c, None);
    ok(&o);
    assert_eq!(serde_json::from_str::<Vec<ApplianceView>>(&o.stdout).unwrap(), vec![]);
    assert!(!l.session_file().exists(), "nothing saved");

    // Without a pin or a saved CA there is no trust: not logged in.
    let mut c = l.command(&["appliances", "list"]);
    c.env("AIRLOCK_URL", l.url()).env("AIRLOCK_TOKEN", &token);
    let o = l.run(c, None);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("nothing is saved for"), "{o:?}");
}

fn token_from(stdout: &str) -> String {
    // The token is the one indented line that is not the command.
    let lines: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("    ") && !l.contains("airlock-agent")).collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    lines[0].trim().to_owned()
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn appliances_are_created_listed_shown_and_revoked() {
    let l = lab();
    let st = &l.started.state;
    l.login();

    let o = l.ctl(&["appliances", "create", "ward-1", "--token-ttl", "2h"]);
    ok(&o);
    let token = token_from(&o.stdout);
    assert!(o.stdout.contains("only time the token is shown"), "{o:?}");
    assert!(
        o.stdout.contains(&format!(
            "airlock-agent enroll --controller {} --ca-fingerprint {} --token-stdin",
            l.url(),
            l.fingerprint()
        )),
        "{o:?}"
    );
    assert!(!std::fs::read_to_string(l.session_file()).unwrap().contains(&token), "not saved");
    // It is the real one-time token: it enrolls the appliance, once.
    let (rec, _) = st.appliances.enroll(&st.ca, &st.registry, &token, &csr(), st.now()).unwrap();
    assert_eq!(rec.state, ApplianceState::Enrolled);
    assert!(st.appliances.enroll(&st.ca, &st.registry, &token, &csr(), st.now()).is_err());
    ok(&l.ctl(&["appliances", "create", "ward-2"]));

    for (args, why) in [
        (&["appliances", "create", "ward-3", "--token-ttl", "9d"][..], "7d"),
        (&["appliances", "create", "Ward_3"][..], "is not an appliance id"),
        (&["appliances", "show", "../policy"][..], "is not an appliance id"),
    ] {
        let o = l.ctl(args);
        assert_eq!(o.code, 2, "{args:?}: {o:?}");
        assert!(o.stderr.contains(why), "{o:?}");
    }
    assert!(st.appliances.get("ward-3").unwrap().is_none());

    let o = l.ctl(&["appliances", "list"]);
    ok(&o);
    let rows: Vec<&str> = o.stdout.lines().collect();
    assert!(rows[0].starts_with("ID") && rows[0].contains("LAST SEEN"), "{o:?}");
    assert!(rows.iter().any(|r| r.starts_with("ward-1") && r.contains("enrolled")), "{o:?}");
    assert!(rows.iter().any(|r| r.starts_with("ward-2") && r.contains("pending")), "{o:?}");
    let o = l.ctl(&["appliances", "list", "--json"]);
    ok(&o);
    let all: Vec<ApplianceView> = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(all.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["ward-1", "ward-2"]);
    assert_eq!(all[0].state, ApplianceState::Enrolled);
    assert_eq!(all[0].desired_version, None, "no bundle signed for it yet");
    // Each signed bundle raises the desired version the listing shows.
    for _ in 0..2 {
        let b = st.policies.bundle_for("ward-1", st.now()).unwrap();
        let o = l.ctl(&["appliances", "list", "--json"]);
        ok(&o);
        let all: Vec<ApplianceView> = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(all[0].desired_version, Some(b.version), "{o:?}");
    }

    let o = l.ctl(&["appliances", "show", "ward-1"]);
    ok(&o);
    assert!(o.stdout.contains("state:            enrolled"), "{o:?}");
    let o = l.ctl(&["appliances", "show", "nope"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("no appliance \"nope\""), "{o:?}");

    // Revoking asks first; with nobody to ask, nothing happens.
    let o = l.ctl(&["appliances", "revoke", "ward-1"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("--yes"), "{o:?}");
    assert_eq!(st.appliances.get("ward-1").unwrap().unwrap().state, ApplianceState::Enrolled);
    let o = l.ctl(&["appliances", "revoke", "ward-1", "--yes"]);
    ok(&o);
    assert!(o.stdout.contains("ward-1 is revoked"), "{o:?}");
    assert_eq!(st.appliances.get("ward-1").unwrap().unwrap().state, ApplianceState::Revoked);
    let o = l.ctl(&["appliances", "show", "ward-1", "--json"]);
    ok(&o);
    assert_eq!(
        serde_json::from_str::<ApplianceView>(&o.stdout).unwrap().state,
        ApplianceState::Revoked
    );
    // A revoked id gets no new token.
    let o = l.ctl(&["appliances", "create", "ward-1"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("revoked"), "{o:?}");
}

fn lab_text() -> String {
    std::fs::read_to_string(LAB).unwrap()
}

#[test]
fn policy_validate_diff_apply_history_and_rollback() {
    let l = lab();
    let st = &l.started.state;
    l.login();

    // Invalid: exit 2, every problem located in the file.
    let broken = l.write("broken.toml", "version = 1\n[site]\nname = 3\n");
    let o = l.ctl(&["policy", "validate", &broken]);
    assert_eq!(o.code, 2, "{o:?}");
    let located = o.stderr.lines().find(|s| s.starts_with(&format!("{broken}:"))).unwrap_or("");
    let mut parts = located.splitn(4, ':');
    let (_, line, col) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    assert!(line.parse::<u32>().is_ok() && col.parse::<u32>().is_ok(), "{o:?}");
    assert!(o.stderr.contains("problem(s)"), "{o:?}");

    let o = l.ctl(&["policy", "validate", LAB]);
    ok(&o);
    assert!(o.stdout.contains("valid"), "{o:?}");
    let o = l.ctl(&["policy", "validate", &l.write("policy.txt", &lab_text())]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("--format"), "{o:?}");
    let o = l.ctl(&["policy", "validate", "--format", "toml", &l.write("p.txt", &lab_text())]);
    ok(&o);

    // Before any policy: the diff opens the lab's flows.
    let o = l.ctl(&["policy", "diff", LAB]);
    ok(&o);
    assert!(o.stdout.contains("from no policy"), "{o:?}");
    assert!(o.stdout.contains("  lab-appliance\n"), "{o:?}");
    assert!(o.stdout.lines().any(|s| s.trim_start().starts_with("+ ")), "{o:?}");
    assert!(!o.stdout.lines().any(|s| s.trim_start().starts_with("- ")), "{o:?}");

    // Apply: unconfirmed or invalid changes nothing.
    let o = l.ctl(&["policy", "apply", LAB, "--comment", "first"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("nothing was applied"), "{o:?}");
    let o = l.ctl(&["policy", "apply", &broken, "--comment", "broken", "--yes"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains(&format!("{broken}:")), "{o:?}");
    assert_eq!(st.policies.current_version().unwrap(), None);

    let o = l.ctl(&["policy", "apply", LAB, "--comment", "first", "--yes"]);
    ok(&o);
    assert!(o.stdout.contains("+ "), "the diff is shown first: {o:?}");
    assert!(o.stdout.contains("Applied: version 1 by admin"), "{o:?}");
    assert_eq!(st.policies.current_version().unwrap(), Some(1));

    // Version 2: imaging moves from p1 to p2 — one flow closes, one opens.
    let second = lab_text().replace("hosts = [\"p1\"]", "hosts = [\"p2\"]");
    assert_ne!(second, lab_text());
    let second = l.write("second.toml", &second);
    let o = l.ctl(&["policy", "diff", &second]);
    ok(&o);
    assert!(o.stdout.contains("Changes from version 1 to version 2"), "{o:?}");
    assert!(o.stdout.lines().any(|s| s.trim_start().starts_with("+ ")), "{o:?}");
    assert!(o.stdout.lines().any(|s| s.trim_start().starts_with("- ")), "{o:?}");
    ok(&l.ctl(&["policy", "apply", &second, "-c", "move imaging to p2", "-y"]));

    let o = l.ctl(&["policy", "history"]);
    ok(&o);
    assert!(o.stdout.lines().nth(1).unwrap().starts_with("2 (current)"), "{o:?}");
    assert!(o.stdout.contains("move imaging to p2") && o.stdout.contains("first"), "{o:?}");

    // Rollback: a new version 3 with version 1's content.
    let o = l.ctl(&["policy", "rollback", "1", "--comment", "p2 is wrong", "--yes"]);
    ok(&o);
    assert!(o.stdout.contains("Rolled back: version 3"), "{o:?}");
    assert!(o.stdout.contains("a rollback to version 1"), "{o:?}");
    let o = l.ctl(&["policy", "show", "--version", "3", "--json"]);
    ok(&o);
    let v3: PolicyVersion = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((v3.version, v3.rollback_of, v3.comment.as_str()), (3, Some(1), "p2 is wrong"));
    assert_eq!(v3.text, lab_text());
    let o = l.ctl(&["policy", "show"]);
    ok(&o);
    assert_eq!(o.stdout, lab_text());
    assert!(o.stderr.contains("version 3 by admin"), "{o:?}");
    let o = l.ctl(&["policy", "history", "--json"]);
    ok(&o);
    let h: Vec<PolicyVersionSummary> = serde_json::from_str(&o.stdout).unwrap();
    let hv: Vec<(u32, Option<u32>)> = h.iter().map(|v| (v.version, v.rollback_of)).collect();
    assert_eq!(hv, [(3, Some(1)), (2, None), (1, None)]);
    assert_eq!(st.policies.current_version().unwrap(), Some(3));

    let o = l.ctl(&["policy", "rollback", "9", "--comment", "no such", "--yes"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("no policy version 9"), "{o:?}");
}

#[test]
fn every_command_has_help() {
    let l = lab();
    for cmd in [
        &["--help"][..],
        &["login", "--help"],
        &["logout", "--help"],
        &["appliances", "--help"],
        &["appliances", "list", "--help"],
        &["appliances", "show", "--help"],
        &["appliances", "create", "--help"],
        &["appliances", "revoke", "--help"],
        &["policy", "--help"],
        &["policy", "show", "--help"],
        &["policy", "history", "--help"],
        &["policy", "validate", "--help"],
        &["policy", "diff", "--help"],
        &["policy", "apply", "--help"],
        &["policy", "rollback", "--help"],
        &["release", "--help"],
        &["release", "upload", "--help"],
        &["release", "list", "--help"],
        &["release", "rollout", "--help"],
        &["release", "stop", "--help"],
    ] {
        let o = l.ctl(cmd);
        ok(&o);
        assert!(o.stdout.contains("Usage: airlockctl"), "{cmd:?}: {o:?}");
    }
    let o = l.ctl(&["login", "--password", "x"]);
    assert_eq!(o.code, 2, "no password argument exists: {o:?}");
}

/// A signed update bundle of `release` (a ustar archive, as the image build writes it).
fn update_bundle(key: &ed25519_dalek::SigningKey, release: u64, root_len: usize) -> Vec<u8> {
    let root: Vec<u8> = (0..root_len).map(|i| (i % 251) as u8).collect();
    airlock_proto::release::testing::signed_bundle(key, release, &root)
}

#[test]
fn releases_are_uploaded_listed_rolled_out_and_stopped() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let keys = tempfile::tempdir().unwrap();
    let pubfile = keys.path().join("image-signing.pub");
    let hex: String = key.verifying_key().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&pubfile, hex).unwrap();
    let l = lab_with(Some(pubfile));
    l.login();

    let o = l.ctl(&["release", "list"]);
    ok(&o);
    assert!(o.stdout.contains("No releases yet"), "{o:?}");

    // A ~24 MiB bundle is streamed (progress on stderr) and stored.
    let big = update_bundle(&key, 4, 24 << 20);
    let file = l.home.path().join("r4.bundle");
    std::fs::write(&file, &big).unwrap();
    let f = file.to_str().unwrap();
    let o = l.ctl(&["release", "upload", f]);
    ok(&o);
    assert!(o.stdout.contains("Uploaded: release 4 (0.1.0+r4), 24.0 MiB"), "{o:?}");
    assert!(o.stderr.contains("100% (24.0 MiB of 24.0 MiB)"), "{o:?}");
    let o = l.ctl(&["release", "upload", f]);
    ok(&o);
    assert!(o.stdout.contains("Already stored: release 4"), "{o:?}");

    // A bundle signed by another key is refused with the reason (exit 2).
    let other = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let bad = l.write("bad.bundle", "");
    std::fs::write(&bad, update_bundle(&other, 5, 8192)).unwrap();
    let o = l.ctl(&["release", "upload", &bad]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(
        o.stderr.contains("does not verify with the update key")
            && o.stderr.contains("nothing was stored"),
        "{o:?}"
    );

    let o = l.ctl(&["release", "rollout", "9", "--yes"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("no release 9"), "{o:?}");
    let o = l.ctl(&["release", "rollout", "4", "--appliance", "ward-x", "--yes"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("not enrolled appliances: ward-x"), "{o:?}");
    let o = l.ctl(&["release", "rollout", "4"]);
    assert_eq!(o.code, 2, "no terminal, no --yes: {o:?}");
    let o = l.ctl(&["release", "rollout", "4", "--yes"]);
    ok(&o);
    assert!(o.stdout.contains("Rollout: release 4 to every enrolled appliance"), "{o:?}");

    let o = l.ctl(&["release", "list"]);
    ok(&o);
    assert!(o.stdout.contains("0.1.0+r4") && o.stdout.contains("Rollout: release 4"), "{o:?}");
    let o = l.ctl(&["release", "list", "--json"]);
    ok(&o);
    let v: airlock_proto::admin::ReleasesOverview = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((v.releases.len(), v.rollout.map(|r| r.release)), (1, Some(4)));

    let o = l.ctl(&["release", "stop"]);
    ok(&o);
    let o = l.ctl(&["release", "list"]);
    assert!(o.stdout.contains("Rollout: none"), "{o:?}");
}
