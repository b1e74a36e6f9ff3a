//! Checks that relate several keys (a feature flag and a docker setting, two runners' scale
//! sets, ...). They run on the typed config after the walk and point at the key to change.

use crate::kind::EXECUTOR;
use crate::model::{Config, RunnerConfig};
use crate::problem::Position;
use crate::walk::Walker;

const NETWORK_PER_BUILD: &str = "FF_NETWORK_PER_BUILD";

pub(crate) fn check(config: &Config, walker: &mut Walker<'_>) {
    if config.runners.is_empty() {
        walker.warning(
            Position::START,
            "runners",
            "no [[runners]] entry, so no job will ever be taken".to_owned(),
            "add a [[runners]] section with url, token and executor".to_owned(),
        );
    }
    for (index, runner) in config.runners.iter().enumerate() {
        let path = format!("runners[{index}]");
        check_runner(runner, &path, walker);
        check_own_scale_set(config, index, &path, walker);
    }
}

/// Where to point for `key_path`: the key if present, else its nearest present parent.
fn position_of(walker: &Walker<'_>, key_path: &str) -> Position {
    let mut path = key_path;
    loop {
        if let Some(at) = walker.position_of(path) {
            return at;
        }
        match path.rfind('.') {
            Some(dot) => path = &path[..dot],
            None => return Position::START,
        }
    }
}

fn check_runner(runner: &RunnerConfig, path: &str, walker: &mut Walker<'_>) {
    if runner.executor == EXECUTOR && runner.autoscaler.is_none() {
        walker.error(
            position_of(walker, path),
            &format!("{path}.autoscaler"),
            "is missing; the docker-autoscaler executor needs it".to_owned(),
            "add [runners.autoscaler] with plugin, capacity_per_instance and max_instances"
                .to_owned(),
        );
    }

    let docker = &runner.docker;
    let network_per_build = runner.feature_flag(NETWORK_PER_BUILD);
    if network_per_build && docker.network_mode.is_some() {
        let key = format!("{path}.docker.network_mode");
        walker.error(
            position_of(walker, &key),
            &key,
            format!("must be unset while {NETWORK_PER_BUILD} is on: each job gets its own network"),
            format!("remove network_mode, or turn {NETWORK_PER_BUILD} off"),
        );
    }
    if !network_per_build {
        for (key, set) in [
            ("enable_ipv6", docker.enable_ipv6),
            ("network_mtu", docker.network_mtu > 0),
        ] {
            if set {
                let key = format!("{path}.docker.{key}");
                walker.warning(
                    position_of(walker, &key),
                    &key,
                    format!("has no effect unless {NETWORK_PER_BUILD} is on"),
                    format!("add \"{NETWORK_PER_BUILD}=true\" to environment, or remove it"),
                );
            }
        }
    }

    if !docker.allowed_pull_policies.is_empty() {
        let pull_policies = docker.effective_pull_policies();
        let allowed = &docker.allowed_pull_policies;
        if !pull_policies.iter().any(|policy| allowed.contains(policy)) {
            let key = format!("{path}.docker.allowed_pull_policies");
            let names = |list: &[crate::model::PullPolicy]| {
                list.iter()
                    .map(|policy| policy.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            walker.error(
                position_of(walker, &key),
                &key,
                format!(
                    "allows none of pull_policy ({}), so every job without its own pull_policy would fail",
                    names(&pull_policies)
                ),
                format!("add one of {} to allowed_pull_policies, or change pull_policy", names(&pull_policies)),
            );
        }
    }

    if let Some(autoscaler) = &runner.autoscaler
        && autoscaler.max_use_count > 0
        && autoscaler.capacity_per_instance > autoscaler.max_use_count
    {
        let key = format!("{path}.autoscaler.capacity_per_instance");
        walker.warning(
            position_of(walker, &key),
            &key,
            format!(
                "is {} but max_use_count is {}: an instance retires after {} jobs, so its other slots are never used",
                autoscaler.capacity_per_instance, autoscaler.max_use_count, autoscaler.max_use_count
            ),
            "lower capacity_per_instance to max_use_count or less".to_owned(),
        );
    }
}

/// gitlab-runner's guidance: never share one instance group between runner entries, or each
/// one's autoscaler sees the other's instances as strays and deletes them mid-job.
fn check_own_scale_set(config: &Config, index: usize, path: &str, walker: &mut Walker<'_>) {
    let Some(autoscaler) = &config.runners[index].autoscaler else {
        return;
    };
    if autoscaler.plugin_config.is_empty() {
        return;
    }
    let earlier = config.runners[..index].iter().position(|other| {
        other.autoscaler.as_ref().is_some_and(|other| {
            other.plugin == autoscaler.plugin && other.plugin_config == autoscaler.plugin_config
        })
    });
    if let Some(earlier) = earlier {
        let key = format!("{path}.autoscaler.plugin_config");
        walker.error(
            position_of(walker, &key),
            &key,
            format!("names the same instance group as runners[{earlier}]; their autoscalers would delete each other's instances"),
            "give each [[runners]] entry its own scale set (e.g. its own plugin_config name)".to_owned(),
        );
    }
}
