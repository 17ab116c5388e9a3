//! TLS for both listeners: rustls with the ring provider, TLS 1.3 and 1.2
//! with AEAD suites only (nothing older is compiled in), ECDSA certificates
//! from the internal CA.
//!
//! The agent listener requires a client certificate at the handshake, and its
//! verifier refuses, on top of the chain check, any certificate whose serial is
//! not one the controller issued to a currently enrolled appliance: a revoked
//! appliance is refused at its next handshake.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
};

use rustls::{
    crypto::{ring, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ResolvesServerCert, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

/// The provider: ring, restricted to AEAD suites with forward secrecy.
pub fn provider() -> Arc<CryptoProvider> {
    use ring::cipher_suite as cs;
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server certificate in use; swapped in place when renewed.
#[derive(Debug)]
pub struct ServerCert(RwLock<Arc<CertifiedKey>>);

impl ServerCert {
    /// From a chain (leaf first) and its key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Ok(Self(RwLock::new(Arc::new(Self::certified(chain, key)?))))
    }

    fn certified(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<CertifiedKey, TlsError> {
        Ok(CertifiedKey::from_der(chain, key, &provider())?)
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let new = Arc::new(Self::certified(chain, key)?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Which client certificates the agent listener accepts: appliance id → the
/// serials issued to it that are still valid (the current one, and the
/// previous one during a renewal).
#[derive(Debug, Default)]
pub struct Registry(RwLock<BTreeMap<String, BTreeSet<String>>>);

impl Registry {
    /// Replaces an appliance's accepted serials (empty: refuse it).
    pub fn set(&self, appliance: &str, serials: impl IntoIterator<Item = String>) {
        let s: BTreeSet<String> = serials.into_iter().collect();
        let mut m = self.0.write().unwrap_or_else(|p| p.into_inner());
        if s.is_empty() {
            m.remove(appliance);
        } else {
            m.insert(appliance.to_owned(), s);
        }
    }

    /// Whether a certificate with this serial and common name is accepted.
    pub fn accepts(&self, appliance: &str, serial: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(appliance)
            .is_some_and(|s| s.contains(serial))
    }
}

#[derive(Debug)]
struct RegistryVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    registry: Arc<Registry>,
}

impl ClientCertVerifier for RegistryVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let Some((serial, cn)) = crate::ca::serial_and_cn(end_entity) else {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding));
        };
        if !self.registry.accepts(&cn, &serial) {
            tracing::warn!(appliance = %cn, serial = %serial, "client certificate revoked or superseded: handshake refused");
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn base(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?)
}

/// The main listener (API, enrollment, later the web UI): server auth only.
pub fn main_config(cert: Arc<ServerCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut c = base(provider())?.with_no_client_auth().with_cert_resolver(cert);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// The agent listener: a client certificate from the CA, currently accepted
/// by `registry`, is required at the handshake.
pub fn agent_config(
    cert: Arc<ServerCert>,
    ca: &CertificateDer<'static>,
    registry: Arc<Registry>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let verifier = Arc::new(RegistryVerifier { inner, registry });
    let mut c = base(provider())?.with_client_cert_verifier(verifier).with_cert_resolver(cert);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: a resumed session would skip the verifier, and with it
    // the revocation check. Every agent connection is a full handshake.
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}
