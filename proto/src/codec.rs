//! Encoding and decoding of envelopes.
//!
//! Decoding always works on a bounded slice (a frame body) and tells an
//! unknown protocol version apart from garbage, so a newer peer gets
//! [`ErrorCode::UnsupportedVersion`] rather than "malformed".

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ErrorCode, WireError};

/// Number of protocol versions this build understands (variants `V1..=Vn`).
pub const KNOWN_VERSIONS: u8 = 1;

/// Encodes any envelope with postcard.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("envelopes are plain data and always encode")
}

/// Decodes an envelope from a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    // The first byte is the envelope variant, i.e. the protocol version
    // minus one (postcard writes small enum tags as one varint byte).
    match body.first() {
        None => return Err(WireError::new(ErrorCode::Malformed, "empty message")),
        Some(&tag) if (KNOWN_VERSIONS..0x80).contains(&tag) => {
            return Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported by this node (it speaks 1..={KNOWN_VERSIONS}); upgrade the node or use an older client",
                    u32::from(tag) + 1
                ),
            ))
        }
        _ => {}
    }
    postcard::from_bytes(body).map_err(|e| {
        WireError::new(
            ErrorCode::Malformed,
            format!("message could not be decoded ({e}); is the peer an edgevec client of a compatible version?"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::*;
    use crate::types::*;

    fn sample() -> ClientRequest {
        ClientRequest::V1(RequestV1 {
            token: "t".into(),
            op: OpV1::Upsert {
                collection: "c".into(),
                points: vec![Point {
                    id: 7,
                    vector: vec![1.0, 2.0],
                    payload: Some("{\"a\":1}".into()),
                }],
            },
        })
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample());
        let back: ClientRequest = decode(&bytes).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn newer_version_is_named() {
        let mut bytes = encode(&sample());
        bytes[0] = 3;
        let err = decode::<ClientRequest>(&bytes).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(err.message.contains("version 4"));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for garbage in [&[0u8][..], &[0, 0xff, 0xff, 0xff, 0xff, 0x0f], &[0x80, 0x80, 0x80], b""] {
            let err = decode::<ClientRequest>(garbage).unwrap_err();
            assert!(matches!(err.code, ErrorCode::Malformed), "{err:?}");
        }
    }

    #[test]
    fn lying_inner_length_does_not_allocate_unbounded() {
        // V1, token length claims ~2^63 bytes.
        let bytes = [0u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<ClientRequest>(&bytes).is_err());
        // A vector claiming 2^32 floats inside a short body.
        let mut bytes = encode(&sample());
        bytes.truncate(12);
        assert!(decode::<ClientRequest>(&bytes).is_err());
    }
}
