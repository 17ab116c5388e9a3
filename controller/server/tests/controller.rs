//! The controller end to end: a real controller (in-process, or the binary
//! for the crash test) over real TLS, a real encrypted store with the
//! built-in KMS, clients speaking HTTPS through rustls and openssl s_client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use airlock_controller::{config::ControllerConfig, run::Started};
use airlock_proto::{
    admin::{ApiError, EnrollmentToken, PolicyVersionSummary, ValidationReport},
    agent::{EnrollResponse, StreamMessage},
    SignedBundle,
};
use common::{bootstrap_password, client, key_and_csr, pem_to_der, Binary};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Request};
use rustls::ClientConfig;
use tokio::net::TcpStream;

struct Ctl {
    _dir: tempfile::TempDir,
    started: Started,
    token: String,
}

async fn start() -> Ctl {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControllerConfig {
        http_redirect_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..common::config(dir.path().into())
    };
    let started = common::start(cfg).await;
    let pw = started.bootstrap.clone().expect("first start prints a bootstrap credential");
    let mut c = Ctl { _dir: dir, started, token: String::new() };
    let (s, body) = c
        .call(
            "POST",
            "/api/v1/login",
            Some(&format!(r#"{{"user":"admin","password":"{pw}"}}"#)),
            false,
        )
        .await;
    assert_eq!(s, 200, "{body}");
    c.token =
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"].as_str().unwrap().into();
    c
}

/// One HTTP/1.1 request over a fresh TLS connection; `Err` when the TLS
/// handshake or the exchange fails.
async fn request(
    addr: SocketAddr,
    tls: ClientConfig,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
) -> Result<(u16, hyper::body::Incoming), String> {
    let body = body.map(|b| ("application/json", b.as_bytes().to_vec()));
    let resp = common::send(addr, tls, method, path, body, bearer).await?;
    Ok((resp.status().as_u16(), resp.into_body()))
}

async fn text(b: hyper::body::Incoming) -> String {
    String::from_utf8(b.collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

impl Ctl {
    fn ca(&self) -> String {
        self.started.state.ca.cert_pem().to_owned()
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: bool,
    ) -> (u16, String) {
        let tls = client(self.started.state.ca.cert_pem(), None);
        let bearer = auth.then_some(self.token.as_str());
        let (s, b) =
            request(self.started.main_addr, tls, method, path, body, bearer).await.unwrap();
        (s, text(b).await)
    }

    async fn token_for(&self, id: &str) -> EnrollmentToken {
        let (s, b) = self
            .call("POST", "/api/v1/appliances", Some(&format!(r#"{{"id":"{id}"}}"#)), true)
            .await;
        assert_eq!(s, 201, "{b}");
        serde_json::from_str(&b).unwrap()
    }

    async fn enroll(&self, token: &str) -> (u16, String, rcgen::KeyPair) {
        let (key, csr) = key_and_csr();
        let body = serde_json::json!({"token": token, "csr_pem": csr, "agent_version": "test"})
            .to_string();
        let (s, b) = self.call("POST", "/api/v1/enroll", Some(&body), false).await;
        (s, b, key)
    }
}

fn lab_policy() -> String {
    serde_json::json!({"text": common::lab_policy_text(), "comment": "test"}).to_string()
}

async fn next_message(body: &mut hyper::body::Incoming, buf: &mut Vec<u8>) -> StreamMessage {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return serde_json::from_slice(&line).unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(15), body.frame())
            .await
            .expect("stream stalled");
        let frame = frame.expect("stream ended").unwrap();
        if let Ok(d) = frame.into_data() {
            buf.extend_from_slice(&d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_then_policy_pushes_signed_bundles_over_mtls() {
    let c = start().await;
    let t = c.token_for("lab-appliance").await;
    assert_eq!(t.ca_fingerprint, airlock_proto::ca_fingerprint(&pem_to_der(&c.ca())));
    assert!(
        t.command.contains("--token-stdin") && !t.command.contains(&t.token),
        "the command never embeds the token"
    );
    let (s, b, key) = c.enroll(&t.token).await;
    assert_eq!(s, 200, "{b}");
    let e: EnrollResponse = serde_json::from_str(&b).unwrap();
    assert_eq!(e.appliance, "lab-appliance");
    let bundle_key = {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.decode(&e.bundle_key).unwrap();
        ed25519_dalek::VerifyingKey::from_bytes(&raw.try_into().unwrap()).unwrap()
    };

    let tls = client(&e.ca_pem, Some((&e.certificate_pem, &key)));
    let (s, mut body) =
        request(c.started.agent_addr, tls, "GET", "/agent/v1/stream", None, None).await.unwrap();
    assert_eq!(s, 200);
    let mut buf = Vec::new();
    let StreamMessage::Bundle(first) = next_message(&mut body, &mut buf).await else {
        panic!("bundle first")
    };
    let b0 = first.verify(&bundle_key, "lab-appliance", None).unwrap();
    assert!(b0.entries.is_empty(), "no policy yet: everything dropped");

    // An invalid policy is refused with located problems, and nothing is applied.
    let bad =
        serde_json::json!({"text": "version = 1\n[site]\nname = 3\n", "comment": "x"}).to_string();
    let (s, body_txt) = c.call("POST", "/api/v1/policy", Some(&bad), true).await;
    assert_eq!(s, 422, "{body_txt}");
    let err: ApiError = serde_json::from_str(&body_txt).unwrap();
    assert!(!err.problems.is_empty() && err.problems[0].line.is_some(), "{err:?}");
    let (_, v) = c.call("POST", "/api/v1/policy/validate", Some(&bad), true).await;
    assert!(!serde_json::from_str::<ValidationReport>(&v).unwrap().ok);

    let (s, applied) = c.call("POST", "/api/v1/policy", Some(&lab_policy()), true).await;
    assert_eq!(s, 201, "{applied}");
    let v1: PolicyVersionSummary = serde_json::from_str(&applied).unwrap();
    let StreamMessage::Bundle(second) = next_message(&mut body, &mut buf).await else {
        panic!("bundle pushed")
    };
    let b1 = second.verify(&bundle_key, "lab-appliance", Some(b0.version)).unwrap();
    assert!(b1.version > b0.version);
    assert_eq!(b1.policy_version, v1.version);
    assert!(!b1.entries.is_empty(), "the lab policy opens flows");
    // The older bundle is refused once the newer one is applied.
    assert!(matches!(
        first.verify(&bundle_key, "lab-appliance", Some(b1.version)),
        Err(airlock_proto::BundleError::Older { .. })
    ));

    // Rollback is a new version with the old content: a new, higher bundle.
    let (s, rb) =
        c.call("POST", "/api/v1/policy/rollback", Some(r#"{"to_version":1}"#), true).await;
    assert_eq!(s, 201, "{rb}");
    let rb: PolicyVersionSummary = serde_json::from_str(&rb).unwrap();
    assert_eq!((rb.version, rb.rollback_of), (2, Some(1)));
    let StreamMessage::Bundle(third) = next_message(&mut body, &mut buf).await else {
        panic!("bundle pushed")
    };
    let b2: airlock_proto::PolicyBundle =
        third.verify(&bundle_key, "lab-appliance", Some(b1.version)).unwrap();
    assert!(b2.version > b1.version);
    let flows = |b: &airlock_proto::PolicyBundle| {
        b.entries.iter().map(|e| (e.flow, e.rule_id, e.expires_unix)).collect::<Vec<_>>()
    };
    assert_eq!(flows(&b2), flows(&b1), "same content");
    assert_eq!(b2.policy_version, 2);
    let _: SignedBundle = third;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_listener_refuses_no_foreign_and_revoked_certificates() {
    let c = start().await;
    let t = c.token_for("ward-1").await;
    let (s, b, key) = c.enroll(&t.token).await;
    assert_eq!(s, 200, "{b}");
    let e: EnrollResponse = serde_json::from_str(&b).unwrap();
    let agent = c.started.agent_addr;
    // One client configuration throughout: it would resume sessions if the
    // server allowed it (a resumed session skips the certificate check).
    let mine = client(&e.ca_pem, Some((&e.certificate_pem, &key)));
    let ok = request(agent, mine.clone(), "GET", "/agent/v1/stream", None, None).await;
    assert_eq!(ok.map(|r| r.0), Ok(200));
    // A keep-alive connection opened before the revocation.
    let mut kept = common::connect(agent, mine.clone()).await.unwrap();
    let report = || {
        let body = serde_json::to_vec(&airlock_proto::agent::Report::default()).unwrap();
        Request::builder()
            .method("POST")
            .uri("/agent/v1/report")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    // 200 with a ReportResponse (no update: this agent reports no image).
    assert_eq!(kept.send_request(report()).await.unwrap().status(), 200);

    // No certificate.
    let none = request(agent, client(&e.ca_pem, None), "GET", "/agent/v1/stream", None, None).await;
    assert!(none.is_err(), "no client certificate must be refused: {:?}", none.map(|r| r.0));

    // A certificate from another CA, same name.
    let fkey = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "ward-1");
    let foreign = p.self_signed(&fkey).unwrap();
    let r = request(
        agent,
        client(&e.ca_pem, Some((&foreign.pem(), &fkey))),
        "GET",
        "/agent/v1/stream",
        None,
        None,
    )
    .await;
    assert!(r.is_err(), "a foreign certificate must be refused");

    // Revoked: the same certificate that worked is refused at the next handshake.
    let (s, b) = c.call("POST", "/api/v1/appliances/ward-1/revoke", Some(""), true).await;
    assert_eq!(s, 200, "{b}");
    let r = request(agent, mine, "GET", "/agent/v1/stream", None, None).await;
    assert!(r.is_err(), "a revoked appliance must be refused, also when it tries to resume");
    let again = kept.send_request(report()).await.map(|r| r.status().as_u16());
    assert!(
        matches!(again, Ok(403) | Err(_)),
        "a connection opened before the revocation is refused too: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_enrolls_exactly_one_appliance_under_concurrency() {
    let c = Arc::new(start().await);
    let t = c.token_for("ward-2").await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (c, tok) = (c.clone(), t.token.clone());
        tasks.push(tokio::spawn(async move { c.enroll(&tok).await.0 }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 409), "{codes:?}");
    // A replay is told the token was used; an unknown token is refused.
    let (s, b, _) = c.enroll(&t.token).await;
    assert_eq!(s, 409);
    assert_eq!(serde_json::from_str::<ApiError>(&b).unwrap().error, "token_used");
    let (s, _, _) = c.enroll("not-a-token").await;
    assert_eq!(s, 401);
    // An expired token (time moved past its end) gets its own error.
    let (tok, exp) = c.started.state.appliances.create("ward-3", Some(3600), 1_000).unwrap();
    let err = c
        .started
        .state
        .appliances
        .enroll(&c.started.state.ca, &c.started.state.registry, &tok, "x", exp)
        .unwrap_err();
    assert!(matches!(err, airlock_controller::appliances::ApplianceError::TokenExpired), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_a_session_and_tls_below_1_2_is_refused() {
    let c = start().await;
    let (s, _) = c.call("GET", "/api/v1/appliances", None, false).await;
    assert_eq!(s, 401);
    let (s, doc) = c.call("GET", "/api/v1/openapi.json", None, false).await;
    assert_eq!(s, 200);
    for p in ["/api/v1/appliances", "/api/v1/policy", "/api/v1/enroll", "/api/v1/policy/rollback"] {
        assert!(doc.contains(&format!("\"{p}\"")), "OpenAPI lists {p}");
    }
    let (s, m) = c.call("GET", "/metrics", None, true).await;
    assert!(s == 200 && m.contains("airlock_http_responses_total"), "{m}");

    let port = c.started.main_addr.port().to_string();
    let s_client = |args: &[&str]| {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        let all = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        // A session was set up when a cipher was agreed.
        // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384" once a session is
        // set up; "New, (NONE), Cipher is (NONE)" when refused.
        let agreed = all.lines().any(|l| l.contains("Cipher is ") && !l.contains("(NONE)"));
        (agreed, all)
    };
    for old in
        [["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"], ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]]
    {
        let (agreed, out) = s_client(&old);
        assert!(!agreed, "{old:?} must be refused:\n{out}");
    }
    let (agreed, out) = s_client(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]);
    assert!(!agreed, "CBC suites must be refused:\n{out}");
    for good in [["-tls1_2"], ["-tls1_3"]] {
        let (agreed, out) = s_client(&good);
        assert!(agreed, "{good:?} must work:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::new(dir.path(), None);
    let mut child = bin.spawn();
    let (addr, _) = bin.wait_ready();
    let password = bootstrap_password(&mut child);
    let ca_pem = bin.ca_pem();
    let login = |addr: SocketAddr, ca: String, password: String| async move {
        let body = format!(r#"{{"user":"admin","password":"{password}"}}"#);
        let (s, b) = request(addr, client(&ca, None), "POST", "/api/v1/login", Some(&body), None)
            .await
            .unwrap();
        assert_eq!(s, 200);
        serde_json::from_str::<serde_json::Value>(&text(b).await).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let token = login(addr, ca_pem.clone(), password.clone()).await;

    // Four writers create appliances as fast as they can; every 201 is an acknowledged write.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acked, token, ca) = (acked.clone(), token.clone(), ca_pem.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("w{w}-{i}");
                let body = format!(r#"{{"id":"{id}"}}"#);
                match request(
                    addr,
                    client(&ca, None),
                    "POST",
                    "/api/v1/appliances",
                    Some(&body),
                    Some(&token),
                )
                .await
                {
                    Ok((201, _)) => acked.lock().unwrap().push(id),
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 10, "the writers made progress ({})", acked.len());
    eprintln!("acknowledged writes before SIGKILL: {}", acked.len());

    let mut child = bin.spawn();
    let (addr, _) = bin.wait_ready();
    let token = login(addr, ca_pem.clone(), password).await;
    let (s, b) =
        request(addr, client(&ca_pem, None), "GET", "/api/v1/appliances", None, Some(&token))
            .await
            .unwrap();
    assert_eq!(s, 200);
    let list: Vec<airlock_proto::admin::ApplianceView> =
        serde_json::from_str(&text(b).await).unwrap();
    let have: std::collections::BTreeSet<String> = list.into_iter().map(|a| a.id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !have.contains(*id)).collect();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_redirects_to_https() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let c = start().await;
    let mut tcp = TcpStream::connect(c.started.redirect_addr.unwrap()).await.unwrap();
    tcp.write_all(b"GET /api/v1/appliances?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    let want =
        format!("location: https://127.0.0.1:{}/api/v1/appliances?x=1", c.started.main_addr.port());
    assert!(out.to_lowercase().contains(&want), "{out}");
    assert!(!out.contains("\"id\""), "no data over plain HTTP");
}
