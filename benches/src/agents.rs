//! `dom-bench agents`: many simulated agents, each a real `Agent.Sync` gRPC stream, against a
//! real three-replica cluster.
//!
//! A simulated agent speaks the protocol as `subd` does but owns no files: it says hello with
//! the default exclusions, describes itself as exactly on its base image (no deviations, the
//! image's root hash), acknowledges fetches at once and answers every update as applied, then
//! describes itself on the new image. What is measured is the control plane: how fast the
//! leader takes N machines in, plans for them, and gets them back after it dies.
//!
//! The agents share the machine's cores with the cluster under test, so they read only the
//! fields of the leader's messages they act on (`view`): a plan's steps and object hashes
//! arrive on every stream but are passed over undecoded, which took 38% of the simulation's
//! CPU when decoded in full.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use dom_proto::frame::{grpc_encode, grpc_len, GRPC_PREFIX};
use dom_proto::v1 as pb;
use dom_proto::v1::admin_client::AdminClient;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::Body as _;
use tonic::transport::Channel;

use crate::writes::channel;

/// The leader's messages as a simulated agent reads them: `dom.v1.ControllerMessage` with only
/// the fields it acts on (same field numbers). prost passes over the other fields without
/// allocating.
pub mod view {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ControllerMessage {
        #[prost(oneof = "Body", tags = "2, 3, 4")]
        pub body: Option<Body>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "2")]
        Rebase(Rebase),
        #[prost(message, tag = "3")]
        Fetch(Fetch),
        #[prost(message, tag = "4")]
        Update(Update),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Rebase {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Fetch {
        #[prost(uint64, tag = "1")]
        pub plan_id: u64,
        #[prost(message, repeated, tag = "3")]
        pub objects: Vec<ObjectSize>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ObjectSize {
        #[prost(uint64, tag = "2")]
        pub size: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Update {
        #[prost(uint64, tag = "1")]
        pub plan_id: u64,
        #[prost(string, tag = "2")]
        pub image: String,
        #[prost(bool, tag = "6")]
        pub complete: bool,
    }
}

/// The agent's messages as gRPC frames, as the request body of `Agent.Sync`.
struct Outbound(mpsc::Receiver<pb::AgentMessage>);

impl tonic::codegen::Body for Outbound {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|message| {
            message.map(|m| Ok(http_body::Frame::data(Bytes::from(grpc_encode(&m)))))
        })
    }
}

/// The leader's messages on one stream, read where h2 put them.
///
/// tonic's `Streaming` copies every data frame into a buffer of each stream's own, grown to
/// the largest message: 10,000 streams of 52 KB plans kept the kernel zeroing fresh pages
/// for a quarter of the simulation's time, on the cores the leader needs. Here the frames
/// h2 hands over are kept as they are until a message is whole, and decoded across them.
pub struct Inbound {
    body: tonic::body::Body,
    chunks: VecDeque<Bytes>,
    buffered: usize,
}

/// The buffered chunks as one `Buf`.
struct Chunks<'a>(&'a mut VecDeque<Bytes>, &'a mut usize);

impl Buf for Chunks<'_> {
    fn remaining(&self) -> usize {
        *self.1
    }

    fn chunk(&self) -> &[u8] {
        self.0.front().map_or(&[], |c| c.as_ref())
    }

    /// Within the front chunk, a view of it; across chunks, a copy.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.0.front_mut() {
            Some(front) if front.len() >= len => {
                *self.1 -= len;
                let message = front.split_to(len);
                if front.is_empty() {
                    self.0.pop_front();
                }
                message
            }
            _ => {
                let mut gathered = prost::bytes::BytesMut::with_capacity(len);
                gathered.put((&mut *self).take(len));
                gathered.freeze()
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        *self.1 -= n;
        while n > 0 {
            let Some(front) = self.0.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.0.pop_front();
        }
    }
}

impl Inbound {
    /// The next message; None when the stream ended or broke (the agent then reconnects).
    pub async fn message(&mut self) -> Option<view::ControllerMessage> {
        loop {
            if self.buffered >= GRPC_PREFIX {
                let mut prefix = [0u8; GRPC_PREFIX];
                Chunks(&mut self.chunks, &mut self.buffered).chunk_prefix(&mut prefix);
                let len = grpc_len(prefix);
                if self.buffered >= GRPC_PREFIX + len {
                    let mut buf = Chunks(&mut self.chunks, &mut self.buffered);
                    buf.advance(GRPC_PREFIX);
                    // Decoded from one slice: prost reads a slice several times faster
                    // than a `Buf` of many chunks, which it asks for the current chunk at
                    // every varint. A message across frames is gathered first (one copy).
                    let message = buf.copy_to_bytes(len);
                    return view::ControllerMessage::decode(message).ok();
                }
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffered += data.len();
                        self.chunks.push_back(data);
                    }
                }
                // Trailers, an error, or the end: this stream is over.
                _ => return None,
            }
        }
    }
}

impl Chunks<'_> {
    /// Copies the first `out.len()` bytes without consuming them.
    fn chunk_prefix(&self, out: &mut [u8]) {
        let mut filled = 0;
        for c in self.0.iter() {
            let n = (out.len() - filled).min(c.len());
            out[filled..filled + n].copy_from_slice(&c[..n]);
            filled += n;
            if filled == out.len() {
                return;
            }
        }
    }
}

/// Opens `Agent.Sync` on `channel`, as `AgentClient::sync` does, with the leader's answers
/// read in place (`Inbound`).
async fn sync(
    mut channel: Channel,
    outbound: mpsc::Receiver<pb::AgentMessage>,
) -> Result<Inbound, tonic::Status> {
    use tonic::codegen::{http, Service};
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("/dom.v1.Agent/Sync")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Outbound(outbound)))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    // A refusal (not the leader, with its hint) comes as headers only.
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    Ok(Inbound {
        body: response.into_body(),
        chunks: VecDeque::new(),
        buffered: 0,
    })
}

/// Agents sharing one HTTP/2 connection.
const AGENTS_PER_CONNECTION: usize = 100;

/// What every simulated agent reports into.
pub struct Counters {
    /// Agents that received a Fetch since `plans` was reset.
    pub plans: AtomicUsize,
    /// Per agent: nanoseconds since the bench's start when its latest plan arrived.
    pub plan_ns: Vec<AtomicU64>,
    /// Bytes of hello + description sent on the latest (re)connection of each agent, summed.
    pub connect_bytes: AtomicU64,
    pub connects: AtomicU64,
}

impl Counters {
    pub fn new(agents: usize) -> Counters {
        Counters {
            plans: AtomicUsize::new(0),
            plan_ns: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            connect_bytes: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        }
    }

    /// When the first, the median and the last agent got its plan, `since` the bench's
    /// start (plans that arrived before `since` count as at `since`).
    pub fn plan_spread(&self, since: Duration) -> [Duration; 3] {
        let mut at: Vec<Duration> = self
            .plan_ns
            .iter()
            .map(|t| Duration::from_nanos(t.load(Ordering::Relaxed)).saturating_sub(since))
            .collect();
        at.sort_unstable();
        let pick = |i: usize| at.get(i).copied().unwrap_or_default();
        [
            pick(0),
            pick(at.len() / 2),
            pick(at.len().saturating_sub(1)),
        ]
    }
}

/// The image roots the agents report, by name.
pub type Roots = Arc<Mutex<std::collections::HashMap<String, Vec<u8>>>>;

/// One connection per `AGENTS_PER_CONNECTION` agents, to each controller.
pub struct Connections {
    pub by_addr: std::collections::HashMap<String, Vec<Channel>>,
}

impl Connections {
    pub fn new(addrs: &[String], agents: usize) -> Connections {
        let per = agents.div_ceil(AGENTS_PER_CONNECTION).max(1);
        Connections {
            by_addr: addrs
                .iter()
                .map(|a| (a.clone(), (0..per).map(|_| channel(a)).collect()))
                .collect(),
        }
    }

    fn get(&self, addr: &str, i: usize) -> Channel {
        match self.by_addr.get(addr) {
            Some(list) => list[(i / AGENTS_PER_CONNECTION) % list.len()].clone(),
            None => channel(addr),
        }
    }
}

/// What every simulated agent shares.
pub struct Sim {
    pub controllers: Vec<String>,
    pub connections: Connections,
    pub roots: Roots,
    pub counters: Counters,
    pub start: Instant,
}

/// Runs one simulated agent for ever, reconnecting (and following leader hints) as `subd` does.
pub async fn agent(i: usize, hostname: String, mut base: String, sim: Arc<Sim>) {
    let Sim {
        controllers,
        connections,
        roots,
        counters,
        start,
    } = &*sim;
    let start = *start;
    let excluded = dom_agent::scan::default_exclusions();
    let mut generation = 0u64;
    let mut addr = controllers[i % controllers.len()].clone();
    let mut attempt = 0usize;
    loop {
        let root = roots
            .lock()
            .map(|r| r.get(&base).cloned().unwrap_or_default())
            .unwrap_or_default();
        generation += 1;
        let hello = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                hostname: hostname.clone(),
                agent_version: "sim".into(),
                excluded: excluded.clone(),
                last_update: None,
                in_flight: None,
            })),
        };
        let state = describe(generation, &base, &root);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(8);
        let bytes = hello.encoded_len() + state.encoded_len();
        let _ = tx.send(hello).await;
        let _ = tx.send(state).await;
        let mut inbound = match sync(connections.get(&addr, i), rx).await {
            Ok(inbound) => inbound,
            Err(status) => {
                attempt += 1;
                addr = match status
                    .metadata()
                    .get("dom-leader")
                    .and_then(|v| v.to_str().ok())
                {
                    Some(leader) => leader.to_owned(),
                    None => {
                        // Spread retries out as subd's jittered back-off does.
                        let ms = 100 + (i as u64 * 7919 + attempt as u64 * 104_729) % 400;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        controllers[(i + attempt) % controllers.len()].clone()
                    }
                };
                continue;
            }
        };
        counters
            .connect_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        counters.connects.fetch_add(1, Ordering::Relaxed);
        let mut update_image = None;
        while let Some(message) = inbound.message().await {
            use view::Body;
            match message.body {
                Some(Body::Fetch(f)) => {
                    counters.plans.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = counters.plan_ns.get(i) {
                        t.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    let total: u64 = f.objects.iter().map(|o| o.size).sum();
                    let _ = tx
                        .send(pb::AgentMessage {
                            body: Some(pb::agent_message::Body::FetchProgress(pb::FetchProgress {
                                plan_id: f.plan_id,
                                objects_done: f.objects.len() as u64,
                                objects_total: f.objects.len() as u64,
                                bytes_done: total,
                                bytes_total: total,
                                done: true,
                                ..Default::default()
                            })),
                        })
                        .await;
                }
                Some(Body::Update(u)) => {
                    update_image.get_or_insert(u.image.clone());
                    if u.complete {
                        let image = update_image.take().unwrap_or_default();
                        let _ = tx
                            .send(pb::AgentMessage {
                                body: Some(pb::agent_message::Body::UpdateResult(
                                    pb::UpdateResult {
                                        plan_id: u.plan_id,
                                        image: image.clone(),
                                        outcome: pb::UpdateOutcome::Applied as i32,
                                        ..Default::default()
                                    },
                                )),
                            })
                            .await;
                        base = image;
                        generation += 1;
                        let root = roots
                            .lock()
                            .map(|r| r.get(&base).cloned().unwrap_or_default())
                            .unwrap_or_default();
                        let _ = tx.send(describe(generation, &base, &root)).await;
                    }
                }
                Some(Body::Rebase(r)) => {
                    base = r.image;
                    generation += 1;
                    let root = roots
                        .lock()
                        .map(|m| m.get(&base).cloned().unwrap_or_default())
                        .unwrap_or_default();
                    let _ = tx.send(describe(generation, &base, &root)).await;
                }
                _ => {}
            }
        }
        // The stream ended (the leader died): find the new one.
        addr = controllers[(i + attempt + 1) % controllers.len()].clone();
        attempt += 1;
    }
}

fn describe(generation: u64, base: &str, root: &[u8]) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::State(pb::MachineState {
            generation,
            reset: true,
            complete: true,
            base_image: base.to_owned(),
            root_hash: root.to_vec(),
            swept: true,
            ..Default::default()
        })),
    }
}

/// How many machines the leader reports compliant on `image` (None: not answered).
pub async fn compliant(addrs: &[String], image: &str) -> Option<usize> {
    for addr in addrs {
        let mut client = AdminClient::new(channel(addr)).max_decoding_message_size(256 << 20);
        let mut request = tonic::Request::new(pb::StatusRequest::default());
        request.set_timeout(Duration::from_secs(10));
        if let Ok(reply) = client.status(request).await {
            return Some(
                reply
                    .into_inner()
                    .machines
                    .iter()
                    .filter(|m| m.state == "compliant" && m.active_image == image)
                    .count(),
            );
        }
    }
    None
}

/// Waits until `n` machines are compliant on `image`, polling the cluster.
pub async fn wait_compliant(addrs: &[String], image: &str, n: usize, limit: Duration) -> f64 {
    let start = Instant::now();
    loop {
        if compliant(addrs, image).await == Some(n) {
            return start.elapsed().as_secs_f64();
        }
        assert!(
            start.elapsed() < limit,
            "{n} machines not compliant on {image} within {limit:?} (last count {:?})",
            compliant(addrs, image).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) of a process so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::controller_message::Body as B;

    fn read(body: B) -> Option<view::Body> {
        let bytes = pb::ControllerMessage { body: Some(body) }.encode_to_vec();
        view::ControllerMessage::decode(bytes.as_slice())
            .expect("the view reads the contract's messages")
            .body
    }

    /// A response body of the given chunks, as h2 might split them.
    struct Split(VecDeque<Bytes>);

    impl tonic::codegen::Body for Split {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(http_body::Frame::data(c))))
        }
    }

    #[tokio::test]
    async fn inbound_reads_messages_split_anywhere_across_frames() {
        let messages = [
            B::Fetch(pb::Fetch {
                plan_id: 7,
                objects: vec![
                    pb::ObjectRef {
                        hash: vec![1; 32],
                        size: 10
                    };
                    300
                ],
                ..Default::default()
            }),
            B::Welcome(pb::Welcome { leader_id: 2 }),
            B::Update(pb::Update {
                plan_id: 7,
                image: "a/2".into(),
                steps: vec![pb::Step::default(); 50],
                complete: true,
                ..Default::default()
            }),
        ];
        let wire: Vec<u8> = messages
            .iter()
            .flat_map(|body| {
                grpc_encode(&pb::ControllerMessage {
                    body: Some(body.clone()),
                })
            })
            .collect();
        for size in [1, 3, 5, 7, 1000, wire.len()] {
            let chunks = wire.chunks(size).map(Bytes::copy_from_slice).collect();
            let mut inbound = Inbound {
                body: tonic::body::Body::new(Split(chunks)),
                chunks: VecDeque::new(),
                buffered: 0,
            };
            for body in &messages {
                let got = inbound.message().await.expect("a whole message");
                assert_eq!(got.body, read(body.clone()), "chunks of {size}");
            }
            assert!(inbound.message().await.is_none(), "the stream ends");
        }
    }

    #[test]
    fn the_view_reads_what_the_agent_acts_on_from_the_contract_messages() {
        let fetch = pb::Fetch {
            plan_id: 7,
            image: "a/2".into(),
            objects: vec![
                pb::ObjectRef {
                    hash: vec![1; 32],
                    size: 10,
                },
                pb::ObjectRef {
                    hash: vec![2; 32],
                    size: 32,
                },
            ],
            bytes_per_sec: 5,
        };
        let Some(view::Body::Fetch(f)) = read(B::Fetch(fetch)) else {
            panic!("not a fetch");
        };
        assert_eq!(f.plan_id, 7);
        assert_eq!(
            f.objects.iter().map(|o| o.size).collect::<Vec<_>>(),
            [10, 32]
        );

        let update = pb::Update {
            plan_id: 8,
            image: "a/2".into(),
            generation: 3,
            steps: vec![pb::Step::default(); 3],
            complete: true,
            ..Default::default()
        };
        assert_eq!(
            read(B::Update(update)),
            Some(view::Body::Update(view::Update {
                plan_id: 8,
                image: "a/2".into(),
                complete: true,
            }))
        );
        let rebase = pb::Rebase {
            image: "a/1".into(),
            ..Default::default()
        };
        assert_eq!(
            read(B::Rebase(rebase)),
            Some(view::Body::Rebase(view::Rebase {
                image: "a/1".into()
            }))
        );
        assert_eq!(read(B::Welcome(pb::Welcome { leader_id: 1 })), None);
    }
}
