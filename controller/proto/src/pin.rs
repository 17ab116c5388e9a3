//! Trusting the controller through a pinned CA fingerprint (feature `pin`),
//! shared by the agent (enrollment) and `airlockctl` (login).
//!
//! [`PinnedCaVerifier`] accepts a server only when a certificate in the chain
//! it presents hashes (SHA-256 over DER) to the pin, and the leaf then
//! verifies — chain, dates, server name, signatures — with that certificate as
//! the only root. Nothing from any system store is trusted.
//!
//! [`pinned_client_config`] is the one place that installs it: rustls offers
//! custom server verifiers only through its `dangerous()` builder, although
//! this one verifies fully (pin, then the whole webpki check).

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A client configuration (rustls' safe default protocol versions, no client
/// certificate) that trusts the server only through [`PinnedCaVerifier`].
pub fn pinned_client_config(
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = Arc::new(PinnedCaVerifier::new(pin, Arc::clone(&provider)));
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// No certificate in the presented chain hashes to the pin.
#[derive(Debug, thiserror::Error)]
#[error("no certificate in the chain the controller presented matches the pinned CA fingerprint")]
pub struct PinMismatch;

/// See the module docs.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    /// A verifier for the CA whose DER hashes (SHA-256) to `pin`.
    pub fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self { pin, provider }
    }
}

fn sha256(der: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(der).into()
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let other = |e: Arc<dyn std::error::Error + Send + Sync>| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                e,
            )))
        };
        let ca = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| sha256(c) == self.pin)
            .ok_or_else(|| other(Arc::new(PinMismatch)))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
            .build()
            .map_err(|e| other(Arc::new(e)))?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
