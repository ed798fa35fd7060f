//! [`DbError`] and the mapping from Hasura's error envelope to it.
//!
//! Hasura answers every error on `/v1/graphql` with HTTP 200 and a body
//! `{"errors": [{"message": ..., "extensions": {"path": "$...", "code": "..."}}]}` (no `data`
//! key). The `code` decides the variant; for constraint violations the message prefix Hasura adds
//! (`Uniqueness violation. `, `Foreign key violation. `, ...) decides the kind. See
//! `shared/reference/hasura-contract.md` §1.3–1.4.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Why a request could not be completed at the transport level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkErrorKind {
    /// TCP connect, DNS or the TLS handshake failed.
    Connect,
    /// The request (or the WebSocket handshake) ran past its deadline.
    Timeout,
    /// The connection broke while a request or a subscription was using it.
    Io,
    /// The server closed the WebSocket (e.g. 1012 when Hasura restarts).
    Closed { code: Option<u16>, reason: String },
}

impl fmt::Display for NetworkErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect => f.write_str("cannot connect"),
            Self::Timeout => f.write_str("timed out"),
            Self::Io => f.write_str("connection failed"),
            Self::Closed {
                code: Some(code),
                reason,
            } if !reason.is_empty() => {
                write!(f, "connection closed by the server (code {code}: {reason})")
            }
            Self::Closed {
                code: Some(code), ..
            } => {
                write!(f, "connection closed by the server (code {code})")
            }
            Self::Closed { code: None, .. } => f.write_str("connection closed by the server"),
        }
    }
}

/// What kind of constraint a `constraint-violation` broke (from Hasura's message prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintKind {
    /// Primary key or unique constraint (Postgres 23505).
    Uniqueness,
    /// Foreign key, on insert/update or on a delete that is still referenced (23503, 23001).
    ForeignKey,
    /// NOT NULL (23502).
    NotNull,
    /// Anything else Hasura reports as `constraint-violation` (e.g. exclusion).
    Other,
}

impl fmt::Display for ConstraintKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uniqueness => "uniqueness",
            Self::ForeignKey => "foreign key",
            Self::NotNull => "not-null",
            Self::Other => "constraint",
        })
    }
}

/// The shared, clonable source of a [`DbError`].
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong talking to Hasura. `operation` is the GraphQL operation name
/// (e.g. `InsertMandelbox`), `url` the endpoint; neither the admin secret nor any header value is
/// ever part of an error.
///
/// CHECK constraint violations get their own variant, [`DbError::CheckViolation`], rather than a
/// [`ConstraintKind`]: Hasura reports them with a different code (`permission-error`, message
/// `Check constraint violation. ...`), and for us they mean something specific — a capacity that
/// would go negative, a status outside the known set — that callers test for on their own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    #[error("{operation}: {kind} ({url})")]
    Network {
        operation: &'static str,
        url: String,
        kind: NetworkErrorKind,
        #[source]
        source: Option<ErrorSource>,
    },
    #[error("{operation}: {url} answered HTTP {status}: {body}")]
    Http {
        operation: &'static str,
        url: String,
        status: u16,
        /// The start of the response body.
        body: String,
    },
    #[error("{operation}: access denied: {message}")]
    AccessDenied {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: {kind} violation at {path}: {message}")]
    ConstraintViolation {
        operation: &'static str,
        kind: ConstraintKind,
        /// The constraint's name when the message carries it, e.g. `instances_pkey`.
        constraint: Option<String>,
        message: String,
        path: String,
    },
    #[error("{operation}: check constraint violated at {path}: {message}")]
    CheckViolation {
        operation: &'static str,
        /// The constraint's name when the message carries it, e.g.
        /// `instances_remaining_capacity_check`.
        constraint: Option<String>,
        message: String,
        path: String,
    },
    /// Postgres rejected a value (`data-exception`, e.g. malformed uuid or inet text).
    #[error("{operation}: invalid value at {path}: {message}")]
    DataException {
        operation: &'static str,
        message: String,
        path: String,
    },
    /// A row an operation requires does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// Any other GraphQL error: validation (a document that does not match the server's schema),
    /// `concurrent-update`, `unexpected`, ...
    #[error("{operation}: GraphQL error {code} at {}: {message}", path.as_deref().unwrap_or("$"))]
    GraphQl {
        operation: &'static str,
        code: String,
        message: String,
        path: Option<String>,
    },
    /// The server answered, but not with what the operation expects (not a GraphQL response, a
    /// status this client does not know, a malformed id, ...).
    #[error("{operation}: cannot decode the response: {message}")]
    Decode {
        operation: &'static str,
        message: String,
    },
}

impl DbError {
    /// Whether trying the same request again later can succeed: the network, a 5xx/429, or a
    /// serialization failure between concurrent transactions. Not retried by this crate; callers
    /// decide, because a mutation that timed out may have been applied.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } => true,
            Self::Http { status, .. } => *status >= 500 || *status == 429,
            Self::GraphQl { code, .. } => code == "concurrent-update",
            _ => false,
        }
    }

    /// The Hasura `extensions.code` behind this error, when it came from one.
    pub fn hasura_code(&self) -> Option<&str> {
        match self {
            Self::AccessDenied { .. } => Some("access-denied"),
            Self::ConstraintViolation { .. } => Some("constraint-violation"),
            Self::CheckViolation { .. } => Some("permission-error"),
            Self::DataException { .. } => Some("data-exception"),
            Self::GraphQl { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Turns "no such row" answers (`Ok(None)`, `Ok(false)`) into [`DbError::NotFound`], for callers
/// to whom the row must exist:
///
/// ```no_run
/// # async fn example(db: dbclient::DbClient, id: dbclient::InstanceId) -> Result<(), dbclient::DbError> {
/// use dbclient::error::Found;
/// db.heartbeat(&id).await?.found(dbclient::InstanceId::WHAT, &id)?;
/// let instance = db.instance(&id).await?.found(dbclient::InstanceId::WHAT, &id)?;
/// # Ok(()) }
/// ```
pub trait Found {
    type Row;
    fn found(self, what: &'static str, id: &dyn fmt::Display) -> Result<Self::Row, DbError>;
}

impl<T> Found for Option<T> {
    type Row = T;
    fn found(self, what: &'static str, id: &dyn fmt::Display) -> Result<T, DbError> {
        self.ok_or_else(|| DbError::NotFound {
            what,
            id: id.to_string(),
        })
    }
}

impl Found for bool {
    type Row = ();
    fn found(self, what: &'static str, id: &dyn fmt::Display) -> Result<(), DbError> {
        if self {
            Ok(())
        } else {
            Err(DbError::NotFound {
                what,
                id: id.to_string(),
            })
        }
    }
}

/// One error object as Hasura (or any GraphQL server) sends it. Only `message` is required;
/// Hasura puts `path` (a string) and `code` under `extensions`, standard servers put `path` (an
/// array) at the top level.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WireError {
    pub message: String,
    #[serde(default)]
    pub path: Option<serde_json::Value>,
    #[serde(default)]
    pub extensions: Option<WireExtensions>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct WireExtensions {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub path: Option<serde_json::Value>,
}

/// `{data?, errors?}`.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    #[serde(default)]
    pub data: Option<serde_json::Value>,
    #[serde(default)]
    pub errors: Option<Vec<WireError>>,
}

fn render_path(path: &serde_json::Value) -> String {
    match path {
        serde_json::Value::String(path) => path.clone(),
        serde_json::Value::Array(parts) => {
            let mut rendered = String::from("$");
            for part in parts {
                match part {
                    serde_json::Value::Number(index) => rendered.push_str(&format!("[{index}]")),
                    serde_json::Value::String(field) => {
                        rendered.push('.');
                        rendered.push_str(field);
                    }
                    other => rendered.push_str(&format!(".{other}")),
                }
            }
            rendered
        }
        other => other.to_string(),
    }
}

/// The name inside the first `constraint "..."` of a Postgres message.
fn constraint_name(message: &str) -> Option<String> {
    let start = message.find("constraint \"")? + "constraint \"".len();
    let end = message[start..].find('"')?;
    Some(message[start..start + end].to_owned())
}

/// Message prefixes Hasura adds to Postgres integrity errors (`mkTxErrorHandler`).
const UNIQUENESS_PREFIX: &str = "Uniqueness violation.";
const FOREIGN_KEY_PREFIX: &str = "Foreign key violation.";
const REFERRED_PREFIX: &str = "Can not delete or update due to data being referred.";
const NOT_NULL_PREFIX: &str = "Not-NULL violation.";
const CHECK_PREFIX: &str = "Check constraint violation.";

/// Maps one GraphQL error object to a [`DbError`].
pub(crate) fn from_wire(operation: &'static str, error: WireError) -> DbError {
    let extensions = error.extensions.unwrap_or_default();
    let path = extensions
        .path
        .as_ref()
        .or(error.path.as_ref())
        .map(render_path);
    let code = extensions.code.unwrap_or_default();
    let message = error.message;
    let path_or_root = || path.clone().unwrap_or_else(|| "$".to_owned());

    if message.starts_with(CHECK_PREFIX)
        && matches!(code.as_str(), "permission-error" | "constraint-violation")
    {
        return DbError::CheckViolation {
            operation,
            constraint: constraint_name(&message),
            path: path_or_root(),
            message,
        };
    }
    match code.as_str() {
        "access-denied" => DbError::AccessDenied { operation, message },
        "constraint-violation" => {
            let kind = if message.starts_with(UNIQUENESS_PREFIX) {
                ConstraintKind::Uniqueness
            } else if message.starts_with(FOREIGN_KEY_PREFIX)
                || message.starts_with(REFERRED_PREFIX)
            {
                ConstraintKind::ForeignKey
            } else if message.starts_with(NOT_NULL_PREFIX) {
                ConstraintKind::NotNull
            } else {
                ConstraintKind::Other
            };
            DbError::ConstraintViolation {
                operation,
                kind,
                constraint: constraint_name(&message),
                path: path_or_root(),
                message,
            }
        }
        "data-exception" => DbError::DataException {
            operation,
            path: path_or_root(),
            message,
        },
        _ => DbError::GraphQl {
            operation,
            code: if code.is_empty() {
                "unknown".to_owned()
            } else {
                code
            },
            message,
            path,
        },
    }
}

/// Maps a non-empty `errors` list. Hasura sends exactly one error; should a server send more, the
/// first decides the variant and the message says how many more there were.
pub(crate) fn from_wire_errors(operation: &'static str, mut errors: Vec<WireError>) -> DbError {
    let more = errors.len().saturating_sub(1);
    if errors.is_empty() {
        return DbError::Decode {
            operation,
            message: "an empty `errors` list".to_owned(),
        };
    }
    let mut first = errors.swap_remove(0);
    if more > 0 {
        first
            .message
            .push_str(&format!(" (and {more} more errors)"));
    }
    from_wire(operation, first)
}

/// Decodes a GraphQL response body (`{data?, errors?}`) into `T`: errors first, then `data`.
pub(crate) fn decode_envelope<T: DeserializeOwned>(
    operation: &'static str,
    envelope: Envelope,
) -> Result<T, DbError> {
    if let Some(errors) = envelope.errors
        && !errors.is_empty()
    {
        return Err(from_wire_errors(operation, errors));
    }
    let data = envelope.data.ok_or_else(|| DbError::Decode {
        operation,
        message: "the response carries neither `data` nor `errors`".to_owned(),
    })?;
    serde_json::from_value(data).map_err(|error| DbError::Decode {
        operation,
        message: error.to_string(),
    })
}

/// Decodes a GraphQL response body from bytes.
pub(crate) fn decode_body<T: DeserializeOwned>(
    operation: &'static str,
    body: &[u8],
) -> Result<T, DbError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|error| DbError::Decode {
        operation,
        message: format!("not a GraphQL response ({error}): {}", body_excerpt(body)),
    })?;
    decode_envelope(operation, envelope)
}

/// How much of an unexpected body goes into an error.
const MAX_BODY_EXCERPT_CHARS: usize = 512;

pub(crate) fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut excerpt: String = text.chars().take(MAX_BODY_EXCERPT_CHARS).collect();
    if text.chars().count() > MAX_BODY_EXCERPT_CHARS {
        excerpt.push('…');
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(body: serde_json::Value) -> DbError {
        decode_body::<serde_json::Value>("Op", body.to_string().as_bytes()).unwrap_err()
    }

    fn hasura(code: &str, path: &str, message: &str) -> serde_json::Value {
        json!({"errors": [{"message": message, "extensions": {"path": path, "code": code}}]})
    }

    #[test]
    fn missing_or_wrong_admin_secret_is_access_denied() {
        for message in [
            "x-hasura-admin-secret/x-hasura-access-key required, but not found",
            "invalid x-hasura-admin-secret/x-hasura-access-key",
        ] {
            match map(hasura("access-denied", "$", message)) {
                DbError::AccessDenied {
                    operation,
                    message: m,
                } => {
                    assert_eq!(operation, "Op");
                    assert_eq!(m, message);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn request_shape_errors_are_graphql_errors_with_code_and_path() {
        for (code, path, message) in [
            ("invalid-json", "$", "Error in $: Failed reading"),
            ("parse-failed", "$", "the key 'query' was not present"),
            ("validation-failed", "$.query", "not a valid graphql query"),
            (
                "validation-failed",
                "$.selectionSet.foo",
                "field 'foo' not found in type: 'query_root'",
            ),
            (
                "validation-failed",
                "$",
                "expecting a value for non-nullable variable: \"id\"",
            ),
            (
                "parse-failed",
                "$.selectionSet.insert_t.args.objects[0].c2_integer",
                "The value 2.147483648e9 lies outside the bounds or is not an integer.",
            ),
            (
                "constraint-error",
                "$",
                "there is no unique or exclusion constraint on target column(s)",
            ),
            (
                "concurrent-update",
                "$",
                "serialization failure due to concurrent update",
            ),
            (
                "validation-failed",
                "$",
                "subscriptions must select one top level field",
            ),
            ("unexpected", "$", "database query error"),
            (
                "unexpected-payload",
                "$",
                "subscriptions are not supported over HTTP, use websockets instead",
            ),
            // A permission-error that is not a CHECK violation (role permissions).
            (
                "permission-error",
                "$",
                "check constraint of an insert permission has failed",
            ),
        ] {
            match map(hasura(code, path, message)) {
                DbError::GraphQl {
                    code: c,
                    message: m,
                    path: p,
                    ..
                } => {
                    assert_eq!(
                        (c.as_str(), m.as_str(), p.as_deref()),
                        (code, message, Some(path))
                    );
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn integrity_errors_map_to_typed_constraint_violations() {
        let cases = [
            (
                "Uniqueness violation. duplicate key value violates unique constraint \"instances_pkey\"",
                ConstraintKind::Uniqueness,
                Some("instances_pkey"),
            ),
            (
                "Foreign key violation. insert or update on table \"mandelboxes\" violates foreign key constraint \"mandelboxes_instance_id_fkey\"",
                ConstraintKind::ForeignKey,
                Some("mandelboxes_instance_id_fkey"),
            ),
            (
                "Can not delete or update due to data being referred. ",
                ConstraintKind::ForeignKey,
                None,
            ),
            (
                "Not-NULL violation. null value in column \"app\" of relation \"mandelboxes\" violates not-null constraint",
                ConstraintKind::NotNull,
                None,
            ),
            (
                "Exclusion violation. conflicting key value",
                ConstraintKind::Other,
                None,
            ),
        ];
        for (message, kind, constraint) in cases {
            let path = "$.selectionSet.insert_whist_instances.args.objects";
            match map(hasura("constraint-violation", path, message)) {
                DbError::ConstraintViolation {
                    kind: k,
                    constraint: c,
                    message: m,
                    path: p,
                    ..
                } => {
                    assert_eq!(k, kind, "{message}");
                    assert_eq!(c.as_deref(), constraint, "{message}");
                    assert_eq!(m, message);
                    assert_eq!(p, path);
                }
                other => panic!("{message}: {other:?}"),
            }
        }
    }

    #[test]
    fn check_violations_are_their_own_variant() {
        let message = "Check constraint violation. new row for relation \"instances\" violates check constraint \"instances_remaining_capacity_check\"";
        match map(hasura(
            "permission-error",
            "$.selectionSet.update_whist_instances.args",
            message,
        )) {
            DbError::CheckViolation {
                constraint, path, ..
            } => {
                assert_eq!(
                    constraint.as_deref(),
                    Some("instances_remaining_capacity_check")
                );
                assert_eq!(path, "$.selectionSet.update_whist_instances.args");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_exceptions_are_typed() {
        match map(hasura(
            "data-exception",
            "$",
            "invalid input syntax for type uuid: \"not-a-uuid\"",
        )) {
            DbError::DataException { path, .. } => assert_eq!(path, "$"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_win_over_data_and_unknown_shapes_are_decode_errors() {
        // Remote-schema style `{"data": null, "errors": [...]}`.
        let err = map(
            json!({"data": null, "errors": [{"message": "boom", "extensions": {"code": "unexpected"}}]}),
        );
        assert!(
            matches!(err, DbError::GraphQl { ref code, .. } if code == "unexpected"),
            "{err:?}"
        );
        // Standard GraphQL errors: top-level array path, no extensions.
        let err = map(json!({"errors": [{"message": "bad", "path": ["a", 0, "b"]}]}));
        assert!(
            matches!(err, DbError::GraphQl { ref code, ref path, .. } if code == "unknown" && path.as_deref() == Some("$.a[0].b")),
            "{err:?}"
        );
        assert!(matches!(map(json!({})), DbError::Decode { .. }));
        let err = decode_body::<serde_json::Value>("Op", b"<html>bad gateway</html>").unwrap_err();
        assert!(
            matches!(err, DbError::Decode { ref message, .. } if message.contains("bad gateway"))
        );
        // Data that does not fit the expected type.
        let err = decode_body::<Vec<u32>>("Op", br#"{"data": {"x": 1}}"#).unwrap_err();
        assert!(matches!(err, DbError::Decode { .. }));
    }

    #[test]
    fn several_errors_keep_the_first_and_count_the_rest() {
        let err = map(json!({"errors": [
            {"message": "first", "extensions": {"code": "validation-failed", "path": "$"}},
            {"message": "second", "extensions": {"code": "unexpected", "path": "$"}}
        ]}));
        assert!(
            matches!(err, DbError::GraphQl { ref code, ref message, .. } if code == "validation-failed" && message.contains("1 more")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_rows_become_not_found_with_what_and_id() {
        assert_eq!(Some(3).found("instance", &"i-1").unwrap(), 3);
        assert!(true.found("instance", &"i-1").is_ok());
        for error in [
            None::<u8>.found("instance", &"i-1").unwrap_err(),
            false.found("instance", &"i-1").unwrap_err(),
        ] {
            assert!(matches!(&error, DbError::NotFound { what: "instance", id } if id == "i-1"));
            assert_eq!(error.to_string(), "instance i-1 not found");
        }
    }

    #[test]
    fn transient_errors_are_flagged() {
        let network = DbError::Network {
            operation: "Op",
            url: "http://x".into(),
            kind: NetworkErrorKind::Timeout,
            source: None,
        };
        assert!(network.is_transient());
        assert!(map(hasura("concurrent-update", "$", "x")).is_transient());
        assert!(!map(hasura("validation-failed", "$", "x")).is_transient());
        assert!(!map(hasura("access-denied", "$", "x")).is_transient());
    }
}
