//! Domain types for the `whist` tables: validated identifiers, the two status vocabularies and
//! the rows as Hasura returns them.
//!
//! Every type here is parsed once, at the boundary: deserializing a row whose status is not one
//! of the known values, whose mandelbox id is not a UUID or whose `ip_addr` is not Postgres
//! `inet` text fails, instead of handing a half-valid row to the services.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A value that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("unknown {what} {value:?}, expected one of {expected}")]
    UnknownVariant {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// Longest input echoed back in a [`ParseError`], so a garbage payload cannot flood a log line.
const MAX_ECHOED_VALUE_CHARS: usize = 80;

fn echo(value: &str) -> String {
    value.chars().take(MAX_ECHOED_VALUE_CHARS).collect()
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> ParseError {
    ParseError::Invalid {
        what,
        value: echo(value),
        reason,
    }
}

/// Defines a validated string newtype: `TryFrom<String>`, `FromStr`, serde through the validator,
/// `Display`, `AsRef<str>`.
macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $what:literal, $validate:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What this identifies, for error messages.
            pub const WHAT: &'static str = $what;

            /// Validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, ParseError> {
                let value = value.into();
                $validate(&value).map_err(|reason| invalid($what, &value, reason))?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ParseError;
            fn try_from(value: String) -> Result<Self, ParseError> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ParseError;
            fn try_from(value: &str) -> Result<Self, ParseError> {
                Self::new(value)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(value: &str) -> Result<Self, ParseError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// Longest instance id accepted. EC2 ids are 19 characters; local stacks use host names.
const MAX_INSTANCE_ID_LEN: usize = 64;

fn validate_instance_id(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > MAX_INSTANCE_ID_LEN {
        return Err("longer than 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// Longest region name accepted (`ap-southeast-2` is 14).
const MAX_REGION_LEN: usize = 32;

fn validate_region(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > MAX_REGION_LEN {
        return Err("longer than 32 characters");
    }
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lower-case letter");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case ASCII letters, digits and '-' are allowed");
    }
    Ok(())
}

/// Longest user id accepted (a JWT subject or an e-mail address).
const MAX_USER_ID_LEN: usize = 256;

fn validate_user_id(value: &str) -> Result<(), &'static str> {
    if value.trim().is_empty() {
        return Err("must not be empty");
    }
    if value.len() > MAX_USER_ID_LEN {
        return Err("longer than 256 bytes");
    }
    if value.trim() != value {
        return Err("must not start or end with whitespace");
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

/// Longest image id accepted (`ami-` ids are 21 characters).
const MAX_IMAGE_ID_LEN: usize = 128;

fn validate_image_id(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > MAX_IMAGE_ID_LEN {
        return Err("longer than 128 characters");
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    Ok(())
}

string_newtype!(
    /// A cloud instance id (the `whist.instances` primary key), e.g. `i-0a1b2c3d4e5f67890`.
    InstanceId,
    "instance id",
    validate_instance_id
);
string_newtype!(
    /// A cloud region, e.g. `us-east-1`.
    Region,
    "region",
    validate_region
);
string_newtype!(
    /// The user a mandelbox was assigned to (the JWT subject).
    UserId,
    "user id",
    validate_user_id
);
string_newtype!(
    /// A machine image id, e.g. `ami-0123456789abcdef0`.
    ImageId,
    "image id",
    validate_image_id
);

/// A mandelbox id: the `uuid` primary key of `whist.mandelboxes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MandelboxId(uuid::Uuid);

impl MandelboxId {
    pub const WHAT: &'static str = "mandelbox id";

    /// A fresh random (v4) id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl From<uuid::Uuid> for MandelboxId {
    fn from(value: uuid::Uuid) -> Self {
        Self(value)
    }
}

impl FromStr for MandelboxId {
    type Err = ParseError;
    fn from_str(value: &str) -> Result<Self, ParseError> {
        uuid::Uuid::parse_str(value)
            .map(Self)
            .map_err(|_| invalid(Self::WHAT, value, "not a UUID"))
    }
}

impl fmt::Display for MandelboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hyphenated lower case: what Postgres prints for `uuid`.
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// Defines a status enum that (de)serializes as the SCREAMING_CASE text stored in the database
/// and rejects every other value.
macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every status, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(value: &str) -> Result<Self, ParseError> {
                match value {
                    $($text => Ok($name::$variant),)+
                    other => Err(ParseError::UnknownVariant {
                        what: $what,
                        value: echo(other),
                        expected: concat!($($text, " "),+),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_enum!(
    /// Lifecycle of a host: launched (row inserted by the scaling service), registered by its
    /// host service, then drained before termination (the row is deleted when it is gone).
    InstanceStatus,
    "instance status",
    {
        PreConnection => "PRE_CONNECTION",
        Active => "ACTIVE",
        Draining => "DRAINING",
    }
);

status_enum!(
    /// Lifecycle of a mandelbox (the row is deleted when it is gone).
    MandelboxStatus,
    "mandelbox status",
    {
        Waiting => "WAITING",
        Allocated => "ALLOCATED",
        Connecting => "CONNECTING",
        Running => "RUNNING",
        Dying => "DYING",
    }
);

/// Parses Postgres `inet` text: an address, optionally with a `/prefix` (`10.0.0.1`,
/// `10.0.0.1/32`, `10.0.0.0/24`, `::1/128`). The address part is returned; a host's own address
/// is all the services store here.
pub fn parse_inet(text: &str) -> Result<IpAddr, ParseError> {
    const WHAT: &str = "inet address";
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| invalid(WHAT, text, "not an IPv4 or IPv6 address"))?;
    if let Some(prefix) = prefix {
        let bits: u8 = prefix
            .parse()
            .map_err(|_| invalid(WHAT, text, "the prefix length is not a number"))?;
        let max_bits = if address.is_ipv4() { 32 } else { 128 };
        if bits > max_bits {
            return Err(invalid(WHAT, text, "the prefix length is too long"));
        }
    }
    Ok(address)
}

/// serde for `Option<IpAddr>` columns of type `inet`.
pub(crate) mod inet_serde {
    use std::net::IpAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::parse_inet(&text).map_err(serde::de::Error::custom))
            .transpose()
    }

    pub fn serialize<S: Serializer>(value: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(address) => s.collect_str(address),
            None => s.serialize_none(),
        }
    }
}

/// A row of `whist.instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub provider: String,
    pub region: Region,
    pub image_id: ImageId,
    /// The commit of the host service this instance runs (checked by the host at registration).
    pub client_sha: String,
    /// The host's public address, set at registration.
    #[serde(with = "inet_serde", default)]
    pub ip_addr: Option<IpAddr>,
    pub instance_type: String,
    /// How many more mandelboxes fit (a CHECK keeps it `>= 0`).
    pub remaining_capacity: u32,
    pub status: InstanceStatus,
    pub created_at: DateTime<Utc>,
    /// Touched by every update (a trigger) and by [`crate::DbClient::heartbeat`].
    pub updated_at: DateTime<Utc>,
    /// SHA-256 of the host's json_transport certificate (64 lowercase hex digits), published
    /// by the host right after it registers; `None` until then. Clients pin it.
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
}

/// An instance with its mandelboxes (Hasura's `mandelboxes` array relationship), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceWithMandelboxes {
    #[serde(flatten)]
    pub instance: Instance,
    pub mandelboxes: Vec<Mandelbox>,
}

/// A row of `whist.mandelboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mandelbox {
    pub id: MandelboxId,
    pub app: String,
    pub instance_id: InstanceId,
    pub user_id: Option<UserId>,
    pub session_id: Option<String>,
    pub status: MandelboxStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A row of `whist.images`: the current host image for a provider and region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub provider: String,
    pub region: Region,
    pub image_id: ImageId,
    /// The commit of the host service baked into the image.
    pub client_sha: String,
    pub updated_at: DateTime<Utc>,
}

/// An instance row to insert (timestamps come from the database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInstance {
    pub id: InstanceId,
    pub provider: String,
    pub region: Region,
    pub image_id: ImageId,
    pub client_sha: String,
    pub ip_addr: Option<IpAddr>,
    pub instance_type: String,
    pub remaining_capacity: u32,
    pub status: InstanceStatus,
}

/// A mandelbox row to insert (timestamps come from the database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMandelbox {
    pub id: MandelboxId,
    pub app: String,
    pub instance_id: InstanceId,
    pub user_id: Option<UserId>,
    pub session_id: Option<String>,
    pub status: MandelboxStatus,
}

/// What a host reports when it registers its `PRE_CONNECTION` row (see
/// [`crate::DbClient::register_instance`]). The image, region and type must match the row the
/// scaling service inserted; checking `client_sha` against the host's own commit is the host's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub ip_addr: IpAddr,
    pub image_id: ImageId,
    pub region: Region,
    pub instance_type: String,
    pub remaining_capacity: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_status_round_trips_every_known_value() {
        for status in InstanceStatus::ALL {
            let text = serde_json::to_string(status).unwrap();
            assert_eq!(text, format!("\"{}\"", status.as_str()));
            assert_eq!(
                serde_json::from_str::<InstanceStatus>(&text).unwrap(),
                *status
            );
            assert_eq!(status.as_str().parse::<InstanceStatus>().unwrap(), *status);
        }
        assert_eq!(InstanceStatus::PreConnection.as_str(), "PRE_CONNECTION");
    }

    #[test]
    fn mandelbox_status_round_trips_every_known_value() {
        for status in MandelboxStatus::ALL {
            let text = serde_json::to_string(status).unwrap();
            assert_eq!(
                serde_json::from_str::<MandelboxStatus>(&text).unwrap(),
                *status
            );
            assert_eq!(status.as_str().parse::<MandelboxStatus>().unwrap(), *status);
        }
    }

    #[test]
    fn status_parsing_rejects_unknown_values() {
        for bad in [
            "",
            "active",
            "Active",
            "EXITED",
            "ACTIVE ",
            "PRE-CONNECTION",
        ] {
            assert!(bad.parse::<InstanceStatus>().is_err(), "{bad:?}");
            assert!(
                serde_json::from_value::<InstanceStatus>(bad.into()).is_err(),
                "{bad:?}"
            );
        }
        for bad in ["", "allocated", "EXITED", "RUNNING\n", "STOPPED"] {
            assert!(bad.parse::<MandelboxStatus>().is_err(), "{bad:?}");
            assert!(
                serde_json::from_value::<MandelboxStatus>(bad.into()).is_err(),
                "{bad:?}"
            );
        }
        let err = "EXITED".parse::<MandelboxStatus>().unwrap_err();
        assert!(err.to_string().contains("ALLOCATED"), "{err}");
    }

    #[test]
    fn inet_text_parses_with_and_without_prefix() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(parse_inet("10.0.0.1").unwrap(), v4);
        assert_eq!(parse_inet("10.0.0.1/32").unwrap(), v4);
        assert_eq!(
            parse_inet("10.0.0.0/24").unwrap(),
            "10.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(parse_inet("::1").unwrap(), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            parse_inet("2001:db8::1/128").unwrap(),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_inet("2001:db8::/64").unwrap(),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn inet_text_rejects_garbage() {
        for bad in [
            "",
            "/",
            "10.0.0",
            "10.0.0.1/",
            "10.0.0.1/33",
            "::1/129",
            "10.0.0.1/x",
            "host",
            "10.0.0.1 ",
            "10.0.0.1/24/1",
        ] {
            assert!(parse_inet(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identifiers_are_validated() {
        assert!(InstanceId::new("i-0a1b2c3d4e5f67890").is_ok());
        assert!(InstanceId::new("").is_err());
        assert!(InstanceId::new("i 1").is_err());
        assert!(InstanceId::new("x".repeat(65)).is_err());
        assert!(Region::new("us-east-1").is_ok());
        assert!(Region::new("US-EAST-1").is_err());
        assert!(Region::new("1us").is_err());
        assert!(Region::new("").is_err());
        assert!(UserId::new("google-oauth2|1234").is_ok());
        assert!(UserId::new(" ").is_err());
        assert!(UserId::new("a\nb").is_err());
        assert!(ImageId::new("ami-0123456789abcdef0").is_ok());
        assert!(ImageId::new("ami 1").is_err());
        assert!("not-a-uuid".parse::<MandelboxId>().is_err());
        let id = MandelboxId::random();
        assert_eq!(id.to_string().parse::<MandelboxId>().unwrap(), id);
        // serde goes through the same validation.
        assert!(serde_json::from_str::<InstanceId>("\"\"").is_err());
        assert!(serde_json::from_str::<MandelboxId>("\"nope\"").is_err());
    }

    #[test]
    fn parse_errors_do_not_echo_unbounded_input() {
        let err = ImageId::new(format!("{} ", "a".repeat(10_000))).unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }

    fn instance_json(status: &str, ip: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "id": "i-0a1b2c3d4e5f67890",
            "provider": "AWS",
            "region": "us-east-1",
            "image_id": "ami-0123456789abcdef0",
            "client_sha": "abc123",
            "ip_addr": ip,
            "instance_type": "g4dn.2xlarge",
            "remaining_capacity": 3,
            "status": status,
            "created_at": "2022-01-18T12:58:16.95204+00:00",
            "updated_at": "2016-07-20T09:30:00+00:00",
            "mandelboxes": [{
                "id": "5ccdb471-8ab2-4441-a3d1-f7f7146dda0c",
                "app": "CHROME",
                "instance_id": "i-0a1b2c3d4e5f67890",
                "user_id": null,
                "session_id": "1234",
                "status": "ALLOCATED",
                "created_at": "2022-01-18T12:58:16.876285+00:00",
                "updated_at": "2022-01-18T14:58:16.876285+02:00"
            }]
        })
    }

    #[test]
    fn hasura_instance_rows_decode() {
        let row: InstanceWithMandelboxes =
            serde_json::from_value(instance_json("ACTIVE", "10.1.2.3/32".into())).unwrap();
        assert_eq!(row.instance.status, InstanceStatus::Active);
        assert_eq!(row.instance.ip_addr, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(
            row.instance.created_at.to_rfc3339(),
            "2022-01-18T12:58:16.952040+00:00"
        );
        assert_eq!(row.mandelboxes.len(), 1);
        // Any offset is accepted and normalised to UTC.
        assert_eq!(row.mandelboxes[0].created_at, row.mandelboxes[0].updated_at);
        let no_ip: InstanceWithMandelboxes =
            serde_json::from_value(instance_json("DRAINING", serde_json::Value::Null)).unwrap();
        assert_eq!(no_ip.instance.ip_addr, None);
    }

    #[test]
    fn hasura_rows_with_unknown_status_or_bad_inet_fail_to_decode() {
        assert!(
            serde_json::from_value::<InstanceWithMandelboxes>(instance_json(
                "TERMINATED",
                "10.1.2.3".into()
            ))
            .is_err()
        );
        assert!(
            serde_json::from_value::<InstanceWithMandelboxes>(instance_json(
                "ACTIVE",
                "10.1.2".into()
            ))
            .is_err()
        );
        let mut negative = instance_json("ACTIVE", "10.1.2.3".into());
        negative["remaining_capacity"] = (-1).into();
        assert!(serde_json::from_value::<Instance>(negative).is_err());
    }

    #[test]
    fn instance_serializes_ip_as_plain_text() {
        let row: Instance =
            serde_json::from_value(instance_json("ACTIVE", "10.1.2.3/32".into())).unwrap();
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["ip_addr"], "10.1.2.3");
        assert_eq!(json["status"], "ACTIVE");
        assert_eq!(serde_json::from_value::<Instance>(json).unwrap(), row);
    }
}

/// Hostile subscription payloads: whatever a server sends, decoding answers `Ok` or `Err` and
/// never panics, and a row is accepted only with a known status.
#[cfg(test)]
mod payload_properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("id".to_owned()),
                        Just("status".to_owned()),
                        Just("mandelboxes".to_owned()),
                        Just("ip_addr".to_owned()),
                        ".{0,12}",
                    ],
                    inner,
                    0..12
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn mandelbox(status: &str, id: &str) -> Value {
        json!({
            "id": id,
            "app": "CHROME",
            "instance_id": "i-0a1b2c3d4e5f67890",
            "user_id": "u",
            "session_id": null,
            "status": status,
            "created_at": "2022-01-18T12:58:16.876285+00:00",
            "updated_at": "2022-01-18T12:58:16+00:00"
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_payloads_never_panic(payload in any_json()) {
            let _ = serde_json::from_value::<Vec<Mandelbox>>(payload.clone());
            let _ = serde_json::from_value::<Option<InstanceWithMandelboxes>>(payload.clone());
            let _ = serde_json::from_value::<Vec<Image>>(payload);
        }

        #[test]
        fn rows_are_accepted_only_with_a_known_status_and_a_uuid(
            status in prop_oneof![
                Just("ALLOCATED".to_owned()),
                Just("RUNNING".to_owned()),
                ".{0,12}",
            ],
            id in prop_oneof![
                Just("5ccdb471-8ab2-4441-a3d1-f7f7146dda0c".to_owned()),
                ".{0,40}",
            ],
        ) {
            let decoded = serde_json::from_value::<Mandelbox>(mandelbox(&status, &id));
            let known = status.parse::<MandelboxStatus>().is_ok();
            let uuid = id.parse::<uuid::Uuid>().is_ok();
            prop_assert_eq!(decoded.is_ok(), known && uuid, "{:?}", decoded);
        }
    }
}
