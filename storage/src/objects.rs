//! The object store: file contents kept once, under their blake3 hash.
//!
//! Objects live at `objects/ab/cdef…` under a replica's data dir. A new object is streamed
//! into `objects/tmp/`, hashed as it arrives, and only renamed to its name once its size and
//! hash are verified, so a visible object is always intact. Renames are batched behind one
//! `syncfs` (data first, then names), so storing 40,000 small files costs two syncs rather
//! than 80,000.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::io::AsyncWriteExt;

use crate::event::Hash;

#[derive(Debug, Error)]
pub enum ObjectError {
    #[error("object {0} is not stored here")]
    NotFound(String),
    #[error("object {expected} arrived with content hashing to {got}")]
    HashMismatch { expected: String, got: String },
    #[error("object {hash} should be {expected} bytes, got {got}")]
    SizeMismatch {
        hash: String,
        expected: u64,
        got: u64,
    },
    #[error("I/O on {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ObjectError + '_ {
    move |error| ObjectError::Io {
        path: path.to_owned(),
        error,
    }
}

pub fn to_hex(hash: &Hash) -> String {
    hex::encode(hash)
}

pub fn parse_hash(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

#[derive(Debug, Clone)]
pub struct ObjectStore {
    root: PathBuf,
}

/// An object written and verified but not yet visible; see [`ObjectStore::publish`].
#[derive(Debug)]
pub struct Verified {
    tmp: PathBuf,
    dest: PathBuf,
}

/// Streams one object into the store's temporary area, hashing as it goes.
pub struct ObjectWriter {
    file: tokio::fs::File,
    tmp: PathBuf,
    dest: PathBuf,
    hasher: blake3::Hasher,
    expected: Hash,
    size: u64,
    written: u64,
}

/// What a garbage collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub kept: u64,
    pub removed: u64,
    pub removed_bytes: u64,
    /// Unreferenced, but younger than the grace period.
    pub spared: u64,
}

impl ObjectStore {
    pub fn open(dir: &Path) -> Result<ObjectStore, ObjectError> {
        let root = dir.to_owned();
        let tmp = root.join("tmp");
        // Temporary files are uploads a crash interrupted; nothing refers to them.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(ObjectStore { root })
    }

    pub fn path(&self, hash: &Hash) -> PathBuf {
        let hex = to_hex(hash);
        self.root.join(&hex[..2]).join(&hex[2..])
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.path(hash).is_file()
    }

    /// The hashes not stored here. Present ones are marked as just used, so that garbage
    /// collection spares them while the caller's upload finishes.
    pub fn missing(&self, hashes: &[Hash]) -> Vec<Hash> {
        let now = SystemTime::now();
        hashes
            .iter()
            .filter(
                |hash| match std::fs::File::options().write(true).open(self.path(hash)) {
                    Ok(file) => {
                        let _ = file.set_modified(now);
                        false
                    }
                    Err(_) => true,
                },
            )
            .copied()
            .collect()
    }

    pub async fn writer(&self, hash: Hash, size: u64) -> Result<ObjectWriter, ObjectError> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{}", to_hex(&hash), rand_suffix()));
        let file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        Ok(ObjectWriter {
            file,
            tmp,
            dest: self.path(&hash),
            hasher: blake3::Hasher::new(),
            expected: hash,
            size,
            written: 0,
        })
    }

    /// Makes verified objects visible: their data reaches the disk before their names do, and
    /// the names before this returns.
    pub fn publish(&self, objects: Vec<Verified>) -> Result<(), ObjectError> {
        if objects.is_empty() {
            return Ok(());
        }
        self.sync_filesystem()?;
        let mut dirs = HashSet::new();
        for object in objects {
            if let Some(dir) = object.dest.parent() {
                if dirs.insert(dir.to_owned()) {
                    std::fs::create_dir_all(dir).map_err(io(dir))?;
                }
            }
            std::fs::rename(&object.tmp, &object.dest).map_err(io(&object.dest))?;
        }
        self.sync_filesystem()
    }

    fn sync_filesystem(&self) -> Result<(), ObjectError> {
        let dir = std::fs::File::open(&self.root).map_err(io(&self.root))?;
        // syncfs flushes every dirty page and inode of this file system in one call.
        let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
        if rc != 0 {
            return Err(ObjectError::Io {
                path: self.root.clone(),
                error: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub async fn open_read(&self, hash: &Hash) -> Result<(tokio::fs::File, u64), ObjectError> {
        let path = self.path(hash);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| ObjectError::NotFound(to_hex(hash)))?;
        let size = file.metadata().await.map_err(io(&path))?.len();
        Ok((file, size))
    }

    /// Every stored object's hash.
    pub fn list(&self) -> Result<Vec<Hash>, ObjectError> {
        let mut hashes = Vec::new();
        for fan in std::fs::read_dir(&self.root)
            .map_err(io(&self.root))?
            .flatten()
        {
            let fan_name = fan.file_name().to_string_lossy().into_owned();
            if fan_name.len() != 2 {
                continue;
            }
            for object in std::fs::read_dir(fan.path())
                .map_err(io(&fan.path()))?
                .flatten()
            {
                let name = format!("{fan_name}{}", object.file_name().to_string_lossy());
                if let Some(hash) = hex::decode(&name).ok().and_then(|b| parse_hash(&b)) {
                    hashes.push(hash);
                }
            }
        }
        Ok(hashes)
    }

    /// Removes objects not in `referenced` that have not been used for `grace`.
    pub fn collect_garbage(
        &self,
        referenced: &HashSet<Hash>,
        grace: Duration,
    ) -> Result<GcReport, ObjectError> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        for hash in self.list()? {
            if referenced.contains(&hash) {
                report.kept += 1;
                continue;
            }
            let path = self.path(&hash);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let idle = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if idle < grace {
                report.spared += 1;
                continue;
            }
            std::fs::remove_file(&path).map_err(io(&path))?;
            report.removed += 1;
            report.removed_bytes += meta.len();
        }
        Ok(report)
    }
}

fn rand_suffix() -> u64 {
    // Distinct names for concurrent uploads of one object; not security-relevant.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .rotate_left(32)
}

impl ObjectWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ObjectError> {
        self.written += data.len() as u64;
        if self.written > self.size {
            return Err(ObjectError::SizeMismatch {
                hash: to_hex(&self.expected),
                expected: self.size,
                got: self.written,
            });
        }
        self.hasher.update(data);
        self.file.write_all(data).await.map_err(io(&self.tmp))
    }

    pub fn remaining(&self) -> u64 {
        self.size - self.written
    }

    /// Checks size and hash; the object becomes visible with [`ObjectStore::publish`].
    pub async fn finish(mut self) -> Result<Verified, ObjectError> {
        self.file.flush().await.map_err(io(&self.tmp))?;
        let result = if self.written != self.size {
            Err(ObjectError::SizeMismatch {
                hash: to_hex(&self.expected),
                expected: self.size,
                got: self.written,
            })
        } else {
            let got = *self.hasher.finalize().as_bytes();
            if got == self.expected {
                Ok(())
            } else {
                Err(ObjectError::HashMismatch {
                    expected: to_hex(&self.expected),
                    got: to_hex(&got),
                })
            }
        };
        match result {
            Ok(()) => Ok(Verified {
                tmp: self.tmp,
                dest: self.dest,
            }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&self.tmp).await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(data: &[u8]) -> Hash {
        *blake3::hash(data).as_bytes()
    }

    async fn put(store: &ObjectStore, data: &[u8]) -> Result<(), ObjectError> {
        let mut writer = store.writer(hash(data), data.len() as u64).await?;
        for chunk in data.chunks(3) {
            writer.write(chunk).await?;
        }
        let verified = writer.finish().await?;
        store.publish(vec![verified])
    }

    #[tokio::test]
    async fn objects_are_visible_only_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        put(&store, b"hello world").await.unwrap();
        assert!(store.contains(&hash(b"hello world")));
        assert_eq!(
            std::fs::read(store.path(&hash(b"hello world"))).unwrap(),
            b"hello world"
        );

        let mut liar = store.writer(hash(b"expected"), 8).await.unwrap();
        liar.write(b"tampered").await.unwrap();
        assert!(matches!(
            liar.finish().await,
            Err(ObjectError::HashMismatch { .. })
        ));
        assert!(!store.contains(&hash(b"expected")));
        let mut short = store.writer(hash(b"abc"), 3).await.unwrap();
        short.write(b"ab").await.unwrap();
        assert!(matches!(
            short.finish().await,
            Err(ObjectError::SizeMismatch { .. })
        ));
        let mut long = store.writer(hash(b"abc"), 3).await.unwrap();
        assert!(matches!(
            long.write(b"abcd").await,
            Err(ObjectError::SizeMismatch { .. })
        ));
        assert_eq!(
            store.missing(&[hash(b"hello world"), hash(b"abc")]),
            vec![hash(b"abc")]
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            1,
            "only the unfinished long write remains"
        );
    }

    #[tokio::test]
    async fn garbage_collection_removes_exactly_the_unreferenced_idle_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        for data in [&b"keep"[..], b"drop", b"young"] {
            put(&store, data).await.unwrap();
        }
        let old = SystemTime::now() - Duration::from_secs(7200);
        for data in [&b"keep"[..], b"drop"] {
            std::fs::File::options()
                .write(true)
                .open(store.path(&hash(data)))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let referenced = HashSet::from([hash(b"keep")]);
        let report = store
            .collect_garbage(&referenced, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            report,
            GcReport {
                kept: 1,
                removed: 1,
                removed_bytes: 4,
                spared: 1
            }
        );
        assert!(
            store.contains(&hash(b"keep"))
                && !store.contains(&hash(b"drop"))
                && store.contains(&hash(b"young"))
        );
    }
}

/// Objects this small travel whole, many to a message.
pub const SMALL_OBJECT: u64 = 64 << 10;
/// Bytes of small objects gathered into one message.
const WHOLE_BATCH_BYTES: usize = 1 << 20;

/// Small objects gathered into one `ObjectChunk.whole` message.
#[derive(Default)]
pub struct WholeBatch {
    objects: Vec<dom_proto::v1::ObjectChunk>,
    bytes: usize,
}

impl WholeBatch {
    /// Adds a whole object; returns a message once the batch is full.
    pub fn add(&mut self, hash: Hash, data: Vec<u8>) -> Option<dom_proto::v1::ObjectChunk> {
        self.bytes += data.len() + 48;
        self.objects.push(dom_proto::v1::ObjectChunk {
            hash: hash.to_vec(),
            size: data.len() as u64,
            data,
            whole: Vec::new(),
        });
        (self.bytes >= WHOLE_BATCH_BYTES)
            .then(|| self.take())
            .flatten()
    }

    /// The gathered objects as one message, if any.
    pub fn take(&mut self) -> Option<dom_proto::v1::ObjectChunk> {
        self.bytes = 0;
        (!self.objects.is_empty()).then(|| dom_proto::v1::ObjectChunk {
            whole: std::mem::take(&mut self.objects),
            ..Default::default()
        })
    }
}
