//! Object transfer: the Objects gRPC service, and the replica side of keeping every live
//! image's objects on every replica.
//!
//! An image is committed only once its objects are on a majority ([`ensure_on_majority`]);
//! after that, each replica's refiller fetches whatever it lacks from its peers, so a replica
//! whose data dir was wiped fills itself again, and garbage collection removes what no live
//! image references once it has been idle for the grace period.

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dom_proto::v1 as pb;
use dom_proto::v1::objects_client::ObjectsClient;
use dom_storage::event::Hash;
use dom_storage::image::Manifest;
use dom_storage::objects::{parse_hash, to_hex, ObjectError, ObjectStore, Verified};
use dom_storage::state_machine::FleetView;
use dom_storage::types::NodeId;
use futures::{Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{cached, Cache};
use crate::network::channel;

/// Chunk size for object streams.
pub const CHUNK: usize = 1 << 20;
/// Publish verified objects in batches of this many, so one sync covers many small files.
const PUBLISH_BATCH: usize = 2048;

fn object_status(e: ObjectError) -> Status {
    match e {
        ObjectError::NotFound(_) => Status::not_found(e.to_string()),
        ObjectError::HashMismatch { .. } | ObjectError::SizeMismatch { .. } => {
            Status::data_loss(e.to_string())
        }
        ObjectError::Io { .. } => Status::internal(e.to_string()),
    }
}

fn hashes_from(list: Vec<Vec<u8>>) -> Result<Vec<Hash>, Status> {
    list.iter()
        .map(|h| {
            parse_hash(h).ok_or_else(|| {
                Status::invalid_argument(format!("{} is not a 32-byte hash", hex::encode(h)))
            })
        })
        .collect()
}

/// Stores a stream of back-to-back objects; shared by the gRPC service and peer pulls.
pub async fn store_stream<S>(store: &ObjectStore, mut chunks: S) -> Result<pb::PutResponse, Status>
where
    S: Stream<Item = Result<pb::ObjectChunk, Status>> + Unpin,
{
    let mut current: Option<dom_storage::objects::ObjectWriter> = None;
    let mut verified: Vec<Verified> = Vec::new();
    let mut response = pb::PutResponse::default();
    let finish = |writer: dom_storage::objects::ObjectWriter| async move {
        writer.finish().await.map_err(object_status)
    };
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if !chunk.whole.is_empty() {
            if current.is_some() {
                return Err(Status::invalid_argument(
                    "whole objects sent before the previous object ended",
                ));
            }
            for object in chunk.whole {
                let hash = parse_hash(&object.hash)
                    .ok_or_else(|| Status::invalid_argument("object hash is not 32 bytes"))?;
                let mut writer = store
                    .writer(hash, object.size)
                    .await
                    .map_err(object_status)?;
                writer.write(&object.data).await.map_err(object_status)?;
                verified.push(finish(writer).await?);
                response.objects += 1;
                response.bytes += object.data.len() as u64;
            }
            if verified.len() >= PUBLISH_BATCH {
                publish(store, std::mem::take(&mut verified)).await?;
            }
            continue;
        }
        if !chunk.hash.is_empty() {
            if let Some(writer) = current.take() {
                verified.push(finish(writer).await?);
            }
            let hash = parse_hash(&chunk.hash)
                .ok_or_else(|| Status::invalid_argument("object hash is not 32 bytes"))?;
            current = Some(
                store
                    .writer(hash, chunk.size)
                    .await
                    .map_err(object_status)?,
            );
            response.objects += 1;
        }
        let writer = current
            .as_mut()
            .ok_or_else(|| Status::invalid_argument("object data before any object hash"))?;
        writer.write(&chunk.data).await.map_err(object_status)?;
        response.bytes += chunk.data.len() as u64;
        if writer.remaining() == 0 {
            if let Some(writer) = current.take() {
                verified.push(finish(writer).await?);
            }
        }
        if verified.len() >= PUBLISH_BATCH {
            publish(store, std::mem::take(&mut verified)).await?;
        }
    }
    if let Some(writer) = current.take() {
        verified.push(finish(writer).await?);
    }
    publish(store, verified).await?;
    Ok(response)
}

async fn publish(store: &ObjectStore, verified: Vec<Verified>) -> Result<(), Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.publish(verified))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(object_status)
}

/// Chunks of one stored object, for a Get reply or a push to a peer.
pub fn object_chunks(
    store: ObjectStore,
    hash: Hash,
) -> impl Stream<Item = Result<pb::ObjectChunk, Status>> {
    async_stream::try_stream! {
        let (mut file, size) = store.open_read(&hash).await.map_err(object_status)?;
        let mut first = true;
        let mut sent = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK.min((size - sent) as usize)];
            let n = if data.is_empty() { 0 } else { file.read_exact(&mut data).await.map_err(|e| Status::internal(e.to_string()))? };
            sent += n as u64;
            let chunk = pb::ObjectChunk {
                hash: if first { hash.to_vec() } else { Vec::new() },
                size: if first { size } else { 0 },
                data,
                whole: Vec::new(),
            };
            first = false;
            yield chunk;
            if sent >= size {
                break;
            }
        }
    }
}

pub struct ObjectsService {
    pub store: ObjectStore,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ObjectChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::objects_server::Objects for ObjectsService {
    async fn missing(
        &self,
        request: Request<pb::MissingRequest>,
    ) -> Result<Response<pb::MissingResponse>, Status> {
        let hashes = hashes_from(request.into_inner().hashes)?;
        let store = self.store.clone();
        let missing = tokio::task::spawn_blocking(move || store.missing(&hashes))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::MissingResponse {
            missing: missing.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn put(
        &self,
        request: Request<Streaming<pb::ObjectChunk>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        Ok(Response::new(
            store_stream(&self.store, request.into_inner()).await?,
        ))
    }

    type GetStream = ChunkStream;

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let hash = parse_hash(&request.into_inner().hash)
            .ok_or_else(|| Status::invalid_argument("hash is not 32 bytes"))?;
        if !self.store.contains(&hash) {
            return Err(Status::not_found(format!(
                "object {} is not stored here",
                to_hex(&hash)
            )));
        }
        Ok(Response::new(Box::pin(object_chunks(
            self.store.clone(),
            hash,
        ))))
    }
}

fn client(addr: &str) -> Result<ObjectsClient<Channel>, Status> {
    let channel = channel(addr).map_err(|e| Status::internal(e.to_string()))?;
    Ok(ObjectsClient::new(channel)
        .max_decoding_message_size(4 * CHUNK)
        .max_encoding_message_size(4 * CHUNK))
}

/// Asks `addr` which of `hashes` it lacks.
async fn peer_missing(addr: &str, hashes: &[Hash]) -> Result<Vec<Hash>, Status> {
    let mut missing = Vec::new();
    for batch in hashes.chunks(10_000) {
        let request = pb::MissingRequest {
            hashes: batch.iter().map(|h| h.to_vec()).collect(),
        };
        let reply = client(addr)?.missing(request).await?.into_inner();
        missing.extend(hashes_from(reply.missing)?);
    }
    Ok(missing)
}

/// Sends `hashes` from the local store to `addr`.
async fn push(store: &ObjectStore, addr: &str, hashes: Vec<Hash>) -> Result<(), Status> {
    let store = store.clone();
    let stream = async_stream::stream! {
        let mut batch = dom_storage::objects::WholeBatch::default();
        for hash in hashes {
            let Ok((mut file, size)) = store.open_read(&hash).await else { continue };
            if size <= dom_storage::objects::SMALL_OBJECT {
                let mut data = Vec::with_capacity(size as usize);
                if file.read_to_end(&mut data).await.is_err() {
                    continue;
                }
                if let Some(full) = batch.add(hash, data) {
                    yield full;
                }
                continue;
            }
            if let Some(rest) = batch.take() {
                yield rest;
            }
            let mut chunks = std::pin::pin!(object_chunks(store.clone(), hash));
            while let Some(Ok(chunk)) = chunks.next().await {
                yield chunk;
            }
        }
        if let Some(rest) = batch.take() {
            yield rest;
        }
    };
    client(addr)?.put(stream).await?;
    Ok(())
}

/// Fetches `hashes` from `addr` into the local store; returns those it got.
async fn pull(store: &ObjectStore, addr: &str, hashes: &[Hash]) -> Result<usize, Status> {
    let mut got = 0;
    let mut peer = client(addr)?;
    for hash in hashes {
        let stream = match peer
            .get(pb::GetRequest {
                hash: hash.to_vec(),
            })
            .await
        {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => continue,
            Err(status) => return Err(status),
        };
        store_stream(store, stream).await?;
        got += 1;
    }
    Ok(got)
}

/// Fetches what the local store lacks of `hashes` from any peer that has it.
pub async fn fill_from_peers(
    store: &ObjectStore,
    peers: &BTreeMap<NodeId, String>,
    hashes: &[Hash],
) -> Vec<Hash> {
    let mut missing = store.missing(hashes);
    for addr in peers.values() {
        if missing.is_empty() {
            break;
        }
        if let Err(e) = pull(store, addr, &missing).await {
            tracing::debug!(peer = %addr, "pull failed: {e}");
        }
        missing = store.missing(&missing);
    }
    missing
}

/// Reads and decodes manifest `hash`, fetching it from `peers` if this replica lacks it.
/// The decode (tens of milliseconds for a large image) runs on a blocking thread, off the
/// runtime that serves agents and Raft.
async fn load_manifest(
    store: &ObjectStore,
    peers: &BTreeMap<NodeId, String>,
    hash: &Hash,
) -> Result<LoadedManifest, Status> {
    if !store.contains(hash) && !fill_from_peers(store, peers, &[*hash]).await.is_empty() {
        return Err(Status::failed_precondition(format!(
            "manifest {} is on no reachable replica; upload it first",
            to_hex(hash)
        )));
    }
    let path = store.path(hash);
    let hash = *hash;
    tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(path).map_err(|e| Status::internal(e.to_string()))?;
        Manifest::decode(&bytes)
            .map(|manifest| LoadedManifest {
                manifest,
                size: bytes.len() as u64,
            })
            .map_err(|e| Status::invalid_argument(format!("manifest {}: {e}", to_hex(&hash))))
    })
    .await
    .map_err(|e| Status::internal(format!("manifest decode: {e}")))?
}

/// A manifest with the size of its object, which agents fetch with the rest.
pub struct LoadedManifest {
    pub manifest: Manifest,
    pub size: u64,
}

/// Decoded manifests, shared by everything on a replica that reads them: the check of an
/// image before it commits, the refiller when it arrives, and every plan toward it or from
/// it. An image is thus decoded once, when it is added, and a fleet-wide assignment finds
/// its manifest ready (on a replica that becomes leader later too).
pub struct Manifests {
    store: ObjectStore,
    /// Where to fetch a manifest this replica lacks.
    peers: BTreeMap<NodeId, String>,
    cache: std::sync::Mutex<Cache<Hash, LoadedManifest>>,
}

/// Manifests kept decoded. A 40,000-file image takes about 7 MiB (two of them raised a
/// replica's resident memory by 15 MiB in `dom-bench agents`).
const MANIFEST_CACHE: usize = 16;

impl Manifests {
    pub fn new(store: ObjectStore, self_id: NodeId, peers: &BTreeMap<NodeId, String>) -> Self {
        Manifests {
            store,
            peers: other_replicas(peers, self_id),
            cache: std::sync::Mutex::new(Cache::new(MANIFEST_CACHE)),
        }
    }

    /// The other replicas, where whatever this one lacks is fetched from.
    pub fn peers(&self) -> &BTreeMap<NodeId, String> {
        &self.peers
    }

    pub async fn get(&self, hash: &Hash) -> Result<Arc<LoadedManifest>, Status> {
        // Boxed: fetching from peers is a large future, and rarely needed; inlined, it would
        // weigh on every session waiting in a plan.
        cached(&self.cache, hash, async {
            Box::pin(load_manifest(&self.store, &self.peers, hash)).await
        })
        .await
    }
}

const PUSH_TIMEOUT: Duration = Duration::from_secs(600);

/// Sends `addr` whichever of `hashes` it lacks, and checks they arrived.
async fn push_all(store: &ObjectStore, addr: &str, hashes: &[Hash]) -> Result<(), Status> {
    let missing = peer_missing(addr, hashes).await?;
    if !missing.is_empty() {
        push(store, addr, missing).await?;
    }
    let left = peer_missing(addr, hashes).await?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(Status::data_loss(format!(
            "{} object(s) did not arrive",
            left.len()
        )))
    }
}

/// `replicas` without this one.
pub fn other_replicas(
    replicas: &BTreeMap<NodeId, String>,
    self_id: NodeId,
) -> BTreeMap<NodeId, String> {
    replicas
        .iter()
        .filter(|(id, _)| **id != self_id)
        .map(|(i, a)| (*i, a.clone()))
        .collect()
}

/// Makes sure every object in `hashes` is stored on a majority of the `voters` (this replica
/// included), pushing from here to the peers that lack them.
pub async fn ensure_on_majority(
    store: &ObjectStore,
    self_id: NodeId,
    voters: &BTreeMap<NodeId, String>,
    hashes: &[Hash],
) -> Result<(), Status> {
    let peers = other_replicas(voters, self_id);
    let still_missing = fill_from_peers(store, &peers, hashes).await;
    if !still_missing.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{} object(s) of the image are on no reachable replica (first {}); upload them first",
            still_missing.len(),
            to_hex(&still_missing[0])
        )));
    }
    // Pushed to every peer at once; the commit waits only for a majority, and a slower peer
    // goes on receiving in the background (a peer that missed objects refills them itself).
    let hashes: Arc<[Hash]> = hashes.into();
    let mut pushes: futures::stream::FuturesUnordered<_> = peers
        .values()
        .map(|addr| {
            let (store, addr, hashes) = (store.clone(), addr.clone(), hashes.clone());
            tokio::spawn(async move {
                // A peer that stops reading must not hold a push open for ever.
                tokio::time::timeout(PUSH_TIMEOUT, push_all(&store, &addr, &hashes))
                    .await
                    .map_err(|_| {
                        Status::deadline_exceeded(format!(
                            "{addr} took longer than {PUSH_TIMEOUT:?}"
                        ))
                    })?
            })
        })
        .collect();
    let mut holders = 1;
    let mut reasons = Vec::new();
    while holders * 2 <= voters.len() {
        match pushes.next().await {
            Some(Ok(Ok(()))) => holders += 1,
            Some(Ok(Err(status))) => reasons.push(status.message().to_owned()),
            Some(Err(join)) => reasons.push(join.to_string()),
            None => {
                return Err(Status::unavailable(format!(
                    "image objects reached {holders} of {} replicas, not a majority: {}",
                    voters.len(),
                    reasons.join("; ")
                )))
            }
        }
    }
    Ok(())
}

/// Every object of every live image, manifests included; `None` if a manifest is unreadable
/// (then nothing may be collected).
async fn referenced(store: &ObjectStore, view: &FleetView) -> Option<HashSet<Hash>> {
    let manifests: Vec<Hash> = view.read(|l| {
        l.state
            .images()
            .filter(|i| i.deleted_at.is_none())
            .filter_map(|i| i.manifest_hash)
            .collect()
    });
    let mut all = HashSet::new();
    for hash in manifests {
        let bytes = tokio::fs::read(store.path(&hash)).await.ok()?;
        let manifest = Manifest::decode(&bytes).ok()?;
        all.insert(hash);
        all.extend(manifest.object_hashes());
    }
    Some(all)
}

/// Background duties of a replica's object store: refill from peers, collect garbage.
pub struct Maintenance {
    pub store: ObjectStore,
    /// Also where the other replicas are.
    pub manifests: Arc<Manifests>,
    pub view: FleetView,
    pub gc_interval: Duration,
    pub gc_grace: Duration,
}

impl Maintenance {
    pub async fn run(self: Arc<Self>) {
        let mut applied = self.view.subscribe();
        let mut complete: HashSet<Hash> = HashSet::new();
        let mut gc = tokio::time::interval(self.gc_interval);
        gc.tick().await;
        let mut retry = tokio::time::interval(Duration::from_secs(5));
        loop {
            self.refill(&mut complete).await;
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                _ = retry.tick() => {}
                _ = gc.tick() => self.collect_garbage().await,
            }
        }
    }

    /// Fetches the objects of live images this replica lacks.
    async fn refill(&self, complete: &mut HashSet<Hash>) {
        let manifests: Vec<(String, Hash)> = self.view.read(|l| {
            l.state
                .images()
                .filter(|i| i.deleted_at.is_none())
                .filter_map(|i| Some((i.name.clone(), i.manifest_hash?)))
                .collect()
        });
        let peers = self.manifests.peers();
        for (name, hash) in manifests {
            if complete.contains(&hash) {
                continue;
            }
            let loaded = match self.manifests.get(&hash).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    tracing::warn!(image = %name, "cannot refill: {}", e.message());
                    continue;
                }
            };
            let wanted = loaded.manifest.object_hashes();
            let before = self.store.missing(&wanted).len();
            let left = fill_from_peers(&self.store, peers, &wanted).await;
            if before > 0 {
                tracing::info!(image = %name, fetched = before - left.len(), missing = left.len(), "refilled image objects from peers");
            }
            if left.is_empty() {
                complete.insert(hash);
            }
        }
    }

    async fn collect_garbage(&self) {
        let Some(referenced) = referenced(&self.store, &self.view).await else {
            tracing::warn!(
                "skipping garbage collection: a live image's manifest is not readable here yet"
            );
            return;
        };
        let store = self.store.clone();
        let grace = self.gc_grace;
        match tokio::task::spawn_blocking(move || store.collect_garbage(&referenced, grace)).await {
            Ok(Ok(report)) if report.removed > 0 => {
                tracing::info!(
                    removed = report.removed,
                    bytes = report.removed_bytes,
                    kept = report.kept,
                    "collected unreferenced objects"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("garbage collection failed: {e}"),
            Err(e) => tracing::warn!("garbage collection task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dom_storage::image::Entry;

    async fn store_object(store: &ObjectStore, data: &[u8]) -> Hash {
        let hash = *blake3::hash(data).as_bytes();
        let mut writer = store.writer(hash, data.len() as u64).await.expect("writer");
        writer.write(data).await.expect("write");
        store
            .publish(vec![writer.finish().await.expect("verified")])
            .expect("publish");
        hash
    }

    #[tokio::test]
    async fn a_manifest_is_decoded_once_and_shared() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ObjectStore::open(dir.path()).expect("store");
        let manifest = Manifest::new(vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::file("/etc", 0o644, 0, 0, 3, [7; 32]),
        ])
        .expect("manifest");
        let encoded = manifest.encode();
        let hash = store_object(&store, &encoded).await;
        let manifests = Manifests::new(store.clone(), 1, &BTreeMap::new());

        let first = manifests.get(&hash).await.expect("loads");
        assert_eq!(first.size, encoded.len() as u64);
        assert_eq!(first.manifest.files(), 1);
        // Removed from disk, it is still served decoded: the second asker never read it.
        std::fs::remove_file(store.path(&hash)).expect("remove");
        let second = manifests.get(&hash).await.expect("cached");
        assert!(Arc::ptr_eq(&first, &second));

        let error = match manifests.get(&[9; 32]).await {
            Ok(_) => panic!("a manifest no replica has loads"),
            Err(e) => e,
        };
        assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    }
}
