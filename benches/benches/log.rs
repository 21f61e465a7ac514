//! The event log's hot paths, each beside its alternative:
//! - a durable append (sled flush + fdatasync, what dom acknowledges on) beside sled's own
//!   flush (sync_file_range only), to show what real durability costs;
//! - folding events into the fleet state beside decoding (and encoding) them alone;
//! - extending the journal's hash chain;
//! - the whole replay fold (chain check on one thread, decode and apply on the other) beside
//!   its decode-and-apply half alone, over `dom-bench replay`'s workload, to show which half
//!   bounds it.

use std::collections::BTreeMap;

// Every dom binary links jemalloc, and the fold's figures depend on the allocator (glibc
// malloc is several times slower freeing on one thread what another allocated).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dom_storage::durable::Durable;
use dom_storage::event::{Change, Event};
use dom_storage::fleet::FleetState;
use dom_storage::journal::{JournalHead, JournalRecord};
use dom_storage::replay::{Replay, Until};

fn events(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let change = if i % 2 == 0 {
                Change::MachineAdded {
                    hostname: format!("web-{i:07}"),
                    tags: BTreeMap::from([("role".into(), "web".into())]),
                    required_image: None,
                    planned_image: None,
                }
            } else {
                Change::MachineUpdated {
                    hostname: format!("web-{:07}", i - 1),
                    tags: BTreeMap::from([("role".into(), "db".into())]),
                }
            };
            Event {
                actor: "bench".into(),
                time_unix_ms: i as i64,
                reason: "bench".into(),
                change,
            }
            .encode()
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let durable = Durable::open(&dir.path().join("sled")).expect("open sled");
    let tree = durable.db.open_tree("bench").expect("tree");
    let value = vec![7u8; 200];
    let mut key = 0u64;
    let mut group = c.benchmark_group("append_one_entry");
    group.sample_size(20);
    group.bench_function("sled_flush_only", |b| {
        b.iter(|| {
            key += 1;
            tree.insert(key.to_be_bytes(), value.as_slice())
                .expect("insert");
            durable.db.flush().expect("flush");
        })
    });
    group.bench_function("durable_sync_fdatasync", |b| {
        b.iter(|| {
            key += 1;
            tree.insert(key.to_be_bytes(), value.as_slice())
                .expect("insert");
            durable.sync().expect("sync");
        })
    });
    group.finish();
}

fn fold(c: &mut Criterion) {
    const N: usize = 10_000;
    let encoded = events(N);
    let mut group = c.benchmark_group("fold_10k_events");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("decode_only", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|e| Event::decode(e).expect("decode"))
                .collect::<Vec<_>>()
        })
    });
    let decoded: Vec<Event> = encoded
        .iter()
        .map(|e| Event::decode(e).expect("decode"))
        .collect();
    group.bench_function("encode_only", |b| {
        b.iter(|| decoded.iter().map(|e| e.encode().len()).sum::<usize>())
    });
    group.bench_function("decode_and_apply", |b| {
        b.iter_batched(
            FleetState::default,
            |mut state| {
                for (i, e) in encoded.iter().enumerate() {
                    let event = Event::decode(e).expect("decode");
                    state.apply(i as u64 + 1, &event).expect("apply");
                }
                state
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("decode_apply_and_chain", |b| {
        b.iter_batched(
            FleetState::default,
            |mut state| {
                let mut head = JournalHead::default();
                for (i, e) in encoded.iter().enumerate() {
                    let event = Event::decode(e).expect("decode");
                    state.apply(i as u64 + 1, &event).expect("apply");
                    head = head.next(e);
                }
                head
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// `dom-bench replay`'s journal (`generate_journal`), held in memory: 10 images, a machine
/// for every 20 events, the rest each setting one machine's required image.
fn replay_journal(events: u64) -> Vec<(u64, JournalRecord)> {
    let machines = (events / 20).max(1);
    let change = |i: u64| -> Change {
        if i < 10 {
            return Change::ImageAdded {
                name: format!("img/{i}"),
                root_hash: [i as u8; 32],
                files: 1,
                bytes: 1,
                manifest_hash: None,
                filter: vec![],
                triggers: vec![],
            };
        }
        let n = i - 10;
        if n < machines {
            return Change::MachineAdded {
                hostname: format!("host-{n:07}"),
                tags: Default::default(),
                required_image: Some("img/0".into()),
                planned_image: None,
            };
        }
        Change::RequiredImageSet {
            hostnames: vec![format!("host-{:07}", n % machines)],
            image: Some(format!("img/{}", n % 10)),
        }
    };
    let mut head = JournalHead::default();
    (0..events)
        .map(|i| {
            let event = Event {
                actor: "bench".into(),
                time_unix_ms: i as i64,
                reason: String::new(),
                change: change(i),
            }
            .encode();
            head = head.next(&event);
            let record = JournalRecord {
                log_index: i + 1,
                hash: head.hash,
                event,
            };
            (head.index, record)
        })
        .collect()
}

fn replay(c: &mut Criterion) {
    const N: u64 = 200_000;
    let records = replay_journal(N);
    let mut group = c.benchmark_group("replay_200k_events");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    group.bench_function("fold", |b| {
        b.iter(|| {
            let replayed = Replay::new(Until::End)
                .fold(records.iter().cloned().map(Ok::<_, String>))
                .expect("fold");
            assert_eq!(replayed.head().index, N);
            replayed
        })
    });
    group.bench_function("decode_and_apply", |b| {
        b.iter_batched(
            FleetState::default,
            |mut state| {
                for (index, record) in &records {
                    let event = Event::decode(&record.event).expect("decode");
                    // As the fold applies: nothing is persisted, so nothing touched is named.
                    state.apply_untracked(*index, &event).expect("apply");
                }
                state
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("chain_only", |b| {
        b.iter(|| {
            dom_storage::journal::verify(
                JournalHead::default(),
                records.iter().map(|(i, r)| (*i, r)),
            )
            .expect("intact")
        })
    });
    group.finish();
}

criterion_group!(benches, append, fold, replay);
criterion_main!(benches);
