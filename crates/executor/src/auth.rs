//! Registry credentials for image pulls: the job payload's `credentials` (type `registry`) and
//! `DOCKER_AUTH_CONFIG` (a job variable or the runner's `environment`), matched to an image's
//! registry as gitlab-runner matches them. Passwords never reach `Debug` output or errors.

use base64::Engine;
use bollard::auth::DockerCredentials;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    /// Registry host as written in image names, e.g. `registry.example.com:5000`
    /// (`docker.io` for Docker Hub).
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RegistryCredential {
    pub fn new(registry: &str, username: &str, password: &str) -> Self {
        Self {
            registry: normalize_registry(registry),
            username: username.into(),
            password: password.into(),
        }
    }

    pub(crate) fn docker(&self) -> DockerCredentials {
        DockerCredentials {
            username: Some(self.username.clone()),
            password: Some(self.password.clone()),
            serveraddress: Some(self.registry.clone()),
            ..Default::default()
        }
    }
}

/// `https://index.docker.io/v1/`, `registry.example.com/`, `http://host:5000` → host form.
fn normalize_registry(text: &str) -> String {
    let text = text.trim();
    let text = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text);
    let host = text.split('/').next().unwrap_or(text).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// The registry an image reference pulls from, as Docker's reference grammar reads it:
/// the first path component when it has a `.` or `:` or is `localhost`, else Docker Hub.
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            normalize_registry(first)
        }
        _ => "docker.io".into(),
    }
}

/// Parses a `DOCKER_AUTH_CONFIG` value (`{"auths": {"host": {"auth": "base64(user:pass)"}}}`
/// or with `username`/`password`). `credHelpers`/`credsStore` need helper binaries on the
/// manager host and are reported as unsupported.
pub fn parse_docker_auth_config(text: &str) -> Result<Vec<RegistryCredential>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!("DOCKER_AUTH_CONFIG is not valid JSON ({e}); expected {{\"auths\": {{\"<registry>\": {{\"auth\": \"<base64 user:password>\"}}}}}}")
    })?;
    if value.get("credsStore").is_some() || value.get("credHelpers").is_some() {
        return Err(
            "DOCKER_AUTH_CONFIG uses credsStore/credHelpers, which podfleet does not run; put the credentials in \"auths\"".into(),
        );
    }
    let Some(auths) = value.get("auths").and_then(|a| a.as_object()) else {
        return Err("DOCKER_AUTH_CONFIG has no \"auths\" object".into());
    };
    let mut credentials = Vec::new();
    for (registry, entry) in auths {
        let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let (username, password) = if !field("auth").is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(field("auth").trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    format!("DOCKER_AUTH_CONFIG: the \"auth\" of {registry} is not base64 of user:password")
                })?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                format!("DOCKER_AUTH_CONFIG: the \"auth\" of {registry} has no ':' between user and password")
            })?;
            (user.to_string(), pass.to_string())
        } else if !field("username").is_empty() {
            (field("username").to_string(), field("password").to_string())
        } else {
            continue;
        };
        credentials.push(RegistryCredential::new(registry, &username, &password));
    }
    Ok(credentials)
}

/// The first credential for the image's registry (the list is in precedence order).
pub fn credential_for<'a>(
    credentials: &'a [RegistryCredential],
    image: &str,
) -> Option<&'a RegistryCredential> {
    let registry = registry_of(image);
    credentials.iter().find(|c| c.registry == registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_of_image_references() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(
            registry_of("registry.example.com/g/img:1"),
            "registry.example.com"
        );
        assert_eq!(registry_of("127.0.0.1:5000/img"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/podfleet/busybox"), "localhost");
    }

    #[test]
    fn docker_auth_config_both_forms() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let text = format!(
            r#"{{"auths": {{"https://127.0.0.1:5000/v2/": {{"auth": "{auth}"}}, "registry.example.com": {{"username": "bob", "password": "pw"}}, "https://index.docker.io/v1/": {{}}}}}}"#
        );
        let parsed = parse_docker_auth_config(&text).unwrap();
        assert_eq!(parsed.len(), 2);
        let local = credential_for(&parsed, "127.0.0.1:5000/img:1").unwrap();
        assert_eq!(
            (local.username.as_str(), local.password.as_str()),
            ("alice", "s3cr:et")
        );
        assert_eq!(
            credential_for(&parsed, "registry.example.com/x")
                .unwrap()
                .username,
            "bob"
        );
        assert!(credential_for(&parsed, "busybox").is_none());
        assert!(!format!("{parsed:?}").contains("s3cr"), "password in Debug");
    }

    #[test]
    fn bad_docker_auth_config_is_named_without_secrets() {
        let error =
            parse_docker_auth_config("{\"auths\": {\"r\": {\"auth\": \"!!!\"}}}").unwrap_err();
        assert!(
            error.contains("DOCKER_AUTH_CONFIG") && error.contains("base64"),
            "{error}"
        );
        let error = parse_docker_auth_config("secret-not-json").unwrap_err();
        assert!(!error.contains("secret-not-json"), "{error}");
        assert!(parse_docker_auth_config("{\"credsStore\": \"x\"}").is_err());
    }
}
