//! Development certificates: a cluster CA, node certificates, a client
//! certificate.
//!
//! Node certificates carry the common name `edgevec-node-<id>` and are valid
//! for both TLS server and client authentication (nodes dial each other with
//! mutual TLS). Client certificates carry `edgevec-client` and are valid
//! for client authentication only. The node ALPN admits only peers whose
//! verified certificate has a node common name (see [`node_id_of_cert`]).
//!
//! Files are PEM, named as [`CertPaths`] says, private keys written with
//! mode 0600. Existing files are never overwritten: re-running `certs`
//! only fills in what is missing, signing with the existing CA.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

/// Common-name prefix of node certificates.
pub const NODE_CN_PREFIX: &str = "edgevec-node-";
/// Common name of client certificates.
pub const CLIENT_CN: &str = "edgevec-client";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("{path} holds no PEM {what}")]
    NoPem { path: PathBuf, what: &'static str },
}

/// Where the files of one cluster's certificates live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub dir: PathBuf,
}

impl CertPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_cert(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.pem"))
    }
    pub fn node_key(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.key"))
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

/// A node to make a certificate for: its id and the names it answers to.
#[derive(Debug, Clone)]
pub struct NodeName {
    pub id: u64,
    pub hosts: Vec<String>,
}

/// What [`ensure`] did.
#[derive(Debug, Default)]
pub struct Generated {
    pub written: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

/// Makes sure the CA, every listed node's certificate and a client
/// certificate exist under `paths`, creating what is missing.
pub fn ensure(paths: &CertPaths, cluster: &str, nodes: &[NodeName]) -> Result<Generated, CertError> {
    let mut out = Generated::default();
    fs::create_dir_all(&paths.dir).map_err(|source| CertError::Io {
        action: "create",
        path: paths.dir.clone(),
        source,
    })?;
    let issuer = if paths.ca_cert().exists() && paths.ca_key().exists() {
        out.kept.push(paths.ca_cert());
        let key = KeyPair::from_pem(&read(&paths.ca_key())?)?;
        Issuer::from_ca_cert_pem(&read(&paths.ca_cert())?, key)?
    } else {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("edgevec {cluster} CA"), cluster);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let cert = params.self_signed(&key)?;
        write(&paths.ca_cert(), cert.pem().as_bytes(), false, &mut out)?;
        write(&paths.ca_key(), key.serialize_pem().as_bytes(), true, &mut out)?;
        Issuer::new(params, key)
    };

    for node in nodes {
        if paths.node_cert(node.id).exists() && paths.node_key(node.id).exists() {
            out.kept.push(paths.node_cert(node.id));
            continue;
        }
        let mut sans = vec!["localhost".to_string(), format!("node-{}", node.id)];
        sans.extend(node.hosts.iter().cloned());
        sans.sort();
        sans.dedup();
        let (cert, key) = leaf(
            &issuer,
            &format!("{NODE_CN_PREFIX}{}", node.id),
            cluster,
            &sans,
            &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        write(&paths.node_cert(node.id), cert.as_bytes(), false, &mut out)?;
        write(&paths.node_key(node.id), key.as_bytes(), true, &mut out)?;
    }

    if paths.client_cert().exists() && paths.client_key().exists() {
        out.kept.push(paths.client_cert());
    } else {
        let (cert, key) = leaf(&issuer, CLIENT_CN, cluster, &[], &[ExtendedKeyUsagePurpose::ClientAuth])?;
        write(&paths.client_cert(), cert.as_bytes(), false, &mut out)?;
        write(&paths.client_key(), key.as_bytes(), true, &mut out)?;
    }
    Ok(out)
}

/// Makes a self-signed CA and one node certificate signed by it in `dir`,
/// unrelated to any cluster: used to show that foreign certificates are refused.
pub fn foreign_node_cert(dir: &Path, node_id: u64) -> Result<CertPaths, CertError> {
    let paths = CertPaths::new(dir);
    ensure(
        &paths,
        "foreign",
        &[NodeName {
            id: node_id,
            hosts: vec!["127.0.0.1".into()],
        }],
    )?;
    Ok(paths)
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, format!("edgevec {org}"));
    dn
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    cluster: &str,
    sans: &[String],
    eku: &[ExtendedKeyUsagePurpose],
) -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn, cluster);
    params.subject_alt_names = sans
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = eku.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8], private: bool, out: &mut Generated) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    fs::write(path, bytes).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    out.written.push(path.to_path_buf());
    Ok(())
}

/// The node id in a verified peer certificate, if it is a node certificate.
pub fn node_id_of_cert(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x509.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix(NODE_CN_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_is_idempotent_and_names_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path());
        let nodes = [NodeName {
            id: 3,
            hosts: vec!["127.0.0.1".into()],
        }];
        let first = ensure(&paths, "t", &nodes).unwrap();
        assert_eq!(first.written.len(), 6);
        let ca_before = fs::read(paths.ca_cert()).unwrap();
        let second = ensure(&paths, "t", &nodes).unwrap();
        assert!(second.written.is_empty());
        assert_eq!(fs::read(paths.ca_cert()).unwrap(), ca_before);

        let pem = fs::read(paths.node_cert(3)).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        assert_eq!(node_id_of_cert(&der), Some(3));
        let pem = fs::read(paths.client_cert()).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        assert_eq!(node_id_of_cert(&der), None);
    }
}
