//! The hash-chained journal: every applied event, in order, for ever.
//!
//! Record `i` holds the exact event bytes the leader proposed and
//! `hash_i = blake3(hash_{i-1} || i as u64 big-endian || event bytes)`, with `hash_0` all zeros.
//! Altering, dropping or reordering any record changes every later hash, so comparing heads
//! across replicas (or against an exported copy) shows whether history was touched, and a walk
//! from the start names the first index where it was.

use serde::{Deserialize, Serialize};

use crate::event::Hash;

pub const GENESIS: Hash = [0; 32];

/// One journal record as stored (under `StateKey::Journal(index)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The Raft log index the event was committed at.
    pub log_index: u64,
    pub hash: Hash,
    pub event: Vec<u8>,
}

/// The newest record's position; `index` 0 with the genesis hash for an empty journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHead {
    pub index: u64,
    pub hash: Hash,
}

impl Default for JournalHead {
    fn default() -> Self {
        JournalHead {
            index: 0,
            hash: GENESIS,
        }
    }
}

pub fn chain(prev: &Hash, index: u64, event: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev);
    hasher.update(&index.to_be_bytes());
    hasher.update(event);
    *hasher.finalize().as_bytes()
}

impl JournalHead {
    /// The head after appending `event` as the next record.
    pub fn next(&self, event: &[u8]) -> JournalHead {
        let index = self.index + 1;
        JournalHead {
            index,
            hash: chain(&self.hash, index, event),
        }
    }
}

/// Where a walk over records found the chain broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("journal record {expected} is missing (found {found} next)")]
    Gap { expected: u64, found: u64 },
    #[error("journal record {0} does not match its hash: altered or corrupt")]
    Altered(u64),
}

/// Checks records in index order, starting after `from`, and returns the new head.
pub fn verify<'a>(
    from: JournalHead,
    records: impl IntoIterator<Item = (u64, &'a JournalRecord)>,
) -> Result<JournalHead, ChainBreak> {
    records.into_iter().try_fold(from, |head, (index, record)| {
        if index != head.index + 1 {
            return Err(ChainBreak::Gap {
                expected: head.index + 1,
                found: index,
            });
        }
        let next = head.next(&record.event);
        if next.hash != record.hash {
            return Err(ChainBreak::Altered(index));
        }
        Ok(next)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(events: &[&[u8]]) -> Vec<(u64, JournalRecord)> {
        let mut head = JournalHead::default();
        events
            .iter()
            .map(|e| {
                head = head.next(e);
                (
                    head.index,
                    JournalRecord {
                        log_index: head.index + 10,
                        hash: head.hash,
                        event: e.to_vec(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_to_its_head() {
        let recs = records(&[b"a", b"b", b"c"]);
        let head = verify(JournalHead::default(), recs.iter().map(|(i, r)| (*i, r))).unwrap();
        assert_eq!(head.index, 3);
        assert_eq!(head.hash, recs[2].1.hash);
    }

    #[test]
    fn alteration_and_loss_are_found_at_their_index() {
        let mut recs = records(&[b"a", b"b", b"c", b"d"]);
        recs[2].1.event = b"C".to_vec();
        assert_eq!(
            verify(JournalHead::default(), recs.iter().map(|(i, r)| (*i, r))),
            Err(ChainBreak::Altered(3))
        );
        let mut recs = records(&[b"a", b"b", b"c"]);
        recs.remove(1);
        assert_eq!(
            verify(JournalHead::default(), recs.iter().map(|(i, r)| (*i, r))),
            Err(ChainBreak::Gap {
                expected: 2,
                found: 3
            })
        );
    }

    #[test]
    fn the_index_is_part_of_the_hash() {
        assert_ne!(chain(&GENESIS, 1, b"x"), chain(&GENESIS, 2, b"x"));
    }
}
