//! Frames: one length-prefixed message per direction of a stream.
//!
//! A frame is a 4-byte big-endian body length followed by the body. The
//! length is checked against the caller's limit *before* anything is
//! allocated, so a lying prefix costs the reader four bytes, not memory.
//! A stream that ends before the announced length is a distinct error
//! ([`FrameError::Truncated`]) so servers can tell "closed mid-request" from
//! garbage.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("stream closed after {got} of {expected} bytes")]
    Truncated { got: usize, expected: usize },
    #[error("stream closed before a frame started")]
    Empty,
    #[error("i/o error on stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Parses a frame header and checks the announced length against `limit`.
pub fn body_len(header: [u8; HEADER_LEN], limit: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Builds the header for a body of `len` bytes.
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    u32::try_from(len)
        .expect("frame bodies are bounded by MAX_FRAME_BYTES")
        .to_be_bytes()
}

/// Reads one frame body of at most `limit` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<Vec<u8>, FrameError> {
    let len = read_header(r, limit).await?;
    read_body(r, len).await
}

/// Reads a frame's header and returns the body length it announces,
/// refused above `limit` before anything is allocated. Lets a server
/// reserve memory for the body before reading it.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<usize, FrameError> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Empty
            } else {
                FrameError::Truncated {
                    got,
                    expected: HEADER_LEN,
                }
            });
        }
        got += n;
    }
    body_len(head, limit)
}

/// Reads a body of exactly `len` bytes (from [`read_header`]).
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = r.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { got, expected: len });
        }
        got += n;
    }
    Ok(body)
}

/// Writes one frame (header and body) and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > crate::limits::MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: body.len(),
            limit: crate::limits::MAX_FRAME_BYTES,
        });
    }
    w.write_all(&header(body.len())).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
        let body = read_frame(&mut buf.as_slice(), 16).await.unwrap();
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn lying_prefix_is_rejected_before_allocation() {
        let bytes = [0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
        let err = read_frame(&mut bytes.as_slice(), 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, limit: 1024 } if len == u32::MAX as usize));
    }

    #[tokio::test]
    async fn truncated_body_and_header() {
        let bytes = [0, 0, 0, 10, 1, 2, 3];
        let err = read_frame(&mut bytes.as_slice(), 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated { got: 3, expected: 10 }));
        let err = read_frame(&mut [0u8, 0].as_slice(), 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated { got: 2, expected: 4 }));
        let err = read_frame(&mut [].as_slice(), 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Empty));
    }

    #[tokio::test]
    async fn empty_body_is_valid() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"").await.unwrap();
        assert_eq!(read_frame(&mut buf.as_slice(), 0).await.unwrap(), b"");
    }
}
