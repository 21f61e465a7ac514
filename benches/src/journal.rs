//! The journal `dom-bench replay` and the replay benches fold: 10 images, a machine for every
//! 20 events, the rest each setting one machine's required image.

use std::path::Path;

use dom_storage::event::{Change, Event};
use dom_storage::journal::{JournalHead, JournalRecord};

/// Event `i` (from 0) of a journal of `events` events.
pub fn event(i: u64, events: u64) -> Event {
    let machines = (events / 20).max(1);
    let change = if i < 10 {
        Change::ImageAdded {
            name: format!("img/{i}"),
            root_hash: [i as u8; 32],
            files: 1,
            bytes: 1,
            manifest_hash: None,
            filter: vec![],
            triggers: vec![],
        }
    } else if i - 10 < machines {
        Change::MachineAdded {
            hostname: format!("host-{:07}", i - 10),
            tags: Default::default(),
            required_image: Some("img/0".into()),
            planned_image: None,
        }
    } else {
        let n = i - 10;
        Change::RequiredImageSet {
            hostnames: vec![format!("host-{:07}", n % machines)],
            image: Some(format!("img/{}", n % 10)),
        }
    };
    Event {
        actor: "bench".into(),
        time_unix_ms: i as i64,
        reason: String::new(),
        change,
    }
}

/// The journal's records as the state machine would store them, held in memory.
pub fn records(events: u64) -> Vec<(u64, JournalRecord)> {
    let mut head = JournalHead::default();
    (0..events)
        .map(|i| {
            let bytes = event(i, events).encode();
            head = head.next(&bytes);
            let record = JournalRecord {
                log_index: i + 1,
                hash: head.hash,
                event: bytes,
            };
            (head.index, record)
        })
        .collect()
}

/// Writes the journal into a fresh replica data dir, through the state machine replicas use.
pub fn generate(dir: &Path, events: u64) {
    use dom_storage::types::{Entry, Events};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (_log, mut sm) = dom_storage::open(dir).expect("open store");
        let mut index = 0u64;
        while index < events {
            let batch: Vec<Entry> = (index..(index + 10_000).min(events))
                .map(|i| Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), i + 1),
                    payload: EntryPayload::Normal(Events::one(event(i, events).encode())),
                })
                .collect();
            index += batch.len() as u64;
            sm.apply(batch).await.expect("apply");
        }
        assert_eq!(
            sm.view().journal_head().index,
            events,
            "every generated event applied"
        );
    });
}
