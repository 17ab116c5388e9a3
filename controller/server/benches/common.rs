//! Set-up shared by the controller's benchmarks.

#![allow(clippy::unwrap_used)]

use airlock_controller::{config::ControllerConfig, run::Started};

/// A fresh controller (built-in KMS, ephemeral ports) with its data in `dir`,
/// served on `rt` — what the binary does at its first start.
pub fn start(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Started {
    let cfg = ControllerConfig {
        data_dir: dir.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        agent_listen: "127.0.0.1:0".parse().unwrap(),
        ..ControllerConfig::default()
    };
    let kms = airlock_kms::open(&cfg.kms(), None).unwrap();
    let store = airlock_store::Store::open(&dir.join("store"), kms).unwrap();
    rt.block_on(airlock_controller::run::start(cfg, store)).unwrap()
}

/// Adds appliances `ward-NNNN` up to `n`: token, enrollment with a fresh key,
/// and the signed bundle enrollment stores.
pub fn enroll_up_to(started: &Started, n: usize) {
    let st = &started.state;
    let have = st.appliances.list().unwrap().len();
    for i in have..n {
        let id = format!("ward-{i:04}");
        let now = st.now();
        let (token, _) = st.appliances.create(&id, None, now).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        st.appliances.enroll(&st.ca, &st.registry, &token, &csr, now).unwrap();
        st.policies.bundle_for(&id, now).unwrap();
    }
}
