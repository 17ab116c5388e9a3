//! HTTP/1.1 to the controller's admin API over rustls: one TCP + TLS
//! connection per request (a command makes one to three), driven on the
//! current-thread runtime. Errors say what went wrong in operator terms; the
//! session token goes only into the `Authorization` header, never into an
//! error or a log.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use airlock_proto::admin::ApiError;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::{Bytes, Frame, SizeHint},
    Method, Request, Uri,
};
use hyper_util::rt::TokioIo;
use rustls::{
    pki_types::{CertificateDer, ServerName},
    ClientConfig,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::{self, HandshakeProblem, Trust};

/// Time allowed to connect and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request and its whole answer (a policy apply signs a
/// bundle per appliance).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for a whole upload (a few hundred MiB over a slow link).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest answer read (a long appliance list is a few MiB).
const MAX_RESPONSE: usize = 64 << 20;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not an `https://host[:port]` URL.
    #[error("{url:?} is not an https://HOST[:PORT] controller URL ({why})")]
    Url {
        /// The text.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// TCP connect failed.
    #[error("cannot connect to the controller at {authority} (is it running, and is this the right address?)")]
    Connect {
        /// host:port.
        authority: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("{}", handshake_message(*.problem, .authority))]
    Tls {
        /// host:port.
        authority: String,
        /// What kind of failure.
        problem: HandshakeProblem,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS configuration.
    #[error(transparent)]
    Setup(#[from] tls::TlsSetupError),
    /// Connecting or the exchange took too long.
    #[error("the controller at {authority} did not answer in time ({what})")]
    Timeout {
        /// host:port.
        authority: String,
        /// Which step.
        what: &'static str,
    },
    /// HTTP protocol failure.
    #[error("the HTTP exchange with the controller failed")]
    Http(#[source] hyper::Error),
    /// The controller answered with an API error.
    #[error("{}", api_message(*.status, .body))]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ApiError,
    },
    /// The controller answered with a status and no API error body.
    #[error("the controller answered HTTP {0} without an explanation")]
    Status(u16),
    /// The body is not what the API says.
    #[error("the controller's answer does not decode (is this an Airlock controller of the same version?)")]
    Decode(#[source] serde_json::Error),
    /// The body is larger than allowed or broken.
    #[error("the controller's answer is larger than {} MiB or broken", MAX_RESPONSE >> 20)]
    Body,
}

fn handshake_message(p: HandshakeProblem, authority: &str) -> String {
    match p {
        HandshakeProblem::PinMismatch => format!(
            "the controller's certificate does not match the pinned fingerprint: no certificate \
             {authority} presented hashes to it. Check the fingerprint (`airlock-controller \
             ca-fingerprint` on the controller prints it); if it is right, something between \
             you and the controller is intercepting the connection"
        ),
        HandshakeProblem::UnknownIssuer => format!(
            "the certificate {authority} presented is not signed by the controller CA saved at \
             login; if the controller's CA was replaced, log in again with its new fingerprint"
        ),
        HandshakeProblem::WrongName => format!(
            "the controller's certificate is not valid for {authority}; use a URL with a name or \
             address the certificate carries (see the controller's server_names)"
        ),
        HandshakeProblem::Dates => format!(
            "the certificate {authority} presented has expired or is not valid yet (check this \
             machine's clock)"
        ),
        HandshakeProblem::Other => format!("the TLS handshake with {authority} failed"),
    }
}

fn api_message(status: u16, e: &ApiError) -> String {
    format!("the controller refused (HTTP {status}, {}): {}", e.error, e.message)
}

impl ClientError {
    /// The API error body, when the controller answered with one.
    pub fn api(&self) -> Option<(u16, &ApiError)> {
        match self {
            Self::Api { status, body } => Some((*status, body)),
            _ => None,
        }
    }
}

/// A parsed `https://host[:port]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host without brackets: TLS server name and connect target.
    pub host: String,
    /// Port (default 443).
    pub port: u16,
}

impl Endpoint {
    /// Parses `https://host[:port]` (a trailing `/` allowed, nothing else).
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why| ClientError::Url { url: url.to_owned(), why };
        let uri: Uri = url.trim().parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        if uri.path_and_query().is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/") {
            return Err(bad("no path allowed"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self { host, port: uri.port_u16().unwrap_or(443) })
    }

    /// `host:port`, IPv6 literals in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The canonical URL (`https://host:port`).
    pub fn url(&self) -> String {
        format!("https://{}", self.authority())
    }
}

/// A client for one controller with one way of trusting it.
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    tls: Arc<ClientConfig>,
    token: Option<String>,
}

/// A request's answer: the status and the raw body, plus the certificate
/// chain the server presented on that connection.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Bytes,
    /// The presented chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Client {
    /// A client; `token` is sent as `Authorization: Bearer`.
    pub fn new(
        endpoint: Endpoint,
        trust: &Trust,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        Ok(Self { endpoint, tls: tls::client_config(trust)?, token })
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(self.send(Method::GET, path, None).await?)
    }

    /// `POST path` with a JSON body, decoded.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Decode)?;
        decode(self.send(Method::POST, path, Some(body)).await?)
    }

    /// `PUT path` with a JSON body, decoded.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Decode)?;
        decode(self.send(Method::PUT, path, Some(body)).await?)
    }

    /// `DELETE path`; any 2xx.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        check(self.send(Method::DELETE, path, None).await?).map(|_| ())
    }

    /// `POST path` without a body, decoded.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(self.send(Method::POST, path, None).await?)
    }

    /// `POST path` with a JSON body; the raw answer (any 2xx).
    pub async fn post_raw<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Answer, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Decode)?;
        let a = self.send(Method::POST, path, Some(body)).await?;
        check(a)
    }

    /// One request over a fresh connection; every status is returned.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        let content_type = body.is_some().then_some("application/json");
        let body = Full::new(Bytes::from(body.unwrap_or_default()));
        self.exchange(method, path, content_type, body, EXCHANGE_TIMEOUT).await
    }

    /// `POST path` with `file` (`total` bytes) streamed as an
    /// `application/octet-stream` body, never read whole into memory;
    /// `progress(sent, total)` after every chunk. The status and the decoded answer.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        file: tokio::fs::File,
        total: u64,
        progress: impl FnMut(u64, u64) + Send + Unpin + 'static,
    ) -> Result<(u16, T), ClientError> {
        let body = FileBody { file, buf: vec![0; 256 * 1024], sent: 0, total, progress };
        let a = self
            .exchange(Method::POST, path, Some("application/octet-stream"), body, UPLOAD_TIMEOUT)
            .await?;
        let status = a.status;
        Ok((status, decode(a)?))
    }

    async fn exchange<B>(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: B,
        limit: Duration,
    ) -> Result<Answer, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let authority = self.endpoint.authority();
        let timeout = |what| ClientError::Timeout { authority: authority.clone(), what };
        let (mut sender, chain) = tokio::time::timeout(CONNECT_TIMEOUT, self.connect::<B>())
            .await
            .map_err(|_| timeout("connecting"))??;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::USER_AGENT, concat!("airlockctl/", env!("CARGO_PKG_VERSION")))
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let req = req.body(body).map_err(|_| ClientError::Url {
            url: path.to_owned(),
            why: "not a valid request path",
        })?;
        let exchange = async {
            let resp = sender.send_request(req).await.map_err(ClientError::Http)?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|_| ClientError::Body)?
                .to_bytes();
            Ok::<_, ClientError>(Answer { status, body, chain })
        };
        tokio::time::timeout(limit, exchange).await.map_err(|_| timeout("the request"))?
    }

    async fn connect<B>(
        &self,
    ) -> Result<
        (hyper::client::conn::http1::SendRequest<B>, Vec<CertificateDer<'static>>),
        ClientError,
    >
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let authority = self.endpoint.authority();
        let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(|source| ClientError::Connect { authority: authority.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.endpoint.host.clone()).map_err(|_| {
            ClientError::Url { url: self.endpoint.url(), why: "the host is not a valid name" }
        })?;
        let tls = TlsConnector::from(Arc::clone(&self.tls)).connect(name, tcp).await.map_err(
            |source| ClientError::Tls {
                authority: authority.clone(),
                problem: tls::classify(&source),
                source,
            },
        )?;
        let chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            // Ends with the exchange; errors surface through send_request.
            let _ = conn.await;
        });
        Ok((sender, chain))
    }
}

/// A request body read from a file chunk by chunk, reporting progress.
struct FileBody<P> {
    file: tokio::fs::File,
    buf: Vec<u8>,
    sent: u64,
    total: u64,
    progress: P,
}

impl<P: FnMut(u64, u64) + Unpin> hyper::body::Body for FileBody<P> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.sent >= this.total {
            return Poll::Ready(None);
        }
        let want =
            usize::try_from(this.total - this.sent).unwrap_or(usize::MAX).min(this.buf.len());
        let mut rb = tokio::io::ReadBuf::new(&mut this.buf[..want]);
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut this.file), cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file became shorter while it was sent",
                    ))));
                }
                let chunk = Bytes::copy_from_slice(rb.filled());
                this.sent += n as u64;
                (this.progress)(this.sent, this.total);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total - self.sent)
    }
}

fn check(a: Answer) -> Result<Answer, ClientError> {
    if (200..300).contains(&a.status) {
        return Ok(a);
    }
    match serde_json::from_slice::<ApiError>(&a.body) {
        Ok(body) => Err(ClientError::Api { status: a.status, body }),
        Err(_) => Err(ClientError::Status(a.status)),
    }
}

fn decode<T: DeserializeOwned>(a: Answer) -> Result<T, ClientError> {
    let a = check(a)?;
    serde_json::from_slice(&a.body).map_err(ClientError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_https_only_without_paths() {
        let e = Endpoint::parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8443));
        assert_eq!(e.url(), "https://127.0.0.1:8443");
        let e = Endpoint::parse("https://[fd00::1]").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.authority()),
            ("fd00::1", 443, "[fd00::1]:443".into())
        );
        for bad in ["http://x:1", "https://x:1/api", "x", "https://:1", ""] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_errors_read_as_sentences() {
        let body = ApiError {
            error: "unauthorized".into(),
            message: "log in first".into(),
            problems: vec![],
        };
        let e = ClientError::Api { status: 401, body };
        assert_eq!(e.to_string(), "the controller refused (HTTP 401, unauthorized): log in first");
        assert_eq!(e.api().map(|(s, _)| s), Some(401));
        let e = check(Answer { status: 502, body: Bytes::from_static(b"<html>"), chain: vec![] });
        assert!(matches!(e, Err(ClientError::Status(502))));
    }
}
