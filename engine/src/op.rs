//! Shard ops: the unit of the per-shard op log and of replication.
//!
//! A primary turns each client write into one [`ShardOp`] per shard it
//! touches and gives it the shard's next LSN; every replica applies the same
//! ops in the same LSN order and so reaches the same state (including where
//! segments are sealed). Ops carry already-validated data: cosine vectors
//! are normalised before the op is made, never while applying it.
//!
//! Persisted and sent between nodes as [`OpRecord`], a versioned envelope:
//! the `V1` shape is never edited, a new shape becomes `V2`.

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
}

/// The stored (and replicated) form of a [`ShardOp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpRecord {
    V1(ShardOp),
}

impl ShardOp {
    /// Number of points or ids the op carries.
    pub fn len(&self) -> usize {
        match self {
            ShardOp::Upsert(p) => p.len(),
            ShardOp::Delete(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes the op in its current envelope version.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a borrowed op into the envelope would need a second
        // enum; ops are encoded once per write, the clone is not the cost.
        postcard::to_stdvec(&OpRecord::V1(self.clone())).expect("ops are plain data")
    }

    /// Decodes an op of any known envelope version.
    pub fn decode(bytes: &[u8]) -> Result<ShardOp, EngineError> {
        match postcard::from_bytes::<OpRecord>(bytes) {
            Ok(OpRecord::V1(op)) => Ok(op),
            Err(e) => Err(EngineError::corrupt("op log", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_version_tag() {
        let op = ShardOp::Upsert(vec![Point {
            id: 7,
            vector: vec![1.0, 2.0],
            payload: Some("{}".into()),
        }]);
        let bytes = op.encode();
        assert_eq!(bytes[0], 0, "V1 is envelope tag 0");
        assert_eq!(ShardOp::decode(&bytes).unwrap(), op);
        let del = ShardOp::Delete(vec![1, 2, 3]);
        assert_eq!(ShardOp::decode(&del.encode()).unwrap(), del);
        assert!(ShardOp::decode(&[9, 9]).is_err());
    }
}
