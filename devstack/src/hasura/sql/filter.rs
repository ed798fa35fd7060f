//! The `where` (`<t>_bool_exp`, primary keys) and `order_by` clauses of a statement.

use async_graphql::Value;

use super::super::catalog::{Column, RelationshipKind, quote_ident};
use super::super::error::GqlError;
use super::{Builder, Filter, and, as_list, enum_name, null_error, value_text};

impl Builder<'_> {
    pub(super) fn filter(
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
    pub(super) fn bool_exp(
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
                        let mut conditions = join;
                        conditions.push(self.bool_exp(rel.remote, &remote_alias, value, &here)?);
                        // Only the related rows the role may select count.
                        conditions.extend(self.select_permission(rel.remote, &remote_alias)?);
                        terms.push(format!(
                            "EXISTS (SELECT 1 FROM {} AS {remote_alias} WHERE {})",
                            self.model.table(rel.remote).sql_name(),
                            and(conditions)
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
    pub(super) fn order_by(
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

#[cfg(test)]
mod tests {
    use super::super::tests::{model, value};
    use super::super::{SelectArgs, select};
    use super::*;
    use crate::hasura::permissions::SessionVariables;

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
        let s = select(
            &m,
            &SessionVariables::default(),
            0,
            &args,
            &Vec::new(),
            "$.selectionSet.x",
        )
        .unwrap();
        // (serde_json's map sorts keys: `_not`, `_or`, `mandelboxes`.)
        assert_eq!(
            s.sql,
            "SELECT row_to_json(_0)::text FROM \"whist\".\"instances\" AS _0 WHERE \
             (NOT (_0.\"id\" = ANY(CAST($1::text[] AS character varying[]))) AND \
             (_0.\"id\" = CAST($2::text AS character varying) OR _0.\"remaining_capacity\" > \
             CAST($3::text AS integer)) AND EXISTS (SELECT 1 FROM \"whist\".\"mandelboxes\" \
             AS _1 WHERE (_1.\"instance_id\" = _0.\"id\" AND _1.\"status\" = CAST($4::text AS \
             character varying))))"
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
        let s = select(&m, &SessionVariables::default(), 0, &args, &Vec::new(), "$").unwrap();
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
        let e = select(
            &m,
            &SessionVariables::default(),
            0,
            &args,
            &Vec::new(),
            "$.selectionSet.x",
        )
        .unwrap_err();
        assert_eq!(e.path, "$.selectionSet.x.args.where.id._eq");
        assert_eq!(e.code, "validation-failed");
    }
}
