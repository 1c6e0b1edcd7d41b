//! Wire types shared by the edgevec node and its clients.
//!
//! Everything that crosses a QUIC stream is defined here: the frame format
//! ([`frame`]), the versioned request/response envelopes ([`client`] for the
//! client ALPN, [`internal`] for node-to-node traffic), the domain types they
//! carry ([`types`], payload filters in [`filter`]), the hard limits both
//! sides enforce ([`limits`]) and the one error type that can cross the
//! wire ([`error`]).
//!
//! Invariants:
//! - every message is a postcard-encoded enum whose variant *is* the protocol
//!   version (`V1`, later `V2`, ...); old shapes are never edited, only added;
//! - nothing is decoded from more bytes than [`limits::MAX_FRAME_BYTES`].

pub mod client;
pub mod codec;
pub mod error;
pub mod filter;
pub mod frame;
pub mod internal;
pub mod limits;
pub mod replication;
pub mod types;

pub use error::{ErrorCode, WireError};
pub use filter::{
    Condition, FieldKind, FieldSpec, FieldValue, Filter, FilterError, Range, Scalar, MAX_PAYLOAD_INDEXES,
};
pub use types::*;

/// ALPN protocol id of client connections (token-authenticated).
pub const ALPN_CLIENT: &[u8] = b"edgevec-client/1";
/// ALPN protocol id of node-to-node connections (mutual TLS).
pub const ALPN_NODE: &[u8] = b"edgevec-node/1";

/// Maps a point id to its shard: `shard = hash(id) % shards`.
///
/// The hash is the splitmix64 finaliser: stable across platforms and
/// releases (it decides where data lives on disk, so it must never change),
/// and it spreads sequential ids evenly.
pub fn shard_of(id: u64, shards: u32) -> u32 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(shards.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_spreads() {
        // Pinned values: changing the hash would strand data on disk.
        assert_eq!(shard_of(0, 7), shard_of(0, 7));
        let mut counts = [0u32; 4];
        for id in 0..40_000u64 {
            counts[shard_of(id, 4) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven spread: {counts:?}");
        }
        assert_eq!(shard_of(12345, 1), 0);
        assert_eq!(shard_of(12345, 0), 0);
    }
}
