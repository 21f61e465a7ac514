//! `subd`: keeps one machine on its required image. See `dom_agent` for how.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use dom_agent::scan::{default_exclusions, measure_read_speed, ScanConfig};
use dom_agent::sweep::Scanner;
use dom_agent::sync::{Agent, AgentConfig};
use dom_agent::update::{Services, Updater};
use dom_storage::image::Filter;
use dom_storage::objects::ObjectStore;

/// The dom agent: scans this machine, reports how it differs from its image to the leader,
/// and applies the updates the leader directs.
#[derive(Parser, Debug)]
#[command(name = "subd", version)]
struct Cli {
    /// This machine's name in the fleet.
    #[arg(long)]
    hostname: String,
    /// The tree to manage (`/` in production).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Controller replicas, HOST:PORT,...; the agent finds the leader among them.
    #[arg(long, value_delimiter = ',', required = true)]
    controllers: Vec<String>,
    /// The agent's own directory (object cache, update journal, base image); never scanned.
    #[arg(long, default_value = "/var/lib/subd")]
    state_dir: PathBuf,
    /// Checksum sweep read rate in bytes/s; 0 = unlimited. Default: 2% of the read speed
    /// measured at start.
    #[arg(long)]
    scan_bytes_per_sec: Option<u64>,
    /// Object download rate in bytes/s; 0 = unlimited.
    #[arg(long, default_value_t = 64 << 20)]
    fetch_bytes_per_sec: u64,
    /// Run as `CMD SERVICE start|stop|reload` (`systemctl ACTION SERVICE` for systemctl).
    #[arg(long, default_value = "systemctl")]
    service_cmd: String,
    /// Run (through sh -c) after each update; exit 0 means healthy.
    #[arg(long)]
    health_cmd: Option<String>,
    /// Run (through sh -c) when a DoReboot trigger fired.
    #[arg(long)]
    reboot_cmd: Option<String>,
    /// More paths to leave alone (a regex matched against the whole path); repeatable.
    #[arg(long = "exclude", value_name = "REGEX")]
    excluded: Vec<String>,
    /// Leave out the default exclusions (the contents of /tmp, /var/log, /home, /proc, ...).
    #[arg(long)]
    no_default_exclusions: bool,
    /// Seconds between metadata passes (stat only) that catch ordinary changes.
    #[arg(long, default_value_t = 2.0)]
    metadata_interval_secs: f64,
}

/// `path` as a filter line naming it and what lies below, when it is inside `root`.
fn inside(root: &std::path::Path, path: &std::path::Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let rel = rel.to_str()?;
    if rel.is_empty() {
        return None;
    }
    Some(regex::escape(&format!("/{rel}")))
}

fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = state_dir.join("lock");
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another subd is using the state dir {}",
            state_dir.display()
        );
    }
    Ok(file)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let hostname = dom_storage::names::canonical_hostname(&cli.hostname)?;
    let root = std::fs::canonicalize(&cli.root)
        .with_context(|| format!("--root {}", cli.root.display()))?;
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("creating --state-dir {}", cli.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&cli.state_dir)?;
    let _lock = lock_state_dir(&state_dir)?;
    let objects = ObjectStore::open(&state_dir.join("objects"))?;
    let services = Services {
        service_cmd: cli.service_cmd.clone(),
        health_cmd: cli.health_cmd.clone(),
        reboot_cmd: cli.reboot_cmd.clone(),
    };
    let updater = Arc::new(Updater::new(&root, &state_dir, services)?);
    let last_report = match updater.recover() {
        Some(report) => {
            tracing::warn!(image = %report.image, outcome = ?report.outcome, "finished an update a crash had interrupted");
            Some(report)
        }
        None => updater.last_report(),
    };

    let mut excluded = if cli.no_default_exclusions {
        Vec::new()
    } else {
        default_exclusions()
    };
    excluded.extend(cli.excluded.iter().cloned());
    excluded.extend(inside(&root, &state_dir));
    excluded.extend(inside(&root, updater.staging_dir()));
    Filter::new(excluded.clone()).context("--exclude")?;

    let scan_rate = match cli.scan_bytes_per_sec {
        Some(0) => None,
        Some(n) => Some(n),
        None => {
            let speed = measure_read_speed(&root);
            // 2% of the storage's speed, and never so slow that a sweep stalls outright.
            let rate = (speed / 50).max(1 << 20);
            tracing::info!(
                measured_bytes_per_sec = speed,
                sweep_bytes_per_sec = rate,
                "scan rate"
            );
            Some(rate)
        }
    };
    let (scanner, trees) = Scanner::start(
        ScanConfig {
            root: root.clone(),
            excluded: Filter::new(excluded.clone())?,
            bytes_per_sec: scan_rate,
            one_file_system: true,
            strict: false,
        },
        Duration::from_secs_f64(cli.metadata_interval_secs.max(0.1)),
    );
    let agent = Agent::new(
        AgentConfig {
            hostname,
            root,
            state_dir,
            controllers: cli.controllers.clone(),
            fetch_bytes_per_sec: (cli.fetch_bytes_per_sec > 0).then_some(cli.fetch_bytes_per_sec),
            excluded,
        },
        objects,
        updater,
        scanner,
        trees,
        last_report,
    )?;
    tokio::select! {
        result = agent.run() => result,
        _ = shutdown() => {
            tracing::info!("stopping");
            Ok(())
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

// Returns rather than exits, so the log's queued lines are written out on the way.
fn main() -> std::process::ExitCode {
    let _log = dom_proto::logging::init("info");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("subd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("subd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
