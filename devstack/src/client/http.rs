//! TLS pinned to a fingerprint, and the HTTP plumbing every step shares: base URLs, request
//! errors, bodies and refusals.

use edge::error_chain;

use serde_json::Value;

use super::report::quote;
use super::{ClientError, MAX_QUOTED_BODY, Step};

/// A fingerprint as 64 lowercase hex digits; also accepts openssl's form
/// (`AB:CD:...`, upper case with colons).
pub fn normalize_fingerprint(fingerprint: &str) -> Result<String, ClientError> {
    edge::pin::normalize_fingerprint(fingerprint).map_err(invalid_fingerprint)
}

fn invalid_fingerprint(error: edge::pin::InvalidFingerprint) -> ClientError {
    ClientError::Invalid {
        what: "TLS fingerprint",
        reason: error.to_string(),
    }
}

/// A client configuration that trusts only the certificate with `fingerprint` (TLS 1.2 and
/// 1.3, ALPN `http/1.1`: the host's endpoint speaks HTTP/1.1 only).
pub fn pinned_tls_config(fingerprint: &str) -> Result<rustls::ClientConfig, ClientError> {
    edge::pin::pinned_client_config(fingerprint).map_err(|error| match error {
        edge::pin::PinError::Fingerprint(error) => invalid_fingerprint(error),
        edge::pin::PinError::Tls(reason) => ClientError::Tls(reason),
    })
}

pub(super) fn checked_base_url(what: &'static str, url: &str) -> Result<String, ClientError> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| ClientError::Invalid {
        what,
        reason: format!("{url:?}: {e}"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(ClientError::Invalid {
            what,
            reason: format!("{url:?}: an http(s) URL expected"),
        });
    }
    Ok(url.trim().trim_end_matches('/').to_owned())
}

pub(super) fn request_error(step: Step, url: &str, error: reqwest::Error) -> ClientError {
    // The URL is in our message already.
    let error = error.without_url();
    ClientError::Request {
        step,
        url: url.to_owned(),
        detail: error_chain(&error),
    }
}

pub(super) async fn read_body(
    step: Step,
    url: &str,
    response: reqwest::Response,
) -> Result<(reqwest::StatusCode, axum::body::Bytes), ClientError> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| request_error(step, url, e))?;
    Ok((status, body))
}

/// Both error shapes: the scaling service's `{"error": CODE, "message"}` and the host's
/// `{"error": MESSAGE, "code": CODE}`; anything else is quoted.
pub(super) fn refusal(
    step: Step,
    url: &str,
    status: reqwest::StatusCode,
    body: &[u8],
) -> ClientError {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let (code, message) = match (field("code"), field("error"), field("message")) {
        (Some(code), error, _) => (Some(code), error),
        (None, Some(error), message) if step != Step::Token => (Some(error), message),
        (None, Some(error), _) => (None, Some(error)),
        (None, None, _) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            (
                None,
                (!text.is_empty()).then(|| quote(text, MAX_QUOTED_BODY)),
            )
        }
    };
    ClientError::Refused {
        step,
        url: url.to_owned(),
        status: status.as_u16(),
        code,
        message,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::fingerprint_of;
    use super::*;

    #[test]
    fn refusals_name_the_servers_code_in_either_shape() {
        let url = "http://x/mandelbox/assign";
        let e = refusal(
            Step::Assign,
            url,
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error": "NO_INSTANCE_AVAILABLE"}"#,
        );
        assert_eq!(e.code(), Some("NO_INSTANCE_AVAILABLE"));
        assert_eq!(
            e.to_string(),
            "assign: http://x/mandelbox/assign answered 503 NO_INSTANCE_AVAILABLE"
        );
        let e = refusal(
            Step::JsonTransport,
            "https://h/json_transport",
            reqwest::StatusCode::UNAUTHORIZED,
            br#"{"error": "token expired", "code": "unauthorized"}"#,
        );
        assert_eq!(e.code(), Some("unauthorized"));
        assert!(
            e.to_string().ends_with("401 unauthorized: token expired"),
            "{e}"
        );
        let e = refusal(
            Step::Token,
            "http://c/token",
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error": "user_id must be 1 to 256 printable characters"}"#,
        );
        assert_eq!(e.code(), None);
        assert!(
            e.to_string()
                .ends_with("400: user_id must be 1 to 256 printable characters")
        );
        let e = refusal(
            Step::Assign,
            url,
            reqwest::StatusCode::BAD_GATEWAY,
            b"<html>bad</html>",
        );
        assert!(e.to_string().ends_with("502: <html>bad</html>"), "{e}");
    }

    #[test]
    fn fingerprints_normalize_from_openssls_form() {
        let hex = "3f0c".repeat(16);
        let openssl = hex
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(normalize_fingerprint(&openssl).unwrap(), hex);
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"g".repeat(64)).is_err());
        assert_eq!(fingerprint_of(b"").len(), 64);
    }
}
