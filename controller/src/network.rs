//! Raft traffic to peers over tonic: openraft's `RaftNetwork` on a lazily connected channel.

use std::time::Duration;

use dom_proto::v1 as pb;
use dom_proto::v1::raft_client::RaftClient;
use dom_storage::types::{NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tonic::transport::{Channel, Endpoint};

use crate::raft_wire as wire;

/// A lazily connected channel to `addr` (`HOST:PORT`).
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

#[derive(Clone, Default)]
pub struct Network;

pub struct Peer {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let client = channel(&node.addr)
            .map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX)
            })
            .map_err(|e| format!("bad address {:?} of replica {target}: {e}", node.addr));
        Peer { target, client }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

fn transport_error<E: std::error::Error>(
    status: tonic::Status,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    // Connection failures make openraft back off; anything else is retried at its pace.
    if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    ) {
        RPCError::Unreachable(Unreachable::new(&status))
    } else {
        RPCError::Network(NetworkError::new(&status))
    }
}

impl Peer {
    fn client<E: std::error::Error>(&self) -> RpcResult<RaftClient<Channel>, E> {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))
    }
}

fn request<T>(message: T, option: &RPCOption) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(option.hard_ttl());
    request
}

fn bad_reply<E: std::error::Error>(
    e: wire::WireError,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let reply = self
            .client()?
            .append_entries(request(wire::append_request_to_pb(rpc), &option))
            .await
            .map_err(transport_error)?;
        wire::append_response_from_pb(reply.into_inner()).map_err(bad_reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let reply = self
            .client()?
            .install_snapshot(request(wire::snapshot_request_to_pb(rpc), &option))
            .await
            .map_err(transport_error)?
            .into_inner();
        if let Some(mismatch) = reply.mismatch {
            let error =
                InstallSnapshotError::SnapshotMismatch(wire::snapshot_mismatch_from_pb(mismatch));
            return Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(error),
            )));
        }
        Ok(InstallSnapshotResponse {
            vote: wire::vote_from_pb(reply.vote).map_err(bad_reply)?,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let reply = self
            .client()?
            .vote(request(wire::vote_request_to_pb(rpc), &option))
            .await
            .map_err(transport_error)?;
        wire::vote_response_from_pb(reply.into_inner()).map_err(bad_reply)
    }
}

/// The Raft gRPC service: hands peers' messages to the local Raft node.
pub struct RaftService {
    pub raft: dom_storage::types::Raft,
}

fn raft_failure(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unavailable(format!("raft: {e}"))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<pb::AppendEntriesRequest>,
    ) -> Result<tonic::Response<pb::AppendEntriesResponse>, tonic::Status> {
        let rpc = wire::append_request_from_pb(request.into_inner())?;
        let resp = self.raft.append_entries(rpc).await.map_err(raft_failure)?;
        Ok(tonic::Response::new(wire::append_response_to_pb(resp)))
    }

    async fn vote(
        &self,
        request: tonic::Request<pb::VoteRequest>,
    ) -> Result<tonic::Response<pb::VoteResponse>, tonic::Status> {
        let rpc = wire::vote_request_from_pb(request.into_inner())?;
        let resp = self.raft.vote(rpc).await.map_err(raft_failure)?;
        Ok(tonic::Response::new(wire::vote_response_to_pb(resp)))
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<pb::InstallSnapshotRequest>,
    ) -> Result<tonic::Response<pb::InstallSnapshotResponse>, tonic::Status> {
        let rpc = wire::snapshot_request_from_pb(request.into_inner())?;
        let vote = rpc.vote;
        match self.raft.install_snapshot(rpc).await {
            Ok(resp) => Ok(tonic::Response::new(wire::snapshot_response_to_pb(resp))),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
                Ok(tonic::Response::new(pb::InstallSnapshotResponse {
                    vote: Some(wire::vote_to_pb(&vote)),
                    mismatch: Some(wire::snapshot_mismatch_to_pb(&m)),
                }))
            }
            Err(e) => Err(raft_failure(e)),
        }
    }
}
