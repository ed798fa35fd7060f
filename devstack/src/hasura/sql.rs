//! Translation of the generated root fields' arguments into SQL.
//!
//! Every value travels as a text parameter and is cast to the column's type inside the
//! statement (`CAST($1::text AS uuid)`), as Hasura does: a malformed uuid, inet or timestamptz
//! string is therefore rejected by PostgreSQL itself (SQLSTATE 22P02, `data-exception`), with
//! PostgreSQL's own message. Rows come back as `row_to_json` text, so timestamps and addresses
//! are rendered by PostgreSQL exactly as Hasura's responses show them.

use async_graphql::indexmap::IndexMap;
use async_graphql::{Name, Value};
use tokio_postgres::types::{ToSql, Type};

use super::catalog::{Column, Model, RelationshipKind, Table, quote_ident};
use super::error::GqlError;

/// A statement with its parameters, all sent as `text` or `text[]`.
#[derive(Debug)]
pub(crate) struct Statement {
    pub sql: String,
    params: Vec<Param>,
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
    params: Vec<Param>,
    aliases: usize,
}

impl<'m> Builder<'m> {
    fn new(model: &'m Model) -> Self {
        Self {
            model,
            params: Vec::new(),
            aliases: 0,
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
        }
    }

    fn filter(
        &mut self,
        table: usize,
        alias: &str,
        filter: &Filter<'_>,
        path: &str,
    ) -> Result<String, GqlError> {
        match filter {
            Filter::BoolExp(None) => Ok("TRUE".to_owned()),
            Filter::BoolExp(Some(exp)) => self.bool_exp(table, alias, exp, path),
            Filter::PrimaryKey(values) => {
                let t = self.model.table(table);
                let mut terms = Vec::with_capacity(values.len());
                for (name, value) in values {
                    let column = t.column(name).ok_or_else(|| {
                        GqlError::validation(path, format!("unknown column \"{name}\""))
                    })?;
                    if matches!(value, Value::Null) {
                        return Err(null_error(&format!("{path}.{name}"), &column.scalar));
                    }
                    let param = self.cast(value_text(value), &column.sql_type);
                    terms.push(format!("{alias}.{} = {param}", quote_ident(name)));
                }
                Ok(and(terms))
            }
        }
    }

    /// A `<t>_bool_exp`: the object's fields are ANDed; `{}` matches every row.
    fn bool_exp(
        &mut self,
        table: usize,
        alias: &str,
        exp: &Value,
        path: &str,
    ) -> Result<String, GqlError> {
        let t = self.model.table(table);
        let fields = match exp {
            Value::Object(fields) => fields,
            Value::Null => return Err(null_error(path, &format!("{}_bool_exp", t.gql_name))),
            _ => {
                return Err(GqlError::validation(
                    path,
                    format!("expected an object for type \"{}_bool_exp\"", t.gql_name),
                ));
            }
        };
        let mut terms = Vec::with_capacity(fields.len());
        for (key, value) in fields {
            let here = format!("{path}.{key}");
            match key.as_str() {
                "_and" | "_or" => {
                    if matches!(value, Value::Null) {
                        return Err(null_error(&here, &format!("[{}_bool_exp!]", t.gql_name)));
                    }
                    let mut parts = Vec::new();
                    for (i, item) in as_list(value).into_iter().enumerate() {
                        parts.push(self.bool_exp(table, alias, item, &format!("{here}[{i}]"))?);
                    }
                    terms.push(if key.as_str() == "_and" {
                        and(parts)
                    } else if parts.is_empty() {
                        "FALSE".to_owned()
                    } else {
                        format!("({})", parts.join(" OR "))
                    });
                }
                "_not" => {
                    let inner = self.bool_exp(table, alias, value, &here)?;
                    terms.push(format!("NOT ({inner})"));
                }
                name => {
                    if let Some(column) = t.column(name) {
                        let column_sql = format!("{alias}.{}", quote_ident(name));
                        self.comparison(&column_sql, column, value, &here, &mut terms)?;
                    } else if let Some(rel) = t.relationship(name) {
                        let remote_alias = self.alias();
                        let join = rel
                            .mapping
                            .iter()
                            .map(|(local, remote)| {
                                format!(
                                    "{remote_alias}.{} = {alias}.{}",
                                    quote_ident(remote),
                                    quote_ident(local)
                                )
                            })
                            .collect::<Vec<_>>();
                        let inner = self.bool_exp(rel.remote, &remote_alias, value, &here)?;
                        terms.push(format!(
                            "EXISTS (SELECT 1 FROM {} AS {remote_alias} WHERE {} AND {inner})",
                            self.model.table(rel.remote).sql_name(),
                            and(join)
                        ));
                    } else {
                        return Err(GqlError::validation(
                            &here,
                            format!(
                                "field '{name}' not found in type: '{}_bool_exp'",
                                t.gql_name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(and(terms))
    }

    /// A `<Scalar>_comparison_exp` on one column.
    fn comparison(
        &mut self,
        column_sql: &str,
        column: &Column,
        ops: &Value,
        path: &str,
        terms: &mut Vec<String>,
    ) -> Result<(), GqlError> {
        let type_name = format!("{}_comparison_exp", column.scalar);
        let ops = match ops {
            Value::Object(ops) => ops,
            Value::Null => return Err(null_error(path, &type_name)),
            _ => {
                return Err(GqlError::validation(
                    path,
                    format!("expected an object for type \"{type_name}\""),
                ));
            }
        };
        for (op, value) in ops {
            let here = format!("{path}.{op}");
            if matches!(value, Value::Null) {
                return Err(null_error(&here, &column.scalar));
            }
            let binary = match op.as_str() {
                "_eq" => Some("="),
                "_neq" => Some("<>"),
                "_gt" => Some(">"),
                "_gte" => Some(">="),
                "_lt" => Some("<"),
                "_lte" => Some("<="),
                _ => None,
            };
            if let Some(operator) = binary {
                let param = self.cast(value_text(value), &column.sql_type);
                terms.push(format!("{column_sql} {operator} {param}"));
                continue;
            }
            let pattern = match op.as_str() {
                "_like" => Some("LIKE"),
                "_nlike" => Some("NOT LIKE"),
                "_ilike" => Some("ILIKE"),
                "_nilike" => Some("NOT ILIKE"),
                "_similar" => Some("SIMILAR TO"),
                "_nsimilar" => Some("NOT SIMILAR TO"),
                "_regex" => Some("~"),
                "_nregex" => Some("!~"),
                "_iregex" => Some("~*"),
                "_niregex" => Some("!~*"),
                _ => None,
            };
            if let Some(operator) = pattern {
                let param = self.text(value_text(value).unwrap_or_default());
                terms.push(format!("{column_sql} {operator} {param}"));
                continue;
            }
            match op.as_str() {
                "_in" | "_nin" => {
                    let mut items = Vec::new();
                    for (i, item) in as_list(value).into_iter().enumerate() {
                        items.push(
                            value_text(item).ok_or_else(|| {
                                null_error(&format!("{here}[{i}]"), &column.scalar)
                            })?,
                        );
                    }
                    let param = self.cast_list(items, &column.sql_type);
                    terms.push(if op.as_str() == "_in" {
                        format!("{column_sql} = ANY({param})")
                    } else {
                        format!("{column_sql} <> ALL({param})")
                    });
                }
                "_is_null" => match value {
                    Value::Boolean(true) => terms.push(format!("{column_sql} IS NULL")),
                    Value::Boolean(false) => terms.push(format!("{column_sql} IS NOT NULL")),
                    _ => {
                        return Err(GqlError::validation(
                            &here,
                            "expected a boolean for type \"Boolean\"",
                        ));
                    }
                },
                other => {
                    return Err(GqlError::validation(
                        &here,
                        format!("field '{other}' not found in type: '{type_name}'"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `order_by`: a list of `<t>_order_by` objects (or one object); inside an object the
    /// keys apply in the order written.
    fn order_by(
        &mut self,
        table: usize,
        alias: &str,
        value: &Value,
        path: &str,
    ) -> Result<Vec<String>, GqlError> {
        let mut items = Vec::new();
        for (i, entry) in as_list(value).into_iter().enumerate() {
            let here = format!("{path}[{i}]");
            self.order_by_object(table, alias, entry, &here, &mut items)?;
        }
        Ok(items
            .into_iter()
            .map(|(expr, direction)| format!("{expr} {direction}"))
            .collect())
    }

    fn order_by_object(
        &mut self,
        table: usize,
        alias: &str,
        entry: &Value,
        path: &str,
        items: &mut Vec<(String, &'static str)>,
    ) -> Result<(), GqlError> {
        let t = self.model.table(table);
        let fields = match entry {
            Value::Object(fields) => fields,
            Value::Null => return Ok(()),
            _ => {
                return Err(GqlError::validation(
                    path,
                    format!("expected an object for type \"{}_order_by\"", t.gql_name),
                ));
            }
        };
        for (key, value) in fields {
            let here = format!("{path}.{key}");
            if matches!(value, Value::Null) {
                continue;
            }
            if t.column(key).is_some() {
                let direction = match enum_name(value) {
                    Some("asc") => "ASC NULLS LAST",
                    Some("asc_nulls_first") => "ASC NULLS FIRST",
                    Some("asc_nulls_last") => "ASC NULLS LAST",
                    Some("desc") => "DESC NULLS FIRST",
                    Some("desc_nulls_first") => "DESC NULLS FIRST",
                    Some("desc_nulls_last") => "DESC NULLS LAST",
                    _ => {
                        return Err(GqlError::validation(
                            &here,
                            "expected a value of the enum \"order_by\"",
                        ));
                    }
                };
                items.push((format!("{alias}.{}", quote_ident(key)), direction));
            } else if let Some(rel) = t
                .relationship(key)
                .filter(|r| r.kind == RelationshipKind::Object)
            {
                // Ordering by a column of the related row: a scalar subquery per item.
                let remote_alias = self.alias();
                let mut inner = Vec::new();
                self.order_by_object(rel.remote, &remote_alias, value, &here, &mut inner)?;
                let join = and(rel
                    .mapping
                    .iter()
                    .map(|(local, remote)| {
                        format!(
                            "{remote_alias}.{} = {alias}.{}",
                            quote_ident(remote),
                            quote_ident(local)
                        )
                    })
                    .collect());
                let remote_sql = self.model.table(rel.remote).sql_name();
                for (expr, direction) in inner {
                    items.push((
                        format!("(SELECT {expr} FROM {remote_sql} AS {remote_alias} WHERE {join})"),
                        direction,
                    ));
                }
            } else {
                return Err(GqlError::validation(
                    &here,
                    format!("field '{key}' not found in type: '{}_order_by'", t.gql_name),
                ));
            }
        }
        Ok(())
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
    table: usize,
    args: &SelectArgs<'_>,
    join: &JoinValues<'_>,
    path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model);
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
    let mut sql = format!(
        "SELECT row_to_json({alias})::text FROM {} AS {alias} WHERE {}",
        t.sql_name(),
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
    table: usize,
    objects: &[&IndexMap<Name, Value>],
    on_conflict: Option<&Value>,
    path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model);
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
            if let Some(condition) = conflict.get("where").filter(|w| !matches!(w, Value::Null)) {
                let condition =
                    b.bool_exp(table, &alias, condition, &format!("{conflict_path}.where"))?;
                sql.push_str(" WHERE ");
                sql.push_str(&condition);
            }
        }
    }
    Ok(b.finish(returning_json(sql)))
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
    table: usize,
    set: Option<&Value>,
    inc: Option<&Value>,
    filter: &Filter<'_>,
    args_path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model);
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
    let condition = b.filter(table, &alias, filter, &filter_path(filter, args_path))?;
    let sql = format!(
        "UPDATE {} AS {alias} SET {} WHERE {condition}",
        t.sql_name(),
        assignments.join(", ")
    );
    Ok(b.finish(returning_json(sql)))
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
    table: usize,
    filter: &Filter<'_>,
    args_path: &str,
) -> Result<Statement, GqlError> {
    let mut b = Builder::new(model);
    let t = model.table(table);
    let alias = b.alias();
    let condition = b.filter(table, &alias, filter, &filter_path(filter, args_path))?;
    let sql = format!("DELETE FROM {} AS {alias} WHERE {condition}", t.sql_name());
    Ok(b.finish(returning_json(sql)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hasura::catalog::{Column, Relationship, Table};

    fn column(name: &str, sql_type: &str, scalar: &str) -> Column {
        Column {
            name: name.into(),
            sql_type: sql_type.into(),
            scalar: scalar.into(),
            nullable: false,
            numeric: scalar == "Int",
        }
    }

    fn model() -> Model {
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
                },
            ],
        }
    }

    fn value(json: serde_json::Value) -> Value {
        Value::from_json(json).unwrap()
    }

    #[test]
    fn bool_exp_combines_and_or_not_and_relationships() {
        let m = model();
        let w = value(serde_json::json!({
            "_or": [{"id": {"_eq": "a"}}, {"remaining_capacity": {"_gt": 1}}],
            "_not": {"id": {"_in": ["b", "c"]}},
            "mandelboxes": {"status": {"_eq": "RUNNING"}}
        }));
        let args = SelectArgs {
            filter: Some(Filter::BoolExp(Some(&w))),
            ..SelectArgs::default()
        };
        let s = select(&m, 0, &args, &Vec::new(), "$.selectionSet.x").unwrap();
        // (serde_json's map sorts keys: `_not`, `_or`, `mandelboxes`.)
        assert_eq!(
            s.sql,
            "SELECT row_to_json(_0)::text FROM \"whist\".\"instances\" AS _0 WHERE \
             (NOT (_0.\"id\" = ANY(CAST($1::text[] AS character varying[]))) AND \
             (_0.\"id\" = CAST($2::text AS character varying) OR _0.\"remaining_capacity\" > \
             CAST($3::text AS integer)) AND EXISTS (SELECT 1 FROM \"whist\".\"mandelboxes\" \
             AS _1 WHERE _1.\"instance_id\" = _0.\"id\" AND _1.\"status\" = CAST($4::text AS \
             character varying)))"
        );
        assert_eq!(s.params().len(), 4);
    }

    #[test]
    fn empty_or_matches_nothing_and_empty_object_everything() {
        let m = model();
        let w = value(serde_json::json!({"_or": [], "_and": []}));
        let args = SelectArgs {
            filter: Some(Filter::BoolExp(Some(&w))),
            ..SelectArgs::default()
        };
        let s = select(&m, 0, &args, &Vec::new(), "$").unwrap();
        assert!(s.sql.ends_with("WHERE (TRUE AND FALSE)"), "{}", s.sql);
    }

    #[test]
    fn null_operator_value_is_rejected() {
        let m = model();
        let w = value(serde_json::json!({"id": {"_eq": null}}));
        let args = SelectArgs {
            filter: Some(Filter::BoolExp(Some(&w))),
            ..SelectArgs::default()
        };
        let e = select(&m, 0, &args, &Vec::new(), "$.selectionSet.x").unwrap_err();
        assert_eq!(e.path, "$.selectionSet.x.args.where.id._eq");
        assert_eq!(e.code, "validation-failed");
    }

    #[test]
    fn update_rejects_a_column_in_both_set_and_inc() {
        let m = model();
        let set = value(serde_json::json!({"remaining_capacity": 1}));
        let inc = value(serde_json::json!({"remaining_capacity": 1}));
        let e = update(&m, 0, Some(&set), Some(&inc), &Filter::BoolExp(None), "$").unwrap_err();
        assert!(e.message.contains("multiple operators"), "{}", e.message);
    }
}
