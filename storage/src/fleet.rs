//! The fleet state: a pure, deterministic fold over the event log.
//!
//! `FleetState::apply` is the only way the state changes. It takes the journal index the event
//! will get and the event, and either changes the state and says which records it touched (so
//! the state machine can persist exactly those, in the same batch as the applied index), or
//! refuses the event and changes nothing. The leader runs the same checks (`check`) before it
//! proposes, so a refusal at apply time only happens when two proposals race; every replica
//! then refuses it identically. No clock, randomness or I/O is touched here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::event::{Change, Event, Hash};
use crate::image::{Filter, Trigger};
use crate::names::{self, NameError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub tags: BTreeMap<String, String>,
    pub required_image: Option<String>,
    pub planned_image: Option<String>,
    /// Journal index of the event that added the machine.
    pub added_at: u64,
    /// Journal index of the last event that changed it.
    pub changed_at: u64,
    /// Updates are held until then (the pausing event's time plus its duration).
    pub paused_until_unix_ms: Option<i64>,
    pub pause_reason: String,
    /// An update to this image may delete most of the machine's files.
    pub safety_cleared_image: Option<String>,
}

impl Machine {
    /// Sets the required (or planned) image, as journal record `index`.
    fn set_image(&mut self, required: bool, image: &Option<String>, index: u64) {
        let slot = if required {
            &mut self.required_image
        } else {
            &mut self.planned_image
        };
        slot.clone_from(image);
        self.changed_at = index;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub root_hash: Hash,
    pub files: u64,
    pub bytes: u64,
    /// The manifest object (absent only for images from before manifests existed).
    pub manifest_hash: Option<Hash>,
    pub filter: Vec<String>,
    pub triggers: Vec<Trigger>,
    pub created_at_unix_ms: i64,
    pub added_at: u64,
    /// Set once the image is deleted; the name stays taken for ever.
    pub deleted_at: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    pub actor: String,
    pub reason: String,
    pub since_unix_ms: i64,
    pub journal_index: u64,
}

/// How many machines may update at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Limit {
    Machines(u64),
    Percent(u32),
}

impl Limit {
    /// The limit for a fleet of `machines`; a percentage allows at least one machine.
    pub fn of(self, machines: usize) -> usize {
        match self {
            Limit::Machines(n) => n as usize,
            Limit::Percent(p) => (machines * p as usize / 100).max(1),
        }
    }
}

/// The brake's default share of failed health checks, in percent.
pub const DEFAULT_BRAKE_FAILURE_PERCENT: u32 = 10;

/// Fleet-wide settings that are not per machine or per image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub halt: Option<Halt>,
    pub max_updating: Option<Limit>,
    pub max_high_impact: Option<u64>,
    pub fetch_bytes_per_sec: Option<u64>,
    /// None: the default.
    pub brake_failure_percent: Option<u32>,
}

impl Policy {
    pub fn brake_failure_percent(&self) -> u32 {
        self.brake_failure_percent
            .unwrap_or(DEFAULT_BRAKE_FAILURE_PERCENT)
    }
}

/// Which persisted record an applied event changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Touched {
    Machine(String),
    Image(String),
    Policy,
}

/// What one applied change touched, borrowed from the event until someone asks for it.
enum Touch<'e> {
    Machine(&'e str),
    Machines(&'e [String]),
    Image(&'e str),
    Policy,
    Nothing,
}

impl Touch<'_> {
    fn to_vec(&self) -> Vec<Touched> {
        match *self {
            Touch::Machine(host) => vec![Touched::Machine(host.to_owned())],
            Touch::Machines(hosts) => hosts.iter().cloned().map(Touched::Machine).collect(),
            Touch::Image(name) => vec![Touched::Image(name.to_owned())],
            Touch::Policy => vec![Touched::Policy],
            Touch::Nothing => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0:?} is not in canonical form (expected {1:?})")]
    NotCanonical(String, String),
    #[error("unknown machine {0:?}")]
    UnknownMachine(String),
    #[error("machine {0:?} already exists")]
    MachineExists(String),
    #[error("unknown image {0:?}")]
    UnknownImage(String),
    #[error("image {0:?} was deleted")]
    ImageDeleted(String),
    #[error("image {0:?} already exists")]
    ImageExists(String),
    #[error("image name {0:?} belonged to a deleted image and is never reused")]
    ImageNameRetired(String),
    #[error("image {image:?} is still {role} by {count} machine(s), e.g. {example:?}")]
    ImageInUse {
        image: String,
        role: &'static str,
        count: usize,
        example: String,
    },
    #[error("no machines named")]
    NoMachines,
    #[error("machine {0:?} is named twice")]
    DuplicateMachine(String),
    #[error("updates are not halted")]
    NotHalted,
    #[error("invalid image: {0}")]
    BadImage(String),
    #[error("a batch may hold only machine changes, not {0}")]
    BadBatch(&'static str),
    #[error("invalid policy: {0}")]
    BadPolicy(String),
}

impl Rejection {
    /// Whether the refusal is because something named does not exist (as opposed to bad input
    /// or a conflict), so the edge can answer NOT_FOUND.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Rejection::UnknownMachine(_) | Rejection::UnknownImage(_)
        )
    }

    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Rejection::MachineExists(_)
                | Rejection::ImageExists(_)
                | Rejection::ImageNameRetired(_)
                | Rejection::ImageInUse { .. }
                | Rejection::ImageDeleted(_)
                | Rejection::NotHalted
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetState {
    machines: BTreeMap<String, Machine>,
    images: BTreeMap<String, Image>,
    policy: Policy,
}

fn canonical_host(name: &str) -> Result<(), Rejection> {
    let canonical = names::canonical_hostname_cow(name)?;
    if canonical != name {
        return Err(Rejection::NotCanonical(
            name.to_owned(),
            canonical.into_owned(),
        ));
    }
    Ok(())
}

fn canonical_image(name: &str) -> Result<(), Rejection> {
    let canonical = names::canonical_image_name_ref(name)?;
    if canonical != name {
        return Err(Rejection::NotCanonical(
            name.to_owned(),
            canonical.to_owned(),
        ));
    }
    Ok(())
}

/// Lists longer than this are checked for a name given twice through a set; shorter ones (a
/// single machine, nearly always) by comparing with the names before, which allocates nothing.
const DUPLICATES_BY_SET: usize = 16;

impl Change {
    /// Whether this kind of change may stand inside a batch.
    pub fn batchable(&self) -> bool {
        matches!(
            self,
            Change::MachineAdded { .. }
                | Change::MachineUpdated { .. }
                | Change::MachineRemoved { .. }
                | Change::RequiredImageSet { .. }
                | Change::PlannedImageSet { .. }
        )
    }

    /// Rewrites the names in a change to their canonical form; used at the edge, before
    /// validation, so operators may type `Web-01` or `/web/1`.
    pub fn canonicalize(&mut self) -> Result<(), NameError> {
        let host = |h: &mut String| -> Result<(), NameError> {
            *h = names::canonical_hostname(h)?;
            Ok(())
        };
        let image = |i: &mut String| -> Result<(), NameError> {
            *i = names::canonical_image_name(i)?;
            Ok(())
        };
        match self {
            Change::ImageAdded { name, .. } | Change::ImageDeleted { name } => image(name)?,
            Change::MachineAdded {
                hostname,
                required_image,
                planned_image,
                ..
            } => {
                host(hostname)?;
                required_image.iter_mut().try_for_each(image)?;
                planned_image.iter_mut().try_for_each(image)?;
            }
            Change::MachineUpdated { hostname, .. } | Change::MachineRemoved { hostname } => {
                host(hostname)?
            }
            Change::RequiredImageSet {
                hostnames,
                image: i,
            }
            | Change::PlannedImageSet {
                hostnames,
                image: i,
            } => {
                hostnames.iter_mut().try_for_each(host)?;
                i.iter_mut().try_for_each(image)?;
            }
            Change::UpdatesHalted | Change::UpdatesResumed | Change::PolicySet(_) => {}
            Change::Batch(changes) => changes.iter_mut().try_for_each(Change::canonicalize)?,
            Change::MachinePaused { hostname, .. } => host(hostname)?,
            Change::SafetyCleared { hostname, image: i } => {
                host(hostname)?;
                image(i)?;
            }
        }
        Ok(())
    }
}

fn live_image(images: &BTreeMap<String, Image>, name: &str) -> Result<(), Rejection> {
    canonical_image(name)?;
    match images.get(name) {
        None => Err(Rejection::UnknownImage(name.to_owned())),
        Some(image) if image.deleted_at.is_some() => Err(Rejection::ImageDeleted(name.to_owned())),
        Some(_) => Ok(()),
    }
}

impl FleetState {
    /// Rebuilds a state from its persisted records (no replay).
    pub fn from_records(
        machines: impl IntoIterator<Item = Machine>,
        images: impl IntoIterator<Item = Image>,
        policy: Policy,
    ) -> FleetState {
        FleetState {
            machines: machines
                .into_iter()
                .map(|m| (m.hostname.clone(), m))
                .collect(),
            images: images.into_iter().map(|i| (i.name.clone(), i)).collect(),
            policy,
        }
    }

    pub fn machines(&self) -> impl Iterator<Item = &Machine> {
        self.machines.values()
    }

    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    pub fn machine(&self, hostname: &str) -> Option<&Machine> {
        self.machines.get(hostname)
    }

    /// Every image ever added, deleted ones included.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.images.values()
    }

    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.get(name)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn live_image(&self, name: &str) -> Result<(), Rejection> {
        live_image(&self.images, name)
    }

    fn known_machine(&self, hostname: &str) -> Result<(), Rejection> {
        canonical_host(hostname)?;
        if self.machines.contains_key(hostname) {
            Ok(())
        } else {
            Err(Rejection::UnknownMachine(hostname.to_owned()))
        }
    }

    fn known_machines(&self, hostnames: &[String]) -> Result<(), Rejection> {
        if hostnames.is_empty() {
            return Err(Rejection::NoMachines);
        }
        let mut seen = BTreeSet::new();
        for (i, hostname) in hostnames.iter().enumerate() {
            self.known_machine(hostname)?;
            let twice = if hostnames.len() > DUPLICATES_BY_SET {
                !seen.insert(hostname)
            } else {
                hostnames[..i].contains(hostname)
            };
            if twice {
                return Err(Rejection::DuplicateMachine(hostname.clone()));
            }
        }
        Ok(())
    }

    fn image_unused(&self, name: &str) -> Result<(), Rejection> {
        let in_use = |role: &'static str, slot: fn(&Machine) -> &Option<String>| {
            let mut users = self
                .machines
                .values()
                .filter(|m| slot(m).as_deref() == Some(name));
            match users.next() {
                None => Ok(()),
                Some(first) => Err(Rejection::ImageInUse {
                    image: name.to_owned(),
                    role,
                    count: 1 + users.count(),
                    example: first.hostname.clone(),
                }),
            }
        };
        in_use("required", |m| &m.required_image)?;
        in_use("planned", |m| &m.planned_image)
    }

    /// Whether `change` would apply to the current state; changes nothing.
    pub fn check(&self, change: &Change) -> Result<(), Rejection> {
        match change {
            Change::ImageAdded {
                name,
                filter,
                triggers,
                ..
            } => {
                canonical_image(name)?;
                Filter::new(filter.clone()).map_err(|e| Rejection::BadImage(e.to_string()))?;
                if let Some(t) = triggers.iter().find(|t| t.service.trim().is_empty()) {
                    return Err(Rejection::BadImage(format!(
                        "a trigger for {:?} names no service",
                        t.match_lines
                    )));
                }
                match self.images.get(name) {
                    Some(image) if image.deleted_at.is_some() => {
                        Err(Rejection::ImageNameRetired(name.clone()))
                    }
                    Some(_) => Err(Rejection::ImageExists(name.clone())),
                    None => Ok(()),
                }
            }
            Change::ImageDeleted { name } => {
                self.live_image(name)?;
                self.image_unused(name)
            }
            Change::MachineAdded {
                hostname,
                tags,
                required_image,
                planned_image,
            } => {
                canonical_host(hostname)?;
                if self.machines.contains_key(hostname) {
                    return Err(Rejection::MachineExists(hostname.clone()));
                }
                for (key, value) in tags {
                    names::check_tag(key, value)?;
                }
                required_image
                    .iter()
                    .chain(planned_image)
                    .try_for_each(|i| self.live_image(i))
            }
            Change::MachineUpdated { hostname, tags } => {
                self.known_machine(hostname)?;
                for (key, value) in tags {
                    names::check_tag(key, value)?;
                }
                Ok(())
            }
            Change::MachineRemoved { hostname } => self.known_machine(hostname),
            Change::RequiredImageSet { hostnames, image }
            | Change::PlannedImageSet { hostnames, image } => {
                self.known_machines(hostnames)?;
                image.iter().try_for_each(|i| self.live_image(i))
            }
            Change::UpdatesHalted => Ok(()),
            Change::UpdatesResumed => self
                .policy
                .halt
                .as_ref()
                .map(|_| ())
                .ok_or(Rejection::NotHalted),
            Change::PolicySet(p) => {
                for (name, value) in [
                    ("max_updating_percent", p.max_updating_percent),
                    ("brake_failure_percent", p.brake_failure_percent),
                ] {
                    if value.is_some_and(|v| v > 100) {
                        return Err(Rejection::BadPolicy(format!(
                            "{name} is a percentage, at most 100"
                        )));
                    }
                }
                if p.max_updating.is_some() && p.max_updating_percent.is_some() {
                    return Err(Rejection::BadPolicy(
                        "max_updating is a number of machines or a percentage, not both".into(),
                    ));
                }
                Ok(())
            }
            Change::MachinePaused { hostname, .. } => self.known_machine(hostname),
            Change::SafetyCleared { hostname, image } => {
                self.known_machine(hostname)?;
                self.live_image(image)
            }
            Change::Batch(changes) => {
                if let Some(c) = changes.iter().find(|c| !c.batchable()) {
                    return Err(Rejection::BadBatch(c.kind()));
                }
                // Each change is checked against the state the earlier ones leave.
                let mut scratch = self.clone();
                changes.iter().try_for_each(|change| {
                    let event = Event {
                        actor: String::new(),
                        time_unix_ms: 0,
                        reason: String::new(),
                        change: change.clone(),
                    };
                    scratch.apply_untracked(0, &event)
                })
            }
        }
    }

    /// Applies `event` as journal record `index`: either changes the state and returns the
    /// records it touched, or refuses and changes nothing.
    pub fn apply(&mut self, index: u64, event: &Event) -> Result<Vec<Touched>, Rejection> {
        match &event.change {
            Change::Batch(changes) => self.apply_batch(index, event, changes),
            _ => Ok(self.apply_one(index, event)?.to_vec()),
        }
    }

    /// As [`FleetState::apply`], for a fold that persists nothing (a replay): the same checks
    /// and the same state, without naming the records touched, which cost a vector and a copy
    /// of each name per event.
    pub fn apply_untracked(&mut self, index: u64, event: &Event) -> Result<(), Rejection> {
        match &event.change {
            Change::Batch(changes) => self.apply_batch(index, event, changes).map(drop),
            _ => self.apply_one(index, event).map(drop),
        }
    }

    fn apply_batch(
        &mut self,
        index: u64,
        event: &Event,
        changes: &[Change],
    ) -> Result<Vec<Touched>, Rejection> {
        if let Some(c) = changes.iter().find(|c| !c.batchable()) {
            return Err(Rejection::BadBatch(c.kind()));
        }
        let mut next = self.clone();
        let mut touched = Vec::new();
        for change in changes {
            let inner = Event {
                change: change.clone(),
                ..event.clone()
            };
            touched.extend(next.apply_one(index, &inner)?.to_vec());
        }
        *self = next;
        touched.sort();
        touched.dedup();
        Ok(touched)
    }

    /// One machine's required or planned image set, the commonest event by far: `check`'s
    /// checks in `check`'s order, but the machine is looked up once for the check and the
    /// change, where `check` then the change would search the machines twice.
    fn set_one_image(
        &mut self,
        index: u64,
        hostname: &str,
        image: &Option<String>,
        required: bool,
    ) -> Result<(), Rejection> {
        canonical_host(hostname)?;
        let Some(machine) = self.machines.get_mut(hostname) else {
            return Err(Rejection::UnknownMachine(hostname.to_owned()));
        };
        if let Some(name) = image {
            live_image(&self.images, name)?;
        }
        machine.set_image(required, image, index);
        Ok(())
    }

    /// Applies one change that is not a batch.
    fn apply_one<'e>(&mut self, index: u64, event: &'e Event) -> Result<Touch<'e>, Rejection> {
        if let Change::RequiredImageSet { hostnames, image }
        | Change::PlannedImageSet { hostnames, image } = &event.change
        {
            if let [hostname] = hostnames.as_slice() {
                let required = matches!(event.change, Change::RequiredImageSet { .. });
                self.set_one_image(index, hostname, image, required)?;
                return Ok(Touch::Machines(hostnames));
            }
        }
        self.check(&event.change)?;
        let touched = match &event.change {
            Change::ImageAdded {
                name,
                root_hash,
                files,
                bytes,
                manifest_hash,
                filter,
                triggers,
            } => {
                self.images.insert(
                    name.clone(),
                    Image {
                        name: name.clone(),
                        root_hash: *root_hash,
                        files: *files,
                        bytes: *bytes,
                        manifest_hash: *manifest_hash,
                        filter: filter.clone(),
                        triggers: triggers.clone(),
                        created_at_unix_ms: event.time_unix_ms,
                        added_at: index,
                        deleted_at: None,
                    },
                );
                Touch::Image(name)
            }
            Change::ImageDeleted { name } => {
                if let Some(image) = self.images.get_mut(name) {
                    image.deleted_at = Some(index);
                }
                Touch::Image(name)
            }
            Change::MachineAdded {
                hostname,
                tags,
                required_image,
                planned_image,
            } => {
                self.machines.insert(
                    hostname.clone(),
                    Machine {
                        hostname: hostname.clone(),
                        tags: tags.clone(),
                        required_image: required_image.clone(),
                        planned_image: planned_image.clone(),
                        added_at: index,
                        changed_at: index,
                        paused_until_unix_ms: None,
                        pause_reason: String::new(),
                        safety_cleared_image: None,
                    },
                );
                Touch::Machine(hostname)
            }
            Change::MachineUpdated { hostname, tags } => {
                if let Some(machine) = self.machines.get_mut(hostname) {
                    machine.tags = tags.clone();
                    machine.changed_at = index;
                }
                Touch::Machine(hostname)
            }
            Change::MachineRemoved { hostname } => {
                self.machines.remove(hostname);
                Touch::Machine(hostname)
            }
            Change::RequiredImageSet { hostnames, image }
            | Change::PlannedImageSet { hostnames, image } => {
                let required = matches!(event.change, Change::RequiredImageSet { .. });
                for hostname in hostnames {
                    if let Some(machine) = self.machines.get_mut(hostname) {
                        machine.set_image(required, image, index);
                    }
                }
                Touch::Machines(hostnames)
            }
            Change::UpdatesHalted => {
                self.policy.halt = Some(Halt {
                    actor: event.actor.clone(),
                    reason: event.reason.clone(),
                    since_unix_ms: event.time_unix_ms,
                    journal_index: index,
                });
                Touch::Policy
            }
            Change::UpdatesResumed => {
                self.policy.halt = None;
                Touch::Policy
            }
            Change::PolicySet(p) => {
                let policy = &mut self.policy;
                if let Some(n) = p.max_updating {
                    policy.max_updating = (n > 0).then_some(Limit::Machines(n));
                }
                if let Some(pc) = p.max_updating_percent {
                    policy.max_updating = (pc > 0).then_some(Limit::Percent(pc));
                }
                if let Some(n) = p.max_high_impact {
                    policy.max_high_impact = (n > 0).then_some(n);
                }
                if let Some(n) = p.fetch_bytes_per_sec {
                    policy.fetch_bytes_per_sec = (n > 0).then_some(n);
                }
                if let Some(pc) = p.brake_failure_percent {
                    policy.brake_failure_percent = Some(pc);
                }
                Touch::Policy
            }
            Change::MachinePaused {
                hostname,
                duration_ms,
            } => {
                if let Some(machine) = self.machines.get_mut(hostname) {
                    if *duration_ms == 0 {
                        machine.paused_until_unix_ms = None;
                        machine.pause_reason.clear();
                    } else {
                        machine.paused_until_unix_ms = Some(
                            event
                                .time_unix_ms
                                .saturating_add(i64::try_from(*duration_ms).unwrap_or(i64::MAX)),
                        );
                        machine.pause_reason.clone_from(&event.reason);
                    }
                    machine.changed_at = index;
                }
                Touch::Machine(hostname)
            }
            Change::SafetyCleared { hostname, image } => {
                if let Some(machine) = self.machines.get_mut(hostname) {
                    machine.safety_cleared_image = Some(image.clone());
                    machine.changed_at = index;
                }
                Touch::Machine(hostname)
            }
            // Applied by apply_batch, change by change.
            Change::Batch(_) => Touch::Nothing,
        };
        Ok(touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(change: Change) -> Event {
        Event {
            actor: "alice".into(),
            time_unix_ms: 1_000,
            reason: "test".into(),
            change,
        }
    }

    fn add_image(name: &str) -> Change {
        Change::ImageAdded {
            name: name.into(),
            root_hash: [1; 32],
            files: 3,
            bytes: 30,
            manifest_hash: Some([2; 32]),
            filter: vec![],
            triggers: vec![],
        }
    }

    fn add_machine(host: &str, required: Option<&str>) -> Change {
        Change::MachineAdded {
            hostname: host.into(),
            tags: BTreeMap::new(),
            required_image: required.map(Into::into),
            planned_image: None,
        }
    }

    /// Applies each change in turn, failing the test on the first refusal.
    fn fold(changes: impl IntoIterator<Item = Change>) -> FleetState {
        let mut state = FleetState::default();
        for (i, change) in changes.into_iter().enumerate() {
            state
                .apply(i as u64 + 1, &event(change))
                .expect("setup event refused");
        }
        state
    }

    #[track_caller]
    fn refused(state: &FleetState, change: Change, expected: Rejection) {
        let mut after = state.clone();
        assert_eq!(after.apply(99, &event(change)), Err(expected));
        assert_eq!(&after, state, "a refused event changed the state");
    }

    #[test]
    fn assignments_follow_the_log() {
        let state = fold([
            add_image("web/1"),
            add_image("web/2"),
            add_machine("web-01", Some("web/1")),
            add_machine("web-02", None),
            Change::RequiredImageSet {
                hostnames: vec!["web-01".into(), "web-02".into()],
                image: Some("web/2".into()),
            },
            Change::PlannedImageSet {
                hostnames: vec!["web-02".into()],
                image: Some("web/1".into()),
            },
        ]);
        let web01 = state.machine("web-01").unwrap();
        assert_eq!(web01.required_image.as_deref(), Some("web/2"));
        assert_eq!((web01.added_at, web01.changed_at), (3, 5));
        let web02 = state.machine("web-02").unwrap();
        assert_eq!(
            (
                web02.required_image.as_deref(),
                web02.planned_image.as_deref()
            ),
            (Some("web/2"), Some("web/1"))
        );
    }

    #[test]
    fn unknown_hosts_and_images_are_refused() {
        let state = fold([add_image("web/1"), add_machine("web-01", None)]);
        refused(
            &state,
            add_machine("web-02", Some("web/9")),
            Rejection::UnknownImage("web/9".into()),
        );
        refused(
            &state,
            Change::RequiredImageSet {
                hostnames: vec!["web-01".into(), "web-09".into()],
                image: Some("web/1".into()),
            },
            Rejection::UnknownMachine("web-09".into()),
        );
        refused(
            &state,
            Change::MachineRemoved {
                hostname: "db-01".into(),
            },
            Rejection::UnknownMachine("db-01".into()),
        );
        refused(
            &state,
            add_machine("web-01", None),
            Rejection::MachineExists("web-01".into()),
        );
        refused(
            &state,
            Change::RequiredImageSet {
                hostnames: vec![],
                image: None,
            },
            Rejection::NoMachines,
        );
        refused(
            &state,
            Change::PlannedImageSet {
                hostnames: vec!["web-01".into(), "web-01".into()],
                image: None,
            },
            Rejection::DuplicateMachine("web-01".into()),
        );
    }

    #[test]
    fn a_machine_named_twice_is_refused_in_short_and_long_lists() {
        let hosts: Vec<String> = (0..40).map(|i| format!("web-{i:02}")).collect();
        let state = fold(hosts.iter().map(|h| add_machine(h, None)));
        for len in [2, DUPLICATES_BY_SET - 1, DUPLICATES_BY_SET, 40] {
            let mut named = hosts[..len].to_vec();
            named.insert(len - 1, hosts[len / 2].clone());
            refused(
                &state,
                Change::RequiredImageSet {
                    hostnames: named.clone(),
                    image: None,
                },
                Rejection::DuplicateMachine(hosts[len / 2].clone()),
            );
            // An unknown machine before the repeat is what is reported.
            named.insert(len / 2 + 1, "db-01".into());
            refused(
                &state,
                Change::PlannedImageSet {
                    hostnames: named,
                    image: None,
                },
                Rejection::UnknownMachine("db-01".into()),
            );
        }
    }

    #[test]
    fn deleted_images_cannot_be_assigned_or_reused() {
        let state = fold([
            add_image("web/1"),
            add_machine("web-01", None),
            Change::ImageDeleted {
                name: "web/1".into(),
            },
        ]);
        assert!(state.image("web/1").unwrap().deleted_at.is_some());
        refused(
            &state,
            Change::RequiredImageSet {
                hostnames: vec!["web-01".into()],
                image: Some("web/1".into()),
            },
            Rejection::ImageDeleted("web/1".into()),
        );
        refused(
            &state,
            add_image("web/1"),
            Rejection::ImageNameRetired("web/1".into()),
        );
        refused(
            &state,
            Change::ImageDeleted {
                name: "web/1".into(),
            },
            Rejection::ImageDeleted("web/1".into()),
        );
    }

    #[test]
    fn an_image_in_use_cannot_be_deleted() {
        let state = fold([add_image("web/1"), add_machine("web-01", Some("web/1"))]);
        refused(
            &state,
            Change::ImageDeleted {
                name: "web/1".into(),
            },
            Rejection::ImageInUse {
                image: "web/1".into(),
                role: "required",
                count: 1,
                example: "web-01".into(),
            },
        );
    }

    #[test]
    fn malformed_names_are_refused_even_inside_the_log() {
        let state = FleetState::default();
        refused(
            &state,
            add_machine("", None),
            Rejection::Name(NameError::EmptyHostname(String::new())),
        );
        refused(
            &state,
            add_machine("Web-01", None),
            Rejection::NotCanonical("Web-01".into(), "web-01".into()),
        );
        refused(
            &state,
            add_image("/web/1"),
            Rejection::NotCanonical("/web/1".into(), "web/1".into()),
        );
        assert!(matches!(
            FleetState::default().check(&add_image("web/../etc")),
            Err(Rejection::Name(_))
        ));
    }

    #[test]
    fn canonicalize_fixes_spelling_before_checks() {
        let mut change = Change::RequiredImageSet {
            hostnames: vec!["WEB-01".into()],
            image: Some("/web/1".into()),
        };
        change.canonicalize().unwrap();
        assert_eq!(
            change,
            Change::RequiredImageSet {
                hostnames: vec!["web-01".into()],
                image: Some("web/1".into())
            }
        );
        assert!(add_machine("bad host", None).canonicalize().is_err());
    }

    #[test]
    fn a_batch_applies_whole_or_not_at_all() {
        let state = fold([add_image("web/1"), add_machine("web-01", None)]);
        let mut after = state.clone();
        let batch = Change::Batch(vec![
            add_machine("web-02", Some("web/1")),
            Change::RequiredImageSet {
                hostnames: vec!["web-01".into(), "web-02".into()],
                image: Some("web/1".into()),
            },
        ]);
        let touched = after.apply(3, &event(batch)).unwrap();
        assert_eq!(
            touched,
            vec![
                Touched::Machine("web-01".into()),
                Touched::Machine("web-02".into())
            ]
        );
        assert_eq!(
            after.machine("web-02").unwrap().required_image.as_deref(),
            Some("web/1")
        );
        refused(
            &state,
            Change::Batch(vec![
                add_machine("web-02", None),
                add_machine("web-03", Some("web/9")),
            ]),
            Rejection::UnknownImage("web/9".into()),
        );
        refused(
            &state,
            Change::Batch(vec![Change::UpdatesHalted]),
            Rejection::BadBatch("updates_halted"),
        );
    }

    #[test]
    fn halt_and_resume() {
        let mut state = fold([Change::UpdatesHalted]);
        assert_eq!(state.policy().halt.as_ref().unwrap().reason, "test");
        state.apply(2, &event(Change::UpdatesResumed)).unwrap();
        refused(&state, Change::UpdatesResumed, Rejection::NotHalted);
    }

    #[test]
    fn policy_limits_are_set_changed_and_removed() {
        use crate::event::PolicyChange;
        let set = |p: PolicyChange| Change::PolicySet(p);
        let mut state = fold([set(PolicyChange {
            max_updating: Some(3),
            max_high_impact: Some(1),
            ..PolicyChange::default()
        })]);
        assert_eq!(state.policy().max_updating, Some(Limit::Machines(3)));
        assert_eq!(state.policy().brake_failure_percent(), 10, "default brake");
        state
            .apply(
                2,
                &event(set(PolicyChange {
                    max_updating_percent: Some(20),
                    brake_failure_percent: Some(50),
                    ..PolicyChange::default()
                })),
            )
            .unwrap();
        assert_eq!(state.policy().max_updating, Some(Limit::Percent(20)));
        assert_eq!(
            state.policy().max_high_impact,
            Some(1),
            "unset fields keep their value"
        );
        assert_eq!(state.policy().brake_failure_percent(), 50);
        state
            .apply(
                3,
                &event(set(PolicyChange {
                    max_updating: Some(0),
                    ..PolicyChange::default()
                })),
            )
            .unwrap();
        assert_eq!(state.policy().max_updating, None, "0 removes the limit");
        refused(
            &state,
            set(PolicyChange {
                max_updating_percent: Some(101),
                ..PolicyChange::default()
            }),
            Rejection::BadPolicy("max_updating_percent is a percentage, at most 100".into()),
        );
        assert_eq!(
            Limit::Percent(10).of(5),
            1,
            "a percentage allows at least one"
        );
        assert_eq!(Limit::Percent(50).of(10), 5);
    }

    #[test]
    fn a_pause_ends_at_the_events_time_plus_its_duration() {
        let mut state = fold([
            add_image("base/1"),
            add_machine("web-01", None),
            Change::MachinePaused {
                hostname: "web-01".into(),
                duration_ms: 60_000,
            },
        ]);
        let m = state.machine("web-01").unwrap();
        assert_eq!(m.paused_until_unix_ms, Some(1_000 + 60_000));
        assert_eq!(m.pause_reason, "test");
        state
            .apply(
                9,
                &event(Change::MachinePaused {
                    hostname: "web-01".into(),
                    duration_ms: 0,
                }),
            )
            .unwrap();
        assert_eq!(state.machine("web-01").unwrap().paused_until_unix_ms, None);
        refused(
            &state,
            Change::SafetyCleared {
                hostname: "web-01".into(),
                image: "nope/1".into(),
            },
            Rejection::UnknownImage("nope/1".into()),
        );
        state
            .apply(
                10,
                &event(Change::SafetyCleared {
                    hostname: "web-01".into(),
                    image: "base/1".into(),
                }),
            )
            .unwrap();
        assert_eq!(
            state
                .machine("web-01")
                .unwrap()
                .safety_cleared_image
                .as_deref(),
            Some("base/1")
        );
    }

    #[test]
    fn apply_is_deterministic_and_never_panics_on_any_sequence() {
        // A small exhaustive walk: every sequence of three changes from a pool that mixes valid
        // and invalid ones, applied twice, must give identical states.
        let pool = vec![
            add_image("a"),
            Change::ImageDeleted { name: "a".into() },
            add_machine("m", Some("a")),
            add_machine("m", None),
            Change::MachineRemoved {
                hostname: "m".into(),
            },
            Change::RequiredImageSet {
                hostnames: vec!["m".into()],
                image: Some("a".into()),
            },
            Change::PlannedImageSet {
                hostnames: vec!["m".into()],
                image: None,
            },
            Change::RequiredImageSet {
                hostnames: vec!["M".into()],
                image: Some("a".into()),
            },
            Change::PlannedImageSet {
                hostnames: vec!["m".into()],
                image: Some("/a".into()),
            },
            Change::MachineUpdated {
                hostname: "m".into(),
                tags: BTreeMap::from([(String::new(), String::new())]),
            },
            Change::UpdatesResumed,
            Change::UpdatesHalted,
            Change::Batch(vec![
                add_machine("n", None),
                Change::PlannedImageSet {
                    hostnames: vec!["n".into(), "m".into()],
                    image: Some("a".into()),
                },
            ]),
        ];
        for a in &pool {
            for b in &pool {
                for c in &pool {
                    let run = || {
                        let mut state = FleetState::default();
                        let results: Vec<_> = [a, b, c]
                            .iter()
                            .enumerate()
                            .map(|(i, ch)| state.apply(i as u64, &event((*ch).clone())))
                            .collect();
                        (state, results)
                    };
                    let (state, results) = run();
                    assert_eq!((&state, &results), (&run().0, &run().1));
                    // What the leader checks before proposing is what apply then does.
                    let mut checked = FleetState::default();
                    for (i, ch) in [a, b, c].iter().enumerate() {
                        assert_eq!(checked.check(ch), results[i].clone().map(drop), "{ch:?}");
                        let _ = checked.apply(i as u64, &event((*ch).clone()));
                    }
                    // A replay's fold reaches the same state through the same refusals.
                    let mut untracked = FleetState::default();
                    for (i, ch) in [a, b, c].iter().enumerate() {
                        assert_eq!(
                            untracked.apply_untracked(i as u64, &event((*ch).clone())),
                            results[i].clone().map(drop)
                        );
                    }
                    assert_eq!(untracked, state);
                }
            }
        }
    }
}
