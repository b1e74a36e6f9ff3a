//! The cache's configuration: a TOML file or the same settings from command-line flags,
//! validated as a whole so every problem is reported at once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::reference::valid_component;

/// The route prefix under which the Docker Hub upstream is also reachable (besides the root).
pub const DOCKER_HUB_PREFIX: &str = "docker.io";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub storage: PathBuf,
    /// Disk quota for cached content; least recently used objects are evicted above it.
    pub max_size: u64,
    /// Below this much free space on the storage file system nothing new is cached.
    pub min_free_space: u64,
    pub tag_ttl: Duration,
    pub connect_timeout: Duration,
    /// Deadline for upstream response headers and for whole manifest requests.
    pub response_timeout: Duration,
    /// A blob download that receives nothing for this long is abandoned.
    pub idle_timeout: Duration,
    pub gc_interval: Duration,
    /// Unreferenced content younger than this (by last access) survives garbage collection.
    pub gc_grace: Duration,
    pub max_manifest_size: u64,
    pub upstreams: Vec<UpstreamConfig>,
    /// Serves un-prefixed paths (Docker's `registry-mirrors`) and the `docker.io` prefix.
    pub docker_hub: Option<UpstreamConfig>,
    pub client_users_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate_chain: PathBuf,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub prefix: String,
    pub url: reqwest::Url,
    pub credentials_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read cache config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid cache config {origin}:\n  {}", problems.join("\n  "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    storage: Option<PathBuf>,
    max_size: Option<String>,
    min_free_space: Option<String>,
    tag_ttl: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
    gc_interval: Option<String>,
    gc_grace: Option<String>,
    max_manifest_size: Option<String>,
    #[serde(default)]
    upstream: Vec<FileUpstream>,
    docker_hub: Option<FileUpstream>,
    client_auth: Option<FileClientAuth>,
    tls: Option<FileTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    prefix: Option<String>,
    url: String,
    credentials_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClientAuth {
    users_file: PathBuf,
}

/// Settings given on the command line; `None` keeps the file's value or the default.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub storage: Option<PathBuf>,
    pub max_size: Option<String>,
    pub tag_ttl: Option<String>,
    /// `PREFIX=URL` pairs.
    pub upstreams: Vec<String>,
    pub docker_hub: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|error| ConfigError::Invalid {
            origin: origin.to_owned(),
            problems: vec![error.to_string().trim().replace('\n', "\n  ")],
        })?;
        build(file, origin, overrides)
    }

    pub fn from_overrides(overrides: &Overrides) -> Result<Self, ConfigError> {
        build(FileConfig::default(), "command line", overrides)
    }

    /// Every upstream with its route prefix, Docker Hub (as `docker.io`) included.
    pub fn all_upstreams(&self) -> impl Iterator<Item = &UpstreamConfig> {
        self.upstreams.iter().chain(self.docker_hub.iter())
    }
}

fn build(file: FileConfig, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let listen_text = overrides
        .listen
        .clone()
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:5000".to_owned());
    let listen = listen_text.parse().unwrap_or_else(|_| {
        problems.push(format!(
            "listen: {listen_text:?} is not an IP:PORT socket address (e.g. 0.0.0.0:5000)"
        ));
        SocketAddr::from(([127, 0, 0, 1], 5000))
    });
    let storage = overrides
        .storage
        .clone()
        .or(file.storage)
        .unwrap_or_else(|| {
            problems.push(
                "storage: missing: give the directory for cached content (--storage DIR)"
                    .to_owned(),
            );
            PathBuf::new()
        });
    let mut size = |name: &str, value: Option<String>, default: u64| match value {
        None => default,
        Some(text) => parse_size(&text).unwrap_or_else(|| {
            problems.push(format!(
                "{name}: {text:?} is not a size (e.g. 20GiB, 500MB, 1048576)"
            ));
            default
        }),
    };
    let max_size = size(
        "max_size",
        overrides.max_size.clone().or(file.max_size),
        20 << 30,
    );
    let min_free_space = size("min_free_space", file.min_free_space, 256 << 20);
    let max_manifest_size = size("max_manifest_size", file.max_manifest_size, 4 << 20);
    let mut duration = |name: &str, value: Option<String>, default: Duration| match value {
        None => default,
        Some(text) => humantime::parse_duration(&text).unwrap_or_else(|_| {
            problems.push(format!(
                "{name}: {text:?} is not a duration (e.g. 5m, 30s, 1h)"
            ));
            default
        }),
    };
    let tag_ttl = duration(
        "tag_ttl",
        overrides.tag_ttl.clone().or(file.tag_ttl),
        Duration::from_secs(300),
    );
    let connect_timeout = duration(
        "connect_timeout",
        file.connect_timeout,
        Duration::from_secs(3),
    );
    let response_timeout = duration(
        "response_timeout",
        file.response_timeout,
        Duration::from_secs(10),
    );
    let idle_timeout = duration("idle_timeout", file.idle_timeout, Duration::from_secs(30));
    let gc_interval = duration("gc_interval", file.gc_interval, Duration::from_secs(3600));
    let gc_grace = duration("gc_grace", file.gc_grace, Duration::from_secs(3600));
    for (name, value) in [
        ("connect_timeout", connect_timeout),
        ("response_timeout", response_timeout),
        ("idle_timeout", idle_timeout),
        ("gc_interval", gc_interval),
    ] {
        if value.is_zero() {
            problems.push(format!("{name}: must be greater than zero"));
        }
    }

    let mut upstreams = Vec::new();
    for (index, upstream) in file.upstream.into_iter().enumerate() {
        let place = format!("upstream[{index}]");
        match upstream.prefix {
            None => problems.push(format!(
                "{place}.prefix: missing (the first path component clients use, e.g. \"quay.io\")"
            )),
            Some(prefix) => {
                if let Some(config) = upstream_config(
                    &place,
                    prefix,
                    &upstream.url,
                    upstream.credentials_file,
                    &mut problems,
                ) {
                    upstreams.push(config);
                }
            }
        }
    }
    for pair in &overrides.upstreams {
        let place = format!("--upstream {pair}");
        match pair.split_once('=') {
            None => problems.push(format!(
                "{place}: expected PREFIX=URL, e.g. quay.io=https://quay.io"
            )),
            Some((prefix, url)) => {
                if let Some(config) =
                    upstream_config(&place, prefix.to_owned(), url, None, &mut problems)
                {
                    upstreams.retain(|existing: &UpstreamConfig| existing.prefix != config.prefix);
                    upstreams.push(config);
                }
            }
        }
    }
    let docker_hub = match (&overrides.docker_hub, file.docker_hub) {
        (Some(url), file_hub) => upstream_config(
            "--docker-hub",
            DOCKER_HUB_PREFIX.to_owned(),
            url,
            file_hub.and_then(|hub| hub.credentials_file),
            &mut problems,
        ),
        (None, Some(hub)) => {
            if hub
                .prefix
                .as_deref()
                .is_some_and(|prefix| prefix != DOCKER_HUB_PREFIX)
            {
                problems.push(format!(
                    "docker_hub.prefix: always {DOCKER_HUB_PREFIX:?}; remove the key"
                ));
            }
            upstream_config(
                "docker_hub",
                DOCKER_HUB_PREFIX.to_owned(),
                &hub.url,
                hub.credentials_file,
                &mut problems,
            )
        }
        (None, None) => None,
    };
    let mut seen = BTreeSet::new();
    for upstream in upstreams.iter().chain(docker_hub.iter()) {
        if !seen.insert(upstream.prefix.clone()) {
            problems.push(format!(
                "upstream prefix {:?} is configured twice; each prefix routes to one upstream",
                upstream.prefix
            ));
        }
    }
    let (file_cert, file_key) = file.tls.map(|tls| (tls.cert, tls.key)).unwrap_or_default();
    let tls = match (
        overrides.tls_cert.clone().or(file_cert),
        overrides.tls_key.clone().or(file_key),
    ) {
        (None, None) => None,
        (Some(certificate_chain), Some(private_key)) => {
            for (name, path) in [("tls.cert", &certificate_chain), ("tls.key", &private_key)] {
                if let Err(error) = std::fs::metadata(path) {
                    problems.push(format!("{name}: {}: {error}", path.display()));
                }
            }
            Some(TlsFiles {
                certificate_chain,
                private_key,
            })
        }
        _ => {
            problems.push(
                "tls: give both cert and key (PEM files), or neither for plain HTTP".to_owned(),
            );
            None
        }
    };
    if upstreams.is_empty() && docker_hub.is_none() {
        problems.push(
            "no upstream: add --upstream PREFIX=URL, --docker-hub URL or an [[upstream]] table"
                .to_owned(),
        );
    }
    if problems.is_empty() {
        Ok(Config {
            listen,
            storage,
            max_size,
            min_free_space,
            tag_ttl,
            connect_timeout,
            response_timeout,
            idle_timeout,
            gc_interval,
            gc_grace,
            max_manifest_size,
            upstreams,
            docker_hub,
            client_users_file: file.client_auth.map(|auth| auth.users_file),
            tls,
        })
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }
}

fn upstream_config(
    place: &str,
    prefix: String,
    url: &str,
    credentials_file: Option<PathBuf>,
    problems: &mut Vec<String>,
) -> Option<UpstreamConfig> {
    let mut ok = true;
    if !valid_component(&prefix) {
        problems.push(format!(
            "{place}: prefix {prefix:?} is not a valid first path component (lower-case letters, digits, '.', '_', '-'; no port: name it e.g. \"registry-a\")"
        ));
        ok = false;
    }
    let url = match reqwest::Url::parse(url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Some(url),
        _ => {
            problems.push(format!(
                "{place}: {url:?} is not an http(s) URL like https://quay.io"
            ));
            None
        }
    };
    if let Some(file) = &credentials_file
        && let Err(error) = std::fs::metadata(file)
    {
        problems.push(format!(
            "{place}: credentials file {}: {error}",
            file.display()
        ));
        ok = false;
    }
    Some(UpstreamConfig {
        prefix,
        url: url?,
        credentials_file,
    })
    .filter(|_| ok)
}

/// `20GiB`, `500MB`, `64KiB`, `1048576`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let config = Config::parse(
            r#"
listen = "0.0.0.0:5000"
storage = "/var/cache/podfleet"
max_size = "10GiB"
tag_ttl = "2m"
[[upstream]]
prefix = "quay.io"
url = "https://quay.io"
[[upstream]]
prefix = "ghcr.io"
url = "https://ghcr.io"
[docker_hub]
url = "https://registry-1.docker.io"
"#,
            "cache.toml",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.max_size, 10 << 30);
        assert_eq!(config.tag_ttl, Duration::from_secs(120));
        let prefixes: Vec<_> = config.all_upstreams().map(|u| u.prefix.as_str()).collect();
        assert_eq!(prefixes, ["quay.io", "ghcr.io", "docker.io"]);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let error = Config::parse(
            r#"
listen = "nowhere"
max_size = "lots"
tag_ttl = "soon"
[[upstream]]
prefix = "127.0.0.1:5000"
url = "ftp://x"
[[upstream]]
url = "https://quay.io"
"#,
            "bad.toml",
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "listen:",
            "storage: missing",
            "max_size:",
            "tag_ttl:",
            "not a valid first path component",
            "ftp://x",
            "upstream[1].prefix: missing",
        ] {
            assert!(error.contains(needle), "{needle} missing from {error}");
        }
        assert!(error.starts_with("invalid cache config bad.toml"));
    }

    #[test]
    fn command_line_builds_a_config_and_overrides_the_file() {
        let overrides = Overrides {
            storage: Some("/tmp/c".into()),
            upstreams: vec!["quay.io=https://mirror.example".into(), "broken".into()],
            ..Overrides::default()
        };
        assert!(
            Config::from_overrides(&overrides)
                .unwrap_err()
                .to_string()
                .contains("expected PREFIX=URL")
        );
        let overrides = Overrides {
            upstreams: vec!["quay.io=https://mirror.example".into()],
            ..overrides
        };
        let config = Config::parse(
            "storage = \"/x\"\n[[upstream]]\nprefix = \"quay.io\"\nurl = \"https://quay.io\"\n",
            "f",
            &overrides,
        )
        .unwrap();
        assert_eq!(config.upstreams.len(), 1);
        assert_eq!(config.upstreams[0].url.as_str(), "https://mirror.example/");
        assert_eq!(config.storage, PathBuf::from("/tmp/c"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = Config::parse(
            "storage = \"/x\"\nmax_sise = \"1GB\"\n",
            "f",
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("max_sise"), "{error}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20GiB"), Some(20 << 30));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("1 PiB"), None);
        assert_eq!(parse_size("GiB"), None);
    }
}
