//! The client against a stand-in controller over real TLS on 127.0.0.1:
//! the same protocol as `airlock-proto` describes (main listener with server
//! authentication only, agent listener requiring a client certificate), an
//! rcgen CA that signs the agent's CSRs, and Ed25519-signed bundles.

use std::{convert::Infallible, sync::Arc, time::Duration};

use airlock_proto::{
    admin::ApiError,
    agent::{EnrollRequest, EnrollResponse, Health, RenewRequest, RenewResponse, Report},
    release::{ReportResponse, UpdateOffer},
    PolicyBundle,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{body::Bytes, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
    ServerConfig,
};
use tokio::sync::{mpsc, Mutex};

use super::{
    client::{self, ClientError},
    identity::{self, Identity, IdentityPaths},
    sync::{self, Decision, SyncEvent},
    tls, ControllerError, Shared, Token,
};
use crate::config::AgentConfig;

type Body = BoxBody<Bytes, Infallible>;
/// A served download: path, bytes, and after how many bytes it stalls.
type Download = (String, Vec<u8>, Option<usize>);

struct Fake {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    bundle_key: ed25519_dalek::SigningKey,
    used_tokens: Mutex<Vec<String>>,
    reports: mpsc::UnboundedSender<Report>,
    streams: mpsc::UnboundedSender<http_body_util::channel::Sender<Bytes, Infallible>>,
    agent_url: String,
    /// The update offered in answers to reports (`None`: 204, as before updates).
    offer: std::sync::Mutex<Option<UpdateOffer>>,
    /// A download: its path, its bytes, and after how many it stalls.
    download: std::sync::Mutex<Option<Download>>,
    /// Senders of stalled downloads, kept open.
    stalled: std::sync::Mutex<Vec<http_body_util::channel::Sender<Bytes, Infallible>>>,
}

fn full(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r
}

fn api_error(status: StatusCode, code: &str) -> Response<Body> {
    let e =
        ApiError { error: code.into(), message: format!("{code} (stand-in)"), problems: vec![] };
    full(status, serde_json::to_vec(&e).unwrap())
}

impl Fake {
    fn sign_csr(&self, csr_pem: &str, days: i64) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let now = time_now();
        csr.params.not_before = now - time::Duration::days(1);
        csr.params.not_after = now + time::Duration::days(days);
        csr.signed_by(&self.issuer).unwrap().pem()
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        match path.as_str() {
            "/api/v1/enroll" => {
                let r: EnrollRequest = serde_json::from_slice(&body).unwrap();
                if r.token != "good-token" && r.token != "second-token" {
                    return api_error(StatusCode::UNAUTHORIZED, "invalid_token");
                }
                let mut used = self.used_tokens.lock().await;
                if used.contains(&r.token) {
                    return api_error(StatusCode::CONFLICT, "token_used");
                }
                used.push(r.token);
                let resp = EnrollResponse {
                    appliance: "ward-3".into(),
                    certificate_pem: self.sign_csr(&r.csr_pem, 30),
                    ca_pem: self.ca_pem.clone(),
                    bundle_key: B64.encode(self.bundle_key.verifying_key().as_bytes()),
                    agent_url: self.agent_url.clone(),
                };
                full(StatusCode::OK, serde_json::to_vec(&resp).unwrap())
            }
            "/agent/v1/renew" => {
                let r: RenewRequest = serde_json::from_slice(&body).unwrap();
                let resp = RenewResponse { certificate_pem: self.sign_csr(&r.csr_pem, 60) };
                full(StatusCode::OK, serde_json::to_vec(&resp).unwrap())
            }
            "/agent/v1/report" => {
                let _ = self.reports.send(serde_json::from_slice(&body).unwrap());
                match self.offer.lock().unwrap().clone() {
                    None => full(StatusCode::NO_CONTENT, vec![]),
                    Some(o) => {
                        let r = ReportResponse { update: Some(o) };
                        full(StatusCode::OK, serde_json::to_vec(&r).unwrap())
                    }
                }
            }
            p if self.download.lock().unwrap().as_ref().is_some_and(|d| d.0 == p) => {
                let Some((_, data, stall)) = self.download.lock().unwrap().clone() else {
                    return api_error(StatusCode::NOT_FOUND, "not_found");
                };
                let len = data.len();
                let mut r = match stall {
                    None => full(StatusCode::OK, data),
                    Some(n) => {
                        let (mut tx, body) = http_body_util::channel::Channel::new(2);
                        tx.send_data(Bytes::from(data[..n].to_vec())).await.unwrap();
                        self.stalled.lock().unwrap().push(tx);
                        Response::new(body.boxed())
                    }
                };
                r.headers_mut().insert(hyper::header::CONTENT_LENGTH, len.into());
                r
            }
            "/agent/v1/stream" => {
                let (tx, body) = http_body_util::channel::Channel::new(8);
                let _ = self.streams.send(tx);
                let mut r = Response::new(body.boxed());
                r.headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, "application/x-ndjson".parse().unwrap());
                r
            }
            _ => api_error(StatusCode::NOT_FOUND, "not_found"),
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(super::unix_now() as i64).unwrap()
}

fn server_config(
    issuer: &Issuer<'static, KeyPair>,
    ca_der: &[u8],
    client_auth: bool,
) -> Arc<ServerConfig> {
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "controller.test".to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    let chain =
        vec![CertificateDer::from(leaf.der().to_vec()), CertificateDer::from(ca_der.to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let b = ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = if client_auth {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
        b.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
                .build()
                .unwrap(),
        )
    } else {
        b.with_no_client_auth()
    };
    Arc::new(b.with_single_cert(chain, key).unwrap())
}

async fn listen(fake: Arc<Fake>, cfg: Arc<ServerConfig>, l: tokio::net::TcpListener) {
    loop {
        let Ok((tcp, _)) = l.accept().await else { return };
        let (fake, acceptor) =
            (Arc::clone(&fake), tokio_rustls::TlsAcceptor::from(Arc::clone(&cfg)));
        tokio::spawn(async move {
            // A refused handshake (no client certificate, wrong pin) just ends here.
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let svc = hyper::service::service_fn(move |req| {
                let fake = Arc::clone(&fake);
                async move { Ok::<_, Infallible>(fake.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

struct Running {
    fake: Arc<Fake>,
    main_url: String,
    fingerprint: String,
    reports: mpsc::UnboundedReceiver<Report>,
    streams: mpsc::UnboundedReceiver<http_body_util::channel::Sender<Bytes, Infallible>>,
}

async fn start() -> Running {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let ca_der = ca.der().to_vec();
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (rtx, reports) = mpsc::unbounded_channel();
    let (stx, streams) = mpsc::unbounded_channel();
    let main_cfg = server_config(&issuer, &ca_der, false);
    let agent_cfg = server_config(&issuer, &ca_der, true);
    let fake = Arc::new(Fake {
        issuer,
        ca_pem: ca.pem(),
        bundle_key: ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
        used_tokens: Mutex::new(Vec::new()),
        reports: rtx,
        streams: stx,
        agent_url: format!("https://127.0.0.1:{}", agent.local_addr().unwrap().port()),
        offer: std::sync::Mutex::new(None),
        download: std::sync::Mutex::new(None),
        stalled: std::sync::Mutex::new(Vec::new()),
    });
    let main_url = format!("https://127.0.0.1:{}", main.local_addr().unwrap().port());
    tokio::spawn(listen(Arc::clone(&fake), main_cfg, main));
    tokio::spawn(listen(Arc::clone(&fake), agent_cfg, agent));
    Running {
        fingerprint: airlock_proto::ca_fingerprint(&ca_der),
        fake,
        main_url,
        reports,
        streams,
    }
}

fn agent_config(tag: &str) -> (AgentConfig, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("airlock-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "[appliance]\nname = \"ward-3\"\nstate_dir = \"{}\"\n\
         [[port]]\nname = \"airlock-test-p\"\nrole = \"patient\"\n\
         [[port]]\nname = \"airlock-test-u\"\nrole = \"uplink\"\n",
        dir.display()
    );
    (AgentConfig::parse(&text).unwrap(), dir)
}

fn token(s: &str) -> Token {
    Token::parse(s, "test").unwrap()
}

#[tokio::test]
async fn enrollment_is_pinned_single_use_and_stores_the_identity() {
    let mut c = start().await;
    let (cfg, dir) = agent_config("enroll");
    let paths = IdentityPaths::new(&cfg.appliance.state_dir);

    // A wrong pin: the TLS handshake fails, nothing is written.
    let wrong = format!("sha256:{}", "00".repeat(32));
    let e = super::enroll(&cfg, &c.main_url, &wrong, &token("good-token")).await.unwrap_err();
    assert!(matches!(e, ControllerError::Client(ClientError::PinMismatch { .. })), "{e:?}");
    assert!(e.is_refusal(), "a wrong pin is final");
    assert!(!paths.dir().exists());

    // An unknown token: a clear, final refusal.
    let e = super::enroll(&cfg, &c.main_url, &c.fingerprint, &token("bad")).await.unwrap_err();
    assert!(e.is_refusal(), "{e:?}");
    assert!(e.to_string().contains("invalid_token"), "{e}");
    assert!(!e.to_string().contains("bad"), "the token must not be echoed: {e}");

    let id = super::enroll(&cfg, &c.main_url, &c.fingerprint, &token("good-token")).await.unwrap();
    assert_eq!(id.record.appliance, "ward-3");
    assert_eq!(id.record.ca_fingerprint, c.fingerprint);
    let loaded = Identity::load(&paths).unwrap().unwrap();
    assert_eq!(loaded.cert_pem, id.cert_pem);
    assert_eq!(loaded.bundle_key, c.fake.bundle_key.verifying_key());
    let mode = |p: std::path::PathBuf| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(paths.key()), 0o600);
    assert_eq!(mode(paths.dir().to_owned()), 0o700);

    // Enrolled: refused locally, before any token is sent.
    let e = super::enroll(&cfg, &c.main_url, &c.fingerprint, &token("second-token")).await;
    assert!(matches!(e, Err(ControllerError::AlreadyEnrolled(_))), "{e:?}");
    // A replayed token is refused by the controller with its code.
    let (cfg2, dir2) = agent_config("enroll-replay");
    let e =
        super::enroll(&cfg2, &c.main_url, &c.fingerprint, &token("good-token")).await.unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("token_used"), "{e}");

    // The agent listener requires the client certificate.
    let agent = client::Endpoint::parse(&c.fake.agent_url).unwrap();
    let anon = tls::enroll_config(crate::controller::parse_pin(&c.fingerprint).unwrap()).unwrap();
    assert!(client::open_stream(anon, &agent).await.is_err());
    assert!(c.reports.try_recv().is_err());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[tokio::test]
async fn bundles_stream_in_reports_go_out_and_the_certificate_renews() {
    let mut c = start().await;
    let (cfg, dir) = agent_config("stream");
    let id = super::enroll(&cfg, &c.main_url, &c.fingerprint, &token("good-token")).await.unwrap();
    let shared = Arc::new(Shared::new(&id, IdentityPaths::new(&cfg.appliance.state_dir)).unwrap());

    // The stream: a bundle split across frames, a heartbeat, a second bundle.
    let (tx, mut events) = mpsc::channel(4);
    let task = tokio::spawn(sync::stream_task(Arc::clone(&shared), tx));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), c.streams.recv()).await.unwrap().unwrap();
    assert!(matches!(events.recv().await, Some(SyncEvent::Connected)));
    let bundle = |version| {
        PolicyBundle {
            format: airlock_proto::BUNDLE_FORMAT,
            appliance: "ward-3".into(),
            version,
            policy_version: 2,
            issued_at: super::unix_now(),
            entries: vec![],
        }
        .sign(&c.fake.bundle_key)
    };
    let line =
        serde_json::to_string(&airlock_proto::agent::StreamMessage::Bundle(bundle(1))).unwrap();
    let (a, b) = line.split_at(line.len() / 2);
    stream.send_data(Bytes::from(a.to_owned())).await.unwrap();
    stream
        .send_data(Bytes::from(format!("{b}\n{{\"type\":\"heartbeat\",\"at\":1}}\n")))
        .await
        .unwrap();
    let Some(SyncEvent::Bundle(got)) = events.recv().await else { panic!("no bundle") };
    let key = id.bundle_key;
    assert!(
        matches!(sync::decide(&got, &key, "ward-3", None), Decision::Apply(b) if b.version == 1)
    );
    let line =
        serde_json::to_string(&airlock_proto::agent::StreamMessage::Bundle(bundle(2))).unwrap();
    stream.send_data(Bytes::from(format!("{line}\n"))).await.unwrap();
    let Some(SyncEvent::Bundle(got)) = events.recv().await else { panic!("no bundle") };
    assert_eq!(got.version, 2);
    // The controller goes away: the task reports it and reconnects.
    drop(stream);
    assert!(matches!(events.recv().await, Some(SyncEvent::Disconnected)));
    let again = tokio::time::timeout(Duration::from_secs(10), c.streams.recv()).await.unwrap();
    assert!(again.is_some());
    assert!(matches!(events.recv().await, Some(SyncEvent::Connected)));
    task.abort();

    // A report over mTLS arrives as sent.
    let report = Report {
        applied_version: Some(2),
        policy_version: Some(2),
        refused: None,
        health: Health { enforcing: true, flows: 3, ..Health::default() },
        wireguard_public_key: None,
        release: None,
    };
    let mut conn = client::connect(shared.tls(), &shared.agent).await.unwrap();
    let answer = client::report(&mut conn, &shared.agent, &report).await.unwrap();
    assert_eq!(answer, ReportResponse::default(), "a 204 offers nothing");
    assert_eq!(c.reports.recv().await.unwrap(), report);

    // Renewal: a new key and a 60-day certificate replace the pair on disk,
    // and the new identity is what new connections present.
    let old_key = std::fs::read(shared.paths.key()).unwrap();
    let v = super::renew::renew_once(&shared).await.unwrap();
    assert!(v.not_after - v.not_before > 60 * 86_400);
    assert_eq!(shared.validity(), v);
    assert_ne!(std::fs::read(shared.paths.key()).unwrap(), old_key);
    let renewed = Identity::load(&shared.paths).unwrap().unwrap();
    assert_eq!(renewed.validity, v);
    assert!(!identity::renewal_due(v, super::unix_now() as i64));
    let mut conn = client::connect(shared.tls(), &shared.agent).await.unwrap();
    client::report(&mut conn, &shared.agent, &report).await.unwrap();
    assert!(c.reports.recv().await.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

async fn enrolled(tag: &str) -> (Running, Arc<Shared>, std::path::PathBuf) {
    let c = start().await;
    let (cfg, dir) = agent_config(tag);
    let id = super::enroll(&cfg, &c.main_url, &c.fingerprint, &token("good-token")).await.unwrap();
    let shared = Arc::new(Shared::new(&id, IdentityPaths::new(&cfg.appliance.state_dir)).unwrap());
    (c, shared, dir)
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    crate::update::hex(&sha2::Sha256::digest(b))
}

fn bundle_offer(release: u64, data: &[u8]) -> UpdateOffer {
    UpdateOffer {
        release,
        image_version: format!("0.1.0+r{release}"),
        size: data.len() as u64,
        sha256: sha256_hex(data),
        path: format!("/agent/v1/releases/{release}/bundle"),
    }
}

#[tokio::test]
async fn report_answers_offer_updates_and_the_task_passes_them_on() {
    let (mut c, shared, dir) = enrolled("offer").await;
    let report = Report {
        applied_version: None,
        policy_version: None,
        refused: None,
        health: Health::default(),
        wireguard_public_key: None,
        release: Some(airlock_proto::release::ReleaseState {
            release: 1,
            slot: "a".into(),
            ..Default::default()
        }),
    };
    let mut conn = client::connect(shared.tls(), &shared.agent).await.unwrap();
    assert_eq!(client::report(&mut conn, &shared.agent, &report).await.unwrap().update, None);
    let offer = bundle_offer(2, b"bundle bytes");
    *c.fake.offer.lock().unwrap() = Some(offer.clone());
    let answer = client::report(&mut conn, &shared.agent, &report).await.unwrap();
    assert_eq!(answer.update, Some(offer.clone()), "a 200 with JSON carries the offer");
    assert_eq!(c.reports.recv().await.unwrap().release, report.release);

    // The report task hands every answer's offer to the updater's channel.
    let (reports, report_rx) = tokio::sync::watch::channel(None);
    let (offers, mut offer_rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(super::report::report_task(Arc::clone(&shared), report_rx, offers));
    reports.send_replace(Some(report.clone()));
    tokio::time::timeout(Duration::from_secs(10), offer_rx.changed()).await.unwrap().unwrap();
    assert_eq!(*offer_rx.borrow_and_update(), Some(offer));
    *c.fake.offer.lock().unwrap() = None;
    reports.send_replace(Some(report));
    tokio::time::timeout(Duration::from_secs(10), offer_rx.changed()).await.unwrap().unwrap();
    assert_eq!(*offer_rx.borrow(), None, "a withdrawn offer");
    task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

struct UpdaterRun {
    offers: tokio::sync::watch::Sender<Option<UpdateOffer>>,
    status: tokio::sync::watch::Receiver<super::updater::UpdaterStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl UpdaterRun {
    fn start(shared: &Arc<Shared>, settings: super::updater::Settings) -> Self {
        let (offers, offer_rx) = tokio::sync::watch::channel(None);
        let (status_tx, status) = tokio::sync::watch::channel(Default::default());
        let task = tokio::spawn(super::updater::updater_task(
            Arc::clone(shared),
            settings,
            offer_rx,
            status_tx,
        ));
        Self { offers, status, task }
    }

    async fn wait(
        &mut self,
        what: &str,
        f: impl FnMut(&super::updater::UpdaterStatus) -> bool,
    ) -> super::updater::UpdaterStatus {
        let mut rx = self.status.clone();
        let got = match tokio::time::timeout(Duration::from_secs(30), rx.wait_for(f)).await {
            Ok(r) => r.unwrap().clone(),
            Err(_) => panic!("{what}: {:?}", *self.status.borrow()),
        };
        got
    }
}

fn settings(fx: &crate::update::tests::Fixture, reboot: Vec<String>) -> super::updater::Settings {
    super::updater::Settings {
        enabled: true,
        system: fx.sys.clone(),
        download_dir: fx.dir.join("download"),
        reboot_command: reboot,
        tries: 2,
        stall_limit: Duration::from_secs(1),
        reboot_grace: Duration::ZERO,
    }
}

#[tokio::test]
async fn an_offered_update_is_downloaded_checked_applied_and_rebooted_into() {
    use crate::update::{list_entries, tests::Fixture};
    let (c, shared, dir) = enrolled("update-ok").await;
    let fx = Fixture::new("updater-ok");
    let bundle = std::fs::read(fx.bundle(&fx.manifest(2), Some(&fx.key), &fx.root)).unwrap();
    let offer = bundle_offer(2, &bundle);
    *c.fake.download.lock().unwrap() = Some((offer.path.clone(), bundle, None));
    // A bundle left behind by an earlier run is cleared first.
    let dl = fx.dir.join("download");
    std::fs::create_dir_all(&dl).unwrap();
    std::fs::write(dl.join("9.bundle.part"), b"left over").unwrap();
    let rebooted = fx.dir.join("rebooted");
    let cmd = vec!["touch".to_owned(), rebooted.display().to_string()];
    let mut run = UpdaterRun::start(&shared, settings(&fx, cmd));

    run.offers.send_replace(Some(offer.clone()));
    let st = run.wait("installed", |s| s.pending == Some(2)).await;
    assert_eq!((st.in_progress, st.last_failure), (None, None));
    assert_eq!(
        list_entries(&fx.sys.uki_dir).unwrap(),
        ["airlock-1-a.efi".to_owned(), "airlock-2-b+2.efi".to_owned()]
    );
    let slot_b = std::fs::read(fx.sys.partitions.join("airlock-root-b")).unwrap();
    assert_eq!(&slot_b[..fx.root.len()], &fx.root[..]);
    assert_eq!(list_entries(&dl).unwrap(), Vec::<String>::new(), "the bundle is removed");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !rebooted.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the reboot command ran");
    // The system now shows release 2 pending: the same offer is left alone.
    let state = crate::update::read_release_state(&fx.sys).unwrap().unwrap();
    assert_eq!(state.pending, Some(2));
    std::fs::remove_file(&rebooted).unwrap();
    run.offers.send_replace(Some(offer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rebooted.exists());
    assert_eq!(run.status.borrow().pending, Some(2));
    run.task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_downloads_and_refused_bundles_are_reported_and_write_nothing() {
    use crate::update::{list_entries, tests::Fixture};
    let (c, shared, dir) = enrolled("update-bad").await;
    let fx = Fixture::new("updater-bad");
    let before = (
        std::fs::read(fx.sys.partitions.join("airlock-root-b")).unwrap(),
        list_entries(&fx.sys.uki_dir).unwrap(),
    );
    let dl = fx.dir.join("download");
    let mut run = UpdaterRun::start(&shared, settings(&fx, vec!["false".into()]));
    let good = std::fs::read(fx.bundle(&fx.manifest(2), Some(&fx.key), &fx.root)).unwrap();

    // Bytes other than the offered ones: final for this bundle.
    let mut wrong = bundle_offer(2, &good);
    wrong.sha256 = "00".repeat(32);
    *c.fake.download.lock().unwrap() = Some((wrong.path.clone(), good.clone(), None));
    run.offers.send_replace(Some(wrong.clone()));
    let st = run.wait("checksum", |s| s.last_failure.is_some() && s.in_progress.is_none()).await;
    let f = st.last_failure.unwrap();
    assert_eq!(f.release, 2);
    assert!(f.reason.contains("SHA-256") && f.reason.contains(&"00".repeat(32)), "{}", f.reason);
    assert_eq!(list_entries(&dl).unwrap(), Vec::<String>::new(), "the partial file is removed");

    // A stalled transfer fails after the stall limit and is retried later.
    let stalled = bundle_offer(2, &good);
    *c.fake.download.lock().unwrap() = Some((stalled.path.clone(), good.clone(), Some(1000)));
    run.offers.send_replace(Some(stalled));
    let st = run
        .wait("stall", |s| {
            s.last_failure.as_ref().is_some_and(|f| f.reason.contains("stalled"))
                && s.in_progress.is_none()
        })
        .await;
    assert!(st.last_failure.unwrap().reason.contains("no data for 1 s"));
    assert_eq!(list_entries(&dl).unwrap(), Vec::<String>::new());

    // A bundle signed by another key: the offer matches, apply refuses it.
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let forged = std::fs::read(fx.bundle(&fx.manifest(3), Some(&other), &fx.root)).unwrap();
    let forged_offer = bundle_offer(3, &forged);
    *c.fake.download.lock().unwrap() = Some((forged_offer.path.clone(), forged, None));
    run.offers.send_replace(Some(forged_offer.clone()));
    let st = run
        .wait("refused", |s| {
            s.last_failure.as_ref().is_some_and(|f| f.release == 3) && s.in_progress.is_none()
        })
        .await;
    let f = st.last_failure.unwrap();
    assert!(f.reason.contains("signature does not verify"), "{}", f.reason);
    assert_eq!(st.pending, None);
    assert_eq!(list_entries(&dl).unwrap(), Vec::<String>::new(), "the refused bundle is removed");
    // Not tried again in this run.
    let at = f.at;
    run.offers.send_replace(Some(forged_offer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = run.status.borrow().clone();
    assert_eq!((st.in_progress, st.last_failure.map(|f| f.at)), (None, Some(at)));

    // Disabled updates are reported, not taken.
    run.task.abort();
    let mut off = settings(&fx, vec![]);
    off.enabled = false;
    let mut run = UpdaterRun::start(&shared, off);
    run.offers.send_replace(Some(bundle_offer(2, &good)));
    let st = run.wait("disabled", |s| s.last_failure.is_some()).await;
    assert!(st.last_failure.unwrap().reason.contains("disabled"));
    run.task.abort();

    assert_eq!(
        (
            std::fs::read(fx.sys.partitions.join("airlock-root-b")).unwrap(),
            list_entries(&fx.sys.uki_dir).unwrap()
        ),
        before,
        "nothing was written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
