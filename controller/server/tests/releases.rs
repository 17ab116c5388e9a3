//! Image releases end to end: a real controller (in-process, and the binary
//! for the restart) over real TLS, bundles built and signed here (the shared
//! `release::testing` ustar writer, a key from a fixed seed), uploads, the
//! rollout, the offer in the report answer and the agent's download over mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, path::Path};

use airlock_controller::{config::ControllerConfig, run::Started};
use airlock_proto::{
    admin::{ApiError, ReleaseView, ReleasesOverview, RolloutProgress},
    agent::{EnrollResponse, Report},
    release::{self as rel, ReleaseState, ReportResponse},
};
use common::{bootstrap_password, client, key_and_csr, request, Binary, Resp};
use ed25519_dalek::SigningKey;
use rustls::ClientConfig;
use sha2::{Digest as _, Sha256};

// ---- bundles ------------------------------------------------------------------

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn pub_hex(k: &SigningKey) -> String {
    rel::hex(k.verifying_key().as_bytes())
}

#[derive(Clone, Copy, Default)]
struct Defect {
    unsigned: bool,
    tampered_root: bool,
}

/// A signed bundle of `release`; `fill` varies the root image's bytes.
fn bundle(key: &SigningKey, release: u64, fill: u8, d: Defect) -> Vec<u8> {
    use rel::testing::{manifest_for, members, sign, signed_bundle, tar, UKI_A, UKI_B};
    let root = vec![fill; 2 * 4096];
    if !d.unsigned && !d.tampered_root {
        return signed_bundle(key, release, &root);
    }
    let mj = serde_json::to_vec(&manifest_for(release, &root, UKI_A, UKI_B)).unwrap();
    let sig = sign(key, &mj);
    let mut root_in = root.clone();
    if d.tampered_root {
        root_in[5000] ^= 1; // same size: only the SHA-256 tells
    }
    tar(&members(&mj, (!d.unsigned).then_some(sig.as_str()), &root_in, UKI_A, UKI_B))
}

// ---- HTTPS ---------------------------------------------------------------------

fn json_body<T: serde::Serialize>(v: &T) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/json", serde_json::to_vec(v).unwrap()))
}

/// A controller reached over HTTPS: its addresses, CA and a session.
struct Api {
    main: SocketAddr,
    agent: SocketAddr,
    ca: String,
    token: String,
}

impl Api {
    async fn login(main: SocketAddr, agent: SocketAddr, ca: String, user: &str, pw: &str) -> Self {
        let body = json_body(&serde_json::json!({"user": user, "password": pw}));
        let r = request(main, client(&ca, None), "POST", "/api/v1/login", body, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let token = r.json::<serde_json::Value>()["token"].as_str().unwrap().to_owned();
        Self { main, agent, ca, token }
    }

    async fn call(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> Resp {
        request(self.main, client(&self.ca, None), method, path, body, Some(&self.token)).await
    }

    async fn upload(&self, bundle: Vec<u8>) -> Resp {
        self.call("POST", "/api/v1/releases", Some(("application/octet-stream", bundle))).await
    }

    async fn overview(&self) -> ReleasesOverview {
        let r = self.call("GET", "/api/v1/releases", None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    async fn rollout(&self, body: serde_json::Value) -> Resp {
        self.call("PUT", "/api/v1/rollout", json_body(&body)).await
    }

    /// Creates and enrolls an appliance; its mTLS client configuration.
    async fn enroll(&self, id: &str) -> ClientConfig {
        let r = self
            .call("POST", "/api/v1/appliances", json_body(&serde_json::json!({"id": id})))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let token = r.json::<serde_json::Value>()["token"].as_str().unwrap().to_owned();
        let (key, csr) = key_and_csr();
        let body =
            json_body(&serde_json::json!({"token": token, "csr_pem": csr, "agent_version": "t"}));
        let r =
            request(self.main, client(&self.ca, None), "POST", "/api/v1/enroll", body, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e: EnrollResponse = r.json();
        client(&e.ca_pem, Some((&e.certificate_pem, &key)))
    }

    /// The agent's report; the controller's answer.
    async fn report(&self, agent: &ClientConfig, release: Option<ReleaseState>) -> ReportResponse {
        let rep = Report { release, ..Report::default() };
        let r =
            request(self.agent, agent.clone(), "POST", "/agent/v1/report", json_body(&rep), None)
                .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    async fn download(&self, agent: &ClientConfig, release: u64) -> Resp {
        let path = format!("/agent/v1/releases/{release}/bundle");
        request(self.agent, agent.clone(), "GET", &path, None, None).await
    }
}

fn running(release: u64) -> ReleaseState {
    ReleaseState { release, slot: "a".into(), ..ReleaseState::default() }
}

fn error_of(r: &Resp) -> ApiError {
    r.json()
}

fn write_key(dir: &Path, key: &SigningKey) -> std::path::PathBuf {
    let p = dir.join("image-signing.pub");
    std::fs::write(&p, format!("{}\n", pub_hex(key))).unwrap();
    p
}

struct InProcess {
    dir: tempfile::TempDir,
    started: Started,
    api: Api,
}

async fn start(update_key: bool) -> InProcess {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControllerConfig {
        update_key: update_key.then(|| write_key(dir.path(), &key())),
        ..common::config(dir.path().join("data"))
    };
    let started = common::start(cfg).await;
    let pw = started.bootstrap.clone().unwrap();
    let ca = started.state.ca.cert_pem().to_owned();
    let api = Api::login(started.main_addr, started.agent_addr, ca, "admin", &pw).await;
    InProcess { dir, started, api }
}

fn stored_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("data/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---- tests ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_verified_and_stored_once() {
    let c = start(true).await;
    let api = &c.api;
    let good = bundle(&key(), 7, 1, Defect::default());

    let r = api.upload(good.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v: ReleaseView = r.json();
    assert_eq!((v.release, v.image_version.as_str()), (7, "0.1.0+r7"));
    assert_eq!((v.size, v.sha256.clone()), (good.len() as u64, rel::hex(&Sha256::digest(&good))));
    assert_eq!(v.uploaded_by, "admin");
    assert_eq!(stored_files(c.dir.path()), vec!["7.bundle".to_owned()]);
    assert_eq!(std::fs::read(c.dir.path().join("data/releases/7.bundle")).unwrap(), good);

    // The same bytes again: idempotent.
    let r = api.upload(good.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json::<ReleaseView>(), v);
    // The same release with other bytes: conflict, the stored one stays.
    let r = api.upload(bundle(&key(), 7, 2, Defect::default())).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(error_of(&r).error, "conflict");
    assert_eq!(std::fs::read(c.dir.path().join("data/releases/7.bundle")).unwrap(), good);

    // Refused bundles: 422 with the reason, nothing stored.
    let other = SigningKey::from_bytes(&[1; 32]);
    let cases = [
        (bundle(&key(), 8, 1, Defect { unsigned: true, ..Defect::default() }), "not signed"),
        (bundle(&other, 8, 1, Defect::default()), "does not verify with the update key"),
        (
            bundle(&key(), 8, 1, Defect { tampered_root: true, ..Defect::default() }),
            "root.img does not match the manifest",
        ),
        (b"not a bundle at all".to_vec(), "not an update bundle"),
    ];
    for (b, why) in cases {
        let r = api.upload(b).await;
        assert_eq!(r.status, 422, "{why}: {}", r.text());
        let e = error_of(&r);
        assert_eq!(e.error, "invalid_bundle");
        assert!(e.message.contains(why), "{why}: {}", e.message);
    }
    assert_eq!(stored_files(c.dir.path()), vec!["7.bundle".to_owned()], "no temp file stays");
    let o = api.overview().await;
    assert!(o.uploads_enabled);
    assert_eq!(o.releases.iter().map(|r| r.release).collect::<Vec<_>>(), vec![7]);

    // Non-admins may look but not change.
    let store = &c.started.state.store;
    airlock_controller::auth::set_password(
        store,
        "audit",
        "audit-password-1",
        &[airlock_controller::auth::Role::Auditor],
        1,
    )
    .unwrap();
    let auditor =
        Api::login(api.main, api.agent, api.ca.clone(), "audit", "audit-password-1").await;
    assert_eq!(auditor.overview().await.releases.len(), 1);
    let r = auditor.upload(bundle(&key(), 9, 1, Defect::default())).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = auditor.rollout(serde_json::json!({"release": 7})).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = auditor.call("DELETE", "/api/v1/rollout", None).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(stored_files(c.dir.path()), vec!["7.bundle".to_owned()]);

    // The API document lists the routes.
    let r = api.call("GET", "/api/v1/openapi.json", None).await;
    for p in ["\"/api/v1/releases\"", "\"/api/v1/rollout\"", "ReportResponse"] {
        assert!(r.text().contains(p), "OpenAPI lists {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_update_key_uploads_are_refused() {
    let c = start(false).await;
    let r = c.api.upload(bundle(&key(), 1, 1, Defect::default())).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let e = error_of(&r);
    assert!(e.message.contains("update_key"), "the message names the setting: {}", e.message);
    assert!(!c.api.overview().await.uploads_enabled);
    assert!(stored_files(c.dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_offers_the_release_in_report_answers_and_serves_it() {
    let c = start(true).await;
    let api = &c.api;
    let good = bundle(&key(), 7, 1, Defect::default());
    assert_eq!(api.upload(good.clone()).await.status, 201);
    let w1 = api.enroll("ward-1").await;
    let w2 = api.enroll("ward-2").await;

    // No rollout: no offer.
    assert_eq!(api.report(&w1, Some(running(6))).await.update, None);

    // Unknown release or appliance: refused, nothing changes.
    let r = api.rollout(serde_json::json!({"release": 99})).await;
    assert_eq!((r.status, error_of(&r).error.as_str()), (422, "unknown_release"));
    let r =
        api.rollout(serde_json::json!({"release": 7, "appliances": ["ward-1", "ward-x"]})).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(error_of(&r).message.contains("ward-x"), "{}", r.text());
    assert_eq!(api.overview().await.rollout, None);

    let r = api.rollout(serde_json::json!({"release": 7, "appliances": ["ward-1"]})).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // An older release gets the offer.
    let offer = api.report(&w1, Some(running(6))).await.update.expect("offered");
    assert_eq!(offer.release, 7);
    assert_eq!(offer.image_version, "0.1.0+r7");
    assert_eq!(offer.size, good.len() as u64);
    assert_eq!(offer.sha256, rel::hex(&Sha256::digest(&good)));
    assert_eq!(offer.path, "/agent/v1/releases/7/bundle");

    // The download is exactly the upload.
    let d = api.download(&w1, 7).await;
    assert_eq!(d.status, 200, "{}", d.text());
    assert_eq!(d.headers["content-length"], good.len().to_string().as_str());
    assert_eq!(d.body, good);
    // Not offered: another release, another appliance.
    assert_eq!(api.download(&w1, 6).await.status, 404);
    assert_eq!(api.report(&w2, Some(running(6))).await.update, None, "not in the rollout");
    assert_eq!(api.download(&w2, 7).await.status, 404);

    // No offer: target failed its trial here, no image, already pending, current.
    let failed = ReleaseState { failed_trials: vec![7], ..running(6) };
    assert_eq!(api.report(&w1, Some(failed)).await.update, None);
    assert_eq!(api.download(&w1, 7).await.status, 404, "no offer after that report");
    assert_eq!(api.report(&w1, None).await.update, None);
    let pending = ReleaseState { pending: Some(7), ..running(6) };
    assert_eq!(api.report(&w1, Some(pending.clone())).await.update, None);
    assert_eq!(api.report(&w1, Some(running(7))).await.update, None);

    // The overview shows each appliance's image and progress.
    api.report(&w1, Some(pending)).await;
    let o = api.overview().await;
    assert_eq!(o.rollout.as_ref().map(|r| r.release), Some(7));
    let p: Vec<_> = o.appliances.iter().map(|a| (a.appliance.as_str(), a.progress)).collect();
    assert_eq!(
        p,
        vec![("ward-1", RolloutProgress::Pending), ("ward-2", RolloutProgress::NotTargeted)]
    );
    assert_eq!(o.appliances[0].image.as_ref().and_then(|i| i.pending), Some(7));

    // Every appliance; then stopped.
    let r = api.rollout(serde_json::json!({"release": 7})).await;
    assert_eq!(r.status, 200);
    assert!(api.report(&w2, Some(running(6))).await.update.is_some());
    let r = api.call("DELETE", "/api/v1/rollout", None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(api.report(&w2, Some(running(6))).await.update, None);
    assert_eq!(api.download(&w2, 7).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_and_the_rollout_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("controller.toml");
    let keyfile = write_key(dir.path(), &key());
    std::fs::write(&cfg, format!("update_key = {:?}\n", keyfile.display().to_string())).unwrap();
    let bin = Binary::new(dir.path(), Some(cfg));
    let mut child = bin.spawn();
    let (main, agent) = bin.wait_ready();
    let password = bootstrap_password(&mut child);
    let ca = bin.ca_pem();
    let api = Api::login(main, agent, ca.clone(), "admin", &password).await;
    let good = bundle(&key(), 3, 5, Defect::default());
    assert_eq!(api.upload(good.clone()).await.status, 201);
    let w = api.enroll("ward-7").await;
    assert_eq!(
        api.rollout(serde_json::json!({"release": 3, "appliances": ["ward-7"]})).await.status,
        200
    );
    let before = api.overview().await;
    child.kill().unwrap(); // SIGKILL: acknowledged writes must be on disk
    child.wait().unwrap();

    let mut child = bin.spawn();
    let (main, agent) = bin.wait_ready();
    let api = Api::login(main, agent, ca, "admin", &password).await;
    let after = api.overview().await;
    assert_eq!(after.releases, before.releases);
    assert_eq!(after.rollout, before.rollout);
    let offer = api.report(&w, Some(running(2))).await.update.expect("still offered");
    assert_eq!(offer.release, 3);
    let d = api.download(&w, 3).await;
    assert_eq!((d.status, d.body == good), (200, true));
    child.kill().unwrap();
    child.wait().unwrap();
}
