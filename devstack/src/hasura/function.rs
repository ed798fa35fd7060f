//! Tracked SQL functions, as Hasura v2 serves them (`pg_track_function`): a function that returns
//! `SETOF <tracked table>` becomes a root field named like a table (`<schema>_<function>`), with
//! the function's arguments in one `args: <field>_args!` input object (every field nullable;
//! an argument left out is passed as SQL `NULL`) beside the return table's `where`, `order_by`,
//! `limit` and `offset`. It returns a list of that table's rows, with its relationships.
//!
//! Where it goes follows Hasura: `configuration.exposed_as` (`query` or `mutation`), else the
//! function's volatility (`VOLATILE` is a mutation, `STABLE` and `IMMUTABLE` are queries). A
//! mutation runs in the request's transaction with its other mutation fields; a query-exposed
//! function also appears under `subscription_root`. Overloaded functions, functions that do not
//! return a tracked table's rows and a `VOLATILE` function exposed as a query are refused at
//! start, as Hasura refuses to track them.

use async_graphql::Value;
use serde::Deserialize;
use tokio_postgres::Client;

use super::HasuraError;
use super::catalog::{QualifiedName, quote_ident, scalar_for};

/// A tracked function.
#[derive(Debug, Clone)]
pub(crate) struct Function {
    pub schema: String,
    pub name: String,
    /// `<schema>_<name>`, or the bare name in `public`.
    pub gql_name: String,
    /// In declaration order.
    pub arguments: Vec<Argument>,
    /// Index of the table whose rows it returns.
    pub returns: usize,
    pub exposed_as: ExposedAs,
    /// `VOLATILE`, `STABLE` or `IMMUTABLE`, for the field's description.
    pub volatility: &'static str,
}

#[derive(Debug, Clone)]
pub(crate) struct Argument {
    pub name: String,
    /// For the cast of its text parameter.
    pub sql_type: String,
    pub scalar: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ExposedAs {
    Query,
    Mutation,
}

impl Function {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The input object that carries the arguments.
    pub fn args_type(&self) -> String {
        format!("{}_args", self.gql_name)
    }

    /// `"schema"."name"(CAST($1::text AS t1), ...)`, with `param` turning each argument's text
    /// (absent or null: `NULL`) into a placeholder.
    pub fn call_sql(
        &self,
        args: Option<&Value>,
        mut param: impl FnMut(Option<String>, &str) -> String,
    ) -> String {
        let fields = match args {
            Some(Value::Object(fields)) => Some(fields),
            _ => None,
        };
        let values: Vec<String> = self
            .arguments
            .iter()
            .map(|a| {
                let text = fields
                    .and_then(|f| f.get(a.name.as_str()))
                    .and_then(super::sql::value_text);
                param(text, &a.sql_type)
            })
            .collect();
        format!(
            "{}.{}({})",
            quote_ident(&self.schema),
            quote_ident(&self.name),
            values.join(", ")
        )
    }
}

/// A `functions` entry of a source in the metadata.
#[derive(Debug, Deserialize)]
pub(crate) struct TrackedFunction {
    function: QualifiedName,
    #[serde(default)]
    configuration: FunctionConfiguration,
}

#[derive(Debug, Default, Deserialize)]
struct FunctionConfiguration {
    exposed_as: Option<ExposedAs>,
}

const FUNCTION_SQL: &str = "SELECT p.provolatile::text, p.proretset, rn.nspname::text, \
     rc.relname::text, COALESCE(p.proargnames, ARRAY[]::text[]), \
     ARRAY(SELECT format_type(a.t, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY \
           AS a(t, o) ORDER BY a.o), \
     ARRAY(SELECT ty.typname::text FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, o) \
           JOIN pg_catalog.pg_type ty ON ty.oid = a.t ORDER BY a.o) \
     FROM pg_catalog.pg_proc p \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     JOIN pg_catalog.pg_type rt ON rt.oid = p.prorettype \
     LEFT JOIN pg_catalog.pg_class rc ON rc.oid = rt.typrelid \
     LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
     WHERE n.nspname = $1 AND p.proname = $2 AND p.prokind = 'f'";

fn catalog_error(source: tokio_postgres::Error) -> HasuraError {
    HasuraError::Database {
        step: "reading the catalogs",
        source,
    }
}

/// Describes each tracked function from the catalogs; `table_index` finds a tracked table.
pub(crate) async fn load(
    client: &Client,
    tracked: &[TrackedFunction],
    table_index: impl Fn(&QualifiedName) -> Option<usize>,
) -> Result<Vec<Function>, HasuraError> {
    let mut functions = Vec::with_capacity(tracked.len());
    for entry in tracked {
        let name = &entry.function;
        let invalid = |reason: String| HasuraError::Function {
            function: format!("{}.{}", name.schema, name.name),
            reason,
        };
        let rows = client
            .query(FUNCTION_SQL, &[&name.schema, &name.name])
            .await
            .map_err(catalog_error)?;
        let row = match rows.as_slice() {
            [] => return Err(invalid("no such function in the database".into())),
            [row] => row,
            _ => return Err(invalid("overloaded functions are not supported".into())),
        };
        let get = |i: usize| row.try_get::<_, Option<String>>(i).map_err(catalog_error);
        let volatility = match get(0)?.as_deref() {
            Some("v") => "VOLATILE",
            Some("s") => "STABLE",
            _ => "IMMUTABLE",
        };
        let returns_set: bool = row.try_get(1).map_err(catalog_error)?;
        let returns = match (get(2)?, get(3)?) {
            (Some(schema), Some(name)) => table_index(&QualifiedName { schema, name }),
            _ => None,
        };
        let returns = match returns {
            Some(index) if returns_set => index,
            _ => {
                return Err(invalid(
                    "it must return SETOF a tracked table (its rows' type)".into(),
                ));
            }
        };
        let array = |i: usize| row.try_get::<_, Vec<String>>(i).map_err(catalog_error);
        let (names, sql_types, typnames) = (array(4)?, array(5)?, array(6)?);
        if names.len() < sql_types.len() || names.iter().any(String::is_empty) {
            return Err(invalid("every argument must have a name".into()));
        }
        let arguments = sql_types
            .into_iter()
            .zip(typnames)
            .zip(names)
            .map(|((sql_type, typname), name)| Argument {
                name,
                sql_type,
                scalar: scalar_for(&typname),
            })
            .collect();
        let exposed_as = entry.configuration.exposed_as.unwrap_or(match volatility {
            "VOLATILE" => ExposedAs::Mutation,
            _ => ExposedAs::Query,
        });
        if exposed_as == ExposedAs::Query && volatility == "VOLATILE" {
            return Err(invalid(
                "a VOLATILE function cannot be exposed as a query".into(),
            ));
        }
        functions.push(Function {
            gql_name: if name.schema == "public" {
                name.name.clone()
            } else {
                format!("{}_{}", name.schema, name.name)
            },
            schema: name.schema.clone(),
            name: name.name.clone(),
            arguments,
            returns,
            exposed_as,
            volatility,
        });
    }
    Ok(functions)
}
