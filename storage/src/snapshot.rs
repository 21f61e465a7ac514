//! The snapshot file: a replica's whole applied state, streamed, never held in memory whole.
//!
//! Layout: the magic `DOMSNAP1`, then frames of `tag: u8, length: u32 BE, payload`:
//! one header, the fleet state's records as (key, value) pairs, every journal record from 1 to
//! the head, and an end frame holding blake3 of all bytes before it. The journal travels whole
//! because it is the audit trail: a replica that catches up by snapshot must end with all of
//! history, not just the state it folds to.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::durable::StoreError;
use crate::journal::JournalHead;
use crate::types::{LogId, StoredMembership};

const MAGIC: &[u8; 8] = b"DOMSNAP1";
const HEADER: u8 = 1;
const STATE: u8 = 2;
const JOURNAL: u8 = 3;
const END: u8 = 0xff;
/// A frame larger than this is corruption, not data.
const MAX_FRAME: u32 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub journal: JournalHead,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Header(SnapshotHeader),
    /// An encoded `StateKey` and its value.
    State(Vec<u8>, Vec<u8>),
    /// A journal index and the record as stored.
    Journal(u64, Vec<u8>),
}

pub struct SnapshotWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(mut out: W, header: &SnapshotHeader) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(MAGIC);
        let mut writer = SnapshotWriter { out, hasher };
        writer.frame(HEADER, &[&crate::durable::encode(header)])?;
        Ok(writer)
    }

    fn frame(&mut self, tag: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io::Error::other("frame too large"))?;
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_be_bytes());
        self.hasher.update(&head);
        self.out.write_all(&head)?;
        for part in parts {
            self.hasher.update(part);
            self.out.write_all(part)?;
        }
        Ok(())
    }

    pub fn state(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let key_len = (key.len() as u32).to_be_bytes();
        self.frame(STATE, &[&key_len, key, value])
    }

    pub fn journal(&mut self, index: u64, record: &[u8]) -> io::Result<()> {
        self.frame(JOURNAL, &[&index.to_be_bytes(), record])
    }

    pub fn finish(mut self) -> io::Result<W> {
        let digest = *self.hasher.finalize().as_bytes();
        let mut head = [0u8; 5];
        head[0] = END;
        head[1..].copy_from_slice(&32u32.to_be_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads frames, checking the end digest before reporting the end.
pub struct SnapshotReader<R: Read> {
    input: R,
    hasher: blake3::Hasher,
    done: bool,
}

fn bad(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Snapshot(detail.to_string())
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(mut input: R) -> Result<Self, StoreError> {
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|e| bad(format!("reading magic: {e}")))?;
        if &magic != MAGIC {
            return Err(bad("not a dom snapshot (bad magic)"));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(MAGIC);
        Ok(SnapshotReader {
            input,
            hasher,
            done: false,
        })
    }

    pub fn into_inner(self) -> R {
        self.input
    }

    /// The next frame, or `None` after a verified end frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; 5];
        self.input
            .read_exact(&mut head)
            .map_err(|e| bad(format!("truncated: {e}")))?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_FRAME {
            return Err(bad(format!("frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        self.input
            .read_exact(&mut payload)
            .map_err(|e| bad(format!("truncated: {e}")))?;
        if head[0] == END {
            if payload != self.hasher.finalize().as_bytes() {
                return Err(bad("checksum mismatch"));
            }
            self.done = true;
            return Ok(None);
        }
        self.hasher.update(&head);
        self.hasher.update(&payload);
        let frame = match head[0] {
            HEADER => Frame::Header(crate::durable::decode("snapshot header", &payload)?),
            STATE => {
                let (len, rest) = payload
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad("short state frame"))?;
                let key_len = u32::from_be_bytes(*len) as usize;
                if key_len > rest.len() {
                    return Err(bad("state key overruns its frame"));
                }
                let (key, value) = rest.split_at(key_len);
                Frame::State(key.to_vec(), value.to_vec())
            }
            JOURNAL => {
                let (index, record) = payload
                    .split_first_chunk::<8>()
                    .ok_or_else(|| bad("short journal frame"))?;
                Frame::Journal(u64::from_be_bytes(*index), record.to_vec())
            }
            tag => return Err(bad(format!("unknown frame tag {tag}"))),
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = SnapshotHeader {
            last_applied: None,
            membership: Default::default(),
            journal: JournalHead::default(),
        };
        let mut w = SnapshotWriter::new(Vec::new(), &header).unwrap();
        w.state(b"k", b"v").unwrap();
        w.journal(1, b"rec").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let bytes = sample();
        let mut r = SnapshotReader::new(bytes.as_slice()).unwrap();
        assert!(matches!(r.next_frame().unwrap(), Some(Frame::Header(_))));
        assert_eq!(
            r.next_frame().unwrap(),
            Some(Frame::State(b"k".to_vec(), b"v".to_vec()))
        );
        assert_eq!(
            r.next_frame().unwrap(),
            Some(Frame::Journal(1, b"rec".to_vec()))
        );
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn corruption_and_truncation_are_refused() {
        let bytes = sample();
        let read_all = |b: &[u8]| -> Result<(), StoreError> {
            let mut r = SnapshotReader::new(b)?;
            while r.next_frame()?.is_some() {}
            Ok(())
        };
        assert!(read_all(&bytes).is_ok());
        assert!(read_all(&bytes[..bytes.len() - 1]).is_err());
        let mut flipped = bytes.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 1;
        assert!(read_all(&flipped).is_err());
    }
}
