//! `dom-bench writes`: durable commits per second and commit latency, dom beside etcd.
//!
//! Both sides get the same workload: `concurrency` clients, each writing one key (dom: a tag of
//! one machine, as a `machine_updated` event; etcd: a `Put` of one key) with a value of the same
//! size, over and over, for a fixed time; a write counts once its client has the
//! acknowledgement, which both systems give only after a majority has it on disk.

use std::time::{Duration, Instant};

use dom_proto::v1 as pb;
use dom_proto::v1::admin_client::AdminClient;
use dom_storage::event::{Change, Event};
use tonic::transport::Channel;

use crate::etcd::kv_client::KvClient;
use crate::etcd::PutRequest;

/// Bytes of each written value.
pub const VALUE_BYTES: usize = 100;

/// One side's figures at one concurrency.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn figures(mut latencies: Vec<Duration>, seconds: f64) -> Figures {
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Figures {
        per_sec: latencies.len() as f64 / seconds,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

pub fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|e| panic!("bad address {addr}: {e}"))
        .tcp_nodelay(true)
        .connect_lazy()
}

fn value(client: usize, n: u64) -> String {
    let mut v = format!("{client}-{n}-");
    v.extend(std::iter::repeat_n(
        'x',
        VALUE_BYTES.saturating_sub(v.len()),
    ));
    v
}

/// Runs `clients` writers against dom's leader at `leader` for `duration`. Machine
/// `bench-{i}` must exist for each client.
pub async fn dom(leader: &str, clients: usize, duration: Duration) -> Figures {
    let connections: Vec<Channel> = (0..clients.div_ceil(16)).map(|_| channel(leader)).collect();
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let mut admin = AdminClient::new(connections[i / 16].clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let event = Event {
                        actor: "bench".into(),
                        time_unix_ms: 0,
                        reason: String::new(),
                        change: Change::MachineUpdated {
                            hostname: format!("bench-{i}"),
                            tags: [("v".to_owned(), value(i, n))].into_iter().collect(),
                        },
                    };
                    let start = Instant::now();
                    let result = admin
                        .append(pb::AppendRequest {
                            event: Some(event.into()),
                        })
                        .await;
                    match result {
                        Ok(_) => latencies.push(start.elapsed()),
                        // A replica too busy to confirm its leadership asks for a retry, as
                        // domadm does; the retry is part of the write's latency.
                        Err(status) if status.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(status) => panic!("dom append failed: {status}"),
                    }
                }
                latencies
            })
        })
        .collect();
    collect(tasks, duration).await
}

/// Runs `clients` writers against an etcd cluster (spread over `endpoints`) for `duration`.
pub async fn etcd(endpoints: &[String], clients: usize, duration: Duration) -> Figures {
    let connections: Vec<Channel> = (0..clients.div_ceil(16).max(endpoints.len()))
        .map(|j| channel(&endpoints[j % endpoints.len()]))
        .collect();
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let mut kv = KvClient::new(connections[i % connections.len()].clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let start = Instant::now();
                    let result = kv
                        .put(PutRequest {
                            key: format!("bench-{i}").into_bytes(),
                            value: value(i, n).into_bytes(),
                            lease: 0,
                        })
                        .await;
                    match result {
                        Ok(_) => latencies.push(start.elapsed()),
                        Err(status) => panic!("etcd put failed: {status}"),
                    }
                }
                latencies
            })
        })
        .collect();
    collect(tasks, duration).await
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
    duration: Duration,
) -> Figures {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    figures(all, duration.as_secs_f64())
}

/// A three-member etcd cluster on loopback, stopped on drop.
pub struct EtcdCluster {
    pub endpoints: Vec<String>,
    children: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `etcd` from PATH, or None when there is none.
    pub fn start(ports: &[(u16, u16)]) -> Option<EtcdCluster> {
        let which = std::process::Command::new("sh")
            .args(["-c", "command -v etcd"])
            .output()
            .ok()?;
        if !which.status.success() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut children = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("etcd-{i}.log"))).ok()?;
            let child = std::process::Command::new("etcd")
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(dir.path().join(format!("e{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                    // etcd's own election timing (heartbeat 100 ms, election 1 s) is
                    // domd's too, and each runs with its own defaults.
                ])
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .ok()?;
            children.push(child);
        }
        Some(EtcdCluster {
            endpoints: ports
                .iter()
                .map(|(c, _)| format!("127.0.0.1:{c}"))
                .collect(),
            children,
            _dir: dir,
        })
    }

    /// Waits until a put succeeds (the members have elected a leader).
    pub async fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let mut kv = KvClient::new(channel(&self.endpoints[0]));
            let put = kv.put(PutRequest {
                key: b"ready".to_vec(),
                value: b"1".to_vec(),
                lease: 0,
            });
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), put).await {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
