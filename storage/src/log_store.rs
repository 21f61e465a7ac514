//! The Raft log: entries in their own segment files ([`RaftWal`]), the vote, committed id,
//! purge point and format in sled, keyed by [`LogKey`].
//!
//! Appends are acknowledged to openraft (its `LogFlushed` callback) only once their
//! `fdatasync` has returned, and votes only after [`Durable::sync`], so a crash never loses
//! what this replica promised its peers.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogId, StorageIOError};

use crate::durable::{blocking, decode, encode, Durable, StoreError};
use crate::keys::LogKey;
use crate::raft_wal::RaftWal;
use crate::types::{Entry, Events, LogId, StorageError, TypeConfig, Vote};

#[derive(Clone)]
pub struct LogStore {
    tree: sled::Tree,
    durable: Arc<Durable>,
    wal: Arc<RaftWal>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// Version of the log's layout. 2: entries live in [`RaftWal`] segment files; 1: they were
/// sled keys, each a batch of events ([`Events`]); before 1 (unversioned) each sled entry
/// carried exactly one event ([`legacy`]).
const FORMAT: u32 = 2;

fn encode_entries(entries: impl IntoIterator<Item = Entry>) -> Vec<(u64, Vec<u8>)> {
    entries
        .into_iter()
        .map(|entry| (entry.get_log_id().index, encode(&entry)))
        .collect()
}

/// Appends and waits, on this thread, until the entries are durable.
fn append_and_wait(wal: &RaftWal, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StoreError> {
    let (done, synced) = std::sync::mpsc::channel();
    wal.append(
        entries,
        Box::new(move |result| {
            let _ = done.send(result);
        }),
    )?;
    synced
        .recv()
        .map_err(|_| StoreError::corrupt("raft log", "the sync thread has stopped"))?
        .map_err(StoreError::io("raft log"))
}

/// Moves the entries of a format-1 log from sled to the segment files. The sled keys go only
/// after the format says the files hold the log; a crash before that does it all again.
fn move_entries_to_wal(
    tree: &sled::Tree,
    wal_dir: &Path,
    purged: Option<u64>,
) -> Result<RaftWal, StoreError> {
    if wal_dir.exists() {
        std::fs::remove_dir_all(wal_dir).map_err(StoreError::io(wal_dir))?;
    }
    let wal = RaftWal::open(wal_dir, purged)?;
    let range = LogKey::Entry(0).encode()..=LogKey::Entry(u64::MAX).encode();
    let mut chunk = Vec::new();
    let mut moved = 0u64;
    for item in tree.range(range) {
        let (key, value) = item?;
        let index =
            LogKey::entry_index(&key).ok_or_else(|| StoreError::corrupt("log key", "bad"))?;
        chunk.push((index, value.to_vec()));
        if chunk.len() == 4096 {
            moved += chunk.len() as u64;
            append_and_wait(&wal, std::mem::take(&mut chunk))?;
        }
    }
    moved += chunk.len() as u64;
    append_and_wait(&wal, chunk)?;
    if moved > 0 {
        tracing::info!(
            entries = moved,
            "moved the Raft log from sled to its own files"
        );
    }
    Ok(wal)
}

impl LogStore {
    /// Opens the log: its records in `durable`, its entries' files in `wal_dir`.
    pub fn open(durable: Arc<Durable>, wal_dir: &Path) -> Result<LogStore, StoreError> {
        let tree = durable.db.open_tree("raft_log")?;
        let get_purged = |tree: &sled::Tree| -> Result<Option<u64>, StoreError> {
            Ok(get::<LogId>(tree, LogKey::LastPurged)?.map(|l| l.index))
        };
        let wal = match get::<u32>(&tree, LogKey::Format)? {
            Some(FORMAT) => RaftWal::open(wal_dir, get_purged(&tree)?)?,
            Some(found) if found > FORMAT => {
                return Err(StoreError::Format {
                    found,
                    expected: FORMAT,
                })
            }
            found => {
                if found.is_none() {
                    legacy::upgrade(&tree)?;
                }
                let wal = move_entries_to_wal(&tree, wal_dir, get_purged(&tree)?)?;
                tree.insert(LogKey::Format.encode(), encode(&FORMAT))?;
                durable.sync()?;
                let mut batch = sled::Batch::default();
                for item in tree.range(LogKey::Entry(0).encode()..=LogKey::Entry(u64::MAX).encode())
                {
                    batch.remove(item?.0);
                }
                tree.apply_batch(batch)?;
                durable.sync()?;
                wal
            }
        };
        Ok(LogStore {
            tree,
            durable,
            wal: Arc::new(wal),
        })
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let durable = self.durable.clone();
        blocking(move || durable.sync()).await
    }

    /// Runs a blocking call on the log's files off the runtime's threads.
    async fn on_files(
        &self,
        f: impl FnOnce(&RaftWal) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        let wal = self.wal.clone();
        blocking(move || f(&wal)).await
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StoreError> {
        let Some((_, last)) = self.wal.bounds() else {
            return Ok(None);
        };
        match self.wal.read(last, last + 1)?.pop() {
            None => Ok(None),
            Some((_, payload)) => {
                let entry: Entry = decode("log entry", &payload)?;
                Ok(Some(*entry.get_log_id()))
            }
        }
    }

    /// Writes entries and returns once they are on stable storage.
    #[cfg(test)]
    pub(crate) async fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(), StoreError> {
        let (done, synced) = tokio::sync::oneshot::channel();
        self.wal.append(
            encode_entries(entries),
            Box::new(move |result| {
                let _ = done.send(result);
            }),
        )?;
        synced
            .await
            .map_err(|_| StoreError::corrupt("raft log", "the sync thread has stopped"))?
            .map_err(StoreError::io("raft log"))
    }

    /// First and last index held, for status pages.
    pub fn bounds(&self) -> (Option<u64>, Option<u64>) {
        match self.wal.bounds() {
            Some((first, last)) => (Some(first), Some(last)),
            None => (None, None),
        }
    }
}

fn get<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: LogKey,
) -> Result<Option<T>, StoreError> {
    tree.get(key.encode())?
        .map(|bytes| decode(&format!("{key:?}"), &bytes))
        .transpose()
}

/// `range` as the half-open `from..to` the files are read by.
fn index_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (from, to) = index_range(&range);
        self.wal
            .read(from, to)
            .map_err(read_err)?
            .into_iter()
            .map(|(_, payload)| decode::<Entry>("log entry", &payload).map_err(read_err))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> =
            get(&self.tree, LogKey::LastPurged).map_err(read_err)?;
        let last_log_id = self
            .last_entry_id()
            .map_err(read_err)?
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let write = |e: StoreError| -> StorageError {
            StorageIOError::write_vote(AnyError::new(&e)).into()
        };
        self.tree
            .insert(LogKey::Vote.encode(), encode(vote))
            .map_err(|e| write(e.into()))?;
        self.sync().await.map_err(write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        get(&self.tree, LogKey::Vote)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-learning the commit point from the leader.
        self.tree
            .insert(LogKey::Committed.encode(), encode(&committed))
            .map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(get::<Option<LogId>>(&self.tree, LogKey::Committed)
            .map_err(read_err)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.wal
            .append(
                encode_entries(entries),
                Box::new(move |result| callback.log_io_completed(result)),
            )
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.on_files(move |wal| wal.truncate(log_id.index))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The purge point is durable before any entry goes: the log state then reads right
        // whether the files were removed or not.
        self.tree
            .insert(LogKey::LastPurged.encode(), encode(&log_id))
            .map_err(write_err)?;
        self.sync().await.map_err(write_err)?;
        self.on_files(move |wal| wal.purge(log_id.index))
            .await
            .map_err(write_err)
    }
}

/// The log as written before entries carried batches: one event's bytes per entry.
pub(crate) mod legacy {
    use openraft::EntryPayload;
    use serde::{Deserialize, Serialize};

    use super::{decode, encode, Entry, Events, LogKey, StoreError};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub(crate) struct EventBytes(pub Vec<u8>);

    openraft::declare_raft_types!(
        pub(crate) Config:
            D = EventBytes,
            R = (),
            NodeId = u64,
            Node = openraft::BasicNode,
            Entry = openraft::Entry<Config>,
            SnapshotData = tokio::fs::File,
            AsyncRuntime = openraft::TokioRuntime,
    );

    pub(crate) type LegacyEntry = openraft::Entry<Config>;

    /// Re-encodes every entry of an unversioned log as a batch of its one event, in one sled
    /// batch (the caller syncs), so a crash part way leaves the old log to upgrade again.
    pub(super) fn upgrade(tree: &sled::Tree) -> Result<(), StoreError> {
        let range = LogKey::Entry(0).encode()..=LogKey::Entry(u64::MAX).encode();
        let mut batch = sled::Batch::default();
        let mut upgraded = 0u64;
        for item in tree.range(range) {
            let (key, value) = item?;
            let old: LegacyEntry = decode("log entry (unversioned)", &value)?;
            let payload = match old.payload {
                EntryPayload::Blank => EntryPayload::Blank,
                EntryPayload::Normal(EventBytes(event)) => EntryPayload::Normal(Events::one(event)),
                EntryPayload::Membership(m) => EntryPayload::Membership(m),
            };
            let entry = Entry {
                log_id: old.log_id,
                payload,
            };
            batch.insert(key, encode(&entry));
            upgraded += 1;
        }
        if upgraded > 0 {
            tracing::info!(
                entries = upgraded,
                "upgrading the Raft log to batched entries"
            );
        }
        tree.apply_batch(batch)?;
        Ok(())
    }
}
