//! Blobs: served from disk when cached; otherwise one upstream download per digest, written
//! to a temp file that every waiting client streams from while it grows. The download runs
//! on its own task (a client that disconnects does not stop the cache fill), the digest is
//! checked before the file is committed, and no client gets the last byte of a blob before
//! that check passed — an aborted or corrupt download ends every stream with an error.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use sha2::Digest as _;
use tokio::sync::watch;

use crate::error::RegistryError;
use crate::metrics::{Metrics, add};
use crate::reference::Digest;
use crate::server::App;
use crate::storage::{ObjectKind, Reservation};
use crate::upstream::Upstream;

const CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone)]
enum FetchState {
    Connecting,
    Streaming {
        total: u64,
        written: u64,
    },
    /// Complete and digest-checked: clients may have the last byte while it is committed.
    Verified {
        total: u64,
    },
    Committed {
        total: u64,
    },
    Failed(RegistryError),
    /// Not cached (no room, storage error): whoever takes the response streams it directly.
    PassThrough,
}

struct InFlight {
    file: Mutex<Option<Arc<std::fs::File>>>,
    state: watch::Receiver<FetchState>,
    passthrough: Mutex<Option<reqwest::Response>>,
}

#[derive(Default)]
pub struct BlobFetches {
    inflight: Mutex<HashMap<Digest, Arc<InFlight>>>,
}

impl BlobFetches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<InFlight>>> {
        self.inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub async fn serve_blob(
    app: &Arc<App>,
    upstream: &Arc<Upstream>,
    repository: &str,
    digest: &Digest,
    method: &Method,
    request_headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    let head = method == Method::HEAD;
    if let Some(size) = app.store.lookup(ObjectKind::Blob, digest) {
        add(&app.metrics.blob_hits, 1);
        return serve_file(app, digest, size, head, request_headers.get(header::RANGE)).await;
    }
    if head {
        return head_upstream(upstream, repository, digest).await;
    }
    enum Joined {
        Cached(u64),
        Flight(Arc<InFlight>),
    }
    let joined = {
        let mut inflight = app.fetches.lock();
        if let Some(flight) = inflight.get(digest) {
            add(&app.metrics.coalesced_waits, 1);
            Joined::Flight(flight.clone())
        } else if let Some(size) = app.store.lookup(ObjectKind::Blob, digest) {
            Joined::Cached(size)
        } else {
            add(&app.metrics.blob_misses, 1);
            let (sender, receiver) = watch::channel(FetchState::Connecting);
            let flight = Arc::new(InFlight {
                file: Mutex::new(None),
                state: receiver,
                passthrough: Mutex::new(None),
            });
            inflight.insert(digest.clone(), flight.clone());
            tokio::spawn(download(
                app.clone(),
                upstream.clone(),
                repository.to_owned(),
                digest.clone(),
                flight.clone(),
                sender,
            ));
            Joined::Flight(flight)
        }
    };
    let flight = match joined {
        Joined::Cached(size) => {
            add(&app.metrics.blob_hits, 1);
            return serve_file(app, digest, size, head, request_headers.get(header::RANGE)).await;
        }
        Joined::Flight(flight) => flight,
    };
    let mut state = flight.state.clone();
    let current = state
        .wait_for(|state| !matches!(state, FetchState::Connecting))
        .await
        .map(|state| state.clone())
        .unwrap_or_else(|_| {
            FetchState::Failed(RegistryError::unavailable(
                StatusCode::BAD_GATEWAY,
                "blob download ended unexpectedly",
            ))
        });
    match current {
        FetchState::Connecting => unreachable!("waited for another state"),
        FetchState::Failed(error) => Err(error),
        FetchState::PassThrough => {
            let taken = flight
                .passthrough
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            let response = match taken {
                Some(response) => response,
                None => fetch_for_passthrough(upstream, repository, digest).await?,
            };
            add(&app.metrics.passthrough, 1);
            Ok(passthrough_response(
                response,
                digest.clone(),
                app.metrics.clone(),
            ))
        }
        FetchState::Streaming { total, .. }
        | FetchState::Verified { total }
        | FetchState::Committed { total } => {
            let file = flight
                .file
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
                .expect("the file is set before streaming starts");
            let body = Body::from_stream(growing_file_stream(file, state, app.metrics.clone()));
            Ok(blob_response(StatusCode::OK, digest, total, body))
        }
    }
}

fn blob_response(status: StatusCode, digest: &Digest, length: u64, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("a digest is a valid header"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

async fn head_upstream(
    upstream: &Upstream,
    repository: &str,
    digest: &Digest,
) -> Result<Response, RegistryError> {
    let what = format!("blob {digest} of {repository}");
    let response = upstream
        .send(Method::HEAD, repository, &format!("blobs/{digest}"), None)
        .await
        .map_err(|error| error.into_registry(&upstream.prefix, &what))?;
    match response.status() {
        status if status.is_success() => {
            let length = response.content_length().unwrap_or(0);
            Ok(blob_response(StatusCode::OK, digest, length, Body::empty()))
        }
        StatusCode::NOT_FOUND => Err(RegistryError::blob_unknown(format!(
            "{what} is not known upstream"
        ))),
        status => Err(RegistryError::unavailable(
            StatusCode::BAD_GATEWAY,
            format!("upstream {} answered {status} for {what}", upstream.prefix),
        )),
    }
}

async fn fetch_for_passthrough(
    upstream: &Upstream,
    repository: &str,
    digest: &Digest,
) -> Result<reqwest::Response, RegistryError> {
    let what = format!("blob {digest} of {repository}");
    let response = upstream
        .send(Method::GET, repository, &format!("blobs/{digest}"), None)
        .await
        .map_err(|error| error.into_registry(&upstream.prefix, &what))?;
    match response.status() {
        status if status.is_success() => Ok(response),
        StatusCode::NOT_FOUND => Err(RegistryError::blob_unknown(format!(
            "{what} is not known upstream"
        ))),
        status => Err(RegistryError::unavailable(
            StatusCode::BAD_GATEWAY,
            format!("upstream {} answered {status} for {what}", upstream.prefix),
        )),
    }
}

async fn download(
    app: Arc<App>,
    upstream: Arc<Upstream>,
    repository: String,
    digest: Digest,
    flight: Arc<InFlight>,
    state: watch::Sender<FetchState>,
) {
    let mut temp: Option<PathBuf> = None;
    let outcome = download_inner(
        &app,
        &upstream,
        &repository,
        &digest,
        &flight,
        &state,
        &mut temp,
    )
    .await;
    if let Err(error) = outcome {
        if let Some(temp) = temp {
            let _ = std::fs::remove_file(temp);
        }
        if matches!(&*state.borrow(), FetchState::Verified { .. }) {
            // The clients' copies are complete and correct (read from the open file); only
            // caching failed.
            tracing::warn!(upstream = %upstream.prefix, %repository, %digest, %error, "verified blob served but not cached");
        } else {
            tracing::warn!(upstream = %upstream.prefix, %repository, %digest, %error, "blob download failed; nothing was cached");
            state.send_replace(FetchState::Failed(error));
        }
    }
    app.fetches.lock().remove(&digest);
}

async fn download_inner(
    app: &Arc<App>,
    upstream: &Upstream,
    repository: &str,
    digest: &Digest,
    flight: &InFlight,
    state: &watch::Sender<FetchState>,
    temp: &mut Option<PathBuf>,
) -> Result<(), RegistryError> {
    let response = fetch_for_passthrough(upstream, repository, digest).await?;
    let Some((total, reservation, path, file)) =
        prepare_storage(app, digest, response.content_length())
    else {
        *flight
            .passthrough
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(response);
        // Later requests start their own attempt: room may have been freed by then.
        app.fetches.lock().remove(digest);
        state.send_replace(FetchState::PassThrough);
        return Ok(());
    };
    *temp = Some(path.clone());
    let file = Arc::new(file);
    *flight
        .file
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(file.clone());
    state.send_replace(FetchState::Streaming { total, written: 0 });

    let what = format!(
        "blob {digest} of {repository} from upstream {}",
        upstream.prefix
    );
    let mut hasher = sha2::Sha256::new();
    let mut written = 0u64;
    let mut buffer = BytesMut::with_capacity(CHUNK);
    let mut stream = response.bytes_stream();
    loop {
        let next = stream.next().await;
        let finished = next.is_none();
        if let Some(chunk) = next {
            let chunk = chunk.map_err(|error| {
                RegistryError::unavailable(
                    StatusCode::BAD_GATEWAY,
                    format!("{what} broke off: {error}"),
                )
            })?;
            add(&app.metrics.upstream_bytes, chunk.len() as u64);
            if written + (buffer.len() + chunk.len()) as u64 > total {
                add(&app.metrics.rejected, 1);
                return Err(RegistryError::digest_invalid(
                    StatusCode::BAD_GATEWAY,
                    format!("{what}: more bytes than the announced {total}"),
                ));
            }
            hasher.update(&chunk);
            buffer.extend_from_slice(&chunk);
        }
        if buffer.len() >= CHUNK || (finished && !buffer.is_empty()) {
            let data = buffer.split().freeze();
            let length = data.len() as u64;
            let writer = file.clone();
            let offset = written;
            tokio::task::spawn_blocking(move || writer.write_all_at(&data, offset))
                .await
                .expect("the write task does not panic")
                .map_err(|error| {
                    RegistryError::unavailable(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot write {what} to the cache storage: {error}"),
                    )
                })?;
            written += length;
            state.send_replace(FetchState::Streaming { total, written });
        }
        if finished {
            break;
        }
    }
    if written != total {
        add(&app.metrics.rejected, 1);
        return Err(RegistryError::unavailable(
            StatusCode::BAD_GATEWAY,
            format!("{what}: got {written} of {total} bytes"),
        ));
    }
    let actual = Digest::from_hasher(hasher);
    if &actual != digest {
        add(&app.metrics.rejected, 1);
        return Err(RegistryError::digest_invalid(
            StatusCode::BAD_GATEWAY,
            format!("{what}: content has digest {actual}; not cached, not served"),
        ));
    }
    // The content is proven: clients need not wait for the fsync and rename.
    state.send_replace(FetchState::Verified { total });
    let syncer = file.clone();
    tokio::task::spawn_blocking(move || syncer.sync_all())
        .await
        .expect("the sync task does not panic")
        .map_err(|error| {
            RegistryError::unavailable(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot sync {what}: {error}"),
            )
        })?;
    app.store
        .commit(ObjectKind::Blob, digest, &path, total, reservation)
        .map_err(|error| {
            RegistryError::unavailable(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot commit {what}: {error}"),
            )
        })?;
    *temp = None;
    state.send_replace(FetchState::Committed { total });
    tracing::info!(upstream = %upstream.prefix, %repository, %digest, bytes = total, "cached blob");
    Ok(())
}

fn prepare_storage(
    app: &Arc<App>,
    digest: &Digest,
    length: Option<u64>,
) -> Option<(u64, Reservation, PathBuf, std::fs::File)> {
    let Some(total) = length else {
        tracing::warn!(%digest, "upstream sent no Content-Length: passing the blob through uncached");
        return None;
    };
    let reservation = match app.store.reserve(total) {
        Ok(reservation) => reservation,
        Err(no_room) => {
            tracing::warn!(%digest, reason = %no_room, "passing the blob through uncached");
            return None;
        }
    };
    match app.store.create_temp() {
        Ok((path, file)) => Some((total, reservation, path, file)),
        Err(error) => {
            tracing::warn!(%digest, %error, storage = %app.store.root().display(), "cannot create a temp file: passing the blob through uncached");
            None
        }
    }
}

enum Cursor {
    At(u64),
    Ended,
}

/// The blob as it is being written: everything but the last byte until the download is
/// verified and committed, then the rest; an error if the download fails.
fn growing_file_stream(
    file: Arc<std::fs::File>,
    state: watch::Receiver<FetchState>,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold((Cursor::At(0), state), move |(cursor, mut state)| {
        let file = file.clone();
        let metrics = metrics.clone();
        async move {
            let Cursor::At(position) = cursor else {
                return None;
            };
            loop {
                let current = state.borrow_and_update().clone();
                let (readable, done) = match &current {
                    FetchState::Streaming { written, .. } => (written.saturating_sub(1), false),
                    FetchState::Verified { total } | FetchState::Committed { total } => {
                        (*total, true)
                    }
                    FetchState::Failed(error) => {
                        return Some((
                            Err(std::io::Error::other(error.message.clone())),
                            (Cursor::Ended, state.clone()),
                        ));
                    }
                    FetchState::Connecting | FetchState::PassThrough => (0, false),
                };
                if position < readable {
                    let length = (readable - position).min(CHUNK as u64) as usize;
                    let reader = file.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buffer = vec![0; length];
                        reader
                            .read_exact_at(&mut buffer, position)
                            .map(|()| Bytes::from(buffer))
                    })
                    .await
                    .unwrap_or_else(|error| Err(std::io::Error::other(error)));
                    return Some(match read {
                        Ok(bytes) => {
                            add(&metrics.served_bytes, bytes.len() as u64);
                            (Ok(bytes), (Cursor::At(position + length as u64), state))
                        }
                        Err(error) => (Err(error), (Cursor::Ended, state)),
                    });
                }
                if done {
                    return None;
                }
                if state.changed().await.is_err()
                    && !matches!(
                        &*state.borrow(),
                        FetchState::Verified { .. } | FetchState::Committed { .. }
                    )
                {
                    let error = std::io::Error::other("blob download ended without completing");
                    return Some((Err(error), (Cursor::Ended, state)));
                }
            }
        }
    })
}

/// An uncached blob straight from upstream, digest checked: the last chunk is held back
/// until the end, and withheld (stream error) if the content does not match.
fn passthrough_response(
    response: reqwest::Response,
    digest: Digest,
    metrics: Arc<Metrics>,
) -> Response {
    let length = response.content_length();
    struct Pass {
        stream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        hasher: sha2::Sha256,
        held: Option<Bytes>,
    }
    let pass = Pass {
        stream: response.bytes_stream().boxed(),
        hasher: sha2::Sha256::new(),
        held: None,
    };
    let expected = digest.clone();
    let stream = futures_util::stream::unfold(Some(pass), move |pass| {
        let metrics = metrics.clone();
        let expected = expected.clone();
        async move {
            let mut pass = pass?;
            loop {
                match pass.stream.next().await {
                    Some(Ok(chunk)) => {
                        add(&metrics.upstream_bytes, chunk.len() as u64);
                        pass.hasher.update(&chunk);
                        if let Some(previous) = pass.held.replace(chunk) {
                            add(&metrics.served_bytes, previous.len() as u64);
                            return Some((Ok(previous), Some(pass)));
                        }
                    }
                    Some(Err(error)) => return Some((Err(std::io::Error::other(error)), None)),
                    None => {
                        let actual = Digest::from_hasher(pass.hasher.clone());
                        if actual != expected {
                            add(&metrics.rejected, 1);
                            let error = std::io::Error::other(format!(
                                "upstream content has digest {actual}, not {expected}"
                            ));
                            return Some((Err(error), None));
                        }
                        let last = pass.held.take()?;
                        add(&metrics.served_bytes, last.len() as u64);
                        return Some((Ok(last), None));
                    }
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("a digest is a valid header"),
    );
    response
}

async fn serve_file(
    app: &App,
    digest: &Digest,
    size: u64,
    head: bool,
    range: Option<&HeaderValue>,
) -> Result<Response, RegistryError> {
    let range = range
        .and_then(|value| value.to_str().ok())
        .and_then(|text| parse_range(text, size));
    let (status, start, length) = match range {
        Some(Ok((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Some(Err(())) => {
            let mut response = RegistryError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                format!("range outside blob {digest} of {size} bytes"),
            )
            .into_response_with_type();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("valid header"),
            );
            return Ok(response);
        }
        None => (StatusCode::OK, 0, size),
    };
    let body = if head {
        Body::empty()
    } else {
        let path = app.store.object_path(ObjectKind::Blob, digest);
        let file = tokio::fs::File::open(&path).await.map_err(|error| {
            RegistryError::unavailable(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot open cached blob {}: {error}", path.display()),
            )
        })?;
        let metrics = app.metrics.clone();
        let mut file = file;
        if start > 0 {
            use tokio::io::AsyncSeekExt as _;
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|error| {
                    RegistryError::unavailable(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot seek in {}: {error}", path.display()),
                    )
                })?;
        }
        use tokio::io::AsyncReadExt as _;
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(length), CHUNK).inspect(
            move |chunk| {
                if let Ok(chunk) = chunk {
                    add(&metrics.served_bytes, chunk.len() as u64);
                }
            },
        );
        Body::from_stream(stream)
    };
    let mut response = blob_response(status, digest, length, body);
    if status == StatusCode::PARTIAL_CONTENT {
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + length - 1))
                .expect("valid header"),
        );
    }
    Ok(response)
}

/// `bytes=START-` or `bytes=START-END` (one range, what registry clients send to resume).
/// `None`: no usable range (serve everything); `Err`: unsatisfiable.
fn parse_range(text: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = text.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = match end.trim() {
        "" => size.saturating_sub(1),
        end => end.parse::<u64>().ok()?.min(size.saturating_sub(1)),
    };
    if start >= size || start > end {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

impl RegistryError {
    fn into_response_with_type(self) -> Response {
        axum::response::IntoResponse::into_response(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=4-6", 10), Some(Ok((4, 6))));
        assert_eq!(parse_range("bytes=4-60", 10), Some(Ok((4, 9))));
        assert_eq!(parse_range("bytes=10-", 10), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,3-4", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
