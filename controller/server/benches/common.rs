//! Set-up shared by the controller's benchmarks.

#![allow(clippy::unwrap_used)]

use airlock_controller::run::Started;

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
