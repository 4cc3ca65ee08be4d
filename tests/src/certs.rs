//! A throwaway CA and the certificates of a local mesh, written as PEM in Istio's layout
//! (`cert-chain.pem`, `key.pem`, `root-cert.pem`) so the same flags work as in a cluster.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Writes a leaf for `dns_names` (server and client auth) into `dir` with this CA as root.
    pub fn issue(&self, dir: &Path, dns_names: &[&str]) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, dns_names.first().copied().unwrap_or("leaf"));
        params.subject_alt_names.retain(|san| matches!(san, SanType::DnsName(_)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        std::fs::write(dir.join("cert-chain.pem"), cert.pem())?;
        std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
        std::fs::write(dir.join("root-cert.pem"), &self.pem)?;
        Ok(dir.to_owned())
    }
}
