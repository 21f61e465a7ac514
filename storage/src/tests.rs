//! Storage tests against real sled directories: openraft's own conformance suite, durability
//! across reopen, and snapshots that carry the journal.

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership};
use tempfile::TempDir;

use crate::event::{Change, Event};
use crate::journal::JournalRecord;
use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;
use crate::types::{Applied, Entry, Events, LogId, StorageError, TypeConfig, Vote};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = crate::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

fn reopen(dir: &std::path::Path) -> Result<(LogStore, StateMachineStore), crate::StoreError> {
    crate::open_when_released(dir, std::time::Duration::from_secs(10))
}

/// A raw sled handle on a replica's data dir, for tests that write what older builds wrote;
/// like [`crate::open_when_released`], it waits for a lock released a moment ago.
fn raw_sled(dir: &std::path::Path) -> sled::Db {
    let path = dir.join("sled");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(&path) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("sled at {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn event_bytes(index: u64, change: Change) -> Vec<u8> {
    Event {
        actor: "alice".into(),
        time_unix_ms: index as i64,
        reason: "test".into(),
        change,
    }
    .encode()
}

fn event_entry(index: u64, change: Change) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Events::one(event_bytes(index, change))),
    }
}

fn machine(host: &str) -> Change {
    Change::MachineAdded {
        hostname: host.into(),
        tags: BTreeMap::new(),
        required_image: None,
        planned_image: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    log.write_entries(entries).await.expect("append");
}

#[test]
fn vote_log_commit_and_state_survive_reopen() {
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        {
            let (mut log, mut sm) = crate::open(dir.path()).unwrap();
            log.save_vote(&Vote::new(3, 2)).await.unwrap();
            let entries = vec![
                event_entry(1, machine("web-01")),
                event_entry(2, machine("web-02")),
            ];
            append(&mut log, entries.clone()).await;
            log.save_committed(Some(log_id(1, 2))).await.unwrap();
            sm.apply(entries).await.unwrap();
        }
        let (mut log, mut sm) = reopen(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
        assert_eq!(log.try_get_log_entries(1..3).await.unwrap().len(), 2);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
        let view = sm.view();
        assert_eq!(view.read(|l| l.state.machines().count()), 2);
        assert_eq!(view.journal_head().index, 2);
    });
}

#[test]
fn a_second_open_of_one_data_dir_is_refused() {
    let dir = TempDir::new().unwrap();
    let _first = crate::open(dir.path()).unwrap();
    match crate::open(dir.path()) {
        Err(crate::StoreError::Locked(_)) => {}
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("second open succeeded"),
    }
}

#[test]
fn refused_events_change_nothing_and_are_not_journaled() {
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let (_log, mut sm) = crate::open(dir.path()).unwrap();
        let results = sm
            .apply(vec![
                event_entry(1, machine("web-01")),
                event_entry(2, machine("web-01")),
                Entry {
                    log_id: log_id(1, 3),
                    payload: EntryPayload::Normal(Events::one(vec![0xff, 0x01])),
                },
                // One entry of several events (group commit): a refused one leaves its
                // neighbours applied, and each applied one is its own journal record.
                Entry {
                    log_id: log_id(1, 4),
                    payload: EntryPayload::Normal(Events(vec![
                        event_bytes(
                            4,
                            Change::MachineRemoved {
                                hostname: "web-01".into(),
                            },
                        ),
                        event_bytes(4, machine("web-02")),
                        event_bytes(4, machine("web-02")),
                    ])),
                },
            ])
            .await
            .unwrap();
        assert!(matches!(results[0][..], [Applied::Event(h)] if h.index == 1));
        assert!(matches!(&results[1][..], [Applied::Refused(r)] if r.contains("already exists")));
        assert!(matches!(&results[2][..], [Applied::Refused(_)]));
        assert!(matches!(
            &results[3][..],
            [Applied::Event(a), Applied::Event(b), Applied::Refused(_)] if a.index == 2 && b.index == 3
        ));
        let view = sm.view();
        let records: Vec<_> = view.journal(1, u64::MAX).map(|r| r.unwrap()).collect();
        assert_eq!(
            records
                .iter()
                .map(|(i, r)| (*i, r.log_index))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 4), (3, 4)]
        );
        assert_eq!(view.read(|l| l.state.machines().count()), 1);
        assert_eq!(
            view.indexed(true, "web-01").unwrap(),
            vec![1, 2],
            "refused events are not indexed"
        );
        assert_eq!(view.indexed(true, "web-0").unwrap(), Vec::<u64>::new());
    });
}

#[test]
fn a_snapshot_carries_the_whole_journal_to_an_empty_replica() {
    runtime().block_on(async {
        let (leader_dir, follower_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
        let (mut leader_log, mut leader) = crate::open(leader_dir.path()).unwrap();
        let members = Membership::new(vec![BTreeSet::from([1, 2, 3])], ());
        let mut entries = vec![Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Membership(members),
        }];
        entries.extend((2..=50).map(|i| event_entry(i, machine(&format!("m{i}")))));
        leader.apply(entries).await.unwrap();
        let snapshot = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // The leader's log is purged behind the snapshot; the journal is not.
        leader_log.purge(log_id(1, 50)).await.unwrap();
        assert_eq!(leader.view().journal(1, u64::MAX).count(), 49);

        let (_follower_log, mut follower) = crate::open(follower_dir.path()).unwrap();
        install(&mut follower, snapshot).await;

        let (leader_view, follower_view) = (leader.view(), follower.view());
        assert_eq!(follower_view.journal_head(), leader_view.journal_head());
        assert_eq!(
            follower_view.read(|l| l.state.clone()),
            leader_view.read(|l| l.state.clone())
        );
        let journal = |v: &crate::state_machine::FleetView| {
            v.journal(1, u64::MAX)
                .map(|r| r.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(journal(&follower_view), journal(&leader_view));
        assert_eq!(
            follower_view.indexed(true, "m7").unwrap(),
            vec![6],
            "the audit index came with the snapshot"
        );
        drop((follower, follower_view, _follower_log));

        // And the installed state is what a restart loads.
        let (_log, reopened) = reopen(follower_dir.path()).unwrap();
        assert_eq!(
            reopened.view().read(|l| l.state.clone()),
            leader_view.read(|l| l.state.clone())
        );
        assert_eq!(reopened.view().journal_head(), leader_view.journal_head());
    });
}

#[test]
fn apply_survives_arbitrary_bytes_and_mutated_events() {
    // A deterministic xorshift stream: random payloads and single-byte mutations of valid
    // events must be applied or refused, never panic, and leave the journal chain intact.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let valid: Vec<Vec<u8>> = (0..50)
        .map(|i| {
            Event {
                actor: "a".into(),
                time_unix_ms: i,
                reason: String::new(),
                change: machine(&format!("m{}", i % 7)),
            }
            .encode()
        })
        .collect();
    let payloads: Vec<Vec<u8>> = (0..2_000)
        .map(|i| {
            if i % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut bytes = valid[(next() % valid.len() as u64) as usize].clone();
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
                bytes
            }
        })
        .collect();
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let (_log, mut sm) = crate::open(dir.path()).unwrap();
        let entries = payloads.into_iter().enumerate().map(|(i, p)| Entry {
            log_id: log_id(1, i as u64 + 1),
            payload: EntryPayload::Normal(Events::one(p)),
        });
        let results = sm.apply(entries.collect::<Vec<_>>()).await.unwrap();
        assert_eq!(results.len(), 2_000);
        let view = sm.view();
        let records: Vec<_> = view.journal(1, u64::MAX).map(|r| r.unwrap()).collect();
        let head = crate::journal::verify(Default::default(), records.iter().map(|(i, r)| (*i, r)))
            .unwrap();
        assert_eq!(head, view.journal_head());
        let journaled = results
            .iter()
            .flatten()
            .filter(|r| matches!(r, Applied::Event(_)))
            .count();
        assert_eq!(journaled as u64, head.index);
    });
}

/// Hands `snapshot` to `follower` as openraft does: received into its own file, then installed.
async fn install(
    follower: &mut StateMachineStore,
    snapshot: openraft::storage::Snapshot<TypeConfig>,
) {
    let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
    *receiving = *snapshot.snapshot;
    follower
        .install_snapshot(&snapshot.meta, receiving)
        .await
        .unwrap();
}

/// Applies the first two log entries: `web-01` added, then `web-02`.
async fn apply_two_machines(sm: &mut StateMachineStore) {
    sm.apply(vec![
        event_entry(1, machine("web-01")),
        event_entry(2, machine("web-02")),
    ])
    .await
    .unwrap();
}

/// Rewrites a data dir as builds before format 5 left it: the journal as sled keys, no
/// segment files, and the given format.
fn make_sled_journal(dir: &std::path::Path, records: &[(u64, JournalRecord)], format: u32) {
    use crate::keys::StateKey;
    std::fs::remove_dir_all(dir.join("journal")).unwrap();
    let db = raw_sled(dir);
    let tree = db.open_tree("state").unwrap();
    for item in tree.scan_prefix([StateKey::JOURNAL_BLOCK]) {
        tree.remove(item.unwrap().0).unwrap();
    }
    for (index, record) in records {
        tree.insert(
            StateKey::Journal(*index).encode(),
            crate::durable::encode(record),
        )
        .unwrap();
    }
    tree.insert(StateKey::Format.encode(), crate::durable::encode(&format))
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn records_of_an_older_format_are_rebuilt_from_the_journal() {
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let (expected, records) = {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            apply_two_machines(&mut sm).await;
            let view = sm.view();
            let records: Vec<_> = view.journal(1, u64::MAX).map(|r| r.unwrap()).collect();
            (view.read(|l| l.state.clone()), records)
        };
        // Make the records look old and wrong: only the journal is trusted.
        make_sled_journal(dir.path(), &records, 1);
        raw_sled(dir.path())
            .open_tree("state")
            .unwrap()
            .remove(crate::keys::StateKey::Machine("web-02".into()).encode())
            .unwrap();
        let (_log, sm) = reopen(dir.path()).unwrap();
        assert_eq!(sm.view().read(|l| l.state.clone()), expected);
        assert_eq!(sm.view().indexed(true, "web-02").unwrap(), vec![2]);
        let moved: Vec<_> = sm.view().journal(1, u64::MAX).map(|r| r.unwrap()).collect();
        assert_eq!(moved, records);
    });
}

#[test]
fn a_journal_kept_in_sled_moves_to_segment_files_once() {
    use crate::keys::StateKey;
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let records = {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            let entries: Vec<_> = (1..=3000)
                .map(|i| event_entry(i, machine(&format!("web-{i:04}"))))
                .collect();
            sm.apply(entries).await.unwrap();
            let view = sm.view();
            let records: Vec<_> = view.journal(1, u64::MAX).map(|r| r.unwrap()).collect();
            records
        };
        make_sled_journal(dir.path(), &records, 4);
        {
            let (_log, sm) = reopen(dir.path()).unwrap();
            let view = sm.view();
            assert_eq!(view.journal_head().index, 3000);
            let moved: Vec<_> = view.journal(1, u64::MAX).map(|r| r.unwrap()).collect();
            assert_eq!(moved, records);
            assert_eq!(
                view.journal(1500, 1502)
                    .map(|r| r.unwrap().0)
                    .collect::<Vec<_>>(),
                vec![1500, 1501, 1502]
            );
            assert_eq!(
                view.journal_record(2049).unwrap(),
                Some(records[2048].1.clone())
            );
        }
        let db = raw_sled(dir.path());
        let tree = db.open_tree("state").unwrap();
        assert_eq!(tree.scan_prefix([StateKey::JOURNAL]).count(), 0);
        assert_eq!(tree.scan_prefix([StateKey::JOURNAL_BLOCK]).count(), 3);
    });
}

#[test]
fn journal_records_past_the_applied_head_are_cut_at_open() {
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let head = {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            sm.apply(vec![event_entry(1, machine("web-01"))])
                .await
                .unwrap();
            sm.view().journal_head()
        };
        {
            // As a crash between writing a batch's records and its sled batch leaves them.
            let store =
                crate::journal_store::JournalStore::open(&dir.path().join("journal")).unwrap();
            let event = event_bytes(2, machine("web-02"));
            let next = head.next(&event);
            store.append(2, 2, &next.hash, &event).unwrap();
            store.flush().unwrap();
        }
        let (_log, mut sm) = reopen(dir.path()).unwrap();
        assert_eq!(sm.view().journal_head(), head);
        assert_eq!(sm.view().journal(1, u64::MAX).count(), 1);
        // Raft applies the entry again, and it is journaled once.
        sm.apply(vec![event_entry(2, machine("web-02"))])
            .await
            .unwrap();
        let records: Vec<_> = sm.view().journal(1, u64::MAX).map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(
            crate::journal::verify(Default::default(), records.iter().map(|(i, r)| (*i, r))),
            Ok(sm.view().journal_head())
        );
    });
}

#[test]
fn journal_files_behind_the_applied_head_fall_back_to_the_snapshot_or_to_empty() {
    runtime().block_on(async {
        // No snapshot: back to empty, for Raft to apply its whole log again.
        let dir = TempDir::new().unwrap();
        {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            apply_two_machines(&mut sm).await;
        }
        crate::journal_store::JournalStore::open(&dir.path().join("journal"))
            .unwrap()
            .truncate_after(1)
            .unwrap();
        let (_log, mut sm) = reopen(dir.path()).unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, None);
        assert_eq!(sm.view().journal_head().index, 0);
        assert_eq!(sm.view().read(|l| l.state.machines().count()), 0);
        assert!(sm.view().indexed(true, "web-01").unwrap().is_empty());
        apply_two_machines(&mut sm).await;
        assert_eq!(sm.view().journal_head().index, 2);
        drop((sm, _log));

        // With a snapshot: back to it, with the journal it carries.
        let dir = TempDir::new().unwrap();
        let at_snapshot = {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            apply_two_machines(&mut sm).await;
            sm.build_snapshot().await.unwrap();
            let at_snapshot = (
                sm.view().journal_head(),
                sm.view().read(|l| l.state.clone()),
            );
            sm.apply(vec![event_entry(3, machine("web-03"))])
                .await
                .unwrap();
            at_snapshot
        };
        crate::journal_store::JournalStore::open(&dir.path().join("journal"))
            .unwrap()
            .truncate_after(0)
            .unwrap();
        let (_log, mut sm) = reopen(dir.path()).unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
        assert_eq!(sm.view().journal_head(), at_snapshot.0);
        assert_eq!(sm.view().read(|l| l.state.clone()), at_snapshot.1);
        assert_eq!(sm.view().journal(1, u64::MAX).count(), 2);
        sm.apply(vec![event_entry(3, machine("web-03"))])
            .await
            .unwrap();
        assert_eq!(sm.view().journal_head().index, 3);
        drop((sm, _log));

        // A damaged record at the head is as good as a missing one.
        let dir = TempDir::new().unwrap();
        let last_event = event_bytes(2, machine("web-02"));
        {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            apply_two_machines(&mut sm).await;
        }
        let segment = dir.path().join("journal").join(format!("{:020}.seg", 1));
        let mut bytes = std::fs::read(&segment).unwrap();
        let at = bytes.len() - last_event.len();
        assert_eq!(&bytes[at..], &last_event[..]);
        bytes[at + last_event.len() / 2] ^= 0x55;
        std::fs::write(&segment, bytes).unwrap();
        let (_log, mut sm) = reopen(dir.path()).unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, None);
        assert_eq!(sm.view().journal_head().index, 0);
    });
}

#[test]
fn an_unversioned_log_is_upgraded_to_batched_entries_and_a_newer_one_refused() {
    use crate::log_store::legacy;
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let event = event_bytes(1, machine("web-01"));
        {
            // A log as the builds before batched entries wrote it: no format key, one event's
            // bytes per entry.
            let db = raw_sled(dir.path());
            let tree = db.open_tree("raft_log").unwrap();
            for (index, payload) in [
                (1, EntryPayload::Blank),
                (2, EntryPayload::Normal(legacy::EventBytes(event.clone()))),
            ] {
                let entry = legacy::LegacyEntry {
                    log_id: log_id(1, index),
                    payload,
                };
                tree.insert(
                    crate::keys::LogKey::Entry(index).encode(),
                    crate::durable::encode(&entry),
                )
                .unwrap();
            }
            db.flush().unwrap();
        }
        {
            let (mut log, _sm) = reopen(dir.path()).unwrap();
            let entries = log.try_get_log_entries(1..3).await.unwrap();
            assert_eq!(entries[0].payload, EntryPayload::Blank);
            assert_eq!(entries[1].payload, EntryPayload::Normal(Events::one(event)));
        }
        {
            let db = raw_sled(dir.path());
            let tree = db.open_tree("raft_log").unwrap();
            tree.insert(
                crate::keys::LogKey::Format.encode(),
                crate::durable::encode(&99u32),
            )
            .unwrap();
            db.flush().unwrap();
        }
        match reopen(dir.path()) {
            Err(crate::durable::StoreError::Format { found: 99, .. }) => {}
            Err(other) => panic!("expected a format error, got {other}"),
            Ok(_) => panic!("a log of a newer format was opened"),
        }
    });
}

/// Log entries `from..=to`, one event each: ten machines added, then updated in turn with a
/// tag that changes every time, so the state at each index differs from the one before.
fn fleet_churn(from: u64, to: u64) -> Vec<Entry> {
    (from..=to)
        .map(|i| {
            let host = format!("m{}", i % 10);
            let change = if i <= 10 {
                machine(&host)
            } else {
                Change::MachineUpdated {
                    hostname: host,
                    tags: BTreeMap::from([("seen".to_owned(), i.to_string())]),
                }
            };
            event_entry(i, change)
        })
        .collect()
}

/// What the audit index must say: every journal record naming `host`, by a scan.
fn scanned(view: &crate::state_machine::FleetView, host: &str) -> Vec<u64> {
    view.journal(1, u64::MAX)
        .map(|r| r.unwrap())
        .filter(|(_, r)| {
            Event::decode(&r.event)
                .unwrap()
                .change
                .machines_named()
                .contains(&host)
        })
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn records_and_audit_index_are_written_per_block_and_open_folds_the_rest() {
    use crate::journal_store::BLOCK;
    use crate::keys::StateKey;
    let end = 2 * BLOCK + 500;
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let expected = {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            sm.apply(fleet_churn(1, end)).await.unwrap();
            let view = sm.view();
            assert_eq!(view.indexed(true, "m3").unwrap(), scanned(&view, "m3"));
            assert_eq!(view.indexed(true, "m3").unwrap().len(), 255);
            view.read(|l| l.state.clone())
        };
        {
            // sled holds the records as of the second block's end, one index key per machine
            // and whole block: the 500 records after it are only in the journal.
            let db = raw_sled(dir.path());
            let tree = db.open_tree("state").unwrap();
            let records_at: u64 = crate::durable::decode(
                "records at",
                &tree.get(StateKey::RecordsAt.encode()).unwrap().unwrap(),
            )
            .unwrap();
            assert_eq!(records_at, 2 * BLOCK);
            assert_eq!(tree.scan_prefix([StateKey::MACHINE_EVENTS]).count(), 20);
            let m3: crate::fleet::Machine = crate::durable::decode(
                "m3",
                &tree
                    .get(StateKey::Machine("m3".into()).encode())
                    .unwrap()
                    .unwrap(),
            )
            .unwrap();
            assert_ne!(
                Some(&m3),
                expected.machine("m3"),
                "m3 changed after the block"
            );
        }
        let (_log, mut sm) = reopen(dir.path()).unwrap();
        let view = sm.view();
        assert_eq!(view.read(|l| l.state.clone()), expected);
        assert_eq!(view.indexed(true, "m3").unwrap(), scanned(&view, "m3"));
        // The block that was open at the restart ends and is written like any other.
        sm.apply(fleet_churn(end + 1, 3 * BLOCK + 10))
            .await
            .unwrap();
        assert_eq!(view.indexed(true, "m7").unwrap(), scanned(&view, "m7"));
        let state = view.read(|l| l.state.clone());
        drop((sm, view, _log));
        let (_log, sm) = reopen(dir.path()).unwrap();
        assert_eq!(sm.view().read(|l| l.state.clone()), state);
        assert_eq!(
            sm.view().indexed(true, "m7").unwrap(),
            scanned(&sm.view(), "m7")
        );
    });
}

#[test]
fn a_snapshot_installed_mid_block_leaves_the_same_index_and_state_as_the_leader() {
    use crate::journal_store::BLOCK;
    let end = 3 * BLOCK + 300;
    runtime().block_on(async {
        let (leader_dir, follower_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
        let (_leader_log, mut leader) = crate::open(leader_dir.path()).unwrap();
        leader.apply(fleet_churn(1, end)).await.unwrap();
        let snapshot = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let (_follower_log, mut follower) = crate::open(follower_dir.path()).unwrap();
        // The follower stopped part way through the second block.
        follower.apply(fleet_churn(1, BLOCK + 700)).await.unwrap();
        install(&mut follower, snapshot).await;
        let (leader_view, follower_view) = (leader.view(), follower.view());
        let state = leader_view.read(|l| l.state.clone());
        assert_eq!(follower_view.read(|l| l.state.clone()), state);
        for host in ["m0", "m5", "m9"] {
            assert_eq!(
                follower_view.indexed(true, host).unwrap(),
                leader_view.indexed(true, host).unwrap()
            );
            assert_eq!(
                follower_view.indexed(true, host).unwrap(),
                scanned(&leader_view, host)
            );
        }
        drop((follower, follower_view, _follower_log));
        let (_log, reopened) = reopen(follower_dir.path()).unwrap();
        assert_eq!(reopened.view().read(|l| l.state.clone()), state);
        assert_eq!(
            reopened.view().indexed(true, "m5").unwrap(),
            scanned(&leader_view, "m5")
        );
    });
}

#[test]
fn a_format_5_audit_index_is_rebuilt_by_block() {
    use crate::journal_store::BLOCK;
    use crate::keys::StateKey;
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let end = BLOCK + 30;
        let state = {
            let (_log, mut sm) = crate::open(dir.path()).unwrap();
            sm.apply(fleet_churn(1, end)).await.unwrap();
            sm.view().read(|l| l.state.clone())
        };
        {
            // As format 5 left it: a key per (name, record), and records at the head.
            let db = raw_sled(dir.path());
            let tree = db.open_tree("state").unwrap();
            for item in tree.scan_prefix([StateKey::MACHINE_EVENTS]) {
                tree.remove(item.unwrap().0).unwrap();
            }
            tree.remove(StateKey::RecordsAt.encode()).unwrap();
            for index in 1..=end {
                let host = format!("m{}", index % 10);
                tree.insert(StateKey::MachineEvent(host, index).encode(), &[][..])
                    .unwrap();
            }
            for machine in state.machines() {
                tree.insert(
                    StateKey::Machine(machine.hostname.clone()).encode(),
                    crate::durable::encode(machine),
                )
                .unwrap();
            }
            tree.insert(StateKey::Format.encode(), crate::durable::encode(&5u32))
                .unwrap();
            db.flush().unwrap();
        }
        let (_log, sm) = reopen(dir.path()).unwrap();
        let view = sm.view();
        assert_eq!(view.read(|l| l.state.clone()), state);
        assert_eq!(view.indexed(true, "m4").unwrap(), scanned(&view, "m4"));
        drop((sm, view, _log));
        let db = raw_sled(dir.path());
        let tree = db.open_tree("state").unwrap();
        assert_eq!(tree.scan_prefix([StateKey::MACHINE_EVENT]).count(), 0);
        assert_eq!(tree.scan_prefix([StateKey::MACHINE_EVENTS]).count(), 10);
    });
}
