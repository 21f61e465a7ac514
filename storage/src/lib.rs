//! dom's event log and everything that stores it.
//!
//! An admin call becomes an [`event::Event`]; the leader checks it against the
//! [`fleet::FleetState`] and proposes its protobuf bytes through openraft. Each replica's
//! [`log_store::LogStore`] keeps the Raft log (its entries in [`raft_wal`] segment files); once
//! committed, the [`state_machine::StateMachineStore`] folds the event into the fleet state and
//! appends it to the hash-chained [`journal`] ([`journal_store`] files), and one sled batch moves
//! the applied index and journal head together. The journal is never purged: it is the audit
//! trail, and snapshots carry it whole so a replica that catches up by snapshot still holds all
//! of history.

// openraft's StorageError is large and not ours to shrink.
#![allow(clippy::result_large_err)]

pub mod audit_index;
pub mod durable;
pub mod event;
pub mod fleet;
pub mod image;
pub mod journal;
pub mod journal_store;
pub mod keys;
pub mod log_store;
pub mod names;
pub mod objects;
pub mod plan;
pub mod raft_wal;
pub mod replay;
pub mod snapshot;
pub mod state_machine;
pub mod types;

use std::path::Path;
use std::sync::Arc;

pub use durable::StoreError;

/// Opens (or creates) a replica's storage under `dir`: sled in `dir/sled`, the Raft log's
/// entries in `dir/raft_log`, the journal's segment files in `dir/journal`, snapshots in
/// `dir/snapshots`. Fails with [`StoreError::Locked`] if another process has it open.
pub fn open(
    dir: &Path,
) -> Result<(log_store::LogStore, state_machine::StateMachineStore), StoreError> {
    let durable = Arc::new(durable::Durable::open(&dir.join("sled"))?);
    let log = log_store::LogStore::open(durable.clone(), &dir.join("raft_log"))?;
    let sm = state_machine::StateMachineStore::open(
        durable,
        &dir.join("journal"),
        dir.join("snapshots"),
    )?;
    Ok((log, sm))
}

/// As [`open`], but waits up to `patience` while the data dir is locked. sled 0.34 lets go of
/// its file lock from background threads a moment after the last handle drops, so a process
/// that closes a data dir and opens it again (a tool, a bench, a test) must wait for it; a
/// daemon opening its data dir once uses [`open`] and refuses a dir in use at once.
pub fn open_when_released(
    dir: &Path,
    patience: std::time::Duration,
) -> Result<(log_store::LogStore, state_machine::StateMachineStore), StoreError> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match open(dir) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests;
