//! The state machine in sled: applies committed events to the fleet state and the journal.
//!
//! The journal head and the applied log id live in one sled tree under [`StateKey`]s, written
//! by one batch per `apply` call: after a crash the state is exactly what the applied id says,
//! and openraft re-applies from there. The journal's records go to its segment files
//! ([`JournalStore`]) just before that batch, so the files hold at least what the head says;
//! open cuts what lies past it.
//!
//! What is folded from the journal is written once per journal block ([`segments::BLOCK`]
//! records), not per event: the fleet's records (every machine and image changed in the block,
//! at the index [`StateKey::RecordsAt`] names) and the block's audit index
//! ([`crate::audit_index`]). At open the fleet state is loaded from its records and the few
//! journal records after them are folded in again, so a machine written a thousand times in a
//! block costs one sled insert, not a thousand. Applied state is not fsynced per batch (the
//! Raft log already is); building a snapshot syncs it and the journal first, because the log
//! may be purged behind a snapshot.

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftLogId, StorageIOError};
use tokio::sync::watch;

use crate::audit_index::{self, BlockIndex};
use crate::durable::{blocking, decode, encode, sync_dir, Durable, StoreError};
use crate::event::Event;
use crate::fleet::{FleetState, Image, Machine, Policy, Touched};
use crate::journal::{self, JournalHead, JournalRecord};
use crate::journal_store::{self as segments, JournalStore, Position};
use crate::keys::StateKey;
use crate::snapshot::{Frame, SnapshotHeader, SnapshotReader, SnapshotWriter};
use crate::types::{
    Applied, Entry, Events, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// Version of the fleet records' encoding and of where the journal lives. The journal's
/// records never change, so fleet records of an older version are rebuilt by folding the
/// journal ([`rebuild_records`]); before 5 the journal was kept in sled, and is moved to its
/// segment files ([`move_journal_to_segments`]).
const FORMAT: u32 = 6;
/// The first format that keeps the journal in segment files.
const FORMAT_SEGMENTS: u32 = 5;
/// The first format that writes the fleet's records and the audit index once per journal block.
const FORMAT_BLOCKS: u32 = 6;

/// What the state machine has applied, as one consistent view.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub state: FleetState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub journal: JournalHead,
    /// What the journal's current block changed and has not yet written to sled.
    unflushed: Unflushed,
}

/// The part of the fold that is written at the end of the journal's block: the records it
/// changed and its audit index.
#[derive(Debug, Clone, Default)]
struct Unflushed {
    touched: BTreeSet<Touched>,
    audit: BlockIndex,
}

impl Unflushed {
    /// Adds to `batch` what the block that journal record `index` ends has changed; the fleet's
    /// records then reflect `index`.
    fn write(&mut self, state: &FleetState, index: u64, batch: &mut sled::Batch) {
        for (key, value) in self.audit.entries() {
            batch.insert(key, value);
        }
        for touched in std::mem::take(&mut self.touched) {
            match record(state, &touched) {
                (key, Some(value)) => batch.insert(key.encode(), value),
                (key, None) => batch.remove(key.encode()),
            }
        }
        batch.insert(StateKey::RecordsAt.encode(), encode(&index));
        self.audit = BlockIndex::for_record(index + 1);
    }
}

struct Shared {
    tree: sled::Tree,
    durable: Arc<Durable>,
    journal: JournalStore,
    snapshot_dir: PathBuf,
    live: RwLock<Live>,
    applied: watch::Sender<JournalHead>,
}

/// openraft's handle on the state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

/// A read-only handle on the applied fleet state and journal, for the admin API.
#[derive(Clone)]
pub struct FleetView {
    shared: Arc<Shared>,
}

fn sm_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

fn sm_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

fn snapshot_err(meta: Option<&SnapshotMeta>, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(meta.map(|m| m.signature()), AnyError::new(&e)).into()
}

/// The persisted record for one touched part of the state: `Some(value)` to write, `None` to
/// remove.
fn record(state: &FleetState, touched: &Touched) -> (StateKey, Option<Vec<u8>>) {
    match touched {
        Touched::Machine(host) => (
            StateKey::Machine(host.clone()),
            state.machine(host).map(encode),
        ),
        Touched::Image(name) => (StateKey::Image(name.clone()), state.image(name).map(encode)),
        Touched::Policy => (StateKey::Policy, Some(encode(state.policy()))),
    }
}

/// Every record of a state, as written to a snapshot.
fn all_records(state: &FleetState) -> Vec<(Vec<u8>, Vec<u8>)> {
    state
        .machines()
        .map(|m| Touched::Machine(m.hostname.clone()))
        .chain(state.images().map(|i| Touched::Image(i.name.clone())))
        .chain([Touched::Policy])
        .filter_map(|t| {
            let (key, value) = record(state, &t);
            Some((key.encode(), value?))
        })
        .collect()
}

fn scan<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    prefix: u8,
) -> Result<Vec<T>, StoreError> {
    tree.scan_prefix([prefix])
        .map(|item| {
            let (key, value) = item?;
            decode(&String::from_utf8_lossy(&key), &value)
        })
        .collect()
}

fn get<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: StateKey,
) -> Result<Option<T>, StoreError> {
    tree.get(key.encode())?
        .map(|v| decode(&format!("{key:?}"), &v))
        .transpose()
}

fn load(tree: &sled::Tree) -> Result<Live, StoreError> {
    let state = FleetState::from_records(
        scan::<Machine>(tree, StateKey::MACHINE)?,
        scan::<Image>(tree, StateKey::IMAGE)?,
        get::<Policy>(tree, StateKey::Policy)?.unwrap_or_default(),
    );
    Ok(Live {
        state,
        last_applied: get::<Option<LogId>>(tree, StateKey::LastApplied)?.flatten(),
        membership: get(tree, StateKey::LastMembership)?.unwrap_or_default(),
        journal: get(tree, StateKey::JournalHead)?.unwrap_or_default(),
        unflushed: Unflushed::default(),
    })
}

/// Applies one committed event: to the fleet state, the journal, and what the journal's block
/// will write when it ends. A refused event changes nothing.
fn apply_event(
    live: &mut Live,
    batch: &mut sled::Batch,
    journal: &JournalStore,
    log_index: u64,
    bytes: Vec<u8>,
) -> Result<Applied, StoreError> {
    let next = live.journal.index + 1;
    let outcome = Event::decode(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|event| {
            let touched = live.state.apply(next, &event).map_err(|r| r.to_string())?;
            Ok((event, touched))
        });
    let (event, touched) = match outcome {
        Err(reason) => return Ok(Applied::Refused(reason)),
        Ok(applied) => applied,
    };
    let head = live.journal.next(&bytes);
    append_record(journal, batch, head.index, log_index, &head.hash, &bytes)?;
    live.journal = head;
    live.unflushed.touched.extend(touched);
    live.unflushed.audit.add(head.index, &event);
    if audit_index::ends_block(head.index) {
        live.unflushed.write(&live.state, head.index, batch);
    }
    Ok(Applied::Event(head))
}

/// Appends a record to the journal's files, keeping its position in `batch` when it starts a
/// block.
fn append_record(
    journal: &JournalStore,
    batch: &mut sled::Batch,
    index: u64,
    log_index: u64,
    hash: &crate::event::Hash,
    event: &[u8],
) -> Result<(), StoreError> {
    if let Some(position) = journal.append(index, log_index, hash, event)? {
        batch.insert(
            StateKey::JournalBlock(segments::block_of(index)).encode(),
            encode(&position),
        );
    }
    Ok(())
}

/// Where a read from journal record `index` can start: the kept position of its block.
fn read_hint(tree: &sled::Tree, index: u64) -> Result<Option<(u64, Position)>, StoreError> {
    let block = segments::block_of(index);
    Ok(get::<Position>(tree, StateKey::JournalBlock(block))?
        .map(|position| (block * segments::BLOCK + 1, position)))
}

/// Journal records `from..=to` from the segment files; `to` must not pass the head.
fn read_journal(
    tree: &sled::Tree,
    journal: &JournalStore,
    from: u64,
    to: u64,
) -> Result<segments::Records, StoreError> {
    Ok(journal.read(from, to, read_hint(tree, from.max(1))?))
}

/// Moves the journal of a format-4 (or older) tree from its sled keys to segment files, with
/// the position keys that reads start from. The old keys go only after the format says the
/// files hold the journal ([`remove_sled_journal`]); a crash before that redoes the move.
fn move_journal_to_segments(tree: &sled::Tree, journal: &JournalStore) -> Result<(), StoreError> {
    journal.truncate_after(0)?;
    let head: JournalHead = get(tree, StateKey::JournalHead)?.unwrap_or_default();
    let mut batch = sled::Batch::default();
    let mut chain = JournalHead::default();
    let range =
        StateKey::Journal(1).encode()..StateKey::Journal(head.index.saturating_add(1)).encode();
    for item in tree.range(range) {
        let (key, value) = item?;
        let index = StateKey::journal_index(&key)
            .ok_or_else(|| StoreError::corrupt("journal key", "bad"))?;
        let record: JournalRecord = decode("journal record", &value)?;
        chain = journal::verify(chain, [(index, &record)])
            .map_err(|e| StoreError::corrupt("journal", e))?;
        append_record(
            journal,
            &mut batch,
            index,
            record.log_index,
            &record.hash,
            &record.event,
        )?;
    }
    if chain != head {
        return Err(StoreError::corrupt(
            "journal",
            format!(
                "records end at {} but the head is {}",
                chain.index, head.index
            ),
        ));
    }
    journal.sync()?;
    tree.apply_batch(batch)?;
    Ok(())
}

/// Removes the records of kind `prefix` for which `remove` holds, in bounded batches: for
/// what older formats left behind, where a crash part way just means doing it again.
fn remove_in_batches(
    tree: &sled::Tree,
    prefix: u8,
    remove: impl Fn(&[u8]) -> bool,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut pending = 0usize;
    for item in tree.scan_prefix([prefix]) {
        let (key, _) = item?;
        if remove(&key) {
            batch.remove(key);
            pending += 1;
        }
        if pending == 16_384 {
            tree.apply_batch(std::mem::take(&mut batch))?;
            pending = 0;
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

/// Removes journal records left in sled by formats before 5.
fn remove_sled_journal(tree: &sled::Tree) -> Result<(), StoreError> {
    remove_in_batches(tree, StateKey::JOURNAL, |_| true)
}

/// Rebuilds the audit index of every whole journal block from `from_block` on, from the
/// journal, in bounded batches; it is written at once from the journal each time, so a crash
/// part way is undone by doing it again. The index of formats before 6 goes first.
fn reindex_audit(
    tree: &sled::Tree,
    journal: &JournalStore,
    from_block: u64,
) -> Result<(), StoreError> {
    for legacy in [StateKey::MACHINE_EVENT, StateKey::IMAGE_EVENT] {
        remove_in_batches(tree, legacy, |_| true)?;
    }
    for prefix in [StateKey::MACHINE_EVENTS, StateKey::IMAGE_EVENTS] {
        remove_in_batches(tree, prefix, |key| {
            StateKey::indexed(key).is_none_or(|block| block >= from_block)
        })?;
    }
    let head: JournalHead = get(tree, StateKey::JournalHead)?.unwrap_or_default();
    // The last block is whole only if the head ends it; otherwise it stays in memory.
    let last_whole = head.index - head.index % segments::BLOCK;
    let first = audit_index::first_of(from_block);
    if first > last_whole {
        return Ok(());
    }
    let mut building = BlockIndex::for_record(first);
    let mut batch = sled::Batch::default();
    for item in read_journal(tree, journal, first, last_whole)? {
        let (index, record) = item?;
        let event = Event::decode(&record.event)
            .map_err(|e| StoreError::corrupt(format!("journal record {index}"), e))?;
        building.add(index, &event);
        if audit_index::ends_block(index) {
            for (key, value) in building.entries() {
                batch.insert(key, value);
            }
            if (index / segments::BLOCK).is_multiple_of(16) {
                tree.apply_batch(std::mem::take(&mut batch))?;
            }
            building = BlockIndex::for_record(index + 1);
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

/// The kinds of record that are folded from the journal: the fleet's and the audit index.
const DERIVED: &[u8] = &[
    StateKey::MACHINE,
    StateKey::IMAGE,
    StateKey::MACHINE_EVENT,
    StateKey::IMAGE_EVENT,
    StateKey::MACHINE_EVENTS,
    StateKey::IMAGE_EVENTS,
];

/// Adds the removal of every record of the kinds `prefixes` to `batch`.
fn remove_all(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    prefixes: &[u8],
) -> Result<(), StoreError> {
    for prefix in prefixes {
        for item in tree.scan_prefix([*prefix]) {
            batch.remove(item?.0);
        }
    }
    Ok(())
}

/// Replaces the fleet records with what the journal says at its head, in one batch.
fn rebuild_records(tree: &sled::Tree, journal: &JournalStore) -> Result<(), StoreError> {
    let head: JournalHead = get(tree, StateKey::JournalHead)?.unwrap_or_default();
    let mut state = FleetState::default();
    let mut batch = sled::Batch::default();
    // Removals first: within a batch the last write to a key wins.
    remove_all(tree, &mut batch, &[StateKey::MACHINE, StateKey::IMAGE])?;
    for item in read_journal(tree, journal, 1, head.index)? {
        let (index, record) = item?;
        let event = Event::decode(&record.event)
            .map_err(|e| StoreError::corrupt(format!("journal record {index}"), e))?;
        state
            .apply(index, &event)
            .map_err(|e| StoreError::corrupt(format!("journal record {index}"), e))?;
    }
    for (key, value) in all_records(&state) {
        batch.insert(key, value);
    }
    batch.insert(StateKey::RecordsAt.encode(), encode(&head.index));
    tree.apply_batch(batch)?;
    Ok(())
}

fn snapshot_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.snap"))
}

impl StateMachineStore {
    pub fn open(
        durable: Arc<Durable>,
        journal_dir: &Path,
        snapshot_dir: PathBuf,
    ) -> Result<StateMachineStore, StoreError> {
        let tree = durable.db.open_tree("state")?;
        let journal = JournalStore::open(journal_dir)?;
        match get::<u32>(&tree, StateKey::Format)? {
            Some(FORMAT) => {}
            Some(found) if found < FORMAT => {
                if found < FORMAT_SEGMENTS {
                    tracing::info!("moving the journal from sled to segment files");
                    move_journal_to_segments(&tree, &journal)?;
                }
                if found < 4 {
                    tracing::info!(
                        from = found,
                        to = FORMAT,
                        "rebuilding fleet records from the journal"
                    );
                    rebuild_records(&tree, &journal)?;
                }
                if found < FORMAT_BLOCKS {
                    tracing::info!("rebuilding the audit index by journal block");
                    reindex_audit(&tree, &journal, 0)?;
                    // Older formats wrote the fleet's records with every event.
                    let head: JournalHead = get(&tree, StateKey::JournalHead)?.unwrap_or_default();
                    tree.insert(StateKey::RecordsAt.encode(), encode(&head.index))?;
                }
                tree.insert(StateKey::Format.encode(), encode(&FORMAT))?;
                durable.sync()?;
                remove_sled_journal(&tree)?;
                durable.sync()?;
            }
            Some(found) => {
                return Err(StoreError::Format {
                    found,
                    expected: FORMAT,
                })
            }
            None => {
                tree.insert(StateKey::Format.encode(), encode(&FORMAT))?;
            }
        }
        std::fs::create_dir_all(&snapshot_dir).map_err(StoreError::io(&snapshot_dir))?;
        let live = load(&tree)?;
        let (applied, _) = watch::channel(live.journal);
        let shared = Arc::new(Shared {
            tree,
            durable,
            journal,
            snapshot_dir,
            live: RwLock::new(live),
            applied,
        });
        shared.reconcile_journal()?;
        shared.fold_unflushed()?;
        Ok(StateMachineStore { shared })
    }

    pub fn view(&self) -> FleetView {
        FleetView {
            shared: self.shared.clone(),
        }
    }
}

impl Shared {
    fn live(&self) -> RwLockReadGuard<'_, Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the journal's files and sled's journal head into agreement at open. Records past
    /// the head (written just before a crash, their batch lost) are cut: Raft applies them
    /// again. Records missing below the head (a power loss wrote sled's pages back before the
    /// files') cannot be cut back to: the state falls back to the current snapshot, which
    /// carries the whole journal to its point (or to empty, if none was ever taken, when the
    /// Raft log still holds everything), and Raft applies the rest again from its log, which
    /// is purged only behind a snapshot.
    fn reconcile_journal(&self) -> Result<(), StoreError> {
        let head = self.live().journal;
        let end = self.journal.end();
        if end > head.index {
            tracing::info!(
                from = head.index + 1,
                to = end,
                "cutting journal records past the applied head"
            );
            self.journal.truncate_after(head.index)?;
        }
        if end >= head.index && self.head_record_is_whole(head)? {
            return Ok(());
        }
        // A snapshot install compares every record with the snapshot's, so a damaged one at
        // the head is replaced like a missing one.
        tracing::warn!(
            journal_ends = end,
            head = head.index,
            "the journal's files lost records below the applied head; going back to the current snapshot"
        );
        match get::<(SnapshotMeta, PathBuf)>(&self.tree, StateKey::CurrentSnapshot)? {
            Some((meta, path)) => {
                let file = std::fs::File::open(&path).map_err(StoreError::io(&path))?;
                self.install_snapshot(&meta, file)
            }
            None => self.reset(),
        }
    }

    /// Folds what the journal holds past the fleet's records into the state, and the current
    /// block's records into its audit index: what [`Unflushed`] held before a restart.
    fn fold_unflushed(&self) -> Result<(), StoreError> {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        self.fold_unflushed_into(&mut live)
    }

    fn fold_unflushed_into(&self, live: &mut Live) -> Result<(), StoreError> {
        let head = live.journal.index;
        let records_at: u64 = get(&self.tree, StateKey::RecordsAt)?.unwrap_or(0);
        if records_at > head {
            return Err(StoreError::corrupt(
                "fleet records",
                format!("they reflect journal index {records_at}, past the head {head}"),
            ));
        }
        let block_first = audit_index::first_of(segments::block_of(head + 1));
        let mut unflushed = Unflushed {
            touched: BTreeSet::new(),
            audit: BlockIndex::for_record(head + 1),
        };
        let from = (records_at + 1).min(block_first);
        if from <= head {
            for item in read_journal(&self.tree, &self.journal, from, head)? {
                let (index, record) = item?;
                let what = || format!("journal record {index}");
                let event =
                    Event::decode(&record.event).map_err(|e| StoreError::corrupt(what(), e))?;
                if index > records_at {
                    let touched = live
                        .state
                        .apply(index, &event)
                        .map_err(|e| StoreError::corrupt(what(), e))?;
                    unflushed.touched.extend(touched);
                }
                if index >= block_first {
                    unflushed.audit.add(index, &event);
                }
            }
        }
        live.unflushed = unflushed;
        Ok(())
    }

    /// Whether the record at the head is there and chains from the one before it: the last
    /// bytes written are the ones a power loss damages.
    fn head_record_is_whole(&self, head: JournalHead) -> Result<bool, StoreError> {
        if head.index == 0 {
            return Ok(true);
        }
        let from = head.index.saturating_sub(1).max(1);
        let records: Vec<_> = read_journal(&self.tree, &self.journal, from, head.index)?
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        let prev = match records.as_slice() {
            [(_, prev), _] => prev.hash,
            [_] if head.index == 1 => journal::GENESIS,
            _ => return Ok(false),
        };
        let Some((_, at_head)) = records.last() else {
            return Ok(false);
        };
        Ok(at_head.hash == head.hash
            && journal::chain(&prev, head.index, &at_head.event) == head.hash)
    }

    /// Back to the empty state at no applied log id, for Raft to apply its whole log again.
    fn reset(&self) -> Result<(), StoreError> {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        remove_all(&self.tree, &mut batch, DERIVED)?;
        remove_all(&self.tree, &mut batch, &[StateKey::JOURNAL_BLOCK])?;
        *live = Live::default();
        batch.insert(StateKey::Policy.encode(), encode(live.state.policy()));
        batch.insert(StateKey::LastApplied.encode(), encode(&live.last_applied));
        batch.insert(StateKey::LastMembership.encode(), encode(&live.membership));
        batch.insert(StateKey::JournalHead.encode(), encode(&live.journal));
        batch.insert(StateKey::RecordsAt.encode(), encode(&0u64));
        self.journal.truncate_after(0)?;
        self.tree.apply_batch(batch)?;
        self.durable.sync()?;
        self.applied.send_replace(live.journal);
        Ok(())
    }

    fn apply(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<Vec<Applied>>, StoreError> {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        let mut results = Vec::new();
        let mut applied_any = false;
        for entry in entries {
            let log_id = *entry.get_log_id();
            live.last_applied = Some(log_id);
            applied_any = true;
            let result = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Membership(membership) => {
                    live.membership = StoredMembership::new(Some(log_id), membership);
                    Vec::new()
                }
                EntryPayload::Normal(Events(events)) => events
                    .into_iter()
                    .map(|event| {
                        apply_event(&mut live, &mut batch, &self.journal, log_id.index, event)
                    })
                    .collect::<Result<_, _>>()?,
            };
            results.push(result);
        }
        if applied_any {
            // Records reach the files before the batch that moves the head to them.
            self.journal.flush()?;
            batch.insert(StateKey::LastApplied.encode(), encode(&live.last_applied));
            batch.insert(StateKey::LastMembership.encode(), encode(&live.membership));
            batch.insert(StateKey::JournalHead.encode(), encode(&live.journal));
            self.tree.apply_batch(batch)?;
            self.applied.send_replace(live.journal);
        }
        Ok(results)
    }

    /// Writes a snapshot of what is applied now. Blocking.
    fn build_snapshot(&self) -> Result<(SnapshotMeta, PathBuf), StoreError> {
        let (header, records) = {
            let live = self.live();
            let header = SnapshotHeader {
                last_applied: live.last_applied,
                membership: live.membership.clone(),
                journal: live.journal,
            };
            (header, all_records(&live.state))
        };
        // The log may be purged up to this snapshot once we return: the applied state it
        // replaces, and the journal it folds, must be on disk first.
        self.journal.sync()?;
        self.durable.sync()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = match header.last_applied {
            Some(log_id) => format!(
                "{}-{}-{}-{nanos}",
                log_id.leader_id.term, log_id.index, header.journal.index
            ),
            None => format!("0-0-0-{nanos}"),
        };
        let path = snapshot_file(&self.snapshot_dir, &id);
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(StoreError::io(&tmp))?;
        let mut writer =
            SnapshotWriter::new(BufWriter::new(file), &header).map_err(StoreError::io(&tmp))?;
        for (key, value) in &records {
            writer.state(key, value).map_err(StoreError::io(&tmp))?;
        }
        // Records up to the captured head never change, so they can be read while apply goes on.
        for item in read_journal(&self.tree, &self.journal, 1, header.journal.index)? {
            let (index, record) = item?;
            writer
                .journal(index, &encode(&record))
                .map_err(StoreError::io(&tmp))?;
        }
        let file = writer.finish().map_err(StoreError::io(&tmp))?;
        let file = file.into_inner().map_err(|e| StoreError::Io {
            path: tmp.clone(),
            error: e.into_error(),
        })?;
        file.sync_all().map_err(StoreError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(StoreError::io(&path))?;
        sync_dir(&self.snapshot_dir)?;
        let meta = SnapshotMeta {
            last_log_id: header.last_applied,
            last_membership: header.membership,
            snapshot_id: id,
        };
        self.set_current_snapshot(&meta, &path)?;
        Ok((meta, path))
    }

    fn set_current_snapshot(&self, meta: &SnapshotMeta, path: &Path) -> Result<(), StoreError> {
        let previous = get::<(SnapshotMeta, PathBuf)>(&self.tree, StateKey::CurrentSnapshot)?;
        self.tree
            .insert(StateKey::CurrentSnapshot.encode(), encode(&(meta, path)))?;
        self.durable.sync()?;
        if let Some((_, old)) = previous.filter(|(_, old)| old != path) {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }

    /// Replaces the applied state with a received snapshot's. Blocking.
    fn install_snapshot(
        &self,
        meta: &SnapshotMeta,
        mut file: std::fs::File,
    ) -> Result<(), StoreError> {
        file.seek(SeekFrom::Start(0))
            .map_err(StoreError::io(&self.snapshot_dir))?;
        let path = snapshot_file(&self.snapshot_dir, &meta.snapshot_id);
        let tmp = path.with_extension("tmp");
        // Keep our own copy as the current snapshot while reading it: one pass over the data.
        let copy = std::fs::File::create(&tmp).map_err(StoreError::io(&tmp))?;
        let mut reader = SnapshotReader::new(Tee {
            input: BufReader::new(file),
            copy: BufWriter::new(copy),
        })?;
        let header = match reader.next_frame()? {
            Some(Frame::Header(header)) => header,
            _ => return Err(StoreError::Snapshot("first frame is not a header".into())),
        };
        if header.last_applied != meta.last_log_id {
            return Err(StoreError::Snapshot(format!(
                "header says last applied {:?}, meta says {:?}",
                header.last_applied, meta.last_log_id
            )));
        }
        let local_head = self.live().journal;
        // The audit index of whole blocks before this one is ours and stays; from this one on it
        // is built from the snapshot's records as they come.
        let index_from = segments::block_of(local_head.index.min(header.journal.index) + 1);
        if local_head.index > header.journal.index {
            for prefix in [StateKey::MACHINE_EVENTS, StateKey::IMAGE_EVENTS] {
                remove_in_batches(&self.tree, prefix, |key| {
                    StateKey::indexed(key).is_none_or(|block| block >= index_from)
                })?;
            }
        }
        let mut building = BlockIndex::for_record(audit_index::first_of(index_from));
        let mut reindex_from: Option<u64> = None;
        // Our own records are compared with the snapshot's as they come, in one pass.
        let mut local_end = self.journal.end();
        let mut local = read_journal(&self.tree, &self.journal, 1, local_end)?;
        let mut state_batch = sled::Batch::default();
        let mut snapshot_keys = std::collections::HashSet::new();
        let mut machines = Vec::new();
        let mut images = Vec::new();
        let mut policy = Policy::default();
        let mut head = JournalHead::default();
        let mut journal_batch = sled::Batch::default();
        let mut pending = 0usize;
        while let Some(frame) = reader.next_frame()? {
            match frame {
                Frame::Header(_) => return Err(StoreError::Snapshot("second header".into())),
                Frame::State(key, value) => {
                    match key.first() {
                        Some(&StateKey::MACHINE) => {
                            machines.push(decode::<Machine>("snapshot machine", &value)?)
                        }
                        Some(&StateKey::IMAGE) => {
                            images.push(decode::<Image>("snapshot image", &value)?)
                        }
                        _ if key == StateKey::Policy.encode() => {
                            policy = decode("snapshot policy", &value)?
                        }
                        _ => {
                            return Err(StoreError::Snapshot(format!(
                                "unexpected state key {key:?}"
                            )))
                        }
                    }
                    snapshot_keys.insert(key.clone());
                    state_batch.insert(key, value);
                }
                Frame::Journal(index, value) => {
                    let record: JournalRecord = decode("snapshot journal record", &value)?;
                    head = journal::verify(head, [(index, &record)])
                        .map_err(|e| StoreError::Snapshot(format!("journal in snapshot: {e}")))?;
                    if index >= audit_index::first_of(index_from) {
                        let event = Event::decode(&record.event).map_err(|e| {
                            StoreError::Snapshot(format!("journal record {index}: {e}"))
                        })?;
                        building.add(index, &event);
                        if audit_index::ends_block(index) {
                            for (key, value) in building.entries() {
                                journal_batch.insert(key, value);
                                pending += 1;
                            }
                            building = BlockIndex::for_record(index + 1);
                        }
                    }
                    let ours = if index <= local_end {
                        local.next().and_then(|r| r.ok())
                    } else {
                        None
                    };
                    if !matches!(&ours, Some((i, r)) if *i == index && *r == record) {
                        if index <= local_end {
                            // Ours was damaged: the snapshot's is the committed history.
                            tracing::warn!(index, "replacing journal records from the snapshot's");
                            self.journal.truncate_after(index - 1)?;
                            local_end = index - 1;
                            let block = segments::block_of(index);
                            if block < index_from {
                                reindex_from.get_or_insert(block);
                            }
                        }
                        // Records past our head are invisible until the final batch moves the
                        // head, so they can be written in bounded chunks.
                        append_record(
                            &self.journal,
                            &mut journal_batch,
                            index,
                            record.log_index,
                            &record.hash,
                            &record.event,
                        )?;
                        pending += 1;
                    }
                    if pending >= 4096 {
                        self.journal.flush()?;
                        self.tree.apply_batch(std::mem::take(&mut journal_batch))?;
                        pending = 0;
                    }
                }
            }
        }
        if head != header.journal {
            return Err(StoreError::Snapshot(format!(
                "journal ends at {head:?}, header says {:?}",
                header.journal
            )));
        }
        drop(local);
        // Records past the snapshot's head were applied here but are not history the snapshot
        // knows; Raft applies them again if they are committed.
        self.journal.truncate_after(head.index)?;
        self.journal.sync()?;
        self.tree.apply_batch(journal_batch)?;
        let Tee { copy, .. } = reader.into_inner();
        let copy = copy.into_inner().map_err(|e| StoreError::Io {
            path: tmp.clone(),
            error: e.into_error(),
        })?;
        copy.sync_all().map_err(StoreError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(StoreError::io(&path))?;
        sync_dir(&self.snapshot_dir)?;

        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        for prefix in [StateKey::MACHINE, StateKey::IMAGE] {
            for item in self.tree.scan_prefix([prefix]) {
                let (key, _) = item?;
                if !snapshot_keys.contains(key.as_ref()) {
                    state_batch.remove(key);
                }
            }
        }
        state_batch.insert(StateKey::Policy.encode(), encode(&policy));
        state_batch.insert(StateKey::LastApplied.encode(), encode(&header.last_applied));
        state_batch.insert(
            StateKey::LastMembership.encode(),
            encode(&header.membership),
        );
        state_batch.insert(StateKey::JournalHead.encode(), encode(&head));
        state_batch.insert(StateKey::RecordsAt.encode(), encode(&head.index));
        self.tree.apply_batch(state_batch)?;
        if let Some(block) = reindex_from {
            reindex_audit(&self.tree, &self.journal, block)?;
        }
        *live = Live {
            state: FleetState::from_records(machines, images, policy),
            last_applied: header.last_applied,
            membership: header.membership,
            journal: head,
            unflushed: Unflushed::default(),
        };
        self.fold_unflushed_into(&mut live)?;
        self.applied.send_replace(head);
        drop(live);
        self.set_current_snapshot(meta, &path)?;
        remove_partial_receives(&self.snapshot_dir);
        tracing::info!(
            snapshot = %meta.snapshot_id,
            last_log_index = header.last_applied.map(|l| l.index).unwrap_or(0),
            journal_index = head.index,
            "installed snapshot"
        );
        Ok(())
    }
}

fn remove_partial_receives(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "part") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Copies what is read into a second file.
struct Tee<R, W> {
    input: R,
    copy: W,
}

impl<R: std::io::Read, W: std::io::Write> std::io::Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let live = self.shared.live();
        Ok((live.last_applied, live.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Applied>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Off the runtime's threads: a batch naming 10,000 machines takes a while to fold and
        // write, and on the thread of openraft's core it held heartbeats back long enough
        // for followers to call elections.
        let shared = self.shared.clone();
        let entries: Vec<Entry> = entries.into_iter().collect();
        blocking(move || shared.apply(entries))
            .await
            .map_err(sm_write)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = self
            .shared
            .snapshot_dir
            .join(format!("receiving-{nanos}.part"));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| snapshot_err(None, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let file = snapshot.into_std().await;
        let shared = self.shared.clone();
        let owned_meta = meta.clone();
        blocking(move || shared.install_snapshot(&owned_meta, file))
            .await
            .map_err(|e| snapshot_err(Some(meta), e))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some((meta, path)) =
            get::<(SnapshotMeta, PathBuf)>(&self.shared.tree, StateKey::CurrentSnapshot)
                .map_err(sm_read)?
        else {
            return Ok(None);
        };
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| sm_read(StoreError::Io { path, error: e }))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let shared = self.shared.clone();
        let (meta, path) = blocking(move || shared.build_snapshot())
            .await
            .map_err(|e| snapshot_err(None, e))?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| snapshot_err(Some(&meta), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl FleetView {
    /// Runs `f` on the applied state; keep it short, apply waits for it.
    pub fn read<T>(&self, f: impl FnOnce(&Live) -> T) -> T {
        f(&self.shared.live())
    }

    pub fn journal_head(&self) -> JournalHead {
        self.shared.live().journal
    }

    /// Wakes on every applied journal record.
    pub fn subscribe(&self) -> watch::Receiver<JournalHead> {
        self.shared.applied.subscribe()
    }

    /// Journal records `from..=to` (bounded by the head), in order.
    pub fn journal(
        &self,
        from: u64,
        to: u64,
    ) -> impl Iterator<Item = Result<(u64, JournalRecord), StoreError>> + '_ {
        let to = to.min(self.journal_head().index);
        let records = read_journal(&self.shared.tree, &self.shared.journal, from, to);
        let (records, failed) = match records {
            Ok(records) => (Some(records), None),
            Err(e) => (None, Some(Err(e))),
        };
        records.into_iter().flatten().chain(failed)
    }

    /// Makes everything applied so far durable. Applies are not synced one by one (the Raft
    /// log is, and re-applies after a crash); a clean stop calls this so that tools reading
    /// the stopped replica's data dir, and its next start, find all of it.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.shared.journal.sync()?;
        self.shared.durable.sync()
    }

    /// Bytes of sled and the journal's files, for status pages and size regressions.
    pub fn size_on_disk(&self) -> u64 {
        self.shared.durable.size_on_disk() + self.shared.journal.size_on_disk()
    }

    /// Journal indexes of the records that name a machine (`by_machine`) or an image, in
    /// order, from the audit index: no scan of the journal.
    pub fn indexed(&self, by_machine: bool, name: &str) -> Result<Vec<u64>, StoreError> {
        let prefix = if by_machine {
            StateKey::MACHINE_EVENTS
        } else {
            StateKey::IMAGE_EVENTS
        };
        // Whole blocks in sled and the current one in memory, read under one lock: a block that
        // ends meanwhile moves from one to the other in the same apply.
        let live = self.shared.live();
        let head = live.journal.index;
        let mut found = Vec::new();
        for item in self
            .shared
            .tree
            .scan_prefix(StateKey::name_prefix(prefix, name))
        {
            let (key, positions) = item?;
            let block = StateKey::indexed(&key)
                .ok_or_else(|| StoreError::corrupt("audit index key", "too short"))?;
            found.extend(audit_index::decode_positions(block, &positions));
        }
        found.extend(live.unflushed.audit.indexes_of(by_machine, name));
        found.retain(|index| *index <= head);
        Ok(found)
    }

    /// One journal record.
    pub fn journal_record(&self, index: u64) -> Result<Option<JournalRecord>, StoreError> {
        if index == 0 {
            return Ok(None);
        }
        Ok(self
            .journal(index, index)
            .next()
            .transpose()?
            .map(|(_, r)| r))
    }
}
