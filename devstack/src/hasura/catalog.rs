//! The model the schema is generated from: the tables Hasura's metadata tracks, with their
//! columns, keys and relationships as PostgreSQL's catalogs describe them right now. Reading the
//! catalogs at start (instead of a hand-written table list) is what lets a migration that adds a
//! column change the GraphQL schema with no code change, as it does for real Hasura.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokio_postgres::Client;

use super::HasuraError;
use super::function::{Function, TrackedFunction};
use super::permissions::{PermissionLists, RolePermissions};

/// Every tracked table, in metadata order. Relationships refer to tables by index.
#[derive(Debug)]
pub(crate) struct Model {
    pub tables: Vec<Table>,
    /// Every tracked function, in metadata order.
    pub functions: Vec<Function>,
}

#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub schema: String,
    pub name: String,
    /// Hasura's default GraphQL name: `<schema>_<table>`, or the bare name in `public`.
    pub gql_name: String,
    /// In `attnum` order.
    pub columns: Vec<Column>,
    /// Primary-key columns in key order; empty when the table has none.
    pub primary_key: Vec<String>,
    /// Primary-key and unique constraint names, sorted: the `<t>_constraint` enum.
    pub unique_constraints: Vec<String>,
    pub relationships: Vec<Relationship>,
    /// Every role's permissions on the table, as metadata lists them.
    pub permission_lists: PermissionLists,
    /// In a role's model ([`Model::for_role`]): that role's permissions. `None` for admin.
    pub role: Option<RolePermissions>,
}

#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub name: String,
    /// The type without modifiers (`character varying`, not `character varying(20)`), for
    /// casts: casting to a length-limited type would silently truncate, whereas the assignment
    /// to the column reports the overflow as an error, as Hasura does.
    pub sql_type: String,
    /// The GraphQL scalar the column is exposed as (contract §2.1).
    pub scalar: String,
    pub nullable: bool,
    /// Whether `_inc` applies.
    pub numeric: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelationshipKind {
    Object,
    Array,
}

#[derive(Debug, Clone)]
pub(crate) struct Relationship {
    pub name: String,
    pub kind: RelationshipKind,
    /// Index of the related table in [`Model::tables`].
    pub remote: usize,
    /// `(local column, remote column)` pairs that join the two tables.
    pub mapping: Vec<(String, String)>,
    /// An object relationship is non-null when every local column of its foreign key is
    /// `NOT NULL`: the row it points at must then exist.
    pub nullable: bool,
}

impl Model {
    pub fn table(&self, index: usize) -> &Table {
        &self.tables[index]
    }

    /// The table whose rows a root field such as `whist_instances_by_pk` returns.
    pub fn table_by_gql_name(&self, gql_name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.gql_name == gql_name)
    }

    /// The tables whose changes can alter a live query rooted at `table`: the table itself and
    /// every table reachable through relationships (they can appear in its selection or filter).
    pub fn reachable_tables(&self, table: usize) -> Vec<usize> {
        let mut seen = vec![table];
        let mut next = 0;
        while next < seen.len() {
            let current = seen[next];
            next += 1;
            for rel in &self.tables[current].relationships {
                if !seen.contains(&rel.remote) {
                    seen.push(rel.remote);
                }
            }
        }
        seen
    }
}

impl Table {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."table"`, for SQL.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn relationship(&self, name: &str) -> Option<&Relationship> {
        self.relationships.iter().find(|r| r.name == name)
    }
}

/// Quotes an SQL identifier (names come from the catalogs, so they can hold anything).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The GraphQL scalar Hasura uses for a PostgreSQL type (by `pg_type.typname`): the GraphQL
/// built-ins for the types they match, the PostgreSQL name otherwise.
pub(crate) fn scalar_for(typname: &str) -> String {
    match typname {
        "text" | "varchar" => "String",
        "int4" => "Int",
        "bool" => "Boolean",
        "float8" => "Float",
        "int8" => "bigint",
        "int2" => "smallint",
        "float4" => "real",
        other => other,
    }
    .to_owned()
}

fn is_numeric(typname: &str) -> bool {
    matches!(
        typname,
        "int2" | "int4" | "int8" | "float4" | "float8" | "numeric" | "money"
    )
}

fn gql_table_name(schema: &str, name: &str) -> String {
    if schema == "public" {
        name.to_owned()
    } else {
        format!("{schema}_{name}")
    }
}

// ---- metadata (the `replace_metadata` document, version 3) ----

#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(default)]
    sources: Vec<Source>,
    /// Version-2 metadata lists the tables at the top level.
    #[serde(default)]
    tables: Vec<TrackedTable>,
}

#[derive(Debug, Deserialize)]
struct Source {
    #[serde(default)]
    tables: Vec<TrackedTable>,
    #[serde(default)]
    functions: Vec<TrackedFunction>,
}

#[derive(Debug, Deserialize)]
struct TrackedTable {
    table: QualifiedName,
    #[serde(default)]
    object_relationships: Vec<RelationshipEntry>,
    #[serde(default)]
    array_relationships: Vec<RelationshipEntry>,
    #[serde(flatten)]
    permissions: PermissionLists,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct QualifiedName {
    #[serde(default = "public_schema")]
    pub schema: String,
    pub name: String,
}

fn public_schema() -> String {
    "public".to_owned()
}

#[derive(Debug, Deserialize)]
struct RelationshipEntry {
    name: String,
    using: RelationshipUsing,
}

#[derive(Debug, Deserialize)]
struct RelationshipUsing {
    foreign_key_constraint_on: Option<serde_json::Value>,
    manual_configuration: Option<ManualConfiguration>,
}

#[derive(Debug, Deserialize)]
struct ManualConfiguration {
    remote_table: QualifiedName,
    column_mapping: BTreeMap<String, String>,
}

/// What the catalogs say about one table before relationships are resolved.
#[derive(Debug)]
struct CatalogTable {
    columns: Vec<Column>,
    primary_key: Vec<String>,
    unique_constraints: Vec<String>,
    foreign_keys: Vec<ForeignKey>,
}

#[derive(Debug)]
struct ForeignKey {
    columns: Vec<String>,
    references: QualifiedName,
    ref_columns: Vec<String>,
}

const TABLE_OID_SQL: &str = "SELECT c.oid FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')";

const COLUMNS_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, NULL), t.typname::text, \
     a.attnotnull \
     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

const CONSTRAINTS_SQL: &str = "SELECT con.conname::text, con.contype::text, \
     ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
           JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum \
           ORDER BY k.ord), \
     fn.nspname::text, fc.relname::text, \
     ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord) \
           JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum \
           ORDER BY k.ord) \
     FROM pg_catalog.pg_constraint con \
     LEFT JOIN pg_catalog.pg_class fc ON fc.oid = con.confrelid \
     LEFT JOIN pg_catalog.pg_namespace fn ON fn.oid = fc.relnamespace \
     WHERE con.conrelid = $1 AND con.contype IN ('p', 'u', 'f') ORDER BY con.conname";

/// Reads the tracked tables from `metadata` (Hasura's metadata JSON) and describes each from
/// the catalogs.
pub(crate) async fn load(client: &Client, metadata: &str) -> Result<Model, HasuraError> {
    let metadata: Metadata = serde_json::from_str(metadata)?;
    let mut tracked_functions = Vec::new();
    let tracked: Vec<TrackedTable> = metadata
        .sources
        .into_iter()
        .flat_map(|s| {
            tracked_functions.extend(s.functions);
            s.tables
        })
        .chain(metadata.tables)
        .collect();

    let mut catalog = Vec::with_capacity(tracked.len());
    for entry in &tracked {
        catalog.push(read_table(client, &entry.table).await?);
    }

    let names: Vec<QualifiedName> = tracked.iter().map(|t| t.table.clone()).collect();
    let find = |name: &QualifiedName| names.iter().position(|n| n == name);

    let mut tables = Vec::with_capacity(tracked.len());
    for (index, entry) in tracked.iter().enumerate() {
        let own = &catalog[index];
        let mut relationships = Vec::new();
        let kinds = entry
            .object_relationships
            .iter()
            .map(|r| (r, RelationshipKind::Object))
            .chain(
                entry
                    .array_relationships
                    .iter()
                    .map(|r| (r, RelationshipKind::Array)),
            );
        for (rel, kind) in kinds {
            let invalid = |reason: String| HasuraError::Relationship {
                table: format!("{}.{}", entry.table.schema, entry.table.name),
                relationship: rel.name.clone(),
                reason,
            };
            let (remote_name, mapping): (QualifiedName, Vec<(String, String)>) =
                match (&rel.using.foreign_key_constraint_on, kind) {
                    (Some(on), RelationshipKind::Object) => {
                        let columns = fk_columns(on).ok_or_else(|| {
                            invalid(format!("unsupported foreign_key_constraint_on: {on}"))
                        })?;
                        let fk = own
                            .foreign_keys
                            .iter()
                            .find(|fk| fk.columns == columns)
                            .ok_or_else(|| invalid(format!("no foreign key on {columns:?}")))?;
                        let mapping = fk
                            .columns
                            .iter()
                            .cloned()
                            .zip(fk.ref_columns.iter().cloned())
                            .collect();
                        (fk.references.clone(), mapping)
                    }
                    (Some(on), RelationshipKind::Array) => {
                        let remote: QualifiedName = on
                            .get("table")
                            .cloned()
                            .and_then(|t| serde_json::from_value(t).ok())
                            .ok_or_else(|| invalid(format!("no remote table in {on}")))?;
                        let columns = on
                            .get("columns")
                            .or_else(|| on.get("column"))
                            .and_then(fk_columns)
                            .ok_or_else(|| invalid(format!("no remote column in {on}")))?;
                        let remote_index = find(&remote).ok_or_else(|| {
                            invalid(format!("{}.{} is not tracked", remote.schema, remote.name))
                        })?;
                        let fk = catalog[remote_index]
                            .foreign_keys
                            .iter()
                            .find(|fk| fk.columns == columns && fk.references == entry.table)
                            .ok_or_else(|| {
                                invalid(format!(
                                    "no foreign key on {}.{} {columns:?} referencing this table",
                                    remote.schema, remote.name
                                ))
                            })?;
                        let mapping = fk
                            .ref_columns
                            .iter()
                            .cloned()
                            .zip(fk.columns.iter().cloned())
                            .collect();
                        (remote, mapping)
                    }
                    (None, _) => {
                        let manual = rel.using.manual_configuration.as_ref().ok_or_else(|| {
                            invalid(
                                "neither foreign_key_constraint_on nor manual_configuration".into(),
                            )
                        })?;
                        let mapping = manual
                            .column_mapping
                            .iter()
                            .map(|(l, r)| (l.clone(), r.clone()))
                            .collect();
                        (manual.remote_table.clone(), mapping)
                    }
                };
            let remote = find(&remote_name).ok_or_else(|| {
                invalid(format!(
                    "{}.{} is not tracked",
                    remote_name.schema, remote_name.name
                ))
            })?;
            let nullable = kind == RelationshipKind::Object
                && (rel.using.foreign_key_constraint_on.is_none()
                    || mapping.iter().any(|(local, _)| {
                        own.columns
                            .iter()
                            .find(|c| &c.name == local)
                            .is_none_or(|c| c.nullable)
                    }));
            for (local, remote_column) in &mapping {
                if !own.columns.iter().any(|c| &c.name == local) {
                    return Err(invalid(format!("no column {local}")));
                }
                if !catalog[remote]
                    .columns
                    .iter()
                    .any(|c| &c.name == remote_column)
                {
                    return Err(invalid(format!("no remote column {remote_column}")));
                }
            }
            relationships.push(Relationship {
                name: rel.name.clone(),
                kind,
                remote,
                mapping,
                nullable,
            });
        }
        relationships.sort_by(|a, b| a.name.cmp(&b.name));
        tables.push((
            entry.table.clone(),
            relationships,
            entry.permissions.clone(),
        ));
    }
    let functions = super::function::load(client, &tracked_functions, find).await?;

    Ok(Model {
        functions,
        tables: tables
            .into_iter()
            .zip(catalog)
            .map(|((name, relationships, permission_lists), catalog)| Table {
                gql_name: gql_table_name(&name.schema, &name.name),
                schema: name.schema,
                name: name.name,
                columns: catalog.columns,
                primary_key: catalog.primary_key,
                unique_constraints: catalog.unique_constraints,
                relationships,
                permission_lists,
                role: None,
            })
            .collect(),
    })
}

/// `"instance_id"`, `["instance_id"]` or `{"columns": [...]}` / `{"column": "..."}`.
fn fk_columns(value: &serde_json::Value) -> Option<Vec<String>> {
    match value {
        serde_json::Value::String(column) => Some(vec![column.clone()]),
        serde_json::Value::Array(columns) => columns
            .iter()
            .map(|c| c.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::Object(object) => object
            .get("columns")
            .or_else(|| object.get("column"))
            .and_then(fk_columns),
        _ => None,
    }
}

async fn read_table(client: &Client, name: &QualifiedName) -> Result<CatalogTable, HasuraError> {
    let catalog = |source| HasuraError::Database {
        step: "reading the catalogs",
        source,
    };
    let oid: u32 = client
        .query_opt(TABLE_OID_SQL, &[&name.schema, &name.name])
        .await
        .map_err(catalog)?
        .ok_or_else(|| HasuraError::TableNotFound {
            table: format!("{}.{}", name.schema, name.name),
        })?
        .try_get(0)
        .map_err(catalog)?;

    let mut columns = Vec::new();
    for row in client.query(COLUMNS_SQL, &[&oid]).await.map_err(catalog)? {
        let typname: String = row.try_get(2).map_err(catalog)?;
        let not_null: bool = row.try_get(3).map_err(catalog)?;
        columns.push(Column {
            name: row.try_get(0).map_err(catalog)?,
            sql_type: row.try_get(1).map_err(catalog)?,
            scalar: scalar_for(&typname),
            nullable: !not_null,
            numeric: is_numeric(&typname),
        });
    }

    let mut primary_key = Vec::new();
    let mut unique_constraints = Vec::new();
    let mut foreign_keys = Vec::new();
    for row in client
        .query(CONSTRAINTS_SQL, &[&oid])
        .await
        .map_err(catalog)?
    {
        let conname: String = row.try_get(0).map_err(catalog)?;
        let contype: String = row.try_get(1).map_err(catalog)?;
        let columns: Vec<String> = row.try_get(2).map_err(catalog)?;
        match contype.as_str() {
            "p" => {
                primary_key = columns;
                unique_constraints.push(conname);
            }
            "u" => unique_constraints.push(conname),
            _ => {
                let schema: Option<String> = row.try_get(3).map_err(catalog)?;
                let table: Option<String> = row.try_get(4).map_err(catalog)?;
                if let (Some(schema), Some(name)) = (schema, table) {
                    foreign_keys.push(ForeignKey {
                        columns,
                        references: QualifiedName { schema, name },
                        ref_columns: row.try_get(5).map_err(catalog)?,
                    });
                }
            }
        }
    }
    unique_constraints.sort();
    Ok(CatalogTable {
        columns,
        primary_key,
        unique_constraints,
        foreign_keys,
    })
}
