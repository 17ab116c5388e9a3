//! TLS to the controller: rustls with the ring provider, two ways to trust it.
//!
//! - [`Trust::Pin`] (login, scripts): a certificate in the chain the server
//!   presents must hash (SHA-256 over DER) to the pinned fingerprint, and the
//!   leaf must then verify — chain, dates, server name — with that
//!   certificate as the only root ([`PinnedCaVerifier`]).
//! - [`Trust::Ca`] (after login): the CA certificate saved at login is the
//!   only root; nothing from the system store is trusted.

use std::sync::Arc;

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer},
    ClientConfig, RootCertStore,
};

/// How the controller's certificate is trusted.
#[derive(Clone, Debug)]
pub enum Trust {
    /// A CA certificate (PEM): the only root.
    Ca(String),
    /// The SHA-256 of a certificate the server's chain must contain.
    Pin([u8; 32]),
}

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    /// The saved CA is not a PEM certificate.
    #[error("the saved controller CA is not a PEM certificate; log in again")]
    Pem,
    /// The saved CA is not usable as a root.
    #[error("the saved controller CA is not a usable trust root; log in again")]
    Root(#[source] rustls::Error),
}

pub use airlock_proto::pin::PinMismatch;

/// The ring provider (never aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn fingerprint_bytes(der: &[u8]) -> Option<[u8; 32]> {
    airlock_proto::parse_fingerprint(&airlock_proto::ca_fingerprint(der))
}

/// The certificate of `chain` whose SHA-256 is `pin`.
pub fn find_pinned<'a>(
    chain: &'a [CertificateDer<'static>],
    pin: &[u8; 32],
) -> Option<&'a CertificateDer<'static>> {
    chain.iter().find(|c| fingerprint_bytes(c).as_ref() == Some(pin))
}

/// The client configuration for `trust` (HTTP/1.1, no client certificate).
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut cfg = match trust {
        Trust::Pin(pin) => airlock_proto::pin::pinned_client_config(*pin, provider())
            .map_err(TlsSetupError::Config)?,
        Trust::Ca(pem) => {
            let ca =
                CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsSetupError::Pem)?;
            let mut roots = RootCertStore::empty();
            roots.add(ca).map_err(TlsSetupError::Root)?;
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(TlsSetupError::Config)?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A DER certificate as PEM.
pub fn to_pem(der: &[u8]) -> String {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    let b = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Why a handshake failed, in the terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeProblem {
    /// The pinned fingerprint is not in the presented chain.
    PinMismatch,
    /// The certificate is not from the saved (or pinned) CA.
    UnknownIssuer,
    /// The certificate does not carry the URL's host.
    WrongName,
    /// Expired or not yet valid.
    Dates,
    /// Anything else (protocol, alerts, …).
    Other,
}

/// Classifies a handshake error from tokio-rustls.
pub fn classify(e: &std::io::Error) -> HandshakeProblem {
    use rustls::CertificateError as C;
    let Some(rustls::Error::InvalidCertificate(c)) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    else {
        return HandshakeProblem::Other;
    };
    match c {
        C::Other(o) if o.0.downcast_ref::<PinMismatch>().is_some() => HandshakeProblem::PinMismatch,
        C::UnknownIssuer | C::BadSignature => HandshakeProblem::UnknownIssuer,
        C::NotValidForName | C::NotValidForNameContext { .. } => HandshakeProblem::WrongName,
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            HandshakeProblem::Dates
        }
        _ => HandshakeProblem::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_pins_find_their_certificate() {
        let der = b"not really a certificate, but DER-shaped bytes".to_vec();
        let pem = to_pem(&der);
        assert_eq!(CertificateDer::from_pem_slice(pem.as_bytes()).ok().as_deref(), Some(&der[..]));
        let chain = vec![CertificateDer::from(b"leaf".to_vec()), CertificateDer::from(der.clone())];
        let pin = fingerprint_bytes(&der).unwrap_or_default();
        assert_eq!(find_pinned(&chain, &pin).map(|c| c.to_vec()), Some(der));
        assert!(find_pinned(&chain, &[0; 32]).is_none());
    }

    #[test]
    fn configs_build_and_a_bad_saved_ca_is_explained() {
        assert!(client_config(&Trust::Pin([7; 32])).is_ok());
        let e = client_config(&Trust::Ca("garbage".into())).unwrap_err();
        assert!(e.to_string().contains("log in again"), "{e}");
    }

    #[test]
    fn a_pin_mismatch_is_recognised_through_io_errors() {
        let pin = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch)),
        ));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, pin);
        assert_eq!(classify(&io), HandshakeProblem::PinMismatch);
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        assert_eq!(classify(&io), HandshakeProblem::UnknownIssuer);
        assert_eq!(classify(&std::io::Error::other("reset")), HandshakeProblem::Other);
    }
}
