//! Parsing of the client's `PUT /json_transport` body (reference §2.2 and §12): strict about
//! what the host uses, tolerant of what it does not (unknown fields are ignored, as in the
//! original), and every refusal names the field.
//!
//! `json_data` arrives as stringified JSON, or (later clients) zlib-compressed and base64-encoded;
//! it is inflated with a hard size limit, so a small body cannot expand into gigabytes. Either
//! way it must be the text of a JSON object, and that text is kept as it came (the original wrote
//! it to `config.json` verbatim), so an identical retry compares equal.

use std::io::Read as _;

use base64::Engine as _;
use dbclient::types::MandelboxId;
use serde::Deserialize;
use serde_json::Value;

/// Largest request body accepted. `json_data` holds a few settings; browser data import
/// (cookies, bookmarks) made the original's bodies grow to hundreds of KiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest `json_data` text, plain or once inflated: what `config.json` may hold.
pub const MAX_JSON_DATA_BYTES: usize = 256 * 1024;

/// Why a body was refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RequestError {
    /// The JSON field (or `body`).
    pub field: &'static str,
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError {
        field,
        reason: reason.into(),
    }
}

/// A parsed request.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonTransportRequest {
    pub mandelbox_id: MandelboxId,
    /// The client's settings: the text of a JSON object (what `config.json` holds).
    pub json_data: String,
    /// The Auth0 token from the body, for clients that send it there rather than in
    /// `Authorization: Bearer` (the original's only way).
    pub body_token: Option<String>,
    /// The app to run. Parsed for compatibility; the app comes from the mandelbox's row (or is
    /// `browsers/chrome` in local development), see `docs/parity.md` row 38.
    pub app_name: Option<String>,
    /// `config_encryption_token`, `is_new_config_encryption_token`, `cookies`, `bookmarks` and
    /// `extensions`: the user's profile and initial browser data (reference §3.10).
    pub profile: crate::profile::lifecycle::ProfileRequest,
}

impl std::fmt::Debug for JsonTransportRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonTransportRequest")
            .field("mandelbox_id", &self.mandelbox_id)
            .field("json_data_bytes", &self.json_data.len())
            .field(
                "body_token",
                &self.body_token.as_ref().map(|_| logger::REDACTED),
            )
            .field("app_name", &self.app_name)
            .field("profile", &self.profile)
            .finish()
    }
}

#[derive(Deserialize)]
struct Body {
    mandelbox_id: Option<Value>,
    json_data: Option<Value>,
    jwt_access_token: Option<Value>,
    app_name: Option<Value>,
    config_encryption_token: Option<Value>,
    is_new_config_encryption_token: Option<Value>,
    cookies: Option<Value>,
    bookmarks: Option<Value>,
    extensions: Option<Value>,
}

/// Only the body's `jwt_access_token`, for authenticating before anything else of the body is
/// looked at (`json_data` is not decoded or inflated for a stranger): serde skips the other
/// fields without building them.
pub fn body_token(body: &[u8]) -> Result<Option<String>, RequestError> {
    #[derive(Deserialize)]
    struct TokenOnly {
        jwt_access_token: Option<Value>,
    }
    let only: TokenOnly = serde_json::from_slice(body)
        .map_err(|e| refuse("body", format!("not a JSON object: {e}")))?;
    match only.jwt_access_token {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(token)) => Ok(Some(token)),
        Some(_) => Err(refuse("jwt_access_token", "not a string")),
    }
}

/// Parses a body. Refuses oversize bodies, non-objects, a missing or malformed `mandelbox_id`,
/// and a `json_data` that is not (possibly compressed) JSON text of an object.
pub fn parse(body: &[u8]) -> Result<JsonTransportRequest, RequestError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(refuse(
            "body",
            format!("{} bytes, more than {MAX_BODY_BYTES}", body.len()),
        ));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| refuse("body", format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(refuse("body", "not a JSON object"));
    }
    let body: Body = serde_json::from_value(value)
        .map_err(|e| refuse("body", format!("unexpected shape: {e}")))?;

    let mandelbox_id = match body.mandelbox_id {
        Some(Value::String(text)) => text
            .parse::<MandelboxId>()
            .map_err(|_| refuse("mandelbox_id", "not a UUID"))?,
        Some(_) => return Err(refuse("mandelbox_id", "not a string")),
        None => return Err(refuse("mandelbox_id", "missing")),
    };
    let json_data = match body.json_data {
        Some(Value::String(text)) => settings(text)?,
        Some(_) => return Err(refuse("json_data", "not a string of JSON")),
        None => return Err(refuse("json_data", "missing")),
    };
    let optional_string = |value: Option<Value>, field| match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(refuse(field, "not a string")),
    };
    let is_new_token = match body.is_new_config_encryption_token {
        None | Some(Value::Null) => false,
        Some(Value::Bool(new)) => new,
        Some(_) => return Err(refuse("is_new_config_encryption_token", "not a boolean")),
    };
    let profile = crate::profile::lifecycle::ProfileRequest {
        token: optional_string(body.config_encryption_token, "config_encryption_token")?
            .map(logger::Secret::new),
        is_new_token,
        browser: crate::profile::browser_data::BrowserData {
            cookies: optional_string(body.cookies, "cookies")?,
            bookmarks: optional_string(body.bookmarks, "bookmarks")?,
            extensions: optional_string(body.extensions, "extensions")?,
        },
    };
    Ok(JsonTransportRequest {
        mandelbox_id,
        json_data,
        body_token: optional_string(body.jwt_access_token, "jwt_access_token")?,
        app_name: optional_string(body.app_name, "app_name")?,
        profile,
    })
}

/// `json_data` as the text of a JSON object: plain, or base64 of zlib-compressed JSON.
fn settings(text: String) -> Result<String, RequestError> {
    let text = match serde_json::from_str::<Value>(&text) {
        Ok(value) => {
            if text.len() > MAX_JSON_DATA_BYTES {
                return Err(refuse(
                    "json_data",
                    format!("{} bytes, more than {MAX_JSON_DATA_BYTES}", text.len()),
                ));
            }
            object_text(&value)?;
            text
        }
        Err(_) => {
            let inflated = inflate(&text)?;
            object_text(
                &serde_json::from_str(&inflated)
                    .map_err(|e| refuse("json_data", format!("inflated text is not JSON: {e}")))?,
            )?;
            inflated
        }
    };
    Ok(text)
}

fn object_text(value: &Value) -> Result<(), RequestError> {
    if value.is_object() {
        Ok(())
    } else {
        Err(refuse("json_data", "not a JSON object"))
    }
}

fn inflate(text: &str) -> Result<String, RequestError> {
    let compressed = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| {
            refuse(
                "json_data",
                "neither JSON nor base64 of zlib-compressed JSON",
            )
        })?;
    let mut inflated = Vec::new();
    flate2::read::ZlibDecoder::new(compressed.as_slice())
        .take(MAX_JSON_DATA_BYTES as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| refuse("json_data", format!("cannot inflate: {e}")))?;
    if inflated.len() > MAX_JSON_DATA_BYTES {
        return Err(refuse(
            "json_data",
            format!("more than {MAX_JSON_DATA_BYTES} bytes once inflated"),
        ));
    }
    String::from_utf8(inflated).map_err(|_| refuse("json_data", "inflated text is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const ID: &str = "5ccdb471-8ab2-4441-a3d1-f7f7146dda0c";

    fn compressed(json: &str) -> String {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(json.as_bytes()).unwrap();
        base64::engine::general_purpose::STANDARD.encode(encoder.finish().unwrap())
    }

    fn body(value: Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    #[test]
    fn plain_and_compressed_settings_parse_to_the_same_request() {
        let plain = parse(&body(json!({
            "mandelbox_id": ID, "json_data": "{\"dpi\":192}", "jwt_access_token": "t",
            "unknown_field": [1, 2]
        })))
        .unwrap();
        let packed = parse(&body(json!({
            "mandelbox_id": ID, "json_data": compressed("{\"dpi\":192}"), "jwt_access_token": "t"
        })))
        .unwrap();
        assert_eq!(plain, packed);
        assert_eq!(plain.json_data, "{\"dpi\":192}");
        assert_eq!(plain.body_token.as_deref(), Some("t"));
    }

    #[test]
    fn settings_are_kept_verbatim() {
        let text = "{ \"b\": 1,\n \"a\": 12345678901234567890123 }";
        let parsed = parse(&body(json!({"mandelbox_id": ID, "json_data": text}))).unwrap();
        assert_eq!(parsed.json_data, text);
    }

    #[test]
    fn refusals_name_the_field() {
        for (value, field) in [
            (json!([1]), "body"),
            (json!({"json_data": "{}"}), "mandelbox_id"),
            (
                json!({"mandelbox_id": "nope", "json_data": "{}"}),
                "mandelbox_id",
            ),
            (
                json!({"mandelbox_id": 7, "json_data": "{}"}),
                "mandelbox_id",
            ),
            (json!({"mandelbox_id": ID}), "json_data"),
            (
                json!({"mandelbox_id": ID, "json_data": {"dpi": 1}}),
                "json_data",
            ),
            (json!({"mandelbox_id": ID, "json_data": "[1]"}), "json_data"),
            (
                json!({"mandelbox_id": ID, "json_data": "not json"}),
                "json_data",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": compressed("[1]")}),
                "json_data",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": "{}", "jwt_access_token": 5}),
                "jwt_access_token",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": "{}", "app_name": []}),
                "app_name",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": "{}", "config_encryption_token": 1}),
                "config_encryption_token",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": "{}", "is_new_config_encryption_token": "yes"}),
                "is_new_config_encryption_token",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": "{}", "cookies": [1]}),
                "cookies",
            ),
            (
                json!({"mandelbox_id": ID, "json_data": "{}", "extensions": {}}),
                "extensions",
            ),
        ] {
            let error = parse(&body(value.clone())).unwrap_err();
            assert_eq!(error.field, field, "{value}: {error}");
        }
        assert_eq!(parse(b"{").unwrap_err().field, "body");
    }

    #[test]
    fn a_zip_bomb_is_refused() {
        let bomb = compressed(&format!(
            "{{\"x\":\"{}\"}}",
            "a".repeat(4 * MAX_JSON_DATA_BYTES)
        ));
        assert!(bomb.len() < MAX_BODY_BYTES / 100, "small on the wire");
        let error = parse(&body(json!({"mandelbox_id": ID, "json_data": bomb}))).unwrap_err();
        assert_eq!(error.field, "json_data");
        assert!(error.reason.contains("inflated"), "{error}");
    }

    #[test]
    fn oversize_settings_and_bodies_are_refused() {
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_JSON_DATA_BYTES));
        let error = parse(&body(json!({"mandelbox_id": ID, "json_data": big}))).unwrap_err();
        assert_eq!(error.field, "json_data");
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(parse(&huge).unwrap_err().field, "body");
    }

    #[test]
    fn the_token_never_reaches_debug_output() {
        let parsed = parse(&body(json!({
            "mandelbox_id": ID, "json_data": "{}", "jwt_access_token": "very-secret-token",
            "config_encryption_token": "profile-secret-token", "cookies": "session=secret-cookie"
        })))
        .unwrap();
        let shown = format!("{parsed:?}");
        for secret in ["very-secret-token", "profile-secret-token", "secret-cookie"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn the_profile_fields_are_parsed() {
        let parsed = parse(&body(json!({
            "mandelbox_id": ID, "json_data": "{}",
            "config_encryption_token": "a-token-of-some-length",
            "is_new_config_encryption_token": true,
            "cookies": "[]", "bookmarks": "{}", "extensions": "a,b"
        })))
        .unwrap();
        let profile = &parsed.profile;
        assert_eq!(
            profile.token.as_ref().map(|t| t.expose().as_str()),
            Some("a-token-of-some-length")
        );
        assert!(profile.is_new_token);
        assert_eq!(profile.browser.cookies.as_deref(), Some("[]"));
        assert_eq!(profile.browser.bookmarks.as_deref(), Some("{}"));
        assert_eq!(profile.browser.extensions.as_deref(), Some("a,b"));
        let bare = parse(&body(json!({"mandelbox_id": ID, "json_data": "{}",
            "is_new_config_encryption_token": null})))
        .unwrap();
        assert_eq!(
            bare.profile,
            crate::profile::lifecycle::ProfileRequest::default()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_json_data_is_refused_or_an_object(data in "\\PC{0,64}") {
            let result = parse(&body(json!({"mandelbox_id": ID, "json_data": data})));
            if let Ok(request) = result {
                let parsed: Value = serde_json::from_str(&request.json_data).unwrap();
                prop_assert!(parsed.is_object());
            }
        }

        /// Structured but hostile bodies: any JSON value in any of the fields gives a request
        /// only when every field is valid, and otherwise an error naming one of the fields.
        #[test]
        fn arbitrary_field_values_are_accepted_only_when_valid(
            id in prop_oneof![
                Just(json!(ID)), any::<i64>().prop_map(Value::from),
                "\\PC{0,40}".prop_map(Value::from), Just(Value::Null),
            ],
            data in prop_oneof![
                Just(json!("{}")), Just(json!("{\"dpi\":96}")), "\\PC{0,40}".prop_map(Value::from),
                any::<bool>().prop_map(Value::from), Just(json!({"a": 1})),
            ],
            token in prop_oneof![
                Just(Value::Null), "\\PC{0,20}".prop_map(Value::from), any::<f64>().prop_map(Value::from),
            ],
        ) {
            let body = body(json!({"mandelbox_id": id, "json_data": data, "jwt_access_token": token}));
            match parse(&body) {
                Ok(request) => {
                    prop_assert_eq!(request.mandelbox_id.to_string(), ID);
                    prop_assert!(serde_json::from_str::<Value>(&request.json_data).unwrap().is_object());
                }
                Err(error) => prop_assert!(
                    ["body", "mandelbox_id", "json_data", "jwt_access_token"].contains(&error.field),
                    "{}", error
                ),
            }
        }
    }
}
