//! Shard ops: the unit of the per-shard op log and of replication.
//!
//! A primary turns each client write into one [`ShardOp`] per shard it
//! touches and gives it the op id `(term, lsn)` of the shard's next log
//! position; every replica logs and then applies the same ops in the same
//! LSN order and so reaches the same state (including where segments are
//! sealed). Ops carry already-validated data: cosine vectors are normalised
//! before the op is made, never while applying it.
//!
//! Persisted and sent between nodes as [`OpRecord`], a versioned envelope.
//! Postcard encodes enum variants by index, so neither enum is ever
//! reordered: new ops go at the end of [`ShardOp`], new envelope shapes
//! become new `OpRecord` versions.

use edgevec_proto::Point;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// A write to one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShardOp {
    /// Insert or replace; a later occurrence of an id in the same op wins.
    Upsert(Vec<Point>),
    /// Remove these ids; ids that are not present are ignored.
    Delete(Vec<u64>),
    /// Written by a new primary as the first op of its term: once every
    /// in-sync replica holds it, everything before it is committed.
    /// Applying it changes no rows.
    EpochStart,
    /// Merges these sealed segments (segment ids as `describe` shows them;
    /// merged segments may be sources again) into one new segment holding
    /// their rows live at this op, in source order; deleted rows are
    /// dropped. Decided by the primary (`crate::compaction`); applying it
    /// is deterministic, so every replica merges alike. Sources that are
    /// not current sealed segments make it a no-op.
    Merge { sources: Vec<u64> },
}

/// The stored (and replicated) form of a [`ShardOp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpRecord {
    /// Layout 1 (single node): no term. Still decoded, as term 0.
    V1(ShardOp),
    /// The op with the primary term that wrote it.
    V2 { term: u64, op: ShardOp },
}

/// Postcard's tag of `OpRecord::V2` (a variant's index, as a varint).
const V2_TAG: u8 = 1;

impl ShardOp {
    /// Number of points or ids the op carries.
    pub fn len(&self) -> usize {
        match self {
            ShardOp::Upsert(p) => p.len(),
            ShardOp::Delete(ids) => ids.len(),
            ShardOp::EpochStart | ShardOp::Merge { .. } => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes the op of primary term `term` in the current envelope
    /// (`OpRecord::V2`).
    pub fn encode(&self, term: u64) -> Vec<u8> {
        // A struct variant is its tag followed by its fields, so this is the
        // encoding of `OpRecord::V2 { term, op }` without cloning the op (a
        // test pins the equality).
        postcard::to_extend(&(term, self), vec![V2_TAG]).expect("ops are plain data")
    }

    /// Decodes a record of any known envelope version into `(term, op)`;
    /// `V1` records carry no term and read as term 0.
    pub fn decode_with_term(bytes: &[u8]) -> Result<(u64, ShardOp), EngineError> {
        match postcard::from_bytes::<OpRecord>(bytes) {
            Ok(OpRecord::V1(op)) => Ok((0, op)),
            Ok(OpRecord::V2 { term, op }) => Ok((term, op)),
            Err(e) => Err(EngineError::corrupt("op record", e)),
        }
    }

    /// Decodes a record of any known envelope version, dropping its term.
    pub fn decode(bytes: &[u8]) -> Result<ShardOp, EngineError> {
        Self::decode_with_term(bytes).map(|(_, op)| op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_version_tags() {
        let op = ShardOp::Upsert(vec![Point {
            id: 7,
            vector: vec![1.0, 2.0],
            payload: Some("{}".into()),
        }]);
        let bytes = op.encode(3);
        assert_eq!(bytes[0], 1, "V2 is envelope tag 1");
        let owned = OpRecord::V2 {
            term: 3,
            op: op.clone(),
        };
        assert_eq!(
            bytes,
            postcard::to_stdvec(&owned).unwrap(),
            "same bytes as the owned envelope"
        );
        assert_eq!(ShardOp::decode_with_term(&bytes).unwrap(), (3, op.clone()));
        assert_eq!(ShardOp::decode(&bytes).unwrap(), op);
        for op in [ShardOp::Delete(vec![1, 2, 3]), ShardOp::EpochStart] {
            assert_eq!(ShardOp::decode_with_term(&op.encode(u64::MAX)).unwrap(), (u64::MAX, op));
        }
        // Layout 1 records decode as term 0.
        let v1 = postcard::to_stdvec(&OpRecord::V1(op.clone())).unwrap();
        assert_eq!(v1[0], 0);
        assert_eq!(ShardOp::decode_with_term(&v1).unwrap(), (0, op));
        assert!(ShardOp::decode(&[9, 9]).is_err());
        // Variant indexes are the wire format.
        assert_eq!(postcard::to_stdvec(&ShardOp::EpochStart).unwrap(), vec![2]);
        let merge = ShardOp::Merge { sources: vec![3, 300] };
        assert_eq!(postcard::to_stdvec(&merge).unwrap(), vec![3, 2, 3, 172, 2]);
        assert_eq!(ShardOp::decode_with_term(&merge.encode(4)).unwrap(), (4, merge));
    }
}
