//! Point-in-time replay: folding journal records into the fleet state they produce, checking
//! the hash chain on the way. `domadm audit replay` and `dom-bench replay` share this fold.
//!
//! The fold has two halves: admitting a record (is it before the index asked for, is it the
//! next link of the chain) and applying it (decode, stop at the time asked for, apply to the
//! fleet state). Over a local journal [`Replay::fold`] runs them on two threads, so reading
//! and hashing the next records overlaps applying the earlier ones. (Decoding stays with apply:
//! handing decoded events across threads made the fold slower, not faster, as their many small
//! allocations were freed on the other thread.)

use std::sync::mpsc;

use crate::event::Event;
use crate::fleet::FleetState;
use crate::journal::{ChainBreak, JournalHead, JournalRecord};

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

/// The admitting half: is the record before the index asked for, and is it the next link of
/// the chain. It works on the stored bytes alone, so the fold can hand records to the applying
/// thread without a decoded event's many small allocations crossing threads.
#[derive(Debug, Clone, Copy)]
struct Admit {
    head: JournalHead,
    last: Option<u64>,
}

impl Admit {
    /// False once the record is past the index asked for.
    fn admit(&mut self, index: u64, record: &JournalRecord) -> Result<bool, ReplayError> {
        if self.last.is_some_and(|last| index > last) {
            return Ok(false);
        }
        self.head = crate::journal::verify(self.head, [(index, record)])?;
        Ok(true)
    }
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

/// Records handed from the admitting thread to the applying one at a time: enough to make the
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

    fn admit(&self) -> Admit {
        Admit {
            head: self.head,
            last: self.until.last_index(),
        }
    }

    /// Applies one record, the next in index order; false once it is past the point asked for.
    pub fn feed(&mut self, index: u64, record: &JournalRecord) -> Result<bool, ReplayError> {
        if !self.admit().admit(index, record)? {
            return Ok(false);
        }
        self.apply(index, record)
    }

    /// Applies an admitted record; false if its time is past the point asked for.
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

    /// Feeds `records` (in index order) until they end or pass the point asked for, admitting
    /// them on a second thread while this one applies.
    pub fn fold<E: std::fmt::Display>(
        mut self,
        records: impl Iterator<Item = Result<(u64, JournalRecord), E>> + Send,
    ) -> Result<Replay, ReplayError> {
        type Batch = Vec<(u64, JournalRecord)>;
        let (handoff, admitted) = mpsc::sync_channel::<Result<Batch, ReplayError>>(4);
        let mut admit = self.admit();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let mut batch = Vec::with_capacity(HANDOFF);
                for item in records {
                    let admitted = item.map_err(|e| ReplayError::Read(e.to_string())).and_then(
                        |(index, record)| {
                            Ok(admit.admit(index, &record)?.then_some((index, record)))
                        },
                    );
                    match admitted {
                        Ok(Some(next)) => batch.push(next),
                        Ok(None) => break,
                        Err(e) => {
                            // Apply what came before the bad record, then report it.
                            let _ = handoff.send(Ok(std::mem::take(&mut batch)));
                            let _ = handoff.send(Err(e));
                            return;
                        }
                    }
                    if batch.len() == HANDOFF {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(HANDOFF));
                        if handoff.send(Ok(full)).is_err() {
                            // The applying side has stopped.
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
                for (index, record) in batch? {
                    if !self.apply(index, &record)? {
                        // Past the time asked for.
                        return Ok::<(), ReplayError>(());
                    }
                }
            }
            Ok(())
        })?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;

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
