//! Hasura's error envelope: one error object with `message`, then `extensions` holding a
//! JSON-path string and a code (contract §1.3, §1.4), and the mapping of PostgreSQL and
//! async-graphql errors onto it.

use std::fmt;

use async_graphql::parser::types::{ExecutableDocument, Field, Selection, SelectionSet};
use async_graphql::{Pos, Positioned, ServerError};
use serde::Serialize;

/// Hasura's error codes (`extensions.code`) that this endpoint produces.
pub(crate) mod code {
    pub const ACCESS_DENIED: &str = "access-denied";
    pub const INVALID_JSON: &str = "invalid-json";
    pub const PARSE_FAILED: &str = "parse-failed";
    pub const VALIDATION_FAILED: &str = "validation-failed";
    pub const CONSTRAINT_VIOLATION: &str = "constraint-violation";
    pub const PERMISSION_ERROR: &str = "permission-error";
    pub const DATA_EXCEPTION: &str = "data-exception";
    pub const CONSTRAINT_ERROR: &str = "constraint-error";
    pub const CONCURRENT_UPDATE: &str = "concurrent-update";
    pub const UNEXPECTED: &str = "unexpected";
    pub const UNEXPECTED_PAYLOAD: &str = "unexpected-payload";
    pub const START_FAILED: &str = "start-failed";
    pub const NOT_FOUND: &str = "not-found";
    pub const INVALID_JWT: &str = "invalid-jwt";
    pub const INVALID_HEADERS: &str = "invalid-headers";
    pub const JWT_INVALID_CLAIMS: &str = "jwt-invalid-claims";
    pub const JWT_MISSING_ROLE_CLAIMS: &str = "jwt-missing-role-claims";
    /// Not Hasura's: marks mutation fields skipped after an earlier field failed, so that the
    /// response carries only the error that rolled the transaction back.
    pub const SKIPPED: &str = "skipped";
}

/// One error as Hasura reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GqlError {
    pub message: String,
    pub path: String,
    pub code: &'static str,
    /// The failing statement and PostgreSQL's own error, for `unexpected` errors (Hasura adds
    /// this for admin callers, and every caller of this endpoint is admin).
    pub internal: Option<serde_json::Value>,
    /// Raised while running SQL rather than while checking the request. A live query reports
    /// such errors as a data message and keeps running; request errors end it (contract §4.5).
    pub during_execution: bool,
}

impl GqlError {
    pub fn new(code: &'static str, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            path: path.into(),
            code,
            internal: None,
            during_execution: false,
        }
    }

    pub fn validation(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(code::VALIDATION_FAILED, path, message)
    }

    pub fn unexpected(message: impl Into<String>) -> Self {
        let mut error = Self::new(code::UNEXPECTED, "$", message);
        error.during_execution = true;
        error
    }

    pub fn skipped() -> Self {
        Self::new(
            code::SKIPPED,
            "$",
            "skipped after an earlier mutation failed",
        )
    }

    /// `{"message": ..., "extensions": {"path": ..., "code": ...}}` in Hasura's key order.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Extensions<'a> {
            path: &'a str,
            code: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            internal: Option<&'a serde_json::Value>,
        }
        #[derive(Serialize)]
        struct Error<'a> {
            message: &'a str,
            extensions: Extensions<'a>,
        }
        let error = Error {
            message: &self.message,
            extensions: Extensions {
                path: &self.path,
                code: self.code,
                internal: self.internal.as_ref(),
            },
        };
        // Serializing plain strings and a JSON value cannot fail; the fallback keeps the
        // envelope valid anyway.
        serde_json::to_string(&error).unwrap_or_else(|_| {
            format!(
                r#"{{"message":{},"extensions":{{"path":"$","code":"unexpected"}}}}"#,
                serde_json::Value::String(self.message.clone())
            )
        })
    }

    /// The HTTP body: `{"errors":[<error>]}`, with no `data` key.
    pub fn to_response_json(&self) -> String {
        format!(r#"{{"errors":[{}]}}"#, self.to_json())
    }
}

impl fmt::Display for GqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} at {})", self.message, self.code, self.path)
    }
}

/// Maps a PostgreSQL error the way Hasura's `mkTxErrorHandler` does. `args_path` is where
/// constraint violations point (the root field's `objects`/`object` or its arguments).
pub(crate) fn from_postgres(
    error: &tokio_postgres::Error,
    statement: &str,
    args_path: &str,
) -> GqlError {
    let Some(db) = error.as_db_error() else {
        let mut error = GqlError::unexpected(format!("database query error: {error}"));
        error.internal = Some(serde_json::json!({ "statement": statement }));
        return error;
    };
    let sqlstate = db.code().code();
    let message = db.message();
    let violation = |prefix: &str, code: &'static str| {
        let mut error = GqlError::new(code, args_path, format!("{prefix}{message}"));
        error.during_execution = true;
        error
    };
    match sqlstate {
        "23505" => violation("Uniqueness violation. ", code::CONSTRAINT_VIOLATION),
        "23503" => violation("Foreign key violation. ", code::CONSTRAINT_VIOLATION),
        "23502" => violation("Not-NULL violation. ", code::CONSTRAINT_VIOLATION),
        "23001" => violation(
            "Can not delete or update due to data being referred. ",
            code::CONSTRAINT_VIOLATION,
        ),
        "23514" => violation("Check constraint violation. ", code::PERMISSION_ERROR),
        "40001" => {
            let mut error = GqlError::new(
                code::CONCURRENT_UPDATE,
                "$",
                "serialization failure due to concurrent update",
            );
            error.during_execution = true;
            error
        }
        "42P10" => {
            let mut error = GqlError::new(code::CONSTRAINT_ERROR, "$", message);
            error.during_execution = true;
            error
        }
        class if class.starts_with("22") => {
            let mut error = GqlError::new(code::DATA_EXCEPTION, "$", message);
            error.during_execution = true;
            error
        }
        _ => {
            // Unexpected database errors are what a developer needs to see: log the detail
            // that Hasura keeps in `extensions.internal`.
            tracing::warn!(sqlstate, message, statement, "unexpected database error");
            let mut error = GqlError::unexpected("database query error");
            error.internal = Some(serde_json::json!({
                "statement": statement,
                "error": {
                    "status_code": sqlstate,
                    "message": message,
                    "description": db.detail(),
                    "hint": db.hint(),
                },
            }));
            error
        }
    }
}

/// Turns an error from async-graphql (parsing, validation, or one raised by a resolver) into
/// Hasura's shape. `root_type` names the operation's root type in messages.
pub(crate) fn from_server_error(
    error: &ServerError,
    document: Option<&ExecutableDocument>,
    root_type: &str,
) -> GqlError {
    if let Some(own) = error.source::<GqlError>() {
        return own.clone();
    }
    let message = error.message.as_str();
    let location = error.locations.first().copied();
    let field_path = location
        .zip(document)
        .and_then(|(pos, doc)| path_at(doc, pos))
        .unwrap_or_else(|| "$".to_owned());

    if let Some(rest) = message.strip_prefix("Unknown field \"") {
        // `Unknown field "foo" on type "query_root".` → `field 'foo' not found in type: 'query_root'`
        let mut parts = rest.split('"');
        let field = parts.next().unwrap_or_default();
        let on_type = parts.nth(1).unwrap_or(root_type);
        return GqlError::validation(
            field_path,
            format!("field '{field}' not found in type: '{on_type}'"),
        );
    }
    if message.starts_with("internal:") {
        return GqlError::unexpected(message);
    }
    if let Some(rest) = message.strip_prefix("Invalid value for argument \"") {
        // `Invalid value for argument "_set", unknown field "x" of type "t"`: Hasura's input
        // parser reports `field 'x' not found in type: 't'` as a validation failure at the
        // field's path.
        if let Some((_argument, detail)) = rest.split_once("\", unknown field \"")
            && let Some((field, on_type)) = detail.split_once("\" of type \"")
        {
            // `field_path` already points at the argument's value.
            return GqlError::validation(
                format!("{field_path}.{field}"),
                format!(
                    "field '{field}' not found in type: '{}'",
                    on_type.trim_end_matches('"')
                ),
            );
        }
        return GqlError::new(code::PARSE_FAILED, field_path, message);
    }
    if let Some(rest) = message.strip_prefix("Unknown operation named \"") {
        let name = rest.trim_end_matches('"');
        return GqlError::validation(
            "$",
            format!("no such operation found in the document: \"{name}\""),
        );
    }
    if message.starts_with("Operation name required") {
        return GqlError::validation(
            "$",
            "exactly one operation has to be present in the document when operationName is not specified",
        );
    }
    GqlError::validation(field_path, message)
}

/// Hasura's path to the field (or argument) at `pos`: `$.selectionSet.a.selectionSet.b`, or
/// `...b.args.where` when `pos` is an argument name.
pub(crate) fn path_at(document: &ExecutableDocument, pos: Pos) -> Option<String> {
    fn search(
        set: &Positioned<SelectionSet>,
        doc: &ExecutableDocument,
        pos: Pos,
        prefix: &str,
        depth: usize,
    ) -> Option<String> {
        // Fragments can nest; a cycle is a validation error of its own, so stop early.
        if depth > 64 {
            return None;
        }
        for selection in &set.node.items {
            match &selection.node {
                Selection::Field(field) => {
                    if let Some(found) = search_field(field, doc, pos, prefix, depth) {
                        return Some(found);
                    }
                }
                Selection::FragmentSpread(spread) => {
                    if let Some(fragment) = doc.fragments.get(&spread.node.fragment_name.node)
                        && let Some(found) =
                            search(&fragment.node.selection_set, doc, pos, prefix, depth + 1)
                    {
                        return Some(found);
                    }
                }
                Selection::InlineFragment(fragment) => {
                    if let Some(found) =
                        search(&fragment.node.selection_set, doc, pos, prefix, depth + 1)
                    {
                        return Some(found);
                    }
                }
            }
        }
        None
    }
    fn search_field(
        field: &Positioned<Field>,
        doc: &ExecutableDocument,
        pos: Pos,
        prefix: &str,
        depth: usize,
    ) -> Option<String> {
        let here = format!("{prefix}.selectionSet.{}", field.node.response_key().node);
        if field.pos == pos || field.node.name.pos == pos {
            return Some(here);
        }
        for (name, value) in &field.node.arguments {
            if name.pos == pos || value.pos == pos {
                return Some(format!("{here}.args.{}", name.node));
            }
        }
        search(&field.node.selection_set, doc, pos, &here, depth + 1)
    }
    document
        .operations
        .iter()
        .find_map(|(_, op)| search(&op.node.selection_set, document, pos, "$", 0))
}
