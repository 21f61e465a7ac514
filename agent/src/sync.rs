//! The agent's stream to the leader: describe the machine, then carry out what it directs.
//!
//! The machine is described as a difference from its *base*, the image it last reached (kept
//! in the state dir, so a restart or a new leader costs a compliant machine a few bytes): a
//! full description when a stream opens or the base changes, then only what changed. Each
//! description has a generation; an update planned from an older generation is refused if a
//! path it touches changed since, so the agent never acts on a stale view.
//!
//! Updates run on their own task: a lost stream does not interrupt one, and the next stream's
//! hello carries its outcome, so a failover neither loses an update nor runs it twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dom_proto::v1 as pb;
use dom_proto::v1::agent_client::AgentClient;
use dom_storage::event::{trigger_from_pb, Hash};
use dom_storage::image::{entry_from_pb, entry_to_pb, is_normalized, Filter, Manifest};
use dom_storage::objects::{parse_hash, to_hex, ObjectStore};
use dom_storage::plan::{left_alone, Delta, Step};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::fetch::{self, Progress};
use crate::sweep::{Scanner, Snapshot};
use crate::update::{Outcome, Report, UpdateRequest, Updater};

/// Entries per state page, so a first description of a large machine is many small messages.
const ENTRIES_PER_PAGE: usize = 5_000;
const MAX_MESSAGE: usize = 64 << 20;
const LEADER_METADATA: &str = "dom-leader";

pub struct AgentConfig {
    pub hostname: String,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub controllers: Vec<String>,
    pub fetch_bytes_per_sec: Option<u64>,
    /// What the agent leaves alone besides its base image's filter.
    pub excluded: Vec<String>,
}

/// The image the agent describes itself against, as kept in the state dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BaseRecord {
    image: String,
    manifest_hash: String,
    filter: Vec<String>,
}

struct Base {
    record: BaseRecord,
    manifest: Arc<Manifest>,
}

/// What the agent has told the current leader, to send only changes.
struct Described {
    delta: Delta,
    root_hash: Hash,
    swept: bool,
    /// The generation of the last full description: plans from before it are stale.
    reset_at: u64,
    /// The generation at which each path last changed in the description since then.
    changed_at: HashMap<String, u64>,
}

pub struct Agent {
    config: AgentConfig,
    objects: ObjectStore,
    updater: Arc<Updater>,
    scanner: Arc<Scanner>,
    trees: watch::Receiver<Option<Snapshot>>,
    base: Option<Base>,
    /// The agent's exclusions and its base's filter, compiled once per base.
    excluded: Filter,
    last_report: Option<Report>,
    /// Increases with every description sent, across streams.
    generation: u64,
    /// The base an update in flight will leave the machine on: image, manifest, filter.
    pending_base: Option<(String, Hash, Vec<String>)>,
    /// An update still running when its stream ended; the next stream reports it.
    in_flight: Option<Running>,
}

/// An update running on its own task.
type Running = (pb::UpdateInFlight, tokio::task::JoinHandle<Report>);

fn base_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("base.json")
}

fn load_manifest(objects: &ObjectStore, hash: &Hash) -> anyhow::Result<Manifest> {
    let bytes = std::fs::read(objects.path(hash))
        .with_context(|| format!("reading manifest {}", to_hex(hash)))?;
    Ok(Manifest::decode(&bytes)?)
}

fn excluded_filter(config: &AgentConfig, base: Option<&Base>) -> anyhow::Result<Filter> {
    let mut lines = config.excluded.clone();
    if let Some(b) = base {
        lines.extend(b.record.filter.iter().cloned());
    }
    Ok(Filter::new(lines)?)
}

fn report_to_pb(r: &Report) -> pb::UpdateResult {
    let outcome = match r.outcome {
        Outcome::Applied => pb::UpdateOutcome::Applied,
        Outcome::RolledBack => pb::UpdateOutcome::RolledBack,
        Outcome::Refused => pb::UpdateOutcome::Refused,
        Outcome::Failed => pb::UpdateOutcome::Failed,
    };
    pb::UpdateResult {
        plan_id: r.plan_id,
        image: r.image.clone(),
        outcome: outcome as i32,
        error: r.error.clone().unwrap_or_default(),
        activation_ms: r.activation.as_millis() as u64,
        duration_ms: r.duration.as_millis() as u64,
        steps: r.steps as u64,
        services: r.services.clone(),
        finished_unix_ms: r.finished_unix_ms,
    }
}

fn step_from_pb(step: pb::Step) -> anyhow::Result<Step> {
    let entry = step.entry.context("a step without an entry")?;
    anyhow::ensure!(
        is_normalized(&entry.path),
        "step path {:?} is not a normalized absolute path",
        entry.path
    );
    let path = entry.path.clone();
    Ok(match pb::StepKind::try_from(step.kind) {
        Ok(pb::StepKind::Write) => Step::Write(entry_from_pb(entry)?),
        Ok(pb::StepKind::Metadata) => Step::Metadata(entry_from_pb(entry)?),
        Ok(pb::StepKind::Delete) => Step::Delete(path),
        _ => anyhow::bail!("unknown step kind {}", step.kind),
    })
}

/// An update being gathered from its pages.
struct Incoming {
    plan_id: u64,
    image: String,
    generation: u64,
    manifest_hash: Vec<u8>,
    filter: Vec<String>,
    steps: Vec<Step>,
    triggers: Vec<dom_storage::image::Trigger>,
}

enum Ended {
    /// Try this address next (a follower named the leader).
    Redirect(String),
    Retry(String),
}

type Out = mpsc::Sender<pb::AgentMessage>;

async fn send(out: &Out, body: pb::agent_message::Body) {
    let _ = out.send(pb::AgentMessage { body: Some(body) }).await;
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        objects: ObjectStore,
        updater: Arc<Updater>,
        scanner: Arc<Scanner>,
        trees: watch::Receiver<Option<Snapshot>>,
        last_report: Option<Report>,
    ) -> anyhow::Result<Agent> {
        let base = match std::fs::read(base_file(&config.state_dir)) {
            Ok(bytes) => {
                let record: BaseRecord = serde_json::from_slice(&bytes).with_context(|| {
                    format!("reading {}", base_file(&config.state_dir).display())
                })?;
                let hash = hex::decode(&record.manifest_hash)
                    .ok()
                    .and_then(|b| parse_hash(&b));
                match hash.map(|h| load_manifest(&objects, &h)) {
                    Some(Ok(manifest)) => Some(Base {
                        record,
                        manifest: Arc::new(manifest),
                    }),
                    _ => {
                        tracing::warn!(image = %record.image, "base image's manifest is gone from the cache; describing the machine in full");
                        None
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context("reading the base image record"),
        };
        let excluded = excluded_filter(&config, base.as_ref())?;
        scanner.set_excluded(excluded.clone());
        Ok(Agent {
            excluded,
            config,
            objects,
            updater,
            scanner,
            trees,
            base,
            last_report,
            generation: 0,
            pending_base: None,
            in_flight: None,
        })
    }

    fn set_base(
        &mut self,
        image: &str,
        manifest_hash: &Hash,
        filter: Vec<String>,
    ) -> anyhow::Result<()> {
        let manifest = load_manifest(&self.objects, manifest_hash)?;
        let record = BaseRecord {
            image: image.to_owned(),
            manifest_hash: to_hex(manifest_hash),
            filter,
        };
        let path = base_file(&self.config.state_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        self.base = Some(Base {
            record,
            manifest: Arc::new(manifest),
        });
        self.excluded = excluded_filter(&self.config, self.base.as_ref())?;
        self.scanner.set_excluded(self.excluded.clone());
        Ok(())
    }

    /// The machine relative to its base, leaving out what the agent leaves alone.
    fn delta_of(&self, tree: &crate::scan::Tree) -> anyhow::Result<Delta> {
        let machine = tree.manifest()?;
        let mut delta = Delta::between(self.base.as_ref().map(|b| b.manifest.as_ref()), &machine);
        let alone: Vec<String> = delta
            .iter()
            .filter(|(p, _)| left_alone(&self.excluded, p))
            .map(|(p, _)| p.to_owned())
            .collect();
        for p in alone {
            delta.matches(&p);
        }
        Ok(delta)
    }

    /// Runs until the process stops: connect, describe, obey, reconnect.
    pub async fn run(mut self) -> anyhow::Result<()> {
        // Wait for the first tree: there is nothing to describe before it.
        while self.trees.borrow().is_none() {
            self.trees.changed().await.context("the scanner stopped")?;
        }
        let mut backoff = Duration::from_millis(250);
        let mut next = 0usize;
        let mut redirect: Option<String> = None;
        loop {
            let addr = redirect.take().unwrap_or_else(|| {
                self.config.controllers[next % self.config.controllers.len()].clone()
            });
            let started = Instant::now();
            match self.session(&addr).await {
                Ended::Redirect(leader) => {
                    tracing::info!(%leader, "following the leader hint");
                    redirect = Some(leader);
                    continue;
                }
                Ended::Retry(why) => {
                    tracing::warn!(controller = %addr, "{why}");
                    next += 1;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(250);
            }
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn session(&mut self, addr: &str) -> Ended {
        let channel = match fetch::channel(addr) {
            Ok(c) => c,
            Err(e) => return Ended::Retry(format!("cannot reach {addr}: {e}")),
        };
        let (out, rx) = mpsc::channel::<pb::AgentMessage>(64);
        let snapshot = self.trees.borrow().clone();
        let mount_points = snapshot
            .as_ref()
            .map(|s| s.tree.mount_points().to_vec())
            .unwrap_or_default();
        let mut excluded = self.config.excluded.clone();
        excluded.extend(mount_points.iter().map(|m| regex_escape(m)));
        let hello = pb::Hello {
            hostname: self.config.hostname.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            excluded,
            last_update: self.last_report.as_ref().map(report_to_pb),
            in_flight: self.in_flight.as_ref().map(|(info, _)| info.clone()),
        };
        tracing::debug!(bytes = prost::Message::encoded_len(&hello), "hello");
        send(&out, pb::agent_message::Body::Hello(hello)).await;
        let mut client = AgentClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut inbound = match client.sync(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return ended(status),
        };
        tracing::info!(controller = %addr, "connected to the leader");
        let mut described = match self.describe_all(&out).await {
            Ok(d) => d,
            Err(e) => return Ended::Retry(format!("describing the machine: {e:#}")),
        };
        let mut incoming: Option<Incoming> = None;
        let mut fetching: Option<tokio::task::JoinHandle<()>> = None;
        let mut updating: Option<Running> = self.in_flight.take();
        let ended = loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Err(e) = self
                            .obey(message, &out, &mut described, &mut incoming, &mut fetching, &mut updating, addr)
                            .await
                        {
                            tracing::warn!("{e:#}");
                        }
                    }
                    Ok(None) => break Ended::Retry("the leader closed the stream".into()),
                    Err(status) => break ended(status),
                },
                changed = self.trees.changed(), if updating.is_none() => {
                    if changed.is_err() {
                        break Ended::Retry("the scanner stopped".into());
                    }
                    if let Err(e) = self.describe_changes(&out, &mut described).await {
                        tracing::warn!("describing changes: {e:#}");
                    }
                }
                report = async { (&mut updating.as_mut().expect("guarded").1).await }, if updating.is_some() => {
                    updating = None;
                    let report = match report {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!("the update task failed: {e}");
                            continue;
                        }
                    };
                    if let Err(e) = self.finished(report, &out, &mut described).await {
                        tracing::warn!("{e:#}");
                    }
                }
            }
        };
        if let Some(f) = fetching {
            f.abort();
        }
        // An update in flight goes on; the next stream's hello says so, and its outcome is
        // reported there.
        self.in_flight = updating;
        ended
    }

    fn note_report(&mut self, report: Report) {
        if report.outcome == Outcome::Applied {
            if let Some(base) = &self.pending_base {
                let (image, hash, filter) = base.clone();
                if let Err(e) = self.set_base(&image, &hash, filter) {
                    tracing::warn!("keeping the old base: {e:#}");
                }
                self.collect_cache();
            }
        }
        self.pending_base = None;
        self.last_report = Some(report);
        self.scanner.rescan_now();
    }
}

/// Cached objects the base image does not use stay this long after their last fetch, so a
/// planned image preloaded today is still there when it becomes required.
const CACHE_GRACE: Duration = Duration::from_secs(24 * 3600);

impl Agent {
    /// Drops cached objects the machine's image no longer uses, once idle past the grace.
    fn collect_cache(&self) {
        let Some(base) = &self.base else { return };
        let mut keep: std::collections::HashSet<Hash> =
            base.manifest.object_hashes().into_iter().collect();
        if let Some(h) = hex::decode(&base.record.manifest_hash)
            .ok()
            .and_then(|b| parse_hash(&b))
        {
            keep.insert(h);
        }
        match self.objects.collect_garbage(&keep, CACHE_GRACE) {
            Ok(r) if r.removed > 0 => {
                tracing::info!(
                    removed = r.removed,
                    bytes = r.removed_bytes,
                    "object cache trimmed"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("trimming the object cache: {e}"),
        }
    }

    fn base_image(&self) -> String {
        self.base
            .as_ref()
            .map(|b| b.record.image.clone())
            .unwrap_or_default()
    }

    fn current(&self) -> anyhow::Result<Snapshot> {
        self.trees
            .borrow()
            .clone()
            .context("no scan has finished yet")
    }

    /// Sends the whole description: every path where the machine differs from its base.
    async fn describe_all(&mut self, out: &Out) -> anyhow::Result<Described> {
        let snapshot = self.current()?;
        self.trees.mark_unchanged();
        let delta = self.delta_of(&snapshot.tree)?;
        self.generation += 1;
        let root_hash = snapshot.tree.root_hash();
        let items: Vec<(String, Option<pb::ManifestEntry>)> = delta
            .iter()
            .map(|(p, e)| (p.to_owned(), e.map(entry_to_pb)))
            .collect();
        let bytes = self
            .send_pages(out, items, vec![], true, root_hash, snapshot.swept)
            .await;
        tracing::info!(
            base = %self.base_image(),
            deviations = delta.len(),
            bytes,
            "described the machine"
        );
        Ok(Described {
            delta,
            root_hash,
            swept: snapshot.swept,
            reset_at: self.generation,
            changed_at: HashMap::new(),
        })
    }

    /// Sends what changed in the description since the last one, if anything did.
    async fn describe_changes(
        &mut self,
        out: &Out,
        described: &mut Described,
    ) -> anyhow::Result<()> {
        let snapshot = self.current()?;
        let delta = self.delta_of(&snapshot.tree)?;
        let root_hash = snapshot.tree.root_hash();
        let mut items = Vec::new();
        for (path, entry) in delta.iter() {
            if described.delta.get(path) != Some(entry) {
                items.push((path.to_owned(), entry.map(entry_to_pb)));
            }
        }
        let matches: Vec<String> = described
            .delta
            .iter()
            .filter(|(p, _)| delta.get(p).is_none())
            .map(|(p, _)| p.to_owned())
            .collect();
        if items.is_empty()
            && matches.is_empty()
            && root_hash == described.root_hash
            && snapshot.swept == described.swept
        {
            return Ok(());
        }
        self.generation += 1;
        for path in items.iter().map(|(p, _)| p).chain(&matches) {
            described.changed_at.insert(path.clone(), self.generation);
        }
        self.send_pages(out, items, matches, false, root_hash, snapshot.swept)
            .await;
        described.delta = delta;
        described.root_hash = root_hash;
        described.swept = snapshot.swept;
        Ok(())
    }

    async fn send_pages(
        &self,
        out: &Out,
        items: Vec<(String, Option<pb::ManifestEntry>)>,
        matches: Vec<String>,
        reset: bool,
        root_hash: Hash,
        swept: bool,
    ) -> usize {
        let pages = items.len().div_ceil(ENTRIES_PER_PAGE).max(1);
        let mut bytes = 0;
        let mut items = items.into_iter();
        let mut matches = Some(matches);
        for page in 0..pages {
            let mut differs = Vec::new();
            let mut missing = Vec::new();
            for (path, entry) in items.by_ref().take(ENTRIES_PER_PAGE) {
                match entry {
                    Some(e) => differs.push(e),
                    None => missing.push(path),
                }
            }
            let state = pb::MachineState {
                generation: self.generation,
                reset: reset && page == 0,
                complete: page + 1 == pages,
                base_image: self.base_image(),
                root_hash: root_hash.to_vec(),
                differs,
                missing,
                matches: matches.take().unwrap_or_default(),
                swept,
            };
            bytes += prost::Message::encoded_len(&state);
            send(out, pb::agent_message::Body::State(state)).await;
        }
        bytes
    }

    #[allow(clippy::too_many_arguments)]
    async fn obey(
        &mut self,
        message: pb::ControllerMessage,
        out: &Out,
        described: &mut Described,
        incoming: &mut Option<Incoming>,
        fetching: &mut Option<tokio::task::JoinHandle<()>>,
        updating: &mut Option<Running>,
        addr: &str,
    ) -> anyhow::Result<()> {
        use pb::controller_message::Body;
        match message.body {
            Some(Body::Welcome(w)) => {
                tracing::debug!(leader = w.leader_id, "welcomed");
            }
            Some(Body::Rebase(rebase)) => {
                let hash =
                    parse_hash(&rebase.manifest_hash).context("rebase: bad manifest hash")?;
                let controllers = self.controllers_from(addr);
                fetch::fetch(
                    &self.objects,
                    &controllers,
                    &[(hash, rebase.manifest_size)],
                    self.config.fetch_bytes_per_sec,
                    |_| {},
                )
                .await?;
                self.set_base(&rebase.image, &hash, rebase.filter)?;
                tracing::info!(image = %rebase.image, "describing the machine against a new base");
                *described = self.describe_all(out).await?;
            }
            Some(Body::Fetch(f)) => {
                if let Some(previous) = fetching.take() {
                    previous.abort();
                }
                let objects = f
                    .objects
                    .iter()
                    .map(|o| parse_hash(&o.hash).map(|h| (h, o.size)))
                    .collect::<Option<Vec<_>>>()
                    .context("fetch: bad object hash")?;
                let rate = (f.bytes_per_sec > 0)
                    .then_some(f.bytes_per_sec)
                    .or(self.config.fetch_bytes_per_sec);
                let store = self.objects.clone();
                let controllers = self.controllers_from(addr);
                let out = out.clone();
                let plan_id = f.plan_id;
                tracing::info!(image = %f.image, objects = objects.len(), "fetching");
                *fetching = Some(tokio::spawn(async move {
                    let mut last_sent = Instant::now();
                    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
                    let forward = {
                        let out = out.clone();
                        tokio::spawn(async move {
                            while let Some(p) = rx.recv().await {
                                send(
                                    &out,
                                    pb::agent_message::Body::FetchProgress(progress_to_pb(
                                        plan_id, p, false, "",
                                    )),
                                )
                                .await;
                            }
                        })
                    };
                    let result = fetch::fetch(&store, &controllers, &objects, rate, |p| {
                        if last_sent.elapsed() >= Duration::from_millis(250) {
                            last_sent = Instant::now();
                            let _ = tx.send(p);
                        }
                    })
                    .await;
                    drop(tx);
                    let _ = forward.await;
                    let body = match result {
                        Ok(p) => progress_to_pb(plan_id, p, true, ""),
                        Err(e) => {
                            progress_to_pb(plan_id, Progress::default(), true, &e.to_string())
                        }
                    };
                    send(&out, pb::agent_message::Body::FetchProgress(body)).await;
                }));
            }
            Some(Body::Update(page)) => {
                let fresh = incoming.as_ref().is_none_or(|i| i.plan_id != page.plan_id);
                if fresh {
                    *incoming = Some(Incoming {
                        plan_id: page.plan_id,
                        image: page.image.clone(),
                        generation: page.generation,
                        manifest_hash: page.manifest_hash.clone(),
                        filter: page.filter.clone(),
                        steps: Vec::new(),
                        triggers: Vec::new(),
                    });
                }
                let gathering = incoming.as_mut().context("no update being gathered")?;
                for step in page.steps {
                    gathering.steps.push(step_from_pb(step)?);
                }
                gathering
                    .triggers
                    .extend(page.triggers.into_iter().map(trigger_from_pb));
                if page.complete {
                    let update = incoming.take().context("no update being gathered")?;
                    if updating.is_some() {
                        anyhow::bail!("an update arrived while another runs; ignored");
                    }
                    self.start_update(update, described, out, updating).await?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// The controllers to fetch from, the one this stream is on first.
    fn controllers_from(&self, addr: &str) -> Vec<String> {
        let mut list = vec![addr.to_owned()];
        list.extend(
            self.config
                .controllers
                .iter()
                .filter(|c| *c != addr)
                .cloned(),
        );
        list
    }

    async fn start_update(
        &mut self,
        update: Incoming,
        described: &Described,
        out: &Out,
        updating: &mut Option<Running>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let refuse = |why: String| Report {
            plan_id: update.plan_id,
            image: update.image.clone(),
            outcome: Outcome::Refused,
            error: Some(why),
            activation: Duration::ZERO,
            duration: started.elapsed(),
            steps: update.steps.len(),
            services: vec![],
            touched: vec![],
            finished_unix_ms: now_unix_ms(),
        };
        let stale_path = if update.generation < described.reset_at {
            Some("(the whole description)".to_owned())
        } else {
            update
                .steps
                .iter()
                .find(|s| {
                    described
                        .changed_at
                        .get(s.path())
                        .is_some_and(|g| *g > update.generation)
                })
                .map(|s| s.path().to_owned())
        };
        if let Some(path) = stale_path {
            let report = refuse(format!(
                "the plan is stale: {path} changed after generation {}",
                update.generation
            ));
            send(
                out,
                pb::agent_message::Body::UpdateResult(report_to_pb(&report)),
            )
            .await;
            return Ok(());
        }
        let Some(hash) = parse_hash(&update.manifest_hash) else {
            let report = refuse("the update names no manifest".into());
            send(
                out,
                pb::agent_message::Body::UpdateResult(report_to_pb(&report)),
            )
            .await;
            return Ok(());
        };
        let mut lines = self.config.excluded.clone();
        lines.extend(update.filter.iter().cloned());
        let excluded = match Filter::new(lines) {
            Ok(f) => f,
            Err(e) => {
                let report = refuse(format!("the image's filter: {e}"));
                send(
                    out,
                    pb::agent_message::Body::UpdateResult(report_to_pb(&report)),
                )
                .await;
                return Ok(());
            }
        };
        self.pending_base = Some((update.image.clone(), hash, update.filter.clone()));
        let request = UpdateRequest {
            plan_id: update.plan_id,
            image: update.image,
            steps: update.steps,
            triggers: update.triggers,
        };
        tracing::info!(image = %request.image, steps = request.steps.len(), "updating");
        let info = pb::UpdateInFlight {
            plan_id: request.plan_id,
            image: request.image.clone(),
            high_impact: request
                .triggers
                .iter()
                .any(|t| t.high_impact || t.do_reboot),
        };
        let updater = self.updater.clone();
        *updating = Some((
            info,
            tokio::task::spawn_blocking(move || updater.apply(&request, &excluded)),
        ));
        Ok(())
    }

    async fn finished(
        &mut self,
        report: Report,
        out: &Out,
        described: &mut Described,
    ) -> anyhow::Result<()> {
        tracing::info!(image = %report.image, outcome = ?report.outcome, error = ?report.error, ms = report.duration.as_millis() as u64, "update finished");
        let result = report_to_pb(&report);
        self.note_report(report);
        // Describe the machine as the update left it, not as a pass that ran during it saw it.
        let scanner = self.scanner.clone();
        send(out, pb::agent_message::Body::UpdateResult(result)).await;
        tokio::task::spawn_blocking(move || scanner.pass_now())
            .await
            .context("the rescan after the update failed")?;
        *described = self.describe_all(out).await?;
        Ok(())
    }
}

fn progress_to_pb(plan_id: u64, p: Progress, done: bool, error: &str) -> pb::FetchProgress {
    pb::FetchProgress {
        objects_downloaded: p.objects_downloaded,
        bytes_downloaded: p.bytes_downloaded,
        plan_id,
        objects_done: p.objects_done,
        objects_total: p.objects_total,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        done,
        error: error.to_owned(),
    }
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn regex_escape(path: &str) -> String {
    regex::escape(path)
}

fn ended(status: tonic::Status) -> Ended {
    if let Some(leader) = status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
    {
        return Ended::Redirect(leader.to_owned());
    }
    match status.code() {
        Code::NotFound => Ended::Retry(format!("refused: {}", status.message())),
        _ => Ended::Retry(format!("stream ended: {}", status.message())),
    }
}
