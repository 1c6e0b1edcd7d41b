//! TLS material for QUIC connections to edgevec nodes.
//!
//! Loads PEM files and builds rustls client configurations: verified
//! against the cluster CA only (never the system roots: a cluster is its own
//! trust domain), TLS 1.3, no 0-RTT (early data could be replayed, and it
//! would bypass client authentication on node connections).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{what} has no usable PEM {kind}: {detail}")]
    Pem {
        what: String,
        kind: &'static str,
        detail: String,
    },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// Parses every certificate of a PEM text.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            kind: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            kind: "certificate",
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Parses the private key of a PEM text.
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what: what.to_string(),
        kind: "private key",
        detail: e.to_string(),
    })
}

/// Reads a file for TLS use, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A root store holding exactly the cluster CA certificate(s).
pub fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "CA file")? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The crypto provider every edgevec TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client TLS config for one ALPN, optionally presenting a certificate
/// (node-to-node connections must; application clients may).
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(root_store(ca_pem)?);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// QUIC transport settings shared by clients and nodes: keep-alives every
/// 500 ms and a 2 s idle timeout, so a dead peer is noticed (and a client
/// moves to its next endpoint) within about two seconds, not the default
/// half-minute; four keep-alives must be lost before a live peer is dropped.
/// A connection may have at most [`CONNECTION_WINDOW_BYTES`] received and
/// not yet read (quinn's default is unbounded), so what a peer can make
/// the other side buffer is bounded per connection.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(2)).expect("2 s fits in a VarInt"),
    ));
    t.max_concurrent_bidi_streams(256u32.into());
    t.receive_window(CONNECTION_WINDOW_BYTES.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.initial_rtt(INITIAL_RTT);
    t
}

/// The round-trip time a new connection assumes before it has measured
/// one. quinn's default (333 ms, RFC 9002's) puts the first retransmit of
/// a lost handshake packet a second later: a dial that reached a peer
/// while it was restarting then outlived a one-second dial limit. At
/// 100 ms they come about 0.3 s and 1 s after the first packet; a slower
/// link costs only a few handshake packets sent twice.
pub const INITIAL_RTT: std::time::Duration = std::time::Duration::from_millis(100);

/// Keep-alive interval of a client library's connection: a node acks
/// these, so a request waiting on a node that sends nothing for a few of
/// them is waiting on a dead or paused node ([`crate::SILENT_AFTER`]).
pub const CLIENT_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(100);

/// The transport of a client library's connection: [`transport`] with
/// keep-alives every [`CLIENT_KEEP_ALIVE`].
pub fn client_transport() -> quinn::TransportConfig {
    let mut t = transport();
    t.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
    t
}

/// Bytes a QUIC connection may have received and not yet read, over all
/// its streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Bytes of kernel buffer asked for each QUIC socket, each way. The
/// default (about 200 KiB) drops datagrams when a 512 KiB write batch
/// arrives while the receiving process is busy; every drop costs a
/// retransmission and halves the congestion window.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] of send and
/// receive buffer (the kernel may grant less: `net.core.rmem_max` and
/// `wmem_max` cap it; what was granted is logged at debug level).
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As std's bind does for "[::]": accept IPv4 too.
        let _ = socket.set_only_v6(false);
    }
    // Smaller buffers still work: a failure here is not fatal.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    tracing::debug!(
        recv = ?socket.recv_buffer_size().ok(),
        send = ?socket.send_buffer_size().ok(),
        "UDP socket buffers"
    );
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint on a socket made by [`udp_socket`].
pub fn endpoint(addr: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    endpoint_with(addr, server, quinn::EndpointConfig::default())
}

/// [`endpoint`] whose stateless-reset key and connection-id key come
/// from `secret` instead of being drawn at random. A node that restarts
/// with the same secret recognises the connection ids its previous
/// process gave out and answers a packet of such a connection with a
/// reset the peer recognises, so the peer drops that connection at once
/// and dials again, instead of waiting for its idle timeout (RFC 9000,
/// section 10.3). `secret` must stay private to the node.
pub fn endpoint_with_reset_secret(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
    secret: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let cid_key = {
        let tag = ring::hmac::sign(&reset, b"edgevec connection id key");
        u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("an HMAC-SHA256 tag has 32 bytes"))
    };
    let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(reset));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    endpoint_with(addr, server, config)
}

fn endpoint_with(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
    config: quinn::EndpointConfig,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime found for the QUIC endpoint"))?;
    quinn::Endpoint::new(config, server, udp_socket(addr)?, runtime)
}

/// The TLS server name to verify for an endpoint address: its IP literal.
/// Node certificates made by `edgevec certs` carry their IP as a SAN.
pub fn server_name(addr: &std::net::SocketAddr) -> String {
    addr.ip().to_string()
}
