//! Listeners: TLS accept loops feeding hyper, with the access log, security
//! headers, time limits and the agent identity taken from the verified
//! client certificate.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::Request,
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tower_http::{set_header::SetResponseHeaderLayer, timeout::TimeoutLayer};

use crate::{api::AgentId, state::AppState};

/// The user a request was made by (set by the authentication extractor, read
/// by the access log).
#[derive(Clone, Debug)]
pub struct User(pub String);

/// The serial of an agent connection's client certificate.
#[derive(Clone, Debug)]
pub struct CertSerial(pub String);

/// Refuses every request whose client certificate is no longer accepted (a
/// revocation also ends keep-alive connections opened before it).
async fn current_cert(req: Request, next: Next) -> Response {
    let ok = match (
        req.extensions().get::<Arc<AppState>>(),
        req.extensions().get::<AgentId>(),
        req.extensions().get::<CertSerial>(),
    ) {
        (Some(st), Some(id), Some(serial)) => st.registry.accepts(&id.0, &serial.0),
        _ => false,
    };
    if ok {
        next.run(req).await
    } else {
        (StatusCode::FORBIDDEN, "certificate revoked or superseded\n").into_response()
    }
}

/// The peer of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn access_log(req: Request, next: Next) -> Response {
    let start = std::time::Instant::now();
    let method = req.method().clone();
    // The path only: query strings are never logged.
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    let agent = req.extensions().get::<AgentId>().map(|a| a.0.clone());
    let metrics = req.extensions().get::<Arc<AppState>>().cloned();
    let resp = next.run(req).await;
    let user = resp.extensions().get::<User>().map(|u| u.0.clone());
    if let Some(st) = metrics {
        st.metrics.response(resp.status().as_u16());
    }
    tracing::info!(
        target: "airlock::access",
        method = %method, path = %path, status = resp.status().as_u16(),
        ms = start.elapsed().as_secs_f64() * 1e3,
        peer = ?peer, user = ?user, appliance = ?agent,
        "request"
    );
    resp
}

/// Copies the user the extractor found from the request to the response, for the log.
async fn carry_user(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let mut parts2 = parts.clone();
    let req = Request::from_parts(parts, body);
    let mut resp = next.run(req).await;
    if let Some(u) = parts2.extensions.remove::<User>() {
        resp.extensions_mut().insert(u);
    }
    resp
}

/// The request time limit of the main listener's routes.
fn time_limited(r: Router) -> Router {
    r.layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
}

fn harden(r: Router) -> Router {
    let r = r
        .layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000; includeSubDomains"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    r.layer(middleware::from_fn(carry_user)).layer(middleware::from_fn(access_log))
}

/// The main listener's service. Every route has the overall request time
/// limit except the release upload, which may take minutes and has a time
/// limit per received chunk instead.
pub fn main_app(state: Arc<AppState>) -> Router {
    let st = state.clone();
    let app = time_limited(
        crate::api::api_router(state.clone()).merge(crate::ui::ui_router(state.clone())),
    )
    .merge(crate::api::upload_router(state));
    harden(app).layer(axum::Extension(st))
}

/// The agent listener's service (no overall timeout: the stream is long-lived).
pub fn agent_app(state: Arc<AppState>) -> Router {
    let st = state.clone();
    harden(crate::api::agent_router(state).layer(middleware::from_fn(current_cert)))
        .layer(axum::Extension(st))
}

/// Serves `app` over TLS on `listener`. With `agent`, each connection's
/// verified client-certificate CN becomes the request's [`AgentId`].
pub async fn serve_tls(listener: TcpListener, tls: Arc<ServerConfig>, app: Router, agent: bool) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(target: "airlock::access", peer = %peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(target: "airlock::access", peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let id = if agent {
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::ca::serial_and_cn(c));
                match cn {
                    Some((serial, cn)) => Some((AgentId(cn), serial)),
                    None => return, // the verifier requires a certificate; never serve without one
                }
            } else {
                None
            };
            let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                if let Some((id, serial)) = &id {
                    req.extensions_mut().insert(id.clone());
                    req.extensions_mut().insert(CertSerial(serial.clone()));
                }
                req
            });
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            if let Err(e) =
                b.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc)).await
            {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A plain-HTTP listener that answers every request with a redirect to
/// `https_url` (same path), and nothing else.
pub async fn serve_redirect(listener: TcpListener, https_url: String) {
    let app = Router::new().fallback(move |req: Request| {
        let base = https_url.clone();
        async move {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let loc = format!("{}{}", base.trim_end_matches('/'), path);
            match HeaderValue::from_str(&loc) {
                Ok(v) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, v)]).into_response(),
                Err(_) => StatusCode::BAD_REQUEST.into_response(),
            }
        }
    });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "redirect listener failed");
    }
}
