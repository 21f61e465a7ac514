//! The audit index: which journal records name a machine or an image, so that a machine's
//! history is found without a scan of the journal.
//!
//! It is kept one block of the journal ([`BLOCK`] records) at a time: for each name the block
//! mentions, one sled key `(name, block)` whose value lists the positions in the block of the
//! records that name it. A block's keys are written once, with the batch that completes it;
//! until then they live in memory ([`BlockIndex`]) and are rebuilt at open from the block's
//! records. Per event that is a small fraction of a sled insert where a key per (name, record)
//! was one or more, and a name's history is one prefix scan, as it was.

use std::collections::BTreeMap;

use crate::event::Event;
use crate::journal_store::{block_of, BLOCK};
use crate::keys::StateKey;

/// The audit index of one block of the journal, built as its records are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockIndex {
    block: u64,
    machines: BTreeMap<String, Vec<u16>>,
    images: BTreeMap<String, Vec<u16>>,
}

/// Whether journal record `index` is the last of its block.
pub fn ends_block(index: u64) -> bool {
    index > 0 && index.is_multiple_of(BLOCK)
}

/// The first journal index of `block`.
pub fn first_of(block: u64) -> u64 {
    block * BLOCK + 1
}

fn add(names: &mut BTreeMap<String, Vec<u16>>, name: &str, position: u16) {
    match names.get_mut(name) {
        // One record may name a machine more than once (a batch of changes to it).
        Some(positions) if positions.last() == Some(&position) => {}
        Some(positions) => positions.push(position),
        None => {
            names.insert(name.to_owned(), vec![position]);
        }
    }
}

fn encode_positions(positions: &[u16]) -> Vec<u8> {
    positions.iter().flat_map(|p| p.to_be_bytes()).collect()
}

/// The journal indexes a stored value of `block` lists.
pub fn decode_positions(block: u64, value: &[u8]) -> impl Iterator<Item = u64> + '_ {
    value
        .chunks_exact(2)
        .map(move |p| first_of(block) + u64::from(u16::from_be_bytes([p[0], p[1]])))
}

impl BlockIndex {
    /// The (empty) index of the block that journal record `index` belongs to.
    pub fn for_record(index: u64) -> BlockIndex {
        BlockIndex {
            block: block_of(index),
            ..BlockIndex::default()
        }
    }

    /// Adds the names of journal record `index`, which must lie in this block.
    pub fn add(&mut self, index: u64, event: &Event) {
        debug_assert_eq!(block_of(index), self.block);
        // A block holds BLOCK (1024) records, so a position fits in u16.
        let position = (index - first_of(self.block)) as u16;
        for host in event.change.machines_named() {
            add(&mut self.machines, host, position);
        }
        for image in event.change.images_named() {
            add(&mut self.images, image, position);
        }
    }

    /// The sled keys and values of this block.
    pub fn entries(&self) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
        let block = self.block;
        let machines = self.machines.iter().map(move |(name, positions)| {
            (
                StateKey::MachineEvents(name.clone(), block).encode(),
                encode_positions(positions),
            )
        });
        let images = self.images.iter().map(move |(name, positions)| {
            (
                StateKey::ImageEvents(name.clone(), block).encode(),
                encode_positions(positions),
            )
        });
        machines.chain(images)
    }

    /// The journal indexes in this block that name machine (`by_machine`) or image `name`.
    pub fn indexes_of(&self, by_machine: bool, name: &str) -> impl Iterator<Item = u64> + '_ {
        let names = if by_machine {
            &self.machines
        } else {
            &self.images
        };
        names
            .get(name)
            .into_iter()
            .flatten()
            .map(|p| first_of(self.block) + u64::from(*p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;

    fn event(change: Change) -> Event {
        Event {
            actor: "alice".into(),
            time_unix_ms: 0,
            reason: String::new(),
            change,
        }
    }

    fn added(host: &str, image: Option<&str>) -> Event {
        event(Change::MachineAdded {
            hostname: host.into(),
            required_image: image.map(Into::into),
            planned_image: None,
            tags: Default::default(),
        })
    }

    #[test]
    fn block_bounds() {
        assert!(!ends_block(0));
        assert!(!ends_block(1));
        assert!(ends_block(BLOCK));
        assert!(!ends_block(BLOCK + 1));
        assert_eq!(first_of(block_of(BLOCK)), 1);
        assert_eq!(first_of(block_of(BLOCK + 1)), BLOCK + 1);
    }

    #[test]
    fn positions_round_trip_through_the_stored_value() {
        let first = BLOCK + 1;
        let mut index = BlockIndex::for_record(first);
        index.add(first, &added("web-1", Some("base")));
        index.add(first + 5, &added("web-2", None));
        index.add(2 * BLOCK, &added("web-1", None));
        assert_eq!(
            index.indexes_of(true, "web-1").collect::<Vec<_>>(),
            vec![first, 2 * BLOCK]
        );
        assert_eq!(
            index.indexes_of(false, "base").collect::<Vec<_>>(),
            vec![first]
        );
        assert_eq!(index.indexes_of(true, "base").count(), 0);
        let entries: Vec<_> = index.entries().collect();
        assert_eq!(entries.len(), 3);
        let (key, value) = &entries[0];
        assert_eq!(key, &StateKey::MachineEvents("web-1".into(), 1).encode());
        assert_eq!(
            decode_positions(1, value).collect::<Vec<_>>(),
            vec![first, 2 * BLOCK]
        );
        assert_eq!(
            entries[2].0,
            StateKey::ImageEvents("base".into(), 1).encode()
        );
    }

    #[test]
    fn a_record_naming_a_machine_twice_is_listed_once() {
        let twice = event(Change::Batch(vec![
            added("web-1", None).change,
            Change::MachineRemoved {
                hostname: "web-1".into(),
            },
        ]));
        let mut index = BlockIndex::for_record(7);
        index.add(7, &twice);
        assert_eq!(index.indexes_of(true, "web-1").collect::<Vec<_>>(), vec![7]);
    }
}
