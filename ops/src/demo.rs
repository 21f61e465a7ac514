//! `domadm demo`: a three-replica cluster on loopback, shown working.
//!
//! This first version shows the replicated fleet log: replicas elect a leader, machines are
//! added through it, the leader is killed, another takes over with nothing lost, and the old
//! one rejoins and catches up. Agents and images join the demo with their own issues.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use dom_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};

use crate::client::Cluster;
use crate::cluster::ClusterCommand;
use crate::machine::MachineCommand;
use crate::output::Format;
use crate::Context;

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  domadm demo --machines 10 --exit-when-converged")]
pub struct Demo {
    /// Where replicas keep their data and logs (default: a fresh temporary directory, removed
    /// at exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// How many machines to add.
    #[arg(long, default_value_t = 5, value_name = "N")]
    machines: u32,
    /// Exit once the cluster has converged instead of running until Ctrl-C.
    #[arg(long)]
    exit_when_converged: bool,
}

struct Replica {
    id: u64,
    addr: String,
    child: Option<Child>,
}

struct Replicas {
    domd: PathBuf,
    dir: PathBuf,
    peers: String,
    list: Vec<Replica>,
}

impl Replicas {
    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let replica = &mut self.list[index];
        let log_path = self.dir.join(format!("replica-{}.log", replica.id));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&self.domd)
            .args([
                "--id",
                &replica.id.to_string(),
                "--listen",
                &replica.addr,
                "--peers",
                &self.peers,
            ])
            .arg("--data-dir")
            .arg(self.dir.join(format!("replica-{}", replica.id)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.domd.display()))?;
        replica.child = Some(child);
        Ok(())
    }

    fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.list[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn endpoints(&self) -> String {
        self.list
            .iter()
            .map(|r| r.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for replica in &mut self.list {
            if let Some(mut child) = replica.child.take() {
                // SIGTERM first so replicas stop cleanly; SIGKILL whatever lingers.
                terminate(&child);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn terminate(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

fn domd_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating domadm")?;
    let domd = exe.with_file_name("domd");
    if !domd.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            domd.display()
        );
    }
    Ok(domd)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls cluster status until `done` picks a value out of it, for at most 30 s.
async fn wait_for<T>(
    cluster: &mut Cluster,
    what: &str,
    done: impl Fn(&ClusterStatusResponse) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster
            .call(|c| async move {
                crate::client::admin(c)
                    .cluster_status(ClusterStatusRequest {})
                    .await
            })
            .await;
        if let Some(value) = status.ok().as_ref().and_then(&done) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within 30 s; see the replica logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn leader(cluster: &mut Cluster, not: Option<u64>) -> anyhow::Result<u64> {
    wait_for(cluster, "a leader election", |s| {
        Some(s.leader).filter(|l| *l != 0 && Some(*l) != not)
    })
    .await
}

async fn converged(cluster: &mut Cluster) -> anyhow::Result<()> {
    wait_for(cluster, "replica convergence", |s| {
        let first = s
            .members
            .first()
            .map(|m| (m.applied_index, &m.journal_hash));
        s.members
            .iter()
            .all(|m| m.role != "unreachable" && Some((m.applied_index, &m.journal_hash)) == first)
            .then_some(())
    })
    .await
}

fn step(text: &str) {
    println!("\n==> {text}");
}

impl Demo {
    pub async fn run(self, actor: Option<String>) -> anyhow::Result<()> {
        let temp;
        let dir: &Path = match &self.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                dir
            }
            None => {
                temp = tempfile::Builder::new()
                    .prefix("dom-demo-")
                    .tempdir()
                    .context("creating a temp dir")?;
                temp.path()
            }
        };
        let mut list = Vec::new();
        for id in 1..=3 {
            list.push(Replica {
                id,
                addr: format!("127.0.0.1:{}", free_port()?),
                child: None,
            });
        }
        let peers = list
            .iter()
            .map(|r| format!("{}={}", r.id, r.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut replicas = Replicas {
            domd: domd_path()?,
            dir: dir.to_owned(),
            peers,
            list,
        };
        step(&format!(
            "starting three domd replicas under {}",
            dir.display()
        ));
        for index in 0..3 {
            replicas.spawn(index)?;
        }
        let endpoints = replicas.endpoints();
        let mut demo = Context {
            cluster: Cluster::new(&endpoints).map_err(anyhow::Error::msg)?,
            output: Format::Table,
            actor: actor
                .or_else(|| std::env::var("USER").ok())
                .or(Some("demo".into())),
            reason: "domadm demo".into(),
        };
        let first = leader(&mut demo.cluster, None).await?;
        println!("replica {first} was elected leader");
        ClusterCommand::Status.run(&mut demo).await?;

        step(&format!(
            "adding {} machines through the leader",
            self.machines
        ));
        for i in 1..=self.machines {
            let tags = vec![(
                "role".to_owned(),
                if i % 2 == 0 { "db" } else { "web" }.to_owned(),
            )];
            MachineCommand::Add {
                host: format!("demo-{i:02}"),
                tags,
                required: None,
                planned: None,
            }
            .run(&mut demo)
            .await?;
        }
        MachineCommand::List.run(&mut demo).await?;

        step(&format!(
            "killing the leader (replica {first}) with SIGKILL"
        ));
        let started = Instant::now();
        replicas.kill((first - 1) as usize);
        let second = leader(&mut demo.cluster, Some(first)).await?;
        println!(
            "replica {second} leads after {:.1} s; every machine is still there:",
            started.elapsed().as_secs_f64()
        );
        MachineCommand::List.run(&mut demo).await?;

        step(&format!(
            "restarting replica {first}: it rejoins from its data dir and catches up"
        ));
        replicas.spawn((first - 1) as usize)?;
        converged(&mut demo.cluster).await?;
        ClusterCommand::Status.run(&mut demo).await?;

        if self.exit_when_converged {
            step("converged; stopping the replicas");
            return Ok(());
        }
        step("the cluster keeps running; try, in another terminal:");
        println!("  export DOM_ENDPOINTS={endpoints}");
        println!("  domadm cluster status");
        println!("  domadm machine add web-99 --tag role=web --reason 'trying dom'");
        println!("  domadm machine list -o json");
        println!("  domadm machine remove web-99");
        println!(
            "replica logs: {}/replica-N.log; Ctrl-C stops everything",
            dir.display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        step("stopping the replicas");
        drop(replicas);
        Ok(())
    }
}
