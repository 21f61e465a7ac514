//! Group commit: events proposed while earlier ones are being committed enter the log together,
//! as one entry.
//!
//! openraft 0.9 writes each client entry on the Raft core's task and waits for its flush and
//! fsync before it takes the next, so with one event per entry a leader commits at most one
//! event per disk sync, however many operators and sessions are waiting. The proposer commits
//! one entry at a time; whatever arrives while an entry is in flight waits in its queue and
//! goes out as the next entry, so under load one sync and one replication round carry many
//! events, and alone an event goes out at once. Each event is still checked, applied and
//! journaled on its own (apply refuses one without touching its neighbours), so batching changes
//! the log's grouping, never what any event does.

use dom_proto::v1 as pb;
use dom_storage::event::Event;
use dom_storage::state_machine::FleetView;
use dom_storage::types::{Applied, Events, Raft};
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::admin::{leader_of, not_leader, raft_error_status, rejection_status, retry_later};
use crate::agents::now_unix_ms;

/// Bounds on one entry, so that openraft's replication batches (up to 300 entries) stay well
/// inside the Raft channel's message limit.
const MAX_EVENTS: usize = 1024;
const MAX_BYTES: usize = 128 << 10;
/// Proposals waiting for an entry; a full queue makes proposers wait (backpressure).
const QUEUE: usize = 16 << 10;

struct Pending {
    event: Vec<u8>,
    reply: oneshot::Sender<Result<(u64, Applied), Status>>,
}

/// The leader's single way into the log, shared by the admin service and the reconciler.
#[derive(Clone)]
pub struct Proposer {
    raft: Raft,
    view: FleetView,
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the committing task; it ends when the last `Proposer` clone is dropped.
    pub fn start(raft: Raft, view: FleetView) -> Proposer {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(commit_batches(raft.clone(), pending));
        Proposer { raft, view, queue }
    }

    /// Checks `event` against everything committed so far, stamps its time and commits it,
    /// answering once it is applied. Used for operators' events and the leader's own (the
    /// automatic brake).
    pub async fn propose(&self, mut event: Event) -> Result<pb::AppendResponse, Status> {
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(not_leader(leader_of(&self.raft)));
        }
        // Checked against this leader's applied state, without a quorum round first: apply
        // checks again, deterministically, on every replica, so a proposal that raced another
        // is refused there; and a client sees its own earlier writes, which were applied here
        // before they were acknowledged.
        self.view
            .read(|live| live.state.check(&event.change))
            .map_err(rejection_status)?;
        event.time_unix_ms = now_unix_ms();
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            event: event.encode(),
            reply,
        };
        let stopped = || retry_later("this replica is shutting down".into());
        self.queue.send(pending).await.map_err(|_| stopped())?;
        let (log_index, applied) = answer.await.map_err(|_| stopped())??;
        match applied {
            Applied::Event(head) => Ok(pb::AppendResponse {
                log_index,
                journal_index: head.index,
                journal_hash: head.hash.to_vec(),
                time_unix_ms: event.time_unix_ms,
            }),
            Applied::Refused(reason) => Err(Status::failed_precondition(reason)),
        }
    }
}

/// Commits one entry at a time. The Raft core writes entries one at a time anyway, so a second
/// entry in flight only splits the waiting events into smaller entries, each paying the
/// per-entry sync, replication and apply: `dom-bench writes` at concurrency 16 / 64 gave
/// 2828 / 5370 events/s with one entry in flight, 2341 / 4411 with two and 2133 / 4914 with four.
async fn commit_batches(raft: Raft, mut pending: mpsc::Receiver<Pending>) {
    while let Some(first) = pending.recv().await {
        let mut bytes = first.event.len();
        let mut batch = vec![first];
        while batch.len() < MAX_EVENTS && bytes < MAX_BYTES {
            match pending.try_recv() {
                Ok(next) => {
                    bytes += next.event.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        commit(&raft, batch).await;
    }
}

/// Commits one entry of events and answers each proposer with its own event's outcome.
async fn commit(raft: &Raft, batch: Vec<Pending>) {
    let (events, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.event, p.reply)).unzip();
    match raft.client_write(Events(events)).await {
        Ok(written) => {
            let index = written.log_id.index;
            let mut outcomes = written.data.into_iter();
            for reply in replies {
                let answer = outcomes.next().map(|a| (index, a)).ok_or_else(|| {
                    Status::internal("the log entry was applied with fewer outcomes than events")
                });
                // A proposer that gave up (its client went away) no longer listens.
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            let status = raft_error_status(&e, "not committed");
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
