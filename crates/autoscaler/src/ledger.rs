//! The durable ledger of one runner's group, in a redb file: every instance the autoscaler
//! created with its phase, use count and the jobs assigned to it, and a per-minute history
//! of job arrivals (for predictive warm capacity). A restarted manager reads it back to
//! adopt what is healthy and delete what it cannot account for.
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
        let ledger = Self { db, path };
        ledger.write(|txn| {
            txn.open_table(INSTANCES)?;
            txn.open_table(ARRIVALS)?;
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
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        f(&txn).map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))
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
    }
}
