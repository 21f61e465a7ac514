//! Typed sled keys, encoded so that byte order is key order.
//!
//! Each kind of record has a one-byte prefix; numbers are big-endian and names come last, so
//! a prefix scan walks one kind of record in order (log entries and journal records by index).

/// Keys of the Raft log tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKey {
    Vote,
    Committed,
    LastPurged,
    /// Format version of the entries' encoding.
    Format,
    Entry(u64),
}

impl LogKey {
    const ENTRY: u8 = 0x10;

    pub fn encode(&self) -> Vec<u8> {
        match self {
            LogKey::Vote => vec![0x01],
            LogKey::Committed => vec![0x02],
            LogKey::LastPurged => vec![0x03],
            LogKey::Format => vec![0x04],
            LogKey::Entry(index) => index_key(Self::ENTRY, *index),
        }
    }

    pub fn entry_index(key: &[u8]) -> Option<u64> {
        decode_index(Self::ENTRY, key)
    }
}

/// Keys of the state-machine tree: the applied position, the fleet state's records and the
/// journal, all in one tree so that one sled batch updates them together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKey {
    /// Format version of this tree's records.
    Format,
    LastApplied,
    LastMembership,
    CurrentSnapshot,
    JournalHead,
    Machine(String),
    Image(String),
    Policy,
    /// A journal record, in formats before 5; now the journal lives in segment files
    /// ([`crate::journal_store`]) and these keys are read only to move them there.
    Journal(u64),
    /// Where block `u64` of the journal starts in its segment files.
    JournalBlock(u64),
    /// Audit index in formats before 6: the machine was named by journal record `u64`. Now
    /// read only to remove it.
    MachineEvent(String, u64),
    /// Audit index in formats before 6: the image was named by journal record `u64`.
    ImageEvent(String, u64),
    /// Audit index: the records of journal block `u64` that name the machine (their positions
    /// in the block are the value; [`crate::audit_index`]).
    MachineEvents(String, u64),
    /// Audit index: the records of journal block `u64` that name the image.
    ImageEvents(String, u64),
    /// The journal index that the fleet's records (`Machine`, `Image`, `Policy`) reflect. The
    /// records are written once per journal block; those of later records are folded from the
    /// journal at open.
    RecordsAt,
}

impl StateKey {
    pub const MACHINE: u8 = 0x20;
    pub const IMAGE: u8 = 0x21;
    pub const JOURNAL: u8 = 0x30;
    pub const JOURNAL_BLOCK: u8 = 0x31;
    pub const MACHINE_EVENT: u8 = 0x40;
    pub const IMAGE_EVENT: u8 = 0x41;
    pub const MACHINE_EVENTS: u8 = 0x42;
    pub const IMAGE_EVENTS: u8 = 0x43;

    pub fn encode(&self) -> Vec<u8> {
        let named = |prefix: u8, name: &str| {
            let mut key = Vec::with_capacity(1 + name.len());
            key.push(prefix);
            key.extend_from_slice(name.as_bytes());
            key
        };
        match self {
            StateKey::Format => vec![0x01],
            StateKey::LastApplied => vec![0x02],
            StateKey::LastMembership => vec![0x03],
            StateKey::CurrentSnapshot => vec![0x04],
            StateKey::JournalHead => vec![0x05],
            StateKey::RecordsAt => vec![0x06],
            StateKey::Policy => vec![0x10],
            StateKey::Machine(name) => named(Self::MACHINE, name),
            StateKey::Image(name) => named(Self::IMAGE, name),
            StateKey::Journal(index) => index_key(Self::JOURNAL, *index),
            StateKey::JournalBlock(block) => index_key(Self::JOURNAL_BLOCK, *block),
            StateKey::MachineEvent(name, index) => {
                name_index_key(Self::MACHINE_EVENT, name, *index)
            }
            StateKey::ImageEvent(name, index) => name_index_key(Self::IMAGE_EVENT, name, *index),
            StateKey::MachineEvents(name, block) => {
                name_index_key(Self::MACHINE_EVENTS, name, *block)
            }
            StateKey::ImageEvents(name, block) => name_index_key(Self::IMAGE_EVENTS, name, *block),
        }
    }

    pub fn journal_index(key: &[u8]) -> Option<u64> {
        decode_index(Self::JOURNAL, key)
    }

    /// The prefix under which every index key of one name lies, in journal order.
    pub fn name_prefix(prefix: u8, name: &str) -> Vec<u8> {
        let mut key = vec![prefix];
        key.extend_from_slice(name.as_bytes());
        key.push(0);
        key
    }

    /// The number (journal index or block) at the end of an index key.
    pub fn indexed(key: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(
            key.get(key.len().checked_sub(8)?..)?.try_into().ok()?,
        ))
    }
}

/// Names never hold a NUL byte, so `name NUL index` sorts by name, then by index.
fn name_index_key(prefix: u8, name: &str, index: u64) -> Vec<u8> {
    let mut key = StateKey::name_prefix(prefix, name);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn index_key(prefix: u8, index: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(prefix);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn decode_index(prefix: u8, key: &[u8]) -> Option<u64> {
    match key {
        [p, rest @ ..] if *p == prefix => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_is_index_order() {
        let indexes = [0u64, 1, 255, 256, 65_536, u64::MAX - 1, u64::MAX];
        for pair in indexes.windows(2) {
            assert!(LogKey::Entry(pair[0]).encode() < LogKey::Entry(pair[1]).encode());
            assert!(StateKey::Journal(pair[0]).encode() < StateKey::Journal(pair[1]).encode());
        }
        assert_eq!(LogKey::entry_index(&LogKey::Entry(77).encode()), Some(77));
        assert_eq!(
            StateKey::journal_index(&StateKey::Journal(9).encode()),
            Some(9)
        );
        assert_eq!(StateKey::journal_index(&LogKey::Entry(9).encode()), None);
    }

    #[test]
    fn an_index_key_groups_by_name_then_journal_order() {
        let a1 = StateKey::MachineEvent("web-1".into(), 7).encode();
        let a2 = StateKey::MachineEvent("web-1".into(), 300).encode();
        let b = StateKey::MachineEvent("web-10".into(), 1).encode();
        assert!(a1 < a2 && a2 < b);
        assert!(a1.starts_with(&StateKey::name_prefix(StateKey::MACHINE_EVENT, "web-1")));
        assert!(!b.starts_with(&StateKey::name_prefix(StateKey::MACHINE_EVENT, "web-1")));
        assert_eq!(StateKey::indexed(&a2), Some(300));
    }

    #[test]
    fn kinds_do_not_interleave() {
        let machine = StateKey::Machine("\u{10ffff}".into()).encode();
        assert!(machine < StateKey::Image(String::new()).encode());
        assert!(StateKey::Image("zzz".into()).encode() < StateKey::Journal(0).encode());
    }
}
