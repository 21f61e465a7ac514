//! Opening a replica's sled database, and making its writes truly durable.
//!
//! sled's own `flush` ends in `sync_file_range`, which does not flush the disk's write cache
//! and does not sync the blob files sled keeps for large values (sled issues #1351, #1452).
//! Raft's promises (a granted vote and an acknowledged append survive power loss) need more,
//! so [`Durable::sync`] follows sled's flush with `fdatasync` of the data file and of any new
//! blob file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("data dir {0} is in use by another process (is another domd running on it?)")]
    Locked(PathBuf),
    // Errors carry their cause in the message rather than as a `source`, so the one line a
    // binary prints does not repeat it.
    #[error("sled: {0}")]
    Sled(sled::Error),
    #[error("I/O on {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("corrupt record {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("data dir was written by an incompatible format version {found} (this build reads {expected})")]
    Format { found: u32, expected: u32 },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("storage task stopped: {0}")]
    Task(String),
}

/// Runs blocking storage work on tokio's blocking threads, so that file I/O and long folds
/// never hold a runtime thread (and the Raft tasks on it).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e)
    }
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |error| StoreError::Io { path, error }
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain types into a Vec cannot fail.
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap_or_default()
}

pub fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|e| StoreError::corrupt(what, e))
}

/// Makes the entries of `dir` (files created, renamed or removed there) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}

/// An open sled database plus what is needed to make its writes reach the disk.
pub struct Durable {
    pub db: sled::Db,
    path: PathBuf,
    data_file: File,
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl Durable {
    pub fn open(path: &Path) -> Result<Durable, StoreError> {
        std::fs::create_dir_all(path).map_err(StoreError::io(path))?;
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(path.to_owned())
                }
                other => StoreError::Sled(other),
            })?;
        let data_path = path.join("db");
        let data_file = File::open(&data_path).map_err(StoreError::io(&data_path))?;
        Ok(Durable {
            db,
            path: path.to_owned(),
            data_file,
            synced_blobs: Mutex::new(HashSet::new()),
        })
    }

    /// Blocks until everything written so far is on stable storage.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.data_file
            .sync_data()
            .map_err(StoreError::io(self.path.join("db")))?;
        let blobs = self.path.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return Ok(());
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut any_new = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if synced.contains(&name) {
                continue;
            }
            let path = entry.path();
            // A blob may be removed by sled between listing and opening; that one needs no sync.
            if let Ok(file) = File::open(&path) {
                file.sync_data().map_err(StoreError::io(&path))?;
            }
            synced.insert(name);
            any_new = true;
        }
        if any_new {
            File::open(&blobs)
                .and_then(|d| d.sync_all())
                .map_err(StoreError::io(&blobs))?;
        }
        Ok(())
    }

    /// Bytes sled occupies on disk, for status pages and size regressions.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
