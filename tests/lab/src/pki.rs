//! The lab's certificate authority: serving certificates for the apiserver, SecantusDB and the
//! Azure doubles, and client certificates for the lab's administrator.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, as PEM in memory and as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that lives in one directory.
pub struct LabCa {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl LabCa {
    /// Creates a new CA and writes its certificate to `dir/ca.crt`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name("mongo-replicator lab CA", None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, issuer.pem())?;
        Ok(Self { dir: dir.to_path_buf(), issuer, ca_file })
    }

    /// The CA certificate file (PEM).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a serving certificate for 127.0.0.1 and localhost (plus `extra_dns`), written to
    /// `<file_stem>.crt` and `<file_stem>.key`.
    pub fn issue_server(&self, file_stem: &str, extra_dns: &[&str]) -> Result<CertFiles> {
        self.issue_server_with_ips(file_stem, extra_dns, &[])
    }

    /// Like [`LabCa::issue_server`], also naming `extra_ips` (e.g. the node's bridge address,
    /// where pods reach the lab).
    pub fn issue_server_with_ips(&self, file_stem: &str, extra_dns: &[&str], extra_ips: &[IpAddr]) -> Result<CertFiles> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(file_stem, None);
        params.subject_alt_names = vec![SanType::IpAddress(IpAddr::from([127, 0, 0, 1])), SanType::DnsName("localhost".try_into()?)];
        params.subject_alt_names.extend(extra_ips.iter().map(|ip| SanType::IpAddress(*ip)));
        for dns in extra_dns {
            params.subject_alt_names.push(SanType::DnsName((*dns).try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.issue(file_stem, params)
    }

    /// Issues a client certificate with the given common name and organization (Kubernetes reads
    /// them as user and group).
    pub fn issue_client(&self, file_stem: &str, common_name: &str, organization: Option<&str>) -> Result<CertFiles> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, organization);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.issue(file_stem, params)
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> Result<CertFiles> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.crt")),
            key: self.dir.join(format!("{file_stem}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(&files.cert, &files.cert_pem)?;
        std::fs::write(&files.key, &files.key_pem)?;
        Ok(files)
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// An RSA key pair written as `<stem>.key` (PKCS#8) and `<stem>.pub` (SPKI). Service-account
/// tokens on AKS are RS256, so the lab signs them with RSA too; ring cannot generate RSA keys,
/// so this uses the `openssl` command.
pub fn rsa_key_pair(dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{stem}.key"));
    let public = dir.join(format!("{stem}.pub"));
    run(Command::new("openssl").args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"]).arg(&key))?;
    run(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&key).arg("-out").arg(&public))?;
    Ok((key, public))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?} (is openssl installed?)"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
