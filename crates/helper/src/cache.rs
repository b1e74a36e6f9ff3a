//! `restore_cache` and `archive_cache(_on_failure)`, run in the helper container: caches live
//! as `cache.zip` under `<cache dir>/<project path>/<key>/` in the instance's cache volume,
//! and, with a shared S3 cache, are also fetched and stored through the presigned URLs in
//! the job file. Cache trouble is a warning, never a job failure (as in gitlab-runner).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::archive;
use crate::cache_key;
use crate::job::{CacheSpec, HelperJob};
use crate::mask;
use crate::zip;

const ARCHIVE_NAME: &str = "cache.zip";

/// Where the local archive of `key` lives, with the key re-sanitised so a hand-made job
/// file cannot point outside the cache dir either.
pub fn local_archive(cache_dir: &Path, local_dir: &str, key: &str) -> Result<PathBuf, String> {
    let local_dir = cache_key::sanitise(local_dir)?;
    let key = cache_key::sanitise(key)?;
    Ok(cache_dir.join(local_dir).join(key).join(ARCHIVE_NAME))
}

fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|error| format!("cannot build an HTTP client: {error}"))
}

/// Restores every pulled cache; problems are logged as warnings.
pub async fn restore(job: &HelperJob, log: &mut dyn Write) {
    let project_dir = Path::new(&job.project_dir);
    let cache_dir = Path::new(&job.cache_dir);
    for cache in job.caches.iter().filter(|cache| cache.policy.pulls()) {
        if let Some(reason) = &cache.unusable {
            let _ = writeln!(log, "WARNING: {reason}");
            continue;
        }
        if let Err(warning) = restore_one(cache, project_dir, cache_dir, log).await {
            let _ = writeln!(log, "WARNING: {warning}");
            let _ = writeln!(log, "Failed to extract cache");
        }
    }
}

async fn restore_one(
    cache: &CacheSpec,
    project_dir: &Path,
    cache_dir: &Path,
    log: &mut dyn Write,
) -> Result<(), String> {
    let keys: Vec<&String> = std::iter::once(&cache.key)
        .chain(&cache.fallback_keys)
        .collect();
    for (index, key) in keys.iter().enumerate() {
        let _ = writeln!(log, "Checking cache for {key}...");
        let local = local_archive(cache_dir, &cache.local_dir, key)?;
        if let Some(remote) = &cache.remote
            && let Some(url) = remote.download_urls.get(index)
        {
            match download(url.expose(), &local).await {
                Ok(true) => {
                    let _ = writeln!(
                        log,
                        "Downloading {ARCHIVE_NAME} from {}",
                        mask::url(url.expose())
                    );
                }
                Ok(false) => {
                    let _ = writeln!(
                        log,
                        "{key}: not in the shared cache, trying this instance's cache"
                    );
                }
                Err(warning) => {
                    let _ = writeln!(log, "WARNING: {warning}");
                }
            }
        }
        if !local.exists() {
            let _ = writeln!(log, "WARNING: {key}: no cache archive found");
            continue;
        }
        let mut file =
            fs::File::open(&local).map_err(|error| format!("{}: {error}", local.display()))?;
        fs::create_dir_all(project_dir)
            .map_err(|error| format!("{}: {error}", project_dir.display()))?;
        let extracted = zip::extract(&mut file, project_dir)
            .map_err(|error| format!("cache {key}: {error}"))?;
        let _ = writeln!(
            log,
            "Successfully extracted cache ({} files){}",
            extracted.files,
            if index > 0 {
                format!(" from fallback key {key}")
            } else {
                String::new()
            }
        );
        return Ok(());
    }
    Ok(())
}

/// GETs a presigned URL into `local`: `Ok(true)` when downloaded, `Ok(false)` when the
/// object does not exist.
async fn download(url: &str, local: &Path) -> Result<bool, String> {
    let shown = mask::url(url);
    let mut response = http_client()?.get(url).send().await.map_err(|error| {
        format!(
            "cannot download cache from {shown}: {}",
            error.without_url()
        )
    })?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(false);
    }
    if !response.status().is_success() {
        return Err(format!("{shown} answered {}", response.status()));
    }
    let parent = local.parent().expect("an archive path has a parent");
    fs::create_dir_all(parent).map_err(|error| format!("{}: {error}", parent.display()))?;
    let partial = local.with_extension(format!("zip.{}.part", std::process::id()));
    let mut file =
        fs::File::create(&partial).map_err(|error| format!("{}: {error}", partial.display()))?;
    while let Some(chunk) = response.chunk().await.map_err(|error| {
        format!(
            "cannot download cache from {shown}: {}",
            error.without_url()
        )
    })? {
        file.write_all(&chunk)
            .map_err(|error| format!("{}: {error}", partial.display()))?;
    }
    fs::rename(&partial, local).map_err(|error| format!("{}: {error}", local.display()))?;
    Ok(true)
}

/// Saves every pushed cache whose `when` matches; problems are logged as warnings.
pub async fn save(job: &HelperJob, on_success: bool, log: &mut dyn Write) {
    let project_dir = Path::new(&job.project_dir);
    let cache_dir = Path::new(&job.cache_dir);
    for cache in job
        .caches
        .iter()
        .filter(|cache| cache.policy.pushes() && cache.when.applies(on_success))
    {
        if let Some(reason) = &cache.unusable {
            let _ = writeln!(log, "WARNING: {reason}");
            continue;
        }
        let _ = writeln!(log, "Creating cache {}...", cache.key);
        match save_one(cache, project_dir, cache_dir, log).await {
            Ok(()) => {
                let _ = writeln!(log, "Created cache");
            }
            Err(warning) => {
                let _ = writeln!(log, "WARNING: {warning}");
                let _ = writeln!(log, "Failed to create cache");
            }
        }
    }
}

async fn save_one(
    cache: &CacheSpec,
    project_dir: &Path,
    cache_dir: &Path,
    log: &mut dyn Write,
) -> Result<(), String> {
    let selection = archive::select(project_dir, &cache.paths, &[], cache.untracked)
        .map_err(|error| format!("cannot list {}: {error}", project_dir.display()))?;
    for warning in &selection.warnings {
        let _ = writeln!(log, "WARNING: {warning}");
    }
    if selection.members.is_empty() {
        return Err("no files to cache".to_owned());
    }
    let local = local_archive(cache_dir, &cache.local_dir, &cache.key)?;
    let parent = local.parent().expect("an archive path has a parent");
    fs::create_dir_all(parent).map_err(|error| format!("{}: {error}", parent.display()))?;
    let partial = local.with_extension(format!("zip.{}.part", std::process::id()));
    archive::write_zip(project_dir, &selection.members, &partial)
        .map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
    fs::rename(&partial, &local).map_err(|error| format!("{}: {error}", local.display()))?;
    let _ = writeln!(
        log,
        "{}: found {} matching files and directories",
        cache.key,
        selection.members.len()
    );
    let Some(remote) = &cache.remote else {
        return Ok(());
    };
    let size = fs::metadata(&local)
        .map_err(|error| error.to_string())?
        .len();
    if remote.max_upload_size > 0 && size > remote.max_upload_size {
        return Err(format!(
            "cache archive is {size} bytes, above MaxUploadedArchiveSize {}; not uploaded (kept on this instance)",
            remote.max_upload_size
        ));
    }
    let url = remote.upload_url.expose();
    let shown = mask::url(url);
    let _ = writeln!(log, "Uploading {ARCHIVE_NAME} to {shown}");
    let file = tokio::fs::File::open(&local)
        .await
        .map_err(|error| format!("{}: {error}", local.display()))?;
    let response = http_client()?
        .put(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(
            tokio_util::io::ReaderStream::new(file),
        ))
        .send()
        .await
        .map_err(|error| format!("cannot upload cache to {shown}: {}", error.without_url()))?;
    if !response.status().is_success() {
        let status = response.status();
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        return Err(format!("{shown} answered {status}: {}", body.trim()));
    }
    Ok(())
}
