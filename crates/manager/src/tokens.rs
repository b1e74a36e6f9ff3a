//! The runner authentication tokens in use, one per runner, replaceable while the manager runs:
//! a rotated token (reset before it expires) or one changed in a reloaded config takes effect
//! at the next job request, without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use podfleet_config::{Config, Secret};

#[derive(Clone, Default)]
pub struct RunnerTokens {
    tokens: Arc<RwLock<HashMap<String, Secret>>>,
}

impl RunnerTokens {
    /// The tokens of every runner of `config`.
    pub fn of(config: &Config) -> Self {
        let tokens = config
            .runners
            .iter()
            .map(|runner| (runner.name.clone(), runner.token.clone()))
            .collect();
        Self {
            tokens: Arc::new(RwLock::new(tokens)),
        }
    }

    /// The token `runner` uses now.
    pub fn get(&self, runner: &str) -> Option<Secret> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.get(runner).cloned()
    }

    /// Replaces the token of `runner`; returns whether it changed.
    pub fn set(&self, runner: &str, token: Secret) -> bool {
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        let changed = tokens.get(runner).map(Secret::expose) != Some(token.expose());
        tokens.insert(runner.to_owned(), token);
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_token_is_seen_by_every_clone() {
        let tokens = RunnerTokens::default();
        let seen_by_poll_loop = tokens.clone();
        assert!(tokens.set("a", Secret::new("glrt-one".to_owned())));
        assert!(!tokens.set("a", Secret::new("glrt-one".to_owned())));
        assert!(tokens.set("a", Secret::new("glrt-two".to_owned())));
        assert_eq!(seen_by_poll_loop.get("a").unwrap().expose(), "glrt-two");
        assert!(seen_by_poll_loop.get("b").is_none());
    }
}
