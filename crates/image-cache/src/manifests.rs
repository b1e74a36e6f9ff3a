//! Manifests: by digest cached for good (immutable); by tag through a tag record with a TTL,
//! revalidated with a HEAD (free against Docker Hub's pull limit), and served stale when the
//! upstream is down, failing, rate-limiting or hanging past the response deadline —
//! also right after a restart, since tag records live on disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderValue, Method, StatusCode, header};

use crate::error::RegistryError;
use crate::manifest::{self, ACCEPT};
use crate::metrics::add;
use crate::reference::{Digest, Reference};
use crate::server::App;
use crate::storage::{ObjectKind, TagRecord, now_ms};
use crate::upstream::Upstream;

/// One async lock per key, so concurrent requests for the same tag or manifest share one
/// upstream round trip.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(key).or_default().clone()
        };
        lock.lock_owned().await
    }
}

pub async fn serve_manifest(
    app: &Arc<App>,
    upstream: &Arc<Upstream>,
    repository: &str,
    reference: &Reference,
    method: &Method,
) -> Result<Response, RegistryError> {
    let head = method == Method::HEAD;
    match reference {
        Reference::Digest(digest) => {
            let bytes = manifest_by_digest(app, upstream, repository, digest).await?;
            respond(&bytes, digest, head)
        }
        Reference::Tag(tag) => {
            let (digest, bytes) = manifest_by_tag(app, upstream, repository, tag).await?;
            respond(&bytes, &digest, head)
        }
    }
}

fn respond(bytes: &[u8], digest: &Digest, head: bool) -> Result<Response, RegistryError> {
    let parsed = manifest::validate(bytes).map_err(|problem| {
        RegistryError::manifest_invalid(format!("cached manifest {digest} is invalid: {problem}"))
    })?;
    let mut response = Response::new(if head {
        Body::empty()
    } else {
        Body::from(bytes.to_vec())
    });
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(parsed.media_type),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("a digest is a valid header"),
    );
    Ok(response)
}

async fn manifest_by_digest(
    app: &Arc<App>,
    upstream: &Upstream,
    repository: &str,
    digest: &Digest,
) -> Result<Vec<u8>, RegistryError> {
    if let Some(bytes) = app.store.read_manifest(digest) {
        add(&app.metrics.manifest_hits, 1);
        return Ok(bytes);
    }
    let _guard = app.locks.lock(format!("manifest\n{digest}")).await;
    if let Some(bytes) = app.store.read_manifest(digest) {
        add(&app.metrics.manifest_hits, 1);
        return Ok(bytes);
    }
    add(&app.metrics.manifest_misses, 1);
    let (actual, bytes) = fetch(app, upstream, repository, &digest.to_string()).await?;
    if &actual != digest {
        add(&app.metrics.rejected, 1);
        return Err(RegistryError::digest_invalid(
            StatusCode::BAD_GATEWAY,
            format!(
                "upstream {} sent manifest {actual} for {repository}@{digest}; not cached, not served",
                upstream.prefix
            ),
        ));
    }
    store_manifest(app, digest, &bytes);
    Ok(bytes.to_vec())
}

async fn manifest_by_tag(
    app: &Arc<App>,
    upstream: &Upstream,
    repository: &str,
    tag: &str,
) -> Result<(Digest, Vec<u8>), RegistryError> {
    if let Some(hit) = fresh_tag(app, upstream, repository, tag) {
        add(&app.metrics.manifest_hits, 1);
        return Ok(hit);
    }
    let _guard = app
        .locks
        .lock(format!("tag\n{}\n{repository}\n{tag}", upstream.prefix))
        .await;
    if let Some(hit) = fresh_tag(app, upstream, repository, tag) {
        add(&app.metrics.manifest_hits, 1);
        return Ok(hit);
    }
    let cached = app
        .store
        .tag(&upstream.prefix, repository, tag)
        .and_then(|record| {
            let digest = Digest::parse(&record.digest).ok()?;
            let bytes = app.store.read_manifest(&digest)?;
            Some((record, digest, bytes))
        });
    let Some((record, digest, bytes)) = cached else {
        add(&app.metrics.manifest_misses, 1);
        return fetch_tag(app, upstream, repository, tag).await;
    };
    add(&app.metrics.revalidations, 1);
    let serve_stale = |reason: String| {
        add(&app.metrics.stale_served, 1);
        tracing::warn!(upstream = %upstream.prefix, %repository, %tag, %digest, %reason, "serving the cached tag: revalidation failed");
        Ok((digest.clone(), bytes.clone()))
    };
    let head = upstream
        .send(
            Method::HEAD,
            repository,
            &format!("manifests/{tag}"),
            Some(ACCEPT),
        )
        .await;
    match head {
        Ok(response) if response.status().is_success() => {
            let upstream_digest = response
                .headers()
                .get("docker-content-digest")
                .and_then(|value| value.to_str().ok())
                .and_then(|text| Digest::parse(text).ok());
            if upstream_digest.as_ref() == Some(&digest) {
                add(&app.metrics.manifest_hits, 1);
                put_tag(
                    app,
                    TagRecord {
                        checked_at_ms: now_ms(),
                        ..record
                    },
                );
                return Ok((digest, bytes));
            }
            add(&app.metrics.manifest_misses, 1);
            match fetch_tag(app, upstream, repository, tag).await {
                Ok(fetched) => Ok(fetched),
                Err(error) if error.status == StatusCode::NOT_FOUND => Err(error),
                Err(error) => serve_stale(error.to_string()),
            }
        }
        Ok(response) if response.status() == StatusCode::NOT_FOUND => {
            app.store.remove_tag(&upstream.prefix, repository, tag);
            Err(RegistryError::manifest_unknown(format!(
                "{repository}:{tag} no longer exists upstream {}",
                upstream.prefix
            )))
        }
        Ok(response) => serve_stale(format!("upstream answered {}", response.status())),
        Err(error) => serve_stale(format!("{error:?}")),
    }
}

fn fresh_tag(
    app: &App,
    upstream: &Upstream,
    repository: &str,
    tag: &str,
) -> Option<(Digest, Vec<u8>)> {
    let record = app.store.tag(&upstream.prefix, repository, tag)?;
    let age = Duration::from_millis(now_ms().saturating_sub(record.checked_at_ms));
    if age >= app.tag_ttl {
        return None;
    }
    let digest = Digest::parse(&record.digest).ok()?;
    let bytes = app.store.read_manifest(&digest)?;
    Some((digest, bytes))
}

async fn fetch_tag(
    app: &Arc<App>,
    upstream: &Upstream,
    repository: &str,
    tag: &str,
) -> Result<(Digest, Vec<u8>), RegistryError> {
    let (digest, bytes) = fetch(app, upstream, repository, tag).await?;
    store_manifest(app, &digest, &bytes);
    put_tag(
        app,
        TagRecord {
            upstream: upstream.prefix.clone(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            digest: digest.to_string(),
            checked_at_ms: now_ms(),
        },
    );
    Ok((digest, bytes.to_vec()))
}

fn store_manifest(app: &Arc<App>, digest: &Digest, bytes: &[u8]) {
    if let Err(error) = app.store.put_small(ObjectKind::Manifest, digest, bytes) {
        tracing::warn!(%digest, %error, "manifest served without caching");
    }
}

fn put_tag(app: &App, record: TagRecord) {
    if let Err(error) = app.store.put_tag(&record) {
        tracing::warn!(repository = %record.repository, tag = %record.tag, %error, "cannot record the tag; it will be fetched again");
    }
}

/// GETs a manifest, reads it within the response deadline and size limit, checks that it
/// matches the digest the upstream announced and that it is a well-formed manifest.
async fn fetch(
    app: &App,
    upstream: &Upstream,
    repository: &str,
    reference: &str,
) -> Result<(Digest, Bytes), RegistryError> {
    let what = format!("manifest {repository}:{reference}");
    let response = upstream
        .send(
            Method::GET,
            repository,
            &format!("manifests/{reference}"),
            Some(ACCEPT),
        )
        .await
        .map_err(|error| error.into_registry(&upstream.prefix, &what))?;
    match response.status() {
        status if status.is_success() => {}
        StatusCode::NOT_FOUND => {
            return Err(RegistryError::manifest_unknown(format!(
                "{what} is not known upstream {}",
                upstream.prefix
            )));
        }
        status => {
            return Err(RegistryError::unavailable(
                StatusCode::BAD_GATEWAY,
                format!("upstream {} answered {status} for {what}", upstream.prefix),
            ));
        }
    }
    let announced = response
        .headers()
        .get("docker-content-digest")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let limit = app.max_manifest_size;
    if response
        .content_length()
        .is_some_and(|length| length > limit)
    {
        add(&app.metrics.rejected, 1);
        return Err(RegistryError::manifest_invalid(format!(
            "{what} from upstream {} is larger than max_manifest_size {limit}",
            upstream.prefix
        )));
    }
    let body = tokio::time::timeout(upstream.response_timeout(), async {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| {
                RegistryError::unavailable(
                    StatusCode::BAD_GATEWAY,
                    format!("{what} broke off: {error}"),
                )
            })?;
            add(&app.metrics.upstream_bytes, chunk.len() as u64);
            if (body.len() + chunk.len()) as u64 > limit {
                add(&app.metrics.rejected, 1);
                return Err(RegistryError::manifest_invalid(format!(
                    "{what} from upstream {} is larger than max_manifest_size {limit}",
                    upstream.prefix
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    })
    .await
    .map_err(|_| {
        RegistryError::unavailable(
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream {} did not send {what} in time", upstream.prefix),
        )
    })??;
    let digest = Digest::of(&body);
    if let Some(announced) = announced
        && announced != digest.to_string()
    {
        add(&app.metrics.rejected, 1);
        return Err(RegistryError::digest_invalid(
            StatusCode::BAD_GATEWAY,
            format!(
                "upstream {} announced {announced} for {what} but sent content with digest {digest}; not cached, not served",
                upstream.prefix
            ),
        ));
    }
    if let Err(problem) = manifest::validate(&body) {
        add(&app.metrics.rejected, 1);
        return Err(RegistryError::manifest_invalid(format!(
            "upstream {} sent a malformed {what}: {problem}; not cached, not served",
            upstream.prefix
        )));
    }
    Ok((digest, body))
}
