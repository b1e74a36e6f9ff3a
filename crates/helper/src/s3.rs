//! The shared S3 cache, manager side: AWS Signature Version 4 query presigning of one GET
//! URL per restore key and one PUT URL per save key. Instances get only the URLs, never the
//! keys, and each URL expires with the job.

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use podfleet_config::{CacheConfig, RunnerConfig};
use podfleet_coordinator::model::Secret;
use sha2::{Digest, Sha256};

use crate::job::RemoteCache;

const AWS_HOST: &str = "s3.amazonaws.com";
/// SigV4 presigned URLs may live 7 days at most.
const MAX_EXPIRY_SECONDS: u64 = 7 * 24 * 3600;
/// Cache save runs after the script, so URLs outlive the job timeout by this margin.
const EXPIRY_MARGIN_SECONDS: u64 = 3600;

/// A runner's `[runners.cache]` together with the runner identity its object names use.
#[derive(Debug, Clone)]
pub struct SharedCache<'a> {
    pub config: &'a CacheConfig,
    /// gitlab-runner's short token of the runner (the `runner/<short token>/` prefix).
    pub runner_short_token: String,
}

impl<'a> SharedCache<'a> {
    /// The runner's shared cache, or `None` when `[runners.cache]` sets no `Type` (caches then
    /// stay on the instance, in its cache volume).
    pub fn of_runner(runner: &'a RunnerConfig) -> Option<Self> {
        let config = runner.cache.as_ref()?;
        config.cache_type.as_ref()?;
        Some(SharedCache {
            config,
            runner_short_token: runner.short_token(),
        })
    }
}

/// Presigns cache URLs for one job.
pub(crate) struct CacheSigner {
    credentials: Credentials,
    endpoint: Endpoint,
    /// `<Path>/[runner/<short token>/]project/<id>/`.
    object_prefix: String,
    max_upload_size: u64,
}

/// What SigV4 needs to sign.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: Secret,
    pub session_token: Option<Secret>,
    pub region: String,
}

/// Where the bucket is: scheme + host, and whether the bucket is in the path or the host.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub scheme: &'static str,
    pub host: String,
    pub bucket: String,
    pub path_style: bool,
}

impl Endpoint {
    /// `(host header, path)` of `object` in the bucket, the path not yet URI-encoded.
    fn locate(&self, object: &str) -> (String, String) {
        if self.path_style {
            (self.host.clone(), format!("/{}/{object}", self.bucket))
        } else {
            (
                format!("{}.{}", self.bucket, self.host),
                format!("/{object}"),
            )
        }
    }
}

impl CacheSigner {
    pub(crate) fn from_config(shared: &SharedCache<'_>, project_id: u64) -> Result<Self, String> {
        let config = shared.config;
        let s3 = config
            .s3
            .as_ref()
            .ok_or("Type is \"s3\" but [runners.cache.s3] is missing")?;
        let access_key = s3
            .access_key
            .as_ref()
            .filter(|key| !key.is_empty())
            .ok_or("[runners.cache.s3] AccessKey is missing")?;
        let secret_key = s3
            .secret_key
            .as_ref()
            .filter(|key| !key.is_empty())
            .ok_or("[runners.cache.s3] SecretKey is missing")?;
        let host = s3
            .server_address
            .clone()
            .unwrap_or_else(|| AWS_HOST.to_owned());
        let path_style = s3.path_style.unwrap_or(host != AWS_HOST);
        let mut object_prefix = String::new();
        if let Some(path) = config.path.as_deref().map(|path| path.trim_matches('/'))
            && !path.is_empty()
        {
            object_prefix.push_str(path);
            object_prefix.push('/');
        }
        if !config.shared {
            object_prefix.push_str(&format!("runner/{}/", shared.runner_short_token));
        }
        object_prefix.push_str(&format!("project/{project_id}/"));
        Ok(CacheSigner {
            credentials: Credentials {
                access_key: access_key.expose().to_owned(),
                secret_key: Secret::new(secret_key.expose()),
                session_token: s3
                    .session_token
                    .as_ref()
                    .filter(|token| !token.is_empty())
                    .map(|token| Secret::new(token.expose())),
                region: s3
                    .bucket_location
                    .clone()
                    .filter(|region| !region.is_empty())
                    .unwrap_or_else(|| "us-east-1".to_owned()),
            },
            endpoint: Endpoint {
                scheme: if s3.insecure { "http" } else { "https" },
                host,
                bucket: s3.bucket_name.clone(),
                path_style,
            },
            object_prefix,
            max_upload_size: u64::try_from(config.max_uploaded_archive_size).unwrap_or(0),
        })
    }

    /// The URLs of one cache entry: GET for `key` then each fallback key, PUT for `key`.
    pub(crate) fn presign(
        &self,
        key: &str,
        fallback_keys: &[String],
        job_timeout_seconds: u64,
        now: DateTime<Utc>,
    ) -> RemoteCache {
        let expires = (job_timeout_seconds + EXPIRY_MARGIN_SECONDS).min(MAX_EXPIRY_SECONDS);
        let url = |method: &str, key: &str| {
            let object = format!("{}{key}", self.object_prefix);
            Secret::new(presign_url(
                &self.credentials,
                &self.endpoint,
                method,
                &object,
                expires,
                now,
            ))
        };
        RemoteCache {
            download_urls: std::iter::once(key)
                .chain(fallback_keys.iter().map(String::as_str))
                .map(|key| url("GET", key))
                .collect(),
            upload_url: url("PUT", key),
            max_upload_size: self.max_upload_size,
        }
    }
}

/// A SigV4 presigned URL (`X-Amz-*` query parameters, only `host` signed, unsigned payload).
pub fn presign_url(
    credentials: &Credentials,
    endpoint: &Endpoint,
    method: &str,
    object: &str,
    expires_seconds: u64,
    now: DateTime<Utc>,
) -> String {
    let (host, path) = endpoint.locate(object);
    let date = now.format("%Y%m%d").to_string();
    let timestamp = now.format("%Y%m%dT%H%M%SZ").to_string();
    let scope = format!("{date}/{}/s3/aws4_request", credentials.region);
    let mut query = vec![
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_owned()),
        (
            "X-Amz-Credential",
            format!("{}/{scope}", credentials.access_key),
        ),
        ("X-Amz-Date", timestamp.clone()),
        ("X-Amz-Expires", expires_seconds.to_string()),
        ("X-Amz-SignedHeaders", "host".to_owned()),
    ];
    if let Some(token) = &credentials.session_token {
        query.push(("X-Amz-Security-Token", token.expose().to_owned()));
    }
    query.sort_by(|a, b| a.0.cmp(b.0));
    let canonical_query = query
        .iter()
        .map(|(key, value)| format!("{}={}", uri_encode(key, true), uri_encode(value, true)))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_path = uri_encode(&path, false);
    let canonical_request = format!(
        "{method}\n{canonical_path}\n{canonical_query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac(
        format!("AWS4{}", credentials.secret_key.expose()).as_bytes(),
        date.as_bytes(),
    );
    for part in [credentials.region.as_bytes(), b"s3", b"aws4_request"] {
        key = hmac(&key, part);
    }
    let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
    format!(
        "{}://{host}{canonical_path}?{canonical_query}&X-Amz-Signature={signature}",
        endpoint.scheme
    )
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// SigV4's URI encoding: every byte but `A-Z a-z 0-9 - _ . ~` as `%XX`; `/` kept in paths.
fn uri_encode(text: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char);
            }
            b'/' if !encode_slash => out.push('/'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The example of AWS's "Authenticating Requests: Using Query Parameters (AWS Signature
    /// Version 4)" page (Amazon S3 API reference, sigv4-query-string-auth): a presigned GET of
    /// `test.txt` in `examplebucket`, valid 86400 s from 2013-05-24T00:00:00Z.
    #[test]
    fn matches_the_aws_documented_example_signature() {
        let credentials = Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".to_owned(),
            secret_key: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: None,
            region: "us-east-1".to_owned(),
        };
        let endpoint = Endpoint {
            scheme: "https",
            host: AWS_HOST.to_owned(),
            bucket: "examplebucket".to_owned(),
            path_style: false,
        };
        let now = Utc.with_ymd_and_hms(2013, 5, 24, 0, 0, 0).unwrap();
        let url = presign_url(&credentials, &endpoint, "GET", "test.txt", 86400, now);
        assert_eq!(
            url,
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn object_keys_are_encoded_segment_by_segment() {
        assert_eq!(uri_encode("/b/a key/x+y", false), "/b/a%20key/x%2By");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
    }
}
