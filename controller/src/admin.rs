//! The admin gRPC service: proposals from operators, linearizable reads, cluster status.
//!
//! A proposal is decoded, made canonical and checked against the applied fleet state here, on
//! the leader, so bad input is refused with a precise status before it enters the log. The
//! leader then stamps the time and commits it; apply re-checks it (two proposals may race) and
//! every replica reaches the same verdict.

use std::time::Duration;

use dom_proto::v1 as pb;
use dom_proto::v1::admin_client::AdminClient;
use dom_storage::event::Event;
use dom_storage::fleet::{self, Rejection};
use dom_storage::state_machine::FleetView;
use dom_storage::types::{NodeId, Raft};
use openraft::{BasicNode, ServerState};
use tonic::{Request, Response, Status};

use crate::network::channel;
use crate::objects::{ensure_on_majority, Manifests};
use crate::proposer::Proposer;
use dom_storage::event::Change;
use dom_storage::objects::{to_hex, ObjectStore};
use std::collections::BTreeMap;

/// gRPC metadata key carrying the leader's address on a redirect.
pub const LEADER_METADATA: &str = "dom-leader";

pub struct AdminService {
    pub id: NodeId,
    pub raft: Raft,
    pub view: FleetView,
    pub objects: ObjectStore,
    pub manifests: std::sync::Arc<Manifests>,
    pub reconciler: std::sync::Arc<crate::agents::Reconciler>,
    pub proposer: Proposer,
}

/// Waits until this replica, as the leader, has applied everything committed before now.
pub(crate) async fn linearizable(raft: &Raft) -> Result<(), Status> {
    raft.ensure_linearizable()
        .await
        .map(drop)
        .map_err(|e| raft_error_status(&e, "cannot confirm leadership"))
}

/// A Raft error as the client should see it: a redirect to the leader when there is one to
/// name, else "retry later" with `what` failed and why.
pub(crate) fn raft_error_status<E>(e: &openraft::error::RaftError<NodeId, E>, what: &str) -> Status
where
    E: std::error::Error + openraft::TryAsRef<openraft::error::ForwardToLeader<NodeId, BasicNode>>,
{
    match e.forward_to_leader::<BasicNode>() {
        Some(f) => not_leader(
            f.leader_id
                .zip(f.leader_node.as_ref().map(|n| n.addr.clone())),
        ),
        None => retry_later(format!("{what}: {e}")),
    }
}

/// The current leader's id and address, as this replica knows them.
pub(crate) fn leader_of(raft: &Raft) -> Option<(NodeId, String)> {
    let metrics = raft.metrics().borrow().clone();
    let leader = metrics.current_leader?;
    let addr = metrics
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.addr.clone())?;
    Some((leader, addr))
}

/// gRPC metadata key marking an UNAVAILABLE answer from a live replica (as opposed to a
/// connection failure): the client should retry, here or at the leader.
pub const RETRY_METADATA: &str = "dom-retry";

pub(crate) fn retry_later(message: String) -> Status {
    let mut status = Status::unavailable(message);
    status.metadata_mut().insert(
        RETRY_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

pub(crate) fn not_leader(leader: Option<(NodeId, String)>) -> Status {
    match leader {
        Some((id, addr)) => {
            let mut status = retry_later(format!(
                "not the leader; the leader is replica {id} at {addr}"
            ));
            if let Ok(value) = addr.parse() {
                status.metadata_mut().insert(LEADER_METADATA, value);
            }
            status
        }
        None => retry_later("no leader is elected yet; retry shortly".into()),
    }
}

pub(crate) fn rejection_status(r: Rejection) -> Status {
    if r.is_not_found() {
        Status::not_found(r.to_string())
    } else if r.is_conflict() {
        Status::failed_precondition(r.to_string())
    } else {
        Status::invalid_argument(r.to_string())
    }
}

pub fn machine_to_pb(m: &fleet::Machine) -> pb::Machine {
    pb::Machine {
        hostname: m.hostname.clone(),
        tags: m.tags.clone(),
        required_image: m.required_image.clone().unwrap_or_default(),
        planned_image: m.planned_image.clone().unwrap_or_default(),
        added_at: m.added_at,
        changed_at: m.changed_at,
    }
}

pub fn image_to_pb(i: &fleet::Image) -> pb::Image {
    pb::Image {
        name: i.name.clone(),
        root_hash: i.root_hash.to_vec(),
        files: i.files,
        bytes: i.bytes,
        created_at_unix_ms: i.created_at_unix_ms,
        deleted: i.deleted_at.is_some(),
        manifest_hash: i.manifest_hash.map(|h| h.to_vec()).unwrap_or_default(),
        filter: i.filter.clone(),
        triggers: i
            .triggers
            .iter()
            .cloned()
            .map(dom_storage::event::trigger_to_pb)
            .collect(),
        added_at: i.added_at,
    }
}

impl AdminService {
    fn leader(&self) -> Option<(NodeId, String)> {
        leader_of(&self.raft)
    }

    /// Waits until this replica, as the leader, has applied everything committed before now.
    async fn linearizable(&self) -> Result<(), Status> {
        linearizable(&self.raft).await
    }

    fn voters(&self) -> BTreeMap<NodeId, String> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone())))
            .collect()
    }

    /// An image is committed only if its manifest is well formed, matches the event's root
    /// hash and counts, and it and every object it names are on a majority of replicas.
    /// Other changes have no objects and pass.
    async fn check_image_objects(&self, change: &Change) -> Result<(), Status> {
        let Change::ImageAdded {
            root_hash,
            files,
            bytes,
            manifest_hash,
            filter,
            ..
        } = change
        else {
            return Ok(());
        };
        let manifest_hash =
            manifest_hash.ok_or_else(|| Status::invalid_argument("an image needs a manifest"))?;
        let voters = self.voters();
        // Decoded into the replica's shared cache: the plans of the rollout that follows
        // find it there.
        let loaded = self.manifests.get(&manifest_hash).await?;
        let manifest = &loaded.manifest;
        let filter = dom_storage::image::Filter::new(filter.clone())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let computed = manifest.root_hash_where(|path| !filter.excludes(path));
        if &computed != root_hash {
            return Err(Status::invalid_argument(format!(
                "root hash {} does not match the manifest's {}",
                to_hex(root_hash),
                to_hex(&computed)
            )));
        }
        if (manifest.files(), manifest.bytes()) != (*files, *bytes) {
            return Err(Status::invalid_argument(format!(
                "counts {files} files / {bytes} bytes do not match the manifest's {} / {}",
                manifest.files(),
                manifest.bytes()
            )));
        }
        let mut hashes = manifest.object_hashes();
        hashes.push(manifest_hash);
        ensure_on_majority(&self.objects, self.id, &voters, &hashes).await
    }

    pub fn replica_status(&self) -> pb::ReplicaStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let journal = self.view.journal_head();
        pb::ReplicaStatus {
            id: self.id,
            leader: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            state: role(metrics.state, membership.voter_ids().any(|v| v == self.id)).to_owned(),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            members: membership
                .nodes()
                .map(|(id, n)| pb::Member {
                    id: *id,
                    addr: n.addr.clone(),
                })
                .collect(),
            voters: membership.voter_ids().collect(),
            journal_index: journal.index,
            journal_hash: journal.hash.to_vec(),
            snapshot_index: metrics.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: metrics.purged.map(|l| l.index).unwrap_or(0),
            storage_bytes: self.view.size_on_disk(),
        }
    }
}

fn role(state: ServerState, voter: bool) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Candidate => "candidate",
        ServerState::Follower if voter => "follower",
        ServerState::Follower | ServerState::Learner => "learner",
        ServerState::Shutdown => "unreachable",
    }
}

async fn ask_replica(addr: &str) -> Result<pb::ReplicaStatus, Status> {
    let channel = channel(addr).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut request = Request::new(pb::ReplicaStatusRequest {});
    request.set_timeout(Duration::from_secs(1));
    Ok(AdminClient::new(channel)
        .replica_status(request)
        .await?
        .into_inner())
}

type JournalStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::JournalRecord, Status>> + Send>>;

/// Records `from..=to` of this replica's journal, then (with `follow`) each new one. With a
/// machine or image named, the audit index picks the records; no scan.
fn journal_stream(view: FleetView, request: pb::ReadJournalRequest) -> JournalStream {
    let pb::ReadJournalRequest {
        from,
        to,
        follow,
        machine,
        image,
    } = request;
    Box::pin(async_stream::try_stream! {
        let mut next = from.max(1);
        if !machine.is_empty() || !image.is_empty() {
            let (by_machine, name) = if machine.is_empty() { (false, image) } else { (true, machine) };
            let head = view.journal_head().index;
            let last = if to == 0 { head } else { to.min(head) };
            let indexes = view.indexed(by_machine, &name).map_err(|e| Status::internal(e.to_string()))?;
            for index in indexes.into_iter().filter(|i| *i >= next && *i <= last) {
                if let Some(record) = view.journal_record(index).map_err(|e| Status::internal(e.to_string()))? {
                    yield pb::JournalRecord { index, log_index: record.log_index, hash: record.hash.to_vec(), event: record.event };
                }
            }
            if !follow {
                return;
            }
            // Followers of a filtered log get every later record; the client filters them.
            next = last + 1;
        }
        let mut applied = view.subscribe();
        loop {
            let head = view.journal_head().index;
            let end = if to == 0 { head } else { to.min(head) };
            while next <= end {
                // Read in bounded batches so a long journal streams without being held whole.
                let batch_end = end.min(next + 1023);
                let records: Vec<_> = view.journal(next, batch_end).collect::<Result<_, _>>()
                    .map_err(|e| Status::internal(e.to_string()))?;
                for (index, record) in records {
                    next = index + 1;
                    yield pb::JournalRecord { index, log_index: record.log_index, hash: record.hash.to_vec(), event: record.event };
                }
            }
            if !follow || (to != 0 && next > to) {
                break;
            }
            if applied.changed().await.is_err() {
                break;
            }
        }
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    type ReadJournalStream = JournalStream;

    async fn read_journal(
        &self,
        request: Request<pb::ReadJournalRequest>,
    ) -> Result<Response<JournalStream>, Status> {
        Ok(Response::new(journal_stream(
            self.view.clone(),
            request.into_inner(),
        )))
    }

    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let message = request
            .into_inner()
            .event
            .ok_or_else(|| Status::invalid_argument("no event given"))?;
        let mut event =
            Event::try_from(message).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if event.actor == crate::agents::CONTROLLER_ACTOR {
            return Err(Status::invalid_argument(format!(
                "the actor {:?} is reserved for the controller's own events",
                crate::agents::CONTROLLER_ACTOR
            )));
        }
        if event.actor.trim().is_empty() {
            return Err(Status::invalid_argument("an event needs an actor"));
        }
        event
            .change
            .canonicalize()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(not_leader(self.leader()));
        }
        if matches!(event.change, Change::ImageAdded { .. }) {
            // Refuse a bad image before the (possibly long) object check; `propose` checks
            // again against whatever committed meanwhile.
            self.linearizable().await?;
            self.view
                .read(|live| live.state.check(&event.change))
                .map_err(rejection_status)?;
            self.check_image_objects(&event.change).await?;
        }
        Ok(Response::new(self.proposer.propose(event).await?))
    }

    async fn list_machines(
        &self,
        _request: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(self.view.read(|live| {
            pb::ListMachinesResponse {
                machines: live.state.machines().map(machine_to_pb).collect(),
                applied_index: live.last_applied.map(|l| l.index).unwrap_or(0),
            }
        })))
    }

    async fn get_machine(
        &self,
        request: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let hostname = dom_storage::names::canonical_hostname(&request.into_inner().hostname)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.linearizable().await?;
        self.view
            .read(|live| live.state.machine(&hostname).map(machine_to_pb))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("unknown machine {hostname:?}")))
    }

    async fn list_images(
        &self,
        _request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(self.view.read(|live| {
            pb::ListImagesResponse {
                images: live.state.images().map(image_to_pb).collect(),
                applied_index: live.last_applied.map(|l| l.index).unwrap_or(0),
            }
        })))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // Soft state lives on the leader; confirming leadership keeps a deposed leader from
        // answering with what it knew before.
        self.linearizable().await?;
        let host = request.into_inner().hostname;
        let only = if host.is_empty() {
            None
        } else {
            Some(
                dom_storage::names::canonical_hostname(&host)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        Ok(Response::new(self.reconciler.status(only.as_deref())?))
    }

    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyStatus>, Status> {
        self.linearizable().await?;
        let policy = self.view.read(|l| l.state.policy().clone());
        let (max_updating, max_updating_percent) = match policy.max_updating {
            Some(fleet::Limit::Machines(n)) => (n, 0),
            Some(fleet::Limit::Percent(p)) => (0, p),
            None => (0, 0),
        };
        let halt = policy.halt.clone().unwrap_or_default();
        Ok(Response::new(pb::PolicyStatus {
            halted: policy.halt.is_some(),
            halt_reason: halt.reason,
            halt_actor: halt.actor,
            halt_since_unix_ms: halt.since_unix_ms,
            max_updating,
            max_updating_percent,
            max_high_impact: policy.max_high_impact.unwrap_or(0),
            fetch_bytes_per_sec: policy.fetch_bytes_per_sec.unwrap_or(0),
            brake_failure_percent: policy.brake_failure_percent(),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let local = self.replica_status();
        let local_ref = &local;
        let asks = local.members.iter().map(|member| async move {
            let status = if member.id == self.id {
                Ok(local_ref.clone())
            } else {
                ask_replica(&member.addr).await
            };
            match status {
                Ok(s) => pb::MemberStatus {
                    id: member.id,
                    addr: member.addr.clone(),
                    role: s.state,
                    last_log_index: s.last_log_index,
                    applied_index: s.applied_index,
                    term: s.term,
                    journal_index: s.journal_index,
                    journal_hash: s.journal_hash,
                    snapshot_index: s.snapshot_index,
                    purged_index: s.purged_index,
                    storage_bytes: s.storage_bytes,
                },
                Err(_) => pb::MemberStatus {
                    id: member.id,
                    addr: member.addr.clone(),
                    role: "unreachable".into(),
                    ..Default::default()
                },
            }
        });
        let members = futures::future::join_all(asks).await;
        Ok(Response::new(pb::ClusterStatusResponse {
            leader: local.leader,
            term: local.term,
            members,
        }))
    }

    async fn replica_status(
        &self,
        _request: Request<pb::ReplicaStatusRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, Status> {
        Ok(Response::new(self.replica_status()))
    }

    async fn journal_head(
        &self,
        _request: Request<pb::JournalHeadRequest>,
    ) -> Result<Response<pb::JournalHeadResponse>, Status> {
        let head = self.view.journal_head();
        Ok(Response::new(pb::JournalHeadResponse {
            index: head.index,
            hash: head.hash.to_vec(),
        }))
    }
}
