//! ARM access tokens: managed identity (IMDS, system- or user-assigned), client secret,
//! workload identity federation and the Azure CLI, tried in that order unless one is pinned.
//! Tokens are cached and renewed before they expire; no cron job, no CLI in production.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podfleet_provider::SecretString;
use serde_json::Value;

use crate::settings::{
    AzureEnvironment, AzureSettings, CredentialKind, DEFAULT_LOGIN_ENDPOINT, Timing,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// No configured credential produced a token; one line per credential tried.
    #[error(
        "no Azure credential produced a token ({0}); give the manager VM a managed identity, \
         or set AZURE_TENANT_ID and AZURE_CLIENT_ID with AZURE_CLIENT_SECRET or \
         AZURE_FEDERATED_TOKEN_FILE, or (development only) run az login"
    )]
    Unavailable(String),
    /// The credential in use answered with an error.
    #[error("{0}")]
    Failed(String),
}

/// One way of obtaining a token.
#[derive(Clone, Debug)]
enum Source {
    ManagedIdentity {
        endpoint: String,
        /// `client_id`, `object_id` or `msi_res_id` with its value (user-assigned identity).
        identity: Option<(&'static str, String)>,
    },
    ClientSecret {
        login: String,
        tenant: String,
        client_id: String,
        secret: SecretSource,
    },
    WorkloadIdentity {
        login: String,
        tenant: String,
        client_id: String,
        token_file: PathBuf,
    },
    AzureCli {
        program: PathBuf,
    },
}

#[derive(Clone, Debug)]
enum SecretSource {
    Value(SecretString),
    /// Read at every token request, so a rotated secret is picked up.
    File(PathBuf),
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::ManagedIdentity { .. } => "managed identity (IMDS)",
            Source::ClientSecret { .. } => "client secret",
            Source::WorkloadIdentity { .. } => "workload identity",
            Source::AzureCli { .. } => "Azure CLI",
        }
    }
}

/// A why-this-source-failed that tells the chain whether to move on.
enum Attempt {
    /// Not usable here (no IMDS, no `az`, not configured): try the next source.
    Unavailable(String),
    Failed(String),
}

struct Token {
    value: SecretString,
    expires_at: SystemTime,
}

pub struct TokenProvider {
    http: reqwest::Client,
    /// IMDS must not go through a proxy.
    imds_http: reqwest::Client,
    audience: String,
    sources: Vec<Source>,
    chosen: Mutex<Option<usize>>,
    cache: tokio::sync::Mutex<Option<Token>>,
    timing: Timing,
    fetched: std::sync::atomic::AtomicU64,
}

impl TokenProvider {
    pub fn new(
        settings: &AzureSettings,
        environment: &AzureEnvironment,
        timing: &Timing,
    ) -> Result<Self, String> {
        let login = settings
            .login_endpoint
            .clone()
            .or_else(|| environment.authority_host.clone())
            .unwrap_or_else(|| DEFAULT_LOGIN_ENDPOINT.into())
            .trim_end_matches('/')
            .to_string();
        let tenant = settings
            .tenant_id
            .clone()
            .or_else(|| environment.tenant_id.clone());
        let client_id = settings
            .client_id
            .clone()
            .or_else(|| environment.client_id.clone());
        let secret = settings
            .client_secret_file
            .clone()
            .map(SecretSource::File)
            .or_else(|| environment.client_secret.clone().map(SecretSource::Value));
        let token_file = settings
            .federated_token_file
            .clone()
            .or_else(|| environment.federated_token_file.clone());

        let identity = if let Some(id) = &settings.managed_identity_resource_id {
            Some(("msi_res_id", id.clone()))
        } else if let Some(id) = &settings.managed_identity_object_id {
            Some(("object_id", id.clone()))
        } else {
            // A client id with no secret or token file names a user-assigned identity.
            client_id
                .clone()
                .filter(|_| secret.is_none() && token_file.is_none())
                .map(|id| ("client_id", id))
        };
        let managed = Source::ManagedIdentity {
            endpoint: settings.imds_endpoint.trim_end_matches('/').to_string(),
            identity,
        };
        let client_secret = match (&tenant, &client_id, &secret) {
            (Some(tenant), Some(client_id), Some(secret)) => Some(Source::ClientSecret {
                login: login.clone(),
                tenant: tenant.clone(),
                client_id: client_id.clone(),
                secret: secret.clone(),
            }),
            _ => None,
        };
        let workload = match (&tenant, &client_id, &token_file) {
            (Some(tenant), Some(client_id), Some(file)) => Some(Source::WorkloadIdentity {
                login: login.clone(),
                tenant: tenant.clone(),
                client_id: client_id.clone(),
                token_file: file.clone(),
            }),
            _ => None,
        };
        let cli = Source::AzureCli {
            program: settings.azure_cli.clone(),
        };
        let sources = match settings.credential {
            CredentialKind::Auto => [Some(managed), client_secret, workload, Some(cli)]
                .into_iter()
                .flatten()
                .collect(),
            CredentialKind::ManagedIdentity => vec![managed],
            CredentialKind::ClientSecret => vec![client_secret.ok_or(
                "credential = \"client_secret\" needs tenant_id, client_id and a secret \
                 (plugin_config.client_secret_file or AZURE_CLIENT_SECRET)",
            )?],
            CredentialKind::WorkloadIdentity => vec![workload.ok_or(
                "credential = \"workload_identity\" needs tenant_id, client_id and \
                 federated_token_file (or AZURE_TENANT_ID, AZURE_CLIENT_ID, \
                 AZURE_FEDERATED_TOKEN_FILE)",
            )?],
            CredentialKind::AzureCli => vec![cli],
        };
        let http = reqwest::Client::builder()
            .timeout(timing.request_timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let imds_http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timing.imds_probe_timeout)
            .timeout(timing.request_timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            imds_http,
            audience: settings.arm_audience.clone(),
            sources,
            chosen: Mutex::new(None),
            cache: tokio::sync::Mutex::new(None),
            timing: timing.clone(),
            fetched: Default::default(),
        })
    }

    /// Tokens obtained from a source so far (not from the cache).
    pub fn tokens_fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Name of the credential in use, once one produced a token.
    pub fn credential_in_use(&self) -> Option<&'static str> {
        let chosen = *self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        chosen.map(|index| self.sources[index].name())
    }

    /// A valid token, from the cache unless it expires within the refresh margin.
    pub async fn token(&self) -> Result<SecretString, TokenError> {
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.as_ref()
            && token.expires_at > SystemTime::now() + self.timing.token_refresh_margin
        {
            return Ok(token.value.clone());
        }
        let token = self.fetch().await?;
        let value = token.value.clone();
        *cache = Some(token);
        Ok(value)
    }

    /// Forgets the cached token (ARM said it expired or was revoked).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    async fn fetch(&self) -> Result<Token, TokenError> {
        let chosen = *self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(index) = chosen {
            // Once a credential worked, stay with it: a stray CLI login must never be
            // picked up because the managed identity had a bad minute.
            return match self.fetch_from(&self.sources[index]).await {
                Ok(token) => Ok(token),
                Err(Attempt::Unavailable(why) | Attempt::Failed(why)) => Err(TokenError::Failed(
                    format!("{}: {why}", self.sources[index].name()),
                )),
            };
        }
        let mut reasons = Vec::new();
        for (index, source) in self.sources.iter().enumerate() {
            match self.fetch_from(source).await {
                Ok(token) => {
                    tracing::info!(credential = source.name(), "azure: using credential");
                    *self.chosen.lock().unwrap_or_else(|e| e.into_inner()) = Some(index);
                    return Ok(token);
                }
                Err(Attempt::Unavailable(why)) => reasons.push(format!("{}: {why}", source.name())),
                Err(Attempt::Failed(why)) => {
                    return Err(TokenError::Failed(format!("{}: {why}", source.name())));
                }
            }
        }
        Err(TokenError::Unavailable(reasons.join("; ")))
    }

    async fn fetch_from(&self, source: &Source) -> Result<Token, Attempt> {
        let token = match source {
            Source::ManagedIdentity { endpoint, identity } => {
                self.managed_identity(endpoint, identity.as_ref()).await
            }
            Source::ClientSecret {
                login,
                tenant,
                client_id,
                secret,
            } => {
                let secret = match secret {
                    SecretSource::Value(secret) => secret.clone(),
                    SecretSource::File(path) => SecretString::new(
                        tokio::fs::read_to_string(path)
                            .await
                            .map_err(|e| {
                                Attempt::Failed(format!(
                                    "cannot read client_secret_file {}: {e}",
                                    path.display()
                                ))
                            })?
                            .trim(),
                    ),
                };
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    ("scope", &format!("{}.default", self.audience)),
                ];
                self.entra_token(login, tenant, &form).await
            }
            Source::WorkloadIdentity {
                login,
                tenant,
                client_id,
                token_file,
            } => {
                // Re-read every time: the projected token is rotated on disk.
                let assertion = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                    Attempt::Failed(format!(
                        "cannot read federated token file {}: {e}",
                        token_file.display()
                    ))
                })?;
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.trim()),
                    ("scope", &format!("{}.default", self.audience)),
                ];
                self.entra_token(login, tenant, &form).await
            }
            Source::AzureCli { program } => self.azure_cli(program).await,
        }?;
        self.fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(token)
    }

    async fn managed_identity(
        &self,
        endpoint: &str,
        identity: Option<&(&'static str, String)>,
    ) -> Result<Token, Attempt> {
        let mut query = vec![
            ("api-version", "2018-02-01".to_string()),
            ("resource", self.audience.clone()),
        ];
        if let Some((key, value)) = identity {
            query.push((key, value.clone()));
        }
        let url = format!("{endpoint}/metadata/identity/oauth2/token");
        // IMDS retry guidance: 404, 410, 429 and 5xx are retried with growing waits.
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let sent = self
                .imds_http
                .get(&url)
                .header("Metadata", "true")
                .query(&query)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                // Off Azure nothing answers on the IMDS address: move on at once.
                Err(e) if e.is_connect() || e.is_timeout() => {
                    return Err(Attempt::Unavailable(format!(
                        "no instance metadata service at {endpoint} ({})",
                        error_chain(&e)
                    )));
                }
                Err(e) => return Err(Attempt::Failed(format!("{url}: {}", error_chain(&e)))),
            };
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if status == 200 {
                return parse_token(&body, "access_token", self.now()).map_err(Attempt::Failed);
            }
            let retryable = matches!(status, 404 | 410 | 429) || status >= 500;
            if retryable && attempt < 5 {
                tokio::time::sleep(self.timing.seconds(f64::from(2u32.pow(attempt)))).await;
                continue;
            }
            let why = format!("IMDS answered {status}: {}", oauth_error(&body));
            // 400: this VM has no (such) managed identity. 403, or an answer that is not
            // IMDS's JSON: a proxy or firewall answered for the link-local address, so
            // there is no IMDS here either.
            let from_imds =
                serde_json::from_str::<Value>(&body).is_ok_and(|json| json.get("error").is_some());
            return Err(if status == 400 || status == 403 || !from_imds {
                Attempt::Unavailable(why)
            } else {
                Attempt::Failed(why)
            });
        }
    }

    async fn entra_token(
        &self,
        login: &str,
        tenant: &str,
        form: &[(&str, &str)],
    ) -> Result<Token, Attempt> {
        let url = format!("{login}/{tenant}/oauth2/v2.0/token");
        let body = form
            .iter()
            .map(|(key, value)| format!("{}={}", percent_encode(key), percent_encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .http
            .post(&url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| Attempt::Failed(format!("{url}: {}", error_chain(&e))))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        if status != 200 {
            return Err(Attempt::Failed(format!(
                "{url} answered {status}: {}",
                oauth_error(&text)
            )));
        }
        parse_token(&text, "access_token", self.now()).map_err(Attempt::Failed)
    }

    async fn azure_cli(&self, program: &PathBuf) -> Result<Token, Attempt> {
        let run = tokio::process::Command::new(program)
            .args([
                "account",
                "get-access-token",
                "--resource",
                &self.audience,
                "--output",
                "json",
            ])
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(self.timing.request_timeout, run).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                return Err(Attempt::Unavailable(format!(
                    "cannot run {}: {e}",
                    program.display()
                )));
            }
            Err(_) => {
                return Err(Attempt::Unavailable(format!(
                    "{} account get-access-token did not answer in time",
                    program.display()
                )));
            }
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(Attempt::Unavailable(format!(
                "{} account get-access-token failed ({}): {}",
                program.display(),
                output.status,
                stderr.trim()
            )));
        }
        parse_cli_token(&String::from_utf8_lossy(&output.stdout)).map_err(Attempt::Failed)
    }

    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Reads an OAuth token answer. `expires_on` (Unix seconds) wins over `expires_in`;
/// both may be JSON strings or numbers (IMDS sends strings, Entra numbers).
fn parse_token(body: &str, field: &str, now: SystemTime) -> Result<Token, String> {
    let json: Value =
        serde_json::from_str(body).map_err(|e| format!("token answer is not JSON ({e})"))?;
    let value = json
        .get(field)
        .and_then(Value::as_str)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| format!("token answer has no {field}"))?;
    let expires_at = if let Some(on) = json.get("expires_on").and_then(number_or_string) {
        UNIX_EPOCH + Duration::from_secs(on)
    } else if let Some(within) = json.get("expires_in").and_then(number_or_string) {
        now + Duration::from_secs(within)
    } else {
        return Err("token answer has neither expires_on nor expires_in".into());
    };
    Ok(Token {
        value: SecretString::new(value),
        expires_at,
    })
}

/// `az account get-access-token` output: `expires_on` (CLI ≥ 2.54) or the local-time
/// `expiresOn` string of older versions.
fn parse_cli_token(stdout: &str) -> Result<Token, String> {
    let json: Value = serde_json::from_str(stdout)
        .map_err(|e| format!("az account get-access-token printed no JSON ({e})"))?;
    let value = json
        .get("accessToken")
        .and_then(Value::as_str)
        .ok_or("az account get-access-token printed no accessToken")?;
    let expires_at = if let Some(on) = json.get("expires_on").and_then(number_or_string) {
        UNIX_EPOCH + Duration::from_secs(on)
    } else {
        let text = json
            .get("expiresOn")
            .and_then(Value::as_str)
            .ok_or("az account get-access-token printed no expiry")?;
        let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .map_err(|e| format!("az expiresOn {text:?}: {e}"))?;
        let local = naive
            .and_local_timezone(chrono::Local)
            .earliest()
            .ok_or_else(|| format!("az expiresOn {text:?} does not exist in local time"))?;
        UNIX_EPOCH + Duration::from_secs(u64::try_from(local.timestamp()).unwrap_or(0))
    };
    Ok(Token {
        value: SecretString::new(value),
        expires_at,
    })
}

fn number_or_string(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `error_description` (or `error`) of an OAuth error answer; never the request.
fn oauth_error(body: &str) -> String {
    let json: Option<Value> = serde_json::from_str(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    field("error_description")
        .or_else(|| field("error"))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// `application/x-www-form-urlencoded` / query encoding of one value.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// An error with its sources, for messages (reqwest hides the cause in the chain).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_string_expiry_and_entra_number_expiry_both_parse() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let imds = parse_token(
            r#"{"access_token":"t","expires_in":"3599","expires_on":"1506484173","token_type":"Bearer"}"#,
            "access_token",
            now,
        )
        .unwrap();
        assert_eq!(
            imds.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_506_484_173)
        );
        let entra = parse_token(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"t"}"#,
            "access_token",
            now,
        )
        .unwrap();
        assert_eq!(entra.expires_at, now + Duration::from_secs(3599));
        assert!(parse_token(r#"{"access_token":"t"}"#, "access_token", now).is_err());
    }

    #[test]
    fn cli_output_old_and_new() {
        let new = parse_cli_token(
            r#"{"accessToken":"t","expiresOn":"2021-09-27 16:16:30.921462","expires_on":1632755790,"tokenType":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(
            new.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_632_755_790)
        );
        let old =
            parse_cli_token(r#"{"accessToken":"t","expiresOn":"2021-09-27 16:16:30.921462"}"#)
                .unwrap();
        let naive =
            chrono::NaiveDateTime::parse_from_str("2021-09-27 16:16:30", "%Y-%m-%d %H:%M:%S")
                .unwrap();
        let expected = naive.and_local_timezone(chrono::Local).earliest().unwrap();
        assert_eq!(
            old.expires_at,
            UNIX_EPOCH + Duration::from_secs(expected.timestamp() as u64)
        );
    }

    #[test]
    fn form_encoding_escapes_reserved_characters() {
        assert_eq!(
            percent_encode("https://management.azure.com/.default"),
            "https%3A%2F%2Fmanagement.azure.com%2F.default"
        );
        assert_eq!(percent_encode("a b+c&d=e"), "a%20b%2Bc%26d%3De");
    }

    #[test]
    fn oauth_errors_show_the_description_only() {
        assert_eq!(
            oauth_error(
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#
            ),
            "AADSTS7000215: Invalid client secret provided."
        );
    }
}
