//! Hasura's role permissions (`select_permissions`, `insert_permissions`, `update_permissions`,
//! `delete_permissions` of a tracked table), for the part our services use.
//!
//! Like Hasura, each role gets its own schema: [`Model::for_role`] keeps the tables the role may
//! select from, and the schema built from that model shows only the columns, relationships and
//! root fields the role's permissions allow, so anything else is "not found" at validation.
//! The permissions' row conditions (`filter`, `check`) are boolean expressions in `<t>_bool_exp`
//! syntax whose string values may name session variables (`X-Hasura-Instance-Id`); they are
//! resolved against the request's session variables and ANDed into every statement.
//!
//! Left out: column presets (`set`), `limit`, aggregation permissions, `backend_only`, computed
//! fields and explicit function permissions (Hasura infers a tracked function's permission from
//! the select permission on the table it returns, `HASURA_GRAPHQL_INFER_FUNCTION_PERMISSIONS`
//! being true by default; so does this).

use std::collections::BTreeMap;

use async_graphql::Value;
use serde::Deserialize;

use super::catalog::{Model, Table};
use super::error::{GqlError, code};

/// What metadata lists under `<op>_permissions` of a table.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PermissionEntry {
    pub role: String,
    #[serde(default)]
    pub permission: PermissionBody,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PermissionBody {
    #[serde(default)]
    columns: Columns,
    #[serde(default)]
    filter: Option<serde_json::Value>,
    #[serde(default)]
    check: Option<serde_json::Value>,
}

/// A column list, or `"*"` for every column.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
enum Columns {
    #[default]
    None,
    All(String),
    Listed(Vec<String>),
}

impl Columns {
    fn resolve(&self, table: &Table) -> Vec<String> {
        match self {
            Columns::None => Vec::new(),
            Columns::All(star) if star == "*" => {
                table.columns.iter().map(|c| c.name.clone()).collect()
            }
            Columns::All(one) => vec![one.clone()],
            Columns::Listed(list) => table
                .columns
                .iter()
                .filter(|c| list.contains(&c.name))
                .map(|c| c.name.clone())
                .collect(),
        }
    }
}

/// The permissions metadata gives one table, by role.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PermissionLists {
    #[serde(default)]
    pub select_permissions: Vec<PermissionEntry>,
    #[serde(default)]
    pub insert_permissions: Vec<PermissionEntry>,
    #[serde(default)]
    pub update_permissions: Vec<PermissionEntry>,
    #[serde(default)]
    pub delete_permissions: Vec<PermissionEntry>,
}

impl PermissionLists {
    /// Every role named anywhere in these lists.
    pub fn roles(&self) -> impl Iterator<Item = &str> {
        self.select_permissions
            .iter()
            .chain(&self.insert_permissions)
            .chain(&self.update_permissions)
            .chain(&self.delete_permissions)
            .map(|e| e.role.as_str())
    }

    fn find<'a>(list: &'a [PermissionEntry], role: &str) -> Option<&'a PermissionBody> {
        list.iter().find(|e| e.role == role).map(|e| &e.permission)
    }
}

/// One role's permissions on one table. Conditions are `<t>_bool_exp` JSON with session
/// variable names still in them; `{}` when metadata gives none (every row).
#[derive(Debug, Clone)]
pub(crate) struct RolePermissions {
    pub select_columns: Vec<String>,
    pub select_filter: serde_json::Value,
    pub insert: Option<InsertPermission>,
    pub update: Option<UpdatePermission>,
    pub delete: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub(crate) struct InsertPermission {
    pub columns: Vec<String>,
    pub check: serde_json::Value,
}

#[derive(Debug, Clone)]
pub(crate) struct UpdatePermission {
    pub columns: Vec<String>,
    pub filter: serde_json::Value,
    /// The post-update check (Hasura's `check`); `None` when metadata gives none.
    pub check: Option<serde_json::Value>,
}

fn condition(value: &Option<serde_json::Value>) -> serde_json::Value {
    value
        .clone()
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()))
}

impl RolePermissions {
    /// `role`'s permissions on `table`; `None` without a select permission (Hasura leaves such a
    /// table out of the role's schema; the mutations without select are left out here too).
    pub fn of(table: &Table, lists: &PermissionLists, role: &str) -> Option<Self> {
        let select = PermissionLists::find(&lists.select_permissions, role)?;
        Some(Self {
            select_columns: select.columns.resolve(table),
            select_filter: condition(&select.filter),
            insert: PermissionLists::find(&lists.insert_permissions, role).map(|p| {
                InsertPermission {
                    columns: p.columns.resolve(table),
                    check: condition(&p.check),
                }
            }),
            update: PermissionLists::find(&lists.update_permissions, role).map(|p| {
                UpdatePermission {
                    columns: p.columns.resolve(table),
                    filter: condition(&p.filter),
                    check: p.check.clone(),
                }
            }),
            delete: PermissionLists::find(&lists.delete_permissions, role)
                .map(|p| condition(&p.filter)),
        })
    }
}

/// Session variables of a request (`x-hasura-*`, names lower-cased), and its role.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionVariables {
    pub role: String,
    vars: BTreeMap<String, String>,
}

impl SessionVariables {
    pub fn new(role: impl Into<String>, vars: BTreeMap<String, String>) -> Self {
        Self {
            role: role.into(),
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// `condition` with every string that names a session variable replaced by its value, as
    /// an async-graphql value for the `bool_exp` compiler. A variable the request lacks is
    /// Hasura's `not-found` error.
    pub fn resolve(&self, condition: &serde_json::Value) -> Result<Value, GqlError> {
        fn walk(
            vars: &SessionVariables,
            value: &serde_json::Value,
        ) -> Result<serde_json::Value, GqlError> {
            Ok(match value {
                serde_json::Value::String(s) if is_session_variable(s) => match vars.get(s) {
                    Some(v) => serde_json::Value::String(v.to_owned()),
                    None => {
                        return Err(GqlError::new(
                            code::NOT_FOUND,
                            "$",
                            format!("missing session variable: \"{}\"", s.to_ascii_lowercase()),
                        ));
                    }
                },
                serde_json::Value::Array(items) => serde_json::Value::Array(
                    items
                        .iter()
                        .map(|i| walk(vars, i))
                        .collect::<Result<_, _>>()?,
                ),
                serde_json::Value::Object(map) => serde_json::Value::Object(
                    map.iter()
                        .map(|(k, v)| Ok((k.clone(), walk(vars, v)?)))
                        .collect::<Result<_, GqlError>>()?,
                ),
                other => other.clone(),
            })
        }
        let resolved = walk(self, condition)?;
        Value::from_json(resolved).map_err(|e| GqlError::unexpected(e.to_string()))
    }
}

/// Hasura's rule: a session variable is any name starting with `x-hasura-`, in any case.
pub(crate) fn is_session_variable(name: &str) -> bool {
    name.len() > "x-hasura-".len() && name[.."x-hasura-".len()].eq_ignore_ascii_case("x-hasura-")
}

impl Model {
    /// The model `role`'s schema is generated from: the tables it may select from (with their
    /// permissions attached), the relationships between them, and the tracked functions whose
    /// rows it may select. An unknown role gets an empty model.
    pub fn for_role(&self, role: &str) -> Model {
        let mut kept = Vec::new();
        let mut new_index = vec![None; self.tables.len()];
        for (index, table) in self.tables.iter().enumerate() {
            if let Some(permissions) = RolePermissions::of(table, &table.permission_lists, role) {
                new_index[index] = Some(kept.len());
                kept.push((index, permissions));
            }
        }
        let tables = kept
            .into_iter()
            .map(|(index, permissions)| {
                let mut table = self.tables[index].clone();
                table.relationships = table
                    .relationships
                    .into_iter()
                    .filter_map(|mut rel| {
                        rel.remote = new_index[rel.remote]?;
                        Some(rel)
                    })
                    .collect();
                table.role = Some(permissions);
                table
            })
            .collect();
        let functions = self
            .functions
            .iter()
            .filter_map(|f| {
                let mut f = f.clone();
                f.returns = new_index[f.returns]?;
                Some(f)
            })
            .collect();
        Model { tables, functions }
    }

    /// Every role some table's permissions name.
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self
            .tables
            .iter()
            .flat_map(|t| t.permission_lists.roles().map(str::to_owned))
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }
}

impl Table {
    /// Whether the request's role may read `column` (always, for admin).
    pub fn can_select(&self, column: &str) -> bool {
        self.role
            .as_ref()
            .is_none_or(|r| r.select_columns.iter().any(|c| c == column))
    }

    /// The columns of the role's object type, in `attnum` order.
    pub fn select_columns(&self) -> Vec<&super::catalog::Column> {
        self.columns
            .iter()
            .filter(|c| self.can_select(&c.name))
            .collect()
    }

    /// The columns the role may insert; `None` without an insert permission.
    pub fn insert_columns(&self) -> Option<Vec<&super::catalog::Column>> {
        match &self.role {
            None => Some(self.columns.iter().collect()),
            Some(r) => r.insert.as_ref().map(|p| {
                self.columns
                    .iter()
                    .filter(|c| p.columns.contains(&c.name))
                    .collect()
            }),
        }
    }

    /// The columns the role may update; `None` without an update permission.
    pub fn update_columns(&self) -> Option<Vec<&super::catalog::Column>> {
        match &self.role {
            None => Some(self.columns.iter().collect()),
            Some(r) => r.update.as_ref().map(|p| {
                self.columns
                    .iter()
                    .filter(|c| p.columns.contains(&c.name))
                    .collect()
            }),
        }
    }

    pub fn can_delete(&self) -> bool {
        self.role.as_ref().is_none_or(|r| r.delete.is_some())
    }

    /// Whether the `_by_pk` fields exist for the role: every key column is selectable.
    pub fn pk_selectable(&self) -> bool {
        !self.primary_key.is_empty() && self.primary_key.iter().all(|c| self.can_select(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_variable_names_are_case_insensitive_and_need_a_suffix() {
        assert!(is_session_variable("X-Hasura-Instance-Id"));
        assert!(is_session_variable("x-hasura-instance-id"));
        assert!(!is_session_variable("x-hasura-"));
        assert!(!is_session_variable("instance"));
    }

    #[test]
    fn conditions_take_the_requests_values_and_a_missing_one_is_not_found() {
        let vars = SessionVariables::new(
            "host",
            BTreeMap::from([("X-Hasura-Instance-Id".to_owned(), "i-1".to_owned())]),
        );
        let resolved = vars
            .resolve(&serde_json::json!({"id": {"_eq": "x-hasura-INSTANCE-id"}, "status": {"_eq": "ACTIVE"}}))
            .unwrap();
        assert_eq!(
            resolved.into_json().unwrap(),
            serde_json::json!({"id": {"_eq": "i-1"}, "status": {"_eq": "ACTIVE"}})
        );
        let error = vars
            .resolve(&serde_json::json!({"id": {"_eq": "X-Hasura-User-Id"}}))
            .unwrap_err();
        assert_eq!(error.code, code::NOT_FOUND);
        assert_eq!(
            error.message,
            "missing session variable: \"x-hasura-user-id\""
        );
    }
}
