//! The event log's hot paths, each beside its alternative:
//! - a durable append (sled flush + fdatasync, what dom acknowledges on) beside sled's own
//!   flush (sync_file_range only), to show what real durability costs;
//! - folding events into the fleet state beside decoding (and encoding) them alone;
//! - extending the journal's hash chain;
//! - the whole replay fold (chain check on one thread, decode and apply on the other) beside
//!   its decode-and-apply half alone, over `dom-bench replay`'s workload, to show which half
//!   bounds it.

use std::collections::BTreeMap;
use std::time::Duration;

// Every dom binary links jemalloc, and the fold's figures depend on the allocator (glibc
// malloc is several times slower freeing on one thread what another allocated).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dom_storage::durable::Durable;
use dom_storage::event::{Change, Event};
use dom_storage::fleet::FleetState;
use dom_storage::journal::JournalHead;
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

fn replay(c: &mut Criterion) {
    const N: u64 = 200_000;
    let records = dom_benches::journal::records(N);
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
    // The whole replay's source: the journal read back from sled's cache, as `domadm audit
    // replay` and `dom-bench replay` fold it. Written (through the state machine, some
    // seconds) only when one of these benches runs.
    let dir = tempfile::tempdir().expect("temp dir");
    let store = std::sync::OnceLock::new();
    let view = || {
        let (_log, sm) = store.get_or_init(|| {
            dom_benches::journal::generate(dir.path(), N);
            let store = dom_storage::open_when_released(dir.path(), Duration::from_secs(10))
                .expect("open store");
            let view = store.1.view();
            assert_eq!(
                view.journal(1, u64::MAX).count() as u64,
                N,
                "warm the cache"
            );
            store
        });
        sm.view()
    };
    group.bench_function("fold_from_sled_cache", |b| {
        let view = view();
        b.iter(|| {
            let replayed = Replay::new(Until::End)
                .fold(view.journal(1, u64::MAX))
                .expect("fold");
            assert_eq!(replayed.head().index, N);
            replayed
        })
    });
    group.bench_function("read_from_sled_cache", |b| {
        let view = view();
        b.iter(|| {
            view.journal(1, u64::MAX)
                .map(|r| r.expect("record").0)
                .sum::<u64>()
        })
    });
    group.finish();
}

criterion_group!(benches, append, fold, replay);
criterion_main!(benches);
