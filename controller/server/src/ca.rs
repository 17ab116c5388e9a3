//! The internal CA: one ECDSA P-256 root whose key lives only in the
//! encrypted store (sealed through the KMS). It issues the controller's server
//! certificate and the appliances' client certificates, all short-lived.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use airlock_store::{Store, StoreError};

/// Lifetime of appliance client certificates.
pub const CLIENT_CERT_DAYS: i64 = 30;
/// Lifetime of the controller's server certificate (re-issued at every start
/// and when a third of it is left).
pub const SERVER_CERT_DAYS: i64 = 30;
const CA_YEARS: i64 = 10;

/// CA failures.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The store failed.
    #[error("CA store")]
    Store(#[from] StoreError),
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The stored CA cannot be read back.
    #[error("the stored CA is unreadable")]
    Corrupt(#[source] serde_json::Error),
    /// The CSR was refused.
    #[error("the certificate request is invalid: {0}")]
    BadCsr(&'static str),
}

#[derive(Serialize, Deserialize)]
struct StoredCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pkcs8: Vec<u8>,
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM.
    pub pem: String,
    /// DER.
    pub der: CertificateDer<'static>,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// The CA.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

fn when(unix: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| CaError::BadCsr("no randomness"))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte: stable hex
    Ok(SerialNumber::from_slice(&b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Ca {
    /// Loads the CA from the store, or creates it on first start.
    pub fn load_or_create(store: &Store, now: u64) -> Result<Self, CaError> {
        let tree = store.tree("ca")?;
        if let Some(raw) = tree.get(b"root")? {
            let s: StoredCa = serde_json::from_slice(&raw).map_err(CaError::Corrupt)?;
            let key = KeyPair::try_from(s.key_pkcs8.as_slice())?;
            let issuer = Issuer::from_ca_cert_pem(&s.cert_pem, key)?;
            return Ok(Self { cert_pem: s.cert_pem, cert_der: s.cert_der.into(), issuer });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "Airlock internal CA");
        p.distinguished_name.push(DnType::OrganizationName, "Airlock");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = when(now.saturating_sub(300));
        p.not_after = when(now + (CA_YEARS * 365 * 86_400) as u64);
        p.serial_number = Some(random_serial()?);
        let cert = p.self_signed(&key)?;
        let stored = StoredCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pkcs8: key.serialize_der(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(CaError::Corrupt)?;
        // Two controllers starting at once on one store: the first wins.
        if tree.compare_and_swap(b"root", None, Some(&bytes))?.is_err() {
            return Self::load_or_create(store, now);
        }
        tracing::info!("internal CA created");
        Ok(Self {
            cert_pem: stored.cert_pem,
            cert_der: stored.cert_der.into(),
            issuer: Issuer::new(p, key),
        })
    }

    /// PEM of the CA certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// DER of the CA certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The pinned form: `sha256:<hex>`.
    pub fn fingerprint(&self) -> String {
        airlock_proto::ca_fingerprint(&self.cert_der)
    }

    /// A fresh server certificate and key for `names` (IP addresses or DNS names).
    pub fn issue_server(
        &self,
        names: &[String],
        now: u64,
    ) -> Result<(Issued, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "Airlock controller");
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issued = self.sign(p, &key, now, SERVER_CERT_DAYS)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((issued, der))
    }

    /// A client certificate for `appliance` over the public key of `csr_pem`
    /// (whose signature is verified). Only the key is taken from the CSR: the
    /// subject, names and usages are the CA's choice.
    pub fn issue_client(
        &self,
        csr_pem: &str,
        appliance: &str,
        now: u64,
    ) -> Result<Issued, CaError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(CaError::BadCsr("too large"));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|_| CaError::BadCsr("not a valid, self-signed PKCS#10 request"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, appliance);
        p.distinguished_name.push(DnType::OrganizationalUnitName, "appliance");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(p, &csr.public_key, now, CLIENT_CERT_DAYS)
    }

    fn sign(
        &self,
        mut p: CertificateParams,
        public: &impl rcgen::PublicKeyData,
        now: u64,
        days: i64,
    ) -> Result<Issued, CaError> {
        let serial = random_serial()?;
        let not_after = now + (days * 86_400) as u64;
        p.serial_number = Some(serial.clone());
        p.not_before = when(now.saturating_sub(300));
        p.not_after = when(not_after);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(public, &self.issuer)?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: hex(&serial.to_bytes()),
            not_after,
        })
    }
}

/// The serial (lowercase hex) and common name of a DER certificate.
pub fn serial_and_cn(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let serial = hex(cert.raw_serial());
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some((serial, cn))
}
