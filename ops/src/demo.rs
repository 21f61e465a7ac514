//! `domadm demo`: a whole fleet on loopback, shown converging.
//!
//! Three `domd` replicas and N `subd` agents (hostnames m1..mN, each managing an empty root
//! under DIR/roots) run as children of domadm. The demo writes a small sample image and a
//! second version of it whose triggers restart the service `app`, ingests both with the code
//! of `domadm image add`, adds the machines requiring the first in one batch event (as an MDB
//! import does), watches them converge, assigns the second to every machine, kills the leader
//! as the fleet rolls, and shows the fleet converged on the second version with the service
//! restarts the trigger caused. Then it either exits (`--exit-when-converged`) or keeps
//! everything running for the operator to try `domadm` on, until Ctrl-C or SIGTERM.
//!
//! DIR holds `images/` (the two source trees, filter and triggers), `data/replica-N`,
//! `roots/HOST`, `state/HOST`, `logs/` (each daemon's log, and each machine's service calls),
//! `bin/service` (the service command the agents run) and `pids` (every process started).
//!
//! Every child runs in its own process group, so a terminal's Ctrl-C reaches only domadm,
//! which stops the agents and then the replicas in order; and with a parent-death signal, so
//! even a SIGKILLed domadm leaves nothing running. Errors and panics stop the children too
//! (`Fleet`'s `Drop`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use dom_proto::v1 as pb;
use dom_storage::event::Change;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::client::{admin, Cluster};
use crate::cluster::ClusterCommand;
use crate::image::ImageCommand;
use crate::output::Format;
use crate::Context;

const V1: &str = "demo/v1";
const V2: &str = "demo/v2";
const REPLICAS: usize = 3;
/// How long the fleet may take to converge on an image before the demo gives up.
const CONVERGE_LIMIT: Duration = Duration::from_secs(300);
/// How long replicas may take to elect a leader or catch up.
const CLUSTER_LIMIT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  domadm demo\n  domadm demo --machines 20 --dir /tmp/fleet\n  \
domadm demo --machines 3 --exit-when-converged"
)]
pub struct Demo {
    /// Where the replicas, agents, machine roots and logs live; created if missing, must be
    /// empty, and kept afterwards (default: a fresh temporary directory, removed at exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// How many machines (subd agents, hostnames m1..mN) to run.
    #[arg(
        long,
        default_value_t = 5,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    machines: u32,
    /// Exit 0 once every machine is compliant on the second image (1 if that takes over 5
    /// minutes) instead of running until Ctrl-C.
    #[arg(long)]
    exit_when_converged: bool,
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// One daemon: how to start it, where it logs, and the running process.
struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(&mut self, pids: &Path) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid,
            // _exit) run, touching no memory shared with the parent.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent died before prctl: nobody would ever stop this child.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pids)
            .with_context(|| format!("opening {}", pids.display()))?;
        writeln!(file, "{} {}", self.name, child.id())?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain syscall on our own, not yet reaped, child.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// SIGKILL: no chance to flush anything.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How it exited, if it has (and it is then forgotten).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    fn print_tail(&self) {
        eprintln!("--- last lines of {} ---", self.log.display());
        eprintln!("{}", tail(&self.log, 20));
    }
}

/// The last `lines` lines of a file, or why there are none.
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

/// Sends SIGTERM to every running daemon of `group`, waits up to `grace` for them all, and
/// SIGKILLs the rest. Returns how many were running. The wait yields to the runtime, so that
/// domadm's own connections close and the replicas' graceful shutdown is not held up by them.
async fn stop_group(group: &mut [Daemon], grace: Duration) -> usize {
    group.iter().for_each(|d| d.signal(libc::SIGTERM));
    let deadline = Instant::now() + grace;
    let mut stopped = 0;
    for daemon in group.iter_mut() {
        if let Some(mut child) = daemon.child.take() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            stopped += 1;
        }
    }
    stopped
}

/// Every process the demo started. Dropping it stops them: agents first, then replicas.
struct Fleet {
    dir: PathBuf,
    replicas: Vec<Daemon>,
    agents: Vec<Daemon>,
}

impl Fleet {
    fn pids(&self) -> PathBuf {
        self.dir.join("pids")
    }

    fn spawn_replica(&mut self, index: usize) -> anyhow::Result<()> {
        let pids = self.pids();
        self.replicas[index].spawn(&pids)
    }

    /// Fails, showing its log, if a daemon that should be running has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for daemon in self.replicas.iter_mut().chain(self.agents.iter_mut()) {
            if let Some(status) = daemon.exited() {
                daemon.print_tail();
                bail!(
                    "{} exited unexpectedly ({status}); its log is {}",
                    daemon.name,
                    daemon.log.display()
                );
            }
        }
        Ok(())
    }

    /// Stops everything; returns (agents, replicas) that were running.
    async fn stop(&mut self) -> (usize, usize) {
        let agents = stop_group(&mut self.agents, Duration::from_secs(5)).await;
        let replicas = stop_group(&mut self.replicas, Duration::from_secs(10)).await;
        (agents, replicas)
    }
}

impl Drop for Fleet {
    /// Only on a panic: every other path awaits `stop`. SIGTERM, a short wait, then SIGKILL.
    fn drop(&mut self) {
        for group in [&mut self.agents, &mut self.replicas] {
            group.iter().for_each(|d| d.signal(libc::SIGTERM));
            let deadline = Instant::now() + Duration::from_secs(3);
            for daemon in group.iter_mut() {
                if let Some(mut child) = daemon.child.take() {
                    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

/// A binary installed next to this domadm.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating domadm")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{name} not found next to domadm (looked for {}): build every binary first with \
             cargo build --release",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.to_string())
}

/// SIGINT, SIGTERM and SIGHUP, registered once so that none of them kills domadm outright.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        let register = |kind| signal(kind).context("installing signal handlers");
        Ok(Signals {
            interrupt: register(SignalKind::interrupt())?,
            terminate: register(SignalKind::terminate())?,
            hangup: register(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sample image.

/// The files of version `v` (1 or 2) of the sample image: path, content, mode.
fn sample_files(v: u32) -> Vec<(String, String, u32)> {
    let mut files: Vec<(String, String, u32)> = Vec::new();
    let mut add = |path: &str, content: String, mode: u32| {
        files.push((path.to_owned(), content, mode));
    };
    add(
        "/etc/motd",
        format!(
            "Welcome to a dom demo machine, running image demo/v{v}.\n\
             Everything here but /etc/hostname and /var/lib/app is managed by dom:\n\
             local changes are put back.\n"
        ),
        0o644,
    );
    add(
        "/etc/app/app.conf",
        format!(
            "# app's configuration. A change restarts app (see the image's triggers).\n\
             version = {v}\nlisten = 0.0.0.0:8080\nworkers = {}\nlog_level = {}\n",
            if v == 1 { 4 } else { 8 },
            if v == 1 { "info" } else { "warn" }
        ),
        0o644,
    );
    add(
        "/etc/app/conf.d/10-cache.conf",
        "cache_size = 256M\ncache_ttl = 300\n".into(),
        0o644,
    );
    add(
        "/etc/app/conf.d/20-limits.conf",
        if v == 1 {
            "max_connections = 1024\n".into()
        } else {
            "max_connections = 4096\nmax_request_bytes = 1M\n".into()
        },
        0o644,
    );
    add(
        "/etc/app/conf.d/30-tls.conf",
        "tls = off\n# tls_cert = /etc/app/tls/cert.pem\n".into(),
        0o644,
    );
    add(
        "/etc/app/secret.key",
        format!("{}\n", blake3::hash(b"dom demo secret").to_hex()),
        0o600,
    );
    let status = if v == 1 {
        ""
    } else {
        "status)\n    echo \"app $(sed -n 's/^version = //p' \"$conf\"): ok\"\n    ;;\n"
    };
    add(
        "/usr/bin/app",
        format!(
            "#!/bin/sh\n# app {v}: the demo's service. APP_ROOT prefixes its paths (a demo \
             machine's root).\nconf=\"${{APP_ROOT:-}}/etc/app/app.conf\"\ncase \"$1\" in\n\
             check)\n    grep -q '^version = ' \"$conf\" && grep -q '^listen = ' \"$conf\"\n    ;;\n\
             version)\n    sed -n 's/^version = //p' \"$conf\"\n    ;;\n{status}\
             *)\n    echo \"usage: app check|version\" >&2\n    exit 2\n    ;;\nesac\n"
        ),
        0o755,
    );
    let mut libs = vec!["cache", "http", "log"];
    if v == 2 {
        libs.push("metrics");
    }
    for lib in libs {
        add(
            &format!("/usr/lib/app/{lib}.sh"),
            format!("# app's {lib} helpers\n{lib}_init() {{\n    : \"initializing {lib}\"\n}}\n"),
            0o644,
        );
    }
    add(
        "/usr/share/doc/app/README",
        "app: the service of dom's demo image.\n\nConfigure it in /etc/app/app.conf and \
         /etc/app/conf.d/.\n"
            .into(),
        0o644,
    );
    let mut changelog = String::from("1: first release\n");
    if v == 2 {
        changelog.insert_str(0, "2: 8 workers, larger connection limit, metrics\n");
    }
    add("/usr/share/doc/app/CHANGELOG", changelog, 0o644);
    add(
        "/usr/share/doc/app/LICENSE",
        "Licensed under the Apache License, Version 2.0.\n".repeat(20),
        0o644,
    );
    for i in 1..=if v == 1 { 8 } else { 7 } {
        add(
            &format!("/usr/share/doc/app/examples/example-{i:02}.conf"),
            format!(
                "# example {i}\nworkers = {i}\nlisten = 127.0.0.1:{}\n",
                8080 + i
            ),
            0o644,
        );
    }
    for i in 1..=if v == 1 { 12 } else { 13 } {
        let title = if v == 2 && i == 3 {
            format!("Page {i}, revised")
        } else {
            format!("Page {i}")
        };
        let body: String = (1..=10 + i * 3)
            .map(|line| format!("  <p>{title}, paragraph {line}.</p>\n"))
            .collect();
        add(
            &format!("/usr/share/app/templates/page-{i:02}.html"),
            format!(
                "<html>\n<head><title>{title}</title></head>\n<body>\n{body}</body>\n</html>\n"
            ),
            0o644,
        );
    }
    add(
        "/usr/share/man/man1/app.1",
        ".TH APP 1\n.SH NAME\napp \\- the demo service\n.SH SYNOPSIS\n.B app\ncheck|version\n"
            .into(),
        0o644,
    );
    files
}

/// Writes version `v` of the sample image under `root`; returns how many files it holds.
fn write_sample(root: &Path, v: u32) -> anyhow::Result<usize> {
    let files = sample_files(v);
    for (path, content, mode) in &files {
        let full = root.join(path.trim_start_matches('/'));
        let parent = full.parent().expect("a file has a parent");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        fs::write(&full, content).with_context(|| format!("writing {}", full.display()))?;
        fs::set_permissions(&full, fs::Permissions::from_mode(*mode))?;
    }
    std::os::unix::fs::symlink("app", root.join("usr/bin/appctl"))?;
    let data = root.join("var/lib/app");
    fs::create_dir_all(&data)?;
    fs::set_permissions(&data, fs::Permissions::from_mode(0o750))?;
    Ok(files.len())
}

/// The image's triggers (Dominator's format): app restarts when its files change.
const TRIGGERS: &str = r#"[
    {"MatchLines": ["/etc/app/.*", "/usr/bin/app", "/usr/lib/app/.*"], "Service": "app"},
    {"MatchLines": ["/etc/ssh/.*"], "Service": "ssh", "DoReload": true}
]
"#;

/// The image's filter: the machine's own files, left alone.
const FILTER: &str = "/etc/hostname\n/var/lib/app/.*\n";

/// `text` as one shell word.
fn quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@%".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn quote_path(path: &Path) -> String {
    quote(&path.to_string_lossy())
}

// ---------------------------------------------------------------------------------------------
// Watching the cluster and the fleet.

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Echoes the domadm command the demo is about to run in-process.
fn shown(args: &str) {
    println!("$ domadm {args}");
}

/// Parses a command's flags exactly as `domadm` would, to run it in-process.
fn parsed<T: clap::Args + clap::FromArgMatches>(argv: &[&str]) -> anyhow::Result<T> {
    let command = T::augment_args(clap::Command::new("domadm"));
    let matches = command.try_get_matches_from(argv)?;
    Ok(T::from_arg_matches(&matches)?)
}

async fn cluster_status(cluster: &mut Cluster) -> anyhow::Result<pb::ClusterStatusResponse> {
    Ok(cluster
        .call(|c| async move { admin(c).cluster_status(pb::ClusterStatusRequest {}).await })
        .await?)
}

async fn fleet_status(cluster: &mut Cluster) -> anyhow::Result<pb::StatusResponse> {
    Ok(cluster
        .call(|c| async move {
            admin(c)
                .status(pb::StatusRequest {
                    hostname: String::new(),
                })
                .await
        })
        .await?)
}

/// Polls cluster status until `done` picks a value out of it.
async fn wait_cluster<T>(
    cluster: &mut Cluster,
    fleet: &mut Fleet,
    what: &str,
    done: impl Fn(&pb::ClusterStatusResponse) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + CLUSTER_LIMIT;
    loop {
        fleet.check_alive()?;
        let status = cluster_status(cluster).await;
        if let Some(value) = status.as_ref().ok().and_then(&done) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            fleet.replicas.iter().for_each(Daemon::print_tail);
            let why = status
                .err()
                .map(|e| format!(" ({e:#})"))
                .unwrap_or_default();
            bail!(
                "{what} did not happen within {}s{why}; replica logs are in {}",
                CLUSTER_LIMIT.as_secs(),
                fleet.dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_leader(
    cluster: &mut Cluster,
    fleet: &mut Fleet,
    not: Option<u64>,
) -> anyhow::Result<u64> {
    wait_cluster(cluster, fleet, "a leader election", |s| {
        Some(s.leader).filter(|l| *l != 0 && Some(*l) != not)
    })
    .await
}

/// Waits until every replica has applied the same journal.
async fn wait_replicas_agree(cluster: &mut Cluster, fleet: &mut Fleet) -> anyhow::Result<()> {
    wait_cluster(cluster, fleet, "the replicas' catch-up", |s| {
        let first = s.members.first()?;
        s.members
            .iter()
            .all(|m| {
                m.role != "unreachable"
                    && m.applied_index == first.applied_index
                    && m.journal_hash == first.journal_hash
            })
            .then_some(())
    })
    .await
}

const STATES: [&str; 7] = [
    "compliant",
    "deviant",
    "fetching",
    "updating",
    "failed",
    "unreachable",
    "unknown",
];

/// "5 machines: 3 compliant, 2 updating; on demo/v2: 3, demo/v1: 2"
fn summary(machines: &[pb::MachineStatus]) -> String {
    let mut states: BTreeMap<usize, (String, usize)> = BTreeMap::new();
    let mut active: BTreeMap<&str, usize> = BTreeMap::new();
    for m in machines {
        let rank = STATES
            .iter()
            .position(|s| *s == m.state)
            .unwrap_or(STATES.len());
        states.entry(rank).or_insert_with(|| (m.state.clone(), 0)).1 += 1;
        if !m.active_image.is_empty() {
            *active.entry(&m.active_image).or_default() += 1;
        }
    }
    let states: Vec<String> = states
        .values()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let mut line = format!("{} machines: {}", machines.len(), states.join(", "));
    if !active.is_empty() {
        let active: Vec<String> = active
            .iter()
            .rev()
            .map(|(image, n)| format!("{image}: {n}"))
            .collect();
        line.push_str(&format!("; on {}", active.join(", ")));
    }
    line
}

fn converged(reply: &pb::StatusResponse, image: &str, machines: usize) -> bool {
    reply.machines.len() == machines
        && reply
            .machines
            .iter()
            .all(|m| m.state == "compliant" && m.active_image == image && m.required_image == image)
}

/// Polls the fleet's status until every machine is compliant on `image`, printing the state
/// counts as they change. Gives up after `CONVERGE_LIMIT`, showing the relevant logs.
async fn wait_fleet(
    ctx: &mut Context,
    fleet: &mut Fleet,
    image: &str,
    machines: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut printed: Option<(String, Instant)> = None;
    let mut last: Option<pb::StatusResponse> = None;
    loop {
        fleet.check_alive()?;
        let error = match fleet_status(&mut ctx.cluster).await {
            Ok(reply) => {
                let line = summary(&reply.machines);
                let stale = printed.as_ref().is_none_or(|(text, at)| {
                    *text != line || at.elapsed() >= Duration::from_secs(2)
                });
                if stale {
                    println!("{:>6.1}s  {line}", started.elapsed().as_secs_f64());
                    printed = Some((line, Instant::now()));
                }
                if converged(&reply, image, machines) {
                    return Ok(started.elapsed());
                }
                last = Some(reply);
                None
            }
            Err(e) => Some(format!("{e:#}")),
        };
        if started.elapsed() > CONVERGE_LIMIT {
            return Err(not_converged(fleet, image, last, error));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Shows the logs of the machines that did not converge and of the leader, and says which.
fn not_converged(
    fleet: &Fleet,
    image: &str,
    last: Option<pb::StatusResponse>,
    error: Option<String>,
) -> anyhow::Error {
    let logs = fleet.dir.join("logs");
    let limit = CONVERGE_LIMIT.as_secs() / 60;
    let Some(reply) = last else {
        fleet.replicas.iter().for_each(Daemon::print_tail);
        return anyhow!(
            "the fleet did not converge on {image} within {limit} min: no status from the \
             cluster ({}); logs are in {}",
            error.unwrap_or_else(|| "no answer".into()),
            logs.display()
        );
    };
    let behind: Vec<&pb::MachineStatus> = reply
        .machines
        .iter()
        .filter(|m| !(m.state == "compliant" && m.active_image == image))
        .collect();
    for m in behind.iter().take(3) {
        if let Some(agent) = fleet
            .agents
            .iter()
            .find(|a| a.name == format!("subd-{}", m.hostname))
        {
            agent.print_tail();
        }
    }
    if let Some(leader) = fleet.replicas.get((reply.leader as usize).wrapping_sub(1)) {
        leader.print_tail();
    }
    let described: Vec<String> = behind
        .iter()
        .take(5)
        .map(|m| {
            let why = [
                m.detail.clone(),
                m.last_update
                    .as_ref()
                    .map(|u| u.error.clone())
                    .unwrap_or_default(),
            ]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
            if why.is_empty() {
                format!("{} {}", m.hostname, m.state)
            } else {
                format!("{} {} ({why})", m.hostname, m.state)
            }
        })
        .collect();
    anyhow!(
        "the fleet did not converge on {image} within {limit} min: {} of {} machines are not \
         compliant on it ({}{}); logs are in {}",
        behind.len(),
        reply.machines.len(),
        described.join(", "),
        if behind.len() > 5 { ", ..." } else { "" },
        logs.display()
    )
}

// ---------------------------------------------------------------------------------------------
// The demo.

/// How the demo ended, short of an error.
enum Ending {
    /// Converged, and asked to exit then.
    Exit,
    /// Converged; everything keeps running until a signal.
    KeepRunning,
}

impl Demo {
    pub async fn run(self, actor: Option<String>) -> anyhow::Result<()> {
        let mut signals = Signals::new()?;
        let domd = sibling("domd")?;
        let subd = sibling("subd")?;
        let (dir, temp) = match &self.dir {
            Some(dir) => {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let dir = fs::canonicalize(dir)?;
                if fs::read_dir(&dir)?.next().is_some() {
                    bail!(
                        "{} is not empty: give --dir a new or empty directory",
                        dir.display()
                    );
                }
                (dir, None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("dom-demo-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                (fs::canonicalize(temp.path())?, Some(temp))
            }
        };
        let mut fleet = Fleet {
            dir: dir.clone(),
            replicas: Vec::new(),
            agents: Vec::new(),
        };
        let started = Instant::now();
        let outcome = tokio::select! {
            result = self.show(&mut fleet, &domd, &subd, actor) => result.map(Some),
            name = signals.next() => {
                println!("\n==> {name}: stopping everything");
                Ok(None)
            }
        };
        let interrupted = matches!(outcome, Ok(None));
        if let Ok(Some(Ending::KeepRunning)) = outcome {
            let name = signals.next().await;
            println!("\n==> {name}: stopping everything");
        }
        let started_stop = Instant::now();
        let (agents, replicas) = fleet.stop().await;
        drop(fleet);
        if agents + replicas > 0 {
            println!(
                "stopped {agents} subd and {replicas} domd in {:.1}s",
                started_stop.elapsed().as_secs_f64()
            );
        }
        match (temp, &outcome) {
            (Some(temp), Err(_)) => {
                let kept = temp.keep();
                eprintln!("the demo's files and logs are kept in {}", kept.display());
            }
            (Some(temp), Ok(_)) => {
                let path = temp.path().to_owned();
                temp.close()
                    .with_context(|| format!("removing {}", path.display()))?;
                println!("removed {}", path.display());
            }
            (None, _) => println!("the demo's files and logs are kept in {}", dir.display()),
        }
        if interrupted {
            bail!(
                "interrupted after {:.1}s, before the fleet converged",
                started.elapsed().as_secs_f64()
            );
        }
        outcome.map(|_| ())
    }

    /// Starts everything and shows the fleet converging; leaves it running.
    async fn show(
        &self,
        fleet: &mut Fleet,
        domd: &Path,
        subd: &Path,
        actor: Option<String>,
    ) -> anyhow::Result<Ending> {
        let started = Instant::now();
        let dir = fleet.dir.clone();
        let logs = dir.join("logs");
        for sub in ["images", "data", "roots", "state", "logs", "bin"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }

        // Three replicas.
        let addrs: Vec<String> = (0..REPLICAS)
            .map(|_| free_port())
            .collect::<anyhow::Result<_>>()?;
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let endpoints = addrs.join(",");
        for (i, addr) in addrs.iter().enumerate() {
            let id = i + 1;
            let mut args: Vec<OsString> = vec![
                "--id".into(),
                id.to_string().into(),
                "--listen".into(),
                addr.into(),
                "--peers".into(),
                peers.clone().into(),
                "--data-dir".into(),
            ];
            args.push(dir.join("data").join(format!("replica-{id}")).into());
            fleet.replicas.push(Daemon {
                name: format!("domd-{id}"),
                program: domd.to_owned(),
                args,
                log: logs.join(format!("domd-{id}.log")),
                child: None,
            });
        }
        step(&format!(
            "starting three domd replicas on {endpoints}, under {}",
            dir.display()
        ));
        for index in 0..REPLICAS {
            fleet.spawn_replica(index)?;
        }
        let mut ctx = Context {
            cluster: Cluster::new(&endpoints).map_err(anyhow::Error::msg)?,
            output: Format::Table,
            actor: actor
                .or_else(|| std::env::var("USER").ok())
                .filter(|a| !a.trim().is_empty())
                .or(Some("demo".into())),
            reason: "domadm demo".into(),
        };
        let leader = wait_leader(&mut ctx.cluster, fleet, None).await?;
        println!(
            "replica {leader} was elected leader after {:.1}s",
            started.elapsed().as_secs_f64()
        );
        ClusterCommand::Status.run(&mut ctx).await?;

        // Two versions of a sample image.
        let images = dir.join("images");
        let (v1, v2) = (images.join("v1"), images.join("v2"));
        let files = write_sample(&v1, 1)?;
        write_sample(&v2, 2)?;
        let (filter, triggers) = (images.join("filter"), images.join("triggers.json"));
        fs::write(&filter, FILTER)?;
        fs::write(&triggers, TRIGGERS)?;
        step(&format!(
            "ingesting a sample image ({files} files, a symlink) as {V1}, and {V2}, which \
             changes app.conf and a few files; its triggers restart app when /etc/app changes"
        ));
        for (name, source) in [(V1, &v1), (V2, &v2)] {
            shown(&format!(
                "image add {name} {} --filter {} --triggers {}",
                quote_path(source),
                quote_path(&filter),
                quote_path(&triggers)
            ));
            ImageCommand::Add {
                name: name.into(),
                source: source.clone(),
                filter: Some(filter.clone()),
                triggers: Some(triggers.clone()),
            }
            .run(&mut ctx)
            .await?;
        }
        shown(&format!("image diff {V1} {V2}"));
        ImageCommand::Diff {
            a: V1.into(),
            b: V2.into(),
        }
        .run(&mut ctx)
        .await?;

        // The machines, in one event.
        let hosts: Vec<String> = (1..=self.machines).map(|i| format!("m{i}")).collect();
        let range = if hosts.len() == 1 {
            "m1".to_owned()
        } else {
            format!("m1..m{}", hosts.len())
        };
        step(&format!(
            "adding {} machine(s), {range}, requiring {V1}, in one batch event (as `machine \
             import` does with an MDB)",
            hosts.len()
        ));
        let changes = hosts
            .iter()
            .map(|h| Change::MachineAdded {
                hostname: h.clone(),
                tags: [("role".to_owned(), "app".to_owned())].into(),
                required_image: Some(V1.into()),
                planned_image: None,
            })
            .collect();
        crate::machine::commit(
            &mut ctx,
            Change::Batch(changes),
            &format!("{} machine(s) added, requiring {V1}", hosts.len()),
        )
        .await?;

        // An agent per machine, on an empty root.
        let service = dir.join("bin").join("service");
        fs::write(
            &service,
            format!(
                "#!/bin/sh\n# The demo's service manager: subd runs it as `service HOST SERVICE \
                 ACTION`.\nversion=$(sed -n 's/^version = //p' {roots}/\"$1\"/etc/app/app.conf \
                 2>/dev/null)\necho \"$2 $3 (app.conf version ${{version:-none}})\" >> \
                 {logs}/services-\"$1\".log\n",
                roots = quote_path(&dir.join("roots")),
                logs = quote_path(&logs),
            ),
        )?;
        fs::set_permissions(&service, fs::Permissions::from_mode(0o755))?;
        for host in &hosts {
            let root = dir.join("roots").join(host);
            fs::create_dir_all(&root)?;
            let health = format!(
                "APP_ROOT={} {} check",
                quote_path(&root),
                quote_path(&root.join("usr/bin/app"))
            );
            let mut args: Vec<OsString> = vec!["--hostname".into(), host.into(), "--root".into()];
            args.push(root.into());
            args.extend([
                "--controllers".into(),
                endpoints.clone().into(),
                "--state-dir".into(),
            ]);
            args.push(dir.join("state").join(host).into());
            args.extend([
                "--service-cmd".into(),
                format!("{} {host}", quote_path(&service)).into(),
                "--health-cmd".into(),
                health.into(),
            ]);
            fleet.agents.push(Daemon {
                name: format!("subd-{host}"),
                program: subd.to_owned(),
                args,
                log: logs.join(format!("subd-{host}.log")),
                child: None,
            });
        }
        step(&format!(
            "starting {} subd agent(s) on empty roots under {}; each fetches {V1} and applies it",
            hosts.len(),
            dir.join("roots").display()
        ));
        let pids = fleet.pids();
        for agent in &mut fleet.agents {
            agent.spawn(&pids)?;
        }
        let took = wait_fleet(&mut ctx, fleet, V1, hosts.len()).await?;
        println!(
            "every machine is compliant on {V1}, {:.1}s after its agent started",
            took.as_secs_f64()
        );

        // The roll to v2, through a leader failover.
        step(&format!("rolling the whole fleet to {V2}"));
        shown(&format!("assign --required {V2} --all"));
        parsed::<crate::assign::Assign>(&["assign", "--required", V2, "--all"])?
            .run(&mut ctx)
            .await?;
        let leader = wait_leader(&mut ctx.cluster, fleet, None).await?;
        step(&format!(
            "killing the leader, replica {leader}, with SIGKILL as the roll starts"
        ));
        let killed = Instant::now();
        fleet.replicas[leader as usize - 1].kill();
        let next = wait_leader(&mut ctx.cluster, fleet, Some(leader)).await?;
        println!(
            "replica {next} leads after {:.1}s; the agents follow it",
            killed.elapsed().as_secs_f64()
        );
        wait_fleet(&mut ctx, fleet, V2, hosts.len()).await?;
        println!(
            "every machine is compliant on {V2}, {:.1}s after the leader was killed",
            killed.elapsed().as_secs_f64()
        );
        step(&format!(
            "restarting replica {leader}: it rejoins from its data dir and catches up"
        ));
        fleet.spawn_replica(leader as usize - 1)?;
        wait_replicas_agree(&mut ctx.cluster, fleet).await?;
        ClusterCommand::Status.run(&mut ctx).await?;

        // Where it ended.
        step("the fleet");
        shown("status");
        parsed::<crate::status::Status>(&["status"])?
            .run(&mut ctx)
            .await?;
        let first = &hosts[0];
        let services_log = |host: &str| logs.join(format!("services-{host}.log"));
        step(&format!(
            "service calls the triggers made on {first} ({})",
            services_log(first).display()
        ));
        let calls = fs::read_to_string(services_log(first)).unwrap_or_default();
        calls.lines().for_each(|l| println!("  {l}"));
        let restarted = hosts
            .iter()
            .filter(|h| {
                fs::read_to_string(services_log(h))
                    .is_ok_and(|c| c.contains("app start (app.conf version 2)"))
            })
            .count();
        println!(
            "app was stopped and started on the new app.conf on {restarted} of {} machine(s)",
            hosts.len()
        );
        println!(
            "\nthe demo converged in {:.1}s",
            started.elapsed().as_secs_f64()
        );

        if self.exit_when_converged {
            return Ok(Ending::Exit);
        }
        self.print_try(fleet, &mut ctx, &endpoints, &hosts).await;
        Ok(Ending::KeepRunning)
    }

    /// What to try next, with this cluster's endpoints and paths.
    async fn print_try(&self, fleet: &Fleet, ctx: &mut Context, endpoints: &str, hosts: &[String]) {
        let exe = std::env::args()
            .next()
            .filter(|a| a.contains('/'))
            .unwrap_or_else(|| "domadm".into());
        let domadm = format!("{} --endpoints {endpoints}", quote(&exe));
        let dir = &fleet.dir;
        let last = hosts.last().map(String::as_str).unwrap_or("m1");
        step("the fleet keeps running; in another terminal, try:");
        for command in [
            "status".to_owned(),
            format!("status {last}"),
            "audit log".to_owned(),
            format!("image diff {V1} {V2}"),
            "cluster status".to_owned(),
        ] {
            println!("  {domadm} {command}");
        }
        println!("tamper with a machine, and watch status notice the drift and put it back:");
        println!("  echo x > {}", quote_path(&dir.join("roots/m1/etc/motd")));
        println!("  {domadm} status m1 --watch");
        println!("roll a machine back (its services log shows app restarting):");
        println!("  {domadm} assign --required {V1} {last} --reason 'roll back'");
        if let Ok(status) = cluster_status(&mut ctx.cluster).await {
            let leader = fleet.replicas.get((status.leader as usize).wrapping_sub(1));
            if let Some(pid) = leader.and_then(Daemon::pid) {
                println!(
                    "kill the leader (replica {}) and watch another take over:",
                    status.leader
                );
                println!("  kill -9 {pid}");
            }
        }
        println!("(or export DOM_ENDPOINTS={endpoints} and leave out --endpoints)");
        println!(
            "logs: {} (domd-N.log, subd-HOST.log, services-HOST.log)",
            dir.join("logs").display()
        );
        println!("Ctrl-C stops everything.");
    }
}
