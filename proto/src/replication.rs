//! Wire types of the data plane between nodes: replication (primary →
//! backup), writes forwarded to a shard's primary, reads of one shard
//! replica, and log-position reports used for failover and catch-up.
//!
//! They travel inside [`crate::internal::NodeOpV1`], so only holders of a
//! node certificate of the cluster reach them. Every message names the
//! shard by the collection's stable id (never its name), so a dropped and
//! re-created collection can never receive the old one's ops.

use serde::{Deserialize, Serialize};

use crate::types::{Hit, IndexBuild, OpId, Point, PointRecord, SearchParams, SegmentInfo};

/// One shard of one collection, by the collection's stable id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardRef {
    pub collection: u64,
    pub shard: u32,
}

impl std::fmt::Display for ShardRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "collection {} shard {}", self.collection, self.shard)
    }
}

/// One op of a shard's log as sent to a backup: its id and the op in the
/// engine's versioned encoding (decoded and checked by the receiver).
/// The record is shared, not copied, between the local append and the
/// message to each backup; on the wire it is a length and the bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: OpId,
    pub op: bytes::Bytes,
}

/// Primary → backup: append `entries` right after `prev` (log matching),
/// and learn that everything through `commit_lsn` is committed. With no
/// entries it is a commit notice / heartbeat that also proves `term` is
/// still the primary's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replicate {
    pub shard: ShardRef,
    /// The sender's primary term. The receiver checks that the metadata
    /// names the sending node (from its certificate) primary of this term.
    pub term: u64,
    pub prev: OpId,
    pub entries: Vec<LogEntry>,
    pub commit_lsn: u64,
    /// The sender's log ended with the last op of this message (or
    /// `prev` when there are none) when it was sent: the receiver drops
    /// what it holds after it if that is of an older term (an old
    /// primary's suffix). Ops of `term` after it are the sender's own,
    /// from messages still in flight, and stay.
    pub ends_log: bool,
}

/// A backup's answer to [`Replicate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicateReply {
    /// The entries are persisted (fsynced); the log now ends at `last`.
    Ack { last: OpId },
    /// `prev` is not in this log: the sender must find where the logs
    /// diverge from this position and term history and resend from there.
    Mismatch { last: OpId, history: Vec<(u64, u64)> },
    /// Taking the entries would truncate ops this replica already made
    /// searchable: it must be rebuilt from an export, never patched.
    NeedsRebuild { last: OpId },
}

/// Largest chunk of a shard export in one message.
pub const EXPORT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Primary → replica: one chunk of a shard export, on its own stream. The
/// receiver writes chunks in order to a file of its own and imports it
/// only once the whole file is there and its checksum holds; until then
/// its replica is untouched (never half-imported).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportChunk {
    pub shard: ShardRef,
    /// The sender's primary term (checked like a [`Replicate`]).
    pub term: u64,
    /// Names this transfer; a chunk of another transfer starts over.
    pub transfer: u64,
    pub offset: u64,
    /// Size of the whole export file.
    pub total: u64,
    /// At most [`EXPORT_CHUNK_BYTES`].
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// The export's last op id: the replica's log ends there after import.
    pub last: OpId,
}

/// What a replica holds of one sealed segment (the engine's digest of its
/// rows and payloads): a primary leaves out of an export the segments
/// whose digest is the same as its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDigestV1 {
    pub segment: u64,
    pub rows: u32,
    pub sealed_lsn: u64,
    pub sha256: [u8; 32],
}

/// Most sealed-segment digests a replica reports (its oldest segments
/// beyond that are sent whole; at the smallest seal size, 64 rows, that
/// is 6.4 million rows), and a bound on what a primary takes from a peer.
pub const MAX_SEALED_DIGESTS: usize = 100_000;

/// The receiver's answer to an [`ExportChunk`]: how much of the transfer
/// it holds (the sender resumes from there), and once imported, its log end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportProgress {
    pub received: u64,
    pub imported: Option<OpId>,
}

/// A client write for one shard, forwarded by a proxy to its primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WriteOp {
    Upsert(Vec<Point>),
    Delete(Vec<u64>),
}

/// Reads of one shard replica (proxy → the replica's node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShardRead {
    /// Validated, normalised queries.
    Search {
        shard: ShardRef,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
    },
    Get {
        shard: ShardRef,
        ids: Vec<u64>,
    },
    /// Counts and log position of the replica.
    Status {
        shard: ShardRef,
    },
    /// `Search` with search parameters (sent only when they are not the
    /// default, so nodes of earlier builds keep serving default searches).
    SearchV2 {
        shard: ShardRef,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        params: SearchParams,
    },
    /// `Status` with the replica's index builds under way
    /// ([`ShardReadReply::StatusV2`]).
    StatusV2 {
        shard: ShardRef,
    },
    /// `SearchV2` of the points that pass `filter` (JSON, see
    /// [`crate::filter`]).
    SearchV3 {
        shard: ShardRef,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        params: SearchParams,
        filter: String,
    },
    /// Live points, or those that pass `filter` (JSON):
    /// [`ShardReadReply::Count`].
    Count {
        shard: ShardRef,
        filter: Option<String>,
    },
    /// Ids of the live points that pass `filter` (JSON), ascending, above
    /// `after`, at most `limit`: [`ShardReadReply::Ids`].
    Ids {
        shard: ShardRef,
        filter: String,
        after: Option<u64>,
        limit: u32,
    },
}

impl ShardRead {
    pub fn shard(&self) -> ShardRef {
        match self {
            ShardRead::Search { shard, .. }
            | ShardRead::SearchV2 { shard, .. }
            | ShardRead::SearchV3 { shard, .. }
            | ShardRead::Count { shard, .. }
            | ShardRead::Ids { shard, .. }
            | ShardRead::Get { shard, .. }
            | ShardRead::Status { shard }
            | ShardRead::StatusV2 { shard } => *shard,
        }
    }
}

/// What the serving replica must make sure of before it answers a read:
/// the consistency plugin's requirement for it (ARCHITECTURE.md,
/// "Reads"). The replica enforces it itself, waiting at most the read's
/// budget, else it answers [`crate::ErrorCode::NotCaughtUp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadRequirement {
    /// Whatever it has applied (it must be serviceable).
    None,
    /// It has applied everything its current-term primary had committed
    /// at a moment at most `ms` ago on this replica's own clock.
    MaxStaleness { ms: u64 },
    /// Linearizable: only the primary serves, at its commit LSN after a
    /// read-index round over its ack set.
    ReadIndex,
}

/// A read of one shard replica with its requirement and time budget
/// (proxy → the replica's node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReadAt {
    pub read: ShardRead,
    pub requirement: ReadRequirement,
    /// Besides the requirement, the replica must have applied this LSN (a
    /// client's session token; 0: none). Tokens name committed ops, and
    /// committed ops form one history, so any replica that applied this
    /// LSN holds the op the token names.
    pub min_lsn: u64,
    /// Longest the replica may wait for its requirement, counted from
    /// when it reads the request.
    pub budget_ms: u32,
    /// When the proxy sent the read, on its wall clock (Unix ms), and how
    /// long it will wait for the answer from then. The replica never
    /// compares this clock with its own: it learns each proxy's offset
    /// (plus the fastest delivery) from the reads that proxy sends, and
    /// drops a read that reached it later than that by more than `ttl_ms`
    /// (a node resumed after a pause must not run a stale queue). Nothing
    /// else is decided from it.
    pub sent_unix_ms: u64,
    pub ttl_ms: u32,
}

/// A replica's answer to a [`ShardReadAt`]: the reply and the op id of
/// the last op it had applied (the read's session token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReadAtReply {
    pub reply: ShardReadReply,
    pub served: OpId,
}

/// What a replica reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub shard: ShardRef,
    pub node: u64,
    /// Highest term it has accepted (durable).
    pub term: u64,
    /// End of its fsynced log.
    pub last: OpId,
    /// LSN through which its ops are searchable.
    pub applied_lsn: u64,
    /// Live points it holds (applied state).
    pub points: u64,
    /// (term, first LSN) pairs, ascending.
    pub history: Vec<(u64, u64)>,
    /// This replica is the primary of the current term and takes writes.
    pub serving: bool,
    /// On a primary: the catch-ups it runs, node → progress.
    pub catch_ups: Vec<(u64, String)>,
    /// Why the replica is damaged (persisting failed), if it is.
    pub damaged: Option<String>,
    pub segments: Vec<SegmentInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShardReadReply {
    Hits(Vec<Vec<Hit>>),
    /// Points found among the asked ids (absent ones left out).
    Points(Vec<PointRecord>),
    Status(ReplicaReport),
    StatusV2 {
        report: ReplicaReport,
        builds: Vec<IndexBuild>,
    },
    Count(u64),
    Ids(Vec<u64>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::internal::RaftRpc;

    /// The shapes these messages had when their byte fields were plain
    /// `Vec<u8>` (encoded one element at a time): what nodes of that
    /// version send and expect.
    #[derive(Serialize, Deserialize)]
    struct OldEntry {
        id: OpId,
        op: Vec<u8>,
    }
    #[derive(Serialize, Deserialize)]
    enum OldRaftRpc {
        Append(Vec<u8>),
    }

    #[test]
    fn byte_fields_keep_their_wire_form() {
        let record: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let new = LogEntry {
            id: OpId::new(3, 9),
            op: bytes::Bytes::from(record.clone()),
        };
        let old = OldEntry {
            id: OpId::new(3, 9),
            op: record.clone(),
        };
        assert_eq!(codec::encode(&new), codec::encode(&old));
        let back: LogEntry = postcard::from_bytes(&codec::encode(&old)).unwrap();
        assert_eq!(back, new);

        // A newtype variant's field with `serde_bytes`.
        let rpc = RaftRpc::Append(record.clone());
        assert_eq!(codec::encode(&rpc), codec::encode(&OldRaftRpc::Append(record)));
    }

    #[test]
    fn a_byte_field_longer_than_the_message_is_refused() {
        // Length 2^20 announced, 3 bytes present: refused, nothing sized
        // from the announced length.
        let mut body = codec::encode(&OpId::new(1, 1));
        body.extend_from_slice(&[0x80, 0x80, 0x40, 1, 2, 3]);
        assert!(postcard::from_bytes::<LogEntry>(&body).is_err());
    }
}
