//! The leader's side of the agent stream, and the reconciler that drives each machine.
//!
//! Every `subd` holds one `Agent.Sync` stream to the leader. A session per stream keeps the
//! machine's soft state ([`MachineView`]: the agent's base image and delta, the work in
//! flight, retry back-off, drift) and wakes when the agent reports, when the log changes (a
//! new required image, a halt) or when a back-off ends. It then asks the pure
//! [`reconcile::decide`] what to do and carries it out: plan (compose the base manifest with
//! the agent's delta against the required image), fetch, update, or rebase.
//!
//! The leader holds no machine's whole tree: a compliant machine is a base image name and an
//! empty delta. Manifests and image-to-image transitions are loaded once and shared by every
//! session. Soft state is leader-local: after a failover the agents reconnect to the new
//! leader and describe themselves again, and their last update's outcome comes with them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dom_proto::frame::{ControllerFrame, Shared};
use dom_proto::v1 as pb;
use dom_storage::event::Hash;
use dom_storage::image::{entry_from_pb, entry_to_pb, is_normalized, Entry, Filter, Manifest};
use dom_storage::names::canonical_hostname;
use dom_storage::plan::{self, Plan, Step, Target, Transition};
use dom_storage::state_machine::FleetView;
use dom_storage::types::{NodeId, Raft};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::admin::{leader_of, not_leader};
use crate::cache::{cached_sure, Cache};
use crate::objects::{LoadedManifest, Manifests};
use crate::proposer::Proposer;
use crate::reconcile::{self, Decision, LogInputs, MachineView, Outcome, UpdateSummary, Work};

/// The actor of events the controller appends itself (the automatic brake).
pub const CONTROLLER_ACTOR: &str = "domd";

/// Steps per Update message, so a whole-image plan never makes one huge message.
const STEPS_PER_PAGE: usize = 5_000;
/// How long an agent may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSITION_CACHE: usize = 64;

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The leader's reconciler: soft state for every machine, and the shared caches.
pub struct Reconciler {
    id: NodeId,
    raft: Raft,
    proposer: Proposer,
    view: FleetView,
    manifests: Arc<Manifests>,
    machines: Mutex<SoftState>,
    /// The newest session per hostname; an older one for the same machine stops.
    sessions: Mutex<HashMap<String, u64>>,
    transitions: Mutex<Cache<(Option<Hash>, Hash), Transition>>,
    /// Plans for machines exactly on their base.
    plans: Mutex<Cache<SharedPlanKey, EncodedPlan>>,
    /// Compiled agent exclusions, shared by every machine that sends the same lines.
    filters: Mutex<HashMap<Vec<String>, Filter>>,
    next_session: AtomicU64,
    next_plan: AtomicU64,
    /// Counts freed update slots; sessions waiting for one watch it (a watch, unlike a
    /// notification, is never missed by a session busy at the moment a slot frees).
    slots: tokio::sync::watch::Sender<u64>,
    /// The term this replica leads in, and since when (for the warm-up).
    leader_since: Mutex<(u64, std::time::Instant)>,
    /// One brake at a time, so racing failures append one halt, not several.
    braking: tokio::sync::Mutex<()>,
    /// Recent update outcomes per image (time, machine, health check failed), for the brake.
    outcomes: Mutex<HashMap<String, reconcile::Outcomes>>,
}

/// Every machine's soft state, with the update slots in use counted as the views change, so
/// that taking a slot costs the same in a fleet of ten machines or of ten thousand.
#[derive(Default)]
struct SoftState {
    views: HashMap<String, MachineView>,
    /// Machines holding an update slot, and of those, how many in high-impact updates.
    updating: usize,
    high_impact: u64,
}

/// The update slots a machine holds: (updating, high impact).
fn slot_use(v: &MachineView) -> (usize, u64) {
    match v.work {
        Work::Updating { high_impact, .. } => (1, u64::from(high_impact)),
        // Applied, but not confirmed until the agent has described itself again.
        Work::Rebasing { .. } if !v.complete => (1, 0),
        _ => (0, 0),
    }
}

impl SoftState {
    /// The one way a view changes, so the slot counts stay true.
    fn update<T>(&mut self, hostname: &str, f: impl FnOnce(&mut MachineView) -> T) -> T {
        // A known machine costs no allocation: this runs on every message of every agent.
        let (updating, high_impact) = (&mut self.updating, &mut self.high_impact);
        let v = match self.views.get_mut(hostname) {
            Some(v) => v,
            None => self.views.entry(hostname.to_owned()).or_default(),
        };
        let before = slot_use(v);
        let out = f(v);
        let after = slot_use(v);
        *updating = *updating - before.0 + after.0;
        *high_impact = *high_impact - before.1 + after.1;
        out
    }
}

/// Longest a new leader waits for agents to report updates in flight before starting any.
const LEADER_WARMUP: Duration = Duration::from_secs(10);

pub use crate::reconcile::BRAKE_WINDOW_MS;

/// A shared plan is fixed by the base manifest, the target image and the agent's exclusions.
/// The target goes by name, not by manifest: images of one tree differ in name, filter and
/// triggers, and an image name is never reused.
type SharedPlanKey = (Option<Hash>, String, Vec<String>);

/// An image as a plan target: its manifest and what it leaves alone.
struct TargetImage {
    name: String,
    manifest_hash: Hash,
    manifest: Arc<LoadedManifest>,
    filter: Filter,
    triggers: Vec<dom_storage::image::Trigger>,
}

impl Reconciler {
    pub fn new(
        id: NodeId,
        raft: Raft,
        proposer: Proposer,
        view: FleetView,
        manifests: Arc<Manifests>,
    ) -> Arc<Reconciler> {
        Arc::new(Reconciler {
            id,
            raft,
            proposer,
            view,
            manifests,
            machines: Mutex::new(SoftState::default()),
            sessions: Mutex::new(HashMap::new()),
            transitions: Mutex::new(Cache::new(TRANSITION_CACHE)),
            plans: Mutex::new(Cache::new(TRANSITION_CACHE)),
            filters: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            next_plan: AtomicU64::new(1),
            slots: tokio::sync::watch::channel(0).0,
            braking: tokio::sync::Mutex::new(()),
            leader_since: Mutex::new((0, std::time::Instant::now())),
            outcomes: Mutex::new(HashMap::new()),
        })
    }

    fn machines(&self) -> std::sync::MutexGuard<'_, SoftState> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of one machine's soft state (default when this leader has never seen it).
    pub fn machine(&self, hostname: &str) -> MachineView {
        self.machines()
            .views
            .get(hostname)
            .cloned()
            .unwrap_or_default()
    }

    fn with_machine<T>(&self, hostname: &str, f: impl FnOnce(&mut MachineView) -> T) -> T {
        self.machines().update(hostname, f)
    }

    /// From the server metrics, which openraft publishes before the full metrics: a session
    /// woken by a change of leader must see that change when it looks.
    fn is_leader(&self) -> bool {
        self.raft.server_metrics().borrow().current_leader == Some(self.id)
    }

    /// Plan ids carry the term, so an outcome reported to a later leader is never mistaken
    /// for one of its own plans.
    fn plan_id(&self) -> u64 {
        let term = self.raft.metrics().borrow().current_term;
        (term << 32) | (self.next_plan.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff)
    }

    async fn transition(
        &self,
        base: Option<(&Hash, &Manifest)>,
        target: (&Hash, &Manifest),
    ) -> Arc<Transition> {
        let key = (base.map(|(h, _)| *h), *target.0);
        cached_sure(&self.transitions, &key, || {
            Transition::new(base.map(|(_, m)| m), target.1)
        })
        .await
    }

    /// The live image `name` with its manifest, or None when it is unknown, deleted or has
    /// no manifest.
    async fn target_image(&self, name: &str) -> Result<Option<TargetImage>, Status> {
        let Some(image) = self
            .view
            .read(|l| l.state.image(name).cloned())
            .filter(|i| i.deleted_at.is_none())
        else {
            return Ok(None);
        };
        let Some(manifest_hash) = image.manifest_hash else {
            return Ok(None);
        };
        // Compiled once per image: every session planning toward it shares the filter.
        let filter = self.agent_filter(&image.filter)?;
        Ok(Some(TargetImage {
            name: image.name,
            manifest_hash,
            manifest: self.manifests.get(&manifest_hash).await?,
            filter,
            triggers: image.triggers,
        }))
    }

    /// While a new leader waits for the agents to report updates still in flight (a previous
    /// leader started them, and they count against the limits), when that wait ends. It ends
    /// early once every machine of the fleet has said hello. The first leader of a cluster
    /// (term 1) has no predecessor and does not wait.
    fn warming_up(&self, fleet_size: usize) -> Option<std::time::Instant> {
        let term = self.raft.metrics().borrow().current_term;
        if term <= 1 {
            return None;
        }
        let started = self.note_term(term);
        let ends = started + LEADER_WARMUP;
        let connected = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        (std::time::Instant::now() < ends && connected < fleet_size).then_some(ends)
    }

    /// Remembers when this replica began to lead in `term` (the first time it is asked in that
    /// term: a hello or an update attempt, which follow an election closely).
    fn note_term(&self, term: u64) -> std::time::Instant {
        let mut since = self.leader_since.lock().unwrap_or_else(|p| p.into_inner());
        if since.0 != term {
            *since = (term, std::time::Instant::now());
        }
        since.1
    }

    /// Takes an update slot for `hostname` if the rollout limits allow, atomically with every
    /// other session's check; otherwise says what holds it.
    fn try_start(
        &self,
        hostname: &str,
        pending: &Pending,
        policy: &dom_storage::fleet::Policy,
        fleet_size: usize,
    ) -> Result<(), String> {
        let mut machines = self.machines();
        // The slots in use by every other machine.
        let (own_updating, own_high) = machines.views.get(hostname).map_or((0, 0), slot_use);
        let updating = machines.updating - own_updating;
        let high = machines.high_impact - own_high;
        if let Some(limit) = policy.max_updating {
            let max = limit.of(fleet_size);
            if updating >= max {
                return Err(format!(
                    "waiting for an update slot ({updating} of at most {max} updating)"
                ));
            }
        }
        if pending.high_impact {
            if let Some(max) = policy.max_high_impact {
                if high >= max {
                    return Err(format!(
                        "waiting for a high-impact slot ({high} of at most {max} in high-impact updates)"
                    ));
                }
            }
        }
        machines.update(hostname, |v| {
            v.work = Work::Updating {
                plan_id: pending.plan_id,
                image: pending.encoded.plan.image.clone(),
                started_unix_ms: now_unix_ms(),
                high_impact: pending.high_impact,
            };
            v.hold = None;
        });
        Ok(())
    }

    /// Notes an update's outcome; when too many machines that updated to the image within the
    /// brake window failed their health check, returns the reason to halt.
    fn record_outcome(
        &self,
        image: &str,
        hostname: &str,
        failed: bool,
        now: i64,
        brake_percent: u32,
    ) -> Option<String> {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let (failures, total) = outcomes
            .entry(image.to_owned())
            .or_default()
            .record(hostname, failed, now);
        (failed && brake_percent < 100 && failures * 100 > total * brake_percent as usize).then(
            || {
                format!(
                    "automatic brake: {failures} of {total} machine(s) that updated to {image} in the last {} minutes failed their health check (brake at {brake_percent}%)",
                    BRAKE_WINDOW_MS / 60_000
                )
            },
        )
    }

    /// Appends the brake's halt, as the controller.
    async fn brake(self: Arc<Self>, reason: String) {
        let _one = self.braking.lock().await;
        if self.view.read(|l| l.state.policy().halt.is_some()) {
            return;
        }
        tracing::warn!("{reason}");
        let event = dom_storage::event::Event {
            actor: CONTROLLER_ACTOR.to_owned(),
            time_unix_ms: 0,
            reason,
            change: dom_storage::event::Change::UpdatesHalted,
        };
        if let Err(e) = self.proposer.propose(event).await {
            tracing::error!(
                "the automatic brake could not halt updates: {}",
                e.message()
            );
        }
    }

    /// An agent's exclusions, compiled once per distinct list (agents mostly share one).
    fn agent_filter(&self, lines: &[String]) -> Result<Filter, Status> {
        let mut filters = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = filters.get(lines) {
            return Ok(f.clone());
        }
        let filter = Filter::new(lines.to_vec())
            .map_err(|e| Status::invalid_argument(format!("agent exclusions: {e}")))?;
        if filters.len() < 1024 {
            filters.insert(lines.to_vec(), filter.clone());
        }
        Ok(filter)
    }

    /// Every machine of the fleet with its soft state, for `domadm status`.
    pub fn status(&self, only: Option<&str>) -> Result<pb::StatusResponse, Status> {
        let (machines, halt) = self.view.read(|l| {
            let machines: Vec<_> = l
                .state
                .machines()
                .filter(|m| only.is_none_or(|h| m.hostname == h))
                .cloned()
                .collect();
            (machines, l.state.policy().halt.clone())
        });
        if let Some(host) = only {
            if machines.is_empty() {
                return Err(Status::not_found(format!(
                    "machine {host} is not in the fleet"
                )));
            }
        }
        let now = now_unix_ms();
        let soft = self.machines();
        let default = MachineView::default();
        let machines = machines
            .into_iter()
            .map(|m| {
                let v = soft.views.get(&m.hostname).unwrap_or(&default);
                machine_status(&m, v, halt.is_some(), now)
            })
            .collect();
        Ok(pb::StatusResponse {
            machines,
            halted: halt.is_some(),
            halt_reason: halt.map(|h| h.reason).unwrap_or_default(),
            leader: self.id,
        })
    }
}

fn machine_status(
    m: &dom_storage::fleet::Machine,
    v: &MachineView,
    halted: bool,
    now: i64,
) -> pb::MachineStatus {
    let required = m.required_image.as_deref();
    let (objects_done, objects_total, bytes_done, bytes_total) = match &v.work {
        Work::Fetching {
            objects_done,
            objects_total,
            bytes_done,
            bytes_total,
            ..
        } => (*objects_done, *objects_total, *bytes_done, *bytes_total),
        _ => (0, 0, 0, 0),
    };
    let state = v.state(required, now);
    let paused_until = m.paused_until_unix_ms.filter(|u| *u > now);
    let detail = match (&v.work, required) {
        (
            Work::Fetching {
                image,
                preload: true,
                objects_done,
                objects_total,
                ..
            },
            _,
        ) => format!("preloading {image}: {objects_done} of {objects_total} objects"),
        (Work::Fetching { image, .. }, _) => format!("fetching {image}"),
        (_, _) if v.hold.is_some() && state != "compliant" => v.hold.clone().unwrap_or_default(),
        (Work::Idle, Some(_)) if paused_until.is_some() && state != "compliant" => format!(
            "paused until {}s from now: {}",
            (paused_until.unwrap_or(now) - now + 999) / 1000,
            m.pause_reason
        ),
        (Work::Updating { image, .. }, _) => format!("updating to {image}"),
        (Work::Rebasing { image }, _) => format!("matches {image}; re-describing against it"),
        (Work::Idle, Some(req)) if state != "compliant" && v.connected => {
            match v.retries.get(req) {
                Some(r) if r.not_before_ms > now => format!(
                    "{} failed attempt(s) on {req}; next in {}s",
                    r.failures,
                    (r.not_before_ms - now + 999) / 1000
                ),
                _ if halted => "updates are halted".to_owned(),
                _ if !v.complete => "agent is describing the machine".to_owned(),
                _ => String::new(),
            }
        }
        (_, None) => "no required image".to_owned(),
        _ => String::new(),
    };
    pb::MachineStatus {
        hostname: m.hostname.clone(),
        required_image: m.required_image.clone().unwrap_or_default(),
        planned_image: m.planned_image.clone().unwrap_or_default(),
        active_image: v.base_image.clone().unwrap_or_default(),
        state: state.to_owned(),
        last_seen_unix_ms: v.last_seen_unix_ms,
        deviations: v.delta.len() as u64,
        last_update: v.last_update.as_ref().map(|u| pb::LastUpdate {
            image: u.image.clone(),
            outcome: u.outcome.as_str().to_owned(),
            error: u.error.clone(),
            duration_ms: u.duration_ms,
            activation_ms: u.activation_ms,
            finished_unix_ms: u.finished_unix_ms,
            steps: u.steps,
            services: u.services.clone(),
        }),
        drift: v
            .drift
            .iter()
            .map(|d| pb::Drift {
                path: d.path.clone(),
                first_seen_unix_ms: d.first_seen_unix_ms,
                corrected: d.corrected,
            })
            .collect(),
        connected: v.connected,
        detail,
        fetch_objects_done: objects_done,
        fetch_objects_total: objects_total,
        fetch_bytes_done: bytes_done,
        fetch_bytes_total: bytes_total,
        root_hash: if v.complete {
            v.root_hash.to_vec()
        } else {
            Vec::new()
        },
        generation: v.generation,
        swept: v.swept,
        last_fetch: v.last_fetch.as_ref().map(|f| pb::LastFetch {
            image: f.image.clone(),
            preload: f.preload,
            objects_downloaded: f.objects_downloaded,
            bytes_downloaded: f.bytes_downloaded,
            objects_total: f.objects_total,
            bytes_total: f.bytes_total,
            finished_unix_ms: f.finished_unix_ms,
        }),
        preloaded_image: v.preloaded.clone().unwrap_or_default(),
        paused_until_unix_ms: paused_until.unwrap_or(0),
    }
}

fn summary_from_pb(r: &pb::UpdateResult) -> UpdateSummary {
    let outcome = match pb::UpdateOutcome::try_from(r.outcome) {
        Ok(pb::UpdateOutcome::Applied) => Outcome::Applied,
        Ok(pb::UpdateOutcome::RolledBack) => Outcome::RolledBack,
        Ok(pb::UpdateOutcome::Refused) => Outcome::Refused,
        _ => Outcome::Failed,
    };
    UpdateSummary {
        plan_id: r.plan_id,
        image: r.image.clone(),
        outcome,
        error: r.error.clone(),
        duration_ms: r.duration_ms,
        activation_ms: r.activation_ms,
        finished_unix_ms: r.finished_unix_ms,
        steps: r.steps,
        services: r.services.clone(),
    }
}

/// An entry from the agent, checked like any input from the network.
fn checked_entry(e: pb::ManifestEntry) -> Result<Entry, Status> {
    let entry = entry_from_pb(e).map_err(|e| Status::invalid_argument(e.to_string()))?;
    checked_path(&entry.path)?;
    Ok(entry)
}

fn checked_path(path: &str) -> Result<(), Status> {
    if is_normalized(path) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "path {path:?} is not a normalized absolute path"
        )))
    }
}

fn step_to_pb(step: &Step) -> pb::Step {
    let (kind, entry) = match step {
        Step::Write(e) => (pb::StepKind::Write, entry_to_pb(e)),
        Step::Metadata(e) => (pb::StepKind::Metadata, entry_to_pb(e)),
        Step::Delete(path) => (
            pb::StepKind::Delete,
            pb::ManifestEntry {
                path: path.clone(),
                ..Default::default()
            },
        ),
    };
    pb::Step {
        kind: kind as i32,
        entry: Some(entry),
    }
}

type Outbound = mpsc::Sender<Result<ControllerFrame, Status>>;

/// A plan with its messages encoded once, less the fields that differ per machine: a
/// fleet-wide assignment sends thousands of machines the same bytes.
struct EncodedPlan {
    plan: Plan,
    /// The Fetch, without `plan_id` and `bytes_per_sec`.
    fetch: Shared<pb::Fetch>,
    objects_total: u64,
    bytes_total: u64,
    /// The Update pages, without `plan_id` and `generation`.
    update_pages: Vec<Shared<pb::Update>>,
}

impl EncodedPlan {
    fn new(plan: Plan, target: &TargetImage) -> EncodedPlan {
        let mut objects: Vec<pb::ObjectRef> = plan
            .objects()
            .into_iter()
            .map(|(hash, size)| pb::ObjectRef {
                hash: hash.to_vec(),
                size,
            })
            .collect();
        // The agent needs the manifest too: it is its base once the update succeeds.
        objects.push(pb::ObjectRef {
            hash: target.manifest_hash.to_vec(),
            size: target.manifest.size,
        });
        let bytes_total = objects.iter().map(|o| o.size).sum();
        let objects_total = objects.len() as u64;
        let fetch = Shared::new(&pb::Fetch {
            image: plan.image.clone(),
            objects,
            ..Default::default()
        });
        let triggers: Vec<pb::Trigger> = plan
            .triggers
            .iter()
            .cloned()
            .map(dom_storage::event::trigger_to_pb)
            .collect();
        let pages: Vec<&[Step]> = plan.steps.chunks(STEPS_PER_PAGE).collect();
        let last = pages.len().saturating_sub(1);
        let update_pages = pages
            .into_iter()
            .enumerate()
            .map(|(i, page)| {
                Shared::new(&pb::Update {
                    image: plan.image.clone(),
                    steps: page.iter().map(step_to_pb).collect(),
                    triggers: if i == 0 { triggers.clone() } else { vec![] },
                    complete: i == last,
                    manifest_hash: target.manifest_hash.to_vec(),
                    filter: target.filter.lines().to_vec(),
                    ..Default::default()
                })
            })
            .collect();
        EncodedPlan {
            plan,
            fetch,
            objects_total,
            bytes_total,
            update_pages,
        }
    }
}

/// A plan the session has started: fetched first, then sent as an update.
struct Pending {
    plan_id: u64,
    encoded: Arc<EncodedPlan>,
    generation: u64,
    preload: bool,
    high_impact: bool,
}

struct Session {
    reconciler: Arc<Reconciler>,
    hostname: String,
    id: u64,
    out: Outbound,
    pending: Option<Pending>,
    wait_until: Option<i64>,
    /// Fetched and held by a rollout limit: the only state in which a freed slot concerns
    /// this machine.
    held_for_slot: bool,
    /// The log as this session last decided on it.
    seen: Option<LogInputs>,
}

async fn send(out: &Outbound, frame: impl Into<ControllerFrame>) -> Result<(), ()> {
    out.send(Ok(frame.into())).await.map_err(|_| ())
}

impl Session {
    fn current(&self) -> bool {
        self.reconciler
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.hostname)
            == Some(&self.id)
    }

    async fn run(mut self, mut inbound: Streaming<pb::AgentMessage>) {
        let r = self.reconciler.clone();
        let mut applied = r.view.subscribe();
        // Server metrics change only with the vote, the role or the membership; the full
        // metrics change on every heartbeat round, and would wake every session with them.
        let mut server = r.raft.server_metrics();
        let mut slots = r.slots.subscribe();
        let end: Result<(), Status> = loop {
            if !self.current() {
                break Err(Status::aborted(
                    "a newer connection from this machine replaced this one",
                ));
            }
            let sleep = match self.wait_until {
                Some(t) => Duration::from_millis((t - now_unix_ms()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        // Boxed, like `reconcile` below: their futures are large, and inlined
                        // they would make every idle session's task as large (about 90 KiB
                        // each, 1 GiB at 10,000 machines, by the page-fault profile).
                        if let Err(status) = Box::pin(self.handle(message)).await {
                            break Err(status);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => {
                        tracing::debug!(host = %self.hostname, "agent stream ended: {status}");
                        break Ok(());
                    }
                },
                changed = applied.changed() => {
                    if changed.is_err() {
                        break Err(Status::unavailable("replica is stopping"));
                    }
                    let Some(inputs) = r.view.read(|l| LogInputs::read(&l.state, &self.hostname)) else {
                        break Err(Status::not_found(format!(
                            "machine {} was removed from the fleet", self.hostname
                        )));
                    };
                    if self.seen.as_ref() == Some(&inputs) {
                        continue;
                    }
                    self.seen = Some(inputs);
                }
                changed = server.changed() => {
                    if changed.is_err() || !r.is_leader() {
                        break Err(not_leader(leader_of(&r.raft)));
                    }
                    continue;
                }
                _ = tokio::time::sleep(sleep) => {
                    self.wait_until = None;
                }
                _ = slots.changed(), if self.held_for_slot => {}
            }
            if let Err(status) = Box::pin(self.reconcile()).await {
                break Err(status);
            }
        };
        if let Err(status) = end {
            let _ = self.out.send(Err(status)).await;
        }
        if self.current() {
            r.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.hostname);
            r.with_machine(&self.hostname, |v| {
                v.connected = false;
                v.last_seen_unix_ms = now_unix_ms();
                v.complete = false;
                // An update in flight finishes on the agent (a rebooting machine comes back),
                // which reports it when it reconnects; until then it holds its update slot.
                // A fetch is resumed by the next plan.
                if !matches!(v.work, Work::Updating { .. }) {
                    v.work = Work::Idle;
                }
            });
            r.slots.send_modify(|n| *n += 1);
        }
        tracing::info!(host = %self.hostname, "agent disconnected");
    }

    async fn handle(&mut self, message: pb::AgentMessage) -> Result<(), Status> {
        let now = now_unix_ms();
        let r = self.reconciler.clone();
        use pb::agent_message::Body;
        match message.body {
            Some(Body::State(page)) => {
                let differs = page
                    .differs
                    .into_iter()
                    .map(checked_entry)
                    .collect::<Result<Vec<_>, _>>()?;
                for p in page.missing.iter().chain(&page.matches) {
                    checked_path(p)?;
                }
                let required = r.view.read(|l| {
                    l.state
                        .machine(&self.hostname)
                        .and_then(|m| m.required_image.clone())
                });
                let root_hash: Option<Hash> = page.root_hash.as_slice().try_into().ok();
                let freed = r.with_machine(&self.hostname, |v| {
                    let was_compliant = required.as_deref().is_some_and(|q| v.compliant_with(q));
                    v.last_seen_unix_ms = now;
                    let began =
                        reconcile::apply_page(v, page.reset, differs, page.missing, page.matches);
                    v.generation = page.generation;
                    v.base_image = (!page.base_image.is_empty()).then_some(page.base_image);
                    v.swept = page.swept;
                    if let Some(h) = root_hash {
                        v.root_hash = h;
                    }
                    if page.reset {
                        v.complete = false;
                    }
                    if page.complete {
                        v.complete = true;
                    }
                    if was_compliant && !page.reset && !began.is_empty() {
                        tracing::warn!(host = %self.hostname, paths = ?began, "drift: files changed behind the system's back");
                        v.note_drift(began, now);
                    }
                    // A whole fresh description ends a re-description, whichever base it ended on.
                    if page.reset {
                        v.awaiting_reset = false;
                    }
                    let mut freed = false;
                    if matches!(v.work, Work::Rebasing { .. }) && v.complete && !v.awaiting_reset {
                        v.work = Work::Idle;
                        freed = true;
                    }
                    if v.on_base() && v.base_image.is_some() && v.base_image == required {
                        v.drift_corrected();
                    }
                    freed
                });
                if freed {
                    // A confirmed update frees its slot for the next machine.
                    r.slots.send_modify(|n| *n += 1);
                }
            }
            Some(Body::FetchProgress(p)) => {
                let Some(pending) = self.pending.as_ref().filter(|x| x.plan_id == p.plan_id) else {
                    return Ok(());
                };
                let image = pending.encoded.plan.image.clone();
                let preload = pending.preload;
                if !p.error.is_empty() {
                    tracing::warn!(host = %self.hostname, %image, "fetch failed: {}", p.error);
                    self.pending = None;
                    if preload {
                        // A failed preload costs nothing; the update will fetch what it needs.
                        r.with_machine(&self.hostname, |v| {
                            v.work = Work::Idle;
                            v.preloaded = Some(image);
                        });
                        return Ok(());
                    }
                    r.with_machine(&self.hostname, |v| {
                        v.finished(
                            UpdateSummary {
                                plan_id: p.plan_id,
                                image,
                                outcome: Outcome::Failed,
                                error: format!("fetch: {}", p.error),
                                duration_ms: 0,
                                activation_ms: 0,
                                finished_unix_ms: now,
                                steps: 0,
                                services: vec![],
                            },
                            now,
                        )
                    });
                    return Ok(());
                }
                r.with_machine(&self.hostname, |v| {
                    v.last_seen_unix_ms = now;
                    v.work = Work::Fetching {
                        plan_id: p.plan_id,
                        image: image.clone(),
                        preload,
                        objects_done: p.objects_done,
                        objects_total: p.objects_total,
                        bytes_done: p.bytes_done,
                        bytes_total: p.bytes_total,
                    };
                    if p.done {
                        v.last_fetch = Some(reconcile::FetchSummary {
                            image: image.clone(),
                            preload,
                            objects_downloaded: p.objects_downloaded,
                            bytes_downloaded: p.bytes_downloaded,
                            objects_total: p.objects_total,
                            bytes_total: p.bytes_total,
                            finished_unix_ms: now,
                        });
                        v.work = if preload {
                            v.preloaded = Some(image.clone());
                            Work::Idle
                        } else {
                            Work::Ready {
                                plan_id: p.plan_id,
                                image: image.clone(),
                            }
                        };
                    }
                });
                if p.done {
                    if preload {
                        tracing::info!(host = %self.hostname, %image, bytes = p.bytes_downloaded, "preloaded");
                        self.pending = None;
                    } else {
                        self.start_update().await?;
                    }
                }
            }
            Some(Body::UpdateResult(result)) => {
                let summary = summary_from_pb(&result);
                tracing::info!(host = %self.hostname, image = %summary.image, outcome = summary.outcome.as_str(), error = %summary.error, ms = summary.duration_ms, "update finished");
                if self.pending.as_ref().map(|p| p.plan_id) == Some(result.plan_id) {
                    self.pending = None;
                }
                let (brake_percent, halted) = r.view.read(|l| {
                    (
                        l.state.policy().brake_failure_percent(),
                        l.state.policy().halt.is_some(),
                    )
                });
                let failed = summary.outcome == Outcome::RolledBack;
                if matches!(summary.outcome, Outcome::Applied | Outcome::RolledBack) {
                    if let Some(reason) =
                        r.record_outcome(&summary.image, &self.hostname, failed, now, brake_percent)
                    {
                        if !halted {
                            tokio::spawn(r.clone().brake(reason));
                        }
                    }
                }
                r.with_machine(&self.hostname, |v| {
                    let image = summary.image.clone();
                    let applied = summary.outcome == Outcome::Applied;
                    v.finished(summary, now);
                    // The agent describes itself afresh after an update; until it has, the
                    // update is not confirmed.
                    v.complete = false;
                    if applied {
                        v.work = Work::Rebasing { image };
                        v.awaiting_reset = true;
                    }
                });
                r.slots.send_modify(|n| *n += 1);
            }
            Some(Body::Hello(_)) => {
                return Err(Status::invalid_argument("hello sent twice"));
            }
            None => return Err(Status::invalid_argument("empty agent message")),
        }
        Ok(())
    }

    async fn reconcile(&mut self) -> Result<(), Status> {
        let r = self.reconciler.clone();
        let Some((machine, halted)) = r.view.read(|l| {
            l.state
                .machine(&self.hostname)
                .cloned()
                .map(|m| (m, l.state.policy().halt.is_some()))
        }) else {
            return Ok(());
        };
        let now = now_unix_ms();
        let view = r.machine(&self.hostname);
        if let Work::Ready { .. } = view.work {
            self.start_update().await?;
            if !matches!(r.machine(&self.hostname).work, Work::Idle) {
                return Ok(());
            }
        }
        let view = r.machine(&self.hostname);
        let log = reconcile::Assignment {
            required: machine.required_image.as_deref(),
            planned: machine.planned_image.as_deref(),
            halted,
            paused_until_unix_ms: machine.paused_until_unix_ms,
        };
        match reconcile::decide(&view, &log, now) {
            Decision::Nothing | Decision::Halted => Ok(()),
            Decision::WaitUntil(t) => {
                self.wait_until = Some(t);
                Ok(())
            }
            Decision::Rebase(image) => self.rebase(&image).await,
            Decision::Plan(image) => self.start_plan(&image, &view, &machine, false).await,
            Decision::Preload(image) => {
                if matches!(view.work, Work::Fetching { preload: true, .. }) {
                    return Ok(());
                }
                self.start_plan(&image, &view, &machine, true).await
            }
        }
    }

    async fn rebase(&mut self, image: &str) -> Result<(), Status> {
        let r = self.reconciler.clone();
        let Some(target) = r.target_image(image).await? else {
            return Ok(());
        };
        let manifest_size = target.manifest.size;
        r.with_machine(&self.hostname, |v| {
            v.work = Work::Rebasing {
                image: image.to_owned(),
            };
            v.awaiting_reset = true;
        });
        send(
            &self.out,
            pb::controller_message::Body::Rebase(pb::Rebase {
                image: image.to_owned(),
                manifest_hash: target.manifest_hash.to_vec(),
                filter: target.filter.lines().to_vec(),
                manifest_size,
            }),
        )
        .await
        .map_err(|_| Status::cancelled("agent went away"))
    }

    async fn start_plan(
        &mut self,
        image: &str,
        view: &MachineView,
        machine: &dom_storage::fleet::Machine,
        preload: bool,
    ) -> Result<(), Status> {
        let r = self.reconciler.clone();
        // Both manifests are loaded at once when neither is in the cache yet.
        let (target, base) = tokio::join!(r.target_image(image), async {
            match view.base_image.as_deref() {
                None => None,
                Some(name) => Some(r.target_image(name).await),
            }
        });
        let Some(target) = target? else {
            tracing::warn!(host = %self.hostname, %image, "required image is missing, deleted or has no manifest");
            return Ok(());
        };
        // The base as the agent holds it; if it is gone (deleted and collected), ask the agent
        // to describe itself against the target instead.
        let base = match base {
            None => None,
            Some(Ok(Some(b))) => Some(b),
            Some(_) => return self.rebase(image).await,
        };
        let transition = r
            .transition(
                base.as_ref()
                    .map(|b| (&b.manifest_hash, &b.manifest.manifest)),
                (&target.manifest_hash, &target.manifest.manifest),
            )
            .await;
        // A machine exactly on its base gets the plan every such machine gets: computed once
        // and shared, so a fleet-wide assignment costs the leader one plan, not one per machine.
        let shared_key = view.delta.is_empty().then(|| {
            (
                base.as_ref().map(|b| b.manifest_hash),
                target.name.clone(),
                view.excluded.lines().to_vec(),
            )
        });
        let make = || {
            plan::plan(
                &Target {
                    name: &target.name,
                    manifest: &target.manifest.manifest,
                    filter: &target.filter,
                    triggers: &target.triggers,
                },
                base.as_ref().map(|b| &b.manifest.manifest),
                &transition,
                &view.delta,
                &view.excluded,
            )
        };
        let encoded = match &shared_key {
            Some(key) => cached_sure(&r.plans, key, || EncodedPlan::new(make(), &target)).await,
            None => Arc::new(EncodedPlan::new(make(), &target)),
        };
        let plan = &encoded.plan;
        if preload {
            if plan.objects().is_empty() {
                r.with_machine(&self.hostname, |v| v.preloaded = Some(image.to_owned()));
                return Ok(());
            }
        } else if plan.is_empty() {
            if view.base_image.as_deref() == Some(image) {
                // Only paths the image or the agent leaves alone differ: nothing to do, and
                // re-describing would change nothing.
                return Ok(());
            }
            return self.rebase(image).await;
        }
        // An update that would delete most of the machine is held until an operator says so:
        // a wrong image or a bad filter must not wipe a machine.
        let managed =
            plan::machine_entries(base.as_ref().map(|b| &b.manifest.manifest), &view.delta);
        let deletions = plan.deletions();
        if !preload
            && deletions * 2 > managed
            && machine.safety_cleared_image.as_deref() != Some(image)
        {
            let hold = format!(
                "held as unsafe: the update to {image} would delete {deletions} of {managed} paths; `domadm machine clear-safety {}` lets it run",
                self.hostname
            );
            let changed = r.with_machine(&self.hostname, |v| {
                let changed = v.hold.as_deref() != Some(hold.as_str());
                v.hold = Some(hold.clone());
                changed
            });
            if changed {
                tracing::warn!(host = %self.hostname, "{hold}");
            }
            return Ok(());
        }
        let plan_id = r.plan_id();
        let (objects_total, bytes_total) = (encoded.objects_total, encoded.bytes_total);
        tracing::info!(host = %self.hostname, %image, plan_id, preload, steps = plan.steps.len(), objects = objects_total, "planned");
        r.with_machine(&self.hostname, |v| {
            v.hold = None;
            v.work = Work::Fetching {
                plan_id,
                image: image.to_owned(),
                preload,
                objects_done: 0,
                objects_total,
                bytes_done: 0,
                bytes_total,
            }
        });
        let high_impact = plan.high_impact();
        let fetch = ControllerFrame::spliced(
            &pb::Fetch {
                plan_id,
                bytes_per_sec: r
                    .view
                    .read(|l| l.state.policy().fetch_bytes_per_sec)
                    .unwrap_or(0),
                ..Default::default()
            },
            &encoded.fetch,
        );
        self.pending = Some(Pending {
            plan_id,
            encoded,
            generation: view.generation,
            preload,
            high_impact,
        });
        send(&self.out, fetch)
            .await
            .map_err(|_| Status::cancelled("agent went away"))
    }

    async fn start_update(&mut self) -> Result<(), Status> {
        let r = self.reconciler.clone();
        self.held_for_slot = false;
        let Some(pending) = self.pending.as_ref() else {
            r.with_machine(&self.hostname, |v| v.work = Work::Idle);
            return Ok(());
        };
        let Some((machine, policy, fleet_size)) = r.view.read(|l| {
            l.state
                .machine(&self.hostname)
                .cloned()
                .map(|m| (m, l.state.policy().clone(), l.state.machine_count()))
        }) else {
            return Ok(());
        };
        // The fleet may have moved on while the objects came: a new required image makes this
        // plan moot; a halt or a pause holds it, fetched, until it ends.
        if machine.required_image.as_deref() != Some(pending.encoded.plan.image.as_str()) {
            self.pending = None;
            r.with_machine(&self.hostname, |v| v.work = Work::Idle);
            return Ok(());
        }
        let now = now_unix_ms();
        let warming = r.warming_up(fleet_size);
        let hold = if let Some(ends) = warming {
            let wait = ends.saturating_duration_since(std::time::Instant::now());
            self.wait_until = Some(now + wait.as_millis() as i64);
            Some(format!(
                "fetched; a new leader waits up to {}s for every agent to report updates in flight",
                wait.as_secs() + 1
            ))
        } else if policy.halt.is_some() {
            Some("fetched; updates are halted".to_owned())
        } else if let Some(until) = machine.paused_until_unix_ms.filter(|u| *u > now) {
            self.wait_until = Some(until);
            Some(format!("fetched; paused: {}", machine.pause_reason))
        } else {
            let held = r
                .try_start(&self.hostname, pending, &policy, fleet_size)
                .err();
            self.held_for_slot = held.is_some();
            held
        };
        if let Some(hold) = hold {
            r.with_machine(&self.hostname, |v| v.hold = Some(hold));
            return Ok(());
        }
        let own = pb::Update {
            plan_id: pending.plan_id,
            generation: pending.generation,
            ..Default::default()
        };
        for page in &pending.encoded.update_pages {
            send(&self.out, ControllerFrame::spliced(&own, page))
                .await
                .map_err(|_| Status::cancelled("agent went away"))?;
        }
        Ok(())
    }
}

/// The Agent gRPC service.
pub struct AgentService {
    pub reconciler: Arc<Reconciler>,
}

#[tonic::async_trait]
impl dom_proto::leader::agent_server::Agent for AgentService {
    type SyncStream = ReceiverStream<Result<ControllerFrame, Status>>;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let r = self.reconciler.clone();
        if !r.is_leader() {
            return Err(not_leader(leader_of(&r.raft)));
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no hello from the agent")),
            _ => return Err(Status::invalid_argument("an agent must start with hello")),
        };
        let hostname = canonical_hostname(&hello.hostname)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.view.read(|l| l.state.machine(&hostname).is_none()) {
            tracing::warn!(host = %hostname, "refused an agent for a machine not in the fleet");
            return Err(Status::not_found(format!(
                "machine {hostname} is not in the fleet; add it with `domadm machine add {hostname}`"
            )));
        }
        let excluded = r.agent_filter(&hello.excluded)?;
        r.note_term(r.raft.metrics().borrow().current_term);
        let id = r.next_session.fetch_add(1, Ordering::Relaxed);
        r.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hostname.clone(), id);
        let now = now_unix_ms();
        r.with_machine(&hostname, |v| {
            v.connected = true;
            v.last_seen_unix_ms = now;
            v.excluded = excluded;
            v.complete = false;
            v.hold = None;
            // The agent's word decides what is in flight: an update it is still running holds
            // its slot here too, so limits hold across a failover.
            v.work = match &hello.in_flight {
                Some(f) => Work::Updating {
                    plan_id: f.plan_id,
                    image: f.image.clone(),
                    started_unix_ms: now,
                    high_impact: f.high_impact,
                },
                None => Work::Idle,
            };
            if let Some(last) = &hello.last_update {
                // The agent's own record decides what happened to an update in flight
                // during a failover: recorded once, never re-run blindly.
                if v.last_update.as_ref().map(|u| u.plan_id) != Some(last.plan_id) {
                    let finished_at = last.finished_unix_ms;
                    v.finished(summary_from_pb(last), finished_at);
                }
            }
        });
        tracing::info!(host = %hostname, version = %hello.agent_version, "agent connected");
        let (out, rx) = mpsc::channel(16);
        let _ = send(
            &out,
            pb::controller_message::Body::Welcome(pb::Welcome { leader_id: r.id }),
        )
        .await;
        let session = Session {
            reconciler: r,
            hostname,
            id,
            out,
            pending: None,
            wait_until: None,
            held_for_slot: false,
            seen: None,
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counted slots always equal a recount over every view, whatever the changes.
    #[test]
    fn slot_counts_follow_every_change() {
        let mut soft = SoftState::default();
        let recount = |soft: &SoftState| {
            soft.views
                .values()
                .map(slot_use)
                .fold((0, 0), |(u, h), (du, dh)| (u + du, h + dh))
        };
        let works = |i: u64| match i % 5 {
            0 => Work::Idle,
            1 => Work::Updating {
                plan_id: i,
                image: "img".into(),
                started_unix_ms: 0,
                high_impact: i.is_multiple_of(2),
            },
            2 => Work::Rebasing {
                image: "img".into(),
            },
            3 => Work::Updating {
                plan_id: i,
                image: "img".into(),
                started_unix_ms: 0,
                high_impact: true,
            },
            _ => Work::Idle,
        };
        // A deterministic walk over hosts, work and completeness.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let host = format!("m{}", x % 7);
            soft.update(&host, |v| {
                v.work = works(x >> 8);
                v.complete = (x >> 16).is_multiple_of(2);
            });
            assert_eq!((soft.updating, soft.high_impact), recount(&soft));
        }
        assert!(soft.updating > 0, "the walk reached some updating machines");
    }
}
