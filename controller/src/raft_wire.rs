//! Conversions between openraft's messages and `dom.v1` Raft protobufs, one place per type.
//!
//! Everything from the wire is checked: a message missing a required part becomes a
//! [`WireError`], never a panic.

use std::collections::{BTreeMap, BTreeSet};

use dom_proto::v1 as pb;
use dom_storage::types::{
    Entry, Events, LogId, NodeId, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload, LeaderId, Membership};

#[derive(Debug, thiserror::Error)]
#[error("malformed Raft message: {0} is missing")]
pub struct WireError(pub &'static str);

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn need<T>(value: Option<T>, what: &'static str) -> Result<T, WireError> {
    value.ok_or(WireError(what))
}

pub fn leader_id_to_pb(id: &LeaderId<NodeId>) -> pb::LeaderId {
    pb::LeaderId {
        term: id.term,
        node_id: id.node_id,
    }
}

fn leader_id_from_pb(id: Option<pb::LeaderId>) -> Result<LeaderId<NodeId>, WireError> {
    let id = need(id, "leader id")?;
    Ok(LeaderId::new(id.term, id.node_id))
}

pub fn vote_to_pb(vote: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to_pb(&vote.leader_id)),
        committed: vote.committed,
    }
}

pub fn vote_from_pb(vote: Option<pb::Vote>) -> Result<Vote, WireError> {
    let vote = need(vote, "vote")?;
    Ok(Vote {
        leader_id: leader_id_from_pb(vote.leader_id)?,
        committed: vote.committed,
    })
}

pub fn log_id_to_pb(log_id: &LogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to_pb(&log_id.leader_id)),
        index: log_id.index,
    }
}

fn log_id_from_pb(log_id: pb::LogId) -> Result<LogId, WireError> {
    Ok(LogId::new(
        leader_id_from_pb(log_id.leader_id)?,
        log_id.index,
    ))
}

fn opt_log_id_from_pb(log_id: Option<pb::LogId>) -> Result<Option<LogId>, WireError> {
    log_id.map(log_id_from_pb).transpose()
}

pub fn membership_to_pb(m: &Membership<NodeId, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::NodeIdSet {
                ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, node)| pb::Member {
                id: *id,
                addr: node.addr.clone(),
            })
            .collect(),
    }
}

pub fn membership_from_pb(
    m: Option<pb::Membership>,
) -> Result<Membership<NodeId, BasicNode>, WireError> {
    let m = need(m, "membership")?;
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .into_iter()
        .map(|c| c.ids.into_iter().collect())
        .collect();
    let nodes: BTreeMap<NodeId, BasicNode> = m
        .nodes
        .into_iter()
        .map(|n| (n.id, BasicNode::new(n.addr)))
        .collect();
    Ok(Membership::new(configs, nodes))
}

fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: m.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(m.membership())),
    }
}

fn stored_membership_from_pb(
    m: Option<pb::StoredMembership>,
) -> Result<StoredMembership, WireError> {
    let m = need(m, "stored membership")?;
    Ok(StoredMembership::new(
        opt_log_id_from_pb(m.log_id)?,
        membership_from_pb(m.membership)?,
    ))
}

fn entry_to_pb(entry: Entry) -> pb::Entry {
    use pb::entry::Payload;
    let payload = match entry.payload {
        EntryPayload::Blank => Payload::Blank(pb::Blank {}),
        // One event travels as before, so a replica of an earlier build still reads it.
        EntryPayload::Normal(Events(mut events)) if events.len() == 1 => {
            Payload::Event(events.pop().unwrap_or_default())
        }
        EntryPayload::Normal(Events(events)) => Payload::Events(pb::EventBatch { events }),
        EntryPayload::Membership(m) => Payload::Membership(membership_to_pb(&m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&entry.log_id)),
        payload: Some(payload),
    }
}

fn entry_from_pb(entry: pb::Entry) -> Result<Entry, WireError> {
    use pb::entry::Payload;
    let payload = match need(entry.payload, "entry payload")? {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Event(bytes) => EntryPayload::Normal(Events::one(bytes)),
        Payload::Events(batch) => EntryPayload::Normal(Events(batch.events)),
        Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(Some(m))?),
    };
    Ok(Entry {
        log_id: log_id_from_pb(need(entry.log_id, "entry log id")?)?,
        payload,
    })
}

pub fn append_request_to_pb(req: AppendEntriesRequest<TypeConfig>) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        vote: Some(vote_to_pb(&req.vote)),
        prev_log_id: req.prev_log_id.as_ref().map(log_id_to_pb),
        entries: req.entries.into_iter().map(entry_to_pb).collect(),
        leader_commit: req.leader_commit.as_ref().map(log_id_to_pb),
    }
}

pub fn append_request_from_pb(
    req: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, WireError> {
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(req.vote)?,
        prev_log_id: opt_log_id_from_pb(req.prev_log_id)?,
        entries: req
            .entries
            .into_iter()
            .map(entry_from_pb)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_from_pb(req.leader_commit)?,
    })
}

pub fn append_response_to_pb(resp: AppendEntriesResponse<NodeId>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match resp {
        AppendEntriesResponse::Success => R::Success(pb::Blank {}),
        AppendEntriesResponse::PartialSuccess(matching) => R::PartialSuccess(pb::PartialSuccess {
            matching: matching.as_ref().map(log_id_to_pb),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
        AppendEntriesResponse::HigherVote(vote) => R::HigherVote(vote_to_pb(&vote)),
    };
    pb::AppendEntriesResponse {
        result: Some(result),
    }
}

pub fn append_response_from_pb(
    resp: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<NodeId>, WireError> {
    use pb::append_entries_response::Result as R;
    Ok(match need(resp.result, "append result")? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::PartialSuccess(p) => {
            AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(p.matching)?)
        }
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from_pb(Some(v))?),
    })
}

pub fn vote_request_to_pb(req: VoteRequest<NodeId>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to_pb(&req.vote)),
        last_log_id: req.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_request_from_pb(req: pb::VoteRequest) -> Result<VoteRequest<NodeId>, WireError> {
    Ok(VoteRequest {
        vote: vote_from_pb(req.vote)?,
        last_log_id: opt_log_id_from_pb(req.last_log_id)?,
    })
}

pub fn vote_response_to_pb(resp: VoteResponse<NodeId>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&resp.vote)),
        vote_granted: resp.vote_granted,
        last_log_id: resp.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_response_from_pb(resp: pb::VoteResponse) -> Result<VoteResponse<NodeId>, WireError> {
    Ok(VoteResponse {
        vote: vote_from_pb(resp.vote)?,
        vote_granted: resp.vote_granted,
        last_log_id: opt_log_id_from_pb(resp.last_log_id)?,
    })
}

fn snapshot_meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: meta.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&meta.last_membership)),
        snapshot_id: meta.snapshot_id.clone(),
    }
}

fn snapshot_meta_from_pb(meta: Option<pb::SnapshotMeta>) -> Result<SnapshotMeta, WireError> {
    let meta = need(meta, "snapshot meta")?;
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(meta.last_log_id)?,
        last_membership: stored_membership_from_pb(meta.last_membership)?,
        snapshot_id: meta.snapshot_id,
    })
}

pub fn snapshot_request_to_pb(
    req: InstallSnapshotRequest<TypeConfig>,
) -> pb::InstallSnapshotRequest {
    pb::InstallSnapshotRequest {
        vote: Some(vote_to_pb(&req.vote)),
        meta: Some(snapshot_meta_to_pb(&req.meta)),
        offset: req.offset,
        data: req.data,
        done: req.done,
    }
}

pub fn snapshot_request_from_pb(
    req: pb::InstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<TypeConfig>, WireError> {
    Ok(InstallSnapshotRequest {
        vote: vote_from_pb(req.vote)?,
        meta: snapshot_meta_from_pb(req.meta)?,
        offset: req.offset,
        data: req.data,
        done: req.done,
    })
}

pub fn snapshot_response_to_pb(
    resp: InstallSnapshotResponse<NodeId>,
) -> pb::InstallSnapshotResponse {
    pb::InstallSnapshotResponse {
        vote: Some(vote_to_pb(&resp.vote)),
        mismatch: None,
    }
}

pub fn snapshot_mismatch_to_pb(m: &openraft::error::SnapshotMismatch) -> pb::SnapshotMismatch {
    pb::SnapshotMismatch {
        expected_id: m.expect.id.clone(),
        expected_offset: m.expect.offset,
        got_id: m.got.id.clone(),
        got_offset: m.got.offset,
    }
}

pub fn snapshot_mismatch_from_pb(m: pb::SnapshotMismatch) -> openraft::error::SnapshotMismatch {
    use openraft::SnapshotSegmentId;
    openraft::error::SnapshotMismatch {
        expect: SnapshotSegmentId {
            id: m.expected_id,
            offset: m.expected_offset,
        },
        got: SnapshotSegmentId {
            id: m.got_id,
            offset: m.got_offset,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let log_id = LogId::new(LeaderId::new(3, 2), 17);
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([
                (1, BasicNode::new("a:1")),
                (2, BasicNode::new("b:2")),
                (3, BasicNode::new("c:3")),
            ]),
        );
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 2),
            prev_log_id: Some(log_id),
            entries: vec![
                Entry {
                    log_id,
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: LogId::new(LeaderId::new(3, 2), 18),
                    payload: EntryPayload::Normal(Events(vec![vec![1, 2], vec![3]])),
                },
                Entry {
                    log_id: LogId::new(LeaderId::new(3, 2), 19),
                    payload: EntryPayload::Membership(membership),
                },
                Entry {
                    log_id: LogId::new(LeaderId::new(3, 2), 20),
                    payload: EntryPayload::Normal(Events::one(vec![4, 5])),
                },
            ],
            leader_commit: None,
        };
        let wire = append_request_to_pb(req.clone());
        assert!(
            matches!(&wire.entries[3].payload, Some(pb::entry::Payload::Event(e)) if e == &[4, 5]),
            "a single event keeps the field earlier builds read"
        );
        let back = append_request_from_pb(wire).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
        assert_eq!(back.entries, req.entries);
        for resp in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::PartialSuccess(Some(log_id)),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(4, 1)),
        ] {
            let expected = format!("{resp:?}");
            assert_eq!(
                format!(
                    "{:?}",
                    append_response_from_pb(append_response_to_pb(resp)).unwrap()
                ),
                expected
            );
        }
    }

    #[test]
    fn missing_parts_are_errors_not_panics() {
        assert!(append_request_from_pb(pb::AppendEntriesRequest::default()).is_err());
        assert!(append_response_from_pb(pb::AppendEntriesResponse::default()).is_err());
        assert!(vote_request_from_pb(pb::VoteRequest::default()).is_err());
        assert!(snapshot_request_from_pb(pb::InstallSnapshotRequest::default()).is_err());
    }
}
