//! `PUT /json_transport`'s `200` answer, once for the host that writes it and the clients that
//! read it (whist-client; the scaling service relays it untouched).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// `PUT /json_transport`'s `200` body, `{"result": {"port_N": P, ..., "private_key": K}}`.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonTransportAnswer {
    /// Host port by mandelbox port (32261, 32262, 32263/udp, 32273).
    pub ports: BTreeMap<u16, u16>,
    /// The stream's key (`private_key`, or `aes_key` from older hosts); `Debug` hides it.
    pub private_key: Option<String>,
}

impl std::fmt::Debug for JsonTransportAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonTransportAnswer")
            .field("ports", &self.ports)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl JsonTransportAnswer {
    /// Parses the `200` body; every `port_N` key must be a port number with a port value.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let result = value
            .get("result")
            .and_then(Value::as_object)
            .ok_or("no \"result\" object")?;
        let mut ports = BTreeMap::new();
        for (key, value) in result {
            let Some(port) = key.strip_prefix("port_") else {
                continue;
            };
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{key}: not a port number"))?;
            let host_port = value
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{key}: {value} is not a port"))?;
            ports.insert(port, host_port);
        }
        if ports.is_empty() {
            return Err("no port_N in \"result\"".to_owned());
        }
        let private_key = ["private_key", "aes_key"]
            .iter()
            .find_map(|k| result.get(*k).and_then(Value::as_str))
            .map(str::to_owned);
        Ok(Self { ports, private_key })
    }

    /// The host port of mandelbox port `port`.
    pub fn port(&self, port: u16) -> Option<u16> {
        self.ports.get(&port).copied()
    }
}

impl JsonTransportAnswer {
    /// The body the host sends: `{"result": {"port_32261": …, …, "private_key": "<hex>",
    /// "aes_key": "<hex>"}}`. `aes_key` is the same key under the name the original's clients
    /// read (renamed `private_key` in 2022-06).
    pub fn to_json(&self) -> Value {
        let mut result = Map::new();
        for (container_port, host_port) in &self.ports {
            result.insert(format!("port_{container_port}"), (*host_port).into());
        }
        if let Some(key) = &self.private_key {
            result.insert("private_key".into(), key.clone().into());
            result.insert("aes_key".into(), key.clone().into());
        }
        json!({ "result": result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_host_writes_the_client_reads() {
        let answer = JsonTransportAnswer {
            ports: BTreeMap::from([(32261, 40000), (32262, 40001)]),
            private_key: Some("ab".repeat(16)),
        };
        let body = answer.to_json().to_string();
        assert_eq!(JsonTransportAnswer::parse(body.as_bytes()), Ok(answer));
    }
}
