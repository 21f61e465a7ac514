//! Benchmarks live in `benches/`; see `cargo bench -p dom-benches`.
