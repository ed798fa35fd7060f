//! What the client talks to, what one session does, and the access token it sends.

use std::fmt;
use std::time::Duration;

use serde_json::json;

use super::{
    CONNECT_TIMEOUT, ClientError, DEFAULT_SCALING_URL, FIRST_LINE_TIMEOUT, JSON_TRANSPORT_PORT,
    JSON_TRANSPORT_TIMEOUT, LOCAL_DEV_COMMIT, MAX_TOKEN_BYTES, REQUEST_TIMEOUT,
};

/// A bearer token. `Debug` never shows it and it has no `Display`: only
/// [`AccessToken::expose`] gives the text, for the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    /// Checks what a header value needs: 1 to 16 KiB of visible ASCII.
    pub fn new(token: impl Into<String>) -> Result<Self, ClientError> {
        let token = token.into().trim().to_owned();
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ClientError::Invalid {
                what: "access token",
                reason: format!("1 to {MAX_TOKEN_BYTES} bytes expected"),
            });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Invalid {
                what: "access token",
                reason: "visible ASCII characters only".to_owned(),
            });
        }
        Ok(Self(token))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// What the client talks to, and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The scaling service, e.g. [`DEFAULT_SCALING_URL`].
    pub scaling_url: String,
    /// devstack's control API (`WHIST_DEVSTACK_CONTROL_URL`); needed for [`Client::token`].
    pub control_url: Option<String>,
    /// Regions by proximity, closest first.
    pub regions: Vec<String>,
    /// The client's commit hash ([`LOCAL_DEV_COMMIT`] locally).
    pub commit: String,
    /// The hosts' json_transport port ([`JSON_TRANSPORT_PORT`]; tests change it).
    pub json_transport_port: u16,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub json_transport_timeout: Duration,
    pub first_line_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            scaling_url: DEFAULT_SCALING_URL.to_owned(),
            control_url: None,
            regions: vec!["us-east-1".to_owned()],
            commit: LOCAL_DEV_COMMIT.to_owned(),
            json_transport_port: JSON_TRANSPORT_PORT,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            json_transport_timeout: JSON_TRANSPORT_TIMEOUT,
            first_line_timeout: FIRST_LINE_TIMEOUT,
        }
    }
}

/// One session's parameters for [`Client::run_session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub user_id: String,
    /// Use this token instead of asking devstack for one.
    pub token: Option<AccessToken>,
    pub user_email: Option<String>,
    /// The settings sent as `json_data` (the text of a JSON object).
    pub json_data: String,
    /// Keep the connection to the mandelbox open this long before leaving.
    pub hold: Option<Duration>,
    /// Retry `NO_INSTANCE_AVAILABLE` until this much time has passed.
    pub wait_for_capacity: Option<Duration>,
    /// `config_encryption_token`: the key of the user's saved browser profile (the client app
    /// keeps one per user). `None`: not sent, the session gets an empty profile.
    pub config_token: Option<String>,
    /// `is_new_config_encryption_token`: start from an empty profile.
    pub new_config_token: bool,
}

impl SessionOptions {
    pub fn new(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            token: None,
            user_email: None,
            json_data: default_json_data(),
            hold: None,
            wait_for_capacity: None,
            config_token: None,
            new_config_token: false,
        }
    }
}

/// A random user id, `local-user-` and 12 hex digits.
pub fn random_user_id() -> String {
    let n: u64 = rand::random();
    format!("local-user-{:012x}", n & 0xffff_ffff_ffff)
}

/// Settings like those the client app sends (the keys the mandelbox's scripts read,
/// `reference/host-service.md` §2.3).
pub fn default_json_data() -> String {
    json!({
        "dark_mode": false,
        "desired_timezone": "Etc/UTC",
        "client_dpi": 192,
        "restore_last_session": false,
        "initial_key_repeat": 300,
        "key_repeat": 30,
        "initial_url": "https://www.whist.com",
        "user_agent": concat!("whist-client/", env!("CARGO_PKG_VERSION")),
        "local_client": true,
    })
    .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_show_and_must_be_header_safe() {
        let t = AccessToken::new("eyJhbGciOi.secret.sig").unwrap();
        assert_eq!(t.expose(), "eyJhbGciOi.secret.sig");
        assert!(!format!("{t:?}").contains("secret"));
        assert!(AccessToken::new("").is_err());
        assert!(AccessToken::new("a b").is_err());
        assert!(AccessToken::new("a\nb").is_err());
    }

    #[test]
    fn random_user_ids_are_local_and_distinct() {
        let a = random_user_id();
        assert!(a.starts_with("local-user-") && a.len() == "local-user-".len() + 12);
        assert_ne!(a, random_user_id());
    }
}
