//! The HTTP side: the registry pull API under `/v2/`, routing by first path component to
//! the configured upstreams (Docker Hub also at the root and for containerd's `?ns=`),
//! optional client authentication, `/metrics`, and the garbage-collection task.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};

use crate::blobs::{self, BlobFetches};
use crate::config::{Config, DOCKER_HUB_PREFIX};
use crate::error::RegistryError;
use crate::manifests::{self, KeyedLocks};
use crate::metrics::Metrics;
use crate::reference::{Kind, Reference, parse_path, valid_repository};
use crate::storage::{Store, StoreError};
use crate::upstream::{Timeouts, Upstream};

pub struct App {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub fetches: BlobFetches,
    pub locks: KeyedLocks,
    pub tag_ttl: Duration,
    pub max_manifest_size: u64,
    routes: HashMap<String, Arc<Upstream>>,
    docker_hub: Option<Arc<Upstream>>,
    users: Option<Users>,
    gc_interval: Duration,
    gc_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
    #[error("cache server on {address}: {source}")]
    Io {
        address: String,
        source: std::io::Error,
    },
}

impl App {
    pub fn new(config: &Config) -> Result<Arc<Self>, ServeError> {
        let metrics = Arc::new(Metrics::default());
        let store = Store::open(
            &config.storage,
            config.max_size,
            config.min_free_space,
            metrics.clone(),
        )?;
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            response: config.response_timeout,
            idle: config.idle_timeout,
        };
        let mut routes = HashMap::new();
        for upstream in &config.upstreams {
            let client = Upstream::new(upstream, false, &timeouts, metrics.clone())
                .map_err(ServeError::Setup)?;
            routes.insert(upstream.prefix.clone(), Arc::new(client));
        }
        let docker_hub = match &config.docker_hub {
            Some(hub) => {
                let client = Arc::new(
                    Upstream::new(hub, true, &timeouts, metrics.clone())
                        .map_err(ServeError::Setup)?,
                );
                routes.insert(DOCKER_HUB_PREFIX.to_owned(), client.clone());
                Some(client)
            }
            None => None,
        };
        let users = config
            .client_users_file
            .as_deref()
            .map(Users::read)
            .transpose()
            .map_err(ServeError::Setup)?;
        Ok(Arc::new(Self {
            store,
            metrics,
            fetches: BlobFetches::default(),
            locks: KeyedLocks::default(),
            tag_ttl: config.tag_ttl,
            max_manifest_size: config.max_manifest_size,
            routes,
            docker_hub,
            users,
            gc_interval: config.gc_interval,
            gc_grace: config.gc_grace,
        }))
    }

    /// The upstream and the repository name to ask it for.
    fn route(
        &self,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<(Arc<Upstream>, String), RegistryError> {
        let (upstream, repository) = if let Some(namespace) = namespace {
            let upstream = self
                .routes
                .get(namespace)
                .ok_or_else(|| self.unknown_prefix(namespace))?;
            (upstream.clone(), name.to_owned())
        } else {
            match name.split_once('/') {
                Some((first, rest)) if self.routes.contains_key(first) => {
                    (self.routes[first].clone(), rest.to_owned())
                }
                _ => match &self.docker_hub {
                    Some(hub) => (hub.clone(), name.to_owned()),
                    None => return Err(self.unknown_prefix(name.split('/').next().unwrap_or(name))),
                },
            }
        };
        if !valid_repository(&repository) {
            return Err(RegistryError::name_invalid(format!(
                "invalid repository name {repository:?}: lower-case components [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'"
            )));
        }
        let repository = if upstream.docker_hub && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        Ok((upstream, repository))
    }

    fn unknown_prefix(&self, prefix: &str) -> RegistryError {
        let mut known: Vec<_> = self.routes.keys().cloned().collect();
        known.sort();
        RegistryError::name_unknown(format!(
            "no upstream is configured for prefix {prefix:?} (configured: {}); this cache is not an open proxy",
            known.join(", ")
        ))
    }

    fn check_client(&self, headers: &HeaderMap) -> Result<(), RegistryError> {
        match &self.users {
            None => Ok(()),
            Some(users) if users.allows(headers) => Ok(()),
            Some(_) => Err(RegistryError::unauthorized()),
        }
    }
}

/// Client users: `USERNAME:sha256:<hex of sha256(password)>` per line.
struct Users {
    hashes: HashMap<String, String>,
}

impl Users {
    fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            format!("cannot read client users file {}: {error}", path.display())
        })?;
        let mut hashes = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(":sha256:") {
                Some((user, hash))
                    if !user.is_empty()
                        && hash.len() == 64
                        && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    hashes.insert(user.to_owned(), hash.to_ascii_lowercase());
                }
                _ => {
                    return Err(format!(
                        "client users file {}:{}: expected USERNAME:sha256:<64 hex> (e.g. from `printf %s PASSWORD | sha256sum`)",
                        path.display(),
                        number + 1
                    ));
                }
            }
        }
        Ok(Self { hashes })
    }

    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(encoded) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        let Some(expected) = self.hashes.get(user) else {
            return false;
        };
        let actual = crate::reference::Digest::of(password.as_bytes());
        // Compare without an early exit: the time taken does not tell how much matched.
        actual
            .hex()
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v2", get(version_check).head(version_check))
        .route("/v2/", get(version_check).head(version_check))
        .route("/v2/{*rest}", any(registry))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            RegistryError::new(
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
                "not a registry API path: use /v2/...",
            )
        })
        .with_state(app)
}

async fn version_check(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(error) = app.check_client(&headers) {
        return error.into_response();
    }
    let mut response = (StatusCode::OK, "{}").into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut response = app.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Every `/v2/...` request. The request body is never read: uploads are refused up front.
async fn registry(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match handle(&app, &method, &uri, &headers).await {
        Ok(mut response) => {
            response.headers_mut().insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            response
        }
        Err(error) => {
            if error.status.is_server_error() {
                tracing::warn!(%method, path = %uri.path(), %error, "request failed");
            } else {
                tracing::debug!(%method, path = %uri.path(), %error, "request refused");
            }
            if method == Method::HEAD {
                let mut response = error.into_response();
                *response.body_mut() = axum::body::Body::empty();
                response
            } else {
                error.into_response()
            }
        }
    }
}

async fn handle(
    app: &Arc<App>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    app.check_client(headers)?;
    if method != Method::GET && method != Method::HEAD {
        return Err(RegistryError::unsupported(format!(
            "{method} is not supported: this is a read-only pull-through cache; push to the upstream registry"
        )));
    }
    let rest = uri.path().strip_prefix("/v2/").unwrap_or_default();
    let path = parse_path(rest)?;
    let namespace = uri.query().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("ns="))
            .map(str::to_owned)
    });
    let (upstream, repository) = app.route(&path.name, namespace.as_deref())?;
    match (path.kind, &path.reference) {
        (Kind::Blob, Reference::Digest(digest)) => {
            blobs::serve_blob(app, &upstream, &repository, digest, method, headers).await
        }
        (Kind::Blob, Reference::Tag(_)) => unreachable!("parse_path only yields digests for blobs"),
        (Kind::Manifest, reference) => {
            manifests::serve_manifest(app, &upstream, &repository, reference, method).await
        }
    }
}

/// Serves on `listener` until `shutdown` completes, then drains open requests.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let address = listener
        .local_addr()
        .map(|address| address.to_string())
        .unwrap_or_default();
    let gc = tokio::spawn(collect_garbage_periodically(app.clone()));
    tracing::info!(%address, storage = %app.store.root().display(), "image cache listening");
    let result = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await;
    gc.abort();
    result.map_err(|source| ServeError::Io { address, source })
}

pub(crate) async fn collect_garbage_periodically(app: Arc<App>) {
    let mut interval = tokio::time::interval(app.gc_interval);
    loop {
        interval.tick().await;
        let store = app.store.clone();
        let grace = app.gc_grace;
        match tokio::task::spawn_blocking(move || store.collect_garbage(grace)).await {
            Ok(removed) if removed > 0 => {
                tracing::info!(removed, "garbage collection removed unreferenced objects")
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "garbage collection task failed"),
        }
    }
}
