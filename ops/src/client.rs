//! Reaching the cluster: try each endpoint, follow leader hints, retry while an election runs.

use std::future::Future;
use std::time::{Duration, Instant};

use dom_proto::v1::admin_client::AdminClient;
use dom_proto::v1::objects_client::ObjectsClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long to keep trying while no leader is known (an election takes about a second).
const LEADER_WAIT: Duration = Duration::from_secs(15);
const LEADER_METADATA: &str = "dom-leader";
const RETRY_METADATA: &str = "dom-retry";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach any controller at {endpoints} ({last})")]
    Unreachable { endpoints: String, last: String },
    #[error("{0}")]
    Refused(String),
    #[error("no leader after {0:?}: {1}")]
    NoLeader(Duration, String),
}

pub struct Cluster {
    endpoints: Vec<String>,
    /// The last address that answered as the leader; tried first.
    leader: Option<String>,
}

fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad endpoint {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(2)))
}

fn channel(addr: &str) -> Result<Channel, String> {
    Ok(endpoint(addr)?
        .timeout(Duration::from_secs(30))
        .connect_lazy())
}

fn message(status: &Status) -> String {
    status.message().to_owned()
}

impl Cluster {
    pub fn new(endpoints: &str) -> Result<Cluster, String> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err("--endpoints names no controller".into());
        }
        for endpoint in &endpoints {
            channel(endpoint)?;
        }
        Ok(Cluster {
            endpoints,
            leader: None,
        })
    }

    /// The address that last answered (the leader, after a write), or the first endpoint.
    pub fn preferred(&self) -> String {
        self.leader
            .clone()
            .unwrap_or_else(|| self.endpoints[0].clone())
    }

    /// Calls `rpc` on the leader (or any replica for calls every replica answers), following
    /// `dom-leader` hints. Refusals (bad input, unknown names) come back at once as errors.
    /// Calls the leader, following leader hints and failing over; each attempt is capped at
    /// 30 s.
    pub async fn call<T, F, Fut>(&mut self, rpc: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_over(channel, rpc).await
    }

    /// [`Cluster::call`] for a call whose work grows with its input (an image's commit waits
    /// for its objects to reach a majority): no cap on its length, but HTTP/2 pings notice a
    /// replica that stopped answering.
    pub async fn call_long<T, F, Fut>(&mut self, rpc: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_over(long_channel, rpc).await
    }

    async fn call_over<T, F, Fut>(
        &mut self,
        channel: fn(&str) -> Result<Channel, String>,
        rpc: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut last = String::from("no answer");
        let mut any_answered = false;
        loop {
            let mut candidates: Vec<String> = self.leader.iter().cloned().collect();
            candidates.extend(
                self.endpoints
                    .iter()
                    .filter(|e| Some(*e) != self.leader.as_ref())
                    .cloned(),
            );
            let mut tried = 0;
            while tried < candidates.len() {
                let addr = candidates[tried].clone();
                tried += 1;
                match rpc(channel(&addr).map_err(ClientError::Refused)?).await {
                    Ok(response) => {
                        self.leader = Some(addr);
                        return Ok(response.into_inner());
                    }
                    Err(status) if status.code() == Code::Unavailable => {
                        let hint = status
                            .metadata()
                            .get(LEADER_METADATA)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        if hint.is_some() || status.metadata().contains_key(RETRY_METADATA) {
                            any_answered = true;
                        }
                        last = format!("{addr}: {}", message(&status));
                        if let Some(hint) = hint {
                            if !candidates[tried..].contains(&hint) {
                                candidates.insert(tried, hint);
                            }
                        }
                    }
                    Err(status) if status.code() == Code::DeadlineExceeded => {
                        last = format!("{addr}: timed out");
                    }
                    Err(status) => return Err(ClientError::Refused(message(&status))),
                }
            }
            if !any_answered {
                return Err(ClientError::Unreachable {
                    endpoints: self.endpoints.join(","),
                    last,
                });
            }
            if started.elapsed() > LEADER_WAIT {
                return Err(ClientError::NoLeader(LEADER_WAIT, last));
            }
            self.leader = None;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

pub fn admin(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel).max_decoding_message_size(256 << 20)
}

pub fn objects(channel: Channel) -> ObjectsClient<Channel> {
    ObjectsClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// A channel to one address, for calls that must go to a given replica.
pub fn channel_to(addr: &str) -> Result<Channel, ClientError> {
    channel(addr).map_err(ClientError::Refused)
}

/// A channel for an upload, which takes as long as its size and the link make it: no cap on a
/// call's length, but HTTP/2 pings notice a replica that stopped answering.
pub fn bulk_channel_to(addr: &str) -> Result<Channel, ClientError> {
    long_channel(addr).map_err(ClientError::Refused)
}

fn long_channel(addr: &str) -> Result<Channel, String> {
    Ok(endpoint(addr)?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_lazy())
}
