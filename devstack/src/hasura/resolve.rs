//! Field resolvers of the generated schema. Root fields translate their arguments into one SQL
//! statement each (see `sql`) and run it on the operation's [`Session`]; column fields read the
//! row PostgreSQL rendered; relationship fields run one statement per parent row on the same
//! session (a devstack serves a handful of rows, so the simple plan wins over batching).

use std::sync::Arc;

use async_graphql::dynamic::{FieldFuture, FieldValue, ResolverContext};
use async_graphql::{QueryPathSegment, Value};

use super::catalog::{Model, RelationshipKind};
use super::error::{GqlError, code};
use super::exec::{Row, Session};
use super::sql::{self, Filter, SelectArgs};

/// What `insert_*`, `update_*` and `delete_*` return.
#[derive(Debug)]
pub(crate) struct MutationResult {
    rows: Vec<Row>,
}

/// A resolver as async-graphql's dynamic schema takes it.
pub(crate) type Resolver =
    Box<dyn for<'a> Fn(ResolverContext<'a>) -> FieldFuture<'a> + Send + Sync>;

fn session<'a>(ctx: &ResolverContext<'a>) -> Result<&'a Arc<Session>, GqlError> {
    ctx.ctx
        .data::<Arc<Session>>()
        .map_err(|_| GqlError::unexpected("no database session for this request"))
}

/// Hasura's path of the field being resolved: `$.selectionSet.a.selectionSet.b` (list indices
/// are not part of Hasura's paths).
fn field_path(ctx: &ResolverContext<'_>) -> String {
    let mut names = Vec::new();
    let mut node = ctx.ctx.path_node.as_ref();
    while let Some(n) = node {
        if let QueryPathSegment::Name(name) = n.segment {
            names.push(name);
        }
        node = n.parent;
    }
    names.iter().rev().fold("$".to_owned(), |path, name| {
        format!("{path}.selectionSet.{name}")
    })
}

fn arg<'a>(ctx: &'a ResolverContext<'_>, name: &str) -> Option<&'a Value> {
    ctx.args
        .get(name)
        .map(|v| v.as_value())
        .filter(|v| !matches!(v, Value::Null))
}

/// An `Int` argument. GraphQL's `Int` is 32-bit; async-graphql lets any integer through, Hasura
/// rejects the rest as a parse failure.
fn int_arg(ctx: &ResolverContext<'_>, name: &str) -> Result<Option<i64>, GqlError> {
    match arg(ctx, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64().filter(|v| i32::try_from(*v).is_ok()) {
            Some(v) => Ok(Some(v)),
            None => Err(GqlError::new(
                code::PARSE_FAILED,
                format!("{}.args.{name}", field_path(ctx)),
                format!("The value {n} lies outside the bounds or is not an integer."),
            )),
        },
        Some(_) => Err(GqlError::new(
            code::PARSE_FAILED,
            format!("{}.args.{name}", field_path(ctx)),
            "expected an integer",
        )),
    }
}

fn select_args<'a>(ctx: &'a ResolverContext<'_>) -> Result<SelectArgs<'a>, GqlError> {
    Ok(SelectArgs {
        filter: Some(Filter::BoolExp(arg(ctx, "where"))),
        order_by: arg(ctx, "order_by"),
        limit: int_arg(ctx, "limit")?,
        offset: int_arg(ctx, "offset")?,
    })
}

fn rows_value<'a>(rows: Vec<Row>) -> FieldValue<'a> {
    FieldValue::list(rows.into_iter().map(FieldValue::owned_any))
}

/// Runs a resolver body, remembering a failure so that later mutation fields are skipped.
async fn guarded<'a, F>(
    ctx: &ResolverContext<'a>,
    body: F,
) -> async_graphql::Result<Option<FieldValue<'a>>>
where
    F: std::future::Future<Output = Result<Option<FieldValue<'a>>, GqlError>>,
{
    let session = session(ctx)?;
    session.check_not_failed()?;
    match body.await {
        Ok(value) => Ok(value),
        Err(error) => {
            session.mark_failed();
            Err(error.into())
        }
    }
}

/// `whist_<t>(where, order_by, limit, offset)`
pub(crate) fn select(model: Arc<Model>, table: usize) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let path = field_path(&ctx);
                let statement = sql::select(
                    &model,
                    &session(&ctx)?.vars,
                    table,
                    &select_args(&ctx)?,
                    &Vec::new(),
                    &path,
                )?;
                let rows = session(&ctx)?.rows(&statement, "$").await?;
                Ok(Some(rows_value(rows)))
            })
            .await
        })
    })
}

/// A tracked function's field: `<f>(args, where, order_by, limit, offset)`, its rows (in a
/// mutation, on the request's transaction like every mutation field).
pub(crate) fn function(model: Arc<Model>, function: usize) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let path = field_path(&ctx);
                let statement = sql::select_function(
                    &model,
                    &session(&ctx)?.vars,
                    &model.functions[function],
                    arg(&ctx, "args"),
                    &select_args(&ctx)?,
                    &path,
                )?;
                let rows = session(&ctx)?.rows(&statement, "$").await?;
                Ok(Some(rows_value(rows)))
            })
            .await
        })
    })
}

/// The primary-key condition from per-column arguments (`whist_t_by_pk(id: ...)`).
fn by_pk_filter<'a>(
    model: &'a Model,
    table: usize,
    ctx: &'a ResolverContext<'_>,
    object: Option<&'a Value>,
    path: &str,
) -> Result<Filter<'a>, GqlError> {
    let t = model.table(table);
    let mut values = Vec::with_capacity(t.primary_key.len());
    for column in &t.primary_key {
        let value = match object {
            Some(Value::Object(fields)) => fields.get(column.as_str()),
            Some(_) => None,
            None => arg(ctx, column),
        }
        .ok_or_else(|| GqlError::validation(path, format!("missing required field '{column}'")))?;
        values.push((column.as_str(), value));
    }
    Ok(Filter::PrimaryKey(values))
}

/// `whist_<t>_by_pk(<pk columns>)`: the row or null.
pub(crate) fn select_by_pk(model: Arc<Model>, table: usize) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let path = field_path(&ctx);
                let args = SelectArgs {
                    filter: Some(by_pk_filter(&model, table, &ctx, None, &path)?),
                    ..SelectArgs::default()
                };
                let statement = sql::select(
                    &model,
                    &session(&ctx)?.vars,
                    table,
                    &args,
                    &Vec::new(),
                    &path,
                )?;
                let rows = session(&ctx)?.rows(&statement, "$").await?;
                Ok(rows.into_iter().next().map(FieldValue::owned_any))
            })
            .await
        })
    })
}

/// `insert_whist_<t>(objects, on_conflict)` and `insert_whist_<t>_one(object, on_conflict)`.
pub(crate) fn insert(model: Arc<Model>, table: usize, one: bool) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let args_path = format!("{}.args", field_path(&ctx));
                let (name, objects) = if one {
                    (
                        "object",
                        arg(&ctx, "object").into_iter().collect::<Vec<_>>(),
                    )
                } else {
                    let objects = match arg(&ctx, "objects") {
                        Some(Value::List(items)) => items.iter().collect(),
                        Some(single) => vec![single],
                        None => Vec::new(),
                    };
                    ("objects", objects)
                };
                let objects_path = format!("{args_path}.{name}");
                let mut maps = Vec::with_capacity(objects.len());
                for (i, object) in objects.iter().enumerate() {
                    match object {
                        Value::Object(map) => maps.push(map),
                        _ => {
                            return Err(GqlError::validation(
                                format!("{objects_path}[{i}]"),
                                "expected an object",
                            ));
                        }
                    }
                }
                let rows = if maps.is_empty() {
                    Vec::new()
                } else {
                    let statement = sql::insert(
                        &model,
                        &session(&ctx)?.vars,
                        table,
                        &maps,
                        arg(&ctx, "on_conflict"),
                        &objects_path,
                    )?;
                    session(&ctx)?.rows(&statement, &objects_path).await?
                };
                Ok(Some(if one {
                    match rows.into_iter().next() {
                        Some(row) => FieldValue::owned_any(row),
                        None => return Ok(None),
                    }
                } else {
                    FieldValue::owned_any(MutationResult { rows })
                }))
            })
            .await
        })
    })
}

/// `update_whist_<t>(_inc, _set, where)` and `update_whist_<t>_by_pk(_inc, _set, pk_columns)`.
pub(crate) fn update(model: Arc<Model>, table: usize, by_pk: bool) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let path = field_path(&ctx);
                let args_path = format!("{path}.args");
                let filter = if by_pk {
                    let pk_path = format!("{args_path}.pk_columns");
                    by_pk_filter(&model, table, &ctx, arg(&ctx, "pk_columns"), &pk_path)?
                } else {
                    Filter::BoolExp(arg(&ctx, "where"))
                };
                let statement = sql::update(
                    &model,
                    &session(&ctx)?.vars,
                    table,
                    arg(&ctx, "_set"),
                    arg(&ctx, "_inc"),
                    &filter,
                    &args_path,
                )?;
                // Where Hasura points update/delete constraint violations is unconfirmed
                // (contract §1.4); `$` is what its execution path reports for other errors.
                let rows = session(&ctx)?.rows(&statement, "$").await?;
                Ok(mutation_output(rows, by_pk))
            })
            .await
        })
    })
}

/// `delete_whist_<t>(where)` and `delete_whist_<t>_by_pk(<pk columns>)`.
pub(crate) fn delete(model: Arc<Model>, table: usize, by_pk: bool) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let path = field_path(&ctx);
                let args_path = format!("{path}.args");
                let filter = if by_pk {
                    by_pk_filter(&model, table, &ctx, None, &args_path)?
                } else {
                    Filter::BoolExp(arg(&ctx, "where"))
                };
                let statement =
                    sql::delete(&model, &session(&ctx)?.vars, table, &filter, &args_path)?;
                let rows = session(&ctx)?.rows(&statement, "$").await?;
                Ok(mutation_output(rows, by_pk))
            })
            .await
        })
    })
}

fn mutation_output<'a>(rows: Vec<Row>, by_pk: bool) -> Option<FieldValue<'a>> {
    if by_pk {
        rows.into_iter().next().map(FieldValue::owned_any)
    } else {
        Some(FieldValue::owned_any(MutationResult { rows }))
    }
}

/// `affected_rows` of a mutation response.
pub(crate) fn affected_rows() -> Resolver {
    Box::new(
        |ctx| match ctx.parent_value.downcast_ref::<MutationResult>() {
            Some(result) => FieldFuture::from_value(Some(Value::from(result.rows.len()))),
            None => internal_error("affected_rows outside a mutation response"),
        },
    )
}

/// `returning` of a mutation response.
pub(crate) fn returning() -> Resolver {
    Box::new(
        |ctx| match ctx.parent_value.downcast_ref::<MutationResult>() {
            Some(result) => FieldFuture::Value(Some(FieldValue::list(
                result.rows.iter().map(|row| FieldValue::borrowed_any(row)),
            ))),
            None => internal_error("returning outside a mutation response"),
        },
    )
}

/// A column of a row: PostgreSQL's JSON rendering of it.
pub(crate) fn column(name: String) -> Resolver {
    Box::new(move |ctx| match ctx.parent_value.downcast_ref::<Row>() {
        Some(row) => FieldFuture::from_value(match row.get(&name) {
            None | Some(Value::Null) => None,
            Some(value) => Some(value.clone()),
        }),
        None => internal_error("a column resolved outside a row"),
    })
}

/// A relationship field: the related rows of the parent row, on the operation's session.
pub(crate) fn relationship(model: Arc<Model>, table: usize, relationship: usize) -> Resolver {
    Box::new(move |ctx| {
        let model = model.clone();
        FieldFuture::new(async move {
            guarded(&ctx, async {
                let rel = &model.table(table).relationships[relationship];
                let row = ctx
                    .parent_value
                    .downcast_ref::<Row>()
                    .ok_or_else(|| GqlError::unexpected("a relationship resolved outside a row"))?;
                let mut join = Vec::with_capacity(rel.mapping.len());
                for (local, remote) in &rel.mapping {
                    match row.get(local).and_then(sql::value_text) {
                        Some(text) => join.push((remote.as_str(), Some(text))),
                        // A null key joins nothing.
                        None => {
                            return Ok(match rel.kind {
                                RelationshipKind::Array => Some(rows_value(Vec::new())),
                                RelationshipKind::Object => None,
                            });
                        }
                    }
                }
                let path = field_path(&ctx);
                let args = match rel.kind {
                    RelationshipKind::Array => select_args(&ctx)?,
                    RelationshipKind::Object => SelectArgs::default(),
                };
                let statement = sql::select(
                    &model,
                    &session(&ctx)?.vars,
                    rel.remote,
                    &args,
                    &join,
                    &path,
                )?;
                let rows = session(&ctx)?.rows(&statement, "$").await?;
                Ok(match rel.kind {
                    RelationshipKind::Array => Some(rows_value(rows)),
                    RelationshipKind::Object => rows.into_iter().next().map(FieldValue::owned_any),
                })
            })
            .await
        })
    })
}

fn internal_error<'a>(message: &'static str) -> FieldFuture<'a> {
    FieldFuture::new(async move {
        Err::<Option<FieldValue<'a>>, _>(async_graphql::Error::from(GqlError::unexpected(message)))
    })
}
