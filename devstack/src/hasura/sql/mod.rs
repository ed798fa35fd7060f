//! Translation of the generated root fields' arguments into SQL.
//!
//! Every value travels as a text parameter and is cast to the column's type inside the
//! statement (`CAST($1::text AS uuid)`), as Hasura does: a malformed uuid, inet or timestamptz
//! string is therefore rejected by PostgreSQL itself (SQLSTATE 22P02, `data-exception`), with
//! PostgreSQL's own message. Rows come back as `row_to_json` text, so timestamps and addresses
//! are rendered by PostgreSQL exactly as Hasura's responses show them.
//!
//! Here the statements (select, insert, update, delete) and the parameter builder; the `where`
//! and `order_by` clauses they share are in `filter.rs`.

use async_graphql::indexmap::IndexMap;
use async_graphql::{Name, Value};
use tokio_postgres::types::{ToSql, Type};

use super::catalog::{Model, Table, quote_ident};
use super::error::GqlError;
use super::function::Function;
use super::permissions::SessionVariables;

mod filter;

/// A statement with its parameters, all sent as `text` or `text[]`.
#[derive(Debug)]
pub(crate) struct Statement {
    pub sql: String,
    params: Vec<Param>,
    /// Set when each row comes with a second column, whether it passes the role's insert or
    /// update `check`; a failing row aborts the request with `permission-error` at this path.
    pub check_path: Option<String>,
}

#[derive(Debug)]
enum Param {
    Text(Option<String>),
    TextArray(Vec<String>),
}

impl Statement {
    /// The parameters with their types, for `query_typed` (no separate prepare round trip).
    pub fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.params
            .iter()
            .map(|p| match p {
                Param::Text(text) => (text as &(dyn ToSql + Sync), Type::TEXT),
                Param::TextArray(list) => (list as &(dyn ToSql + Sync), Type::TEXT_ARRAY),
            })
            .collect()
    }
}

/// Which rows a statement applies to.
#[derive(Debug)]
pub(crate) enum Filter<'a> {
    /// A `<t>_bool_exp` value (absent: every row).
    BoolExp(Option<&'a Value>),
    /// `column = value` for each primary-key column.
    PrimaryKey(Vec<(&'a str, &'a Value)>),
}

/// `where`, `order_by`, `limit`, `offset` of a select.
#[derive(Debug, Default)]
pub(crate) struct SelectArgs<'a> {
    pub filter: Option<Filter<'a>>,
    pub order_by: Option<&'a Value>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// Rows of a relationship: `remote.column = <value from the parent row>` for each pair.
pub(crate) type JoinValues<'a> = Vec<(&'a str, Option<String>)>;

/// The text PostgreSQL receives for a GraphQL value (`None` for null). Lists and objects (json
/// columns) travel as JSON text.
pub(crate) fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        Value::Enum(name) => Some(name.to_string()),
        other => serde_json::to_string(other).ok(),
    }
}

/// A single value where GraphQL coerces it into a one-element list.
fn as_list(value: &Value) -> Vec<&Value> {
    match value {
        Value::List(items) => items.iter().collect(),
        other => vec![other],
    }
}

fn enum_name(value: &Value) -> Option<&str> {
    match value {
        Value::Enum(name) => Some(name.as_str()),
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

fn null_error(path: &str, type_name: &str) -> GqlError {
    GqlError::validation(
        path,
        format!("unexpected null value for type \"{type_name}\""),
    )
}

struct Builder<'m> {
    model: &'m Model,
    vars: &'m SessionVariables,
    params: Vec<Param>,
    aliases: usize,
}

impl<'m> Builder<'m> {
    fn new(model: &'m Model, vars: &'m SessionVariables) -> Self {
        Self {
            model,
            vars,
            params: Vec::new(),
            aliases: 0,
        }
    }

    /// A permission's row condition on `alias`, with the request's session variables in it.
    fn permission(
        &mut self,
        table: usize,
        alias: &str,
        condition: &serde_json::Value,
    ) -> Result<String, GqlError> {
        let resolved = self.vars.resolve(condition)?;
        self.bool_exp(table, alias, &resolved, "$")
    }

    /// The role's select filter on `table` (none for admin).
    fn select_permission(&mut self, table: usize, alias: &str) -> Result<Option<String>, GqlError> {
        match &self.model.table(table).role {
            None => Ok(None),
            Some(role) => {
                let filter = role.select_filter.clone();
                self.permission(table, alias, &filter).map(Some)
            }
        }
    }

    fn alias(&mut self) -> String {
        let alias = format!("_{}", self.aliases);
        self.aliases += 1;
        alias
    }

    /// `CAST($n::text AS <type>)`.
    fn cast(&mut self, text: Option<String>, sql_type: &str) -> String {
        self.params.push(Param::Text(text));
        format!("CAST(${}::text AS {sql_type})", self.params.len())
    }

    fn text(&mut self, text: String) -> String {
        self.params.push(Param::Text(Some(text)));
        format!("${}::text", self.params.len())
    }

    fn cast_list(&mut self, items: Vec<String>, sql_type: &str) -> String {
        self.params.push(Param::TextArray(items));
        format!("CAST(${}::text[] AS {sql_type}[])", self.params.len())
    }

    fn finish(self, sql: String) -> Statement {
        Statement {
            sql,
            params: self.params,
            check_path: None,
        }
    }

    /// A data-modifying statement whose rows come back as JSON text, each with whether it
    /// passes `check` (a role's insert or update check) when there is one.
    fn finish_returning(
        mut self,
        table: usize,
        statement: String,
        check: Option<&serde_json::Value>,
        check_path: &str,
    ) -> Result<Statement, GqlError> {
        let Some(check) = check else {
            return Ok(self.finish(returning_json(statement)));
        };
        let condition = self.permission(table, "_c", check)?;
        let sql = format!(
            "WITH _m AS ({statement} RETURNING *) SELECT row_to_json(_c)::text, {condition} FROM _m AS _c"
        );
        let mut statement = self.finish(sql);
        statement.check_path = Some(check_path.to_owned());
        Ok(statement)
    }
}

fn and(terms: Vec<String>) -> String {
    match terms.len() {
        0 => "TRUE".to_owned(),
        1 => terms.into_iter().next().unwrap_or_default(),
        _ => format!("({})", terms.join(" AND ")),
    }
}

/// `SELECT row_to_json(...)` of the matching rows. `join` restricts to a parent row's related
/// rows.
pub(crate) fn select(
    model: &Model,
    vars: &SessionVariables,
    table: usize,
    args: &SelectArgs<'_>,
    join: &JoinValues<'_>,
    path: &str,
) -> Result<Statement, GqlError> {
    let b = Builder::new(model, vars);
    let from = model.table(table).sql_name();
    select_from(b, table, from, args, join, path)
}

/// The rows a tracked function returns (`SELECT ... FROM f(args) AS _0 WHERE ...`), filtered,
/// ordered and limited like a select of the table whose rows they are.
pub(crate) fn select_function(
    model: &Model,
    vars: &SessionVariables,
    function: &Function,
    call_args: Option<&Value>,
    args: &SelectArgs<'_>,
    path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model, vars);
    let from = function.call_sql(call_args, |text, sql_type| b.cast(text, sql_type));
    select_from(b, function.returns, from, args, &Vec::new(), path)
}

fn select_from(
    mut b: Builder<'_>,
    table: usize,
    from: String,
    args: &SelectArgs<'_>,
    join: &JoinValues<'_>,
    path: &str,
) -> Result<Statement, GqlError> {
    let model = b.model;
    let t = model.table(table);
    let alias = b.alias();
    let mut conditions = Vec::new();
    for (column, value) in join {
        let sql_type = column_type(t, column)?;
        let param = b.cast(value.clone(), sql_type);
        conditions.push(format!("{alias}.{} = {param}", quote_ident(column)));
    }
    if let Some(filter) = &args.filter {
        conditions.push(b.filter(table, &alias, filter, &format!("{path}.args.where"))?);
    }
    // Rows outside the role's select filter are silently left out.
    conditions.extend(b.select_permission(table, &alias)?);
    let mut sql = format!(
        "SELECT row_to_json({alias})::text FROM {from} AS {alias} WHERE {}",
        and(conditions)
    );
    if let Some(order_by) = args.order_by {
        let items = b.order_by(table, &alias, order_by, &format!("{path}.args.order_by"))?;
        if !items.is_empty() {
            sql.push_str(" ORDER BY ");
            sql.push_str(&items.join(", "));
        }
    }
    if let Some(limit) = args.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    if let Some(offset) = args.offset {
        sql.push_str(&format!(" OFFSET {offset}"));
    }
    Ok(b.finish(sql))
}

fn column_type<'t>(table: &'t Table, column: &str) -> Result<&'t str, GqlError> {
    table
        .column(column)
        .map(|c| c.sql_type.as_str())
        .ok_or_else(|| GqlError::unexpected(format!("no column {column} in {}", table.gql_name)))
}

/// Wraps a data-modifying statement so that its rows come back as JSON text.
fn returning_json(statement: String) -> String {
    format!("WITH _m AS ({statement} RETURNING *) SELECT row_to_json(_m)::text FROM _m")
}

/// `INSERT ... VALUES ... [ON CONFLICT ...] RETURNING`: columns missing from an object take
/// their default; an explicit null inserts NULL.
pub(crate) fn insert(
    model: &Model,
    vars: &SessionVariables,
    table: usize,
    objects: &[&IndexMap<Name, Value>],
    on_conflict: Option<&Value>,
    path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model, vars);
    let t = model.table(table);
    let alias = b.alias();
    let mut columns: Vec<&str> = Vec::new();
    for object in objects {
        for key in object.keys() {
            if !columns.contains(&key.as_str()) {
                columns.push(key.as_str());
            }
        }
    }
    // `DEFAULT VALUES` takes no row list; naming any column with DEFAULT does the same for
    // several rows.
    let columns: Vec<&str> = if columns.is_empty() {
        t.columns
            .first()
            .map(|c| c.name.as_str())
            .into_iter()
            .collect()
    } else {
        columns
    };
    let mut rows = Vec::with_capacity(objects.len());
    for (i, object) in objects.iter().enumerate() {
        let mut values = Vec::with_capacity(columns.len());
        for column in &columns {
            match object.get(*column) {
                Some(value) => {
                    let sql_type =
                        t.column(column)
                            .map(|c| c.sql_type.as_str())
                            .ok_or_else(|| {
                                GqlError::validation(
                                    format!("{path}[{i}].{column}"),
                                    format!(
                                        "field '{column}' not found in type: '{}_insert_input'",
                                        t.gql_name
                                    ),
                                )
                            })?;
                    values.push(b.cast(value_text(value), sql_type));
                }
                None => values.push("DEFAULT".to_owned()),
            }
        }
        rows.push(format!("({})", values.join(", ")));
    }
    let mut sql = format!(
        "INSERT INTO {} AS {alias} ({}) VALUES {}",
        t.sql_name(),
        columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        rows.join(", ")
    );
    if let Some(Value::Object(conflict)) = on_conflict {
        let conflict_path = format!("{}.on_conflict", path_parent(path));
        let constraint = conflict
            .get("constraint")
            .and_then(enum_name)
            .ok_or_else(|| {
                GqlError::validation(&conflict_path, "on_conflict needs a constraint")
            })?;
        if !t.unique_constraints.iter().any(|c| c == constraint) {
            return Err(GqlError::validation(
                format!("{conflict_path}.constraint"),
                format!(
                    "unexpected value \"{constraint}\" for enum: '{}_constraint'",
                    t.gql_name
                ),
            ));
        }
        let update_columns: Vec<&str> = conflict
            .get("update_columns")
            .map(as_list)
            .unwrap_or_default()
            .into_iter()
            .filter_map(enum_name)
            .collect();
        sql.push_str(&format!(
            " ON CONFLICT ON CONSTRAINT {}",
            quote_ident(constraint)
        ));
        if update_columns.is_empty() {
            sql.push_str(" DO NOTHING");
        } else {
            let mut sets = Vec::with_capacity(update_columns.len());
            for column in update_columns {
                if t.column(column).is_none() {
                    return Err(GqlError::validation(
                        format!("{conflict_path}.update_columns"),
                        format!(
                            "unexpected value \"{column}\" for enum: '{}_update_column'",
                            t.gql_name
                        ),
                    ));
                }
                sets.push(format!("{0} = EXCLUDED.{0}", quote_ident(column)));
            }
            sql.push_str(" DO UPDATE SET ");
            sql.push_str(&sets.join(", "));
            let mut conditions = Vec::new();
            if let Some(condition) = conflict.get("where").filter(|w| !matches!(w, Value::Null)) {
                conditions.push(b.bool_exp(
                    table,
                    &alias,
                    condition,
                    &format!("{conflict_path}.where"),
                )?);
            }
            // The upsert updates only rows the role's update filter allows.
            if let Some(update) = t.role.as_ref().and_then(|r| r.update.as_ref()) {
                let filter = update.filter.clone();
                conditions.push(b.permission(table, &alias, &filter)?);
            }
            if !conditions.is_empty() {
                sql.push_str(" WHERE ");
                sql.push_str(&and(conditions));
            }
        }
    }
    let check = t
        .role
        .as_ref()
        .and_then(|r| r.insert.as_ref())
        .map(|p| p.check.clone());
    b.finish_returning(table, sql, check.as_ref(), path)
}

/// `$.selectionSet.f.args.objects` → `$.selectionSet.f.args`.
fn path_parent(path: &str) -> &str {
    path.rsplit_once('.')
        .map(|(parent, _)| parent)
        .unwrap_or(path)
}

/// `UPDATE ... SET` from `_set` and `_inc` (combinable, but not on the same column).
pub(crate) fn update(
    model: &Model,
    vars: &SessionVariables,
    table: usize,
    set: Option<&Value>,
    inc: Option<&Value>,
    filter: &Filter<'_>,
    args_path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model, vars);
    let t = model.table(table);
    let alias = b.alias();
    let set_fields = object_fields(set);
    let inc_fields = object_fields(inc);
    if set_fields.is_empty() && inc_fields.is_empty() {
        return Err(GqlError::validation(
            args_path,
            "at least any one of _set, _inc is expected",
        ));
    }
    let mut assignments = Vec::new();
    for (name, value) in &set_fields {
        if inc_fields.iter().any(|(n, _)| n == name) {
            return Err(GqlError::validation(
                args_path,
                format!("column found in multiple operators; \"{name}\" in _set, _inc operators"),
            ));
        }
        let sql_type = column_type(t, name)?;
        let param = b.cast(value_text(value), sql_type);
        assignments.push(format!("{} = {param}", quote_ident(name)));
    }
    for (name, value) in &inc_fields {
        if matches!(value, Value::Null) {
            return Err(null_error(&format!("{args_path}._inc.{name}"), "Int"));
        }
        let sql_type = column_type(t, name)?;
        let param = b.cast(value_text(value), sql_type);
        assignments.push(format!("{0} = {alias}.{0} + {param}", quote_ident(name)));
    }
    let mut conditions = vec![b.filter(table, &alias, filter, &filter_path(filter, args_path))?];
    let permission = t.role.as_ref().and_then(|r| r.update.as_ref());
    // Rows outside the role's update filter are not touched (0 affected rows).
    if let Some(update) = permission {
        let filter = update.filter.clone();
        conditions.push(b.permission(table, &alias, &filter)?);
    }
    let sql = format!(
        "UPDATE {} AS {alias} SET {} WHERE {}",
        t.sql_name(),
        assignments.join(", "),
        and(conditions)
    );
    let check = permission.and_then(|p| p.check.clone());
    b.finish_returning(table, sql, check.as_ref(), args_path)
}

fn object_fields(value: Option<&Value>) -> Vec<(&Name, &Value)> {
    match value {
        Some(Value::Object(fields)) => fields.iter().collect(),
        _ => Vec::new(),
    }
}

fn filter_path(filter: &Filter<'_>, args_path: &str) -> String {
    match filter {
        Filter::BoolExp(_) => format!("{args_path}.where"),
        Filter::PrimaryKey(_) => format!("{args_path}.pk_columns"),
    }
}

/// `DELETE ... WHERE ... RETURNING`.
pub(crate) fn delete(
    model: &Model,
    vars: &SessionVariables,
    table: usize,
    filter: &Filter<'_>,
    args_path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model, vars);
    let t = model.table(table);
    let alias = b.alias();
    let mut conditions = vec![b.filter(table, &alias, filter, &filter_path(filter, args_path))?];
    if let Some(delete) = t.role.as_ref().and_then(|r| r.delete.as_ref()) {
        let filter = delete.clone();
        conditions.push(b.permission(table, &alias, &filter)?);
    }
    let sql = format!(
        "DELETE FROM {} AS {alias} WHERE {}",
        t.sql_name(),
        and(conditions)
    );
    Ok(b.finish(returning_json(sql)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hasura::catalog::{Column, Relationship, RelationshipKind, Table};

    pub(super) fn column(name: &str, sql_type: &str, scalar: &str) -> Column {
        Column {
            name: name.into(),
            sql_type: sql_type.into(),
            scalar: scalar.into(),
            nullable: false,
            numeric: scalar == "Int",
        }
    }

    pub(super) fn model() -> Model {
        Model {
            tables: vec![
                Table {
                    schema: "whist".into(),
                    name: "instances".into(),
                    gql_name: "whist_instances".into(),
                    columns: vec![
                        column("id", "character varying", "String"),
                        column("remaining_capacity", "integer", "Int"),
                    ],
                    primary_key: vec!["id".into()],
                    unique_constraints: vec!["instances_pkey".into()],
                    relationships: vec![Relationship {
                        name: "mandelboxes".into(),
                        kind: RelationshipKind::Array,
                        remote: 1,
                        mapping: vec![("id".into(), "instance_id".into())],
                        nullable: false,
                    }],
                    permission_lists: Default::default(),
                    role: None,
                },
                Table {
                    schema: "whist".into(),
                    name: "mandelboxes".into(),
                    gql_name: "whist_mandelboxes".into(),
                    columns: vec![
                        column("id", "uuid", "uuid"),
                        column("instance_id", "character varying", "String"),
                        column("status", "character varying", "String"),
                    ],
                    primary_key: vec!["id".into()],
                    unique_constraints: vec!["mandelboxes_pkey".into()],
                    relationships: vec![],
                    permission_lists: Default::default(),
                    role: None,
                },
            ],
            functions: Vec::new(),
        }
    }

    pub(super) fn value(json: serde_json::Value) -> Value {
        Value::from_json(json).unwrap()
    }

    #[test]
    fn update_rejects_a_column_in_both_set_and_inc() {
        let m = model();
        let set = value(serde_json::json!({"remaining_capacity": 1}));
        let inc = value(serde_json::json!({"remaining_capacity": 1}));
        let vars = SessionVariables::default();
        let e = update(
            &m,
            &vars,
            0,
            Some(&set),
            Some(&inc),
            &Filter::BoolExp(None),
            "$",
        )
        .unwrap_err();
        assert!(e.message.contains("multiple operators"), "{}", e.message);
    }
}
