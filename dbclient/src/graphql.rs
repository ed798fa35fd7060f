//! What the generated operations refer to: Hasura's custom scalars (`custom_scalars_module`)
//! and the response shapes the operations decode into (`response_type`).
//!
//! Row selections decode straight into the domain types of [`crate::types`], whose serde
//! implementations validate every value (statuses, ids, inet text). graphql_client still checks
//! each document against `schema.graphql` at compile time; the integration tests check that each
//! selection decodes.

#![allow(non_camel_case_types)]

use serde::Deserialize;

use crate::types::{Image, Instance, InstanceId, InstanceWithMandelboxes, Mandelbox, MandelboxId};

/// Hasura `uuid`: `mandelboxes.id` (and `host_attestations.token_id`, a JWT id).
pub type uuid = MandelboxId;
/// Hasura `timestamptz`: RFC 3339 with any offset (`2022-01-18T12:58:16.95204+00:00`).
pub type timestamptz = chrono::DateTime<chrono::Utc>;
/// Hasura `inet`, as sent in variables: the plain address.
pub type inet = std::net::IpAddr;
/// Hasura `bigint`.
pub type bigint = i64;

/// `whist_*_mutation_response { affected_rows }`.
#[derive(Debug, Clone, Deserialize)]
pub struct Affected {
    pub affected_rows: i64,
}

/// `whist_*_mutation_response { affected_rows returning { ... } }`.
#[derive(Debug, Clone, Deserialize)]
pub struct Returning<T> {
    pub affected_rows: i64,
    pub returning: Vec<T>,
}

/// `{ id }` of a deleted instance.
#[derive(Debug, Clone, Deserialize)]
pub struct InstanceKey {
    pub id: InstanceId,
}

/// `{ id }` of a deleted mandelbox.
#[derive(Debug, Clone, Deserialize)]
pub struct MandelboxKey {
    pub id: MandelboxId,
}

// `response_type` takes a path; these name the generic shapes.
pub type ReturningInstances = Returning<Instance>;
pub type ReturningMandelboxes = Returning<Mandelbox>;
pub type ReturningMandelboxKeys = Returning<MandelboxKey>;
pub type InstanceRow = Instance;
pub type InstanceWithMandelboxesRow = InstanceWithMandelboxes;
pub type MandelboxRow = Mandelbox;
pub type ImageRow = Image;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    /// Every operation document, by file name.
    const DOCUMENTS: [(&str, &str); 4] = [
        ("instances", include_str!("../graphql/instances.graphql")),
        (
            "mandelboxes",
            include_str!("../graphql/mandelboxes.graphql"),
        ),
        ("images", include_str!("../graphql/images.graphql")),
        (
            "subscriptions",
            include_str!("../graphql/subscriptions.graphql"),
        ),
    ];

    /// `fragment Name on type { ... }` blocks of a document, by name.
    fn fragments(document: &str) -> BTreeMap<String, String> {
        let mut found = BTreeMap::new();
        let mut rest = document;
        while let Some(start) = rest.find("\nfragment ") {
            let text = &rest[start + 1..];
            let name = text["fragment ".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            let mut depth = 0usize;
            let mut end = 0;
            for (index, c) in text.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = index + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            found.insert(name, text[..end].to_owned());
            rest = &text[end..];
        }
        found
    }

    #[test]
    fn fragment_copies_are_identical_in_every_document() {
        let mut canonical: BTreeMap<String, (&str, String)> = BTreeMap::new();
        for (file, document) in DOCUMENTS {
            for (name, body) in fragments(document) {
                match canonical.get(&name) {
                    Some((first_file, first)) => assert_eq!(
                        &body, first,
                        "fragment {name} differs between {first_file} and {file}"
                    ),
                    None => {
                        canonical.insert(name, (file, body));
                    }
                }
            }
        }
        let names: Vec<_> = canonical.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "ImageFields",
                "InstanceFields",
                "InstanceWithMandelboxesFields",
                "MandelboxFields"
            ]
        );
    }

    #[test]
    fn row_fragments_select_every_column_of_the_domain_types() {
        // The selections decode into `types::*`, which require these fields.
        let all = fragments(DOCUMENTS[3].1);
        let fields = |name: &str| -> Vec<String> {
            all[name]
                .lines()
                .skip(1)
                .map(str::trim)
                .filter(|line| !line.is_empty() && *line != "}")
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            fields("InstanceFields"),
            [
                "id",
                "provider",
                "region",
                "image_id",
                "client_sha",
                "ip_addr",
                "instance_type",
                "remaining_capacity",
                "status",
                "created_at",
                "updated_at",
                "tls_fingerprint"
            ]
        );
        assert_eq!(
            fields("MandelboxFields"),
            [
                "id",
                "app",
                "instance_id",
                "user_id",
                "session_id",
                "status",
                "created_at",
                "updated_at"
            ]
        );
        assert_eq!(
            fields("ImageFields"),
            ["provider", "region", "image_id", "client_sha", "updated_at"]
        );
    }
}
