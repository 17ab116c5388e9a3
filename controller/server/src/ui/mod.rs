//! The web UI: server-rendered pages for network admins (and, as the
//! identity, push and audit issues land, approvers and auditors).
//!
//! - One typed maud function per page or fragment; every value is escaped by
//!   the template engine, never by hand.
//! - No CDN and no inline script or style: the stylesheet and the one small
//!   script are served from [`assets`] under content-hashed names, cached for
//!   a year; the Content-Security-Policy allows nothing else.
//! - Every page reads without JavaScript. With it, `data-live` regions
//!   refresh in place from `/ui/live/...` fragments; those refreshes use
//!   [`Sessions::peek`](crate::auth::Sessions::peek), so a dashboard left
//!   open still logs its user off after the idle timeout.
//! - Forms post with an anti-forgery token derived from the session, and a
//!   cross-site `Sec-Fetch-Site` is refused on top of `SameSite=Strict`.
//! - Authorization is the API's: the same [`authorize`] decision per action.
//!
//! What it is not: a second API. It calls the same services the JSON API
//! calls (appliances, policies, hub) and holds no state of its own.

pub mod assets;
mod charts;
mod layout;
mod pages;
pub mod view;

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, FromRequestParts, Request},
    http::{header, request::Parts, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
    Router,
};
use maud::Markup;

use crate::{
    api::SESSION_COOKIE,
    auth::{authorize, Action, Sessions, Subject},
    policy::MAX_POLICY_BYTES,
    state::AppState,
};

/// The header the page script sends on background refreshes.
pub const LIVE_HEADER: &str = "x-airlock-live";

/// The Content-Security-Policy of every UI response.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

type St = axum::extract::State<Arc<AppState>>;

/// A logged-in person looking at a page.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// Who.
    pub subject: Subject,
    /// The anti-forgery token their forms carry.
    pub csrf: String,
    /// The session's idle timeout, for the footer.
    pub idle_secs: u64,
}

impl Viewer {
    /// Whether the viewer may do `a`.
    pub fn may(&self, a: Action) -> bool {
        authorize(&self.subject, a)
    }

    /// `Ok` when the viewer may do `a`, else the 403 page.
    pub fn require(&self, a: Action) -> Result<(), PageErr> {
        if self.may(a) {
            Ok(())
        } else {
            Err(PageErr::Forbidden)
        }
    }

    /// Checks a form's anti-forgery token.
    pub fn check_csrf(&self, presented: &str) -> Result<(), PageErr> {
        // The viewer's csrf is derived from the session; compare in constant time.
        let ok = self.csrf.len() == presented.len()
            && self.csrf.bytes().zip(presented.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if ok {
            Ok(())
        } else {
            Err(PageErr::Forgery)
        }
    }
}

pub(crate) fn session_token(parts: &Parts) -> Option<String> {
    let cookies = parts.headers.get(header::COOKIE)?.to_str().ok()?;
    cookies
        .split(';')
        .filter_map(|c| c.trim().strip_prefix(&format!("{SESSION_COOKIE}=")))
        .next()
        .map(str::to_owned)
}

fn is_live(parts: &Parts) -> bool {
    parts.headers.contains_key(LIVE_HEADER)
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> Result<Self, Response> {
        let live = is_live(parts);
        let token = session_token(parts);
        let subject = token.as_deref().and_then(|t| {
            if live {
                st.sessions.peek(t, st.now())
            } else {
                st.sessions.authenticate(t, st.now())
            }
        });
        match (subject, token) {
            (Some(subject), Some(token)) => {
                parts.extensions.insert(crate::server::User(subject.user.clone()));
                Ok(Viewer {
                    subject,
                    csrf: Sessions::csrf_token(&token),
                    idle_secs: st.sessions.idle_secs(),
                })
            }
            _ if live => Err((StatusCode::UNAUTHORIZED, "session ended\n").into_response()),
            _ => {
                let next = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let ended = if token_present(parts) { "&ended=1" } else { "" };
                Err(Redirect::to(&format!("/login?next={}{ended}", url_encode(next)))
                    .into_response())
            }
        }
    }
}

fn token_present(parts: &Parts) -> bool {
    session_token(parts).is_some()
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A page that could not be shown.
#[derive(Debug)]
pub enum PageErr {
    /// The role does not allow it.
    Forbidden,
    /// A form without a valid anti-forgery token.
    Forgery,
    /// No such thing.
    NotFound(String),
    /// Bad input that no form field explains.
    BadRequest(String),
    /// Our fault; the details are in the log.
    Internal,
}

impl PageErr {
    /// Logs `e` and returns the generic 500 page.
    pub fn internal(what: &str, e: &dyn std::error::Error) -> Self {
        tracing::error!(error = %crate::chain(e), "{what}");
        Self::Internal
    }
}

impl From<crate::appliances::ApplianceError> for PageErr {
    fn from(e: crate::appliances::ApplianceError) -> Self {
        use crate::appliances::ApplianceError as E;
        match e {
            E::Unknown(id) => Self::NotFound(format!("There is no appliance {id:?}.")),
            E::BadId(_) | E::Revoked(_) => Self::BadRequest(e.to_string()),
            other => Self::internal("appliance operation failed", &other),
        }
    }
}

impl From<crate::policy::PolicyError> for PageErr {
    fn from(e: crate::policy::PolicyError) -> Self {
        use crate::policy::PolicyError as E;
        match e {
            E::UnknownVersion(v) => Self::NotFound(format!("There is no policy version {v}.")),
            E::NoPolicy => Self::NotFound("No policy has been applied yet.".into()),
            E::Conflict { .. } | E::Invalid(_) => Self::BadRequest(e.to_string()),
            other => Self::internal("policy operation failed", &other),
        }
    }
}

impl IntoResponse for PageErr {
    fn into_response(self) -> Response {
        let (status, title, text) = match self {
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                "Not allowed",
                "Your role does not allow this page or action.".to_owned(),
            ),
            Self::Forgery => (
                StatusCode::FORBIDDEN,
                "Form expired",
                "The form was not sent from this page or your session changed. Reload the page and try again.".to_owned(),
            ),
            Self::NotFound(t) => (StatusCode::NOT_FOUND, "Not found", t),
            Self::BadRequest(t) => (StatusCode::BAD_REQUEST, "Cannot do that", t),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "The controller could not complete this. Nothing was changed unless the page says so; the details are in the controller log.".to_owned(),
            ),
        };
        (status, layout::bare(title, &text)).into_response()
    }
}

/// A page result.
pub type Page = Result<Markup, PageErr>;

/// Refuses state-changing requests a browser marks as cross-site.
async fn same_site_only(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let site = req.headers().get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if matches!(site, Some(s) if s != "same-origin" && s != "none") {
            return PageErr::Forgery.into_response();
        }
    }
    next.run(req).await
}

async fn csp(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    r
}

/// The UI's routes (merged into the main listener's router).
pub fn ui_router(state: Arc<AppState>) -> Router {
    let big_forms = Router::new()
        .route("/policy/preview", post(pages::policy::preview))
        .route("/policy/apply", post(pages::policy::apply))
        .layer(DefaultBodyLimit::max(3 * MAX_POLICY_BYTES + 64 * 1024));
    Router::new()
        .route("/", get(pages::dashboard::page))
        .route("/ui/live/dashboard", get(pages::dashboard::live))
        .route("/login", get(pages::login::form).post(pages::login::submit))
        .route("/logout", post(pages::login::logout))
        .route("/appliances/new", get(pages::enroll::form))
        .route("/appliances", post(pages::enroll::create))
        .route("/appliances/{id}", get(pages::appliance::page))
        .route("/ui/live/appliances/{id}", get(pages::appliance::live))
        .route("/appliances/{id}/revoke", post(pages::appliance::revoke))
        .route("/policy", get(pages::policy::current))
        .route("/policy/edit", get(pages::policy::edit))
        .route("/policy/versions", get(pages::policy::history))
        .route("/policy/versions/{v}", get(pages::policy::version))
        .route("/policy/versions/{v}/rollback", get(pages::policy::rollback_review))
        .route("/ui/live/convergence/{v}", get(pages::policy::convergence_live))
        .route("/policy/rollback", post(pages::policy::rollback))
        .route("/services", get(pages::services::page))
        .route("/updates", get(pages::updates::page))
        .route("/services/preview", post(pages::services::preview))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .merge(big_forms)
        .layer(middleware::from_fn(same_site_only))
        .layer(middleware::from_fn(csp))
        .merge(assets::router())
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_parameter_is_encoded() {
        assert_eq!(url_encode("/policy/versions/3"), "/policy/versions/3");
        assert_eq!(url_encode("/?q=a b&page=2"), "/%3Fq%3Da%20b%26page%3D2");
    }
}
