//! Validated identifiers of Docker objects.

use std::fmt;

use super::MAX_NAME_LEN;

/// A Docker container id (or name): what the engine returned from create, or found in a list or
/// an event. Validated so it cannot smuggle a path into an API URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(pub(super) String);

/// A string that is not a container id or name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid container id or name {value:?}: {reason}")]
pub struct InvalidContainerId {
    /// The refused value, cut to 128 characters.
    pub value: String,
    pub reason: &'static str,
}

impl ContainerId {
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidContainerId> {
        let value = value.into();
        validate_object_name(&value).map_err(|reason| InvalidContainerId {
            value: value.chars().take(MAX_NAME_LEN).collect(),
            reason,
        })?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Docker's rule for container names, `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; ids (hex) satisfy it too.
pub(super) fn validate_object_name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > MAX_NAME_LEN {
        return Err("longer than 128 characters");
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with an ASCII letter or digit");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("only ASCII letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_cannot_carry_a_path() {
        for bad in ["", "../x", "a/b", "-x", "a b", "a?b=c"] {
            assert!(ContainerId::new(bad).is_err(), "{bad:?}");
        }
        assert!(ContainerId::new("mandelbox-1_a.b").is_ok());
        assert!(ContainerId::new("f".repeat(64)).is_ok());
    }
}
