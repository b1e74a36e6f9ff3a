//! `[runners.docker]` resource and isolation options as the Docker API's `HostConfig` fields,
//! converted the way gitlab-runner (docker/go-units) reads them. The config crate has already
//! checked the syntax; a value that still does not convert is left unset, never guessed.

use std::collections::HashMap;

use bollard::models::{DeviceMapping, HostConfig, ResourcesUlimits};
use podfleet_config::DockerConfig;

/// `512m`, `1.5g`, `4096`, `100 MB`: bytes with binary multiples, as go-units `RAMInBytes`.
pub fn memory_bytes(text: &str) -> Option<i64> {
    let text = text.trim();
    let number_len = text
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let number: f64 = text[..number_len].parse().ok()?;
    let unit = text[number_len..].trim_start().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let multiplier: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0f64.powi(4),
        "p" => 1024.0f64.powi(5),
        _ => return None,
    };
    let bytes = number * multiplier;
    (bytes.is_finite() && bytes < i64::MAX as f64).then_some(bytes as i64)
}

/// `1.5` or `3/2` CPUs as the API's nano-CPUs.
pub fn nano_cpus(text: &str) -> Option<i64> {
    let value = match text.trim().split_once('/') {
        Some((numerator, denominator)) => {
            let denominator: f64 = denominator.parse().ok()?;
            (denominator != 0.0).then_some(numerator.parse::<f64>().ok()? / denominator)?
        }
        None => text.trim().parse::<f64>().ok()?,
    };
    (value.is_finite() && value > 0.0).then_some((value * 1e9).round() as i64)
}

/// `/dev/fuse`, `/dev/sdc:/dev/xvdc` or `/dev/sdc:/dev/xvdc:rwm`, as `docker run --device`.
pub fn device(text: &str) -> DeviceMapping {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, permissions) = match parts.as_slice() {
        [host] => (*host, *host, "rwm"),
        [host, last] if last.chars().all(|c| "rwm".contains(c)) => (*host, *host, *last),
        [host, container] => (*host, *container, "rwm"),
        [host, container, permissions, ..] => (*host, *container, *permissions),
        [] => (text, text, "rwm"),
    };
    DeviceMapping {
        path_on_host: Some(host.to_string()),
        path_in_container: Some(container.to_string()),
        cgroup_permissions: Some(permissions.to_string()),
    }
}

/// `nofile = "1024:2048"` or `nofile = "1024"` (soft = hard).
pub fn ulimit(name: &str, text: &str) -> Option<ResourcesUlimits> {
    let (soft, hard) = text.split_once(':').unwrap_or((text, text));
    Some(ResourcesUlimits {
        name: Some(name.to_string()),
        soft: Some(soft.trim().parse().ok()?),
        hard: Some(hard.trim().parse().ok()?),
    })
}

fn map(values: &std::collections::BTreeMap<String, String>) -> Option<HashMap<String, String>> {
    (!values.is_empty()).then(|| values.clone().into_iter().collect())
}

fn list(values: &[String]) -> Option<Vec<String>> {
    (!values.is_empty()).then(|| values.to_vec())
}

/// The resource and isolation fields of `HostConfig` for the build container.
pub fn resources(config: &DockerConfig) -> HostConfig {
    let ulimits: Vec<ResourcesUlimits> = config
        .ulimit
        .iter()
        .filter_map(|(name, value)| ulimit(name, value))
        .collect();
    HostConfig {
        memory: config.memory.as_deref().and_then(memory_bytes),
        memory_swap: config.memory_swap.as_deref().and_then(|text| {
            // -1 (unlimited swap) is the one value that is not a size.
            if text.trim() == "-1" {
                Some(-1)
            } else {
                memory_bytes(text)
            }
        }),
        memory_reservation: config.memory_reservation.as_deref().and_then(memory_bytes),
        nano_cpus: config.cpus.as_deref().and_then(nano_cpus),
        cpuset_cpus: config.cpuset_cpus.clone(),
        cpuset_mems: config.cpuset_mems.clone(),
        cpu_shares: config.cpu_shares,
        devices: (!config.devices.is_empty())
            .then(|| config.devices.iter().map(|d| device(d)).collect()),
        device_cgroup_rules: list(&config.device_cgroup_rules),
        group_add: list(&config.group_add),
        userns_mode: config.userns_mode.clone(),
        ipc_mode: config.ipcmode.clone(),
        sysctls: map(&config.sysctls),
        tmpfs: map(&config.tmpfs),
        ulimits: (!ulimits.is_empty()).then_some(ulimits),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_in_bytes_like_go_units() {
        assert_eq!(memory_bytes("4096"), Some(4096));
        assert_eq!(memory_bytes("2k"), Some(2048));
        assert_eq!(memory_bytes("128m"), Some(128 * 1024 * 1024));
        assert_eq!(memory_bytes("512MiB"), Some(512 * 1024 * 1024));
        assert_eq!(memory_bytes("100 MB"), Some(100 * 1024 * 1024));
        assert_eq!(memory_bytes("1.5g"), Some(3 * 512 * 1024 * 1024));
        assert_eq!(memory_bytes("12x"), None);
        assert_eq!(memory_bytes("m"), None);
    }

    #[test]
    fn cpus_as_nano_cpus() {
        assert_eq!(nano_cpus("1.5"), Some(1_500_000_000));
        assert_eq!(nano_cpus("3/2"), Some(1_500_000_000));
        assert_eq!(nano_cpus(".5"), Some(500_000_000));
        assert_eq!(nano_cpus("1/0"), None);
        assert_eq!(nano_cpus("0"), None);
    }

    #[test]
    fn devices_like_docker_run() {
        let d = device("/dev/fuse");
        assert_eq!(
            (
                d.path_on_host.as_deref(),
                d.path_in_container.as_deref(),
                d.cgroup_permissions.as_deref()
            ),
            (Some("/dev/fuse"), Some("/dev/fuse"), Some("rwm"))
        );
        let d = device("/dev/sdc:/dev/xvdc");
        assert_eq!(d.path_in_container.as_deref(), Some("/dev/xvdc"));
        let d = device("/dev/sdc:r");
        assert_eq!(
            (
                d.path_in_container.as_deref(),
                d.cgroup_permissions.as_deref()
            ),
            (Some("/dev/sdc"), Some("r"))
        );
        let d = device("/dev/sdc:/dev/xvdc:rw");
        assert_eq!(d.cgroup_permissions.as_deref(), Some("rw"));
    }

    #[test]
    fn ulimits_soft_and_hard() {
        let u = ulimit("nofile", "1024:2048").unwrap();
        assert_eq!((u.soft, u.hard), (Some(1024), Some(2048)));
        let u = ulimit("nproc", "512").unwrap();
        assert_eq!((u.soft, u.hard), (Some(512), Some(512)));
        assert!(ulimit("nofile", "lots").is_none());
    }
}
