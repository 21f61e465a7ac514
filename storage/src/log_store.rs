//! The Raft log in sled: vote, committed id, purge point and entries, keyed by [`LogKey`].
//!
//! Appends and votes are acknowledged to openraft only after [`Durable::sync`] returns, so a
//! crash never loses what this replica promised its peers. Sync runs on the blocking pool to
//! keep the Raft core's runtime thread free.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogId, StorageIOError};

use crate::durable::{decode, encode, Durable, StoreError};
use crate::keys::LogKey;
use crate::types::{Entry, Events, LogId, StorageError, TypeConfig, Vote};

#[derive(Clone)]
pub struct LogStore {
    tree: sled::Tree,
    durable: Arc<Durable>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// Version of the entries' encoding. 1: an entry carries a batch of events ([`Events`]); the
/// unversioned log before it carried exactly one event per entry ([`legacy`]).
const FORMAT: u32 = 1;

impl LogStore {
    pub fn open(durable: Arc<Durable>) -> Result<LogStore, StoreError> {
        let tree = durable.db.open_tree("raft_log")?;
        let store = LogStore { tree, durable };
        match store.get::<u32>(LogKey::Format)? {
            Some(FORMAT) => {}
            Some(found) => {
                return Err(StoreError::Format {
                    found,
                    expected: FORMAT,
                })
            }
            None => {
                legacy::upgrade(&store.tree)?;
                store
                    .tree
                    .insert(LogKey::Format.encode(), encode(&FORMAT))?;
                store.durable.sync()?;
            }
        }
        Ok(store)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: LogKey) -> Result<Option<T>, StoreError> {
        self.tree
            .get(key.encode())?
            .map(|bytes| decode(&format!("{key:?}"), &bytes))
            .transpose()
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let durable = self.durable.clone();
        tokio::task::spawn_blocking(move || durable.sync())
            .await
            .map_err(|e| StoreError::Snapshot(format!("sync task failed: {e}")))?
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StoreError> {
        let range = LogKey::Entry(0).encode()..=LogKey::Entry(u64::MAX).encode();
        match self.tree.range(range).next_back() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item?;
                let entry: Entry = decode("log entry", &value)?;
                Ok(Some(*entry.get_log_id()))
            }
        }
    }

    /// Writes entries and returns once they are on stable storage.
    pub(crate) async fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(
                LogKey::Entry(entry.get_log_id().index).encode(),
                encode(&entry),
            );
        }
        self.tree.apply_batch(batch)?;
        self.sync().await
    }

    /// First and last index held, for status pages.
    pub fn bounds(&self) -> (Option<u64>, Option<u64>) {
        let range = LogKey::Entry(0).encode()..=LogKey::Entry(u64::MAX).encode();
        let index = |item: Option<sled::Result<(sled::IVec, sled::IVec)>>| {
            item.and_then(Result::ok)
                .and_then(|(k, _)| LogKey::entry_index(&k))
        };
        (
            index(self.tree.range(range.clone()).next()),
            index(self.tree.range(range).next_back()),
        )
    }
}

fn entry_range<RB: RangeBounds<u64>>(range: &RB) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let map = |b: Bound<&u64>| match b {
        Bound::Included(i) => Bound::Included(LogKey::Entry(*i).encode()),
        Bound::Excluded(i) => Bound::Excluded(LogKey::Entry(*i).encode()),
        Bound::Unbounded => Bound::Unbounded,
    };
    let start = match range.start_bound() {
        Bound::Unbounded => Bound::Included(LogKey::Entry(0).encode()),
        other => map(other),
    };
    let end = match range.end_bound() {
        Bound::Unbounded => Bound::Included(LogKey::Entry(u64::MAX).encode()),
        other => map(other),
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.tree
            .range(entry_range(&range))
            .map(|item| {
                let (_, value) = item.map_err(read_err)?;
                decode::<Entry>("log entry", &value).map_err(read_err)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get(LogKey::LastPurged).map_err(read_err)?;
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
        self.get(LogKey::Vote)
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
        Ok(self
            .get::<Option<LogId>>(LogKey::Committed)
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
        let written = self
            .write_entries(entries)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(written);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.tree.range(entry_range(&(log_id.index..))) {
            batch.remove(item.map_err(write_err)?.0);
        }
        self.tree.apply_batch(batch).map_err(write_err)?;
        self.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: if we crash half way, the log state still reads right.
        self.tree
            .insert(LogKey::LastPurged.encode(), encode(&log_id))
            .map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for item in self.tree.range(entry_range(&(..=log_id.index))) {
            batch.remove(item.map_err(write_err)?.0);
        }
        self.tree.apply_batch(batch).map_err(write_err)?;
        self.sync().await.map_err(write_err)
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
