//! The runner authentication tokens in use, one per runner, replaceable while the manager runs:
//! a rotated token (reset before it expires) or one changed in a reloaded config takes effect
//! at the next job request, without a restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use podfleet_config::{Config, Secret};
use tokio::sync::watch;

#[derive(Clone)]
pub struct RunnerTokens {
    tokens: Arc<RwLock<HashMap<String, Secret>>>,
    /// Runners whose start-up verification is over: a reset before it would make that
    /// verification fail with the old token and disable the runner.
    serving: watch::Sender<BTreeSet<String>>,
}

impl Default for RunnerTokens {
    fn default() -> Self {
        Self {
            tokens: Arc::default(),
            serving: watch::channel(BTreeSet::new()).0,
        }
    }
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
            ..Self::default()
        }
    }

    /// Waits until `runner` has passed its start-up verification and polls for jobs.
    pub async fn serving(&self, runner: &str) {
        let mut serving = self.serving.subscribe();
        let _ = serving.wait_for(|names| names.contains(runner)).await;
    }

    pub(crate) fn mark_serving(&self, runner: &str) {
        self.serving.send_modify(|names| {
            names.insert(runner.to_owned());
        });
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

    #[tokio::test]
    async fn serving_waits_for_the_runners_verification() {
        let tokens = RunnerTokens::default();
        let waiter = tokio::spawn({
            let tokens = tokens.clone();
            async move { tokens.serving("a").await }
        });
        tokio::task::yield_now().await;
        tokens.mark_serving("b");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tokens.mark_serving("a");
        waiter.await.unwrap();
    }
}
