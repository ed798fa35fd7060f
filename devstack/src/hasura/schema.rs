//! The GraphQL schema Hasura v2 generates for the tracked tables (contract §2), built with
//! async-graphql's dynamic schema: the part our services use, without aggregates,
//! `distinct_on`, streaming subscriptions or nested inserts. Fields, arguments and enum values
//! are listed alphabetically, as in Hasura's own introspection.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_graphql::Value;
use async_graphql::dynamic::{
    Enum, EnumItem, Field, FieldFuture, InputObject, InputValue, Object, Scalar, Schema,
    SchemaError, Subscription, SubscriptionField, SubscriptionFieldFuture, TypeRef,
};

use super::catalog::{Model, RelationshipKind, Table};
use super::function::ExposedAs;
use super::resolve::{self, Resolver};

pub(crate) const QUERY_ROOT: &str = "query_root";
pub(crate) const MUTATION_ROOT: &str = "mutation_root";
pub(crate) const SUBSCRIPTION_ROOT: &str = "subscription_root";

const BUILT_IN_SCALARS: [&str; 5] = ["Boolean", "Float", "ID", "Int", "String"];

const COMPARISON_OPERATORS: [&str; 9] = [
    "_eq", "_gt", "_gte", "_in", "_is_null", "_lt", "_lte", "_neq", "_nin",
];
/// The pattern operators only `String_comparison_exp` has.
const STRING_OPERATORS: [&str; 10] = [
    "_ilike",
    "_iregex",
    "_like",
    "_nilike",
    "_niregex",
    "_nlike",
    "_nregex",
    "_nsimilar",
    "_regex",
    "_similar",
];

const ORDER_BY_VALUES: [(&str, &str); 6] = [
    ("asc", "in ascending order, nulls last"),
    ("asc_nulls_first", "in ascending order, nulls first"),
    ("asc_nulls_last", "in ascending order, nulls last"),
    ("desc", "in descending order, nulls first"),
    ("desc_nulls_first", "in descending order, nulls first"),
    ("desc_nulls_last", "in descending order, nulls last"),
];

/// Which values a scalar accepts (its output values are checked the same way).
fn scalar_accepts(name: &str, value: &Value) -> bool {
    match name {
        "uuid" | "inet" | "timestamptz" | "timestamp" | "date" | "time" | "timetz" | "bpchar"
        | "citext" => matches!(value, Value::String(_)),
        "bigint" | "smallint" | "numeric" | "real" | "money" => {
            matches!(value, Value::Number(_) | Value::String(_))
        }
        _ => true,
    }
}

/// A root field, built once for `query_root` and once for `subscription_root`.
struct RootField {
    name: String,
    ty: TypeRef,
    description: String,
    arguments: Vec<InputValue>,
    resolver: Resolver,
}

fn input(name: &str, ty: TypeRef, description: Option<&str>) -> InputValue {
    let value = InputValue::new(name, ty);
    match description {
        Some(d) => value.description(d),
        None => value,
    }
}

fn select_arguments(t: &Table) -> Vec<InputValue> {
    vec![
        input(
            "limit",
            TypeRef::named(TypeRef::INT),
            Some("limit the number of rows returned"),
        ),
        input(
            "offset",
            TypeRef::named(TypeRef::INT),
            Some("skip the first n rows. Use only with order_by"),
        ),
        input(
            "order_by",
            TypeRef::named_nn_list(format!("{}_order_by", t.gql_name)),
            Some("sort the rows by one or more columns"),
        ),
        input(
            "where",
            TypeRef::named(format!("{}_bool_exp", t.gql_name)),
            Some("filter the rows returned"),
        ),
    ]
}

fn pk_arguments(t: &Table) -> Vec<InputValue> {
    let mut columns: Vec<_> = t
        .primary_key
        .iter()
        .filter_map(|name| t.column(name))
        .collect();
    columns.sort_by(|a, b| a.name.cmp(&b.name));
    columns
        .into_iter()
        .map(|c| InputValue::new(&c.name, TypeRef::named_nn(&c.scalar)))
        .collect()
}

fn select_root_fields(model: &Arc<Model>, index: usize) -> Vec<RootField> {
    let t = model.table(index);
    let qualified = t.qualified_name();
    let mut fields = vec![RootField {
        name: t.gql_name.clone(),
        ty: TypeRef::named_nn_list_nn(&t.gql_name),
        description: format!("fetch data from the table: \"{qualified}\""),
        arguments: select_arguments(t),
        resolver: resolve::select(model.clone(), index),
    }];
    if t.pk_selectable() {
        fields.push(RootField {
            name: format!("{}_by_pk", t.gql_name),
            ty: TypeRef::named(&t.gql_name),
            description: format!(
                "fetch data from the table: \"{qualified}\" using primary key columns"
            ),
            arguments: pk_arguments(t),
            resolver: resolve::select_by_pk(model.clone(), index),
        });
    }
    fields
}

/// The root field of tracked function `index` and the input object of its arguments.
fn function_root_field(model: &Arc<Model>, index: usize) -> (RootField, Option<InputObject>) {
    let f = &model.functions[index];
    let returns = model.table(f.returns);
    let mut arguments = select_arguments(returns);
    let mut args_input = None;
    if !f.arguments.is_empty() {
        arguments.insert(
            0,
            input(
                "args",
                TypeRef::named_nn(f.args_type()),
                Some(&format!(
                    "input parameters for function \"{}\"",
                    f.qualified_name()
                )),
            ),
        );
        args_input = Some(
            f.arguments
                .iter()
                .fold(InputObject::new(f.args_type()), |object, a| {
                    object.field(InputValue::new(&a.name, TypeRef::named(&a.scalar)))
                }),
        );
    }
    let volatility = match f.exposed_as {
        ExposedAs::Mutation => format!("{} ", f.volatility),
        ExposedAs::Query => String::new(),
    };
    let field = RootField {
        name: f.gql_name.clone(),
        ty: TypeRef::named_nn_list_nn(&returns.gql_name),
        description: format!(
            "execute {volatility}function \"{}\" which returns \"{}\"",
            f.qualified_name(),
            returns.qualified_name()
        ),
        arguments,
        resolver: resolve::function(model.clone(), index),
    };
    (field, args_input)
}

fn mutation_root_fields(model: &Arc<Model>, index: usize) -> Vec<RootField> {
    let t = model.table(index);
    let n = &t.gql_name;
    let qualified = t.qualified_name();
    let update_columns = t.update_columns();
    let can_update = update_columns.as_ref().is_some_and(|c| !c.is_empty());
    let has_inc = update_columns
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.numeric));
    let can_insert = t.insert_columns().is_some();
    let can_delete = t.can_delete();
    let has_pk = t.pk_selectable();
    // An upsert needs the update permission too.
    let has_conflict = !t.unique_constraints.is_empty() && can_update;
    let response = format!("{n}_mutation_response");
    let update_args = |target: InputValue| {
        let mut args = Vec::new();
        if has_inc {
            args.push(input(
                "_inc",
                TypeRef::named(format!("{n}_inc_input")),
                Some("increments the numeric columns with given value of the filtered values"),
            ));
        }
        args.push(input(
            "_set",
            TypeRef::named(format!("{n}_set_input")),
            Some("sets the columns of the filtered rows to the given values"),
        ));
        args.push(target);
        args
    };
    let insert_args = |first: InputValue| {
        let mut args = vec![first];
        if has_conflict {
            args.push(input(
                "on_conflict",
                TypeRef::named(format!("{n}_on_conflict")),
                Some("upsert condition"),
            ));
        }
        args
    };

    let mut fields = Vec::new();
    if can_delete {
        fields.push(RootField {
            name: format!("delete_{n}"),
            ty: TypeRef::named(&response),
            description: format!("delete data from the table: \"{qualified}\""),
            arguments: vec![input(
                "where",
                TypeRef::named_nn(format!("{n}_bool_exp")),
                Some("filter the rows which have to be deleted"),
            )],
            resolver: resolve::delete(model.clone(), index, false),
        });
    }
    if can_insert {
        fields.push(RootField {
            name: format!("insert_{n}"),
            ty: TypeRef::named(&response),
            description: format!("insert data into the table: \"{qualified}\""),
            arguments: insert_args(input(
                "objects",
                TypeRef::named_nn_list_nn(format!("{n}_insert_input")),
                Some("the rows to be inserted"),
            )),
            resolver: resolve::insert(model.clone(), index, false),
        });
        fields.push(RootField {
            name: format!("insert_{n}_one"),
            ty: TypeRef::named(n),
            description: format!("insert a single row into the table: \"{qualified}\""),
            arguments: insert_args(input(
                "object",
                TypeRef::named_nn(format!("{n}_insert_input")),
                Some("the row to be inserted"),
            )),
            resolver: resolve::insert(model.clone(), index, true),
        });
    }
    if can_update {
        fields.push(RootField {
            name: format!("update_{n}"),
            ty: TypeRef::named(&response),
            description: format!("update data of the table: \"{qualified}\""),
            arguments: update_args(input(
                "where",
                TypeRef::named_nn(format!("{n}_bool_exp")),
                Some("filter the rows which have to be updated"),
            )),
            resolver: resolve::update(model.clone(), index, false),
        });
    }
    if has_pk && can_delete {
        fields.push(RootField {
            name: format!("delete_{n}_by_pk"),
            ty: TypeRef::named(n),
            description: format!("delete single row from the table: \"{qualified}\""),
            arguments: pk_arguments(t),
            resolver: resolve::delete(model.clone(), index, true),
        });
    }
    if has_pk && can_update {
        fields.push(RootField {
            name: format!("update_{n}_by_pk"),
            ty: TypeRef::named(n),
            description: format!("update single row of the table: \"{qualified}\""),
            arguments: update_args(input(
                "pk_columns",
                TypeRef::named_nn(format!("{n}_pk_columns_input")),
                Some("the primary key of the row to update"),
            )),
            resolver: resolve::update(model.clone(), index, true),
        });
    }
    fields
}

fn object_field(root: RootField) -> Field {
    let mut field = Field::new(root.name, root.ty, root.resolver).description(root.description);
    for argument in root.arguments {
        field = field.argument(argument);
    }
    field
}

/// `subscription_root` mirrors `query_root` for the schema's sake; live queries never run
/// through these resolvers (the WebSocket handler runs the document against `query_root`).
fn subscription_field(root: RootField) -> SubscriptionField {
    let mut field = SubscriptionField::new(root.name, root.ty, |_| {
        SubscriptionFieldFuture::new(async {
            Err::<futures::stream::Empty<async_graphql::Result<Value>>, _>(
                async_graphql::Error::new("live queries are served over WebSocket"),
            )
        })
    })
    .description(root.description);
    for argument in root.arguments {
        field = field.argument(argument);
    }
    field
}

fn comparison_exp(scalar: &str) -> InputObject {
    let mut object = InputObject::new(format!("{scalar}_comparison_exp")).description(format!(
        "Boolean expression to compare columns of type \"{scalar}\". All fields are combined with logical 'AND'."
    ));
    let mut operators: Vec<&str> = COMPARISON_OPERATORS.to_vec();
    if scalar == "String" {
        operators.extend(STRING_OPERATORS);
    }
    operators.sort_unstable();
    for op in operators {
        let ty = match op {
            "_in" | "_nin" => TypeRef::named_nn_list(scalar),
            "_is_null" => TypeRef::named(TypeRef::BOOLEAN),
            _ => TypeRef::named(scalar),
        };
        object = object.field(InputValue::new(op, ty));
    }
    object
}

/// The types generated for one table.
fn table_types(model: &Arc<Model>, index: usize, builder: &mut Vec<TypeDef>) {
    let t = model.table(index);
    let n = &t.gql_name;
    let qualified = t.qualified_name();
    let mut columns: Vec<_> = t.select_columns();
    columns.sort_by(|a, b| a.name.cmp(&b.name));
    let insert_columns = sorted(t.insert_columns());
    let update_columns = sorted(t.update_columns()).filter(|c| !c.is_empty());

    // The object type: columns and relationships, alphabetically.
    enum Member<'a> {
        Column(&'a super::catalog::Column),
        Relationship(usize),
    }
    let mut members: Vec<(&str, Member<'_>)> = columns
        .iter()
        .map(|c| (c.name.as_str(), Member::Column(c)))
        .chain(
            t.relationships
                .iter()
                .enumerate()
                .map(|(i, r)| (r.name.as_str(), Member::Relationship(i))),
        )
        .collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    let mut object =
        Object::new(n).description(format!("columns and relationships of \"{qualified}\""));
    for (_, member) in members {
        object = object.field(match member {
            Member::Column(c) => {
                let ty = if c.nullable {
                    TypeRef::named(&c.scalar)
                } else {
                    TypeRef::named_nn(&c.scalar)
                };
                Field::new(&c.name, ty, resolve::column(c.name.clone()))
            }
            Member::Relationship(i) => {
                let rel = &t.relationships[i];
                let remote = &model.table(rel.remote).gql_name;
                match rel.kind {
                    RelationshipKind::Array => {
                        let mut field = Field::new(
                            &rel.name,
                            TypeRef::named_nn_list_nn(remote),
                            resolve::relationship(model.clone(), index, i),
                        )
                        .description("An array relationship");
                        for argument in select_arguments(model.table(rel.remote)) {
                            field = field.argument(argument);
                        }
                        field
                    }
                    RelationshipKind::Object => {
                        let ty = if rel.nullable {
                            TypeRef::named(remote)
                        } else {
                            TypeRef::named_nn(remote)
                        };
                        Field::new(
                            &rel.name,
                            ty,
                            resolve::relationship(model.clone(), index, i),
                        )
                        .description("An object relationship")
                    }
                }
            }
        });
    }
    builder.push(TypeDef::Object(object));

    // <t>_bool_exp
    let mut bool_exp = InputObject::new(format!("{n}_bool_exp")).description(format!(
        "Boolean expression to filter rows from the table \"{qualified}\". All fields are combined with a logical 'AND'."
    ));
    let mut filter_fields: Vec<(String, TypeRef)> = vec![
        (
            "_and".into(),
            TypeRef::named_nn_list(format!("{n}_bool_exp")),
        ),
        ("_not".into(), TypeRef::named(format!("{n}_bool_exp"))),
        (
            "_or".into(),
            TypeRef::named_nn_list(format!("{n}_bool_exp")),
        ),
    ];
    filter_fields.extend(columns.iter().map(|c| {
        (
            c.name.clone(),
            TypeRef::named(format!("{}_comparison_exp", c.scalar)),
        )
    }));
    filter_fields.extend(t.relationships.iter().map(|r| {
        (
            r.name.clone(),
            TypeRef::named(format!("{}_bool_exp", model.table(r.remote).gql_name)),
        )
    }));
    filter_fields.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, ty) in filter_fields {
        bool_exp = bool_exp.field(InputValue::new(name, ty));
    }
    builder.push(TypeDef::Input(bool_exp));

    // <t>_order_by: columns, and object relationships (array relationships order by
    // aggregates, which are left out).
    let mut order_by = InputObject::new(format!("{n}_order_by")).description(format!(
        "Ordering options when selecting data from \"{qualified}\"."
    ));
    let mut order_fields: Vec<(String, TypeRef)> = columns
        .iter()
        .map(|c| (c.name.clone(), TypeRef::named("order_by")))
        .collect();
    order_fields.extend(
        t.relationships
            .iter()
            .filter(|r| r.kind == RelationshipKind::Object)
            .map(|r| {
                (
                    r.name.clone(),
                    TypeRef::named(format!("{}_order_by", model.table(r.remote).gql_name)),
                )
            }),
    );
    order_fields.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, ty) in order_fields {
        order_by = order_by.field(InputValue::new(name, ty));
    }
    builder.push(TypeDef::Input(order_by));

    let column_enum = |list: &[&super::catalog::Column], name: String, description: String| {
        list.iter()
            .fold(Enum::new(name).description(description), |e, c| {
                e.item(EnumItem::new(&c.name).description("column name"))
            })
    };
    // `<t>_select_column` is left out with `distinct_on`, its only use.

    let scalar_input = |list: &[&super::catalog::Column],
                        name: String,
                        description: String,
                        only_numeric: bool| {
        list.iter()
            .filter(|c| !only_numeric || c.numeric)
            .fold(InputObject::new(name).description(description), |o, c| {
                o.field(InputValue::new(&c.name, TypeRef::named(&c.scalar)))
            })
    };
    if let Some(insert_columns) = insert_columns.as_deref().filter(|c| !c.is_empty()) {
        builder.push(TypeDef::Input(scalar_input(
            insert_columns,
            format!("{n}_insert_input"),
            format!("input type for inserting data into table \"{qualified}\""),
            false,
        )));
    }
    if let Some(update_columns) = update_columns.as_deref() {
        builder.push(TypeDef::Input(scalar_input(
            update_columns,
            format!("{n}_set_input"),
            format!("input type for updating data in table \"{qualified}\""),
            false,
        )));
        if update_columns.iter().any(|c| c.numeric) {
            builder.push(TypeDef::Input(scalar_input(
                update_columns,
                format!("{n}_inc_input"),
                format!("input type for incrementing numeric columns in table \"{qualified}\""),
                true,
            )));
        }
    }

    if t.pk_selectable() && update_columns.is_some() {
        let mut pk = InputObject::new(format!("{n}_pk_columns_input"))
            .description(format!("primary key columns input for table: {qualified}"));
        for argument in pk_arguments(t) {
            pk = pk.field(argument);
        }
        builder.push(TypeDef::Input(pk));
    }

    if let (false, Some(update_columns), Some(_)) = (
        t.unique_constraints.is_empty(),
        update_columns.as_deref(),
        insert_columns.as_ref(),
    ) {
        let constraint = t.unique_constraints.iter().fold(
            Enum::new(format!("{n}_constraint")).description(format!(
                "unique or primary key constraints on table \"{qualified}\""
            )),
            |e, c| e.item(EnumItem::new(c).description("unique or primary key constraint")),
        );
        builder.push(TypeDef::Enum(constraint));
        builder.push(TypeDef::Enum(column_enum(
            update_columns,
            format!("{n}_update_column"),
            format!("update columns of table \"{qualified}\""),
        )));
        let on_conflict = InputObject::new(format!("{n}_on_conflict"))
            .description(format!(
                "on_conflict condition type for table \"{qualified}\""
            ))
            .field(InputValue::new(
                "constraint",
                TypeRef::named_nn(format!("{n}_constraint")),
            ))
            .field(
                InputValue::new(
                    "update_columns",
                    TypeRef::named_nn_list_nn(format!("{n}_update_column")),
                )
                .default_value(Value::List(Vec::new())),
            )
            .field(InputValue::new(
                "where",
                TypeRef::named(format!("{n}_bool_exp")),
            ));
        builder.push(TypeDef::Input(on_conflict));
    }

    let response = Object::new(format!("{n}_mutation_response"))
        .description(format!(
            "response of any mutation on the table \"{qualified}\""
        ))
        .field(
            Field::new(
                "affected_rows",
                TypeRef::named_nn(TypeRef::INT),
                resolve::affected_rows(),
            )
            .description("number of rows affected by the mutation"),
        )
        .field(
            Field::new(
                "returning",
                TypeRef::named_nn_list_nn(n),
                resolve::returning(),
            )
            .description("data from the rows affected by the mutation"),
        );
    builder.push(TypeDef::Object(response));
}

fn sorted(list: Option<Vec<&super::catalog::Column>>) -> Option<Vec<&super::catalog::Column>> {
    list.map(|mut list| {
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    })
}

enum TypeDef {
    Object(Object),
    Input(InputObject),
    Enum(Enum),
}

/// Builds the schema for `model`.
pub(crate) fn build(model: &Arc<Model>) -> Result<Schema, SchemaError> {
    let mut types = Vec::new();
    for index in 0..model.tables.len() {
        table_types(model, index, &mut types);
    }

    let mut query_fields = Vec::new();
    let mut subscription_fields = Vec::new();
    let mut mutation_fields = Vec::new();
    for index in 0..model.tables.len() {
        query_fields.extend(select_root_fields(model, index));
        subscription_fields.extend(select_root_fields(model, index));
        mutation_fields.extend(mutation_root_fields(model, index));
    }
    for index in 0..model.functions.len() {
        let exposed_as = model.functions[index].exposed_as;
        let (field, args_input) = function_root_field(model, index);
        types.extend(args_input.map(TypeDef::Input));
        match exposed_as {
            ExposedAs::Mutation => mutation_fields.push(field),
            ExposedAs::Query => {
                subscription_fields.push(function_root_field(model, index).0);
                query_fields.push(field);
            }
        }
    }
    query_fields.sort_by(|a, b| a.name.cmp(&b.name));
    subscription_fields.sort_by(|a, b| a.name.cmp(&b.name));
    mutation_fields.sort_by(|a, b| a.name.cmp(&b.name));

    // A role that may read nothing gets Hasura's placeholder query root field; mutation and
    // subscription roots exist only with fields (a mutation is then "no mutations exist").
    let no_queries = query_fields.is_empty();
    let has_mutations = !mutation_fields.is_empty();
    let has_subscriptions = !subscription_fields.is_empty();
    let mut query_root = query_fields
        .into_iter()
        .fold(Object::new(QUERY_ROOT), |o, f| o.field(object_field(f)));
    if no_queries {
        query_root = query_root.field(Field::new(
            "no_queries_available",
            TypeRef::named_nn(TypeRef::STRING),
            |_| FieldFuture::from_value(Some(Value::from("There are no queries available to the current role. Either there are no sources or there are no tables tracked with the current role."))),
        ));
    }
    let mutation_root = mutation_fields
        .into_iter()
        .fold(Object::new(MUTATION_ROOT), |o, f| o.field(object_field(f)));
    let subscription_root = subscription_fields
        .into_iter()
        .fold(Subscription::new(SUBSCRIPTION_ROOT), |s, f| {
            s.field(subscription_field(f))
        });

    let column_scalars: BTreeSet<&str> = model
        .tables
        .iter()
        .flat_map(|t| t.columns.iter().map(|c| c.scalar.as_str()))
        .collect();
    // Like Hasura, only the scalars and comparison inputs the columns (and functions' arguments)
    // need: a type no field or argument reaches would be in the SDL but missing from
    // introspection.
    let argument_scalars = model
        .functions
        .iter()
        .flat_map(|f| f.arguments.iter().map(|a| a.scalar.as_str()));
    let scalars: BTreeSet<&str> = column_scalars
        .iter()
        .copied()
        .chain(argument_scalars)
        .filter(|s| !BUILT_IN_SCALARS.contains(s))
        .collect();
    let comparisons = &column_scalars;

    let order_by = ORDER_BY_VALUES.iter().fold(
        Enum::new("order_by").description("column ordering options"),
        |e, (value, description)| e.item(EnumItem::new(*value).description(*description)),
    );

    let mut builder = Schema::build(
        QUERY_ROOT,
        has_mutations.then_some(MUTATION_ROOT),
        has_subscriptions.then_some(SUBSCRIPTION_ROOT),
    )
    .register(query_root)
    .register(order_by);
    if has_mutations {
        builder = builder.register(mutation_root);
    }
    if has_subscriptions {
        builder = builder.register(subscription_root);
    }
    for scalar in scalars {
        let name = scalar.to_owned();
        builder = builder
            .register(Scalar::new(scalar).validator(move |value| scalar_accepts(&name, value)));
    }
    for scalar in comparisons.iter().copied() {
        builder = builder.register(comparison_exp(scalar));
    }
    for ty in types {
        builder = match ty {
            TypeDef::Object(o) => builder.register(o),
            TypeDef::Input(i) => builder.register(i),
            TypeDef::Enum(e) => builder.register(e),
        };
    }
    builder.finish()
}
