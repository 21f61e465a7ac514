//! A harness for end-to-end tests: real `domd` processes on loopback, each on its own sled
//! dir, driven by the real `domadm` binary.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use dom_agent::scan::{scan, ScanConfig};
use dom_storage::image::Filter;
use serde_json::Value;
use tempfile::TempDir;

/// Path of a binary of this workspace, built on first use.
///
/// `cargo test` builds binaries only for its own package's tests, and `domd` and `domadm`
/// live in other packages, so the harness asks cargo to build them (a no-op when fresh).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bench binary> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--bins",
            "-p",
            "dom-controller",
            "-p",
            "dom-ops",
            "-p",
            "dom-agent",
        ]);
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building domd, domadm and subd failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Replica {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: TempDir,
    pub replicas: BTreeMap<u64, Replica>,
    peers: String,
    extra_args: Vec<String>,
    /// Tests shorten Raft's heartbeat and election timeout; benchmarks keep domd's own.
    fast_elections: bool,
}

impl Cluster {
    /// Starts `n` replicas on fresh data dirs, with extra `domd` flags.
    pub fn start(n: u64, extra_args: &[&str]) -> Cluster {
        Cluster::start_timed(n, extra_args, true)
    }

    /// Starts `n` replicas with domd's own Raft timing (heartbeat 100 ms, election timeout
    /// 1-2 s), as an operator runs it: for benchmarks, where a loaded machine must not be
    /// mistaken for a dead leader.
    pub fn start_with_default_timing(n: u64, extra_args: &[&str]) -> Cluster {
        Cluster::start_timed(n, extra_args, false)
    }

    fn start_timed(n: u64, extra_args: &[&str], fast_elections: bool) -> Cluster {
        let dir = TempDir::new().expect("temp dir");
        let replicas: BTreeMap<u64, Replica> = (1..=n)
            .map(|id| {
                let replica = Replica {
                    id,
                    addr: format!("127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(format!("replica-{id}")),
                    log: dir.path().join(format!("replica-{id}.log")),
                    child: None,
                };
                (id, replica)
            })
            .collect();
        let peers = replicas
            .values()
            .map(|r| format!("{}={}", r.id, r.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            dir,
            replicas,
            peers,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            fast_elections,
        };
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster
    }

    pub fn domd_command(&self, id: u64) -> Command {
        let replica = &self.replicas[&id];
        let mut command = Command::new(bin("domd"));
        command
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &replica.addr,
                "--peers",
                &self.peers,
                "--data-dir",
            ])
            .arg(&replica.data_dir);
        if self.fast_elections {
            // Tests fail over in a fraction of a second instead of one or two.
            command.args(["--heartbeat-ms", "50", "--election-timeout-ms", "500"]);
        }
        command.args(&self.extra_args);
        command
    }

    pub fn spawn(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.replicas[&id].log)
            .expect("log file");
        let child = self
            .domd_command(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn domd");
        self.replicas.get_mut(&id).expect("replica").child = Some(child);
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.replicas.get_mut(&id).and_then(|r| r.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) {
        if let Some(mut child) = self.replicas.get_mut(&id).and_then(|r| r.child.take()) {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().expect("wait domd");
            assert!(
                status.success(),
                "domd {id} exited with {status} on SIGTERM; log:\n{}",
                self.log(id)
            );
        }
    }

    /// SIGSTOP: the replica freezes with its connections open, as a partitioned or stalled
    /// machine does; `resume` (SIGCONT) lets it run on, unaware of what it missed.
    pub fn pause(&self, id: u64) {
        if let Some(pid) = self.pid(id) {
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
    }

    pub fn resume(&self, id: u64) {
        if let Some(pid) = self.pid(id) {
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.replicas[&id].log).unwrap_or_default()
    }

    /// The process id of a running replica.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.replicas[&id].child.as_ref().map(Child::id)
    }

    /// The addresses of every replica but `id`.
    pub fn addrs_except(&self, id: u64) -> Vec<String> {
        self.replicas
            .values()
            .filter(|r| r.id != id)
            .map(|r| r.addr.clone())
            .collect()
    }

    pub fn endpoints(&self) -> String {
        self.replicas
            .values()
            .map(|r| r.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs domadm against every replica's address.
    pub fn domadm(&self, args: &[&str]) -> Output {
        self.domadm_at(&self.endpoints(), args)
    }

    /// Runs domadm against the replicas at `endpoints` only.
    pub fn domadm_at(&self, endpoints: &str, args: &[&str]) -> Output {
        Command::new(bin("domadm"))
            .args(["--endpoints", endpoints])
            .env("USER", "tester")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run domadm")
    }

    /// Runs domadm, requires success, and parses its JSON output.
    pub fn domadm_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.domadm(&all);
        assert!(
            out.status.success(),
            "domadm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("domadm JSON")
    }

    pub fn status(&self) -> Option<Value> {
        self.status_at(&self.endpoints())
    }

    /// `domadm cluster status` as the replicas at `endpoints` answer it.
    pub fn status_at(&self, endpoints: &str) -> Option<Value> {
        let out = self.domadm_at(endpoints, &["cluster", "status", "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The current leader's id, waiting for one to be elected that is not `not`.
    pub fn wait_leader(&self, not: Option<u64>) -> u64 {
        wait_for("a leader", Duration::from_secs(20), || {
            let leader = self.status()?.get("leader")?.as_u64()?;
            (Some(leader) != not).then_some(leader)
        })
    }

    /// Waits until every running replica reports the same applied index and journal head, and
    /// returns that journal head hash.
    pub fn wait_converged(&self) -> String {
        wait_for("replicas to converge", Duration::from_secs(30), || {
            let status = self.status()?;
            let members = status.get("members")?.as_array()?.clone();
            let running: Vec<&Value> = members
                .iter()
                .filter(|m| {
                    self.replicas[&m["id"].as_u64().unwrap_or(0)]
                        .child
                        .is_some()
                })
                .collect();
            let first = running.first()?;
            let same = running.iter().all(|m| {
                m["role"] != "unreachable"
                    && m["applied_index"] == first["applied_index"]
                    && m["journal_hash"] == first["journal_hash"]
            });
            same.then(|| {
                first["journal_hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
    }

    pub fn member(&self, id: u64) -> Value {
        let status = self.status().expect("cluster status");
        status["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"] == id).cloned())
            .expect("member")
    }

    pub fn add_machines(&self, names: impl IntoIterator<Item = String>) {
        for name in names {
            let out = self.domadm(&["machine", "add", &name, "--reason", "test"]);
            assert!(
                out.status.success(),
                "machine add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    pub fn machine_names(&self) -> Vec<String> {
        let list = self.domadm_json(&["machine", "list"]);
        list.as_array()
            .expect("machine list is an array")
            .iter()
            .map(|m| m["hostname"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// One machine: a `subd` process managing a temp root.
pub struct Agent {
    pub hostname: String,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
    controllers: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
}

impl Agent {
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log file");
        let child = Command::new(bin("subd"))
            .args(["--hostname", &self.hostname, "--root"])
            .arg(&self.root)
            .args(["--controllers", &self.controllers, "--state-dir"])
            .arg(&self.state_dir)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn subd");
        self.child = Some(child);
    }

    /// Sets an environment variable for the next spawn (test hooks).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.envs.push((key.to_owned(), v.to_owned()));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    /// A `subd` for `hostname` on a fresh, empty root under the cluster's temp dir, started.
    pub fn agent(&self, hostname: &str, args: &[&str]) -> Agent {
        let root = self.dir.path().join("roots").join(hostname);
        std::fs::create_dir_all(&root).expect("agent root");
        let mut agent = Agent {
            hostname: hostname.to_owned(),
            root,
            state_dir: self.dir.path().join("state").join(hostname),
            log: self.dir.path().join(format!("subd-{hostname}.log")),
            controllers: self.endpoints(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: Vec::new(),
            child: None,
        };
        agent.spawn();
        agent
    }

    /// `domadm status HOST -o json`, the one machine's object.
    pub fn machine_status(&self, hostname: &str) -> Option<Value> {
        let out = self.domadm(&["status", hostname, "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.first().cloned()
    }

    /// Waits until `predicate` holds for the machine's status, returning that status.
    pub fn wait_status(
        &self,
        hostname: &str,
        what: &str,
        limit: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(&format!("{hostname}: {what}"), limit, || {
            self.machine_status(hostname).filter(|s| predicate(s))
        })
    }

    /// Waits until the machine is compliant on `image`.
    pub fn wait_compliant(&self, hostname: &str, image: &str, limit: Duration) -> Value {
        self.wait_status(hostname, &format!("compliant on {image}"), limit, |s| {
            s["state"] == "compliant" && s["active_image"] == image
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.replicas.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// Writes `content` at the image path `path` under `root`, with `mode`, creating parents.
pub fn write(root: &Path, path: &str, content: &str, mode: u32) {
    let full = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(&full, content).unwrap();
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The Merkle root of a directory as the agent computes it, leaving out `excluded`.
pub fn tree_root(dir: &Path, excluded: &[&str]) -> String {
    let config = ScanConfig {
        root: dir.to_owned(),
        excluded: Filter::new(excluded.iter().map(|s| s.to_string()).collect()).unwrap(),
        bytes_per_sec: None,
        one_file_system: true,
        strict: false,
    };
    hex::encode(scan(&config, None, true).unwrap().root_hash())
}

/// Requires a successful command and returns its stdout.
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `domadm image add NAME SRC EXTRA...`, returning the image's root hash.
pub fn add_image(cluster: &Cluster, name: &str, src: &Path, extra: &[&str]) -> String {
    let mut args = vec!["image", "add", name, src.to_str().unwrap()];
    args.extend(extra);
    ok(cluster.domadm(&args));
    let images = cluster.domadm_json(&["image", "list"]);
    images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap()["root_hash"]
        .as_str()
        .unwrap()
        .to_owned()
}
