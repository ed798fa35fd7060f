//! `schema.graphql` (repository root) is the generated schema: it must equal `Hasura::sdl()`
//! and describe exactly what the running endpoint's introspection reports.
//!
//! Regenerate it with `WHIST_UPDATE_SCHEMA=1 cargo test -p devstack --test hasura schema`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use devstack::hasura::{Hasura, HasuraOptions};
use devstack::testing::TestStack;
use graphql_parser::schema::{Definition, Document, Type, TypeDefinition};
use serde_json::{Value, json};

use crate::support::data;

const REGENERATE: &str = "WHIST_UPDATE_SCHEMA=1 cargo test -p devstack --test hasura schema";

fn schema_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("schema.graphql")
}

const INTROSPECTION: &str = r#"
query {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types {
      kind name
      fields(includeDeprecated: true) { name args { name type { ...Ref } defaultValue } type { ...Ref } }
      inputFields { name type { ...Ref } defaultValue }
      enumValues(includeDeprecated: true) { name }
    }
  }
}
fragment Ref on __Type {
  kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } }
}"#;

const BUILT_IN_SCALARS: [&str; 5] = ["Boolean", "Float", "ID", "Int", "String"];

/// The schema as sorted `key → value` lines, e.g. `field whist_instances.id → String!`: easy
/// to compare without regard to order, and a readable diff.
type Normalized = BTreeMap<String, String>;

fn type_ref(value: &Value) -> String {
    match value["kind"].as_str() {
        Some("NON_NULL") => format!("{}!", type_ref(&value["ofType"])),
        Some("LIST") => format!("[{}]", type_ref(&value["ofType"])),
        _ => value["name"].as_str().unwrap_or("?").to_owned(),
    }
}

fn default_value(value: &Value) -> String {
    match value.as_str() {
        Some(text) => format!(" = {}", text.split_whitespace().collect::<String>()),
        None => String::new(),
    }
}

fn from_introspection(schema: &Value) -> Normalized {
    let mut lines = Normalized::new();
    for (key, root) in [
        ("query", "queryType"),
        ("mutation", "mutationType"),
        ("subscription", "subscriptionType"),
    ] {
        if let Some(name) = schema[root]["name"].as_str() {
            lines.insert(format!("schema {key}"), name.to_owned());
        }
    }
    for ty in schema["types"].as_array().expect("types") {
        let name = ty["name"].as_str().expect("type name");
        if name.starts_with("__") || BUILT_IN_SCALARS.contains(&name) {
            continue;
        }
        lines.insert(
            format!("type {name}"),
            ty["kind"].as_str().unwrap().to_owned(),
        );
        for field in ty["fields"].as_array().into_iter().flatten() {
            let field_name = field["name"].as_str().unwrap();
            lines.insert(
                format!("field {name}.{field_name}"),
                type_ref(&field["type"]),
            );
            for arg in field["args"].as_array().into_iter().flatten() {
                lines.insert(
                    format!("arg {name}.{field_name}({})", arg["name"].as_str().unwrap()),
                    format!(
                        "{}{}",
                        type_ref(&arg["type"]),
                        default_value(&arg["defaultValue"])
                    ),
                );
            }
        }
        for field in ty["inputFields"].as_array().into_iter().flatten() {
            lines.insert(
                format!("input {name}.{}", field["name"].as_str().unwrap()),
                format!(
                    "{}{}",
                    type_ref(&field["type"]),
                    default_value(&field["defaultValue"])
                ),
            );
        }
        for value in ty["enumValues"].as_array().into_iter().flatten() {
            lines.insert(
                format!("enum {name}.{}", value["name"].as_str().unwrap()),
                "ENUM_VALUE".to_owned(),
            );
        }
    }
    lines
}

fn sdl_type(ty: &Type<'_, String>) -> String {
    match ty {
        Type::NamedType(name) => name.clone(),
        Type::ListType(inner) => format!("[{}]", sdl_type(inner)),
        Type::NonNullType(inner) => format!("{}!", sdl_type(inner)),
    }
}

fn sdl_default(value: Option<&graphql_parser::query::Value<'_, String>>) -> String {
    match value {
        Some(v) => format!(
            " = {}",
            v.to_string().split_whitespace().collect::<String>()
        ),
        None => String::new(),
    }
}

fn from_sdl(document: &Document<'_, String>) -> Normalized {
    let mut lines = Normalized::new();
    for definition in &document.definitions {
        match definition {
            Definition::SchemaDefinition(schema) => {
                for (key, name) in [
                    ("query", &schema.query),
                    ("mutation", &schema.mutation),
                    ("subscription", &schema.subscription),
                ] {
                    if let Some(name) = name {
                        lines.insert(format!("schema {key}"), name.clone());
                    }
                }
            }
            Definition::TypeDefinition(ty) => match ty {
                TypeDefinition::Scalar(s) => {
                    lines.insert(format!("type {}", s.name), "SCALAR".into());
                }
                TypeDefinition::Object(o) => {
                    lines.insert(format!("type {}", o.name), "OBJECT".into());
                    for field in &o.fields {
                        lines.insert(
                            format!("field {}.{}", o.name, field.name),
                            sdl_type(&field.field_type),
                        );
                        for arg in &field.arguments {
                            lines.insert(
                                format!("arg {}.{}({})", o.name, field.name, arg.name),
                                format!(
                                    "{}{}",
                                    sdl_type(&arg.value_type),
                                    sdl_default(arg.default_value.as_ref())
                                ),
                            );
                        }
                    }
                }
                TypeDefinition::InputObject(i) => {
                    lines.insert(format!("type {}", i.name), "INPUT_OBJECT".into());
                    for field in &i.fields {
                        lines.insert(
                            format!("input {}.{}", i.name, field.name),
                            format!(
                                "{}{}",
                                sdl_type(&field.value_type),
                                sdl_default(field.default_value.as_ref())
                            ),
                        );
                    }
                }
                TypeDefinition::Enum(e) => {
                    lines.insert(format!("type {}", e.name), "ENUM".into());
                    for value in &e.values {
                        lines.insert(
                            format!("enum {}.{}", e.name, value.name),
                            "ENUM_VALUE".into(),
                        );
                    }
                }
                TypeDefinition::Interface(i) => {
                    lines.insert(format!("type {}", i.name), "INTERFACE".into());
                }
                TypeDefinition::Union(u) => {
                    lines.insert(format!("type {}", u.name), "UNION".into());
                }
            },
            Definition::TypeExtension(_) | Definition::DirectiveDefinition(_) => {}
        }
    }
    lines
}

/// Lines only on one side, and lines whose value differs.
fn diff(file: &Normalized, endpoint: &Normalized) -> Vec<String> {
    let mut out = Vec::new();
    for (key, value) in file {
        match endpoint.get(key) {
            None => out.push(format!("- {key}: {value}   (only in schema.graphql)")),
            Some(other) if other != value => {
                out.push(format!("~ {key}: schema.graphql {value}, endpoint {other}"))
            }
            Some(_) => {}
        }
    }
    for (key, value) in endpoint {
        if !file.contains_key(key) {
            out.push(format!("+ {key}: {value}   (only in the endpoint)"));
        }
    }
    out
}

#[tokio::test]
async fn schema_graphql_matches_the_endpoints_introspection() {
    let stack = TestStack::start().await.unwrap();
    let sdl = stack.hasura.sdl();
    let path = schema_path();
    if std::env::var_os("WHIST_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &sdl).expect("write schema.graphql");
        eprintln!("rewrote {}", path.display());
    }
    let file = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read {}: {e}; regenerate with `{REGENERATE}`",
            path.display()
        )
    });
    let document = graphql_parser::parse_schema::<String>(&file)
        .unwrap_or_else(|e| panic!("schema.graphql does not parse: {e}"));

    let introspection = data(&stack, INTROSPECTION, json!({})).await;
    let from_file = from_sdl(&document);
    let from_endpoint = from_introspection(&introspection["__schema"]);
    let differences = diff(&from_file, &from_endpoint);
    assert!(
        differences.is_empty(),
        "schema.graphql differs from the running endpoint's introspection:\n{}\n\
         Regenerate it with `{REGENERATE}`.",
        differences.join("\n")
    );
    assert!(
        file == sdl,
        "schema.graphql is not the current output of Hasura::sdl(); regenerate it with `{REGENERATE}`."
    );

    // Spot checks of Hasura's naming, against the contract.
    for expected in [
        ("field query_root.whist_instances_by_pk", "whist_instances"),
        ("arg query_root.whist_images_by_pk(region)", "String!"),
        (
            "field mutation_root.insert_whist_instances_one",
            "whist_instances",
        ),
        (
            "arg mutation_root.update_whist_instances(where)",
            "whist_instances_bool_exp!",
        ),
        (
            "arg mutation_root.update_whist_instances_by_pk(pk_columns)",
            "whist_instances_pk_columns_input!",
        ),
        ("field whist_instances.mandelboxes", "[whist_mandelboxes!]!"),
        ("field whist_mandelboxes.instance", "whist_instances!"),
        ("field whist_instances.ip_addr", "inet"),
        ("field whist_mandelboxes.id", "uuid!"),
        ("input whist_instances_inc_input.remaining_capacity", "Int"),
        (
            "input whist_instances_on_conflict.update_columns",
            "[whist_instances_update_column!]! = []",
        ),
        ("enum whist_images_constraint.images_pkey", "ENUM_VALUE"),
        ("enum order_by.desc_nulls_last", "ENUM_VALUE"),
        ("input String_comparison_exp._nilike", "String"),
        ("input uuid_comparison_exp._in", "[uuid!]"),
        ("schema subscription", "subscription_root"),
    ] {
        assert_eq!(
            from_endpoint.get(expected.0).map(String::as_str),
            Some(expected.1),
            "{}",
            expected.0
        );
    }
    assert!(!from_endpoint.contains_key("type whist_mandelboxes_inc_input"));
    assert_eq!(
        from_endpoint.get("field subscription_root.whist_mandelboxes"),
        from_endpoint.get("field query_root.whist_mandelboxes")
    );
}

/// The schema follows the catalogs: a migration that adds a column changes it with no code
/// change.
#[tokio::test]
async fn a_new_column_appears_in_the_schema() {
    let stack = TestStack::start().await.unwrap();
    stack
        .sql()
        .await
        .unwrap()
        .batch_execute(
            "ALTER TABLE whist.images ADD COLUMN notes text, ADD COLUMN build bigint NOT NULL DEFAULT 7",
        )
        .await
        .unwrap();
    let hasura = Hasura::new(&stack.database_url, HasuraOptions::default())
        .await
        .unwrap();
    let sdl = hasura.sdl();
    let document = graphql_parser::parse_schema::<String>(&sdl).unwrap();
    let lines = from_sdl(&document);
    assert_eq!(
        lines.get("field whist_images.notes").map(String::as_str),
        Some("String")
    );
    assert_eq!(
        lines.get("field whist_images.build").map(String::as_str),
        Some("bigint!")
    );
    assert_eq!(
        lines
            .get("input whist_images_inc_input.build")
            .map(String::as_str),
        Some("bigint")
    );
}
