//! The Raft log's entries on disk: append-only segment files, synced once per group of appends.
//!
//! In sled, every append paid sled's own flush (its I/O threads, a `sync_file_range` that waits
//! for the write) and then the `fdatasync` that makes it durable, and the flush also carried
//! every state-machine write made since the last one: on the writes bench, sled's threads were
//! 20-40% of a replica's CPU. Here an append is one positioned write into the page cache, done
//! at once so the entries can be read back for replication, and the `fdatasync` that makes it
//! durable runs on a thread of its own, which syncs once for every append that arrived while
//! the previous sync ran (group commit) and then completes their callbacks in order.
//!
//! Layout: `<first index, 20 digits>.wal` files, each starting with the magic `DOMRLOG1`, then
//! one frame per entry: `payload length: u32 LE`, `crc32 of index and payload: u32 LE`,
//! `index: u64 LE`, payload (the entry's bincode). Indexes run on without gaps within a
//! segment; a segment takes no more appends once it passes [`SEGMENT_BYTES`]. A frame that
//! does not check at the end of the last segment is the torn tail of a crash and is cut at
//! open: nothing past it was acknowledged, since its sync never completed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::durable::{sync_dir, StoreError};
use crate::journal_store::list_segments;

const MAGIC: &[u8; 8] = b"DOMRLOG1";
/// A segment takes no more entries once it is this large.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Length, checksum and index before each payload.
const FRAME_HEAD: usize = 4 + 4 + 8;
/// A payload larger than this is corruption, not data.
const MAX_PAYLOAD: u32 = 256 << 20;

/// What the sync thread calls once an append is durable, or failed to be.
pub type Synced = Box<dyn FnOnce(io::Result<()>) + Send>;

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.wal"))
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&index.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

fn frame(index: u64, payload: &[u8], out: &mut Vec<u8>) {
    // Entries are bounded far below 4 GiB by the proposer's batch limit.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(index, payload).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Where an entry's frame is.
#[derive(Debug, Clone, Copy)]
struct Location {
    /// The first index of its segment.
    segment: u64,
    offset: u64,
    payload: u32,
}

struct Segment {
    first: u64,
    file: Arc<File>,
}

struct Inner {
    /// Ascending by first index; the last takes appends.
    segments: Vec<Segment>,
    /// Bytes of the last segment.
    len: u64,
    /// Entries held past the purge point, by index. Raft keeps them gapless; openraft's own
    /// storage suite does not, and a gap just starts a new segment.
    locations: BTreeMap<u64, Location>,
}

impl Inner {
    fn last_index(&self) -> Option<u64> {
        self.locations.last_key_value().map(|(index, _)| *index)
    }

    fn segment(&self, first: u64) -> Option<&Arc<File>> {
        self.segments
            .iter()
            .find(|s| s.first == first)
            .map(|s| &s.file)
    }
}

/// The Raft log's segment files.
pub struct RaftWal {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    sync: mpsc::Sender<(Arc<File>, Synced)>,
}

/// Reads a segment's frames from its start: the entries (index, offset, payload length) up to
/// the first frame that does not check, and the bytes they end at.
fn scan_segment(path: &Path, first: u64) -> Result<(Vec<Location>, u64), StoreError> {
    let file = File::open(path).map_err(StoreError::io(path))?;
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic).map_err(StoreError::io(path))?;
    if &magic != MAGIC {
        return Err(StoreError::corrupt(
            format!("raft log segment {}", path.display()),
            "not a raft log segment",
        ));
    }
    let mut found = Vec::new();
    let mut offset = MAGIC.len() as u64;
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; FRAME_HEAD];
        if input.read_exact(&mut head).is_err() {
            return Ok((found, offset));
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let index = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        if len > MAX_PAYLOAD || index != first + found.len() as u64 {
            return Ok((found, offset));
        }
        payload.resize(len as usize, 0);
        if input.read_exact(&mut payload).is_err() || checksum(index, &payload) != crc {
            return Ok((found, offset));
        }
        found.push(Location {
            segment: first,
            offset,
            payload: len,
        });
        offset += (FRAME_HEAD + payload.len()) as u64;
    }
}

fn open_segment(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(StoreError::io(path))
}

impl RaftWal {
    /// Opens the segments in `dir` (creating it), cutting a torn tail. Entries at or below
    /// `purged` are not held any more, though the first segment may still contain some.
    pub fn open(dir: &Path, purged: Option<u64>) -> Result<RaftWal, StoreError> {
        Self::open_with(dir, purged, SEGMENT_BYTES)
    }

    /// As [`RaftWal::open`], with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(
        dir: &Path,
        purged: Option<u64>,
        segment_bytes: u64,
    ) -> Result<RaftWal, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let firsts = list_segments(dir, "wal")?;
        let mut inner = Inner {
            segments: Vec::new(),
            len: 0,
            locations: BTreeMap::new(),
        };
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first);
            let last = i + 1 == firsts.len();
            let size = std::fs::metadata(&path)
                .map_err(StoreError::io(&path))?
                .len();
            // A crash between creating the last segment and writing its magic.
            if last && size < MAGIC.len() as u64 {
                std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
                break;
            }
            let (found, valid) = scan_segment(&path, first)?;
            let file = open_segment(&path)?;
            if valid < size {
                if !last {
                    // A segment is synced whole before the next one is created.
                    return Err(StoreError::corrupt(
                        format!("raft log segment {}", path.display()),
                        format!("a bad frame at byte {valid} of {size}"),
                    ));
                }
                tracing::warn!(segment = %path.display(), "cutting a torn raft log frame");
                file.set_len(valid).map_err(StoreError::io(&path))?;
                file.sync_data().map_err(StoreError::io(&path))?;
            }
            if inner.last_index().is_some_and(|last| first <= last) {
                return Err(StoreError::corrupt(
                    format!("raft log segment {}", path.display()),
                    "it overlaps the segment before it",
                ));
            }
            for (k, location) in found.into_iter().enumerate() {
                let index = first + k as u64;
                if purged.is_none_or(|p| index > p) {
                    inner.locations.insert(index, location);
                }
            }
            inner.segments.push(Segment {
                first,
                file: Arc::new(file),
            });
            inner.len = valid;
        }
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_loop(receiver))
            .map_err(StoreError::io(dir))?;
        Ok(RaftWal {
            dir: dir.to_owned(),
            segment_bytes,
            inner: Mutex::new(inner),
            sync: sender,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first and last index held.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let inner = self.inner();
        let first = inner.locations.first_key_value().map(|(index, _)| *index)?;
        inner.last_index().map(|last| (first, last))
    }

    /// Starts a segment whose first entry is `first`, after syncing the one before it whole.
    fn roll(&self, inner: &mut Inner, first: u64) -> Result<(), StoreError> {
        if let Some(last) = inner.segments.last() {
            last.file
                .sync_data()
                .map_err(StoreError::io(segment_path(&self.dir, last.first)))?;
        }
        let path = segment_path(&self.dir, first);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        file.write_all_at(MAGIC, 0).map_err(StoreError::io(&path))?;
        sync_dir(&self.dir)?;
        inner.segments.push(Segment {
            first,
            file: Arc::new(file),
        });
        inner.len = MAGIC.len() as u64;
        Ok(())
    }

    /// Writes entries `(index, payload)`, which must follow the last one held (or, with none
    /// held, start anywhere after the purge point), to the OS; `synced` is called once they
    /// are on stable storage. They can be read back at once.
    pub fn append(
        &self,
        entries: impl IntoIterator<Item = (u64, Vec<u8>)>,
        synced: Synced,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let mut buffer = Vec::new();
        let mut added = Vec::new();
        let mut start: Option<u64> = None;
        let mut next: Option<u64> = None;
        for (index, payload) in entries {
            if next.is_some_and(|n| n != index) {
                return Err(StoreError::corrupt(
                    "raft log append",
                    format!("entry {index} in a batch after entry {next:?}"),
                ));
            }
            start.get_or_insert(index);
            next = Some(index + 1);
            added.push((buffer.len() as u64, payload.len() as u32));
            frame(index, &payload, &mut buffer);
        }
        let Some(start) = start else {
            drop(inner);
            synced(Ok(()));
            return Ok(());
        };
        // An append over held entries replaces them, as a Raft conflict does.
        if inner.last_index().is_some_and(|last| start <= last) {
            self.cut_from(&mut inner, start)?;
        }
        if inner.locations.is_empty() {
            // What the segments still hold was purged; they would only be in the way.
            self.remove_segments(&mut inner, usize::MAX)?;
        }
        // A segment's indexes run on without gaps; after a gap (or with nothing held) the
        // entries start a segment of their own.
        let follows = inner.last_index().is_some_and(|last| start == last + 1);
        if !follows || inner.len >= self.segment_bytes {
            self.roll(&mut inner, start)?;
        }
        let Some(segment) = inner.segments.last() else {
            return Err(StoreError::corrupt("raft log", "no segment to append to"));
        };
        let (first, file) = (segment.first, segment.file.clone());
        let at = inner.len;
        file.write_all_at(&buffer, at)
            .map_err(StoreError::io(segment_path(&self.dir, first)))?;
        inner.len += buffer.len() as u64;
        for (k, (offset, payload)) in added.into_iter().enumerate() {
            let location = Location {
                segment: first,
                offset: at + offset,
                payload,
            };
            inner.locations.insert(start + k as u64, location);
        }
        drop(inner);
        self.sync
            .send((file, synced))
            .map_err(|_| StoreError::corrupt("raft log", "the sync thread has stopped"))?;
        Ok(())
    }

    /// Payloads of the entries held in `from..to`, in order.
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let wanted: Vec<(u64, Location, Arc<File>)> = {
            let inner = self.inner();
            if from >= to {
                return Ok(Vec::new());
            }
            inner
                .locations
                .range(from..to)
                .filter_map(|(index, location)| {
                    Some((*index, *location, inner.segment(location.segment)?.clone()))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(wanted.len());
        for (index, location, file) in wanted {
            let path = || segment_path(&self.dir, location.segment);
            let mut bytes = vec![0u8; FRAME_HEAD + location.payload as usize];
            file.read_exact_at(&mut bytes, location.offset)
                .map_err(StoreError::io(path()))?;
            let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            let payload = bytes.split_off(FRAME_HEAD);
            if checksum(index, &payload) != crc {
                return Err(StoreError::corrupt(
                    format!("raft log entry {index}"),
                    "checksum mismatch",
                ));
            }
            out.push((index, payload));
        }
        Ok(out)
    }

    /// Removes the entries from `index` on, durably.
    pub fn truncate(&self, index: u64) -> Result<(), StoreError> {
        let mut inner = self.inner();
        self.cut_from(&mut inner, index)
    }

    fn cut_from(&self, inner: &mut Inner, index: u64) -> Result<(), StoreError> {
        let Some((_, cut)) = inner.locations.range(index..).next().map(|(i, l)| (*i, *l)) else {
            return Ok(());
        };
        inner.locations.split_off(&index);
        while inner.segments.last().is_some_and(|s| s.first > cut.segment) {
            if let Some(segment) = inner.segments.pop() {
                let path = segment_path(&self.dir, segment.first);
                std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
            }
        }
        if let Some(segment) = inner.segments.last() {
            let path = segment_path(&self.dir, segment.first);
            if cut.offset <= MAGIC.len() as u64 {
                // Emptied: the next append may start a segment of that name again.
                std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
                inner.segments.pop();
            } else {
                segment
                    .file
                    .set_len(cut.offset)
                    .and_then(|()| segment.file.sync_data())
                    .map_err(StoreError::io(&path))?;
            }
        }
        inner.len = match inner.segments.last() {
            Some(segment) => segment
                .file
                .metadata()
                .map_err(StoreError::io(segment_path(&self.dir, segment.first)))?
                .len(),
            None => 0,
        };
        sync_dir(&self.dir)
    }

    /// Removes the first `count` segments (all, for `usize::MAX`).
    fn remove_segments(&self, inner: &mut Inner, count: usize) -> Result<(), StoreError> {
        let count = count.min(inner.segments.len());
        if count == 0 {
            return Ok(());
        }
        for segment in inner.segments.drain(..count) {
            let path = segment_path(&self.dir, segment.first);
            std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
        }
        if inner.segments.is_empty() {
            inner.len = 0;
        }
        sync_dir(&self.dir)
    }

    /// Forgets the entries up to `index` and removes the segments that hold nothing else. The
    /// caller has made the purge point durable first.
    pub fn purge(&self, index: u64) -> Result<(), StoreError> {
        let mut inner = self.inner();
        inner.locations = inner.locations.split_off(&(index + 1));
        // A segment's entries all lie below the next segment's first index, so a segment can
        // go once the next starts at or below the first entry kept; all can go once none is.
        let count = if inner.locations.is_empty() {
            usize::MAX
        } else {
            inner
                .segments
                .windows(2)
                .take_while(|pair| pair[1].first <= index + 1)
                .count()
        };
        self.remove_segments(&mut inner, count)
    }
}

/// Syncs once for every append that is waiting, then completes them in order.
fn sync_loop(requests: mpsc::Receiver<(Arc<File>, Synced)>) {
    while let Ok(first) = requests.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        let mut failed: Option<(io::ErrorKind, String)> = None;
        let mut synced: Vec<*const File> = Vec::new();
        for (file, _) in &waiting {
            let ptr = Arc::as_ptr(file);
            if synced.contains(&ptr) {
                continue;
            }
            synced.push(ptr);
            if let Err(e) = file.sync_data() {
                failed.get_or_insert((e.kind(), e.to_string()));
            }
        }
        for (_, done) in waiting {
            done(match &failed {
                None => Ok(()),
                Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(index: u64) -> Vec<u8> {
        format!("entry {index} ")
            .repeat(1 + index as usize % 7)
            .into_bytes()
    }

    fn append(wal: &RaftWal, indexes: std::ops::RangeInclusive<u64>) {
        let (done, synced) = mpsc::channel();
        wal.append(
            indexes.map(|i| (i, payload(i))),
            Box::new(move |r| done.send(r).unwrap()),
        )
        .unwrap();
        synced.recv().unwrap().unwrap();
    }

    fn held(wal: &RaftWal) -> Vec<u64> {
        let read = wal.read(0, u64::MAX).unwrap();
        for (index, bytes) in &read {
            assert_eq!(bytes, &payload(*index), "entry {index}");
        }
        read.into_iter().map(|(i, _)| i).collect()
    }

    fn segments(dir: &Path) -> Vec<u64> {
        list_segments(dir, "wal").unwrap()
    }

    #[test]
    fn entries_survive_reopen_across_segments() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let wal = RaftWal::open_with(dir.path(), None, 256).unwrap();
            for i in 1..=40 {
                append(&wal, i..=i);
            }
            assert_eq!(held(&wal), (1..=40).collect::<Vec<_>>());
            assert_eq!(wal.read(10, 13).unwrap().len(), 3);
        }
        assert!(segments(dir.path()).len() > 3, "small segments roll over");
        let wal = RaftWal::open_with(dir.path(), None, 256).unwrap();
        assert_eq!(held(&wal), (1..=40).collect::<Vec<_>>());
        assert_eq!(wal.bounds(), Some((1, 40)));
        append(&wal, 41..=45);
        assert_eq!(wal.bounds(), Some((1, 45)));
    }

    #[test]
    fn a_torn_or_damaged_tail_is_cut_at_open() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let wal = RaftWal::open(dir.path(), None).unwrap();
            append(&wal, 1..=10);
        }
        let last = segment_path(dir.path(), *segments(dir.path()).last().unwrap());
        let size = std::fs::metadata(&last).unwrap().len();
        // Half of the last frame: a crash in the middle of a write.
        let file = OpenOptions::new().write(true).open(&last).unwrap();
        file.set_len(size - 5).unwrap();
        drop(file);
        let wal = RaftWal::open(dir.path(), None).unwrap();
        assert_eq!(held(&wal), (1..=9).collect::<Vec<_>>());
        append(&wal, 10..=12);
        drop(wal);
        // A flipped byte in the last frame's payload fails its checksum.
        let size = std::fs::metadata(&last).unwrap().len();
        let file = OpenOptions::new().write(true).open(&last).unwrap();
        file.write_all_at(&[0xff], size - 2).unwrap();
        drop(file);
        let wal = RaftWal::open(dir.path(), None).unwrap();
        assert_eq!(held(&wal), (1..=11).collect::<Vec<_>>());
    }

    #[test]
    fn damage_before_the_last_segment_is_refused() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let wal = RaftWal::open_with(dir.path(), None, 128).unwrap();
            for i in 1..=20 {
                append(&wal, i..=i);
            }
        }
        let first = segment_path(dir.path(), segments(dir.path())[0]);
        let size = std::fs::metadata(&first).unwrap().len();
        let file = OpenOptions::new().write(true).open(&first).unwrap();
        file.write_all_at(&[0xff], size - 1).unwrap();
        drop(file);
        match RaftWal::open_with(dir.path(), None, 128) {
            Err(StoreError::Corrupt { .. }) => {}
            Err(other) => panic!("expected corruption, got {other}"),
            Ok(_) => panic!("a damaged segment was accepted"),
        }
    }

    #[test]
    fn truncate_and_overwrite_cut_across_segments() {
        let dir = tempfile::TempDir::new().unwrap();
        let wal = RaftWal::open_with(dir.path(), None, 200).unwrap();
        for i in 1..=30 {
            append(&wal, i..=i);
        }
        wal.truncate(12).unwrap();
        assert_eq!(held(&wal), (1..=11).collect::<Vec<_>>());
        append(&wal, 12..=14);
        // An append over held entries replaces them.
        append(&wal, 13..=13);
        assert_eq!(held(&wal), (1..=13).collect::<Vec<_>>());
        drop(wal);
        let wal = RaftWal::open_with(dir.path(), None, 200).unwrap();
        assert_eq!(held(&wal), (1..=13).collect::<Vec<_>>());
        wal.truncate(1).unwrap();
        assert_eq!(wal.bounds(), None);
        assert!(segments(dir.path()).is_empty());
        append(&wal, 1..=2);
        assert_eq!(held(&wal), vec![1, 2]);
    }

    #[test]
    fn purge_removes_whole_segments_and_reopen_skips_the_rest() {
        let dir = tempfile::TempDir::new().unwrap();
        let wal = RaftWal::open_with(dir.path(), None, 200).unwrap();
        for i in 1..=30 {
            append(&wal, i..=i);
        }
        let before = segments(dir.path());
        wal.purge(17).unwrap();
        assert_eq!(held(&wal), (18..=30).collect::<Vec<_>>());
        let after = segments(dir.path());
        assert!(after.len() < before.len());
        assert!(after[0] <= 18, "the segment holding 18 stays");
        drop(wal);
        let wal = RaftWal::open_with(dir.path(), Some(17), 200).unwrap();
        assert_eq!(held(&wal), (18..=30).collect::<Vec<_>>());
        // Purged past the end (a snapshot ahead of this log): the next entry starts afresh.
        wal.purge(40).unwrap();
        assert_eq!(wal.bounds(), None);
        assert!(segments(dir.path()).is_empty());
        append(&wal, 41..=42);
        drop(wal);
        let wal = RaftWal::open_with(dir.path(), Some(40), 200).unwrap();
        assert_eq!(held(&wal), vec![41, 42]);
    }

    #[test]
    fn appends_waiting_for_a_sync_complete_in_order() {
        let dir = tempfile::TempDir::new().unwrap();
        let wal = RaftWal::open(dir.path(), None).unwrap();
        let (done, synced) = mpsc::channel();
        for i in 1..=200u64 {
            let done = done.clone();
            wal.append(
                [(i, payload(i))],
                Box::new(move |r| done.send((i, r.is_ok())).unwrap()),
            )
            .unwrap();
        }
        let order: Vec<(u64, bool)> = (0..200).map(|_| synced.recv().unwrap()).collect();
        assert_eq!(order, (1..=200).map(|i| (i, true)).collect::<Vec<_>>());
    }
}
