//! Running one GraphQL operation: checking the request the way Hasura does before execution,
//! then executing it with async-graphql's executor over one database session.
//!
//! Every operation that touches the database gets exactly one pooled connection and one
//! transaction: mutations run their root fields in document order inside a READ COMMITTED
//! transaction (a later field sees an earlier one; any error rolls everything back), and queries
//! and live-query runs read one REPEATABLE READ snapshot, so a row and its relationships are
//! consistent with each other as in Hasura's single-statement queries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_graphql::dynamic::Schema;
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationDefinition, OperationType, Selection,
    SelectionSet,
};
use async_graphql::{Name, Positioned, Request, Value, Variables};
use deadpool_postgres::{Object, Pool};

use super::error::{GqlError, code, from_postgres, from_server_error};
use super::permissions::SessionVariables;
use super::sql::Statement;

/// A checked request, ready to execute (repeatedly, for a live query).
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// A subscription's document is stored as a query: each live-query run executes it against
    /// `query_root`, which `subscription_root` mirrors.
    document: ExecutableDocument,
    operation_name: Option<String>,
    variables: Variables,
    pub kind: OperationType,
    /// Response keys of the root fields in document order. async-graphql resolves query root
    /// fields concurrently and collects them as they finish; Hasura answers in selection order.
    root_keys: Vec<Name>,
    /// The one root field a subscription selects (not aliased), for deciding which table
    /// changes can alter its result.
    pub subscription_field: Option<String>,
}

/// A request as it arrives over HTTP or in a WebSocket `start`/`subscribe` payload.
#[derive(Debug, Default)]
pub(crate) struct RawRequest {
    pub query: Option<serde_json::Value>,
    pub variables: Option<serde_json::Value>,
    pub operation_name: Option<serde_json::Value>,
}

impl RawRequest {
    /// Reads `query`, `variables` and `operationName` from a JSON object.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, GqlError> {
        let object = value.as_object().ok_or_else(|| {
            GqlError::new(
                code::PARSE_FAILED,
                "$",
                format!(
                    "parsing GQLReq failed, expected Object, but encountered {}",
                    json_kind(value)
                ),
            )
        })?;
        Ok(Self {
            query: object.get("query").cloned(),
            variables: object.get("variables").cloned(),
            operation_name: object.get("operationName").cloned(),
        })
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "Null",
        serde_json::Value::Bool(_) => "Boolean",
        serde_json::Value::Number(_) => "Number",
        serde_json::Value::String(_) => "String",
        serde_json::Value::Array(_) => "Array",
        serde_json::Value::Object(_) => "Object",
    }
}

/// Hasura's checks before execution: the body's shape, the document's syntax, the operation
/// choice and the presence of non-null variables.
pub(crate) fn prepare(raw: RawRequest) -> Result<Prepared, GqlError> {
    let query = match raw.query {
        None => {
            return Err(GqlError::new(
                code::PARSE_FAILED,
                "$",
                "the key 'query' was not present",
            ));
        }
        Some(serde_json::Value::String(query)) => query,
        Some(other) => {
            return Err(GqlError::new(
                code::PARSE_FAILED,
                "$.query",
                format!(
                    "parsing Text failed, expected String, but encountered {}",
                    json_kind(&other)
                ),
            ));
        }
    };
    let variables = match raw.variables {
        None | Some(serde_json::Value::Null) => Variables::default(),
        Some(serde_json::Value::Object(map)) => {
            Variables::from_json(serde_json::Value::Object(map))
        }
        Some(other) => {
            return Err(GqlError::new(
                code::PARSE_FAILED,
                "$.variables",
                format!(
                    "parsing HashMap failed, expected Object, but encountered {}",
                    json_kind(&other)
                ),
            ));
        }
    };
    let operation_name = match raw.operation_name {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(name)) => Some(name),
        Some(other) => {
            return Err(GqlError::new(
                code::PARSE_FAILED,
                "$.operationName",
                format!(
                    "parsing Text failed, expected String, but encountered {}",
                    json_kind(&other)
                ),
            ));
        }
    };

    let mut document = async_graphql::parser::parse_query(&query)
        .map_err(|_| GqlError::validation("$.query", "not a valid graphql query"))?;

    let key = select_operation(&document, operation_name.as_deref())?;
    keep_only_selected(&mut document, key.as_ref());
    let Some(operation) = operation(&document, key.as_ref()) else {
        return Err(GqlError::unexpected("the selected operation disappeared"));
    };
    let kind = operation.node.ty;

    for definition in &operation.node.variable_definitions {
        let name = &definition.node.name.node;
        let var_type = &definition.node.var_type.node;
        if var_type.nullable || definition.node.default_value.is_some() {
            continue;
        }
        match variables.get(name) {
            None => {
                return Err(GqlError::validation(
                    "$",
                    format!("expecting a value for non-nullable variable: \"{name}\""),
                ));
            }
            Some(Value::Null) => {
                return Err(GqlError::validation(
                    format!("$.variableValues.{name}"),
                    format!("null value found for non-nullable type: \"{var_type}\""),
                ));
            }
            Some(_) => {}
        }
    }

    let mut fields = Vec::new();
    root_fields(&document, &operation.node.selection_set, &mut fields, 0);
    let root_keys = fields.iter().map(|(_, key)| key.clone()).collect();
    let mut subscription_field = None;
    if kind == OperationType::Subscription {
        if fields.len() != 1 {
            return Err(GqlError::validation(
                "$",
                "subscriptions must select one top level field",
            ));
        }
        subscription_field = fields.pop().map(|(name, _)| name.to_string());
        let operation = match (&mut document.operations, &key) {
            (DocumentOperations::Single(op), None) => Some(op),
            (DocumentOperations::Multiple(ops), Some(key)) => ops.get_mut(key),
            _ => None,
        };
        if let Some(operation) = operation {
            operation.node.ty = OperationType::Query;
        }
    }

    Ok(Prepared {
        document,
        operation_name,
        variables,
        kind,
        root_keys,
        subscription_field,
    })
}

/// The operation to run, as Hasura's `getSingleOperation` picks it: its name in a document of
/// named operations, `None` for a single anonymous one.
fn select_operation(
    document: &ExecutableDocument,
    name: Option<&str>,
) -> Result<Option<Name>, GqlError> {
    let not_found = |name: &str| {
        GqlError::validation(
            "$",
            format!("no such operation found in the document: \"{name}\""),
        )
    };
    match (&document.operations, name) {
        (DocumentOperations::Single(_), None) => Ok(None),
        (DocumentOperations::Single(_), Some(name)) => Err(not_found(name)),
        (DocumentOperations::Multiple(ops), Some(name)) => ops
            .keys()
            .find(|key| key.as_str() == name)
            .cloned()
            .map(Some)
            .ok_or_else(|| not_found(name)),
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => {
            Ok(ops.keys().next().cloned())
        }
        (DocumentOperations::Multiple(_), None) => Err(GqlError::validation(
            "$",
            "exactly one operation has to be present in the document when operationName is not specified",
        )),
    }
}

/// Like Hasura, which parses and validates only the operation it runs (and the fragments it
/// uses): the other operations of the document, and unused fragments, are dropped. Clients
/// such as graphql_client send a whole file of operations, some of which a role's schema may
/// not be able to validate.
fn keep_only_selected(document: &mut ExecutableDocument, key: Option<&Name>) {
    if let (DocumentOperations::Multiple(ops), Some(key)) = (&mut document.operations, key) {
        ops.retain(|name, _| name == key);
    }
    let Some(operation) = operation(document, key) else {
        return;
    };
    let mut used = std::collections::BTreeSet::new();
    used_fragments(document, &operation.node.selection_set, &mut used);
    document.fragments.retain(|name, _| used.contains(name));
}

fn used_fragments(
    document: &ExecutableDocument,
    set: &Positioned<SelectionSet>,
    used: &mut std::collections::BTreeSet<Name>,
) {
    for selection in &set.node.items {
        match &selection.node {
            Selection::Field(field) => used_fragments(document, &field.node.selection_set, used),
            Selection::FragmentSpread(spread) => {
                let name = &spread.node.fragment_name.node;
                // Inserting first stops a fragment cycle (a validation error of its own).
                if used.insert(name.clone())
                    && let Some(fragment) = document.fragments.get(name)
                {
                    used_fragments(document, &fragment.node.selection_set, used);
                }
            }
            Selection::InlineFragment(fragment) => {
                used_fragments(document, &fragment.node.selection_set, used);
            }
        }
    }
}

fn operation<'d>(
    document: &'d ExecutableDocument,
    key: Option<&Name>,
) -> Option<&'d Positioned<OperationDefinition>> {
    match (&document.operations, key) {
        (DocumentOperations::Single(op), None) => Some(op),
        (DocumentOperations::Multiple(ops), Some(key)) => ops.get(key),
        _ => None,
    }
}

/// The root fields an operation selects, through fragments: `(name, response key)`.
fn root_fields(
    document: &ExecutableDocument,
    set: &Positioned<SelectionSet>,
    out: &mut Vec<(Name, Name)>,
    depth: usize,
) {
    // A fragment cycle is a validation error reported by async-graphql; do not loop on it.
    if depth > 32 {
        return;
    }
    for selection in &set.node.items {
        match &selection.node {
            Selection::Field(field) => out.push((
                field.node.name.node.clone(),
                field.node.response_key().node.clone(),
            )),
            Selection::FragmentSpread(spread) => {
                if let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node) {
                    root_fields(document, &fragment.node.selection_set, out, depth + 1);
                }
            }
            Selection::InlineFragment(fragment) => {
                root_fields(document, &fragment.node.selection_set, out, depth + 1);
            }
        }
    }
}

/// The result of running an operation: the response body's JSON, or the one error Hasura
/// would report.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// `{"data": ...}`
    Data(String),
    Error(GqlError),
}

impl Outcome {
    /// The HTTP body: `{"data": ...}` or `{"errors": [...]}`.
    pub fn into_http_body(self) -> String {
        match self {
            Outcome::Data(body) => body,
            Outcome::Error(error) => error.to_response_json(),
        }
    }
}

/// Executes `prepared` with a fresh database session, as the role and with the session
/// variables of `vars` (`schema` is that role's).
pub(crate) async fn execute(
    schema: &Schema,
    pool: &Pool,
    prepared: &Prepared,
    vars: &Arc<SessionVariables>,
) -> Outcome {
    let access = if prepared.kind == OperationType::Mutation {
        Access::ReadWrite
    } else {
        Access::ReadOnlySnapshot
    };
    let session = Arc::new(Session::new(pool.clone(), access, vars.clone()));
    let mut request = Request::new(String::new())
        .variables(prepared.variables.clone())
        .data(session.clone());
    if let Some(name) = &prepared.operation_name {
        request = request.operation_name(name.clone());
    }
    request.set_parsed_query(prepared.document.clone());
    let response = schema.execute(request).await;

    let root_type = match prepared.kind {
        OperationType::Query => "query_root",
        OperationType::Mutation => "mutation_root",
        OperationType::Subscription => "subscription_root",
    };
    let error = response
        .errors
        .iter()
        .map(|e| from_server_error(e, Some(&prepared.document), root_type))
        .find(|e| e.code != code::SKIPPED);
    if let Some(mut error) = error {
        session.finish(false).await;
        if prepared.kind == OperationType::Subscription {
            // The document ran against query_root, but the client asked subscription_root.
            error.message = error.message.replace("'query_root'", "'subscription_root'");
        }
        if vars.role != super::ADMIN_ROLE {
            // Hasura shows the failing statement only to admin.
            error.internal = None;
        }
        return Outcome::Error(error);
    }
    if let Err(error) = session.finish_commit().await {
        return Outcome::Error(error);
    }
    let data = in_selection_order(response.data, &prepared.root_keys);
    match serde_json::to_string(&data) {
        Ok(data) => Outcome::Data(format!(r#"{{"data":{data}}}"#)),
        Err(e) => Outcome::Error(GqlError::unexpected(format!(
            "could not encode the response: {e}"
        ))),
    }
}

/// Puts the root fields back in selection order (keys not listed keep their place after).
fn in_selection_order(data: Value, keys: &[Name]) -> Value {
    let mut fields = match data {
        Value::Object(fields) => fields,
        // async-graphql answers null when every root field was skipped (`@skip`); Hasura
        // answers an empty object.
        Value::Null => Default::default(),
        other => return other,
    };
    let mut ordered = async_graphql::indexmap::IndexMap::with_capacity(fields.len());
    for key in keys {
        if let Some(value) = fields.shift_remove(key) {
            ordered.insert(key.clone(), value);
        }
    }
    ordered.extend(fields);
    Value::Object(ordered)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnlySnapshot,
}

/// The database side of one operation, shared by its resolvers through the request data.
/// The connection is taken from the pool on the first statement, so introspection and
/// `__typename` need none.
pub(crate) struct Session {
    pool: Pool,
    access: Access,
    /// The request's role and session variables, for the permissions' conditions.
    pub vars: Arc<SessionVariables>,
    connection: tokio::sync::Mutex<Option<Object>>,
    /// Set by the first failing field: the transaction is aborted, so later fields are not run
    /// (a mutation's later fields must not run at all) and report a placeholder error that the
    /// response leaves out.
    failed: AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("access", &self.access)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Session {
    fn new(pool: Pool, access: Access, vars: Arc<SessionVariables>) -> Self {
        Self {
            pool,
            access,
            vars,
            connection: tokio::sync::Mutex::new(None),
            failed: AtomicBool::new(false),
        }
    }

    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Fails with the placeholder error when an earlier field already failed.
    pub fn check_not_failed(&self) -> Result<(), GqlError> {
        if self.failed.load(Ordering::SeqCst) {
            Err(GqlError::skipped())
        } else {
            Ok(())
        }
    }

    /// Runs a statement whose single column is a row as JSON text, and parses the rows.
    /// `constraint_path` is where a constraint violation points.
    pub async fn rows(
        &self,
        statement: &Statement,
        constraint_path: &str,
    ) -> Result<Vec<Row>, GqlError> {
        self.check_not_failed()?;
        let result = self.run(statement, constraint_path).await;
        if result.is_err() {
            self.mark_failed();
        }
        result
    }

    async fn run(
        &self,
        statement: &Statement,
        constraint_path: &str,
    ) -> Result<Vec<Row>, GqlError> {
        let mut connection = self.connection.lock().await;
        if connection.is_none() {
            let client = self.pool.get().await.map_err(|e| {
                GqlError::unexpected(format!("could not connect to the database: {e}"))
            })?;
            let begin = match self.access {
                Access::ReadWrite => "BEGIN ISOLATION LEVEL READ COMMITTED",
                Access::ReadOnlySnapshot => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            };
            // Held by the session before BEGIN is sent: if this future is cancelled while BEGIN
            // is in flight, `Drop` closes the connection instead of the pool getting it back
            // inside a transaction.
            let client = connection.insert(client);
            client
                .batch_execute(begin)
                .await
                .map_err(|e| from_postgres(&e, begin, "$"))?;
        }
        let Some(client) = connection.as_ref() else {
            return Err(GqlError::unexpected("no database session"));
        };
        let rows = client
            .query_typed(&statement.sql, &statement.params())
            .await
            .map_err(|e| from_postgres(&e, &statement.sql, constraint_path))?;
        if let Some(check_path) = &statement.check_path {
            for row in &rows {
                let passed: Option<bool> = row
                    .try_get(1)
                    .map_err(|e| from_postgres(&e, &statement.sql, "$"))?;
                if passed != Some(true) {
                    return Err(GqlError::new(
                        code::PERMISSION_ERROR,
                        check_path.clone(),
                        "check constraint of an insert/update permission has failed",
                    ));
                }
            }
        }
        rows.iter()
            .map(|row| {
                let text: Option<String> = row
                    .try_get(0)
                    .map_err(|e| from_postgres(&e, &statement.sql, "$"))?;
                Row::parse(text.as_deref().unwrap_or("null"))
            })
            .collect()
    }

    /// Ends the transaction (commit or rollback); a connection whose transaction cannot be
    /// ended cleanly is closed instead of going back to the pool.
    async fn finish(&self, commit: bool) -> Option<tokio_postgres::Error> {
        let client = self.connection.lock().await.take()?;
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        match client.batch_execute(sql).await {
            Ok(()) => None,
            Err(error) => {
                drop(Object::take(client));
                Some(error)
            }
        }
    }

    async fn finish_commit(&self) -> Result<(), GqlError> {
        match self.finish(true).await {
            None => Ok(()),
            Some(error) => Err(from_postgres(&error, "COMMIT", "$")),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Only reached with a connection when execution was cancelled mid-transaction: close
        // it rather than return a connection with an open transaction to the pool.
        if let Some(client) = self.connection.get_mut().take() {
            drop(Object::take(client));
        }
    }
}

/// A row as PostgreSQL rendered it with `row_to_json`: column name → value.
#[derive(Debug, Clone)]
pub(crate) struct Row(pub async_graphql::indexmap::IndexMap<async_graphql::Name, Value>);

impl Row {
    fn parse(text: &str) -> Result<Self, GqlError> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(columns)) => Ok(Row(columns)),
            Ok(_) => Err(GqlError::unexpected(
                "a row did not come back as a JSON object",
            )),
            Err(e) => Err(GqlError::unexpected(format!("could not parse a row: {e}"))),
        }
    }

    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.get(column)
    }
}
