//! The reconciler's pure core: what the leader knows of one machine, and what to do next.
//!
//! The leader holds, per connected machine, only the agent's description of it (a base image
//! and a delta), the work in flight, and the outcomes that decide retries. `decide` looks at
//! that and at the fleet state's required image and answers with one [`Decision`]; the
//! session in `agents.rs` carries it out. Nothing here does I/O or reads a clock: time comes
//! in as `now_ms`, so retry behaviour is tested directly.

use std::collections::{BTreeMap, HashMap, VecDeque};

use dom_storage::event::Hash;
use dom_storage::fleet::{FleetState, Policy};
use dom_storage::image::{Entry, Filter};
use dom_storage::plan::Delta;

/// The outcome of an update, as the agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    RolledBack,
    Refused,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::RolledBack => "rolled_back",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSummary {
    pub plan_id: u64,
    pub image: String,
    pub outcome: Outcome,
    pub error: String,
    pub duration_ms: u64,
    pub activation_ms: u64,
    pub finished_unix_ms: i64,
    pub steps: u64,
    pub services: Vec<String>,
}

/// Work the leader has asked the agent to do and not yet heard the end of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Idle,
    Fetching {
        plan_id: u64,
        image: String,
        /// Preloading the planned image: nothing is activated afterwards.
        preload: bool,
        objects_done: u64,
        objects_total: u64,
        bytes_done: u64,
        bytes_total: u64,
    },
    /// Fetched; waiting for an update slot, the end of a halt or a pause.
    Ready {
        plan_id: u64,
        image: String,
    },
    Updating {
        plan_id: u64,
        image: String,
        started_unix_ms: i64,
        /// A HighImpact or DoReboot update: counted against its own limit.
        high_impact: bool,
    },
    /// Asked to describe itself relative to `image`; waiting for the new description.
    Rebasing {
        image: String,
    },
}

/// Failed attempts at one image, and when the next may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub failures: u32,
    pub not_before_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub path: String,
    pub first_seen_unix_ms: i64,
    pub corrected: bool,
}

/// What the last fetch brought over the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchSummary {
    pub image: String,
    pub preload: bool,
    pub objects_downloaded: u64,
    pub bytes_downloaded: u64,
    pub objects_total: u64,
    pub bytes_total: u64,
    pub finished_unix_ms: i64,
}

/// Most drift paths kept per machine: enough to investigate, bounded for a machine that is
/// rewritten wholesale behind our back.
pub const MAX_DRIFT: usize = 100;

/// The leader's soft state for one machine.
#[derive(Debug, Clone)]
pub struct MachineView {
    pub connected: bool,
    pub last_seen_unix_ms: i64,
    /// The image the agent describes itself against (None: it holds none yet).
    pub base_image: Option<String>,
    pub delta: Delta,
    pub generation: u64,
    pub root_hash: Hash,
    /// The description is whole (the agent sent its `complete` page).
    pub complete: bool,
    pub swept: bool,
    pub excluded: Filter,
    pub work: Work,
    /// Asked for a fresh description (a rebase, or after an update) that has not begun yet.
    pub awaiting_reset: bool,
    pub last_update: Option<UpdateSummary>,
    pub retries: BTreeMap<String, Retry>,
    pub drift: Vec<Drift>,
    /// The planned image whose objects the agent holds.
    pub preloaded: Option<String>,
    pub last_fetch: Option<FetchSummary>,
    /// Why the machine is not moving, when something holds it (a limit, safety).
    pub hold: Option<String>,
}

impl Default for MachineView {
    fn default() -> Self {
        MachineView {
            connected: false,
            last_seen_unix_ms: 0,
            base_image: None,
            delta: Delta::new(),
            generation: 0,
            root_hash: [0; 32],
            complete: false,
            swept: false,
            excluded: Filter::empty(),
            work: Work::Idle,
            awaiting_reset: false,
            last_update: None,
            retries: BTreeMap::new(),
            drift: Vec::new(),
            preloaded: None,
            last_fetch: None,
            hold: None,
        }
    }
}

/// What the log says about one machine and the fleet, as `decide` needs it.
#[derive(Debug, Clone, Default)]
pub struct Assignment<'a> {
    pub required: Option<&'a str>,
    pub planned: Option<&'a str>,
    pub halted: bool,
    pub paused_until_unix_ms: Option<i64>,
}

/// What the session should do next for a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do: compliant, no required image, or waiting for the agent.
    Nothing,
    /// Wait until then (a retry's back-off), then decide again.
    WaitUntil(i64),
    /// Updates are halted fleet-wide.
    Halted,
    /// Fetch the planned image's objects, activating nothing.
    Preload(String),
    /// Compute the plan to this image and start fetching.
    Plan(String),
    /// The machine matches this image already (up to what it leaves alone): describe it
    /// relative to the image from now on.
    Rebase(String),
}

/// First retry after a refused or failed update.
const RETRY_BASE_MS: i64 = 5_000;
/// First retry after a failed health check: the image itself is suspect, so wait longer.
const HEALTH_RETRY_BASE_MS: i64 = 60_000;
const RETRY_MAX_MS: i64 = 3_600_000;

impl MachineView {
    /// Whether the machine is exactly its base image (outside what it leaves alone).
    pub fn on_base(&self) -> bool {
        self.complete && self.delta.is_empty() && matches!(self.work, Work::Idle)
    }

    pub fn compliant_with(&self, required: &str) -> bool {
        self.on_base() && self.base_image.as_deref() == Some(required)
    }

    /// Records an update's outcome and, for a failure, when the image may be tried again.
    pub fn finished(&mut self, summary: UpdateSummary, now_ms: i64) {
        match summary.outcome {
            Outcome::Applied => {
                self.retries.remove(&summary.image);
            }
            outcome => {
                let retry = self.retries.entry(summary.image.clone()).or_insert(Retry {
                    failures: 0,
                    not_before_ms: 0,
                });
                retry.failures = retry.failures.saturating_add(1);
                let base = if outcome == Outcome::RolledBack {
                    HEALTH_RETRY_BASE_MS
                } else {
                    RETRY_BASE_MS
                };
                let delay = base
                    .saturating_mul(1i64 << (retry.failures - 1).min(20))
                    .min(RETRY_MAX_MS);
                retry.not_before_ms = now_ms + delay;
            }
        }
        self.work = Work::Idle;
        self.last_update = Some(summary);
    }

    /// Notes paths that changed while the machine was compliant and no update was running:
    /// nothing the system did explains them.
    pub fn note_drift(&mut self, paths: impl IntoIterator<Item = String>, now_ms: i64) {
        for path in paths {
            if let Some(d) = self.drift.iter_mut().find(|d| d.path == path) {
                if d.corrected {
                    d.corrected = false;
                    d.first_seen_unix_ms = now_ms;
                }
                continue;
            }
            if self.drift.len() >= MAX_DRIFT {
                self.drift.remove(0);
            }
            self.drift.push(Drift {
                path,
                first_seen_unix_ms: now_ms,
                corrected: false,
            });
        }
    }

    /// Marks drift as corrected once the machine is back on its base.
    pub fn drift_corrected(&mut self) {
        for d in &mut self.drift {
            d.corrected = true;
        }
    }

    /// The `state` operators see.
    pub fn state(&self, required: Option<&str>, now_ms: i64) -> &'static str {
        if !self.connected {
            return if self.last_seen_unix_ms == 0 {
                "unknown"
            } else {
                "unreachable"
            };
        }
        match &self.work {
            Work::Fetching { preload: false, .. } => return "fetching",
            Work::Updating { .. } => return "updating",
            // Re-describing itself after an update: not confirmed yet.
            Work::Rebasing { .. } if !self.complete => return "updating",
            Work::Idle | Work::Rebasing { .. } | Work::Ready { .. } | Work::Fetching { .. } => {}
        }
        if !self.complete {
            return "unknown";
        }
        let Some(required) = required else {
            return if self.delta.is_empty() {
                "compliant"
            } else {
                "deviant"
            };
        };
        if self.compliant_with(required) {
            return "compliant";
        }
        if let Some(retry) = self.retries.get(required) {
            if retry.not_before_ms > now_ms {
                return "failed";
            }
        }
        "deviant"
    }
}

/// Everything a machine's decisions read from the log: its own record, its images, the fleet's
/// size and policy. A commit that leaves these as they were cannot change what its session
/// would do, so the session sleeps through it, and a compliant machine costs the leader
/// nothing when other machines' events commit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogInputs {
    machine_changed_at: u64,
    /// (added at, deleted at) of the required and the planned image, if they exist.
    images: [Option<(u64, Option<u64>)>; 2],
    fleet_size: usize,
    policy: Policy,
}

impl LogInputs {
    /// None when the machine is not in the fleet.
    pub fn read(state: &FleetState, hostname: &str) -> Option<LogInputs> {
        let machine = state.machine(hostname)?;
        let image = |name: &Option<String>| {
            name.as_deref()
                .and_then(|n| state.image(n))
                .map(|i| (i.added_at, i.deleted_at))
        };
        Some(LogInputs {
            machine_changed_at: machine.changed_at,
            images: [
                image(&machine.required_image),
                image(&machine.planned_image),
            ],
            fleet_size: state.machine_count(),
            policy: state.policy().clone(),
        })
    }
}

/// The next step for one machine, given what the log says of it.
pub fn decide(view: &MachineView, log: &Assignment<'_>, now_ms: i64) -> Decision {
    if !view.connected || !view.complete {
        return Decision::Nothing;
    }
    let Some(required) = log.required else {
        return Decision::Nothing;
    };
    if view.compliant_with(required) {
        return match log.planned {
            Some(planned) if planned != required && view.preloaded.as_deref() != Some(planned) => {
                Decision::Preload(planned.to_owned())
            }
            _ => Decision::Nothing,
        };
    }
    if !matches!(view.work, Work::Idle | Work::Fetching { preload: true, .. }) {
        return Decision::Nothing;
    }
    if let Some(retry) = view.retries.get(required) {
        if retry.not_before_ms > now_ms {
            return Decision::WaitUntil(retry.not_before_ms);
        }
    }
    if let Some(until) = log.paused_until_unix_ms.filter(|u| *u > now_ms) {
        return Decision::WaitUntil(until);
    }
    if log.halted {
        return Decision::Halted;
    }
    Decision::Plan(required.to_owned())
}

/// Applies one page of an agent's description to the view, returning the paths that began
/// to differ from the base in this page.
pub fn apply_page(
    view: &mut MachineView,
    reset: bool,
    differs: Vec<Entry>,
    missing: Vec<String>,
    matches: Vec<String>,
) -> Vec<String> {
    if reset {
        view.delta = Delta::new();
    }
    let mut began = Vec::new();
    for path in matches {
        view.delta.matches(&path);
    }
    for entry in differs {
        if view.delta.get(&entry.path).is_none() {
            began.push(entry.path.clone());
        }
        view.delta.differs(entry);
    }
    for path in missing {
        if view.delta.get(&path).is_none() {
            began.push(path.clone());
        }
        view.delta.missing(&path);
    }
    began
}

/// How far back the automatic brake looks.
pub const BRAKE_WINDOW_MS: i64 = 10 * 60 * 1000;

/// Recent update outcomes toward one image, for the automatic brake: each machine's latest
/// within the window. The counts are kept as outcomes come and expire, so a fleet-wide
/// rollout costs O(1) per outcome, not a walk over every machine that updated before.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Per machine: when, and whether its health check failed.
    latest: HashMap<String, (i64, bool)>,
    /// Every outcome in arrival order, to expire them; superseded ones are skipped.
    order: VecDeque<(i64, String)>,
    failures: usize,
}

impl Outcomes {
    /// Notes `hostname`'s outcome at `now`; returns (failures, machines) in the window.
    pub fn record(&mut self, hostname: &str, failed: bool, now: i64) -> (usize, usize) {
        while let Some((t, _)) = self.order.front() {
            if now - t <= BRAKE_WINDOW_MS {
                break;
            }
            if let Some((t, h)) = self.order.pop_front() {
                if self.latest.get(&h).is_some_and(|(latest, _)| *latest == t) {
                    if let Some((_, true)) = self.latest.remove(&h) {
                        self.failures -= 1;
                    }
                }
            }
        }
        if let Some((_, true)) = self.latest.insert(hostname.to_owned(), (now, failed)) {
            self.failures -= 1;
        }
        self.failures += usize::from(failed);
        self.order.push_back((now, hostname.to_owned()));
        (self.failures, self.latest.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compliant_on(image: &str) -> MachineView {
        MachineView {
            connected: true,
            last_seen_unix_ms: 1,
            base_image: Some(image.into()),
            complete: true,
            ..MachineView::default()
        }
    }

    fn on(required: &str) -> Assignment<'_> {
        Assignment {
            required: Some(required),
            ..Assignment::default()
        }
    }

    fn summary(image: &str, outcome: Outcome) -> UpdateSummary {
        UpdateSummary {
            plan_id: 1,
            image: image.into(),
            outcome,
            error: String::new(),
            duration_ms: 1,
            activation_ms: 1,
            finished_unix_ms: 0,
            steps: 1,
            services: vec![],
        }
    }

    #[test]
    fn only_commits_that_concern_a_machine_change_its_log_inputs() {
        use dom_storage::event::{Change, Event};
        let mut state = FleetState::default();
        let mut index = 0;
        let mut apply = |state: &mut FleetState, change: Change| {
            index += 1;
            let event = Event {
                actor: "alice".into(),
                time_unix_ms: 1_000,
                reason: "test".into(),
                change,
            };
            state.apply(index, &event).expect("applies");
        };
        for name in ["a", "b"] {
            apply(
                &mut state,
                Change::ImageAdded {
                    name: name.into(),
                    root_hash: [1; 32],
                    files: 1,
                    bytes: 1,
                    manifest_hash: Some([2; 32]),
                    filter: vec![],
                    triggers: vec![],
                },
            );
        }
        for host in ["m1", "m2"] {
            apply(
                &mut state,
                Change::MachineAdded {
                    hostname: host.into(),
                    tags: BTreeMap::new(),
                    required_image: Some("a".into()),
                    planned_image: None,
                },
            );
        }
        let read = |state: &FleetState| LogInputs::read(state, "m1").expect("m1 is in the fleet");
        let mut seen = read(&state);

        // Another machine's events leave m1's inputs as they were.
        apply(
            &mut state,
            Change::MachineUpdated {
                hostname: "m2".into(),
                tags: BTreeMap::from([("rack".into(), "7".into())]),
            },
        );
        apply(
            &mut state,
            Change::RequiredImageSet {
                hostnames: vec!["m2".into()],
                image: Some("b".into()),
            },
        );
        assert_eq!(read(&state), seen);

        // Its own assignment, a halt, a new machine in the fleet (percentage limits) do not.
        let changes = [
            Change::PlannedImageSet {
                hostnames: vec!["m1".into()],
                image: Some("b".into()),
            },
            Change::UpdatesHalted,
            Change::MachineAdded {
                hostname: "m3".into(),
                tags: BTreeMap::new(),
                required_image: None,
                planned_image: None,
            },
        ];
        for change in changes {
            apply(&mut state, change.clone());
            let now = read(&state);
            assert_ne!(now, seen, "{change:?} concerns m1");
            seen = now;
        }
        assert_eq!(LogInputs::read(&state, "gone"), None);
    }

    #[test]
    fn a_compliant_machine_needs_nothing() {
        let view = compliant_on("a");
        assert_eq!(decide(&view, &on("a"), 0), Decision::Nothing);
        assert_eq!(view.state(Some("a"), 0), "compliant");
    }

    #[test]
    fn a_new_required_image_is_planned_unless_halted() {
        let view = compliant_on("a");
        assert_eq!(decide(&view, &on("b"), 0), Decision::Plan("b".into()));
        assert_eq!(
            decide(
                &view,
                &Assignment {
                    halted: true,
                    ..on("b")
                },
                0
            ),
            Decision::Halted
        );
        assert_eq!(view.state(Some("b"), 0), "deviant");
    }

    #[test]
    fn nothing_is_decided_before_the_description_is_whole_or_while_work_runs() {
        let mut view = compliant_on("a");
        view.complete = false;
        assert_eq!(decide(&view, &on("b"), 0), Decision::Nothing);
        let mut view = compliant_on("a");
        view.work = Work::Updating {
            plan_id: 1,
            image: "b".into(),
            started_unix_ms: 0,
            high_impact: false,
        };
        assert_eq!(decide(&view, &on("b"), 0), Decision::Nothing);
        assert_eq!(view.state(Some("b"), 0), "updating");
    }

    #[test]
    fn a_failed_health_check_is_not_retried_in_a_loop() {
        let mut view = compliant_on("a");
        view.finished(summary("b", Outcome::RolledBack), 1_000);
        assert_eq!(view.state(Some("b"), 1_000), "failed");
        let first = match decide(&view, &on("b"), 1_000) {
            Decision::WaitUntil(t) => t,
            other => panic!("{other:?}"),
        };
        assert!(first - 1_000 >= HEALTH_RETRY_BASE_MS);
        view.finished(summary("b", Outcome::RolledBack), first);
        let second = match decide(&view, &on("b"), first) {
            Decision::WaitUntil(t) => t,
            other => panic!("{other:?}"),
        };
        assert!(
            second - first >= 2 * HEALTH_RETRY_BASE_MS,
            "back-off doubles"
        );
        // Another image is not held back by b's failures.
        assert_eq!(decide(&view, &on("c"), first), Decision::Plan("c".into()));
        // Once the back-off ends, b is tried again.
        assert_eq!(decide(&view, &on("b"), second), Decision::Plan("b".into()));
    }

    #[test]
    fn a_paused_machine_waits_until_its_pause_ends() {
        let view = compliant_on("a");
        let paused = Assignment {
            paused_until_unix_ms: Some(5_000),
            ..on("b")
        };
        assert_eq!(decide(&view, &paused, 1_000), Decision::WaitUntil(5_000));
        assert_eq!(decide(&view, &paused, 5_000), Decision::Plan("b".into()));
    }

    #[test]
    fn the_planned_image_is_preloaded_once_the_machine_is_compliant() {
        let mut view = compliant_on("a");
        let log = Assignment {
            planned: Some("b"),
            ..on("a")
        };
        assert_eq!(decide(&view, &log, 0), Decision::Preload("b".into()));
        // Halts hold updates, not preloads.
        let halted = Assignment {
            halted: true,
            ..log.clone()
        };
        assert_eq!(decide(&view, &halted, 0), Decision::Preload("b".into()));
        view.preloaded = Some("b".into());
        assert_eq!(decide(&view, &log, 0), Decision::Nothing);
        // A deviant machine is corrected first.
        let mut deviant = compliant_on("a");
        deviant.delta.missing("/x");
        assert_eq!(decide(&deviant, &log, 0), Decision::Plan("a".into()));
    }

    #[test]
    fn success_clears_the_back_off() {
        let mut view = compliant_on("a");
        view.finished(summary("b", Outcome::Failed), 0);
        view.finished(summary("b", Outcome::Applied), 10);
        assert!(view.retries.is_empty());
    }

    #[test]
    fn back_off_is_capped() {
        let mut view = compliant_on("a");
        for _ in 0..40 {
            view.finished(summary("b", Outcome::RolledBack), 0);
        }
        assert_eq!(view.retries["b"].not_before_ms, RETRY_MAX_MS);
    }

    #[test]
    fn pages_build_the_delta_and_name_new_deviations() {
        let mut view = compliant_on("a");
        let file = Entry::file("/etc/x", 0o644, 0, 0, 1, [1; 32]);
        let began = apply_page(
            &mut view,
            false,
            vec![file.clone()],
            vec!["/etc/y".into()],
            vec![],
        );
        assert_eq!(began, ["/etc/x", "/etc/y"]);
        assert_eq!(view.delta.len(), 2);
        // A further change to an already deviant path is not new.
        assert!(apply_page(&mut view, false, vec![file], vec![], vec![]).is_empty());
        apply_page(&mut view, false, vec![], vec![], vec!["/etc/x".into()]);
        assert_eq!(view.delta.len(), 1);
        apply_page(&mut view, true, vec![], vec![], vec![]);
        assert!(view.delta.is_empty());
    }

    #[test]
    fn drift_is_bounded_and_remembers_corrections() {
        let mut view = compliant_on("a");
        view.note_drift((0..150).map(|i| format!("/x{i}")), 5);
        assert_eq!(view.drift.len(), MAX_DRIFT);
        assert_eq!(view.drift[0].path, "/x50");
        view.drift_corrected();
        view.note_drift(["/x60".to_string()], 9);
        let d = view.drift.iter().find(|d| d.path == "/x60").unwrap();
        assert_eq!((d.corrected, d.first_seen_unix_ms), (false, 9));
    }

    #[test]
    fn unseen_and_lost_machines() {
        let mut view = MachineView::default();
        assert_eq!(view.state(Some("a"), 0), "unknown");
        view.last_seen_unix_ms = 5;
        assert_eq!(view.state(Some("a"), 0), "unreachable");
    }

    /// The counts equal a recount of each machine's latest outcome within the window.
    #[test]
    fn outcomes_count_each_machine_latest_in_window() {
        let mut outcomes = Outcomes::default();
        let mut all: Vec<(i64, String, bool)> = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut now = 0i64;
        for _ in 0..3_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += (x % 20_000) as i64;
            let host = format!("m{}", (x >> 8) % 50);
            let failed = (x >> 20).is_multiple_of(3);
            let got = outcomes.record(&host, failed, now);
            all.retain(|(t, h, _)| now - t <= BRAKE_WINDOW_MS && *h != host);
            all.push((now, host, failed));
            let want = (all.iter().filter(|(_, _, f)| *f).count(), all.len());
            assert_eq!(got, want);
        }
    }
}
