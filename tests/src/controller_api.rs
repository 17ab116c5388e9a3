//! [`ControllerApi`]: the lab's HTTPS client for the controller's admin API
//! (`/api/v1`), over one kept-alive connection made from inside the
//! controller's namespace and pinned to the controller's own CA.
//!
//! Real TLS (rustls, ring), real HTTP/1.1 (hyper): what an operator's tool
//! does, minus everything but the calls the lab and the tests need. Secrets
//! (the password, the session, enrollment tokens) never appear in errors or
//! `Debug` output.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use airlock_proto::admin::{ApplianceView, EnrollmentToken, PolicyVersionSummary};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, client::conn::http1::SendRequest, Request};
use rustls::{
    pki_types::{CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use serde::de::DeserializeOwned;
use tokio_rustls::TlsConnector;

use crate::{Error, NetNs, Result};

/// How long one exchange (connect, TLS, request, response) may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle this long is replaced before the next request: the
/// server may have closed it, and a POST is not retried.
const MAX_IDLE: Duration = Duration::from_secs(5);

/// A secret string (a password, a session or an enrollment token) that
/// `Debug` does not show.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: only to send it where it belongs or show it to
    /// the operator once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A logged-in (or not yet) admin API client. Its methods block.
pub struct ControllerApi {
    rt: tokio::runtime::Runtime,
    netns: String,
    addr: SocketAddr,
    tls: TlsConnector,
    conn: Option<SendRequest<Full<Bytes>>>,
    last_used: std::time::Instant,
    session: Option<Secret>,
}

impl fmt::Debug for ControllerApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerApi")
            .field("netns", &self.netns)
            .field("addr", &self.addr)
            .field("connected", &self.conn.is_some())
            .field("logged_in", &self.session.is_some())
            .finish()
    }
}

/// The DER certificates in a PEM text.
fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut b64 = None::<String>;
    for line in pem.lines().map(str::trim) {
        if line == "-----BEGIN CERTIFICATE-----" {
            b64 = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            if let Some(text) = b64.take() {
                if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(text) {
                    out.push(der);
                }
            }
        } else if let Some(text) = b64.as_mut() {
            text.push_str(line);
        }
    }
    out
}

impl ControllerApi {
    /// A client for the controller listening at `addr` inside namespace
    /// `netns`, trusting only `ca_pem`, whose fingerprint must be
    /// `fingerprint` (what the controller printed).
    pub fn new(netns: &str, addr: SocketAddr, ca_pem: &str, fingerprint: &str) -> Result<Self> {
        let bad = |m: String| Error::ControllerOutput(m);
        let der = pem_certs(ca_pem)
            .into_iter()
            .next()
            .ok_or_else(|| bad("the CA file holds no certificate".into()))?;
        let got = airlock_proto::ca_fingerprint(&der);
        if airlock_proto::parse_fingerprint(&got) != airlock_proto::parse_fingerprint(fingerprint) {
            return Err(bad(format!("the CA file's fingerprint {got} is not {fingerprint}")));
        }
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(der)).map_err(|e| http("loading the CA", e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| http("TLS configuration", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| http("starting the client runtime", e))?;
        Ok(ControllerApi {
            rt,
            netns: netns.to_owned(),
            addr,
            tls: TlsConnector::from(Arc::new(config)),
            conn: None,
            last_used: std::time::Instant::now(),
            session: None,
        })
    }

    /// Opens the connection: TCP from inside the namespace, TLS with the
    /// controller's address as the server name, HTTP/1.1.
    fn connect(&mut self) -> Result<()> {
        let addr = self.addr;
        let tcp = NetNs::existing(&self.netns)
            .run(move || std::net::TcpStream::connect_timeout(&addr, EXCHANGE_TIMEOUT))?
            .map_err(|e| http(format!("connecting to {addr} in {}", self.netns), e))?;
        tcp.set_nonblocking(true).map_err(|e| http("socket", e))?;
        tcp.set_nodelay(true).map_err(|e| http("socket", e))?;
        let tls = self.tls.clone();
        let send = self.rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| http("socket", e))?;
            let name = ServerName::from(addr.ip());
            let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|e| http(format!("TLS handshake with {addr}"), e))?
                .map_err(|e| http(format!("TLS handshake with {addr}"), e))?;
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| http(format!("HTTP with {addr}"), e))?;
            tokio::spawn(conn);
            Ok::<_, Error>(send)
        })?;
        self.conn = Some(send);
        Ok(())
    }

    /// One request; `(status, body)`. Reconnects when the kept connection
    /// was closed; a GET is retried once on a fresh connection.
    pub fn request(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String)> {
        let body = body.map(|b| (Bytes::from(b), "application/json"));
        match self.try_request(method, path, body.clone()) {
            Err(Error::Http { .. }) if method == "GET" => {
                self.conn = None;
                self.try_request(method, path, body)
            }
            other => other,
        }
    }

    /// `POST /api/v1/releases`: uploads an image update bundle (raw bytes).
    /// `(status, body)`: the test decides what it expects.
    pub fn upload_release(&mut self, bundle: Vec<u8>) -> Result<(u16, String)> {
        self.try_request(
            "POST",
            "/api/v1/releases",
            Some((Bytes::from(bundle), "application/octet-stream")),
        )
    }

    fn try_request(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<(u16, String)> {
        if self.conn.as_ref().is_none_or(SendRequest::is_closed)
            || self.last_used.elapsed() > MAX_IDLE
        {
            self.connect()?;
        }
        let what = format!("{method} {path}");
        let mut req =
            Request::builder().method(method).uri(path).header("host", self.addr.to_string());
        if let Some(s) = &self.session {
            req = req.header("authorization", format!("Bearer {}", s.expose()));
        }
        if let Some((_, content_type)) = &body {
            req = req.header("content-type", *content_type);
        }
        let req = req
            .body(Full::new(body.map(|(b, _)| b).unwrap_or_default()))
            .map_err(|e| http(what.clone(), e))?;
        let Some(send) = self.conn.as_mut() else {
            return Err(Error::ControllerNotRunning);
        };
        let result = self.rt.block_on(async {
            let exchange = async {
                send.ready().await?;
                let resp = send.send_request(req).await?;
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&bytes).into_owned()))
            };
            match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(http(what.clone(), e)),
                Err(e) => Err(http(what.clone(), e)),
            }
        });
        if result.is_err() {
            self.conn = None;
        }
        self.last_used = std::time::Instant::now();
        result
    }

    /// A request whose answer must have status `want`, parsed as `T`.
    fn call<T: DeserializeOwned>(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<String>,
        want: u16,
    ) -> Result<T> {
        let (status, text) = self.request(method, path, body)?;
        if status != want {
            return Err(Error::Api { method, path: path.to_owned(), status, body: text });
        }
        serde_json::from_str(&text)
            .map_err(|source| Error::Json { what: format!("{method} {path}"), source })
    }

    /// `POST /api/v1/login`; later calls carry the session.
    pub fn login(&mut self, user: &str, password: &Secret) -> Result<()> {
        let body = serde_json::json!({"user": user, "password": password.expose()}).to_string();
        let s: airlock_proto::admin::SessionToken =
            self.call("POST", "/api/v1/login", Some(body), 200)?;
        self.session = Some(Secret(s.token));
        Ok(())
    }

    /// `POST /api/v1/appliances`: the appliance `id` and its one-time
    /// enrollment token (the token is secret: never print it).
    pub fn create_appliance(&mut self, id: &str) -> Result<EnrollmentToken> {
        let body = serde_json::json!({"id": id}).to_string();
        self.call("POST", "/api/v1/appliances", Some(body), 201)
    }

    /// `GET /api/v1/appliances/{id}`.
    pub fn appliance(&mut self, id: &str) -> Result<ApplianceView> {
        self.call("GET", &format!("/api/v1/appliances/{id}"), None, 200)
    }

    /// `POST /api/v1/appliances/{id}/revoke`.
    pub fn revoke(&mut self, id: &str) -> Result<ApplianceView> {
        self.call("POST", &format!("/api/v1/appliances/{id}/revoke"), None, 200)
    }

    /// `POST /api/v1/policy`: stores and applies a TOML policy.
    pub fn apply_policy(&mut self, text: &str, comment: &str) -> Result<PolicyVersionSummary> {
        let body = serde_json::json!({"text": text, "format": "toml", "comment": comment});
        self.call("POST", "/api/v1/policy", Some(body.to_string()), 201)
    }

    /// [`ControllerApi::apply_policy`] with a file's text.
    pub fn apply_policy_file(
        &mut self,
        file: &std::path::Path,
        comment: &str,
    ) -> Result<PolicyVersionSummary> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io("reading", file, e))?;
        self.apply_policy(&text, comment)
    }

    /// `POST /api/v1/policy/rollback`: a new version with `to_version`'s content.
    pub fn rollback(&mut self, to_version: u32, comment: &str) -> Result<PolicyVersionSummary> {
        let body = serde_json::json!({"to_version": to_version, "comment": comment});
        self.call("POST", "/api/v1/policy/rollback", Some(body.to_string()), 201)
    }

    /// `GET /api/v1/releases`: releases, the rollout, each appliance's image.
    pub fn releases(&mut self) -> Result<airlock_proto::admin::ReleasesOverview> {
        self.call("GET", "/api/v1/releases", None, 200)
    }

    /// `PUT /api/v1/rollout`: offers `release` to every enrolled appliance.
    pub fn start_rollout(&mut self, release: u64) -> Result<airlock_proto::admin::RolloutView> {
        let body = serde_json::json!({ "release": release }).to_string();
        self.call("PUT", "/api/v1/rollout", Some(body), 200)
    }

    /// Polls [`ControllerApi::appliance`] until `done` holds (every 50 ms,
    /// up to `timeout`); the view that satisfied it.
    pub fn wait_for(
        &mut self,
        id: &str,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&ApplianceView) -> bool,
    ) -> Result<ApplianceView> {
        let start = std::time::Instant::now();
        loop {
            let last = match self.appliance(id) {
                Ok(v) if done(&v) => return Ok(v),
                Ok(v) => format!("{v:?}"),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(Error::NotConverged { what, waited: timeout, last });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until appliance `id` is enrolled and reports the newest bundle
    /// for it as applied.
    pub fn wait_applied(&mut self, id: &str, timeout: Duration) -> Result<ApplianceView> {
        self.wait_for(id, "the appliance applying its newest bundle", timeout, is_applied)
    }
}

/// Enrolled, with a bundle, and that bundle reported as applied.
pub fn is_applied(v: &ApplianceView) -> bool {
    v.state == airlock_proto::admin::ApplianceState::Enrolled
        && v.desired_version.is_some()
        && v.applied_version == v.desired_version
}

fn http(what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Http { what: what.into(), source: Box::new(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_show() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn pem_certificates_are_found() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAAEC\nAw==\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nBA==\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_certs(pem), [vec![0, 1, 2, 3], vec![4]]);
        assert!(pem_certs("nothing").is_empty());
    }
}
