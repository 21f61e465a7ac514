//! One controller replica: storage, the Raft node, the gRPC server and the bootstrap rule.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dom_proto::v1::admin_server::AdminServer;
use dom_proto::v1::raft_server::RaftServer;
use dom_storage::state_machine::FleetView;
use dom_storage::types::{NodeId, Raft};
use openraft::{BasicNode, SnapshotPolicy};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::admin::AdminService;
use crate::agents::{AgentService, Reconciler};
use crate::network::{Network, RaftService};
use crate::objects::{Maintenance, Manifests, ObjectsService};
use crate::proposer::Proposer;
use dom_proto::frame::SyncServer;
use dom_proto::v1::objects_server::ObjectsServer;
use dom_storage::objects::ObjectStore;

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Every voting replica's id and the address its peers and clients reach it at.
    pub peers: BTreeMap<NodeId, String>,
    /// Build a snapshot (and let the log be purged behind it) every this many entries.
    pub snapshot_logs: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// How often unreferenced objects are looked for, and how long one must have been unused
    /// before it is removed (which also protects objects of uploads not yet committed).
    pub gc_interval: Duration,
    pub gc_grace: Duration,
}

impl ReplicaConfig {
    pub fn new(
        id: NodeId,
        listen: SocketAddr,
        data_dir: PathBuf,
        peers: BTreeMap<NodeId, String>,
    ) -> Self {
        ReplicaConfig {
            id,
            listen,
            data_dir,
            peers,
            snapshot_logs: 10_000,
            heartbeat_ms: 100,
            election_timeout_ms: 1_000,
            gc_interval: Duration::from_secs(600),
            gc_grace: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("--peers does not name this replica's id {0}")]
    NotAPeer(NodeId),
    #[error("storage in {dir}: {error}")]
    Storage {
        dir: PathBuf,
        error: dom_storage::StoreError,
    },
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("object store: {0}")]
    Objects(dom_storage::objects::ObjectError),
    #[error("gRPC server: {0}")]
    Serve(tonic::transport::Error),
}

/// Parses `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("{id:?} is not a replica id (a positive integer)"))?;
        if id == 0 {
            return Err("replica ids start at 1".into());
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("{addr:?} is not HOST:PORT"));
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(format!("replica id {id} is named twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

pub struct Replica {
    pub raft: Raft,
    pub view: FleetView,
}

/// Runs a replica until `shutdown` completes, then stops Raft and the server cleanly.
pub async fn run(
    config: ReplicaConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ReplicaError> {
    if !config.peers.contains_key(&config.id) {
        return Err(ReplicaError::NotAPeer(config.id));
    }
    let (log, sm) = dom_storage::open(&config.data_dir).map_err(|error| ReplicaError::Storage {
        dir: config.data_dir.clone(),
        error,
    })?;
    let view = sm.view();
    let objects =
        ObjectStore::open(&config.data_dir.join("objects")).map_err(ReplicaError::Objects)?;
    // Bind before Raft starts, so a busy port fails the start before this replica votes.
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|error| ReplicaError::Listen {
                addr: config.listen,
                error,
            })?;
    let raft_config = openraft::Config {
        cluster_name: "dom".into(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_ms * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: config.snapshot_logs / 10,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ReplicaError::Config(e.to_string()))?;
    let raft = Raft::new(config.id, Arc::new(raft_config), Network, log, sm)
        .await
        .map_err(|e| ReplicaError::Raft(e.to_string()))?;

    tracing::info!(id = config.id, listen = %config.listen, data_dir = %config.data_dir.display(), "replica started");

    tokio::spawn(bootstrap(raft.clone(), config.clone()));

    let manifests = Arc::new(Manifests::new(objects.clone(), config.id, &config.peers));
    let maintenance = Arc::new(Maintenance {
        store: objects.clone(),
        manifests: manifests.clone(),
        view: view.clone(),
        gc_interval: config.gc_interval,
        gc_grace: config.gc_grace,
    });
    let maintenance_task = tokio::spawn(maintenance.run());
    let proposer = Proposer::start(raft.clone(), view.clone());
    let reconciler = Reconciler::new(
        config.id,
        raft.clone(),
        proposer.clone(),
        view.clone(),
        manifests.clone(),
    );
    let admin = AdminService {
        id: config.id,
        raft: raft.clone(),
        view: view.clone(),
        objects: objects.clone(),
        manifests,
        reconciler: reconciler.clone(),
        proposer,
    };
    const MAX_MESSAGE: usize = 64 << 20;
    let server = tonic::transport::Server::builder()
        .add_service(
            RaftServer::new(RaftService { raft: raft.clone() })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(AdminServer::new(admin))
        .add_service(SyncServer::new(AgentService { reconciler }, MAX_MESSAGE))
        .add_service(
            ObjectsServer::new(ObjectsService { store: objects })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    // Small Raft messages and replies must not wait for Nagle's algorithm.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // A replica whose Raft core has stopped (a storage failure, a broken invariant) must not
    // go on answering as if it were healthy: stop the process, so a supervisor restarts it.
    let mut server_metrics = raft.server_metrics();
    let core_stopped = async move { while server_metrics.changed().await.is_ok() {} };
    let mut core_failed = false;
    let stop = async {
        tokio::select! {
            _ = shutdown => {}
            _ = core_stopped => core_failed = true,
        }
    };
    let served = server.serve_with_incoming_shutdown(incoming, stop).await;
    if core_failed {
        maintenance_task.abort();
        return Err(ReplicaError::Raft(
            "the Raft core stopped unexpectedly; see the log above".into(),
        ));
    }
    tracing::info!("shutting down");
    maintenance_task.abort();
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("raft did not stop cleanly: {e}");
    }
    match tokio::task::spawn_blocking(move || view.sync()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("could not sync the applied state at shutdown: {e}"),
        Err(e) => tracing::warn!("could not sync the applied state at shutdown: {e}"),
    }
    served.map_err(ReplicaError::Serve)?;
    Ok(())
}

/// The lowest id initializes the membership, once, when the cluster has never been formed.
///
/// A replica that was already initialized (or learns it is, from any peer's answer) does
/// nothing, so a restart or a wiped replica rejoining never forms a second cluster.
async fn bootstrap(raft: Raft, config: ReplicaConfig) {
    if config.peers.keys().next() != Some(&config.id) {
        return;
    }
    match raft.is_initialized().await {
        Ok(false) => {}
        Ok(true) => return,
        Err(e) => {
            tracing::warn!("cannot tell whether this replica is initialized: {e}");
            return;
        }
    }
    for (id, addr) in config.peers.iter().filter(|(id, _)| **id != config.id) {
        if ask_initialized(addr).await == Some(true) {
            tracing::info!(peer = id, "peer already belongs to a cluster; waiting to be caught up instead of initializing");
            return;
        }
    }
    let members: BTreeMap<NodeId, BasicNode> = config
        .peers
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!(members = ?config.peers, "initialized the cluster membership"),
        Err(e) => tracing::info!("not initializing: {e}"),
    }
}

async fn ask_initialized(addr: &str) -> Option<bool> {
    let channel = crate::network::channel(addr).ok()?;
    let mut request = tonic::Request::new(dom_proto::v1::ReplicaStatusRequest {});
    request.set_timeout(Duration::from_millis(500));
    let status = dom_proto::v1::admin_client::AdminClient::new(channel)
        .replica_status(request)
        .await
        .ok()?;
    Some(!status.into_inner().members.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_refuse_nonsense() {
        let peers = parse_peers("1=127.0.0.1:6970, 2=host-b:6970,3=[::1]:6970").unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[&3], "[::1]:6970");
        for bad in ["", "1", "x=a:1", "0=a:1", "1=a", "1=a:1,1=b:2", "1=a:99999"] {
            assert!(parse_peers(bad).is_err(), "{bad:?} accepted");
        }
    }
}
