//! Content-addressed storage on disk: blobs and manifests by digest, tag records, a quota
//! with least-recently-used eviction, and garbage collection of unreferenced content.
//!
//! Layout under the storage root:
//! `blobs/sha256/<hex>`, `manifests/sha256/<hex>` (raw bytes, written to `tmp/` first,
//! fsynced and renamed: a crash leaves at most a file in `tmp/`, which start-up deletes),
//! `tags/<sha256 of upstream, repository, tag>.json`. Names never become paths, so a
//! hostile repository name cannot reach outside the root. Last access survives restarts as
//! the file's mtime.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::manifest;
use crate::metrics::{Metrics, add};
use crate::reference::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Blob,
    Manifest,
}

impl ObjectKind {
    fn dir(self) -> &'static str {
        match self {
            ObjectKind::Blob => "blobs/sha256",
            ObjectKind::Manifest => "manifests/sha256",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cache storage {path}: {source} (check that the directory exists and is writable)")]
pub struct StoreError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// The upstream's answer for a tag, with when it was last confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub upstream: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub checked_at_ms: u64,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    last_access: SystemTime,
    persisted_access: SystemTime,
}

#[derive(Debug, Default)]
struct Index {
    objects: HashMap<(ObjectKind, Digest), Entry>,
    total: u64,
    reserved: u64,
}

pub struct Store {
    root: PathBuf,
    max_size: u64,
    min_free_space: u64,
    index: Mutex<Index>,
    temp_counter: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Room set aside for one download; released on drop unless committed.
pub struct Reservation {
    store: Arc<Store>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut index = self.store.lock();
        index.reserved = index.reserved.saturating_sub(self.size);
    }
}

/// Why a download cannot be cached (it is then passed through).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoom {
    LargerThanQuota { size: u64, max_size: u64 },
    DiskFull { free: u64, needed: u64 },
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoRoom::LargerThanQuota { size, max_size } => write!(
                f,
                "object of {size} bytes is larger than max_size {max_size}"
            ),
            NoRoom::DiskFull { free, needed } => write!(
                f,
                "only {free} bytes free on the storage file system, {needed} needed (size + min_free_space)"
            ),
        }
    }
}

const ACCESS_PERSIST_INTERVAL: Duration = Duration::from_secs(60);

impl Store {
    /// Opens (creating) the storage root, deletes leftovers of interrupted downloads and
    /// indexes what is there.
    pub fn open(
        root: &Path,
        max_size: u64,
        min_free_space: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let error = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError { path, source }
        };
        for dir in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(error(&path))?;
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(error(&tmp))? {
            let entry = entry.map_err(error(&tmp))?;
            fs::remove_file(entry.path()).map_err(error(&entry.path()))?;
        }
        let mut index = Index::default();
        for kind in [ObjectKind::Blob, ObjectKind::Manifest] {
            let dir = root.join(kind.dir());
            for entry in fs::read_dir(&dir).map_err(error(&dir))? {
                let entry = entry.map_err(error(&dir))?;
                let name = entry.file_name();
                let Ok(digest) = Digest::parse(&format!("sha256:{}", name.to_string_lossy()))
                else {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that is not named by a digest");
                    continue;
                };
                let metadata = entry.metadata().map_err(error(&entry.path()))?;
                let accessed = metadata.modified().unwrap_or(UNIX_EPOCH);
                index.total += metadata.len();
                index.objects.insert(
                    (kind, digest),
                    Entry {
                        size: metadata.len(),
                        last_access: accessed,
                        persisted_access: accessed,
                    },
                );
            }
        }
        metrics.stored_bytes.store(index.total, Ordering::Relaxed);
        Ok(Arc::new(Self {
            root: root.to_owned(),
            max_size,
            min_free_space,
            index: Mutex::new(index),
            temp_counter: AtomicU64::new(0),
            metrics,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, kind: ObjectKind, digest: &Digest) -> PathBuf {
        self.root.join(kind.dir()).join(digest.hex())
    }

    /// The size of a cached object, marking it used now; `None` when not cached.
    pub fn lookup(&self, kind: ObjectKind, digest: &Digest) -> Option<u64> {
        let now = SystemTime::now();
        let mut index = self.lock();
        let entry = index.objects.get_mut(&(kind, digest.clone()))?;
        entry.last_access = now;
        let size = entry.size;
        if now
            .duration_since(entry.persisted_access)
            .unwrap_or_default()
            >= ACCESS_PERSIST_INTERVAL
        {
            entry.persisted_access = now;
            drop(index);
            // Best effort: the mtime only carries LRU order across restarts.
            if let Ok(file) = fs::File::options()
                .write(true)
                .open(self.object_path(kind, digest))
            {
                let _ = file.set_modified(now);
            }
        }
        Some(size)
    }

    pub fn total_size(&self) -> u64 {
        self.lock().total
    }

    pub fn create_temp(&self) -> io::Result<(PathBuf, fs::File)> {
        let number = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{nanos}-{number}.part", std::process::id()));
        let file = fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Makes room for `size` more bytes, evicting least recently used objects.
    pub fn reserve(self: &Arc<Self>, size: u64) -> Result<Reservation, NoRoom> {
        if size > self.max_size {
            return Err(NoRoom::LargerThanQuota {
                size,
                max_size: self.max_size,
            });
        }
        let needed = size + self.min_free_space;
        let free = free_space(&self.root).unwrap_or(u64::MAX);
        if free < needed {
            return Err(NoRoom::DiskFull { free, needed });
        }
        let mut victims = Vec::new();
        {
            let mut index = self.lock();
            while index.total + index.reserved + size > self.max_size {
                let Some(oldest) = index
                    .objects
                    .iter()
                    .min_by_key(|(_, entry)| entry.last_access)
                    .map(|(key, _)| key.clone())
                else {
                    break;
                };
                let entry = index.objects.remove(&oldest).expect("key was just found");
                index.total -= entry.size;
                victims.push((oldest, entry.size));
            }
            index.reserved += size;
            self.metrics
                .stored_bytes
                .store(index.total, Ordering::Relaxed);
        }
        for ((kind, digest), bytes) in victims {
            // An open reader keeps its file: unlinking never cuts a download being served.
            let path = self.object_path(kind, &digest);
            if let Err(error) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove evicted object");
            }
            tracing::info!(%digest, bytes, "evicted least recently used object to stay under max_size");
            add(&self.metrics.evictions, 1);
            add(&self.metrics.evicted_bytes, bytes);
        }
        Ok(Reservation {
            store: self.clone(),
            size,
        })
    }

    /// Moves a complete, verified, fsynced temp file to its content address.
    pub fn commit(
        &self,
        kind: ObjectKind,
        digest: &Digest,
        temp: &Path,
        size: u64,
        reservation: Reservation,
    ) -> io::Result<()> {
        let path = self.object_path(kind, digest);
        fs::rename(temp, &path)?;
        if let Some(parent) = path.parent() {
            fs::File::open(parent)?.sync_all()?;
        }
        let now = SystemTime::now();
        let mut index = self.lock();
        if let Some(previous) = index.objects.insert(
            (kind, digest.clone()),
            Entry {
                size,
                last_access: now,
                persisted_access: now,
            },
        ) {
            index.total -= previous.size;
        }
        index.total += size;
        index.reserved = index.reserved.saturating_sub(reservation.size);
        self.metrics
            .stored_bytes
            .store(index.total, Ordering::Relaxed);
        drop(index);
        std::mem::forget(reservation);
        Ok(())
    }

    /// Writes a small object (a manifest) completely, then commits it.
    pub fn put_small(
        self: &Arc<Self>,
        kind: ObjectKind,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), String> {
        let reservation = self
            .reserve(bytes.len() as u64)
            .map_err(|no_room| no_room.to_string())?;
        let (temp, mut file) = self.create_temp().map_err(|error| error.to_string())?;
        let result = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| self.commit(kind, digest, &temp, bytes.len() as u64, reservation));
        if let Err(error) = result {
            let _ = fs::remove_file(&temp);
            return Err(error.to_string());
        }
        Ok(())
    }

    pub fn read_manifest(&self, digest: &Digest) -> Option<Vec<u8>> {
        self.lookup(ObjectKind::Manifest, digest)?;
        fs::read(self.object_path(ObjectKind::Manifest, digest)).ok()
    }

    fn tag_path(&self, upstream: &str, repository: &str, tag: &str) -> PathBuf {
        let key = Digest::of(format!("{upstream}\n{repository}\n{tag}").as_bytes());
        self.root.join("tags").join(format!("{}.json", key.hex()))
    }

    pub fn tag(&self, upstream: &str, repository: &str, tag: &str) -> Option<TagRecord> {
        let text = fs::read(self.tag_path(upstream, repository, tag)).ok()?;
        let record: TagRecord = serde_json::from_slice(&text).ok()?;
        (record.upstream == upstream && record.repository == repository && record.tag == tag)
            .then_some(record)
    }

    pub fn put_tag(&self, record: &TagRecord) -> io::Result<()> {
        let (temp, mut file) = self.create_temp()?;
        let result = file
            .write_all(&serde_json::to_vec(record).expect("a tag record serializes"))
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                fs::rename(
                    &temp,
                    self.tag_path(&record.upstream, &record.repository, &record.tag),
                )
            });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    pub fn remove_tag(&self, upstream: &str, repository: &str, tag: &str) {
        let _ = fs::remove_file(self.tag_path(upstream, repository, tag));
    }

    /// Removes objects no tag reaches (through index → manifest → config/layers) that were
    /// not used within `grace`. Returns how many objects were removed.
    pub fn collect_garbage(&self, grace: Duration) -> usize {
        let mut referenced: HashSet<(ObjectKind, Digest)> = HashSet::new();
        let mut pending: Vec<Digest> = Vec::new();
        if let Ok(entries) = fs::read_dir(self.root.join("tags")) {
            for entry in entries.flatten() {
                let record = fs::read(entry.path())
                    .ok()
                    .and_then(|text| serde_json::from_slice::<TagRecord>(&text).ok());
                if let Some(digest) = record.and_then(|record| Digest::parse(&record.digest).ok()) {
                    pending.push(digest);
                }
            }
        }
        while let Some(digest) = pending.pop() {
            if !referenced.insert((ObjectKind::Manifest, digest.clone())) {
                continue;
            }
            let Ok(bytes) = fs::read(self.object_path(ObjectKind::Manifest, &digest)) else {
                continue;
            };
            if let Ok(parsed) = manifest::validate(&bytes) {
                pending.extend(parsed.child_manifests);
                referenced.extend(
                    parsed
                        .blobs
                        .into_iter()
                        .map(|blob| (ObjectKind::Blob, blob)),
                );
            }
        }
        let now = SystemTime::now();
        let victims: Vec<(ObjectKind, Digest)> = {
            let mut index = self.lock();
            let victims: Vec<_> = index
                .objects
                .iter()
                .filter(|(key, entry)| {
                    !referenced.contains(*key)
                        && now.duration_since(entry.last_access).unwrap_or_default() >= grace
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in &victims {
                if let Some(entry) = index.objects.remove(key) {
                    index.total -= entry.size;
                }
            }
            self.metrics
                .stored_bytes
                .store(index.total, Ordering::Relaxed);
            victims
        };
        for (kind, digest) in &victims {
            let _ = fs::remove_file(self.object_path(*kind, digest));
        }
        add(&self.metrics.gc_removed, victims.len() as u64);
        victims.len()
    }
}

fn free_space(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, max: u64) -> Arc<Store> {
        Store::open(dir, max, 0, Arc::new(Metrics::default())).unwrap()
    }

    fn put(store: &Arc<Store>, content: &[u8]) -> Digest {
        let digest = Digest::of(content);
        store.put_small(ObjectKind::Blob, &digest, content).unwrap();
        digest
    }

    #[test]
    fn evicts_least_recently_used_to_stay_under_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 30);
        let first = put(&store, &[1; 10]);
        std::thread::sleep(Duration::from_millis(5));
        let second = put(&store, &[2; 10]);
        std::thread::sleep(Duration::from_millis(5));
        let third = put(&store, &[3; 10]);
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.lookup(ObjectKind::Blob, &first).is_some()); // first is now the most recent
        let fourth = put(&store, &[4; 10]);
        assert!(
            store.lookup(ObjectKind::Blob, &second).is_none(),
            "LRU object evicted"
        );
        assert!(!store.object_path(ObjectKind::Blob, &second).exists());
        for kept in [&first, &third, &fourth] {
            assert!(store.lookup(ObjectKind::Blob, kept).is_some());
        }
        assert_eq!(store.total_size(), 30);
        assert_eq!(store.metrics.evictions.load(Ordering::Relaxed), 1);
        assert!(matches!(
            store.reserve(31),
            Err(NoRoom::LargerThanQuota { .. })
        ));
    }

    #[test]
    fn restart_drops_partial_downloads_and_keeps_committed_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store1 = store(dir.path(), 1 << 20);
        let digest = put(&store1, b"committed");
        let (partial, mut file) = store1.create_temp().unwrap();
        file.write_all(b"half a blo").unwrap();
        drop(store1);
        let store2 = store(dir.path(), 1 << 20);
        assert!(!partial.exists());
        assert_eq!(store2.lookup(ObjectKind::Blob, &digest), Some(9));
        assert_eq!(store2.total_size(), 9);
    }

    #[test]
    fn tag_records_round_trip_and_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let record = TagRecord {
            upstream: "quay.io".into(),
            repository: "a/b".into(),
            tag: "1".into(),
            digest: Digest::of(b"x").to_string(),
            checked_at_ms: 5,
        };
        store.put_tag(&record).unwrap();
        assert_eq!(store.tag("quay.io", "a/b", "1"), Some(record));
        assert_eq!(store.tag("quay.io", "a", "b/1"), None);
        store.remove_tag("quay.io", "a/b", "1");
        assert_eq!(store.tag("quay.io", "a/b", "1"), None);
    }

    #[test]
    fn garbage_collection_keeps_what_tags_reach() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let layer = put(&store, b"layer");
        let config = put(&store, b"config");
        let orphan = put(&store, b"orphan");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 6},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 5}]
        })
        .to_string();
        let manifest_digest = Digest::of(manifest.as_bytes());
        store
            .put_small(ObjectKind::Manifest, &manifest_digest, manifest.as_bytes())
            .unwrap();
        store
            .put_tag(&TagRecord {
                upstream: "u".into(),
                repository: "r".into(),
                tag: "t".into(),
                digest: manifest_digest.to_string(),
                checked_at_ms: 0,
            })
            .unwrap();
        assert_eq!(store.collect_garbage(Duration::ZERO), 1);
        assert!(store.lookup(ObjectKind::Blob, &orphan).is_none());
        assert!(store.lookup(ObjectKind::Blob, &layer).is_some());
        assert!(
            store
                .lookup(ObjectKind::Manifest, &manifest_digest)
                .is_some()
        );
        store.remove_tag("u", "r", "t");
        assert_eq!(
            store.collect_garbage(Duration::from_secs(3600)),
            0,
            "recently used content survives the grace period"
        );
        assert_eq!(store.collect_garbage(Duration::ZERO), 3);
    }
}
