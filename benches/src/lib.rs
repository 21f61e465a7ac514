//! Benchmarks live in `benches/`; see `cargo bench -p dom-benches`. This library holds what
//! `dom-bench` subcommands share: the simulated agents of `dom-bench agents`.

pub mod agents;
