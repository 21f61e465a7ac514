//! Point-in-time replay: folding journal records into the fleet state they produce, checking
//! the hash chain on the way. `domadm audit replay` and `dom-bench replay` share this fold.
//!
//! Each record is admitted (is it before the index asked for, is it the next index, is it the
//! next link of the chain) and applied (decode, stop at the time asked for, apply to the fleet
//! state). Over a local journal [`Replay::fold`] reads records on a second thread, so reading
//! the next records overlaps applying the earlier ones, and checks the chain on whichever
//! thread has time. (Decoding stays with apply: handing decoded events across threads made the
//! fold slower, not faster, as their many small allocations were freed on the other thread.)

use std::sync::mpsc;

use crate::event::{Event, Hash};
use crate::fleet::FleetState;
use crate::journal::{chain, ChainBreak, JournalHead, JournalRecord};

/// How far to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Every record.
    End,
    /// Up to and including this journal index.
    Index(u64),
    /// Every event stamped at or before this time (unix ms).
    Time(i64),
}

impl Until {
    /// The last journal index to replay, when the point is an index.
    pub fn last_index(self) -> Option<u64> {
        match self {
            Until::Index(last) => Some(last),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the journal is damaged: {0}; run audit verify")]
    Chain(#[from] ChainBreak),
    #[error("journal record {index} is not a valid event: {error}")]
    Decode { index: u64, error: String },
    #[error("journal record {index} does not apply: {reason}")]
    Apply { index: u64, reason: String },
    #[error("reading the journal: {0}")]
    Read(String),
}

/// A fleet state folded from the start of the journal.
#[derive(Debug, Clone)]
pub struct Replay {
    until: Until,
    /// The last record applied.
    head: JournalHead,
    pub state: FleetState,
    /// The time of the last event applied.
    pub time_unix_ms: Option<i64>,
}

/// Records handed from the reading thread to the applying one at a time: enough to make the
/// hand-off cheap, few enough to keep both threads busy.
const HANDOFF: usize = 1024;

impl Replay {
    pub fn new(until: Until) -> Replay {
        Replay {
            until,
            head: JournalHead::default(),
            state: FleetState::default(),
            time_unix_ms: None,
        }
    }

    /// The last record applied (index 0 for none) and its hash.
    pub fn head(&self) -> JournalHead {
        self.head
    }

    /// Applies one record, the next in index order; false once it is past the point asked for.
    pub fn feed(&mut self, index: u64, record: &JournalRecord) -> Result<bool, ReplayError> {
        if self.until.last_index().is_some_and(|last| index > last) {
            return Ok(false);
        }
        crate::journal::verify(self.head, [(index, record)])?;
        self.apply(index, record)
    }

    /// Applies a batch, checking the links the reading thread left unchecked; false once past
    /// the time asked for.
    fn apply_batch(&mut self, batch: &Batch) -> Result<bool, ReplayError> {
        let mut prev = &batch.prev;
        for (i, (index, record)) in batch.records.iter().enumerate() {
            if i >= batch.linked {
                link(prev, *index, record)?;
            }
            prev = &record.hash;
            if !self.apply(*index, record)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Applies a record whose link of the chain is checked; false if its time is past the
    /// point asked for.
    fn apply(&mut self, index: u64, record: &JournalRecord) -> Result<bool, ReplayError> {
        let event = Event::decode(&record.event).map_err(|e| ReplayError::Decode {
            index,
            error: e.to_string(),
        })?;
        if matches!(self.until, Until::Time(t) if event.time_unix_ms > t) {
            return Ok(false);
        }
        self.state
            .apply_untracked(index, &event)
            .map_err(|r| ReplayError::Apply {
                index,
                reason: r.to_string(),
            })?;
        self.time_unix_ms = Some(event.time_unix_ms);
        self.head = JournalHead {
            index,
            hash: record.hash,
        };
        Ok(true)
    }

    /// Feeds `records` (in index order) until they end or pass the point asked for, reading
    /// them on a second thread while this one applies.
    ///
    /// Each record's link of the chain is checked by whichever thread has time for it: the
    /// reading thread while the applying one is behind (its hand-off is full), the applying
    /// one otherwise. From memory reading is cheap and the reader checks every link; from
    /// sled's cache reading a record costs more than applying it, and a reader that also
    /// hashed every record held the fold to its own pace. A link needs only the stored hash of
    /// the record before it, so either thread can check any one; the first bad record, by
    /// index, is still the one reported.
    pub fn fold<E: std::fmt::Display>(
        mut self,
        records: impl Iterator<Item = Result<(u64, JournalRecord), E>> + Send,
    ) -> Result<Replay, ReplayError> {
        let (handoff, admitted) = mpsc::sync_channel::<Result<Batch, ReplayError>>(4);
        let (mut next, last) = (self.head.index + 1, self.until.last_index());
        let mut batch = Batch::after(self.head.hash);
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for item in records {
                    let (index, record) = match item {
                        Ok(item) => item,
                        Err(e) => {
                            return batch.hand_over_then(handoff, ReplayError::Read(e.to_string()))
                        }
                    };
                    if last.is_some_and(|last| index > last) {
                        break;
                    }
                    if index != next {
                        let gap = ChainBreak::Gap {
                            expected: next,
                            found: index,
                        };
                        return batch.hand_over_then(handoff, gap.into());
                    }
                    next += 1;
                    batch.records.push((index, record));
                    if batch.records.len() == HANDOFF {
                        let after = batch.records[HANDOFF - 1].1.hash;
                        let full = std::mem::replace(&mut batch, Batch::after(after));
                        if let Err(stop) = full.hand_over(&handoff) {
                            if let Some(e) = stop {
                                let _ = handoff.send(Err(e));
                            }
                            return;
                        }
                    }
                }
                let _ = handoff.send(Ok(batch));
            });
            // Owned here, so that leaving early drops it, and a reader blocked on a full
            // channel stops, before the scope waits for the reader.
            let admitted = admitted;
            for batch in admitted.iter() {
                if !self.apply_batch(&batch?)? {
                    break;
                }
            }
            Ok::<(), ReplayError>(())
        })?;
        Ok(self)
    }
}

/// Records handed from the reading thread to the applying one, in index order.
struct Batch {
    /// The stored hash of the record before the first.
    prev: Hash,
    records: Vec<(u64, JournalRecord)>,
    /// How many records, from the first, the reading thread has checked against the chain.
    linked: usize,
}

/// Links checked between two tries to hand a batch over: few enough to hand it over soon
/// once the applying thread is free, enough to keep the tries cheap.
const LINKS_BETWEEN_TRIES: usize = 16;

impl Batch {
    fn after(prev: Hash) -> Batch {
        Batch {
            prev,
            records: Vec::with_capacity(HANDOFF),
            linked: 0,
        }
    }

    /// Checks the next record's link of the chain; false once every record's is checked.
    fn link_next(&mut self) -> Result<bool, ChainBreak> {
        let Some((index, record)) = self.records.get(self.linked) else {
            return Ok(false);
        };
        let prev = match self.linked {
            0 => &self.prev,
            n => &self.records[n - 1].1.hash,
        };
        link(prev, *index, record)?;
        self.linked += 1;
        Ok(true)
    }

    /// Hands the batch over, checking its links while the applying thread is busy. Err once
    /// the fold must stop: with the bad link found, after handing over the records before it;
    /// with None when the applying thread has stopped.
    fn hand_over(
        mut self,
        handoff: &mpsc::SyncSender<Result<Batch, ReplayError>>,
    ) -> Result<(), Option<ReplayError>> {
        loop {
            self = match handoff.try_send(Ok(self)) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Disconnected(_)) => return Err(None),
                Err(mpsc::TrySendError::Full(batch)) => batch.expect("a batch was sent"),
            };
            for _ in 0..LINKS_BETWEEN_TRIES {
                match self.link_next() {
                    Ok(true) => {}
                    // Every link checked: nothing left to do but wait.
                    Ok(false) => return handoff.send(Ok(self)).map_err(|_| None),
                    Err(bad) => {
                        self.records.truncate(self.linked);
                        handoff.send(Ok(self)).map_err(|_| None)?;
                        return Err(Some(bad.into()));
                    }
                }
            }
        }
    }

    /// Hands over the records read so far, then reports what stopped the reading.
    fn hand_over_then(
        self,
        handoff: mpsc::SyncSender<Result<Batch, ReplayError>>,
        stop: ReplayError,
    ) {
        let _ = handoff.send(Ok(self));
        let _ = handoff.send(Err(stop));
    }
}

/// Checks one record's link, given the stored hash of the record before it: the chain is
/// intact exactly when every link is.
fn link(prev: &Hash, index: u64, record: &JournalRecord) -> Result<(), ChainBreak> {
    if chain(prev, index, &record.event) == record.hash {
        Ok(())
    } else {
        Err(ChainBreak::Altered(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;
    use crate::journal::GENESIS;

    fn journal(n: u64) -> Vec<(u64, JournalRecord)> {
        let mut head = JournalHead::default();
        (1..=n)
            .map(|i| {
                let bytes = Event {
                    actor: "alice".into(),
                    time_unix_ms: i as i64 * 1000,
                    reason: String::new(),
                    change: Change::MachineAdded {
                        hostname: format!("host-{i}"),
                        tags: Default::default(),
                        required_image: None,
                        planned_image: None,
                    },
                }
                .encode();
                head = head.next(&bytes);
                let record = JournalRecord {
                    log_index: i,
                    hash: head.hash,
                    event: bytes,
                };
                (i, record)
            })
            .collect()
    }

    fn fed(until: Until, records: &[(u64, JournalRecord)]) -> Result<Replay, ReplayError> {
        let mut replay = Replay::new(until);
        for (index, record) in records {
            if !replay.feed(*index, record)? {
                break;
            }
        }
        Ok(replay)
    }

    fn folded(until: Until, records: &[(u64, JournalRecord)]) -> Result<Replay, ReplayError> {
        Replay::new(until).fold(records.iter().cloned().map(Ok::<_, String>))
    }

    #[test]
    fn the_threaded_fold_matches_record_by_record_feeding() {
        let records = journal(3 * HANDOFF as u64 + 7);
        for until in [
            Until::End,
            Until::Index(0),
            Until::Index(HANDOFF as u64),
            Until::Index(2_000),
            Until::Time(1_500_000),
        ] {
            let (a, b) = (
                fed(until, &records).unwrap(),
                folded(until, &records).unwrap(),
            );
            assert_eq!(a.head(), b.head(), "{until:?}");
            assert_eq!(a.state, b.state, "{until:?}");
            assert_eq!(a.time_unix_ms, b.time_unix_ms, "{until:?}");
        }
        let to_2000 = folded(Until::Index(2_000), &records).unwrap();
        assert_eq!(to_2000.head().index, 2_000);
        assert_eq!(to_2000.state.machines().count(), 2_000);
        let by_time = folded(Until::Time(1_500_000), &records).unwrap();
        assert_eq!(by_time.head().index, 1_500);
    }

    fn batch(records: &[(u64, JournalRecord)]) -> Batch {
        let mut batch = Batch::after(records[0].1.hash);
        batch.records = records[1..].to_vec();
        batch
    }

    #[test]
    fn a_reader_ahead_checks_the_links_and_stops_at_a_bad_one() {
        for damaged in [None, Some(700)] {
            let mut records = journal(HANDOFF as u64 + 1);
            if let Some(i) = damaged {
                records[i].1.event[2] ^= 1;
            }
            // The applying thread is still busy with an earlier batch, so the reader checks
            // links until it has nothing else to do, then waits.
            let (handoff, admitted) = mpsc::sync_channel(1);
            handoff.send(Ok(Batch::after(GENESIS))).unwrap();
            let full = batch(&records);
            let over = std::thread::spawn(move || full.hand_over(&handoff));
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(admitted.recv().unwrap().unwrap().records.is_empty());
            let handed = admitted.recv().unwrap().unwrap();
            assert_eq!(handed.linked, handed.records.len(), "every link checked");
            match (damaged, over.join().unwrap()) {
                (None, Ok(())) => assert_eq!(handed.records.len(), HANDOFF),
                (Some(i), Err(Some(ReplayError::Chain(ChainBreak::Altered(bad))))) => {
                    assert_eq!(bad, i as u64 + 1);
                    assert_eq!(
                        handed.records.last().unwrap().0,
                        bad - 1,
                        "the records before it"
                    );
                }
                (_, other) => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn the_applying_thread_checks_the_links_left_unchecked() {
        let mut records = journal(40);
        records[20].1.event[2] ^= 1;
        let mut batch = batch(&records);
        batch.linked = 5;
        let mut replay = Replay::new(Until::End);
        replay.head = JournalHead {
            index: 1,
            hash: records[0].1.hash,
        };
        match replay.apply_batch(&batch) {
            Err(ReplayError::Chain(ChainBreak::Altered(21))) => {}
            other => panic!("expected record 21 to be refused, got {other:?}"),
        }
        assert_eq!(replay.head().index, 20, "the records before it applied");
    }

    #[test]
    fn damage_and_read_errors_stop_the_fold_at_their_record() {
        let mut records = journal(2_500);
        records[1_800].1.event[3] ^= 1;
        for result in [fed(Until::End, &records), folded(Until::End, &records)] {
            match result {
                Err(ReplayError::Chain(ChainBreak::Altered(1_801)))
                | Err(ReplayError::Decode { index: 1_801, .. }) => {}
                other => panic!("expected record 1801 to be refused, got {other:?}"),
            }
        }
        let mut records = journal(2_500);
        records.remove(1_500);
        for result in [fed(Until::End, &records), folded(Until::End, &records)] {
            match result {
                Err(ReplayError::Chain(ChainBreak::Gap {
                    expected: 1_501,
                    found: 1_502,
                })) => {}
                other => panic!("expected record 1501 missing, got {other:?}"),
            }
        }
        let good = journal(10);
        let failing = good
            .iter()
            .cloned()
            .map(Ok)
            .chain(std::iter::once(Err("disk on fire")));
        match Replay::new(Until::End).fold(failing) {
            Err(ReplayError::Read(e)) => assert!(e.contains("disk on fire")),
            other => panic!("expected a read error, got {other:?}"),
        }
    }
}
