//! What a machine must do to match its required image: the pure core of reconciliation.
//!
//! An agent describes its machine as a *difference from an image it holds* (its base): a
//! [`Delta`] naming only the paths where the machine differs. The leader never holds a
//! machine's whole tree. To plan, it composes the base manifest with the delta, and compares
//! the result with the target image only at the paths where something can differ: the paths
//! where base and target differ (one [`Transition`], shared by every machine making the same
//! move) and the paths in the delta. A compliant machine on its base has an empty delta, so
//! its plan costs only the shared transition.
//!
//! The resulting [`Plan`] lists deletions first, deepest first, then writes in tree order, so
//! a directory is emptied before it is removed or replaced and created before its contents.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use crate::event::Hash;
use crate::image::{diff, tree_cmp, Entry, Filter, Kind, Manifest, Trigger};

/// A path ordered as in a manifest (component by component), so maps of paths iterate in
/// tree order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreePath(pub String);

impl Ord for TreePath {
    fn cmp(&self, other: &Self) -> Ordering {
        tree_cmp(&self.0, &other.0)
    }
}

impl PartialOrd for TreePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A machine's tree relative to its base image: at each listed path, either the entry the
/// machine has (differing from the base's, or absent from it), or `None` when the base has
/// the path and the machine does not. Unlisted paths are as in the base.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    paths: BTreeMap<TreePath, Option<Entry>>,
}

impl Delta {
    pub fn new() -> Delta {
        Delta::default()
    }

    /// The difference that turns `base` (None: nothing at all) into `machine`.
    pub fn between(base: Option<&Manifest>, machine: &Manifest) -> Delta {
        let mut delta = Delta::new();
        match base {
            Some(base) => {
                for difference in diff(base, machine) {
                    match difference {
                        crate::image::Difference::Added(entry)
                        | crate::image::Difference::Changed { to: entry, .. } => {
                            delta.differs(entry.clone())
                        }
                        crate::image::Difference::Removed(entry) => delta.missing(&entry.path),
                    }
                }
            }
            None => {
                for entry in machine.entries() {
                    delta.differs(entry.clone());
                }
            }
        }
        delta
    }

    /// The machine has `entry` at its path, unlike the base.
    pub fn differs(&mut self, entry: Entry) {
        self.paths.insert(TreePath(entry.path.clone()), Some(entry));
    }

    /// The base has `path`; the machine does not.
    pub fn missing(&mut self, path: &str) {
        self.paths.insert(TreePath(path.to_owned()), None);
    }

    /// `path` is as in the base again.
    pub fn matches(&mut self, path: &str) {
        self.paths.remove(&TreePath(path.to_owned()));
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Listed paths in tree order, with what the machine has there.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&Entry>)> {
        self.paths.iter().map(|(p, e)| (p.0.as_str(), e.as_ref()))
    }

    /// What the machine has at `path` given its base: `Some(None)` when the delta says it is
    /// absent, `None` when the delta does not mention the path.
    pub fn get(&self, path: &str) -> Option<Option<&Entry>> {
        self.paths
            .get(&TreePath(path.to_owned()))
            .map(|e| e.as_ref())
    }
}

/// The paths where two images differ, computed once for every machine moving from `base` to
/// `target`.
#[derive(Debug, Clone)]
pub struct Transition {
    paths: Vec<String>,
}

impl Transition {
    /// `base` None: a machine that holds no image yet.
    pub fn new(base: Option<&Manifest>, target: &Manifest) -> Transition {
        let paths = match base {
            Some(base) => diff(base, target)
                .into_iter()
                .map(|d| d.path().to_owned())
                .collect(),
            None => target.entries().iter().map(|e| e.path.clone()).collect(),
        };
        Transition { paths }
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// How many paths the machine described by `base` + `delta` has (its managed tree).
pub fn machine_entries(base: Option<&Manifest>, delta: &Delta) -> usize {
    let in_base = |p: &str| base.is_some_and(|b| b.get(p).is_some());
    let base_len = base.map_or(0, |b| b.entries().len());
    let (mut added, mut missing) = (0, 0);
    for (path, entry) in delta.iter() {
        match (entry, in_base(path)) {
            (Some(_), false) => added += 1,
            (None, true) => missing += 1,
            _ => {}
        }
    }
    base_len + added - missing
}

/// One change to a machine's tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Step {
    /// Make the path exactly this entry (kind, content, link target, metadata), replacing
    /// whatever is there. A file's content comes from the object named by its hash.
    Write(Entry),
    /// The path already has this entry's kind and content; set its mode, owner and group.
    Metadata(Entry),
    /// Remove the path. A directory's managed contents are removed by earlier steps.
    Delete(String),
}

impl Step {
    pub fn path(&self) -> &str {
        match self {
            Step::Write(e) | Step::Metadata(e) => &e.path,
            Step::Delete(p) => p,
        }
    }
}

/// What a machine must do to match an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub image: String,
    /// Deletions deepest first, then writes and metadata fixes in tree order.
    pub steps: Vec<Step>,
    /// The image's triggers that the steps fire, each once, in the image's order.
    pub triggers: Vec<Trigger>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Every object the writes need, each once, with its size.
    pub fn objects(&self) -> Vec<(Hash, u64)> {
        let mut objects: Vec<(Hash, u64)> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Write(e) if e.kind == Kind::File => Some((e.hash, e.size)),
                _ => None,
            })
            .collect();
        objects.sort_unstable();
        objects.dedup();
        objects
    }

    pub fn deletions(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Delete(_)))
            .count()
    }

    pub fn reboots(&self) -> bool {
        self.triggers.iter().any(|t| t.do_reboot)
    }

    pub fn high_impact(&self) -> bool {
        self.triggers.iter().any(|t| t.high_impact || t.do_reboot)
    }
}

/// The image a machine is asked to match, with what it leaves alone.
pub struct Target<'a> {
    pub name: &'a str,
    pub manifest: &'a Manifest,
    /// The image's own filter: paths it leaves alone.
    pub filter: &'a Filter,
    pub triggers: &'a [Trigger],
}

/// The steps that make a machine described by `base` + `delta` match `target`, leaving alone
/// the paths the target's filter or the agent's `excluded` list name (and what lies below
/// them). `transition` must be `Transition::new(base, target.manifest)`.
pub fn plan(
    target: &Target<'_>,
    base: Option<&Manifest>,
    transition: &Transition,
    delta: &Delta,
    excluded: &Filter,
) -> Plan {
    let mut candidates: BTreeSet<TreePath> = transition
        .paths
        .iter()
        .map(|p| TreePath(p.clone()))
        .collect();
    candidates.extend(delta.paths.keys().cloned());

    let mut deletes = Vec::new();
    let mut writes = Vec::new();
    for TreePath(path) in &candidates {
        if left_alone(target.filter, path) || left_alone(excluded, path) {
            continue;
        }
        let has = match delta.get(path) {
            Some(entry) => entry,
            None => base.and_then(|b| b.get(path)),
        };
        let wants = target.manifest.get(path);
        match (has, wants) {
            (None, None) => {}
            (Some(_), None) => deletes.push(Step::Delete(path.clone())),
            (None, Some(want)) => writes.push(Step::Write(want.clone())),
            (Some(has), Some(want)) if has == want => {}
            (Some(has), Some(want)) => writes.push(if same_but_metadata(has, want) {
                Step::Metadata(want.clone())
            } else {
                Step::Write(want.clone())
            }),
        }
    }
    deletes.reverse();
    let mut steps = deletes;
    steps.extend(writes);

    let triggers = target
        .triggers
        .iter()
        .filter(|t| fires(t, &steps))
        .cloned()
        .collect();
    Plan {
        image: target.name.to_owned(),
        steps,
        triggers,
    }
}

/// The machine needs no change beyond mode, owner or group: same kind, same content.
fn same_but_metadata(has: &Entry, want: &Entry) -> bool {
    has.kind == want.kind
        && matches!(want.kind, Kind::File | Kind::Directory)
        && has.size == want.size
        && has.hash == want.hash
        && has.link_target == want.link_target
}

fn fires(trigger: &Trigger, steps: &[Step]) -> bool {
    let Ok(set) = regex::RegexSet::new(trigger.match_lines.iter().map(|l| format!("^(?:{l})$")))
    else {
        return false;
    };
    steps.iter().any(|s| set.is_match(s.path()))
}

/// Whether `filter` leaves `path` alone: it or one of its ancestors matches (the root never
/// is). The leader plans by this rule and the agent describes its machine by it.
pub fn left_alone(filter: &Filter, path: &str) -> bool {
    ancestors_and_self(path).any(|p| filter.excludes(p))
}

/// `/a/b/c`, `/a/b`, `/a` (not the root).
fn ancestors_and_self(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let current = next?;
        next = match current.rfind('/') {
            Some(0) | None => None,
            Some(i) => Some(&current[..i]),
        };
        (current != "/").then_some(current)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest::new(entries).unwrap()
    }

    fn image_v1() -> Manifest {
        manifest(vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::directory("/etc", 0o755, 0, 0),
            Entry::file("/etc/app.conf", 0o644, 0, 0, 3, [1; 32]),
            Entry::file("/etc/motd", 0o644, 0, 0, 5, [2; 32]),
            Entry::directory("/var", 0o755, 0, 0),
            Entry::directory("/var/log", 0o755, 0, 0),
        ])
    }

    fn image_v2() -> Manifest {
        manifest(vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::directory("/etc", 0o755, 0, 0),
            Entry::file("/etc/app.conf", 0o644, 0, 0, 4, [3; 32]),
            Entry::file("/etc/motd", 0o600, 0, 0, 5, [2; 32]),
            Entry::symlink("/etc/motd.link", 0, 0, "motd"),
            Entry::directory("/var", 0o755, 0, 0),
            Entry::directory("/var/log", 0o755, 0, 0),
        ])
    }

    fn run(base: Option<&Manifest>, delta: &Delta, target: &Manifest, filter: &Filter) -> Plan {
        let triggers = vec![Trigger {
            match_lines: vec!["/etc/app\\.conf".into()],
            service: "app".into(),
            do_reload: false,
            do_reboot: false,
            high_impact: false,
        }];
        let t = Target {
            name: "img",
            manifest: target,
            filter,
            triggers: &triggers,
        };
        plan(
            &t,
            base,
            &Transition::new(base, target),
            delta,
            &Filter::empty(),
        )
    }

    #[test]
    fn a_compliant_machine_has_an_empty_plan() {
        let v1 = image_v1();
        let p = run(Some(&v1), &Delta::new(), &v1, &Filter::empty());
        assert!(p.is_empty());
        assert!(p.triggers.is_empty());
    }

    #[test]
    fn a_compliant_machine_moving_images_gets_the_image_difference() {
        let (v1, v2) = (image_v1(), image_v2());
        let p = run(Some(&v1), &Delta::new(), &v2, &Filter::empty());
        assert_eq!(
            p.steps,
            vec![
                Step::Write(v2.get("/etc/app.conf").unwrap().clone()),
                Step::Metadata(v2.get("/etc/motd").unwrap().clone()),
                Step::Write(v2.get("/etc/motd.link").unwrap().clone()),
            ]
        );
        assert_eq!(p.objects(), vec![([3; 32], 4)]);
        assert_eq!(
            p.triggers.len(),
            1,
            "app.conf changes, so app's trigger fires"
        );
    }

    #[test]
    fn an_empty_machine_gets_every_entry_in_tree_order() {
        let v1 = image_v1();
        let machine = manifest(vec![Entry::directory("/", 0o755, 0, 0)]);
        let p = run(None, &Delta::between(None, &machine), &v1, &Filter::empty());
        let paths: Vec<&str> = p.steps.iter().map(Step::path).collect();
        assert_eq!(
            paths,
            ["/etc", "/etc/app.conf", "/etc/motd", "/var", "/var/log"]
        );
    }

    #[test]
    fn deviations_from_the_base_are_corrected_and_strays_deleted_deepest_first() {
        let v1 = image_v1();
        let mut delta = Delta::new();
        delta.differs(Entry::file("/etc/app.conf", 0o644, 0, 0, 9, [9; 32]));
        delta.missing("/etc/motd");
        delta.differs(Entry::directory("/opt", 0o755, 0, 0));
        delta.differs(Entry::file("/opt/stray", 0o755, 0, 0, 1, [7; 32]));
        let p = run(Some(&v1), &delta, &v1, &Filter::empty());
        assert_eq!(
            p.steps,
            vec![
                Step::Delete("/opt/stray".into()),
                Step::Delete("/opt".into()),
                Step::Write(v1.get("/etc/app.conf").unwrap().clone()),
                Step::Write(v1.get("/etc/motd").unwrap().clone()),
            ]
        );
    }

    #[test]
    fn a_deviation_the_transition_also_covers_is_planned_from_the_machine() {
        let (v1, v2) = (image_v1(), image_v2());
        // The machine already has v2's app.conf: nothing to write there.
        let mut delta = Delta::new();
        delta.differs(v2.get("/etc/app.conf").unwrap().clone());
        let p = run(Some(&v1), &delta, &v2, &Filter::empty());
        assert!(p.steps.iter().all(|s| s.path() != "/etc/app.conf"));
        assert!(p.triggers.is_empty(), "no triggered path changes");
    }

    #[test]
    fn filtered_paths_and_what_lies_below_them_are_left_alone() {
        let v1 = image_v1();
        let mut delta = Delta::new();
        delta.differs(Entry::file("/var/log/syslog", 0o640, 0, 0, 1, [5; 32]));
        delta.differs(Entry::directory("/var/log/app", 0o755, 0, 0));
        delta.differs(Entry::file("/var/log/app/x", 0o644, 0, 0, 1, [6; 32]));
        let filter = Filter::new(vec!["/var/log/.*".into()]).unwrap();
        assert!(run(Some(&v1), &delta, &v1, &filter).is_empty());
        let subtree = Filter::new(vec!["/var/log/app".into()]).unwrap();
        let p = run(Some(&v1), &delta, &v1, &subtree);
        assert_eq!(p.steps, vec![Step::Delete("/var/log/syslog".into())]);
    }

    #[test]
    fn a_kind_change_empties_the_directory_before_replacing_it() {
        let v1 = image_v1();
        let mut delta = Delta::new();
        delta.differs(Entry::directory("/etc/motd", 0o755, 0, 0));
        delta.differs(Entry::file("/etc/motd/x", 0o644, 0, 0, 1, [8; 32]));
        let p = run(Some(&v1), &delta, &v1, &Filter::empty());
        assert_eq!(
            p.steps,
            vec![
                Step::Delete("/etc/motd/x".into()),
                Step::Write(v1.get("/etc/motd").unwrap().clone()),
            ]
        );
    }

    #[test]
    fn the_machine_is_counted_from_its_base_and_delta() {
        let v1 = image_v1();
        assert_eq!(machine_entries(Some(&v1), &Delta::new()), 6);
        let mut delta = Delta::new();
        delta.missing("/etc/motd");
        delta.differs(Entry::file("/etc/new", 0o644, 0, 0, 1, [1; 32]));
        delta.differs(Entry::file("/etc/app.conf", 0o600, 0, 0, 3, [1; 32]));
        assert_eq!(machine_entries(Some(&v1), &delta), 6);
        assert_eq!(machine_entries(None, &delta), 2);
    }

    #[test]
    fn delta_between_round_trips_through_plan() {
        let (v1, v2) = (image_v1(), image_v2());
        let delta = Delta::between(Some(&v1), &v2);
        // A machine that is v2 written as a difference from v1 needs nothing to reach v2.
        assert!(run(Some(&v1), &delta, &v2, &Filter::empty()).is_empty());
        // ... and exactly the way back to reach v1.
        assert_eq!(run(Some(&v1), &delta, &v1, &Filter::empty()).steps.len(), 3);
    }
}
