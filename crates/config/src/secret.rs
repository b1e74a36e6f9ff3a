//! The `Secret` type: a string whose value never reaches a log, an error or `Debug` output.

use std::fmt;

/// A secret from the config (runner token, SSH password, Sentry DSN).
///
/// `Debug` and `Display` print `[MASKED]`; the value is only reachable through
/// [`Secret::expose`], so every place that uses it is easy to find.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret value itself. Call it only where the value is sent to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const MASK: &str = "[MASKED]";

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_mask_the_value() {
        let secret = Secret::new("glrt-very-secret".to_owned());
        assert_eq!(format!("{secret:?}"), "[MASKED]");
        assert_eq!(format!("{secret}"), "[MASKED]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([MASKED])");
        assert_eq!(secret.expose(), "glrt-very-secret");
    }

    #[test]
    fn deserializes_from_a_string() {
        let secret: Secret = serde_json::from_str("\"hunter2\"").expect("a JSON string");
        assert_eq!(secret.expose(), "hunter2");
        assert_eq!(secret, Secret::new("hunter2".to_owned()));
    }
}
