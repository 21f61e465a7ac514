//! Fetching objects from the controllers into the agent's private cache.
//!
//! Objects already in the cache are skipped, so a fetch cut short (a lost connection, a
//! failover, a restart) resumes where it stopped. Each object is streamed to a temporary file
//! and verified against its hash before it becomes visible in the cache; the read rate is
//! paced so a fetch does not starve the machine's own traffic. Any replica can serve: every
//! replica holds every live image's objects.

use std::time::{Duration, Instant};

use dom_proto::v1 as pb;
use dom_proto::v1::objects_client::ObjectsClient;
use dom_storage::event::Hash;
use dom_storage::objects::{to_hex, ObjectError, ObjectStore, Verified};
use tonic::transport::Channel;

use crate::scan::Pacer;

/// Verified objects made visible together, so the cache syncs once per batch, not per object.
const PUBLISH_BATCH: usize = 256;
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("object {hash} is on no reachable controller: {last}")]
    Unavailable { hash: String, last: String },
    #[error("object cache: {0}")]
    Cache(#[from] ObjectError),
}

/// How far a fetch has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub objects_done: u64,
    pub objects_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// What came over the network; the rest was in the cache.
    pub objects_downloaded: u64,
    pub bytes_downloaded: u64,
}

pub fn channel(addr: &str) -> Result<Channel, String> {
    Ok(Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Downloads every object of `objects` the cache lacks, from `controllers` in order of
/// preference, at most `bytes_per_sec` (None: unpaced). `report` sees progress after each
/// object.
pub async fn fetch(
    store: &ObjectStore,
    controllers: &[String],
    objects: &[(Hash, u64)],
    bytes_per_sec: Option<u64>,
    mut report: impl FnMut(Progress),
) -> Result<Progress, FetchError> {
    let mut progress = Progress {
        objects_total: objects.len() as u64,
        bytes_total: objects.iter().map(|(_, s)| s).sum(),
        ..Progress::default()
    };
    let hashes: Vec<Hash> = objects.iter().map(|(h, _)| *h).collect();
    let missing: std::collections::HashSet<Hash> = store.missing(&hashes).into_iter().collect();
    for (hash, size) in objects {
        if !missing.contains(hash) {
            progress.objects_done += 1;
            progress.bytes_done += size;
        }
    }
    report(progress);
    let start = Instant::now();
    let mut pacer = bytes_per_sec.map(|rate| Pacer::new(rate, 1 << 20));
    let mut verified: Vec<Verified> = Vec::new();
    let mut clients: Vec<Option<ObjectsClient<Channel>>> = vec![None; controllers.len()];
    for (hash, size) in objects.iter().filter(|(h, _)| missing.contains(h)) {
        let mut last = String::from("no controllers");
        let mut got = None;
        for (i, addr) in controllers.iter().enumerate() {
            let client = match &mut clients[i] {
                Some(c) => c,
                slot => match channel(addr) {
                    Ok(ch) => {
                        slot.insert(ObjectsClient::new(ch).max_decoding_message_size(MAX_MESSAGE))
                    }
                    Err(e) => {
                        last = format!("{addr}: {e}");
                        continue;
                    }
                },
            };
            match get_one(store, client, hash, *size, &mut pacer, start).await {
                Ok(v) => {
                    got = Some(v);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let Some(v) = got else {
            store.publish(std::mem::take(&mut verified))?;
            return Err(FetchError::Unavailable {
                hash: to_hex(hash),
                last,
            });
        };
        verified.push(v);
        if verified.len() >= PUBLISH_BATCH {
            store.publish(std::mem::take(&mut verified))?;
        }
        progress.objects_done += 1;
        progress.bytes_done += size;
        progress.objects_downloaded += 1;
        progress.bytes_downloaded += size;
        report(progress);
    }
    store.publish(verified)?;
    Ok(progress)
}

async fn get_one(
    store: &ObjectStore,
    client: &mut ObjectsClient<Channel>,
    hash: &Hash,
    size: u64,
    pacer: &mut Option<Pacer>,
    start: Instant,
) -> Result<Verified, String> {
    let mut stream = client
        .get(pb::GetRequest {
            hash: hash.to_vec(),
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut writer = store.writer(*hash, size).await.map_err(|e| e.to_string())?;
    while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_owned())? {
        writer.write(&chunk.data).await.map_err(|e| e.to_string())?;
        if let Some(p) = pacer.as_mut() {
            let wait = p.after_read(start.elapsed(), chunk.data.len() as u64);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
    writer.finish().await.map_err(|e| e.to_string())
}
