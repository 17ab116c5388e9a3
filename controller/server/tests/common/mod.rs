//! Helpers shared by the controller's integration tests: an in-process
//! controller, the real binary, TLS client configurations and HTTPS requests.
//! Each test binary uses only some of them.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use airlock_controller::{config::ControllerConfig, run::Started};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, client::conn::http1::SendRequest, Request};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    ClientConfig, RootCertStore,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

// ---- in-process controller ----------------------------------------------------

/// A controller configuration with its data in `data_dir`, listening on
/// ephemeral local ports.
pub fn config(data_dir: PathBuf) -> ControllerConfig {
    ControllerConfig {
        data_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        agent_listen: "127.0.0.1:0".parse().unwrap(),
        ..ControllerConfig::default()
    }
}

/// Starts a controller in-process with the built-in KMS and its store in
/// `data_dir/store`: what the binary does at its first start.
pub async fn start(cfg: ControllerConfig) -> Started {
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let kms = airlock_kms::open(&cfg.kms(), None).unwrap();
    let store = airlock_store::Store::open(&cfg.data_dir.join("store"), kms).unwrap();
    airlock_controller::run::start(cfg, store).await.unwrap()
}

/// The text of the lab policy (policies/lab.toml).
pub fn lab_policy_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/lab.toml"))
        .unwrap()
}

/// A fresh P-256 key and a certificate signing request for it (PEM).
pub fn key_and_csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

// ---- the binary ---------------------------------------------------------------

/// The `airlock-controller` binary serving from `dir/data` on ephemeral
/// ports, announcing itself in `dir/ready`.
pub struct Binary {
    dir: PathBuf,
    config: Option<PathBuf>,
}

impl Binary {
    pub fn new(dir: &Path, config: Option<PathBuf>) -> Self {
        Self { dir: dir.to_owned(), config }
    }

    fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }

    /// Starts the binary (stdout piped for the bootstrap credential).
    pub fn spawn(&self) -> Child {
        let _ = std::fs::remove_file(self.ready());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_airlock-controller"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"]);
        if let Some(cfg) = &self.config {
            cmd.arg("--config").arg(cfg);
        }
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--ready-file")
            .arg(self.ready())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Port 0: the addresses (main, agent) come from the ready file.
    pub fn wait_ready(&self) -> (SocketAddr, SocketAddr) {
        for _ in 0..300 {
            if let Ok(t) = std::fs::read_to_string(self.ready()) {
                let url = |k: &str| {
                    let u = t.lines().find_map(|l| l.strip_prefix(k)).unwrap();
                    u.trim_start_matches("https://").parse::<SocketAddr>().unwrap()
                };
                return (url("url="), url("agent_url="));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("controller did not start");
    }

    /// The CA certificate (PEM) the binary made at its first start.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/ca.pem")).unwrap()
    }
}

/// The bootstrap admin password a first start prints to stdout.
pub fn bootstrap_password(child: &mut Child) -> String {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut password = None;
    let mut line = String::new();
    while password.is_none() && out.read_line(&mut line).unwrap() > 0 {
        password = line.split("password ").nth(1).map(|p| p.trim().to_owned());
        line.clear();
    }
    password.expect("bootstrap credential printed")
}

// ---- HTTPS --------------------------------------------------------------------

pub fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// A client trusting only `ca_pem`, with a client certificate when given.
pub fn client(ca_pem: &str, identity: Option<(&str, &rcgen::KeyPair)>) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(pem_to_der(ca_pem))).unwrap();
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some((cert_pem, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from(pem_to_der(cert_pem))],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    }
}

/// A fresh TLS connection to `addr` speaking HTTP/1.1; `Err` when the TLS
/// handshake or the HTTP set-up fails.
pub async fn connect(
    addr: SocketAddr,
    tls: ClientConfig,
) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (send, c) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(c);
    Ok(send)
}

/// One request over a fresh TLS connection; `body` is (content type, bytes).
/// `Err` when the TLS handshake or the exchange fails.
pub async fn send(
    addr: SocketAddr,
    tls: ClientConfig,
    method: &str,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
    bearer: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut send = connect(addr, tls).await?;
    let mut req = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let bytes = match body {
        Some((ct, b)) => {
            req = req.header("content-type", ct);
            b
        }
        None => Vec::new(),
    };
    let req = req.body(Full::new(Bytes::from(bytes))).unwrap();
    send.send_request(req).await.map_err(|e| format!("request: {e}"))
}

/// A response read to its end.
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// [`send`], which must succeed, with the whole response read.
pub async fn request(
    addr: SocketAddr,
    tls: ClientConfig,
    method: &str,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
    bearer: Option<&str>,
) -> Resp {
    let resp = send(addr, tls, method, path, body, bearer).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Resp { status, headers, body }
}
