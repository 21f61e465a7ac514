//! openraft's type configuration for dom.

use serde::{Deserialize, Serialize};

use crate::journal::JournalHead;

/// A Raft log entry's application payload: the protobuf bytes of one or more `dom.v1.Event`s,
/// exactly as the leader encoded them. The leader commits proposals that arrive together as one
/// entry (group commit), so one log write and one replication round carry them all; apply still
/// checks, applies and journals each event on its own, in order. The journal keeps the bytes
/// verbatim.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Events(pub Vec<Vec<u8>>);

impl Events {
    pub fn one(event: Vec<u8>) -> Events {
        Events(vec![event])
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: usize = self.0.iter().map(Vec::len).sum();
        write!(f, "Events({} events, {bytes} bytes)", self.0.len())
    }
}

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The event changed the fleet state and became this journal record.
    Event(JournalHead),
    /// The event was refused at apply time (it lost a race with another proposal); nothing
    /// changed and nothing was journaled. Every replica refuses it identically.
    Refused(String),
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Events,
        // One per event of the entry, in order; none for a blank or membership entry.
        R = Vec<Applied>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;
