//! `POST /mandelbox/assign`'s wire types, once for the scaling service that answers and the
//! clients that ask (whist-client, devstack's load and chaos tests), so the two cannot drift.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A client asking for a mandelbox. Unknown fields are refused: a misspelt field is a client
/// bug the client should hear about, not a default silently applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// Regions by the client's measured proximity, closest first.
    pub regions: Vec<String>,
    pub client_commit_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// For logs only (never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The app to run, e.g. `chrome` (the default when absent); one of the apps the deployment
    /// runs (the scaling service's `WHIST_ALLOWED_APPS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

impl AssignRequest {
    /// A request for a new session: `session_id` is the time in milliseconds since the epoch,
    /// as the client app makes it.
    pub fn new(
        regions: Vec<String>,
        client_commit_hash: String,
        user_email: Option<String>,
    ) -> Self {
        Self {
            regions,
            client_commit_hash,
            session_id: Some(new_session_id()),
            user_email,
            version: None,
            app: None,
        }
    }
}

/// Milliseconds since the epoch, as text.
pub fn new_session_id() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
        .to_string()
}

/// The `200` answer. `Id` is the mandelbox id's type: the scaling service's validated
/// `MandelboxId`, a plain UUID for clients (edge links no database types).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment<Id = uuid::Uuid> {
    pub ip: IpAddr,
    pub mandelbox_id: Id,
    /// The host's `whist.instances.tls_fingerprint`: SHA-256 of its json_transport certificate
    /// (64 lowercase hex digits), for the client to pin. Always set in answers of this service
    /// (hosts without one are not assigned); optional for readers of older answers.
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_round_trip_and_refuse_unknown_fields() {
        let r = AssignRequest::new(vec!["us-east-1".into()], "abc".into(), None);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("user_email").is_none() && v.get("version").is_none());
        assert_eq!(serde_json::from_value::<AssignRequest>(v).unwrap(), r);
        let typo = json!({"regions": [], "client_commit_hash": "x", "sesion_id": "1"});
        assert!(serde_json::from_value::<AssignRequest>(typo).is_err());
    }
}
