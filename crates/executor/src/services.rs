//! Service containers: their network aliases (derived from the image name as gitlab-runner
//! derives them, plus explicit ones) and the probe that waits for their exposed ports.

use crate::script::{Variable, quote};

/// A service container of a job.
#[derive(Clone, Debug, Default)]
pub struct ServiceSpec {
    pub image: String,
    /// Explicit aliases (already split at `,` and spaces).
    pub aliases: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    /// Its environment: the job's public variables, then the service's own.
    pub variables: Vec<Variable>,
    /// The job's `pull_policy` for this service (empty: the runner's).
    pub pull_policy: Vec<String>,
    /// Ports the job declared for it (besides the image's `ExposedPorts`).
    pub ports: Vec<u16>,
}

impl ServiceSpec {
    /// Every alias of the service: the two name-derived ones, then the explicit ones, with
    /// duplicates and names that are not valid host names dropped.
    pub fn all_aliases(&self) -> Vec<String> {
        let mut aliases = derived_aliases(&self.image);
        for alias in &self.aliases {
            if !aliases.contains(alias) {
                aliases.push(alias.clone());
            }
        }
        aliases.retain(|alias| valid_alias(alias));
        aliases
    }
}

/// `registry.example.com/group/img:tag` → `registry.example.com__group__img` and
/// `registry.example.com-group-img` (tag and digest dropped), as gitlab-runner does.
pub fn derived_aliases(image: &str) -> Vec<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let name = match without_digest.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => without_digest,
    };
    let first = name.replace('/', "__");
    let second = name.replace('/', "-");
    if first == second {
        vec![first]
    } else {
        vec![first, second]
    }
}

fn valid_alias(alias: &str) -> bool {
    !alias.is_empty()
        && alias.len() <= 253
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !alias.starts_with(['-', '.'])
}

/// A shell script that waits until every `host:port` accepts TCP connections, trying
/// `nc -z`, BusyBox `nc -e`, then bash's `/dev/tcp`; exits 3 when the deadline passes and
/// 4 when the image has none of those tools.
pub fn probe_script(targets: &[(String, u16)], timeout_secs: u64) -> String {
    let mut script = String::from(
        "if ! command -v nc >/dev/null 2>&1 && ! command -v bash >/dev/null 2>&1; then\n\
         echo 'podfleet: the image has neither nc nor bash to probe services with'; exit 4; fi\n\
         reachable() {\n\
         nc -z -w 1 \"$1\" \"$2\" </dev/null >/dev/null 2>&1 && return 0\n\
         nc -w 1 \"$1\" \"$2\" -e true </dev/null >/dev/null 2>&1 && return 0\n\
         command -v bash >/dev/null 2>&1 && bash -c ': >/dev/tcp/$0/$1' \"$1\" \"$2\" >/dev/null 2>&1 && return 0\n\
         return 1\n}\n",
    );
    script.push_str(&format!("deadline=$(( $(date +%s) + {timeout_secs} ))\n"));
    for (host, port) in targets {
        script.push_str(&format!(
            "until reachable {host} {port}; do\n\
             if [ \"$(date +%s)\" -ge \"$deadline\" ]; then echo \"podfleet: \"{host}\":{port} did not accept connections\"; exit 3; fi\n\
             sleep 1\ndone\n",
            host = quote(host),
        ));
    }
    script.push_str("exit 0\n");
    script
}

/// `5432/tcp` → 5432; UDP and malformed keys are not probed.
pub fn tcp_port(exposed: &str) -> Option<u16> {
    let (port, protocol) = exposed.split_once('/').unwrap_or((exposed, "tcp"));
    (protocol.eq_ignore_ascii_case("tcp"))
        .then(|| port.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_as_gitlab_runner_derives_them() {
        assert_eq!(
            derived_aliases("registry.example.com/group/img:tag"),
            vec![
                "registry.example.com__group__img",
                "registry.example.com-group-img"
            ]
        );
        assert_eq!(derived_aliases("postgres:16"), vec!["postgres"]);
        assert_eq!(
            derived_aliases("localhost:5000/db@sha256:abcd"),
            vec!["localhost:5000__db", "localhost:5000-db"]
        );
        let service = ServiceSpec {
            image: "tutum/wordpress:latest".into(),
            aliases: vec!["wp".into(), "tutum-wordpress".into(), "bad;name".into()],
            ..Default::default()
        };
        assert_eq!(
            service.all_aliases(),
            vec!["tutum__wordpress", "tutum-wordpress", "wp"]
        );
    }

    #[test]
    fn exposed_ports() {
        assert_eq!(tcp_port("5432/tcp"), Some(5432));
        assert_eq!(tcp_port("53/udp"), None);
        assert_eq!(tcp_port("80"), Some(80));
        assert_eq!(tcp_port("x/tcp"), None);
    }

    #[test]
    fn probe_waits_for_a_listener_and_gives_up_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let run = |port: u16| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(probe_script(&[("127.0.0.1".into(), port)], 1))
                .output()
                .unwrap()
        };
        let ok = run(open);
        assert_eq!(ok.status.code(), Some(0), "{ok:?}");
        let failed = run(closed);
        assert_eq!(failed.status.code(), Some(3), "{failed:?}");
        assert!(String::from_utf8_lossy(&failed.stdout).contains(&format!("127.0.0.1:{closed}")));
    }
}
