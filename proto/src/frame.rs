//! Leader-to-agent messages with a shared part encoded once.
//!
//! A fleet-wide assignment sends thousands of machines the same Fetch (hundreds of object
//! references) and the same Update pages (hundreds of steps); only the plan id and the
//! machine's generation differ. Protobuf lets a message be written as any concatenation of
//! its fields, so the leader encodes the shared fields once and writes, per machine, the few
//! fields of its own followed by those shared bytes. Agents see ordinary
//! `v1::ControllerMessage`s: the bytes are those of the message built whole, up to field
//! order (tested below).

use std::convert::Infallible;
use std::marker::PhantomData;

use prost::bytes::{BufMut, Bytes};
use prost::Message;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::{http, Arc, BoxFuture, Context, Pin, Poll, Service, StdError};
use tonic::server::NamedService;
use tonic::{Status, Streaming};

use crate::leader::agent_server::{self, Agent};
use crate::v1;

/// The fields of a message of type `M` that many machines get alike, encoded once.
#[derive(Debug)]
pub struct Shared<M> {
    bytes: Bytes,
    of: PhantomData<fn() -> M>,
}

impl<M> Clone for Shared<M> {
    fn clone(&self) -> Self {
        Shared {
            bytes: self.bytes.clone(),
            of: PhantomData,
        }
    }
}

impl<M: Message> Shared<M> {
    /// `part` holds only the shared fields; the per-machine ones are left at their defaults,
    /// which protobuf does not encode.
    pub fn new(part: &M) -> Self {
        Shared {
            bytes: part.encode_to_vec().into(),
            of: PhantomData,
        }
    }
}

/// A message that travels as one variant of `ControllerMessage.body`.
pub trait Body: Message {
    /// Its field number in `ControllerMessage`.
    const FIELD: u32;
}

impl Body for v1::Fetch {
    const FIELD: u32 = 3;
}

impl Body for v1::Update {
    const FIELD: u32 = 4;
}

/// One message on an agent's stream, as the leader sends it.
#[derive(Debug, Clone)]
pub struct ControllerFrame(Repr);

#[derive(Debug, Clone)]
enum Repr {
    Whole(v1::ControllerMessage),
    /// The body's key and length, the machine's own fields, then the shared ones.
    Spliced {
        head: Vec<u8>,
        shared: Bytes,
    },
}

impl ControllerFrame {
    /// A body of type `M` whose fields are `own` (only the per-machine fields set) and
    /// `shared`. A field set in both would be written twice: a scalar would take the shared
    /// value and a repeated field would hold both, so callers keep the two apart.
    pub fn spliced<M: Body>(own: &M, shared: &Shared<M>) -> Self {
        let own_len = own.encoded_len();
        let mut head = Vec::with_capacity(own_len + 16);
        // A field key is a varint of (field number << 3 | wire type), as is a length; wire
        // type 2 is length-delimited. Writing to a Vec cannot run out of room.
        let key = ((M::FIELD << 3) | 2) as usize;
        let _ = prost::encode_length_delimiter(key, &mut head);
        let _ = prost::encode_length_delimiter(own_len + shared.bytes.len(), &mut head);
        let _ = own.encode(&mut head);
        ControllerFrame(Repr::Spliced {
            head,
            shared: shared.bytes.clone(),
        })
    }

    /// The encoded message, as an agent receives it.
    pub fn encode(&self, buf: &mut impl BufMut) {
        match &self.0 {
            Repr::Whole(message) => message.encode_raw(buf),
            Repr::Spliced { head, shared } => {
                buf.put_slice(head);
                buf.put_slice(shared);
            }
        }
    }

    /// The message as gRPC puts it on the wire (the 5-byte prefix, then the message), in up to
    /// two chunks: the prefix with the machine's own bytes, then the shared bytes as they are,
    /// not copied.
    pub fn into_grpc(self) -> (Bytes, Option<Bytes>) {
        let len = self.encoded_len();
        let own = match &self.0 {
            Repr::Whole(_) => len,
            Repr::Spliced { head, .. } => head.len(),
        };
        let mut first = Vec::with_capacity(GRPC_PREFIX + own);
        first.extend_from_slice(&grpc_prefix(len));
        match self.0 {
            Repr::Whole(message) => {
                message.encode_raw(&mut first);
                (first.into(), None)
            }
            Repr::Spliced { head, shared } => {
                first.extend_from_slice(&head);
                (first.into(), Some(shared))
            }
        }
    }

    pub fn encoded_len(&self) -> usize {
        match &self.0 {
            Repr::Whole(message) => message.encoded_len(),
            Repr::Spliced { head, shared } => head.len() + shared.len(),
        }
    }
}

impl From<v1::ControllerMessage> for ControllerFrame {
    fn from(message: v1::ControllerMessage) -> Self {
        ControllerFrame(Repr::Whole(message))
    }
}

impl From<v1::controller_message::Body> for ControllerFrame {
    fn from(body: v1::controller_message::Body) -> Self {
        v1::ControllerMessage { body: Some(body) }.into()
    }
}

/// Bytes before each gRPC message: a compression flag and the length.
pub const GRPC_PREFIX: usize = 5;

/// The prefix of an uncompressed gRPC message of `len` bytes: the flag, then the length as
/// u32 big-endian (a message here is at most one plan page, far below 4 GiB).
pub fn grpc_prefix(len: usize) -> [u8; GRPC_PREFIX] {
    let [a, b, c, d] = (len as u32).to_be_bytes();
    [0, a, b, c, d]
}

/// The length a gRPC message prefix gives.
pub fn grpc_len(prefix: [u8; GRPC_PREFIX]) -> usize {
    u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize
}

/// `message` as gRPC puts it on the wire, uncompressed: its prefix, then its bytes.
pub fn grpc_encode(message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut wire = Vec::with_capacity(GRPC_PREFIX + len);
    wire.extend_from_slice(&grpc_prefix(len));
    message.encode_raw(&mut wire);
    wire
}

/// The leader's `Agent` service, serving `Sync` without tonic's codec on the way out.
///
/// tonic encodes every response message into a buffer of its stream, so each of thousands of
/// agents in a rollout had its own copy of the same plan pages (52 KB each, on fresh pages:
/// copying and page faults were half the leader's CPU in a 10,000-machine rollout, and the
/// copies its peak memory). Here requests are decoded by tonic's `Streaming` as before, and
/// each response message goes out as two chunks, [`ControllerFrame::into_grpc`]: a small one
/// of its own, then the shared `Bytes` themselves, which hyper and h2 hand to the socket in a
/// vectored write. What the agent receives is byte for byte what tonic would have sent.
pub struct SyncServer<T> {
    inner: Arc<T>,
    max_decoding_message_size: usize,
}

impl<T> SyncServer<T> {
    pub fn new(inner: T, max_decoding_message_size: usize) -> Self {
        SyncServer {
            inner: Arc::new(inner),
            max_decoding_message_size,
        }
    }
}

impl<T> Clone for SyncServer<T> {
    fn clone(&self) -> Self {
        SyncServer {
            inner: self.inner.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<T> NamedService for SyncServer<T> {
    const NAME: &'static str = agent_server::SERVICE_NAME;
}

impl<T, B> Service<http::Request<B>> for SyncServer<T>
where
    T: Agent,
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let max_decoding = self.max_decoding_message_size;
        Box::pin(async move {
            if request.uri().path() != "/dom.v1.Agent/Sync" {
                return Ok(Status::unimplemented(format!(
                    "no method {} on the Agent service",
                    request.uri().path()
                ))
                .into_http());
            }
            let compressed = request
                .headers()
                .get("grpc-encoding")
                .is_some_and(|e| e.as_bytes() != b"identity");
            if compressed {
                return Ok(Status::unimplemented("compressed agent messages").into_http());
            }
            let (parts, body) = request.into_parts();
            let messages = Streaming::new_request(
                tonic_prost::ProstDecoder::<v1::AgentMessage>::default(),
                body,
                None,
                Some(max_decoding),
            );
            let request = tonic::Request::from_http(http::Request::from_parts(parts, messages));
            Ok(match inner.sync(request).await {
                Err(status) => status.into_http(),
                Ok(response) => {
                    let (metadata, frames, extensions) = response.into_parts();
                    let mut http = http::Response::new(tonic::body::Body::new(FrameBody {
                        frames: Box::pin(frames),
                        shared: None,
                        ended: false,
                    }));
                    *http.headers_mut() = metadata.into_headers();
                    http.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        tonic::metadata::GRPC_CONTENT_TYPE,
                    );
                    *http.extensions_mut() = extensions;
                    http
                }
            })
        })
    }
}

/// A `Sync` response body: each frame's chunks, then the gRPC status as trailers.
struct FrameBody<S> {
    frames: Pin<Box<S>>,
    /// The shared chunk of the frame whose own chunk went out last.
    shared: Option<Bytes>,
    ended: bool,
}

fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    // Only a message that cannot be a header value fails; the code still goes out.
    if status.add_header(&mut trailers).is_err() {
        trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
    }
    trailers
}

impl<S> http_body::Body for FrameBody<S>
where
    S: Stream<Item = Result<ControllerFrame, Status>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(shared) = this.shared.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(shared))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let end = match this.frames.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                let (own, shared) = frame.into_grpc();
                this.shared = shared;
                return Poll::Ready(Some(Ok(http_body::Frame::data(own))));
            }
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        this.ended = true;
        Poll::Ready(Some(Ok(http_body::Frame::trailers(status_trailers(&end)))))
    }
}

/// The codec of tonic's generated `AgentServer` for these frames. domd serves [`SyncServer`]
/// instead; the generated server is kept for the trait it comes with.
#[derive(Debug, Default, Clone)]
pub struct FrameCodec;

#[derive(Debug, Default, Clone)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = ControllerFrame;
    type Error = Status;

    fn encode(&mut self, frame: ControllerFrame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // One allocation of the right size: plans are larger than tonic's buffer, and letting
        // the copy grow it doubled the copying (a profile of a 10,000-machine rollout).
        dst.reserve(frame.encoded_len());
        frame.encode(dst);
        Ok(())
    }
}

impl Codec for FrameCodec {
    type Encode = ControllerFrame;
    type Decode = v1::AgentMessage;
    type Encoder = FrameEncoder;
    type Decoder = tonic_prost::ProstDecoder<v1::AgentMessage>;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::controller_message::Body as B;

    fn fetch() -> v1::Fetch {
        v1::Fetch {
            plan_id: (7 << 32) | 12_345,
            image: "web/2".into(),
            objects: (0..300u64)
                .map(|i| v1::ObjectRef {
                    hash: vec![i as u8; 32],
                    size: i * 1000,
                })
                .collect(),
            bytes_per_sec: 50_000_000,
        }
    }

    fn update() -> v1::Update {
        v1::Update {
            plan_id: 99,
            image: "web/2".into(),
            generation: 1 << 40,
            steps: (0..200)
                .map(|i| v1::Step {
                    kind: 1,
                    entry: Some(v1::ManifestEntry {
                        path: format!("/usr/lib/f{i}"),
                        mode: 0o644,
                        size: i,
                        hash: vec![i as u8; 32],
                        ..Default::default()
                    }),
                })
                .collect(),
            triggers: vec![v1::Trigger {
                service: "web".into(),
                ..Default::default()
            }],
            complete: true,
            manifest_hash: vec![9; 32],
            filter: vec!["/var/log/.*".into()],
        }
    }

    fn bytes(frame: &ControllerFrame) -> Vec<u8> {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        buf
    }

    fn decoded(frame: &ControllerFrame) -> v1::ControllerMessage {
        let bytes = bytes(frame);
        assert_eq!(bytes.len(), frame.encoded_len());
        v1::ControllerMessage::decode(bytes.as_slice()).expect("a frame decodes")
    }

    #[test]
    fn a_spliced_fetch_is_the_fetch_built_whole() {
        let whole = fetch();
        let shared = Shared::new(&v1::Fetch {
            plan_id: 0,
            bytes_per_sec: 0,
            ..whole.clone()
        });
        let own = v1::Fetch {
            plan_id: whole.plan_id,
            bytes_per_sec: whole.bytes_per_sec,
            ..Default::default()
        };
        let frame = ControllerFrame::spliced(&own, &shared);
        assert_eq!(decoded(&frame).body, Some(B::Fetch(whole.clone())));
        // Same size as the message built whole: only the order of fields differs.
        let typed = v1::ControllerMessage {
            body: Some(B::Fetch(whole)),
        };
        assert_eq!(frame.encoded_len(), typed.encoded_len());
    }

    #[test]
    fn on_the_wire_a_frame_is_its_prefix_then_its_message_with_the_shared_bytes_not_copied() {
        let whole = fetch();
        let shared = Shared::new(&v1::Fetch {
            plan_id: 0,
            ..whole.clone()
        });
        let own = v1::Fetch {
            plan_id: whole.plan_id,
            ..Default::default()
        };
        let frames = [
            ControllerFrame::spliced(&own, &shared),
            ControllerFrame::from(B::Fetch(whole)),
        ];
        for frame in frames {
            let message = bytes(&frame);
            let spliced = matches!(frame.0, Repr::Spliced { .. });
            let (first, rest) = frame.into_grpc();
            assert_eq!(first[0], 0, "not compressed");
            assert_eq!(
                grpc_len(first[..GRPC_PREFIX].try_into().unwrap()),
                message.len()
            );
            let mut wire = first[5..].to_vec();
            if let Some(rest) = &rest {
                // The very bytes encoded once for every machine.
                assert_eq!(rest.as_ptr(), shared.bytes.as_ptr());
                wire.extend_from_slice(rest);
            }
            assert_eq!(rest.is_some(), spliced);
            assert_eq!(wire, message);
        }
    }

    #[test]
    fn a_spliced_update_is_the_update_built_whole_and_one_shared_part_serves_many() {
        let whole = update();
        let shared = Shared::new(&v1::Update {
            plan_id: 0,
            generation: 0,
            ..whole.clone()
        });
        for (plan_id, generation) in [(1, 0), (2, 5), (u64::MAX, u64::MAX)] {
            let own = v1::Update {
                plan_id,
                generation,
                ..Default::default()
            };
            let want = v1::Update {
                plan_id,
                generation,
                ..whole.clone()
            };
            let frame = ControllerFrame::spliced(&own, &shared);
            assert_eq!(decoded(&frame).body, Some(B::Update(want)));
        }
    }

    #[test]
    fn a_whole_message_encodes_as_prost_does() {
        let message = v1::ControllerMessage {
            body: Some(B::Welcome(v1::Welcome { leader_id: 3 })),
        };
        let frame = ControllerFrame::from(message.clone());
        assert_eq!(bytes(&frame), message.encode_to_vec());
        assert_eq!(decoded(&frame), message);
    }

    #[test]
    fn an_empty_body_still_frames() {
        let frame =
            ControllerFrame::spliced(&v1::Fetch::default(), &Shared::new(&v1::Fetch::default()));
        assert_eq!(decoded(&frame).body, Some(B::Fetch(v1::Fetch::default())));
    }
}
