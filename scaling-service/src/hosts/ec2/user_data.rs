//! The user data: `host-setup/ec2_userdata.sh` with its placeholders filled, checked, and
//! encoded as RunInstances expects it.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::config::{AdminSecret, Ec2ConfigError, HostServiceSettings};

/// The user data template (see its header for the placeholder contract).
pub(super) const USER_DATA_TEMPLATE: &str = include_str!("../../../../host-setup/ec2_userdata.sh");
/// EC2 refuses user data over 16 KiB (before base64).
pub(super) const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// The template's values: every placeholder of `host-setup/ec2_userdata.sh`, optional ones empty.
pub(super) fn user_data_values(
    environment: &str,
    settings: &HostServiceSettings,
    allow_http: bool,
) -> Result<BTreeMap<String, String>, Ec2ConfigError> {
    let (ssm_parameter, inline_secret) = match &settings.admin_secret {
        AdminSecret::SsmParameter(name) => (name.clone(), String::new()),
        AdminSecret::Inline(secret) => (String::new(), secret.clone()),
    };
    if ssm_parameter.is_empty() && inline_secret.is_empty() {
        return Err(Ec2ConfigError::UserDataValue {
            name: "HASURA_ADMIN_SECRET".to_owned(),
            reason: "neither an SSM parameter nor a secret is set",
        });
    }
    let url = &settings.hasura_graphql_url;
    let secure = url.starts_with("https://");
    if !(secure || allow_http && url.starts_with("http://")) {
        return Err(Ec2ConfigError::UserDataValue {
            name: "HASURA_GRAPHQL_URL".to_owned(),
            reason: "must be an https:// URL",
        });
    }
    let mut values: BTreeMap<String, String> = settings.extra.clone();
    values.extend(
        [
            ("APP_ENV", environment.to_owned()),
            ("HASURA_GRAPHQL_URL", settings.hasura_graphql_url.clone()),
            ("HASURA_ADMIN_SECRET_SSM_PARAMETER", ssm_parameter),
            ("HASURA_ADMIN_SECRET", inline_secret),
            (
                "SENTRY_DSN",
                settings.sentry_dsn.clone().unwrap_or_default(),
            ),
            (
                "WHIST_IMAGE_REGISTRY",
                settings.image_registry.clone().unwrap_or_default(),
            ),
            ("WHIST_LOG", settings.log_filter.clone().unwrap_or_default()),
            (
                "WHIST_OPS_ADDR",
                settings.ops_addr.clone().unwrap_or_default(),
            ),
            (
                "WHIST_OPS_ALLOW",
                settings.ops_allow.clone().unwrap_or_default(),
            ),
        ]
        .map(|(name, value)| (name.to_owned(), value)),
    );
    for (name, value) in &values {
        // The template puts each value between single quotes in a shell script run as root.
        if value.contains('\'') {
            return Err(Ec2ConfigError::UserDataValue {
                name: name.clone(),
                reason: "contains a single quote",
            });
        }
        if value.chars().any(char::is_control) {
            return Err(Ec2ConfigError::UserDataValue {
                name: name.clone(),
                reason: "contains a newline or another control character",
            });
        }
        if value.contains("{{") {
            return Err(Ec2ConfigError::UserDataValue {
                name: name.clone(),
                reason: "contains a template placeholder",
            });
        }
    }
    Ok(values)
}

/// Replaces every `{{NAME}}` with its value; a placeholder without a value is an error, so a
/// template change cannot ship a host that refuses to start.
pub(super) fn render_user_data(
    template: &str,
    values: &BTreeMap<String, String>,
) -> Result<String, Ec2ConfigError> {
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        rendered.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(Ec2ConfigError::UserDataPlaceholder {
                name: after.chars().take(40).collect(),
            });
        };
        let name = &after[..end];
        let value = values
            .get(name)
            .ok_or_else(|| Ec2ConfigError::UserDataPlaceholder {
                name: name.to_owned(),
            })?;
        rendered.push_str(value);
        rest = &after[end + 2..];
    }
    rendered.push_str(rest);
    Ok(rendered)
}

/// Standard base64 with padding (RFC 4648 §4), as RunInstances expects `UserData`.
pub(super) fn base64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HostServiceSettings {
        HostServiceSettings {
            hasura_graphql_url: "https://hasura.example/v1/graphql".to_owned(),
            admin_secret: AdminSecret::SsmParameter("/whist/dev/hasura".to_owned()),
            sentry_dsn: None,
            image_registry: None,
            log_filter: Some("info".to_owned()),
            ops_addr: Some("PRIVATE_IP:4679".to_owned()),
            ops_allow: Some("10.20.0.0/16".to_owned()),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn base64_of_every_byte_value_matches_a_known_encoding() {
        // Python's `base64.b64encode(bytes(range(256)))`: the `+`, `/` and `=` of the standard
        // alphabet, which is what RunInstances decodes.
        let known = concat!(
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7",
            "PD0+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3",
            "eHl6e3x9fn+AgYKDhIWGh4iJiouMjY6PkJGSk5SVlpeYmZqbnJ2en6ChoqOkpaanqKmqq6ytrq+wsbKz",
            "tLW2t7i5uru8vb6/wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbX2Nna29zd3t/g4eLj5OXm5+jp6uvs7e7v",
            "8PHy8/T19vf4+fr7/P3+/w==",
        );
        let every_byte: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_encode(&every_byte), known);
    }

    #[test]
    fn real_template_renders_with_no_placeholder_left() {
        let values = user_data_values("dev", &settings(), false).unwrap();
        let rendered = render_user_data(USER_DATA_TEMPLATE, &values).unwrap();
        assert!(!rendered.contains("{{"), "placeholder left in user data");
        assert!(rendered.contains("APP_ENV='dev'"));
        assert!(rendered.contains("HASURA_ADMIN_SECRET_SSM_PARAMETER='/whist/dev/hasura'"));
        assert!(rendered.contains("HASURA_ADMIN_SECRET=''"));
        assert!(rendered.len() <= MAX_USER_DATA_BYTES);
    }

    #[test]
    fn unknown_placeholder_is_refused_by_name() {
        let values = user_data_values("dev", &settings(), false).unwrap();
        let error = render_user_data("X='{{NEW_THING}}'", &values).unwrap_err();
        assert!(error.to_string().contains("{{NEW_THING}}"), "{error}");
    }

    #[test]
    fn values_that_break_shell_quoting_are_refused() {
        let mut bad = settings();
        bad.log_filter = Some("info' ; rm -rf / ; '".to_owned());
        assert!(matches!(
            user_data_values("dev", &bad, false),
            Err(Ec2ConfigError::UserDataValue { name, .. }) if name == "WHIST_LOG"
        ));
        let mut bad = settings();
        bad.sentry_dsn = Some("a\nb".to_owned());
        assert!(user_data_values("dev", &bad, false).is_err());
    }
}
