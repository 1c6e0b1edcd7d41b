//! Server-side TLS and the node's own identity.
//!
//! The server accepts both ALPNs on one certificate. Client certificates are
//! optional at the TLS layer (application clients authenticate by token),
//! but any certificate that *is* presented must chain to the cluster CA, so
//! a foreign certificate fails the handshake. Whether a connection may use
//! the node ALPN is decided after the handshake from the verified
//! certificate (see [`crate::certs::node_id_of_cert`]).

use std::sync::Arc;

use edgevec_client::tls::{self as ctls, TlsError};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::certs::CertPaths;

/// This node's certificate, key and the cluster CA, loaded from disk.
pub struct Identity {
    pub ca_pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The node's stateless-reset secret: SHA-256 of a label and its
    /// private key, so it is the same after a restart and known to nobody
    /// without the key (see `edgevec_client::tls::endpoint_with_reset_secret`).
    pub fn reset_secret(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"edgevec stateless reset key v1");
        h.update(self.key.secret_der());
        h.finalize().into()
    }

    pub fn load(paths: &CertPaths, node_id: u64) -> Result<Self, TlsError> {
        let ca_pem = ctls::read(&paths.ca_cert())?;
        let chain = ctls::certs_from_pem(
            &ctls::read(&paths.node_cert(node_id))?,
            &paths.node_cert(node_id).display().to_string(),
        )?;
        let key = ctls::key_from_pem(
            &ctls::read(&paths.node_key(node_id))?,
            &paths.node_key(node_id).display().to_string(),
        )?;
        Ok(Self { ca_pem, chain, key })
    }

    /// The QUIC server configuration: both ALPNs, optional verified client
    /// certificates, TLS 1.3 only, no 0-RTT.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let roots = Arc::new(ctls::root_store(&self.ca_pem)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, ctls::provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(ctls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("node certificate: {e}")))?;
        tls.alpn_protocols = vec![edgevec_proto::ALPN_CLIENT.to_vec(), edgevec_proto::ALPN_NODE.to_vec()];
        tls.max_early_data_size = 0;
        let quic =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(ctls::transport()));
        Ok(config)
    }

    /// The client configuration for dialing other nodes (mutual TLS).
    pub fn peer_client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        ctls::client_config(
            &self.ca_pem,
            Some((self.chain.clone(), self.key.clone_key())),
            edgevec_proto::ALPN_NODE,
        )
    }
}
