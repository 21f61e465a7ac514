//! `domadm cluster ...`

use clap::Subcommand;
use dom_proto::v1::ClusterStatusRequest;
use serde::Serialize;

use crate::output::{self, dash};
use crate::Context;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Each replica's role, term, last log index and applied index.
    #[command(
        after_help = "Example:\n  domadm --endpoints 10.0.0.1:6970,10.0.0.2:6970 cluster status -o json"
    )]
    Status,
}

#[derive(Serialize)]
struct Member {
    id: u64,
    addr: String,
    role: String,
    term: u64,
    last_log_index: u64,
    applied_index: u64,
    journal_index: u64,
    journal_hash: String,
    snapshot_index: u64,
    purged_index: u64,
    storage_bytes: u64,
}

#[derive(Serialize)]
struct Status {
    leader: Option<u64>,
    term: u64,
    members: Vec<Member>,
}

impl ClusterCommand {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        match self {
            ClusterCommand::Status => {
                let reply = ctx
                    .cluster
                    .call(|c| async move {
                        crate::client::admin(c)
                            .cluster_status(ClusterStatusRequest {})
                            .await
                    })
                    .await?;
                let status = Status {
                    leader: Some(reply.leader).filter(|l| *l != 0),
                    term: reply.term,
                    members: reply
                        .members
                        .into_iter()
                        .map(|m| Member {
                            id: m.id,
                            addr: m.addr,
                            role: m.role,
                            term: m.term,
                            last_log_index: m.last_log_index,
                            applied_index: m.applied_index,
                            journal_index: m.journal_index,
                            journal_hash: hex::encode(&m.journal_hash),
                            snapshot_index: m.snapshot_index,
                            purged_index: m.purged_index,
                            storage_bytes: m.storage_bytes,
                        })
                        .collect(),
                };
                let rows = status
                    .members
                    .iter()
                    .map(|m| {
                        let reachable = m.role != "unreachable";
                        let num = |n: u64| if reachable { n.to_string() } else { "-".into() };
                        vec![
                            m.id.to_string(),
                            m.addr.clone(),
                            m.role.clone(),
                            num(m.term),
                            num(m.last_log_index),
                            num(m.applied_index),
                            num(m.journal_index),
                            dash(&m.journal_hash.chars().take(16).collect::<String>()),
                        ]
                    })
                    .collect();
                output::print(
                    ctx.output,
                    &status,
                    &[
                        "ID",
                        "ADDRESS",
                        "ROLE",
                        "TERM",
                        "LAST LOG",
                        "APPLIED",
                        "JOURNAL",
                        "JOURNAL HEAD",
                    ],
                    rows,
                )
            }
        }
    }
}
