//! Benchmarks live in `benches/`; see `cargo bench -p dom-benches`. This library holds what
//! `dom-bench` subcommands and the benches share: the simulated agents of `dom-bench agents`,
//! the journal of `dom-bench replay`.

pub mod agents;
pub mod journal;
pub mod writes;

/// etcd's KV.Put, for the writes benchmark's side-by-side run.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
