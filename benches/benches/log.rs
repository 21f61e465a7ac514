//! The event log's hot paths, each beside its alternative:
//! - a durable append (sled flush + fdatasync, what dom acknowledges on) beside sled's own
//!   flush (sync_file_range only), to show what real durability costs;
//! - folding events into the fleet state beside decoding (and encoding) them alone;
//! - extending the journal's hash chain.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dom_storage::durable::Durable;
use dom_storage::event::{Change, Event};
use dom_storage::fleet::FleetState;
use dom_storage::journal::JournalHead;

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

criterion_group!(benches, append, fold);
criterion_main!(benches);
