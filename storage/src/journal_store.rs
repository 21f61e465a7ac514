//! The journal on disk: append-only segment files beside sled.
//!
//! The journal is written once, never changed, read front to back (replay, verify, snapshots)
//! and kept for ever. As one sled key per record it cost a third sled insert per event on
//! every replica, a page rebuild per record on a cold read, and an open time that grew with
//! history; as segment files a cold replay is a sequential read and opening costs one segment.
//!
//! Layout: `<first index, 20 digits>.seg` files, each starting with the magic `DOMJRNL1`, then
//! one frame per record: `body length: u32 LE`, then the body: `log index: u64 LE`, the chain
//! `hash` (32 bytes) and the event bytes. A record's index is its segment's first index plus
//! its position there; a segment takes no more appends once it passes [`SEGMENT_BYTES`].
//! Every [`BLOCK`]th record's [`Position`] is kept by the state machine in sled, with the
//! records it was appended with, so a read from any index starts at most a block away.
//!
//! The state machine writes a batch's records here (to the OS, not synced) before the sled
//! batch that moves its journal head, so after a crash of the process the files hold at least
//! what sled's head says, and records past the head are cut when the store opens. A power loss
//! may leave the files behind sled instead; see `StateMachineStore::open` for how that is
//! recovered. The files are synced before a snapshot is built, as the Raft log may then be
//! purged behind it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::durable::StoreError;
use crate::event::Hash;
use crate::journal::JournalRecord;

const MAGIC: &[u8; 8] = b"DOMJRNL1";
/// A segment takes no more records once it is this large.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Records between two kept positions.
pub const BLOCK: u64 = 1024;
/// Bytes of a frame's body before the event: log index and hash.
const BODY_HEAD: usize = 8 + 32;
/// A frame larger than this is corruption, not data.
const MAX_BODY: u32 = 256 << 20;
/// Appended frames are written to the OS at least this often (in bytes), and always by
/// [`JournalStore::flush`].
const WRITE_AT: usize = 1 << 20;
/// Read buffers: large for scans, small for reads of a few records (a point read starts at
/// most a block of records before the one it wants).
const SCAN_BUFFER: usize = 1 << 20;
const POINT_BUFFER: usize = 64 << 10;

/// Where a record's frame starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The first index of the segment holding it.
    pub segment: u64,
    pub offset: u64,
}

/// The block whose kept position a read from `index` starts at.
pub fn block_of(index: u64) -> u64 {
    index.saturating_sub(1) / BLOCK
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The segment files in `dir` named `<first index>.<extension>`, by first index: the journal's
/// and the Raft log's.
pub(crate) fn list_segments(dir: &Path, extension: &str) -> Result<Vec<u64>, StoreError> {
    let suffix = format!(".{extension}");
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StoreError::io(dir))? {
        let name = entry.map_err(StoreError::io(dir))?.file_name();
        if let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(suffix.as_str()))
            .and_then(|n| n.parse::<u64>().ok())
        {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

fn frame(log_index: u64, hash: &Hash, event: &[u8], out: &mut Vec<u8>) {
    let body = BODY_HEAD + event.len();
    // Events are bounded far below 4 GiB by the API; a larger one would be corruption.
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&log_index.to_le_bytes());
    out.extend_from_slice(hash);
    out.extend_from_slice(event);
}

/// Reads one frame; `Ok(None)` at a clean end of the segment, `Err` with `UnexpectedEof` for
/// a frame cut short (the torn tail of a crash), `InvalidData` for a length that cannot be.
fn read_frame(input: &mut impl Read) -> io::Result<Option<JournalRecord>> {
    let Some(body) = read_body_len(input)? else {
        return Ok(None);
    };
    let mut head = [0u8; BODY_HEAD];
    input.read_exact(&mut head)?;
    let mut event = vec![0u8; body as usize - BODY_HEAD];
    input.read_exact(&mut event)?;
    let (log_index, hash) = head.split_at(8);
    Ok(Some(JournalRecord {
        log_index: u64::from_le_bytes(log_index.try_into().unwrap_or_default()),
        hash: hash.try_into().unwrap_or_default(),
        event,
    }))
}

/// Skips one frame; false at a clean end of the segment.
fn skip_frame(input: &mut BufReader<File>) -> io::Result<bool> {
    let Some(body) = read_body_len(input)? else {
        return Ok(false);
    };
    input.seek_relative(i64::from(body))?;
    Ok(true)
}

/// A frame's body length; `Ok(None)` at a clean end of the segment.
fn read_body_len(input: &mut impl Read) -> io::Result<Option<u32>> {
    let mut len = [0u8; 4];
    match input.read(&mut len[..1])? {
        0 => return Ok(None),
        _ => input.read_exact(&mut len[1..])?,
    }
    let body = u32::from_le_bytes(len);
    if body > MAX_BODY || (body as usize) < BODY_HEAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {body} bytes"),
        ));
    }
    Ok(Some(body))
}

/// Scans a segment to its end: the number of whole records and the bytes they end at.
fn scan_segment(path: &Path) -> Result<(u64, u64), StoreError> {
    let file = File::open(path).map_err(StoreError::io(path))?;
    let mut input = BufReader::with_capacity(SCAN_BUFFER, file);
    check_magic(&mut input, path)?;
    let mut records = 0;
    let mut valid = MAGIC.len() as u64;
    loop {
        match read_frame(&mut input) {
            Ok(Some(record)) => {
                records += 1;
                valid += (4 + BODY_HEAD + record.event.len()) as u64;
            }
            Ok(None) => return Ok((records, valid)),
            // A frame cut short, or a length that cannot be (zeros where a power loss kept the
            // file's size but not its last pages), is the tail of a write that did not
            // finish: what is before it is whole, and the rest is cut by the caller. (Records
            // the head needs are then missing, and the state machine recovers them.)
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                ) =>
            {
                return Ok((records, valid))
            }
            Err(e) => return Err(StoreError::io(path)(e)),
        }
    }
}

fn check_magic(input: &mut impl Read, path: &Path) -> Result<(), StoreError> {
    let mut magic = [0u8; 8];
    match input.read_exact(&mut magic) {
        Ok(()) if &magic == MAGIC => Ok(()),
        Ok(()) => Err(StoreError::corrupt(
            format!("journal segment {}", path.display()),
            "not a journal segment",
        )),
        Err(e) => Err(StoreError::io(path)(e)),
    }
}

struct Writer {
    /// First index of every segment, ascending; the last one takes appends.
    segments: Vec<u64>,
    file: Option<File>,
    /// Frames appended but not yet written to the file.
    pending: Vec<u8>,
    /// Bytes of the last segment, pending ones included.
    len: u64,
    /// The last index appended.
    end: u64,
    unsynced: bool,
    dir_unsynced: bool,
}

/// The journal's segment files, open for appends by the state machine.
pub struct JournalStore {
    dir: PathBuf,
    writer: Mutex<Writer>,
}

impl JournalStore {
    /// Opens the segments in `dir` (creating it), cutting a torn last frame.
    pub fn open(dir: &Path) -> Result<JournalStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let mut segments = list_segments(dir, "seg")?;
        let mut writer = Writer {
            segments: Vec::new(),
            file: None,
            pending: Vec::new(),
            len: 0,
            end: 0,
            unsynced: false,
            dir_unsynced: false,
        };
        // A crash between creating a segment and writing its magic leaves an empty file.
        while let Some(&last) = segments.last() {
            let path = segment_path(dir, last);
            let size = std::fs::metadata(&path)
                .map_err(StoreError::io(&path))?
                .len();
            if size >= MAGIC.len() as u64 {
                break;
            }
            std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
            segments.pop();
        }
        if let Some(&last) = segments.last() {
            let path = segment_path(dir, last);
            let (records, valid) = scan_segment(&path)?;
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(StoreError::io(&path))?;
            if file.metadata().map_err(StoreError::io(&path))?.len() > valid {
                tracing::warn!(segment = %path.display(), "cutting a torn journal frame");
                file.set_len(valid).map_err(StoreError::io(&path))?;
                file.sync_data().map_err(StoreError::io(&path))?;
            }
            file.seek(SeekFrom::Start(valid))
                .map_err(StoreError::io(&path))?;
            writer.end = last + records - 1;
            writer.len = valid;
            writer.file = Some(file);
        }
        writer.segments = segments;
        Ok(JournalStore {
            dir: dir.to_owned(),
            writer: Mutex::new(writer),
        })
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last index held (0 for none).
    pub fn end(&self) -> u64 {
        self.writer().end
    }

    /// Appends record `index`, which must follow the last. Returns its position when it starts
    /// a block, for the caller to keep with the batch that makes it visible.
    pub fn append(
        &self,
        index: u64,
        log_index: u64,
        hash: &Hash,
        event: &[u8],
    ) -> Result<Option<Position>, StoreError> {
        let mut w = self.writer();
        if index != w.end + 1 {
            return Err(StoreError::corrupt(
                format!("journal append of record {index}"),
                format!("the journal ends at {}", w.end),
            ));
        }
        if w.file.is_none() || w.len >= SEGMENT_BYTES {
            self.start_segment(&mut w, index)?;
        }
        let position = Position {
            segment: *w.segments.last().unwrap_or(&index),
            offset: w.len,
        };
        let before = w.pending.len();
        frame(log_index, hash, event, &mut w.pending);
        w.len += (w.pending.len() - before) as u64;
        w.end = index;
        if w.pending.len() >= WRITE_AT {
            self.write_pending(&mut w)?;
        }
        Ok((index % BLOCK == 1 % BLOCK).then_some(position))
    }

    fn start_segment(&self, w: &mut Writer, first: u64) -> Result<(), StoreError> {
        // Only the last segment is ever left unsynced.
        self.sync_locked(w)?;
        let path = segment_path(&self.dir, first);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        file.write_all(MAGIC).map_err(StoreError::io(&path))?;
        w.segments.push(first);
        w.file = Some(file);
        w.len = MAGIC.len() as u64;
        w.unsynced = true;
        w.dir_unsynced = true;
        Ok(())
    }

    fn write_pending(&self, w: &mut Writer) -> Result<(), StoreError> {
        if w.pending.is_empty() {
            return Ok(());
        }
        let Writer { file, pending, .. } = &mut *w;
        if let Some(file) = file {
            file.write_all(pending).map_err(StoreError::io(&self.dir))?;
        }
        pending.clear();
        w.unsynced = true;
        Ok(())
    }

    /// Hands every appended record to the OS: readers see them, and a crash of the process
    /// no longer loses them.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut w = self.writer();
        self.write_pending(&mut w)
    }

    /// Blocks until every appended record is on stable storage.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut w = self.writer();
        self.sync_locked(&mut w)
    }

    fn sync_locked(&self, w: &mut Writer) -> Result<(), StoreError> {
        self.write_pending(w)?;
        if w.unsynced {
            if let Some(file) = &w.file {
                file.sync_data().map_err(StoreError::io(&self.dir))?;
            }
            w.unsynced = false;
        }
        if w.dir_unsynced {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(StoreError::io(&self.dir))?;
            w.dir_unsynced = false;
        }
        Ok(())
    }

    /// Drops every record after `last`, on disk before it returns.
    pub fn truncate_after(&self, last: u64) -> Result<(), StoreError> {
        let mut w = self.writer();
        if last >= w.end {
            return Ok(());
        }
        self.write_pending(&mut w)?;
        w.file = None;
        while let Some(&first) = w.segments.last() {
            let path = segment_path(&self.dir, first);
            if first > last {
                std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
                w.segments.pop();
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(StoreError::io(&path))?;
            let mut input = BufReader::with_capacity(SCAN_BUFFER, file);
            check_magic(&mut input, &path)?;
            for _ in first..=last {
                if !skip_frame(&mut input).map_err(StoreError::io(&path))? {
                    return Err(StoreError::corrupt(
                        format!("journal segment {}", path.display()),
                        format!("it ends before record {last}"),
                    ));
                }
            }
            let cut = input.stream_position().map_err(StoreError::io(&path))?;
            let mut file = input.into_inner();
            file.set_len(cut).map_err(StoreError::io(&path))?;
            file.seek(SeekFrom::Start(cut))
                .map_err(StoreError::io(&path))?;
            file.sync_data().map_err(StoreError::io(&path))?;
            w.file = Some(file);
            w.len = cut;
            break;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::io(&self.dir))?;
        w.end = last;
        w.unsynced = false;
        Ok(())
    }

    /// Bytes of every segment, appended records included.
    pub fn size_on_disk(&self) -> u64 {
        let w = self.writer();
        let closed: u64 = w.segments[..w.segments.len().saturating_sub(1)]
            .iter()
            .filter_map(|first| std::fs::metadata(segment_path(&self.dir, *first)).ok())
            .map(|m| m.len())
            .sum();
        closed + if w.segments.is_empty() { 0 } else { w.len }
    }

    /// Records `from..=to`, in order, starting the read at `hint` (a kept position of a record
    /// at or before `from`) when there is one. Only records handed to the OS are read: the
    /// caller bounds `to` by what it has flushed.
    pub fn read(&self, from: u64, to: u64, hint: Option<(u64, Position)>) -> Records {
        let from = from.max(1);
        let segments = self.writer().segments.clone();
        Records::new(&self.dir, segments, from, to, hint, true)
    }
}

/// Every whole record in the journal directory `dir`, read only: for tools reading a stopped
/// replica's data dir (or a copy of one). A torn last frame ends the records.
pub fn read_dir(dir: &Path) -> Result<Records, StoreError> {
    let segments = list_segments(dir, "seg")?;
    Ok(Records::new(dir, segments, 1, u64::MAX, None, false))
}

/// An iterator over journal records, reading segment by segment.
pub struct Records {
    dir: PathBuf,
    /// Segments not yet opened, by first index, ascending.
    segments: std::collections::VecDeque<u64>,
    input: Option<(PathBuf, BufReader<File>)>,
    /// The index of the next frame in `input`.
    at: u64,
    from: u64,
    to: u64,
    start: Option<Position>,
    /// Records up to `to` must all be there (a store's reads, bounded by its head), rather
    /// than ending where the files do (a tool's read of a stopped replica).
    strict: bool,
    failed: bool,
}

impl Records {
    fn new(
        dir: &Path,
        segments: Vec<u64>,
        from: u64,
        to: u64,
        hint: Option<(u64, Position)>,
        strict: bool,
    ) -> Records {
        // Start at the last segment that begins at or before `from`, or at the hint when it is
        // closer.
        let first_segment = segments.iter().rev().find(|&&s| s <= from).copied();
        let (start_index, start) = match (hint, first_segment) {
            (Some((index, position)), Some(segment))
                if index <= from && index >= segment && position.segment <= index =>
            {
                (index, Some(position))
            }
            (_, Some(segment)) => (segment, None),
            (_, None) => (from, None),
        };
        let start_segment = start.map(|p| p.segment).unwrap_or(start_index);
        Records {
            dir: dir.to_owned(),
            segments: segments
                .into_iter()
                .filter(|&s| s >= start_segment)
                .collect(),
            input: None,
            at: start_index,
            from,
            to,
            start,
            strict,
            failed: false,
        }
    }

    fn open_next(&mut self) -> Result<bool, StoreError> {
        let Some(first) = self.segments.pop_front() else {
            return Ok(false);
        };
        let path = segment_path(&self.dir, first);
        let file = File::open(&path).map_err(StoreError::io(&path))?;
        let capacity = if self.to.saturating_sub(self.from) < BLOCK {
            POINT_BUFFER
        } else {
            SCAN_BUFFER
        };
        let mut input = BufReader::with_capacity(capacity, file);
        match self.start.take() {
            Some(position) if position.segment == first => {
                input
                    .seek(SeekFrom::Start(position.offset))
                    .map_err(StoreError::io(&path))?;
            }
            _ => {
                check_magic(&mut input, &path)?;
                if first != self.at {
                    return Err(StoreError::corrupt(
                        format!("journal segment {}", path.display()),
                        format!("it starts at record {first}, where {} was next", self.at),
                    ));
                }
            }
        }
        self.input = Some((path, input));
        Ok(true)
    }

    fn step(&mut self) -> Result<Option<(u64, JournalRecord)>, StoreError> {
        loop {
            if self.at > self.to {
                return Ok(None);
            }
            if self.input.is_none() && !self.open_next()? {
                return self.ended();
            }
            let Some((path, input)) = self.input.as_mut() else {
                return self.ended();
            };
            if self.at < self.from {
                match skip_frame(input) {
                    Ok(true) => self.at += 1,
                    Ok(false) => self.input = None,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return self.ended(),
                    Err(e) => return Err(StoreError::io(path.clone())(e)),
                }
                continue;
            }
            match read_frame(input) {
                Ok(Some(record)) => {
                    let index = self.at;
                    self.at += 1;
                    return Ok(Some((index, record)));
                }
                Ok(None) => self.input = None,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return self.ended(),
                Err(e) => return Err(StoreError::io(path.clone())(e)),
            }
        }
    }

    fn ended(&mut self) -> Result<Option<(u64, JournalRecord)>, StoreError> {
        if self.strict && self.at <= self.to {
            return Err(StoreError::corrupt(
                format!("journal record {}", self.at),
                "missing from the journal files",
            ));
        }
        Ok(None)
    }
}

impl Iterator for Records {
    type Item = Result<(u64, JournalRecord), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.step().transpose();
        if matches!(item, Some(Err(_))) {
            self.failed = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::JournalHead;

    fn append_n(store: &JournalStore, head: &mut JournalHead, n: u64) -> Vec<(u64, Position)> {
        let mut kept = Vec::new();
        for _ in 0..n {
            let event = format!("event {}", head.index + 1).into_bytes();
            let next = head.next(&event);
            if let Some(p) = store
                .append(next.index, next.index + 100, &next.hash, &event)
                .unwrap()
            {
                kept.push((next.index, p));
            }
            *head = next;
        }
        store.flush().unwrap();
        kept
    }

    fn indexes(records: Records) -> Vec<u64> {
        records.map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn records_read_back_in_order_from_any_index_with_or_without_a_kept_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = JournalStore::open(dir.path()).unwrap();
        let mut head = JournalHead::default();
        let kept = append_n(&store, &mut head, 3000);
        assert_eq!(kept.len(), 3, "records 1, 1025 and 2049 start blocks");
        let all: Vec<_> = store.read(1, 3000, None).map(|r| r.unwrap()).collect();
        assert_eq!(all.len(), 3000);
        assert_eq!(
            crate::journal::verify(JournalHead::default(), all.iter().map(|(i, r)| (*i, r))),
            Ok(head)
        );
        assert_eq!(all[41].1.log_index, 142);
        assert_eq!(all[41].1.event, b"event 42");
        for from in [1, 2, 1024, 1025, 1500, 2999, 3000] {
            let hint = kept.iter().rev().find(|(i, _)| *i <= from).copied();
            let to = (from + 9).min(3000);
            assert_eq!(
                indexes(store.read(from, to, hint)),
                (from..=to).collect::<Vec<_>>(),
                "from {from}"
            );
            assert_eq!(indexes(store.read(from, from, None)), vec![from]);
        }
        // A read past the end of what a store holds is an error, not a silent stop.
        assert!(store.read(2990, 3001, None).last().unwrap().is_err());
        assert_eq!(indexes(read_dir(dir.path()).unwrap()).len(), 3000);
    }

    #[test]
    fn reopening_finds_the_end_and_cuts_a_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut head = JournalHead::default();
        {
            let store = JournalStore::open(dir.path()).unwrap();
            append_n(&store, &mut head, 10);
        }
        let segment = segment_path(dir.path(), 1);
        let whole = std::fs::metadata(&segment).unwrap().len();
        // Half a frame, as a crash in the middle of a write leaves it.
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[60, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);
        assert_eq!(indexes(read_dir(dir.path()).unwrap()).len(), 10);
        let store = JournalStore::open(dir.path()).unwrap();
        assert_eq!(store.end(), 10);
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), whole);
        append_n(&store, &mut head, 5);
        let all: Vec<_> = store.read(1, 15, None).map(|r| r.unwrap()).collect();
        assert_eq!(
            crate::journal::verify(JournalHead::default(), all.iter().map(|(i, r)| (*i, r))),
            Ok(head)
        );
    }

    #[test]
    fn truncation_drops_later_records_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = JournalStore::open(dir.path()).unwrap();
        let mut head = JournalHead::default();
        // Large events, so that segments roll.
        let big = vec![7u8; (SEGMENT_BYTES / 3) as usize];
        for _ in 0..7 {
            let next = head.next(&big);
            store.append(next.index, 1, &next.hash, &big).unwrap();
            head = next;
        }
        store.flush().unwrap();
        assert_eq!(list_segments(dir.path(), "seg").unwrap(), vec![1, 4, 7]);
        assert_eq!(indexes(store.read(1, 7, None)), (1..=7).collect::<Vec<_>>());
        store.truncate_after(5).unwrap();
        assert_eq!(list_segments(dir.path(), "seg").unwrap(), vec![1, 4]);
        assert_eq!(store.end(), 5);
        store.truncate_after(3).unwrap();
        assert_eq!(list_segments(dir.path(), "seg").unwrap(), vec![1]);
        let reopened = JournalStore::open(dir.path()).unwrap();
        assert_eq!(reopened.end(), 3);
        store.truncate_after(0).unwrap();
        assert_eq!(store.end(), 0);
        let next = JournalHead::default().next(b"again");
        store.append(1, 1, &next.hash, b"again").unwrap();
        store.flush().unwrap();
        assert_eq!(indexes(store.read(1, 1, None)), vec![1]);
    }

    #[test]
    fn zeros_at_the_tail_are_cut_like_a_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = JournalStore::open(dir.path()).unwrap();
            append_n(&store, &mut JournalHead::default(), 3);
        }
        let segment = segment_path(dir.path(), 1);
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[0; 4096]).unwrap();
        drop(file);
        let store = JournalStore::open(dir.path()).unwrap();
        assert_eq!(store.end(), 3);
        assert_eq!(indexes(store.read(1, 3, None)), vec![1, 2, 3]);
    }

    #[test]
    fn a_damaged_length_is_an_error_not_an_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = JournalStore::open(dir.path()).unwrap();
        append_n(&store, &mut JournalHead::default(), 3);
        let segment = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[MAGIC.len() + 3] = 0xff;
        std::fs::write(&segment, bytes).unwrap();
        assert!(store.read(1, 3, None).any(|r| r.is_err()));
    }
}
