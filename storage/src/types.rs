//! openraft's type configuration for dom.

use serde::{Deserialize, Serialize};

use crate::journal::JournalHead;

/// A Raft log entry's application payload: the protobuf bytes of one `dom.v1.Event`, exactly as
/// the leader encoded them. Apply decodes them; the journal keeps them verbatim.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBytes(pub Vec<u8>);

impl std::fmt::Debug for EventBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventBytes({} bytes)", self.0.len())
    }
}

/// What applying one log entry did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The event changed the fleet state and became this journal record.
    Event(JournalHead),
    /// The event was refused at apply time (it lost a race with another proposal); nothing
    /// changed and nothing was journaled. Every replica refuses it identically.
    Refused(String),
    /// A blank or membership entry.
    NotAnEvent,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = EventBytes,
        R = Applied,
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
