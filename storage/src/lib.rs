//! dom's event log and everything that stores it.
//!
//! An admin call becomes an [`event::Event`]; the leader checks it against the
//! [`fleet::FleetState`] and proposes its protobuf bytes through openraft. Each replica's
//! [`log_store::LogStore`] keeps the Raft log in sled; once committed, the
//! [`state_machine::StateMachineStore`] folds the event into the fleet state and appends it to
//! the hash-chained [`journal`] in one sled batch, so the applied index, the state and the
//! journal never disagree. The journal is never purged: it is the audit trail, and snapshots
//! carry it whole so a replica that catches up by snapshot still holds all of history.

pub mod event;
pub mod fleet;
pub mod names;
