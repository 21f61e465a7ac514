//! `domadm status`: what the leader knows of each machine from its agent.

use std::time::Duration;

use clap::Args;
use dom_proto::v1 as pb;
use serde::Serialize;

use crate::output::{self, dash, rfc3339};
use crate::Context;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  domadm status\n  domadm status web-01 -o json\n  domadm status --watch"
)]
pub struct Status {
    /// One machine, with its drift paths.
    host: Option<String>,
    /// Print again every two seconds until interrupted.
    #[arg(long)]
    watch: bool,
}

#[derive(Serialize)]
struct LastUpdate {
    image: String,
    outcome: String,
    error: Option<String>,
    duration_ms: u64,
    activation_ms: u64,
    finished: String,
    steps: u64,
    services: Vec<String>,
}

#[derive(Serialize)]
struct Drift {
    path: String,
    first_seen: String,
    corrected: bool,
}

#[derive(Serialize)]
pub struct MachineStatus {
    hostname: String,
    required_image: Option<String>,
    planned_image: Option<String>,
    pub active_image: Option<String>,
    pub state: String,
    last_seen: Option<String>,
    deviations: u64,
    last_update: Option<LastUpdate>,
    drift: Vec<Drift>,
    connected: bool,
    detail: Option<String>,
    fetch: Option<Fetch>,
    root_hash: Option<String>,
    swept: bool,
    last_fetch: Option<LastFetch>,
    preloaded_image: Option<String>,
    paused_until: Option<String>,
}

#[derive(Serialize)]
struct LastFetch {
    image: String,
    preload: bool,
    objects_downloaded: u64,
    bytes_downloaded: u64,
    objects_total: u64,
    bytes_total: u64,
    finished: String,
}

#[derive(Serialize)]
struct Fetch {
    objects_done: u64,
    objects_total: u64,
    bytes_done: u64,
    bytes_total: u64,
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn from_pb(m: pb::MachineStatus) -> MachineStatus {
    MachineStatus {
        hostname: m.hostname,
        required_image: some(m.required_image),
        planned_image: some(m.planned_image),
        active_image: some(m.active_image),
        state: m.state,
        last_seen: (m.last_seen_unix_ms != 0).then(|| rfc3339(m.last_seen_unix_ms)),
        deviations: m.deviations,
        last_update: m.last_update.map(|u| LastUpdate {
            image: u.image,
            outcome: u.outcome,
            error: some(u.error),
            duration_ms: u.duration_ms,
            activation_ms: u.activation_ms,
            finished: rfc3339(u.finished_unix_ms),
            steps: u.steps,
            services: u.services,
        }),
        drift: m
            .drift
            .into_iter()
            .map(|d| Drift {
                path: d.path,
                first_seen: rfc3339(d.first_seen_unix_ms),
                corrected: d.corrected,
            })
            .collect(),
        connected: m.connected,
        detail: some(m.detail),
        fetch: (m.fetch_objects_total > 0).then_some(Fetch {
            objects_done: m.fetch_objects_done,
            objects_total: m.fetch_objects_total,
            bytes_done: m.fetch_bytes_done,
            bytes_total: m.fetch_bytes_total,
        }),
        root_hash: (!m.root_hash.is_empty()).then(|| hex::encode(&m.root_hash)),
        swept: m.swept,
        last_fetch: m.last_fetch.map(|f| LastFetch {
            image: f.image,
            preload: f.preload,
            objects_downloaded: f.objects_downloaded,
            bytes_downloaded: f.bytes_downloaded,
            objects_total: f.objects_total,
            bytes_total: f.bytes_total,
            finished: rfc3339(f.finished_unix_ms),
        }),
        preloaded_image: some(m.preloaded_image),
        paused_until: (m.paused_until_unix_ms != 0).then(|| rfc3339(m.paused_until_unix_ms)),
    }
}

fn last_update_cell(u: &Option<LastUpdate>) -> String {
    match u {
        None => "-".into(),
        Some(u) => format!(
            "{} {} in {:.1}s",
            u.outcome,
            u.image,
            u.duration_ms as f64 / 1000.0
        ),
    }
}

/// `Admin.Status` for one machine, or every machine when `hostname` is empty.
async fn fetch(ctx: &mut Context, hostname: &str) -> anyhow::Result<pb::StatusResponse> {
    let host = hostname.to_owned();
    Ok(ctx
        .cluster
        .call(|c| {
            let hostname = host.clone();
            async move {
                crate::client::admin(c)
                    .status(pb::StatusRequest { hostname })
                    .await
            }
        })
        .await?)
}

/// What status knows of one machine (for `machine show`).
pub async fn one(ctx: &mut Context, hostname: &str) -> anyhow::Result<MachineStatus> {
    fetch(ctx, hostname)
        .await?
        .machines
        .into_iter()
        .next()
        .map(from_pb)
        .ok_or_else(|| anyhow::anyhow!("no status for {hostname}"))
}

impl Status {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        loop {
            let reply = fetch(ctx, self.host.as_deref().unwrap_or_default()).await?;
            self.print(ctx, reply)?;
            if !self.watch {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }

    fn print(&self, ctx: &Context, reply: pb::StatusResponse) -> anyhow::Result<()> {
        let halted = reply.halted.then(|| reply.halt_reason.clone());
        let machines: Vec<MachineStatus> = reply.machines.into_iter().map(from_pb).collect();
        if ctx.output == output::Format::Json {
            if self.watch {
                println!("{}", serde_json::to_string(&machines)?);
                return Ok(());
            }
            return output::print(ctx.output, &machines, &[], vec![]);
        }
        if self.watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            print!("\x1b[2J\x1b[H");
        }
        if let Some(reason) = halted {
            println!("UPDATES HALTED: {}\n", dash(&reason));
        }
        let rows = machines
            .iter()
            .map(|m| {
                vec![
                    m.hostname.clone(),
                    m.required_image.clone().unwrap_or_else(|| "-".into()),
                    m.active_image.clone().unwrap_or_else(|| "-".into()),
                    m.state.clone(),
                    m.deviations.to_string(),
                    m.last_seen.clone().unwrap_or_else(|| "-".into()),
                    last_update_cell(&m.last_update),
                    m.detail.clone().unwrap_or_default(),
                ]
            })
            .collect();
        output::print(
            ctx.output,
            &machines,
            &[
                "HOSTNAME",
                "REQUIRED",
                "ACTIVE",
                "STATE",
                "DEVIATIONS",
                "LAST SEEN",
                "LAST UPDATE",
                "DETAIL",
            ],
            rows,
        )?;
        if self.host.is_some() {
            for m in &machines {
                if let Some(u) = &m.last_update {
                    if let Some(e) = &u.error {
                        println!("\nlast update error: {e}");
                    }
                }
                if !m.drift.is_empty() {
                    println!("\ndrift (changed behind the system's back):");
                    for d in &m.drift {
                        println!(
                            "  {}  first seen {}{}",
                            d.path,
                            d.first_seen,
                            if d.corrected { "  (corrected)" } else { "" }
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
