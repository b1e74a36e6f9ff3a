//! The typed model of `config.toml`. Each `section!` below is at once the Rust type and the
//! schema the walker checks the document against: TOML key, field, type and reader.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::kind;
use crate::schedule::{Period, Tz};
use crate::secret::Secret;
use crate::walk::section;

const MINUTE: Duration = Duration::from_secs(60);
const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic",
];
const LOG_FORMATS: &[&str] = &["runner", "text", "json"];
const SHELLS: &[&str] = &["sh", "bash", "pwsh", "powershell", "cmd"];

section! {
    /// gitlab-runner's `config.toml`: the global section and every `[[runners]]` entry.
    pub struct Config {
        /// Cap on jobs running at once across all runners (required, at least 1).
        "concurrent" concurrent: u32 = kind::concurrent,
        /// Poll period, integer seconds in TOML; 0 or less means 3 s.
        "check_interval" check_interval: Duration = kind::seconds_or(3),
        /// Forceful-shutdown deadline, integer seconds in TOML; 0 or less means 30 s.
        "shutdown_timeout" shutdown_timeout: Duration = kind::seconds_or(30),
        /// `host:port` of the Prometheus `/metrics` listener; unset means no metrics.
        "listen_address" listen_address: Option<String> = kind::opt_listen_address,
        "log_level" log_level: Option<String> = kind::opt_one_of(LOG_LEVELS),
        "log_format" log_format: Option<String> = kind::opt_one_of(LOG_FORMATS),
        /// A Sentry DSN embeds a key, so it is a secret.
        "sentry_dsn" sentry_dsn: Option<Secret> = kind::opt_secret,
        /// Maximum age of a connection to GitLab (Go duration, default 15m).
        "connection_max_age" connection_max_age: Duration = kind::go_duration_or(15 * MINUTE),
        "user" user: Option<String> = kind::opt_string,
        "session_server" session_server: Option<SessionServerConfig> = kind::optional_section,
        "runners" runners: Vec<RunnerConfig> = kind::section_list,
        /// podfleet extension: where podfleet keeps its durable state (autoscaler ledgers);
        /// unset means `/var/lib/podfleet`.
        "podfleet_state_dir" podfleet_state_dir: Option<PathBuf> = kind::opt_path,
    }
    ignored = [];
}

section! {
    /// `[session_server]`: the interactive web terminal endpoint.
    pub struct SessionServerConfig {
        "listen_address" listen_address: Option<String> = kind::opt_listen_address,
        /// Address GitLab is told to use; defaults to `listen_address`.
        "advertise_address" advertise_address: Option<String> = kind::opt_string,
        /// Integer seconds in TOML; 0 or less means 1800 s.
        "session_timeout" session_timeout: Duration = kind::seconds_or(1800),
    }
    ignored = [];
}

const NOT_FOR_DOCKER_AUTOSCALER: &str =
    "remove it: it configures another gitlab-runner executor, podfleet runs docker-autoscaler only";

section! {
    /// One `[[runners]]` entry: a runner registered in GitLab, with its executor settings.
    pub struct RunnerConfig {
        /// Description only.
        "name" name: String = kind::string,
        /// The GitLab URL (required).
        "url" url: String = kind::gitlab_url,
        /// Runner ID written at registration; with `url`, the runner's stable identity.
        "id" id: i64 = kind::int,
        /// Runner authentication token (`glrt-...`, required).
        "token" token: Secret = kind::runner_token,
        "token_obtained_at" token_obtained_at: Option<String> = kind::opt_datetime,
        "token_expires_at" token_expires_at: Option<String> = kind::opt_datetime,
        "tls-ca-file" tls_ca_file: Option<PathBuf> = kind::opt_path,
        "tls-cert-file" tls_cert_file: Option<PathBuf> = kind::opt_path,
        "tls-key-file" tls_key_file: Option<PathBuf> = kind::opt_path,
        /// Jobs this runner may run at once; 0 means no limit of its own.
        "limit" limit: u32 = kind::uint,
        /// Always `docker-autoscaler` once loaded.
        "executor" executor: String = kind::executor,
        "shell" shell: Option<String> = kind::opt_one_of(SHELLS),
        "builds_dir" builds_dir: Option<String> = kind::opt_string,
        "cache_dir" cache_dir: Option<String> = kind::opt_string,
        "clone_url" clone_url: Option<String> = kind::opt_string,
        /// `KEY=VALUE` entries injected into every job.
        "environment" environment: Vec<String> = kind::environment,
        /// Parallel job requests; 0 means 1.
        "request_concurrency" request_concurrency: u32 = kind::uint_nonzero_or(1),
        /// Maximum job log size in KiB; 0 means 4096.
        "output_limit" output_limit: u32 = kind::uint_nonzero_or(4096),
        "strict_check_interval" strict_check_interval: bool = kind::boolean,
        /// Failed job requests in a row before the runner backs off; 0 means 3.
        "unhealthy_requests_limit" unhealthy_requests_limit: u32 = kind::uint_nonzero_or(3),
        /// How long the runner backs off (Go duration, default 60m).
        "unhealthy_interval" unhealthy_interval: Duration = kind::go_duration_or(60 * MINUTE),
        "pre_get_sources_script" pre_get_sources_script: Option<String> = kind::opt_string,
        "post_get_sources_script" post_get_sources_script: Option<String> = kind::opt_string,
        "pre_build_script" pre_build_script: Option<String> = kind::opt_string,
        "post_build_script" post_build_script: Option<String> = kind::opt_string,
        /// Forbid `CI_DEBUG_TRACE` (it would print every variable, secrets included).
        "debug_trace_disabled" debug_trace_disabled: bool = kind::boolean,
        "safe_directory_checkout" safe_directory_checkout: Option<bool> = kind::opt_bool,
        /// Feature flags jobs cannot override; see [`RunnerConfig::feature_flag`].
        "feature_flags" feature_flags: BTreeMap<String, bool> = kind::bool_map,
        "docker" docker: DockerConfig = kind::section,
        "autoscaler" autoscaler: Option<AutoscalerConfig> = kind::optional_section,
        /// podfleet extension: the runner's tags. GitLab keeps tags server-side; podfleet's
        /// embedded coordinator needs them here. A list, or one comma-separated string.
        "tag_list" tag_list: Vec<String> = kind::tags,
        /// podfleet extension: whether the embedded coordinator gives this runner untagged jobs.
        "run_untagged" run_untagged: bool = kind::boolean,
        /// `[runners.cache]`: the shared (distributed) cache; unset means caches stay on the
        /// instance, in its local cache volume.
        "cache" cache: Option<CacheConfig> = cache_section,
    }
    ignored = [
        ("custom_build_dir", "remove it: podfleet always lets jobs choose GIT_CLONE_PATH under builds_dir"),
        ("referees", "remove it: podfleet has no referees"),
        ("pre_clone_script", "rename it to pre_get_sources_script (pre_clone_script was removed in gitlab-runner 16.0)"),
        ("post_clone_script", "rename it to post_get_sources_script (post_clone_script was removed in gitlab-runner 16.0)"),
        ("instance", NOT_FOR_DOCKER_AUTOSCALER),
        ("ssh", NOT_FOR_DOCKER_AUTOSCALER),
        ("kubernetes", NOT_FOR_DOCKER_AUTOSCALER),
        ("machine", NOT_FOR_DOCKER_AUTOSCALER),
        ("parallels", NOT_FOR_DOCKER_AUTOSCALER),
        ("virtualbox", NOT_FOR_DOCKER_AUTOSCALER),
        ("custom", NOT_FOR_DOCKER_AUTOSCALER),
    ];
}

const CACHE_TYPES: &[&str] = &["s3"];
const S3_AUTHENTICATION_TYPES: &[&str] = &["access-key"];

section! {
    /// `[runners.cache]`: where caches are shared between instances. The manager presigns
    /// one URL per cache key and job, so instances never see the credentials.
    pub struct CacheConfig {
        /// The only distributed cache podfleet supports is S3 (or S3-compatible).
        "Type" cache_type: Option<String> = kind::opt_one_of(CACHE_TYPES),
        /// Prefix of every object name.
        "Path" path: Option<String> = kind::opt_string,
        /// Share caches between runners (drops `runner/<short token>/` from object names).
        "Shared" shared: bool = kind::boolean,
        /// Largest cache archive uploaded, in bytes; 0 means no limit.
        "MaxUploadedArchiveSize" max_uploaded_archive_size: i64 = kind::int_at_least(0),
        "s3" s3: Option<CacheS3Config> = kind::optional_section,
    }
    ignored = [
        ("gcs", "remove it: podfleet's distributed cache supports Type = \"s3\" only"),
        ("azure", "remove it: podfleet's distributed cache supports Type = \"s3\" only"),
    ];
}

section! {
    /// `[runners.cache.s3]`: an S3 or S3-compatible bucket, reached with SigV4 presigned URLs.
    pub struct CacheS3Config {
        /// `host[:port]`; unset means `s3.amazonaws.com`.
        "ServerAddress" server_address: Option<String> = kind::opt_string,
        "AccessKey" access_key: Option<Secret> = kind::opt_secret,
        "SecretKey" secret_key: Option<Secret> = kind::opt_secret,
        "SessionToken" session_token: Option<Secret> = kind::opt_secret,
        "BucketName" bucket_name: String = kind::required_string("\"runner-cache\""),
        /// Region of the bucket; unset means `us-east-1`.
        "BucketLocation" bucket_location: Option<String> = kind::opt_string,
        /// Plain HTTP to `ServerAddress`.
        "Insecure" insecure: bool = kind::boolean,
        /// Only `access-key`: instance-profile (IAM) credentials cannot presign from here.
        "AuthenticationType" authentication_type: Option<String> = kind::opt_one_of(S3_AUTHENTICATION_TYPES),
        /// Unset means path style for a custom `ServerAddress`, virtual-host style for AWS.
        "PathStyle" path_style: Option<bool> = kind::opt_bool,
    }
    ignored = [
        ("ServerSideEncryption", "remove it: podfleet does not set server-side encryption headers; enable default encryption on the bucket instead"),
        ("ServerSideEncryptionKeyID", "remove it: podfleet does not set server-side encryption headers; enable default encryption on the bucket instead"),
        ("DualStack", "remove it: podfleet uses ServerAddress as given"),
        ("Accelerate", "remove it: podfleet uses ServerAddress as given"),
        ("RoleARN", "remove it: podfleet presigns with AccessKey and SecretKey only"),
        ("UploadRoleARN", "remove it: podfleet presigns with AccessKey and SecretKey only"),
    ];
}

/// Reads `[runners.cache]` and checks what only makes sense together: `Type = "s3"` needs a
/// `[runners.cache.s3]` with both keys, since podfleet presigns with them.
fn cache_section(
    walker: &mut crate::walk::Walker<'_>,
    field: &crate::walk::Field<'_>,
) -> Option<CacheConfig> {
    let cache: CacheConfig = kind::optional_section(walker, field)?;
    let s3_path = format!("{}.s3", field.path);
    let s3_at = walker.position_of(&s3_path).unwrap_or(field.at);
    match (&cache.cache_type, &cache.s3) {
        (Some(_), None) => walker.error(
            walker
                .position_of(&format!("{}.Type", field.path))
                .unwrap_or(field.at),
            &format!("{}.Type", field.path),
            "is \"s3\" but there is no [runners.cache.s3] section".to_owned(),
            "add [runners.cache.s3] with ServerAddress, AccessKey, SecretKey and BucketName"
                .to_owned(),
        ),
        (None, Some(_)) => walker.warning(
            s3_at,
            &s3_path,
            "is ignored: [runners.cache] has no Type, so caches stay on the instance".to_owned(),
            "add Type = \"s3\" to [runners.cache]".to_owned(),
        ),
        _ => {}
    }
    if let (Some(_), Some(s3)) = (&cache.cache_type, &cache.s3) {
        for (key, value) in [("AccessKey", &s3.access_key), ("SecretKey", &s3.secret_key)] {
            if value.as_ref().is_none_or(Secret::is_empty) {
                walker.error(
                    s3_at,
                    &format!("{s3_path}.{key}"),
                    "is missing; podfleet presigns cache URLs with AccessKey and SecretKey"
                        .to_owned(),
                    format!("add {key} = \"...\" to [runners.cache.s3]"),
                );
            }
        }
        if let Some(address) = &s3.server_address
            && (address.contains("://") || address.contains('/') || address.trim().is_empty())
        {
            let key = format!("{s3_path}.ServerAddress");
            walker.error(
                walker.position_of(&key).unwrap_or(s3_at),
                &key,
                format!("{address:?} is not host[:port]"),
                "set ServerAddress to host[:port] only; use Insecure = true for plain HTTP"
                    .to_owned(),
            );
        }
    }
    Some(cache)
}

section! {
    /// `[runners.docker]`: how job containers are created on an instance (Docker Engine API).
    pub struct DockerConfig {
        /// Container engine socket on the instance, e.g. `unix:///run/user/1000/podman/podman.sock`.
        "host" host: Option<String> = kind::opt_string,
        "tls_verify" tls_verify: bool = kind::boolean,
        "tls_cert_path" tls_cert_path: Option<PathBuf> = kind::opt_path,
        /// Default job image.
        "image" image: Option<String> = kind::opt_string,
        "hostname" hostname: Option<String> = kind::opt_string,
        "runtime" runtime: Option<String> = kind::opt_string,
        "privileged" privileged: bool = kind::boolean,
        /// Unset means services follow `privileged`.
        "services_privileged" services_privileged: Option<bool> = kind::opt_bool,
        "allowed_images" allowed_images: Vec<String> = kind::strings,
        "allowed_services" allowed_services: Vec<String> = kind::strings,
        "allowed_privileged_images" allowed_privileged_images: Vec<String> = kind::strings,
        "allowed_privileged_services" allowed_privileged_services: Vec<String> = kind::strings,
        "allowed_users" allowed_users: Vec<String> = kind::strings,
        /// Empty means "only those in `pull_policy`"; see
        /// [`DockerConfig::effective_allowed_pull_policies`].
        "allowed_pull_policies" allowed_pull_policies: Vec<PullPolicy> = kind::pull_policies,
        /// A string or a list in TOML; empty means `always`, see
        /// [`DockerConfig::effective_pull_policies`].
        "pull_policy" pull_policy: Vec<PullPolicy> = kind::pull_policies,
        "disable_entrypoint_overwrite" disable_entrypoint_overwrite: bool = kind::boolean,
        "oom_kill_disable" oom_kill_disable: bool = kind::boolean,
        "oom_score_adjust" oom_score_adjust: i64 = kind::int,
        /// `-v` syntax bind mounts and volumes.
        "volumes" volumes: Vec<String> = kind::strings,
        "volumes_from" volumes_from: Vec<String> = kind::strings,
        "volume_driver" volume_driver: Option<String> = kind::opt_string,
        "volume_driver_ops" volume_driver_ops: BTreeMap<String, String> = kind::string_map,
        /// Keep job volumes after the job (type inferred: gitlab-runner documents the key only).
        "volume_keep" volume_keep: bool = kind::boolean,
        /// Bytes; 0 means the engine's default.
        "shm_size" shm_size: i64 = kind::int,
        "tmpfs" tmpfs: BTreeMap<String, String> = kind::string_map,
        "services_tmpfs" services_tmpfs: BTreeMap<String, String> = kind::string_map,
        /// Must be unset when `FF_NETWORK_PER_BUILD` is on.
        "network_mode" network_mode: Option<String> = kind::opt_string,
        /// MTU of the per-build network; 0 means the engine's default.
        "network_mtu" network_mtu: u32 = kind::uint,
        "enable_ipv6" enable_ipv6: bool = kind::boolean,
        "dns" dns: Vec<String> = kind::strings,
        "dns_search" dns_search: Vec<String> = kind::strings,
        "extra_hosts" extra_hosts: Vec<String> = kind::strings,
        "links" links: Vec<String> = kind::strings,
        "mac_address" mac_address: Option<String> = kind::opt_string,
        "cap_add" cap_add: Vec<String> = kind::strings,
        "cap_drop" cap_drop: Vec<String> = kind::strings,
        "security_opt" security_opt: Vec<String> = kind::strings,
        "services_security_opt" services_security_opt: Vec<String> = kind::strings,
        "devices" devices: Vec<String> = kind::strings,
        "services_devices" services_devices: BTreeMap<String, Vec<String>> = kind::string_list_map,
        "device_cgroup_rules" device_cgroup_rules: Vec<String> = kind::strings,
        "group_add" group_add: Vec<String> = kind::strings,
        "userns_mode" userns_mode: Option<String> = kind::opt_string,
        "user" user: Option<String> = kind::opt_string,
        /// Docker memory size such as `"128m"`.
        "memory" memory: Option<String> = kind::opt_memory_size,
        "memory_swap" memory_swap: Option<String> = kind::opt_memory_size,
        "memory_reservation" memory_reservation: Option<String> = kind::opt_memory_size,
        /// A number of CPUs such as `"1.5"`.
        "cpus" cpus: Option<String> = kind::opt_cpus,
        "cpuset_cpus" cpuset_cpus: Option<String> = kind::opt_string,
        "cpuset_mems" cpuset_mems: Option<String> = kind::opt_string,
        /// Unset or 0 means the engine's default (1024).
        "cpu_shares" cpu_shares: Option<i64> = kind::opt_nonzero_int,
        "cgroup_parent" cgroup_parent: Option<String> = kind::opt_string,
        "gpus" gpus: Option<String> = kind::opt_string,
        "service_memory" service_memory: Option<String> = kind::opt_memory_size,
        "service_memory_swap" service_memory_swap: Option<String> = kind::opt_memory_size,
        "service_memory_reservation" service_memory_reservation: Option<String> = kind::opt_memory_size,
        "service_cpus" service_cpus: Option<String> = kind::opt_cpus,
        "service_cpuset_cpus" service_cpuset_cpus: Option<String> = kind::opt_string,
        "service_cpu_shares" service_cpu_shares: Option<i64> = kind::opt_nonzero_int,
        "service_cgroup_parent" service_cgroup_parent: Option<String> = kind::opt_string,
        "service_slot_cgroup_template" service_slot_cgroup_template: Option<String> = kind::opt_string,
        "service_gpus" service_gpus: Option<String> = kind::opt_string,
        /// Image for clone, cache and artifact steps; podfleet's own helper when unset.
        "helper_image" helper_image: Option<String> = kind::opt_string,
        "helper_image_flavor" helper_image_flavor: Option<String> = kind::opt_string,
        "disable_cache" disable_cache: bool = kind::boolean,
        "cache_dir" cache_dir: Option<String> = kind::opt_string,
        /// Seconds to wait for services; -1 disables the wait; unset or 0 means 30.
        "wait_for_services_timeout" wait_for_services_timeout: i64 = kind::int_nonzero_or(30),
        /// Services a job may start; unset or -1 means no limit.
        "services_limit" services_limit: Option<i64> = kind::opt_int,
        /// Services started for every job.
        "services" services: Vec<ServiceConfig> = kind::section_list,
        "isolation" isolation: Option<String> = kind::opt_string,
        "sysctls" sysctls: BTreeMap<String, String> = kind::string_map,
        "container_labels" container_labels: BTreeMap<String, String> = kind::string_map,
        "ipcmode" ipcmode: Option<String> = kind::opt_string,
        "pid_mode" pid_mode: Option<String> = kind::opt_string,
        /// `name = "soft[:hard]"`.
        "ulimit" ulimit: BTreeMap<String, String> = kind::ulimits,
        "log_options" log_options: BTreeMap<String, String> = kind::string_map,
    }
    ignored = [];
}

section! {
    /// `[[runners.docker.services]]`: a service container started for every job.
    pub struct ServiceConfig {
        /// Image of the service (required).
        "name" name: String = kind::required_string("\"postgres:16\""),
        "alias" alias: Option<String> = kind::opt_string,
        "command" command: Vec<String> = kind::strings,
        "entrypoint" entrypoint: Vec<String> = kind::strings,
        "environment" environment: Vec<String> = kind::environment,
    }
    ignored = [];
}

section! {
    /// `[runners.autoscaler]`: the fleet of instances a runner's jobs run on.
    pub struct AutoscalerConfig {
        /// Provider plugin reference, e.g. `fleeting-plugin-azure` or `aws:1` (required).
        "plugin" plugin: String = kind::required_string("\"fleeting-plugin-azure\""),
        /// Jobs one instance runs at once; 0 means 1.
        "capacity_per_instance" capacity_per_instance: u32 = kind::uint_nonzero_or(1),
        /// Jobs an instance runs before it is retired; 0 means no limit.
        "max_use_count" max_use_count: u32 = kind::uint,
        /// Instances in any state; 0 means no limit.
        "max_instances" max_instances: u32 = kind::uint,
        "delete_instances_on_shutdown" delete_instances_on_shutdown: bool = kind::boolean,
        /// Run over the connector when an instance comes up; failure removes the instance.
        "instance_ready_command" instance_ready_command: Option<String> = kind::opt_string,
        "instance_acquire_timeout" instance_acquire_timeout: Duration = kind::go_duration_nonzero_or(15 * MINUTE),
        "update_interval" update_interval: Duration = kind::go_duration_nonzero_or(MINUTE),
        "update_interval_when_expecting" update_interval_when_expecting: Duration = kind::go_duration_nonzero_or(Duration::from_secs(2)),
        "deletion_retry_interval" deletion_retry_interval: Duration = kind::go_duration_nonzero_or(MINUTE),
        "shutdown_deletion_interval" shutdown_deletion_interval: Duration = kind::go_duration_nonzero_or(Duration::from_secs(10)),
        "shutdown_deletion_retries" shutdown_deletion_retries: u32 = kind::uint_nonzero_or(3),
        /// Consecutive health failures before an instance is replaced; 0 means 3.
        "failure_threshold" failure_threshold: u32 = kind::uint_nonzero_or(3),
        /// Unset means enabled.
        "reservation_throttling" reservation_throttling: Option<bool> = kind::opt_bool,
        "log_internal_ip" log_internal_ip: bool = kind::boolean,
        "log_external_ip" log_external_ip: bool = kind::boolean,
        /// Histogram buckets (seconds); the default for the more specific lists below.
        "instance_operation_time_buckets" instance_operation_time_buckets: Vec<f64> = kind::floats,
        "instance_creation_time_buckets" instance_creation_time_buckets: Vec<f64> = kind::floats,
        "instance_is_running_time_buckets" instance_is_running_time_buckets: Vec<f64> = kind::floats,
        "instance_deletion_time_buckets" instance_deletion_time_buckets: Vec<f64> = kind::floats,
        "instance_readiness_time_buckets" instance_readiness_time_buckets: Vec<f64> = kind::floats,
        "instance_life_duration_buckets" instance_life_duration_buckets: Vec<f64> = kind::floats,
        /// The plugin's own settings, re-encoded from TOML to JSON and handed over verbatim.
        "plugin_config" plugin_config: serde_json::Map<String, serde_json::Value> = kind::json_object,
        "connector_config" connector_config: ConnectorConfig = kind::section,
        /// Idle-capacity schedules; the last one whose period matches wins.
        "policy" policy: Vec<PolicyConfig> = kind::section_list,
        "scale_throttle" scale_throttle: ScaleThrottle = kind::section,
        "state_storage" state_storage: StateStorage = kind::section,
        /// Whether a `[runners.autoscaler.vm_isolation]` table (macOS nesting VMs) is present;
        /// accepted for compatibility, not interpreted.
        "vm_isolation" vm_isolation: bool = kind::accepted_table,
        /// podfleet extension: the ledger (instances, use counts, job assignments, arrival
        /// history) of this runner's group; unset means a file named after the group in
        /// `podfleet_state_dir`, see [`AutoscalerConfig::ledger_path`].
        "state_file" state_file: Option<PathBuf> = kind::opt_path,
        /// podfleet extension: overall deadline of a new instance's readiness check (SSH,
        /// `instance_ready_command` retried with back-off, engine ping).
        "instance_ready_timeout" instance_ready_timeout: Duration = kind::go_duration_nonzero_or(5 * MINUTE),
        /// podfleet extension: keep idle capacity ahead of the arrival rate learned per
        /// hour of the week from the ledger's history, on top of the policy's idle_count.
        "predictive_warm_capacity" predictive_warm_capacity: bool = kind::boolean,
        /// podfleet extension: how often the provider is asked which image each instance
        /// runs (providers that report images, such as Azure).
        "image_check_interval" image_check_interval: Duration = kind::go_duration_nonzero_or(5 * MINUTE),
        /// podfleet extension: instances the provider reports as not on the group's current
        /// image are drained after their current job and replaced.
        "replace_outdated_images" replace_outdated_images: bool = kind::boolean,
    }
    ignored = [];
}

section! {
    /// `[runners.autoscaler.connector_config]`: how podfleet reaches an instance.
    pub struct ConnectorConfig {
        "os" os: Option<String> = kind::opt_string,
        "arch" arch: Option<String> = kind::opt_string,
        /// Unset means `ssh`, the only protocol podfleet speaks.
        "protocol" protocol: Option<String> = kind::connector_protocol,
        /// Unset means 22.
        "protocol_port" protocol_port: Option<u16> = kind::opt_port,
        "username" username: Option<String> = kind::opt_string,
        "password" password: Option<Secret> = kind::opt_secret,
        /// Private key file.
        "key_path" key_path: Option<PathBuf> = kind::opt_path,
        /// `false`: the provider generates or pushes credentials.
        "use_static_credentials" use_static_credentials: bool = kind::boolean,
        "keepalive" keepalive: Option<Duration> = kind::opt_go_duration,
        /// How long dialing keeps retrying while the instance boots.
        "timeout" timeout: Option<Duration> = kind::opt_go_duration,
        "use_external_addr" use_external_addr: bool = kind::boolean,
    }
    ignored = [];
}

section! {
    /// `[[runners.autoscaler.policy]]`: idle capacity during some periods.
    pub struct PolicyConfig {
        /// 5-field cron expressions; `["* * * * *"]` when absent.
        "periods" periods: Vec<Period> = kind::cron_periods,
        /// IANA time zone of `periods`; unset (or `Local`) means the host's time zone.
        "timezone" timezone: Option<Tz> = kind::opt_timezone,
        /// Idle capacity in job slots (not instances).
        "idle_count" idle_count: u32 = kind::uint,
        /// How long an instance may stay idle before it becomes removable.
        "idle_time" idle_time: Duration = kind::go_duration_or(Duration::ZERO),
        /// Extra idle capacity as a multiple of the capacity in use.
        "scale_factor" scale_factor: f64 = kind::non_negative_float,
        /// Cap on the idle capacity `scale_factor` may ask for; 0 means no cap.
        "scale_factor_limit" scale_factor_limit: u32 = kind::uint,
        /// Unset means on when `idle_count > 0`; see [`PolicyConfig::preemptive`].
        "preemptive_mode" preemptive_mode: Option<bool> = kind::opt_bool,
    }
    ignored = [];
}

section! {
    /// `[runners.autoscaler.scale_throttle]`: a token bucket on instance creation.
    pub struct ScaleThrottle {
        /// Instances per second; 0 means 100, -1 means unlimited.
        "limit" limit: i64 = kind::int_at_least(-1),
        /// Bucket size; 0 means `max_instances` (or `limit` when that is unset).
        "burst" burst: i64 = kind::int_at_least(0),
    }
    ignored = [];
}

section! {
    /// `[runners.autoscaler.state_storage]`: persisted per-instance state.
    pub struct StateStorage {
        "enabled" enabled: bool = kind::boolean,
        /// Unset means `<config dir>/.taskscaler`.
        "dir" dir: Option<PathBuf> = kind::opt_path,
        "keep_instance_with_acquisitions" keep_instance_with_acquisitions: bool = kind::boolean,
    }
    ignored = [];
}

/// `[runners.docker] pull_policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        }
    }
}

impl FromStr for PullPolicy {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "always" => Ok(PullPolicy::Always),
            "if-not-present" => Ok(PullPolicy::IfNotPresent),
            "never" => Ok(PullPolicy::Never),
            _ => Err(()),
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DockerConfig {
    /// The pull policies to try in order: `pull_policy`, or `[always]` when it is empty.
    pub fn effective_pull_policies(&self) -> Vec<PullPolicy> {
        if self.pull_policy.is_empty() {
            vec![PullPolicy::Always]
        } else {
            self.pull_policy.clone()
        }
    }

    /// The pull policies a job may ask for: `allowed_pull_policies`, or the effective
    /// `pull_policy` when it is empty.
    pub fn effective_allowed_pull_policies(&self) -> Vec<PullPolicy> {
        if self.allowed_pull_policies.is_empty() {
            self.effective_pull_policies()
        } else {
            self.allowed_pull_policies.clone()
        }
    }
}

impl PolicyConfig {
    /// Whether jobs are only taken when a ready idle slot exists.
    pub fn preemptive(&self) -> bool {
        self.preemptive_mode.unwrap_or(self.idle_count > 0)
    }
}
