//! The durable ledger of one runner's group, in a redb file: every instance the autoscaler
//! created with its phase, use count and the jobs assigned to it, a per-minute history of
//! job arrivals (for predictive warm capacity), and the manager's records of running jobs
//! (opaque bytes here: what a restarted manager needs to resume them). A restarted manager
//! reads it back to adopt what is healthy, re-attach to jobs that still run, and delete what
//! it cannot account for.
//!
//! Job records hold the job's token, so the file is created with mode 0600 (and set to it
//! when an older file is opened).
//!
//! redb: pure Rust, ACID with crash-safe commits (copy-on-write B-trees, fsync on commit),
//! a file lock that stops two managers from sharing one group's ledger, no C toolchain or
//! server, and an in-memory backend for tests. Version 3 is the newest whose MSRV matches
//! the workspace's (1.89).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use podfleet_provider::InstanceId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Instance id → JSON [`InstanceRecord`].
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
/// Unix minute → jobs that arrived in it.
const ARRIVALS: TableDefinition<i64, u32> = TableDefinition::new("arrivals");

/// Job id → the manager's record of a running job (opaque to the autoscaler).
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");

/// How many commit durations are kept for [`Ledger::commit_times`].
const COMMIT_SAMPLES: usize = 1 << 16;

/// How long arrival history is kept: eight weeks is enough for an hour-of-week model.
const HISTORY_MINUTES: i64 = 8 * 7 * 24 * 60;

/// What the ledger knows of an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub state: RecordState,
    pub use_count: u32,
    /// Jobs holding a slot on it now.
    pub jobs: Vec<u64>,
    /// When this manager first saw it (unix seconds).
    pub first_seen_unix: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// Created by us, not yet checked.
    Creating,
    /// Checked and handed out.
    Ready,
    /// Used up or replaced: takes no more jobs.
    Retiring,
    /// Failed or being deleted: never adopt it.
    Deleting,
}

#[derive(Debug, thiserror::Error)]
#[error("autoscaler ledger {}: {source}; check the file's directory exists and is writable, and that no other podfleet manager uses this group (state_file / podfleet_state_dir)", path.display())]
pub struct LedgerError {
    path: PathBuf,
    #[source]
    source: redb::Error,
}

pub struct Ledger {
    db: Database,
    path: PathBuf,
    /// The latest commit durations, in microseconds (a ring of [`COMMIT_SAMPLES`]).
    commits: std::sync::Mutex<CommitTimes>,
}

#[derive(Default)]
struct CommitTimes {
    samples: Vec<u32>,
    next: usize,
    total: u64,
}

/// Percentiles of recent commit durations (see [`Ledger::commit_times`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Commits since the ledger was opened.
    pub count: u64,
    pub p50: std::time::Duration,
    pub p99: std::time::Duration,
    pub max: std::time::Duration,
}

impl Ledger {
    /// Opens (or creates) the ledger file, creating its directory.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let error = |source: redb::Error| LedgerError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| error(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| error(e.into()))?;
        // Job records carry job tokens: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| error(redb::Error::Io(e)))?;
        }
        Self::with_tables(db, path.to_owned())
    }

    /// A ledger that lives in memory only (tests, the simulator).
    pub fn in_memory() -> Result<Self, LedgerError> {
        let path = PathBuf::from("(memory)");
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| LedgerError {
                path: path.clone(),
                source: e.into(),
            })?;
        Self::with_tables(db, path)
    }

    fn with_tables(db: Database, path: PathBuf) -> Result<Self, LedgerError> {
        let ledger = Self {
            db,
            path,
            commits: Default::default(),
        };
        ledger.write(|txn| {
            txn.open_table(INSTANCES)?;
            txn.open_table(ARRIVALS)?;
            txn.open_table(JOBS)?;
            Ok(())
        })?;
        Ok(ledger)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, source: impl Into<redb::Error>) -> LedgerError {
        LedgerError {
            path: self.path.clone(),
            source: source.into(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), LedgerError> {
        let started = std::time::Instant::now();
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        f(&txn).map_err(|e| self.error(e))?;
        let committed = txn.commit().map_err(|e| self.error(e));
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let mut times = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        if times.samples.len() < COMMIT_SAMPLES {
            times.samples.push(micros);
        } else {
            let at = times.next;
            times.samples[at] = micros;
        }
        times.next = (times.next + 1) % COMMIT_SAMPLES;
        times.total += 1;
        committed
    }

    /// Durations of the latest commits (write transaction begun to commit done): the
    /// autoscaler commits under its state lock, so these bound how long a commit holds it.
    pub fn commit_times(&self) -> CommitStats {
        let times = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted = times.samples.clone();
        sorted.sort_unstable();
        let at = |q: f64| {
            let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            std::time::Duration::from_micros(sorted.get(index).copied().unwrap_or(0).into())
        };
        CommitStats {
            count: times.total,
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    /// Records (or replaces) what the manager needs to resume job `job` after a restart.
    pub fn put_job(&self, job: u64, record: &[u8]) -> Result<(), LedgerError> {
        self.write(|txn| {
            txn.open_table(JOBS)?.insert(job, record)?;
            Ok(())
        })
    }

    /// Forgets a job once it has ended.
    pub fn remove_job(&self, job: u64) -> Result<(), LedgerError> {
        self.write(|txn| {
            txn.open_table(JOBS)?.remove(job)?;
            Ok(())
        })
    }

    /// Every job on record, by id.
    pub fn jobs(&self) -> Result<BTreeMap<u64, Vec<u8>>, LedgerError> {
        let read = || -> Result<_, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(JOBS)?;
            let mut out = BTreeMap::new();
            for entry in table.iter()? {
                let (job, record) = entry?;
                out.insert(job.value(), record.value().to_vec());
            }
            Ok(out)
        };
        read().map_err(|e| self.error(e))
    }

    /// Every instance on record.
    pub fn instances(&self) -> Result<BTreeMap<InstanceId, InstanceRecord>, LedgerError> {
        let read = || -> Result<_, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(INSTANCES)?;
            let mut out = BTreeMap::new();
            for entry in table.iter()? {
                let (id, record) = entry?;
                // A record this version cannot read is treated as unknown (deleted), never
                // as healthy.
                if let Ok(record) = serde_json::from_slice::<InstanceRecord>(record.value()) {
                    out.insert(InstanceId(id.value().to_owned()), record);
                }
            }
            Ok(out)
        };
        read().map_err(|e| self.error(e))
    }

    pub fn put(&self, id: &InstanceId, record: &InstanceRecord) -> Result<(), LedgerError> {
        let bytes = serde_json::to_vec(record).expect("a record always serializes");
        self.write(|txn| {
            txn.open_table(INSTANCES)?
                .insert(id.0.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    pub fn remove(&self, id: &InstanceId) -> Result<(), LedgerError> {
        self.write(|txn| {
            txn.open_table(INSTANCES)?.remove(id.0.as_str())?;
            Ok(())
        })
    }

    /// Counts one job arrival in its minute, and forgets history older than eight weeks.
    pub fn record_arrival(&self, at: DateTime<Utc>) -> Result<(), LedgerError> {
        let minute = at.timestamp().div_euclid(60);
        self.write(|txn| {
            let mut table = txn.open_table(ARRIVALS)?;
            let count = table.get(minute)?.map_or(0, |c| c.value());
            table.insert(minute, count + 1)?;
            table.retain_in(..minute - HISTORY_MINUTES, |_, _| false)?;
            Ok(())
        })
    }

    /// Arrivals per unix minute, oldest first.
    pub fn arrivals(&self) -> Result<Vec<(i64, u32)>, LedgerError> {
        let read = || -> Result<_, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(ARRIVALS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (minute, count) = entry?;
                out.push((minute.value(), count.value()));
            }
            Ok(out)
        };
        read().map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_second_manager_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state/ledger.redb");
        let record = InstanceRecord {
            state: RecordState::Ready,
            use_count: 3,
            jobs: vec![41, 42],
            first_seen_unix: 1_700_000_000,
        };
        {
            let ledger = Ledger::open(&path).expect("opens");
            ledger
                .put(&InstanceId("vm-1".into()), &record)
                .expect("put");
            ledger
                .put(&InstanceId("vm-2".into()), &record)
                .expect("put");
            ledger.remove(&InstanceId("vm-2".into())).expect("remove");
            let at: DateTime<Utc> = "2026-12-04T10:00:30Z".parse().expect("time");
            ledger.record_arrival(at).expect("arrival");
            ledger.record_arrival(at).expect("arrival");
            ledger.put_job(41, b"first").expect("put job");
            ledger.put_job(41, b"resumable").expect("replace job");
            ledger.put_job(43, b"ended").expect("put job");
            ledger.remove_job(43).expect("remove job");
            let error = Ledger::open(&path).err().expect("the file is locked");
            assert!(
                error.to_string().contains("no other podfleet manager"),
                "{error}"
            );
        }
        let ledger = Ledger::open(&path).expect("reopens");
        let instances = ledger.instances().expect("read");
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[&InstanceId("vm-1".into())], record);
        assert_eq!(ledger.arrivals().expect("read"), vec![(29_939_640, 2)]);
        let jobs = ledger.jobs().expect("read jobs");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[&41], b"resumable");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "job tokens at rest: owner only");
        let stats = ledger.commit_times();
        assert_eq!(stats.count, 1, "opening commits the table creation once");
        assert!(stats.p50 <= stats.p99 && stats.p99 <= stats.max);
    }
}
