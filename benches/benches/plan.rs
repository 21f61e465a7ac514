//! The reconciler's hot paths, each beside the alternative the design avoids:
//! - the manifest diff (one merge pass over two sorted manifests) beside a diff through a hash
//!   map of paths;
//! - planning a machine described as a delta from its base with the shared image transition,
//!   beside planning it from its whole tree (what a leader holding every machine's tree does);
//! - applying an agent's description of its changed paths to its delta, beside working the
//!   delta out from the machine's whole tree.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dom_storage::image::{diff, Difference, Entry, Filter, Manifest};
use dom_storage::plan::{plan, Delta, Target, Transition};

/// An image of `files` files in directories of 200; `version` changes every 100th file.
fn image(files: usize, version: u8) -> Manifest {
    let mut entries = vec![Entry::directory("/", 0o755, 0, 0)];
    for i in 0..files {
        if i % 200 == 0 {
            entries.push(Entry::directory(&format!("/d{:04}", i / 200), 0o755, 0, 0));
        }
        let v = if i % 100 == 0 { version } else { 1 };
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
        hash[8] = v;
        entries.push(Entry::file(
            &format!("/d{:04}/f{i:06}", i / 200),
            0o644,
            0,
            0,
            100,
            hash,
        ));
    }
    Manifest::new(entries).expect("manifest")
}

fn hash_map_diff(a: &Manifest, b: &Manifest) -> usize {
    let old: HashMap<&str, &Entry> = a.entries().iter().map(|e| (e.path.as_str(), e)).collect();
    let mut changed = 0;
    for e in b.entries() {
        if old.get(e.path.as_str()) != Some(&e) {
            changed += 1;
        }
    }
    let new: HashMap<&str, ()> = b.entries().iter().map(|e| (e.path.as_str(), ())).collect();
    changed
        + a.entries()
            .iter()
            .filter(|e| !new.contains_key(e.path.as_str()))
            .count()
}

fn manifests(c: &mut Criterion) {
    let (v1, v2) = (image(40_000, 1), image(40_000, 2));
    let mut group = c.benchmark_group("manifest_diff_40k");
    group.throughput(Throughput::Elements(v1.entries().len() as u64));
    group.bench_function("merge_pass", |b| b.iter(|| diff(&v1, &v2).len()));
    group.bench_function("hash_map", |b| b.iter(|| hash_map_diff(&v1, &v2)));
    group.finish();
}

fn planning(c: &mut Criterion) {
    let (v1, v2) = (image(40_000, 1), image(40_000, 2));
    let filter = Filter::empty();
    let target = Target {
        name: "v2",
        manifest: &v2,
        filter: &filter,
        triggers: &[],
    };
    let transition = Transition::new(Some(&v1), &v2);
    let whole = Transition::new(None, &v2);
    let whole_tree = Delta::between(None, &v1);
    let mut group = c.benchmark_group("plan_one_machine_40k");
    group.bench_function("delta_from_base_shared_transition", |b| {
        b.iter(|| {
            plan(&target, Some(&v1), &transition, &Delta::new(), &filter)
                .steps
                .len()
        })
    });
    group.bench_function("whole_tree", |b| {
        b.iter(|| {
            plan(&target, None, &whole, &whole_tree, &filter)
                .steps
                .len()
        })
    });
    group.finish();
}

fn delta_apply(c: &mut Criterion) {
    let (v1, v2) = (image(40_000, 1), image(40_000, 2));
    let changed: Vec<Entry> = diff(&v1, &v2)
        .into_iter()
        .filter_map(|d| match d {
            Difference::Added(e) | Difference::Changed { to: e, .. } => Some(e.clone()),
            Difference::Removed(_) => None,
        })
        .collect();
    let mut group = c.benchmark_group("delta_40k_files_1pct_changed");
    group.throughput(Throughput::Elements(changed.len() as u64));
    group.bench_function("apply_described_changes", |b| {
        b.iter(|| {
            let mut delta = Delta::new();
            for entry in &changed {
                delta.differs(entry.clone());
            }
            delta.len()
        })
    });
    group.bench_function("from_whole_tree", |b| {
        b.iter(|| Delta::between(Some(&v1), &v2).len())
    });
    group.finish();
}

criterion_group!(benches, manifests, planning, delta_apply);
criterion_main!(benches);
