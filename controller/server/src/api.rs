//! The HTTP surface: the admin API under `/api/v1` (with its generated
//! OpenAPI document), enrollment, metrics, and the agent API under
//! `/agent/v1` on the mTLS listener. One error type, [`ApiErr`], renders
//! every failure as [`ApiError`] JSON without secrets.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, FromRequestParts, Path, State},
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Extension, Json, Router,
};
use utoipa::OpenApi;

use airlock_proto::{
    admin::{
        ApiError, ApplianceView, CreateAppliance, EnrollmentToken, Login, PolicyDiff, PolicyUpload,
        PolicyVersion, PolicyVersionSummary, Rollback, SessionToken, ValidationReport,
    },
    admin::{
        ApplianceImage, ReleaseView, ReleasesOverview, RolloutProgress, RolloutView, StartRollout,
    },
    agent::{EnrollRequest, EnrollResponse, RenewRequest, RenewResponse, Report},
    release::{ReleaseState, ReportResponse, UpdateOffer},
};

use crate::{
    appliances::ApplianceError,
    auth::{authorize, Action, AuthError, Subject},
    policy::{PolicyError, MAX_POLICY_BYTES},
    releases::{ReleaseStoreError, Stored, MAX_BUNDLE_BYTES},
    state::AppState,
};

type St = State<Arc<AppState>>;

/// Every API failure.
#[derive(Debug)]
pub struct ApiErr {
    status: StatusCode,
    body: ApiError,
}

impl ApiErr {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError { error: code.into(), message: message.into(), problems: vec![] },
        }
    }
    fn internal(what: &str, e: &dyn std::error::Error) -> Self {
        tracing::error!(error = %crate::chain(e), "{what}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}; see the controller log"),
        )
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ApplianceError> for ApiErr {
    fn from(e: ApplianceError) -> Self {
        use ApplianceError as E;
        let (s, code) = match &e {
            E::BadId(_) => (StatusCode::BAD_REQUEST, "invalid_id"),
            E::Unknown(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::InvalidToken => (StatusCode::UNAUTHORIZED, "invalid_token"),
            E::TokenUsed => (StatusCode::CONFLICT, "token_used"),
            E::TokenExpired => (StatusCode::GONE, "token_expired"),
            E::Revoked(_) => (StatusCode::FORBIDDEN, "revoked"),
            E::Ca(crate::ca::CaError::BadCsr(_)) => (StatusCode::BAD_REQUEST, "invalid_csr"),
            E::Ca(_) | E::Store(_) | E::Corrupt(_) => {
                return Self::internal("appliance operation failed", &e)
            }
        };
        Self::new(s, code, e.to_string())
    }
}

impl From<PolicyError> for ApiErr {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Invalid(problems) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ApiError {
                    error: "invalid_policy".into(),
                    message: format!(
                        "the policy has {} problem(s); nothing was applied",
                        problems.len()
                    ),
                    problems,
                },
            },
            PolicyError::UnknownVersion(_) | PolicyError::NoPolicy => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            PolicyError::Conflict { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            other => Self::internal("policy operation failed", &other),
        }
    }
}

impl From<ReleaseStoreError> for ApiErr {
    fn from(e: ReleaseStoreError) -> Self {
        use ReleaseStoreError as E;
        let (s, code) = match &e {
            E::NoKey => (StatusCode::CONFLICT, "no_update_key"),
            E::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            E::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_bundle"),
            E::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            E::UnknownRelease(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_release"),
            E::UnknownAppliances(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_appliance"),
            E::EmptyList => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_rollout"),
            E::Upload(_) => (StatusCode::BAD_REQUEST, "upload_broken"),
            E::Busy => (StatusCode::CONFLICT, "upload_in_progress"),
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                return Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "disk_full",
                    "the controller's disk is full: the upload was discarded".to_owned(),
                )
            }
            E::Io { .. } | E::Store(_) | E::Corrupt(_) => {
                return Self::internal("release operation failed", &e)
            }
        };
        Self::new(s, code, e.to_string())
    }
}

/// An authenticated admin-API caller.
#[derive(Debug)]
pub struct Caller(pub Subject);

fn bearer(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::to_owned);
    }
    let cookies = parts.headers.get(header::COOKIE)?.to_str().ok()?;
    cookies
        .split(';')
        .filter_map(|c| c.trim().strip_prefix(&format!("{SESSION_COOKIE}=")))
        .next()
        .map(str::to_owned)
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "airlock_session";

/// The `Set-Cookie` value for a session (an empty token with age 0 ends it).
pub fn session_cookie(token: &str, max_age: u64) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    )
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> Result<Self, ApiErr> {
        let token = bearer(parts)
            .ok_or_else(|| ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", "log in first"))?;
        let s = st.sessions.authenticate(&token, st.now()).ok_or_else(|| {
            ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", "the session ended; log in again")
        })?;
        parts.extensions.insert(crate::server::User(s.user.clone()));
        Ok(Caller(s))
    }
}

fn allow(c: &Caller, a: Action) -> Result<(), ApiErr> {
    if authorize(&c.0, a) {
        Ok(())
    } else {
        Err(ApiErr::new(StatusCode::FORBIDDEN, "forbidden", "your role does not allow this"))
    }
}

/// The verified identity of an agent connection (its certificate's CN).
#[derive(Clone, Debug)]
pub struct AgentId(pub String);

/// The admin/API router (main listener).
pub fn api_router(state: Arc<AppState>) -> Router {
    let policy_routes = Router::new()
        .route("/api/v1/policy", get(current_policy).post(apply_policy))
        .route("/api/v1/policy/validate", post(validate_policy))
        .route("/api/v1/policy/diff", post(diff_policy))
        .layer(DefaultBodyLimit::max(MAX_POLICY_BYTES + 64 * 1024));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/ca", get(ca))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/appliances", get(list_appliances).post(create_appliance))
        .route("/api/v1/appliances/{id}", get(get_appliance))
        .route("/api/v1/appliances/{id}/revoke", post(revoke_appliance))
        .route("/api/v1/policy/versions", get(policy_history))
        .route("/api/v1/policy/versions/{version}", get(policy_version))
        .route("/api/v1/policy/rollback", post(rollback_policy))
        .route("/api/v1/rollout", put(start_rollout).delete(stop_rollout))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .merge(policy_routes)
        .with_state(state)
}

/// The image release routes: no overall time limit (an upload of a few
/// hundred MiB takes minutes; [`upload_release`] limits the time between
/// chunks instead) and no body limit but the bundle's own.
pub fn upload_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/releases", get(list_releases).post(upload_release))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The agent router (mTLS listener).
pub fn agent_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/agent/v1/stream", get(stream))
        .route("/agent/v1/releases/{release}/bundle", get(release_bundle))
        .route("/agent/v1/report", post(report))
        .route("/agent/v1/renew", post(renew))
        .layer(DefaultBodyLimit::max(256 * 1024))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Airlock controller API",
        description = "Appliances, enrollment, policy and image releases. Every route but login, enroll, ca and this document needs a session (Authorization: Bearer <token> or the airlock_session cookie)."
    ),
    paths(
        login,
        logout,
        enroll,
        ca,
        list_appliances,
        create_appliance,
        get_appliance,
        revoke_appliance,
        current_policy,
        apply_policy,
        validate_policy,
        diff_policy,
        policy_history,
        policy_version,
        rollback_policy,
        list_releases,
        upload_release,
        start_rollout,
        stop_rollout,
        metrics
    ),
    components(schemas(
        ApiError,
        Login,
        SessionToken,
        EnrollRequest,
        EnrollResponse,
        CreateAppliance,
        EnrollmentToken,
        ApplianceView,
        PolicyUpload,
        PolicyVersion,
        PolicyVersionSummary,
        ValidationReport,
        PolicyDiff,
        Rollback,
        CaInfo,
        ReleaseView,
        RolloutView,
        StartRollout,
        RolloutProgress,
        ApplianceImage,
        ReleasesOverview,
        ReleaseState,
        ReportResponse,
        UpdateOffer
    ))
)]
struct ApiDoc;

/// The OpenAPI document, generated from the handlers.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> impl IntoResponse {
    Json(openapi_document())
}

/// The CA certificate and its pinned fingerprint.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct CaInfo {
    fingerprint: String,
    pem: String,
}

#[utoipa::path(get, path = "/api/v1/ca", responses((status = 200, body = CaInfo)))]
async fn ca(State(st): St) -> Json<CaInfo> {
    Json(CaInfo { fingerprint: st.ca.fingerprint(), pem: st.ca.cert_pem().to_owned() })
}

#[utoipa::path(post, path = "/api/v1/login", request_body = Login,
    responses((status = 200, body = SessionToken), (status = 401, body = ApiError)))]
async fn login(State(st): St, Json(l): Json<Login>) -> Result<Response, ApiErr> {
    let st2 = st.clone();
    let now = st.now();
    let r = tokio::task::spawn_blocking(move || {
        st2.sessions.login(&st2.store, &l.user, &l.password, now)
    })
    .await
    .map_err(|e| ApiErr::internal("login task failed", &e))?;
    match r {
        Ok(s) => {
            let cookie = session_cookie(&s.token, s.expires_at.saturating_sub(now));
            let body = SessionToken {
                token: s.token,
                idle_timeout_secs: st.sessions.idle_secs(),
                expires_at: s.expires_at,
            };
            let mut resp = Json(body).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            Ok(resp)
        }
        Err(AuthError::Refused) => {
            st.metrics.logins_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong user or password"))
        }
        Err(e) => Err(ApiErr::internal("login failed", &e)),
    }
}

#[utoipa::path(post, path = "/api/v1/logout", responses((status = 204)))]
async fn logout(State(st): St, headers: HeaderMap) -> Response {
    let (mut parts, ()) = axum::http::Request::new(()).into_parts();
    parts.headers = headers;
    if let Some(t) = bearer(&parts) {
        st.sessions.logout(&t);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&session_cookie("", 0)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[utoipa::path(post, path = "/api/v1/enroll", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), (status = 401, body = ApiError), (status = 409, body = ApiError), (status = 410, body = ApiError)))]
async fn enroll(
    State(st): St,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiErr> {
    let now = st.now();
    let r = st.appliances.enroll(&st.ca, &st.registry, &req.token, &req.csr_pem, now);
    let (rec, issued) = match r {
        Ok(x) => x,
        Err(e) => {
            st.metrics.enrollments_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "enrollment refused");
            return Err(e.into());
        }
    };
    st.metrics.enrollments.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    publish_one(&st, &rec.id, now)?;
    Ok(Json(EnrollResponse {
        appliance: rec.id,
        certificate_pem: issued.pem,
        ca_pem: st.ca.cert_pem().to_owned(),
        bundle_key: base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            st.policies.verifying_key().as_bytes(),
        ),
        agent_url: st.agent_url.clone(),
    }))
}

fn publish_one(st: &AppState, id: &str, now: u64) -> Result<(), ApiErr> {
    let b = st.policies.bundle_for(id, now)?;
    st.hub.publish(id, b);
    st.metrics.bundles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn view(st: &AppState, r: crate::appliances::ApplianceRecord) -> ApplianceView {
    let report = st.hub.last_report(&r.id);
    let desired = st.policies.desired_version(&r.id).ok().flatten();
    ApplianceView {
        connected: st.hub.connected(&r.id) > 0,
        desired_version: desired,
        applied_version: report.as_ref().and_then(|(r, _)| r.applied_version),
        last_seen: report.as_ref().map(|(_, t)| *t),
        refused: report.as_ref().and_then(|(r, _)| r.refused.clone()),
        wireguard_public_key: report.as_ref().and_then(|(r, _)| r.wireguard_public_key.clone()),
        health: report.map(|(r, _)| r.health),
        id: r.id,
        state: r.state,
        enrolled_at: r.enrolled_at,
        cert_expires_at: r.cert_expires_at,
    }
}

#[utoipa::path(get, path = "/api/v1/appliances", responses((status = 200, body = [ApplianceView]), (status = 401, body = ApiError)))]
async fn list_appliances(State(st): St, c: Caller) -> Result<Json<Vec<ApplianceView>>, ApiErr> {
    allow(&c, Action::ReadAppliances)?;
    let all = st.appliances.list()?;
    Ok(Json(all.into_iter().map(|r| view(&st, r)).collect()))
}

#[utoipa::path(get, path = "/api/v1/appliances/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ApplianceView), (status = 404, body = ApiError)))]
async fn get_appliance(
    State(st): St,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<ApplianceView>, ApiErr> {
    allow(&c, Action::ReadAppliances)?;
    let r = st.appliances.get(&id)?.ok_or_else(|| ApiErr::from(ApplianceError::Unknown(id)))?;
    Ok(Json(view(&st, r)))
}

#[utoipa::path(post, path = "/api/v1/appliances", request_body = CreateAppliance,
    responses((status = 201, body = EnrollmentToken), (status = 400, body = ApiError)))]
async fn create_appliance(
    State(st): St,
    c: Caller,
    Json(req): Json<CreateAppliance>,
) -> Result<(StatusCode, Json<EnrollmentToken>), ApiErr> {
    allow(&c, Action::ManageAppliances)?;
    Ok((StatusCode::CREATED, Json(create_token(&st, &req, &c.0.user)?)))
}

/// Creates an appliance record and its one-time token (API and UI).
pub(crate) fn create_token(
    st: &AppState,
    req: &CreateAppliance,
    by: &str,
) -> Result<EnrollmentToken, ApplianceError> {
    let (token, expires_at) = st.appliances.create(&req.id, req.token_ttl_secs, st.now())?;
    tracing::info!(appliance = %req.id, by = %by, expires_at, "enrollment token issued");
    let fp = st.ca.fingerprint();
    let command = format!(
        "airlock-agent enroll --controller {} --ca-fingerprint {fp} --token-stdin",
        st.public_url
    );
    Ok(EnrollmentToken {
        appliance: req.id.clone(),
        token,
        expires_at,
        ca_fingerprint: fp,
        controller_url: st.public_url.clone(),
        command,
    })
}

#[utoipa::path(post, path = "/api/v1/appliances/{id}/revoke", params(("id" = String, Path)),
    responses((status = 200, body = ApplianceView), (status = 404, body = ApiError)))]
async fn revoke_appliance(
    State(st): St,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<ApplianceView>, ApiErr> {
    allow(&c, Action::ManageAppliances)?;
    let r = revoke(&st, &id, &c.0.user)?;
    Ok(Json(view(&st, r)))
}

/// Revokes an appliance and ends its streams (API and UI).
pub(crate) fn revoke(
    st: &AppState,
    id: &str,
    by: &str,
) -> Result<crate::appliances::ApplianceRecord, ApplianceError> {
    let r = st.appliances.revoke(&st.registry, id)?;
    st.hub.close(id);
    tracing::warn!(appliance = %id, by = %by, "appliance revoked");
    Ok(r)
}

#[utoipa::path(get, path = "/api/v1/policy", responses((status = 200, body = PolicyVersion), (status = 404, body = ApiError)))]
async fn current_policy(State(st): St, c: Caller) -> Result<Json<PolicyVersion>, ApiErr> {
    allow(&c, Action::ReadPolicy)?;
    Ok(Json(st.policies.current()?.ok_or(PolicyError::NoPolicy)?))
}

#[utoipa::path(get, path = "/api/v1/policy/versions", responses((status = 200, body = [PolicyVersionSummary])))]
async fn policy_history(
    State(st): St,
    c: Caller,
) -> Result<Json<Vec<PolicyVersionSummary>>, ApiErr> {
    allow(&c, Action::ReadPolicy)?;
    Ok(Json(st.policies.history()?))
}

#[utoipa::path(get, path = "/api/v1/policy/versions/{version}", params(("version" = u32, Path)),
    responses((status = 200, body = PolicyVersion), (status = 404, body = ApiError)))]
async fn policy_version(
    State(st): St,
    c: Caller,
    Path(v): Path<u32>,
) -> Result<Json<PolicyVersion>, ApiErr> {
    allow(&c, Action::ReadPolicy)?;
    Ok(Json(st.policies.version(v)?))
}

#[utoipa::path(post, path = "/api/v1/policy/validate", request_body = PolicyUpload, responses((status = 200, body = ValidationReport)))]
async fn validate_policy(
    c: Caller,
    Json(u): Json<PolicyUpload>,
) -> Result<Json<ValidationReport>, ApiErr> {
    allow(&c, Action::ReadPolicy)?;
    Ok(Json(match crate::policy::check(&u.text, u.format) {
        Ok(_) => ValidationReport { ok: true, problems: vec![] },
        Err(PolicyError::Invalid(problems)) => ValidationReport { ok: false, problems },
        Err(e) => return Err(e.into()),
    }))
}

#[utoipa::path(post, path = "/api/v1/policy/diff", request_body = PolicyUpload,
    responses((status = 200, body = PolicyDiff), (status = 422, body = ApiError)))]
async fn diff_policy(
    State(st): St,
    c: Caller,
    Json(u): Json<PolicyUpload>,
) -> Result<Json<PolicyDiff>, ApiErr> {
    allow(&c, Action::ReadPolicy)?;
    Ok(Json(st.policies.diff(&u, st.now())?))
}

pub(crate) fn publish_all(st: &AppState, bundles: Vec<(String, airlock_proto::SignedBundle)>) {
    for (a, b) in bundles {
        st.hub.publish(&a, b);
        st.metrics.bundles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[utoipa::path(post, path = "/api/v1/policy", request_body = PolicyUpload,
    responses((status = 201, body = PolicyVersionSummary), (status = 422, body = ApiError)))]
async fn apply_policy(
    State(st): St,
    c: Caller,
    Json(u): Json<PolicyUpload>,
) -> Result<(StatusCode, Json<PolicyVersionSummary>), ApiErr> {
    allow(&c, Action::WritePolicy)?;
    let (summary, bundles) = st.policies.apply(&u, &c.0.user, None, &st.enrolled(), st.now())?;
    publish_all(&st, bundles);
    Ok((StatusCode::CREATED, Json(summary)))
}

#[utoipa::path(post, path = "/api/v1/policy/rollback", request_body = Rollback,
    responses((status = 201, body = PolicyVersionSummary), (status = 404, body = ApiError)))]
async fn rollback_policy(
    State(st): St,
    c: Caller,
    Json(r): Json<Rollback>,
) -> Result<(StatusCode, Json<PolicyVersionSummary>), ApiErr> {
    allow(&c, Action::WritePolicy)?;
    let (summary, bundles) =
        st.policies.rollback(r.to_version, &r.comment, &c.0.user, &st.enrolled(), st.now())?;
    publish_all(&st, bundles);
    Ok((StatusCode::CREATED, Json(summary)))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(State(st): St, c: Caller) -> Result<Response, ApiErr> {
    allow(&c, Action::ReadMetrics)?;
    let n = st.appliances.list()?.len();
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(n, st.hub.connected_total()),
    )
        .into_response())
}

async fn stream(
    State(st): St,
    Extension(AgentId(id)): Extension<AgentId>,
) -> Result<Response, ApiErr> {
    if !st.hub.has_bundle(&id) {
        let b = match st.policies.stored_bundle(&id)? {
            Some(b) => b,
            None => st.policies.bundle_for(&id, st.now())?,
        };
        st.hub.publish(&id, b);
    }
    tracing::info!(appliance = %id, "bundle stream opened");
    let body = Body::from_stream(st.hub.stream(&id, st.clock));
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-store")],
        body,
    )
        .into_response())
}

async fn report(
    State(st): St,
    Extension(AgentId(id)): Extension<AgentId>,
    Json(r): Json<Report>,
) -> Json<ReportResponse> {
    if let Some(refused) = &r.refused {
        tracing::warn!(appliance = %id, version = refused.version, reason = %refused.reason, "appliance refused a bundle");
    }
    let now = st.now();
    st.telemetry.record(&id, now, &r.health.counters);
    let update = st.releases.offer_for(&id, r.release.as_ref());
    if let Some(u) = &update {
        tracing::debug!(appliance = %id, release = u.release, "image update offered");
    }
    st.hub.report(&id, r, now);
    Json(ReportResponse { update })
}

/// The time allowed between two chunks of an upload.
const CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Every release, the rollout and each enrolled appliance's image (API and UI).
pub(crate) fn releases_overview(st: &AppState) -> ReleasesOverview {
    let rollout = st.releases.rollout();
    let appliances = st
        .enrolled()
        .into_iter()
        .map(|id| {
            let (image, reported_at) = st
                .hub
                .inspect(&id, |r, _| (r.and_then(|(r, _)| r.release.clone()), r.map(|(_, t)| t)));
            let progress = crate::releases::progress(rollout.as_ref(), &id, image.as_ref());
            ApplianceImage { appliance: id, reported_at, image, progress }
        })
        .collect();
    ReleasesOverview {
        uploads_enabled: st.releases.has_key(),
        releases: st.releases.list(),
        rollout: rollout.map(|r| r.view()),
        appliances,
    }
}

#[utoipa::path(get, path = "/api/v1/releases", responses((status = 200, body = ReleasesOverview)))]
async fn list_releases(State(st): St, c: Caller) -> Result<Json<ReleasesOverview>, ApiErr> {
    allow(&c, Action::ReadReleases)?;
    Ok(Json(releases_overview(&st)))
}

#[utoipa::path(post, path = "/api/v1/releases",
    request_body(content = String, content_type = "application/octet-stream",
        description = "The signed update bundle (ustar) as `cargo xtask image update-bundle` writes it; at most 1 GiB."),
    responses((status = 201, body = ReleaseView, description = "stored"),
        (status = 200, body = ReleaseView, description = "the same bundle was already stored"),
        (status = 409, body = ApiError, description = "no update key configured, the release exists with other contents, or another upload is in progress"),
        (status = 413, body = ApiError), (status = 422, body = ApiError, description = "the bundle does not verify; nothing was stored"),
        (status = 507, body = ApiError, description = "the controller's disk is full; the upload was discarded")))]
async fn upload_release(
    State(st): St,
    c: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<ReleaseView>), ApiErr> {
    use futures_util::StreamExt as _;
    allow(&c, Action::ManageReleases)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BUNDLE_BYTES) {
        return Err(ReleaseStoreError::TooLarge.into());
    }
    let mut up = st.releases.begin()?;
    let mut body = body.into_data_stream();
    loop {
        match tokio::time::timeout(CHUNK_TIMEOUT, body.next()).await {
            Err(_) => {
                return Err(ReleaseStoreError::Upload(format!(
                    "no data for {} s after {} bytes",
                    CHUNK_TIMEOUT.as_secs(),
                    up.size()
                ))
                .into())
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReleaseStoreError::Upload(e.to_string()).into()),
            Ok(Some(Ok(chunk))) => up.write(&chunk)?,
        }
    }
    let (st2, user, now) = (st.clone(), c.0.user.clone(), st.now());
    let r = tokio::task::spawn_blocking(move || st2.releases.finish(up, &user, now))
        .await
        .map_err(|e| ApiErr::internal("release upload task failed", &e))?;
    match r {
        Ok(Stored::New(m)) => Ok((StatusCode::CREATED, Json(m))),
        Ok(Stored::Same(m)) => Ok((StatusCode::OK, Json(m))),
        Err(e) => {
            tracing::warn!(by = %c.0.user, error = %crate::chain(&e), "release upload refused");
            Err(e.into())
        }
    }
}

#[utoipa::path(put, path = "/api/v1/rollout", request_body = StartRollout,
    responses((status = 200, body = RolloutView), (status = 422, body = ApiError, description = "unknown release or appliance")))]
async fn start_rollout(
    State(st): St,
    c: Caller,
    Json(r): Json<StartRollout>,
) -> Result<Json<RolloutView>, ApiErr> {
    allow(&c, Action::ManageReleases)?;
    let ro =
        st.releases.start_rollout(r.release, r.appliances, &st.enrolled(), &c.0.user, st.now())?;
    Ok(Json(ro.view()))
}

#[utoipa::path(delete, path = "/api/v1/rollout", responses((status = 204, description = "no release is offered any more")))]
async fn stop_rollout(State(st): St, c: Caller) -> Result<StatusCode, ApiErr> {
    allow(&c, Action::ManageReleases)?;
    st.releases.stop_rollout(&c.0.user)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /agent/v1/releases/{release}/bundle`: the bundle file, only while it
/// is offered to the calling appliance (per its last report).
async fn release_bundle(
    State(st): St,
    Extension(AgentId(id)): Extension<AgentId>,
    Path(release): Path<u64>,
) -> Result<Response, ApiErr> {
    use tokio::io::AsyncReadExt as _;
    let state = st.hub.inspect(&id, |r, _| r.and_then(|(r, _)| r.release.clone()));
    let Some(offer) = st.releases.offer_for(&id, state.as_ref()).filter(|o| o.release == release)
    else {
        return Err(ApiErr::new(
            StatusCode::NOT_FOUND,
            "not_offered",
            format!("release {release} is not offered to this appliance"),
        ));
    };
    let path = st.releases.file(release);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiErr::internal("cannot open a release bundle", &e))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiErr::internal("cannot read a release bundle", &e))?
        .len();
    if len != offer.size {
        tracing::error!(release, file = %path.display(), len, want = offer.size, "a stored bundle changed size");
        return Err(ApiErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the stored bundle is damaged; see the controller log",
        ));
    }
    tracing::info!(appliance = %id, release, size = len, "image bundle download");
    let chunks = futures_util::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

async fn renew(
    State(st): St,
    Extension(AgentId(id)): Extension<AgentId>,
    Json(r): Json<RenewRequest>,
) -> Result<Json<RenewResponse>, ApiErr> {
    let issued = st.appliances.renew(&st.ca, &st.registry, &id, &r.csr_pem, st.now())?;
    Ok(Json(RenewResponse { certificate_pem: issued.pem }))
}
