//! The admin API's request and response bodies (`/api/v1/...`), shared by the
//! controller and `airlockctl`.

use serde::{Deserialize, Serialize};

use crate::agent::{Health, Refusal};

/// An appliance as the controller knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplianceView {
    /// Its id: the name in the policy and the certificate subject.
    pub id: String,
    /// `pending` (token issued), `enrolled` or `revoked`.
    pub state: ApplianceState,
    /// Unix seconds of enrollment.
    pub enrolled_at: Option<u64>,
    /// Expiry of its current client certificate (Unix seconds).
    pub cert_expires_at: Option<u64>,
    /// The newest bundle version for it.
    pub desired_version: Option<u64>,
    /// The bundle version it reports as applied.
    pub applied_version: Option<u64>,
    /// Unix seconds of its last report.
    pub last_seen: Option<u64>,
    /// Connected on the bundle stream now.
    pub connected: bool,
    /// Its last refusal, if any.
    pub refused: Option<Refusal>,
    /// Its last reported health.
    pub health: Option<Health>,
    /// Its WireGuard public key (base64) as it last reported it.
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
}

/// Lifecycle of an appliance record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApplianceState {
    /// Created; an enrollment token is outstanding.
    Pending,
    /// Holds a valid certificate.
    Enrolled,
    /// Refused at every handshake.
    Revoked,
}

/// `POST /api/v1/appliances`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateAppliance {
    /// The id; must match an appliance in the policy to receive flows.
    pub id: String,
    /// Token lifetime in seconds (default 24 h, at most 7 days).
    pub token_ttl_secs: Option<u64>,
}

/// A one-time enrollment token, shown once.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentToken {
    /// The appliance it enrolls.
    pub appliance: String,
    /// The token (secret; shown once, stored only as a hash).
    pub token: String,
    /// Unix seconds after which it is refused.
    pub expires_at: u64,
    /// The CA fingerprint to pin (`sha256:` + hex).
    pub ca_fingerprint: String,
    /// The controller URL the agent enrolls at.
    pub controller_url: String,
    /// The provisioning command for the appliance.
    pub command: String,
}

/// `POST /api/v1/policy/validate`, `/diff` and `/policy` (upload and apply).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyUpload {
    /// The policy text.
    pub text: String,
    /// `toml` (default) or `json`.
    #[serde(default)]
    pub format: PolicyFormat,
    /// Why (kept in the version history).
    #[serde(default)]
    pub comment: String,
}

/// The policy's written form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PolicyFormat {
    /// TOML.
    #[default]
    Toml,
    /// JSON.
    Json,
}

/// A located validation problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyProblem {
    /// Line (1-based) when known.
    pub line: Option<usize>,
    /// Column (1-based) when known.
    pub column: Option<usize>,
    /// The path in the document (`flow[2].to`).
    pub path: String,
    /// The problem.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

/// The result of validation: every problem at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidationReport {
    /// No problems.
    pub ok: bool,
    /// The problems.
    pub problems: Vec<PolicyProblem>,
}

/// What a change opens and closes, per appliance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyDiff {
    /// The version compared against (`None`: no policy yet).
    pub from_version: Option<u32>,
    /// The version the upload would become.
    pub to_version: u32,
    /// Per appliance.
    pub appliances: Vec<ApplianceDiff>,
}

/// One appliance's share of a [`PolicyDiff`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplianceDiff {
    /// The appliance.
    pub appliance: String,
    /// Flows that open (human-readable: `10.77.0.13 -> 10.78.0.100:443/tcp (rule 3)`).
    pub opens: Vec<String>,
    /// Flows that close.
    pub closes: Vec<String>,
    /// Flows that stay but change (expiry, replies, rule).
    pub changes: Vec<String>,
}

/// One stored policy version.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyVersion {
    /// The version (the controller numbers them; the text's own `version` is replaced).
    pub version: u32,
    /// Who stored it.
    pub author: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Why.
    pub comment: String,
    /// When a rollback: the version whose content it restored.
    pub rollback_of: Option<u32>,
    /// The text as stored (TOML or JSON as uploaded).
    pub text: String,
    /// Its form.
    pub format: PolicyFormat,
}

/// A version without its text, for listings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyVersionSummary {
    /// The version.
    pub version: u32,
    /// Who stored it.
    pub author: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Why.
    pub comment: String,
    /// When a rollback: the version restored.
    pub rollback_of: Option<u32>,
}

/// `POST /api/v1/policy/rollback`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rollback {
    /// The version whose content becomes the new version.
    pub to_version: u32,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

/// `POST /api/v1/login`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Login {
    /// User id.
    pub user: String,
    /// Password (never logged).
    pub password: String,
}

/// A session for API clients (browsers get the same id as a cookie).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionToken {
    /// Bearer token.
    pub token: String,
    /// Idle timeout in seconds: the session ends after this long unused.
    pub idle_timeout_secs: u64,
    /// Absolute end (Unix seconds).
    pub expires_at: u64,
}

/// Every API error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// A stable machine-readable code (`unauthorized`, `invalid_policy`, …).
    pub error: String,
    /// A human-readable message (never secrets).
    pub message: String,
    /// Policy problems, for `invalid_policy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<PolicyProblem>,
}

/// A stored appliance image release (`POST /api/v1/releases` answers with it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseView {
    /// The release number from the bundle's signed manifest.
    pub release: u64,
    /// The image version from the manifest, e.g. `0.1.0+r3`.
    pub image_version: String,
    /// The bundle file's size in bytes.
    pub size: u64,
    /// SHA-256 of the whole bundle file (hex).
    pub sha256: String,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// Unix seconds.
    pub uploaded_at: u64,
}

/// The rollout in force: which release is offered to which appliances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutView {
    /// The release offered.
    pub release: u64,
    /// The appliances it is offered to; `None`: every enrolled appliance.
    pub appliances: Option<Vec<String>>,
    /// Who started it.
    pub started_by: String,
    /// Unix seconds.
    pub started_at: u64,
}

/// `PUT /api/v1/rollout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartRollout {
    /// An uploaded release.
    pub release: u64,
    /// Enrolled appliance ids; absent or `null`: every enrolled appliance.
    #[serde(default)]
    pub appliances: Option<Vec<String>>,
}

/// Where one appliance is in the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RolloutProgress {
    /// No rollout, or the rollout does not name it.
    NotTargeted,
    /// It has not reported an image (no report yet, or not an A/B image).
    NoImage,
    /// It runs the target release or a newer one.
    Done,
    /// The target is offered with its next report answer.
    Offered,
    /// It downloads or writes the target now.
    Installing,
    /// The target is on its other slot, waiting for the reboot (trial boot).
    Pending,
    /// The target's trial boot failed there; it is not offered again.
    FailedTrial,
}

/// One enrolled appliance's image, from its last report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplianceImage {
    /// The appliance.
    pub appliance: String,
    /// Unix seconds of its last report (`None`: none since the controller started).
    pub reported_at: Option<u64>,
    /// Its image state as reported (`None`: no report, or not an A/B image).
    pub image: Option<crate::release::ReleaseState>,
    /// Where it is in the rollout.
    pub progress: RolloutProgress,
}

/// `GET /api/v1/releases`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleasesOverview {
    /// Whether the controller accepts uploads (its `update_key` is set).
    pub uploads_enabled: bool,
    /// Every uploaded release, newest first.
    pub releases: Vec<ReleaseView>,
    /// The rollout in force.
    pub rollout: Option<RolloutView>,
    /// Every enrolled appliance.
    pub appliances: Vec<ApplianceImage>,
}
