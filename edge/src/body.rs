//! Request bodies at the JSON edges: a declared `Content-Length` checked before anything is
//! read, then the body read with a size limit and a deadline, so neither a huge body nor a
//! slow-loris holds a connection or memory. Generic over [`http_body::Body`], so axum's and
//! hyper's bodies both fit.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::BodyExt as _;

/// How a body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// The longest body accepted.
    pub max_bytes: usize,
    /// The whole body must arrive within this long once the headers have.
    pub read_timeout: Duration,
    /// An oversize body is still read and thrown away up to this many bytes before the caller
    /// answers 413: many clients (Python's requests, curl without `Expect`) send the whole body
    /// before they read an answer, and a 413 followed by a closed connection reaches them as a
    /// network error. 0: answer at once.
    pub drain_bytes: u64,
}

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("cannot read the body: {0}")]
    Unreadable(String),
    #[error("the body was not received within {0:?}")]
    Slow(Duration),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
}

/// The declared `Content-Length`, if there is one and it is a number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The body back, unless its declared length already exceeds the limit: then
/// [`BodyError::TooLarge`], and if the length is within [`BodyLimits::drain_bytes`] the body
/// has been drained first, so the client reads the caller's 413.
pub async fn check_declared_length<B>(
    headers: &HeaderMap,
    body: B,
    limits: &BodyLimits,
) -> Result<B, BodyError>
where
    B: http_body::Body + Unpin,
{
    match content_length(headers) {
        Some(length) if length > limits.max_bytes as u64 => {
            if length <= limits.drain_bytes {
                drain(body, limits).await;
            }
            Err(BodyError::TooLarge(limits.max_bytes))
        }
        _ => Ok(body),
    }
}

/// The body, at most [`BodyLimits::max_bytes`], within [`BodyLimits::read_timeout`]. An
/// oversize body is drained (see [`BodyLimits::drain_bytes`]) within the same deadline.
pub async fn read_body<B>(body: B, limits: &BodyLimits) -> Result<Bytes, BodyError>
where
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Display,
{
    let read = async {
        let mut body = body;
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Unreadable(e.to_string()))?;
            let Ok(chunk) = frame.into_data() else {
                // Trailers carry nothing we read.
                continue;
            };
            let chunk = chunk_bytes(chunk);
            if bytes.len() + chunk.len() > limits.max_bytes {
                drop(bytes);
                drain(body, limits).await;
                return Err(BodyError::TooLarge(limits.max_bytes));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    tokio::time::timeout(limits.read_timeout, read)
        .await
        .unwrap_or(Err(BodyError::Slow(limits.read_timeout)))
}

fn chunk_bytes(mut chunk: impl bytes::Buf) -> Bytes {
    chunk.copy_to_bytes(chunk.remaining())
}

/// Reads and discards `body`, at most [`BodyLimits::drain_bytes`] within
/// [`BodyLimits::read_timeout`].
pub async fn drain<B>(mut body: B, limits: &BodyLimits)
where
    B: http_body::Body + Unpin,
{
    if limits.drain_bytes == 0 {
        return;
    }
    let discard = async {
        let mut drained = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(chunk) = frame.data_ref() {
                drained += bytes::Buf::remaining(chunk) as u64;
            }
            if drained > limits.drain_bytes {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(limits.read_timeout, discard).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    const LIMITS: BodyLimits = BodyLimits {
        max_bytes: 8,
        read_timeout: Duration::from_secs(20),
        drain_bytes: 0,
    };

    #[test]
    fn content_length_is_read_when_it_is_a_number() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers), None);
        headers.insert(header::CONTENT_LENGTH, " 12 ".parse().unwrap());
        assert_eq!(content_length(&headers), Some(12));
        headers.insert(header::CONTENT_LENGTH, "x".parse().unwrap());
        assert_eq!(content_length(&headers), None);
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit() {
        let ok = read_body(Full::new(Bytes::from_static(b"12345678")), &LIMITS).await;
        assert_eq!(ok, Ok(Bytes::from_static(b"12345678")));
        let big = read_body(Full::new(Bytes::from_static(b"123456789")), &LIMITS).await;
        assert_eq!(big, Err(BodyError::TooLarge(8)));
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "9".parse().unwrap());
        let body = Full::new(Bytes::from_static(b"123456789"));
        let refused = check_declared_length(&headers, body, &LIMITS).await;
        assert_eq!(refused.err(), Some(BodyError::TooLarge(8)));
        headers.insert(header::CONTENT_LENGTH, "8".parse().unwrap());
        let body = Full::new(Bytes::from_static(b"12345678"));
        assert!(check_declared_length(&headers, body, &LIMITS).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_slow() {
        let answer = read_body(Endless, &LIMITS).await;
        assert_eq!(answer, Err(BodyError::Slow(LIMITS.read_timeout)));
    }

    /// A body whose next frame never comes (a slow-loris).
    struct Endless;

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Pending
        }
    }
}
