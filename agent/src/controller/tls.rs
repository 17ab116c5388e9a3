//! TLS to the controller: rustls with the ring provider.
//!
//! - Enrollment ([`enroll_config`]): no client certificate; the server is
//!   trusted only through the CA fingerprint the technician provisioned
//!   ([`PinnedCaVerifier`]): a certificate in the presented chain must hash to
//!   the pin, and the leaf must then verify (webpki, server name, dates) with
//!   that certificate as the only root.
//! - Afterwards ([`agent_config`]): the stored CA is the only root, and the
//!   agent presents its client certificate.

use std::sync::Arc;

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use super::identity::Identity;

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (protocol versions, key, certificates).
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    /// A certificate or key does not parse.
    #[error("{0} does not parse")]
    Pem(&'static str),
    /// The CA is not usable as a trust root.
    #[error("the controller CA is not a usable trust root")]
    Root(#[source] rustls::Error),
}

pub use airlock_proto::pin::{PinMismatch, PinnedCaVerifier};

/// The ring provider (never aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
fn sha256(der: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(der).into()
}

fn finish(mut cfg: ClientConfig) -> Arc<ClientConfig> {
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Enrollment: server authentication through the pin, no client certificate.
pub fn enroll_config(pin: [u8; 32]) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg =
        airlock_proto::pin::pinned_client_config(pin, provider()).map_err(TlsError::Config)?;
    Ok(finish(cfg))
}

/// The stored CA as the only root.
pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let ca =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|_| TlsError::Pem("ca.pem"))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(TlsError::Root)?;
    Ok(roots)
}

/// mTLS to the agent listener with the identity's key and certificate.
pub fn agent_config(id: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem("cert.pem"))?;
    let key = PrivateKeyDer::from_pem_slice(id.key.expose().as_bytes())
        .map_err(|_| TlsError::Pem("key.pem"))?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots(&id.ca_pem)?)
        .with_client_auth_cert(certs, key)
        .map_err(TlsError::Config)?;
    let mut cfg = cfg;
    // A full handshake every time: the controller checks revocation (and a
    // renewed certificate is presented) at the handshake; a resumed session
    // would skip both.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(finish(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::{
        client::danger::{ServerCertVerified, ServerCertVerifier as _},
        pki_types::{ServerName, UnixTime},
    };

    struct Pki {
        ca_der: Vec<u8>,
        leaf_der: Vec<u8>,
    }

    fn pki(names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        Pki { ca_der: ca.der().to_vec(), leaf_der: leaf.der().to_vec() }
    }

    fn verify(pin: [u8; 32], p: &Pki, name: &str) -> Result<ServerCertVerified, rustls::Error> {
        let v = PinnedCaVerifier::new(pin, provider());
        v.verify_server_cert(
            &CertificateDer::from(p.leaf_der.clone()),
            &[CertificateDer::from(p.ca_der.clone())],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn the_pinned_ca_is_accepted_and_its_leaf_verified() {
        let p = pki(&["10.90.0.1", "controller.lab"]);
        let pin = crate::controller::parse_pin(&airlock_proto::ca_fingerprint(&p.ca_der)).unwrap();
        assert!(verify(pin, &p, "10.90.0.1").is_ok());
        assert!(verify(pin, &p, "controller.lab").is_ok());
        // The right CA, but the leaf is not for this name.
        assert!(verify(pin, &p, "10.90.0.2").is_err());
    }

    #[test]
    fn a_wrong_pin_or_another_ca_is_refused() {
        let p = pki(&["10.90.0.1"]);
        let err = verify([0; 32], &p, "10.90.0.1").unwrap_err();
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = &err else {
            panic!("not a pin mismatch: {err}");
        };
        assert!(other.0.to_string().contains("pinned CA fingerprint"), "{err}");
        // Pinning the leaf itself is not pinning a CA: webpki refuses a leaf
        // as its own trust anchor.
        assert!(verify(sha256(&p.leaf_der), &p, "10.90.0.1").is_err());
        // A chain from another CA that includes the pinned CA certificate
        // as a bystander does not verify.
        let q = pki(&["10.90.0.1"]);
        let mixed = Pki { ca_der: p.ca_der.clone(), leaf_der: q.leaf_der.clone() };
        assert!(verify(sha256(&p.ca_der), &mixed, "10.90.0.1").is_err());
    }

    #[test]
    fn client_configs_build_with_the_ring_provider() {
        assert!(enroll_config([1; 32]).is_ok());
        let p = pki(&["10.90.0.1"]);
        let ca_pem = pem_of(&p.ca_der);
        assert!(roots(&ca_pem).is_ok());
        assert!(roots("not a certificate").is_err());
    }

    fn pem_of(der: &[u8]) -> String {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        let b = STANDARD.encode(der);
        let lines: Vec<&str> =
            b.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
    }
}
