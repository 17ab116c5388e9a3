//! One module per page (or group of pages), each a handler that gathers
//! what it shows from the shared state and renders one typed template.

pub mod appliance;
pub mod dashboard;
pub mod enroll;
pub mod login;
pub mod policy;
pub mod services;
pub mod updates;

use crate::{
    appliances::ApplianceRecord,
    state::AppState,
    ui::{
        view::{self, Status},
        PageErr,
    },
};

/// The status of one appliance now.
pub fn status_of(st: &AppState, r: &ApplianceRecord, now: u64) -> Status {
    let desired = st.policies.desired_version(&r.id).ok().flatten();
    let target = st.releases.target_for(&r.id);
    st.hub.inspect(&r.id, |rep, conn| view::status(r, rep, conn > 0, desired, target, now))
}

/// Every appliance's record and status, by id.
pub fn all(st: &AppState, now: u64) -> Result<Vec<Status>, PageErr> {
    let recs = st.appliances.list().map_err(PageErr::from)?;
    Ok(recs.iter().map(|r| status_of(st, r, now)).collect())
}
