//! domd: one controller replica of a dom cluster.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use dom_controller::replica::{self, ReplicaConfig};
use serde::Deserialize;

const EXAMPLES: &str = "\
Example: a three-replica cluster on one host
  domd --id 1 --listen 127.0.0.1:6971 --data-dir /var/lib/dom/1 \\
       --peers 1=127.0.0.1:6971,2=127.0.0.1:6972,3=127.0.0.1:6973
  (and the same with --id 2 and --id 3; the lowest id forms the cluster when all start empty)";

#[derive(Parser, Debug)]
#[command(name = "domd", version, about = "One controller replica of a dom cluster", after_help = EXAMPLES)]
struct Args {
    /// This replica's id: one of the ids in --peers.
    #[arg(long)]
    id: Option<u64>,
    /// Address to serve gRPC on (Raft, admin API).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Directory for the Raft log, the fleet state, the journal and snapshots.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Every replica: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT.
    #[arg(long, value_name = "ID=HOST:PORT,...")]
    peers: Option<String>,
    /// TOML file with any of: id, listen, data_dir, peers, snapshot_logs, heartbeat_ms,
    /// election_timeout_ms, gc_interval_secs, gc_grace_secs. Flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Snapshot, and allow purging the Raft log behind it, every this many entries.
    #[arg(long, value_name = "N")]
    snapshot_logs: Option<u64>,
    /// Leader heartbeat interval in milliseconds.
    #[arg(long, value_name = "MS")]
    heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, value_name = "MS")]
    election_timeout_ms: Option<u64>,
    /// Seconds between looks for objects no live image references.
    #[arg(long, value_name = "SECONDS")]
    gc_interval_secs: Option<u64>,
    /// Seconds an unreferenced object must have been unused before it is removed.
    #[arg(long, value_name = "SECONDS")]
    gc_grace_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    peers: Option<String>,
    snapshot_logs: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    gc_interval_secs: Option<u64>,
    gc_grace_secs: Option<u64>,
}

fn config(args: Args) -> anyhow::Result<ReplicaConfig> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(id) = args.id.or(file.id) else {
        bail!("--id is required")
    };
    let Some(listen) = args.listen.or(file.listen) else {
        bail!("--listen is required")
    };
    let Some(data_dir) = args.data_dir.or(file.data_dir) else {
        bail!("--data-dir is required")
    };
    let Some(peers) = args.peers.or(file.peers) else {
        bail!("--peers is required")
    };
    let peers: BTreeMap<u64, String> =
        replica::parse_peers(&peers).map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
    let mut config = ReplicaConfig::new(id, listen, data_dir, peers);
    if let Some(n) = args.snapshot_logs.or(file.snapshot_logs) {
        config.snapshot_logs = n.max(1);
    }
    if let Some(ms) = args.heartbeat_ms.or(file.heartbeat_ms) {
        config.heartbeat_ms = ms;
    }
    if let Some(ms) = args.election_timeout_ms.or(file.election_timeout_ms) {
        config.election_timeout_ms = ms;
    }
    if let Some(secs) = args.gc_interval_secs.or(file.gc_interval_secs) {
        config.gc_interval = std::time::Duration::from_secs(secs.max(1));
    }
    if let Some(secs) = args.gc_grace_secs.or(file.gc_grace_secs) {
        config.gc_grace = std::time::Duration::from_secs(secs);
    }
    Ok(config)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _log = dom_proto::logging::init("info,openraft=warn,sled=warn,h2=warn,tower=warn");
    let result = async {
        let config = config(Args::parse())?;
        replica::run(config, shutdown_signal()).await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
