//! Certificate renewal: when less than a third of the client certificate's
//! lifetime is left (checked at start and hourly), a new key pair is
//! generated here, its CSR sent over the current mTLS identity, and the new
//! key and certificate replace the old pair atomically; new connections use
//! them from then on.

use std::{sync::Arc, time::Duration};

use airlock_proto::agent::RenewRequest;
use tracing::{info, warn};

use super::{
    client,
    identity::{self, Identity, IdentityError, Validity},
    unix_now, ControllerError, Shared,
};

/// How often renewal is considered.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// How soon a failed renewal is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);

/// Renews once: new key, CSR, certificate, files, TLS identity.
pub async fn renew_once(shared: &Shared) -> Result<Validity, ControllerError> {
    let fresh = identity::generate(&shared.appliance)?;
    let resp = client::renew(
        shared.tls(),
        &shared.agent,
        &RenewRequest { csr_pem: fresh.csr_pem.clone() },
    )
    .await?;
    let (_, spki) = identity::inspect(&resp.certificate_pem, "the renewed certificate")?;
    if spki != fresh.spki {
        return Err(IdentityError::KeyMismatch.into());
    }
    Identity::replace_key_and_cert(&shared.paths, &fresh.key, &resp.certificate_pem)?;
    let id = Identity::load(&shared.paths)?.ok_or(ControllerError::NotEnrolled)?;
    shared.replace(&id)?;
    Ok(id.validity)
}

/// Renews whenever due, for as long as the run loop lives.
pub async fn renew_task(shared: Arc<Shared>) {
    loop {
        let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
        let v = shared.validity();
        let mut wait = CHECK_EVERY;
        if identity::renewal_due(v, now) {
            if v.not_after <= now {
                warn!(
                    not_after = v.not_after,
                    "the client certificate has expired; trying to renew"
                );
            }
            match renew_once(&shared).await {
                Ok(v) => info!(not_after = v.not_after, "client certificate renewed"),
                Err(e) => {
                    warn!(error = %super::chain(&e), "certificate renewal failed; retrying later");
                    wait = RETRY_AFTER;
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}
