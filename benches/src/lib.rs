//! Benchmarks live in `benches/`; see `cargo bench -p dom-benches`. This library holds what
//! `dom-bench` subcommands share: the simulated agents of `dom-bench agents`.

pub mod agents;
pub mod writes;

/// etcd's KV.Put, for the writes benchmark's side-by-side run.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
