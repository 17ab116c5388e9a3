//! HTTP/1.1 to the controller over rustls: one TCP + TLS connection per
//! exchange (enroll, renew, report) or per bundle stream. hyper's client
//! connection is driven by a task on the agent's one runtime.

use std::{sync::Arc, time::Duration};

use airlock_proto::{
    admin::ApiError,
    agent::{EnrollRequest, EnrollResponse, RenewRequest, RenewResponse, Report},
    release::ReportResponse,
};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    client::conn::http1::SendRequest,
    Method, Request, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, ClientConfig};
use serde::{de::DeserializeOwned, Serialize};

/// Time allowed to connect and finish the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a whole request/response exchange (not the stream).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RESPONSE: usize = 1 << 20;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not an `https://host[:port]` URL.
    #[error("{url:?} is not an https://HOST[:PORT] URL ({why})")]
    Url {
        /// The text.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// TCP connect failed.
    #[error("cannot connect to {authority}")]
    Connect {
        /// host:port.
        authority: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong pin, unknown CA, refused certificate).
    #[error("TLS handshake with {authority} failed")]
    Tls {
        /// host:port.
        authority: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server's chain does not contain the pinned CA.
    #[error(
        "{authority} did not present the pinned CA (wrong CA fingerprint, or not the controller)"
    )]
    PinMismatch {
        /// host:port.
        authority: String,
    },
    /// Connecting or the exchange took too long.
    #[error("{what} timed out")]
    Timeout {
        /// Which step.
        what: &'static str,
    },
    /// HTTP protocol failure.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// The controller answered with an API error.
    #[error("the controller refused ({status}): {code}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// `ApiError::error`.
        code: String,
        /// `ApiError::message`.
        message: String,
    },
    /// The controller answered with an unexpected status.
    #[error("unexpected HTTP status {0}")]
    Status(StatusCode),
    /// The body is not what the protocol says.
    #[error("the controller's answer does not decode")]
    Decode(#[source] serde_json::Error),
    /// The body is larger than allowed or broken.
    #[error("the controller's answer is too large or broken")]
    Body,
}

impl ClientError {
    /// True for errors that retrying cannot fix (the controller said no).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if status.is_client_error())
            || matches!(self, ClientError::PinMismatch { .. })
    }
}

/// A parsed `https://host[:port]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host without brackets (IP literal or DNS name): TLS server name and connect target.
    pub host: String,
    /// Port (default 443).
    pub port: u16,
}

impl Endpoint {
    /// Parses `https://host[:port]` (a trailing `/` allowed, nothing else).
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why| ClientError::Url { url: url.to_owned(), why };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(bad("no path allowed"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self { host, port: uri.port_u16().unwrap_or(443) })
    }

    /// `host:port` (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn uri(&self, path: &str) -> Result<Uri, ClientError> {
        format!("https://{}{path}", self.authority())
            .parse()
            .map_err(|_| ClientError::Url { url: self.authority(), why: "not a URL" })
    }
}

async fn timed<T>(
    what: &'static str,
    d: Duration,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(d, f).await.map_err(|_| ClientError::Timeout { what })?
}

/// Opens TCP + TLS + an HTTP/1.1 connection to `ep`.
pub async fn connect(
    tls: Arc<ClientConfig>,
    ep: &Endpoint,
) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let authority = ep.authority();
    timed("connecting to the controller", CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|source| ClientError::Connect { authority: authority.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(ep.host.clone()).map_err(|_| ClientError::Url {
            url: authority.clone(),
            why: "the host is not a valid server name",
        })?;
        let stream =
            tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|source| {
                if is_pin_mismatch(&source) {
                    ClientError::PinMismatch { authority: authority.clone() }
                } else {
                    ClientError::Tls { authority: authority.clone(), source }
                }
            })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "controller connection closed");
            }
        });
        Ok(send)
    })
    .await
}

fn is_pin_mismatch(e: &std::io::Error) -> bool {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    matches!(
        inner,
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)))
            if o.0.downcast_ref::<super::tls::PinMismatch>().is_some()
    )
}

fn request(
    ep: &Endpoint,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let mut b = Request::builder()
        .method(method)
        .uri(ep.uri(path)?)
        .header(hyper::header::HOST, ep.authority())
        .header(hyper::header::USER_AGENT, concat!("airlock-agent/", env!("CARGO_PKG_VERSION")));
    if body.is_some() {
        b = b.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    b.body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|_| ClientError::Url { url: path.to_owned(), why: "invalid request" })
}

async fn read_body(body: Incoming) -> Result<Bytes, ClientError> {
    Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|_| ClientError::Body)
}

/// Sends one request on `send` and returns the body of a 2xx answer; an API
/// error body becomes [`ClientError::Api`].
pub async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    ep: &Endpoint,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let req = request(ep, method, path, body)?;
    timed("the controller exchange", EXCHANGE_TIMEOUT, async {
        send.ready().await.map_err(ClientError::Http)?;
        let resp = send.send_request(req).await.map_err(ClientError::Http)?;
        let status = resp.status();
        let bytes = read_body(resp.into_body()).await?;
        if status.is_success() {
            return Ok((status, bytes));
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => Err(ClientError::Api { status, code: e.error, message: e.message }),
            Err(_) => Err(ClientError::Status(status)),
        }
    })
    .await
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings and integers always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(b).map_err(ClientError::Decode)
}

/// `POST /api/v1/enroll` on the main listener (TLS pinned by `tls`).
pub async fn enroll(
    tls: Arc<ClientConfig>,
    ep: &Endpoint,
    req: &EnrollRequest,
) -> Result<EnrollResponse, ClientError> {
    let mut send = connect(tls, ep).await?;
    let (_, body) =
        exchange(&mut send, ep, Method::POST, "/api/v1/enroll", Some(encode(req))).await?;
    decode(&body)
}

/// `POST /agent/v1/renew` (mTLS).
pub async fn renew(
    tls: Arc<ClientConfig>,
    ep: &Endpoint,
    req: &RenewRequest,
) -> Result<RenewResponse, ClientError> {
    let mut send = connect(tls, ep).await?;
    let (_, body) =
        exchange(&mut send, ep, Method::POST, "/agent/v1/renew", Some(encode(req))).await?;
    decode(&body)
}

/// `POST /agent/v1/report` (mTLS) on an open connection. The answer may
/// offer an image update; an empty body (an older controller's 204) offers
/// nothing. A body that does not decode is [`ClientError::Decode`] (the
/// report itself was delivered).
pub async fn report(
    send: &mut SendRequest<Full<Bytes>>,
    ep: &Endpoint,
    r: &Report,
) -> Result<ReportResponse, ClientError> {
    let (_, body) = exchange(send, ep, Method::POST, "/agent/v1/report", Some(encode(r))).await?;
    report_response(&body)
}

/// Decodes a report's answer: empty (204 or an empty 200) is no offer.
pub fn report_response(body: &[u8]) -> Result<ReportResponse, ClientError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReportResponse::default());
    }
    decode(body)
}

/// Sends a GET on a new connection; the response head once it is a 200.
async fn open_get(
    tls: Arc<ClientConfig>,
    ep: &Endpoint,
    path: &str,
    what: &'static str,
) -> Result<hyper::Response<Incoming>, ClientError> {
    let mut send = connect(tls, ep).await?;
    let req = request(ep, Method::GET, path, None)?;
    let resp = timed(what, EXCHANGE_TIMEOUT, async {
        send.ready().await.map_err(ClientError::Http)?;
        send.send_request(req).await.map_err(ClientError::Http)
    })
    .await?;
    let status = resp.status();
    if status != StatusCode::OK {
        let bytes = timed("reading the refusal", EXCHANGE_TIMEOUT, read_body(resp.into_body()))
            .await
            .unwrap_or_default();
        return Err(match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => ClientError::Api { status, code: e.error, message: e.message },
            Err(_) => ClientError::Status(status),
        });
    }
    Ok(resp)
}

/// `GET /agent/v1/stream` (mTLS): the NDJSON body, once the answer is a 200.
pub async fn open_stream(tls: Arc<ClientConfig>, ep: &Endpoint) -> Result<Incoming, ClientError> {
    Ok(open_get(tls, ep, "/agent/v1/stream", "opening the bundle stream").await?.into_body())
}

/// `GET path` (mTLS) for a download: its `Content-Length` (when sent) and
/// the body, once the answer is a 200. The caller reads the body with its own
/// stall and total limits; only connecting and the response head are timed here.
pub async fn open_download(
    tls: Arc<ClientConfig>,
    ep: &Endpoint,
    path: &str,
) -> Result<(Option<u64>, Incoming), ClientError> {
    let resp = open_get(tls, ep, path, "starting the download").await?;
    let len = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    Ok((len, resp.into_body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_https_urls_only() {
        let e = Endpoint::parse("https://10.90.0.1:8443").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("10.90.0.1", 8443));
        assert_eq!(e.authority(), "10.90.0.1:8443");
        let e = Endpoint::parse("https://[fd00:90::1]:8444/").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("fd00:90::1", 8444));
        assert_eq!(e.authority(), "[fd00:90::1]:8444");
        assert_eq!(Endpoint::parse("https://controller.lab").unwrap().port, 443);
        for bad in ["http://10.90.0.1:8443", "10.90.0.1:8443", "https://", "https://h/api", ""] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn report_answers_are_empty_or_an_offer() {
        assert_eq!(report_response(b"").unwrap(), ReportResponse::default());
        assert_eq!(report_response(b" \n").unwrap(), ReportResponse::default());
        assert_eq!(report_response(b"{}").unwrap(), ReportResponse::default());
        assert_eq!(report_response(b"{\"update\":null}").unwrap(), ReportResponse::default());
        let r = report_response(
            br#"{"update":{"release":7,"image_version":"0.2.0+r7","size":1024,
                "sha256":"ab","path":"/agent/v1/releases/7/bundle"}}"#,
        )
        .unwrap();
        let offer = r.update.unwrap();
        assert_eq!((offer.release, offer.size), (7, 1024));
        assert_eq!(offer.path, "/agent/v1/releases/7/bundle");
        assert!(matches!(report_response(b"not json"), Err(ClientError::Decode(_))));
        assert!(matches!(report_response(b"{\"update\":5}"), Err(ClientError::Decode(_))));
    }

    #[test]
    fn only_client_errors_from_the_controller_are_final() {
        let api = |s: u16| ClientError::Api {
            status: StatusCode::from_u16(s).unwrap(),
            code: "token_used".into(),
            message: "used".into(),
        };
        assert!(api(409).is_refusal());
        assert!(api(410).is_refusal());
        assert!(!api(503).is_refusal());
        assert!(!ClientError::Timeout { what: "x" }.is_refusal());
    }
}
