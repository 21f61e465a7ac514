//! The update applier: makes the managed root match a plan, nearly atomically, with a journal
//! that lets a restarted subd finish or undo whatever a crash interrupted.
//!
//! # Why every managed file is always its old or its new version
//!
//! File content is never written in place. Each new file, symlink, hard link and new directory
//! is first built as a complete inode in the staging directory (same file system as the root),
//! and only a `rename(2)` makes a managed name point at it; rename replaces the name atomically.
//! Before that, the old inode is hard-linked under `rollback/<plan_id>/`, so the old version
//! stays reachable without ever being copied. The only non-atomic case is a kind change between
//! a directory and a non-directory, which rename cannot do in one call: the path is briefly
//! absent, never a mix.
//!
//! Every operation is recognisable on disk by inode number: a target holds either the old inode
//! (recorded in the journal) or the staged one (recorded too). So each operation can be redone
//! or undone from what the disk shows, any number of times, which is what makes recovery after
//! SIGKILL simple.
//!
//! # The journal, phase by phase
//!
//! One JSON file, `<state_dir>/update.journal`, always replaced whole (write a temporary file,
//! fsync, rename, fsync the directory), so it is read either as the previous phase or as the
//! next, never torn.
//!
//! 1. **Check** (no journal, nothing written). Paths, exclusions, symlinks on disk, objects in
//!    the cache, directories to remove being empty: any problem refuses the update here.
//!    A crash here leaves nothing.
//! 2. **Prepare**: stage every new inode (content copied from the cache and verified against
//!    its blake3 name, mode and owner set), hard-link each replaced non-directory into
//!    `rollback/`, make all of it durable with one `syncfs`, then write the journal in phase
//!    `Prepared` with every operation and the old metadata. A crash before the journal exists
//!    leaves only unreferenced files that `recover` deletes; a crash in `Prepared` has changed
//!    nothing visible, so `recover` abandons the update and reports so.
//! 3. **Activating** (written before the first service stops): stop services, run the
//!    operations in plan order, fsync the affected directories, start the services in reverse,
//!    reload, health check. A crash here is rolled forward by `recover`: stopping a stopped
//!    service is harmless and operations already done are recognised and skipped.
//! 4. **Rebooting** (written before `--reboot-cmd` runs): the reboot is expected to kill subd,
//!    so after the restart `recover` only runs the health check.
//! 5. **RollingBack** (written before anything is undone, with the reason): stop the services,
//!    undo the operations in reverse order (old inodes renamed back, created paths removed, old
//!    metadata restored), start the services. A crash here is continued by `recover`.
//! 6. **Finished**: the report is written into the journal, then persisted as the last report,
//!    then `rollback/` and staging are emptied and the journal removed. A crash anywhere here
//!    makes `recover` hand back the same report.
//!
//! While a journal exists no other update is accepted: its rollback data must not be lost.
//!
//! # Test hook
//!
//! If the environment variable `SUBD_TEST_PAUSE_AFTER_STEPS=N` is set, the applier sleeps 30 s
//! after applying N steps (0: after stopping services, before the first step), so that an
//! integration test can SIGKILL subd mid-update at a known point. It has no other effect and is
//! not meant for production.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dom_storage::event::Hash;
use dom_storage::image::{Filter, Kind, Trigger};
use dom_storage::objects::{to_hex, ObjectError, ObjectStore};
use dom_storage::plan::Step;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Test hook: sleep 30 s after applying this many steps (see the module documentation).
pub const PAUSE_AFTER_STEPS_ENV: &str = "SUBD_TEST_PAUSE_AFTER_STEPS";

const JOURNAL_VERSION: u32 = 1;
const JOURNAL_FILE: &str = "update.journal";
const LAST_REPORT_FILE: &str = "last-update.json";
const COMMAND_OUTPUT_FILE: &str = "command.out";

/// How services are driven, and the optional health and reboot commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Services {
    /// Run as `CMD SERVICE start|stop|reload`, or `CMD start|stop|reload SERVICE` when the
    /// program's basename is `systemctl`. May carry arguments (shell-word split).
    pub service_cmd: String,
    /// Run through `sh -c` after the services are back; a non-zero exit rolls the update back.
    pub health_cmd: Option<String>,
    /// Run through `sh -c` when a `do_reboot` trigger fired.
    pub reboot_cmd: Option<String>,
}

impl Default for Services {
    fn default() -> Services {
        Services {
            service_cmd: "systemctl".into(),
            health_cmd: None,
            reboot_cmd: None,
        }
    }
}

/// A plan to apply, as the leader sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub plan_id: u64,
    pub image: String,
    pub steps: Vec<Step>,
    /// The image's triggers that the steps fire.
    pub triggers: Vec<Trigger>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied and healthy.
    Applied,
    /// Applied, the health check failed, and every touched path was put back.
    RolledBack,
    /// Refused before anything changed.
    Refused,
    /// Failed part way (the error says where) and rolled back.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub plan_id: u64,
    pub image: String,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// First service stop to last start; the apply phase alone if no service is restarted.
    pub activation: Duration,
    /// Whole update, from the request to the health check's end.
    pub duration: Duration,
    pub steps: usize,
    /// Services stopped and started or reloaded.
    pub services: Vec<String>,
    /// Step paths, for the scanner to re-read.
    pub touched: Vec<String>,
    pub finished_unix_ms: i64,
}

#[derive(Debug, Error)]
pub enum UpdateError {
    #[error("I/O on {path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("path {path:?} is not a normalized absolute image path: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("path {path:?} is excluded from updates (by {matched:?} or what lies above it)")]
    Excluded { path: String, matched: String },
    #[error(
        "path {path:?} lies under {through:?}, which is a symlink on disk: refusing to follow it"
    )]
    ThroughSymlink { path: String, through: String },
    #[error("path {path:?} lies under {parent:?}, which {reason}")]
    BadParent {
        path: String,
        parent: String,
        reason: &'static str,
    },
    #[error("path {path:?}: {reason}")]
    Conflict { path: String, reason: String },
    #[error("object {hash} for {path:?} is not in the local cache")]
    ObjectMissing { path: String, hash: String },
    #[error("object {hash} for {path:?} is corrupt in the local cache: {detail}")]
    ObjectCorrupt {
        path: String,
        hash: String,
        detail: String,
    },
    #[error("plan {plan_id} is unfinished (its journal is still present); subd finishes or rolls it back at start-up")]
    Unfinished { plan_id: u64 },
    #[error("update journal {path}: {detail}")]
    Journal { path: PathBuf, detail: String },
    #[error("`{command}` failed: {detail}")]
    CommandFailed { command: String, detail: String },
    #[error("health check `{command}` failed: {detail}")]
    Health { command: String, detail: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("object cache: {0}")]
    Objects(#[from] ObjectError),
    #[error("path {path:?} changed on disk during the update: {detail}")]
    Changed { path: String, detail: String },
    /// Only produced by the in-process test hook that simulates SIGKILL.
    #[error("simulated crash (test hook)")]
    SimulatedCrash,
}

impl UpdateError {
    /// The plan cannot be applied as it stands; nothing was changed.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            UpdateError::BadPath { .. }
                | UpdateError::Excluded { .. }
                | UpdateError::ThroughSymlink { .. }
                | UpdateError::BadParent { .. }
                | UpdateError::Conflict { .. }
                | UpdateError::ObjectMissing { .. }
                | UpdateError::ObjectCorrupt { .. }
                | UpdateError::Unfinished { .. }
                | UpdateError::Config(_)
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> UpdateError + '_ {
    move |error| UpdateError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Applies updates to one managed root. Calls are serialized.
pub struct Updater {
    root: PathBuf,
    state_dir: PathBuf,
    staging: PathBuf,
    rollback: PathBuf,
    /// The root's file system: everything renamed must stay on it.
    dev: u64,
    objects: ObjectStore,
    services: Services,
    service_argv: Vec<String>,
    lock: Mutex<()>,
    crash_at: Option<usize>,
    ticks: AtomicUsize,
}

// ---------------------------------------------------------------------------------------------
// The journal.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    version: u32,
    plan_id: u64,
    image: String,
    started_unix_ms: i64,
    steps: usize,
    phase: Phase,
    /// Stopped in this order, started in reverse.
    stop: Vec<String>,
    reload: Vec<String>,
    reboot: bool,
    /// One per step, in plan order.
    ops: Vec<Op>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Phase {
    Prepared,
    Activating,
    Rebooting,
    RollingBack {
        outcome: Outcome,
        error: String,
        rebooted: bool,
    },
    Finished {
        report: Report,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Op {
    path: String,
    action: Action,
}

/// What was at a path before the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct OldNode {
    ino: u64,
    dir: bool,
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Action {
    /// A delete of a path that is already absent.
    Nothing,
    /// Rename staged inode `new_ino` to the path. A non-directory `old` is hard-linked under
    /// rollback/ during prepare; a directory `old` (emptied by earlier steps) is renamed there.
    Place {
        new_ino: u64,
        new_dir: bool,
        old: Option<OldNode>,
    },
    /// Same inode, new mode and owner.
    SetMeta {
        old: OldNode,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Rename the path under rollback/.
    Remove { old: OldNode },
}

/// How to build a Place's new inode during prepare.
#[derive(Debug, Clone)]
enum Stage {
    File {
        hash: Hash,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        target: String,
        uid: u32,
        gid: u32,
    },
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Another name for the inode staged for op `usize`.
    LinkStaged(usize),
    /// Another name for the file already at this image path.
    LinkDisk(String),
}

// ---------------------------------------------------------------------------------------------
// What is on disk.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    dev: u64,
    ino: u64,
    kind: NodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Node {
    fn of(meta: &fs::Metadata) -> Node {
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            NodeKind::File
        } else if ft.is_dir() {
            NodeKind::Dir
        } else if ft.is_symlink() {
            NodeKind::Symlink
        } else {
            NodeKind::Other
        };
        Node {
            dev: meta.dev(),
            ino: meta.ino(),
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    fn old(&self) -> OldNode {
        OldNode {
            ino: self.ino,
            dir: self.kind == NodeKind::Dir,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// Never follows a final symlink; callers make sure no ancestor is one.
fn lstat(path: &Path) -> Result<Option<Node>, UpdateError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(Node::of(&meta))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // A parent that is (still, or again) a file during a kind change: nothing is there.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn describe(node: Option<Node>) -> &'static str {
    match node.map(|n| n.kind) {
        None => "nothing",
        Some(NodeKind::File) => "a regular file",
        Some(NodeKind::Dir) => "a directory",
        Some(NodeKind::Symlink) => "a symlink",
        Some(NodeKind::Other) => "a special file",
    }
}

/// lstat results during the check, which reads many ancestors repeatedly.
struct Disk<'a> {
    updater: &'a Updater,
    seen: HashMap<String, Option<Node>>,
}

impl Disk<'_> {
    fn get(&mut self, path: &str) -> Result<Option<Node>, UpdateError> {
        if let Some(node) = self.seen.get(path) {
            return Ok(*node);
        }
        let node = lstat(&self.updater.host(path))?;
        self.seen.insert(path.to_owned(), node);
        Ok(node)
    }
}

// ---------------------------------------------------------------------------------------------
// Image paths.

fn check_syntax(path: &str) -> Result<(), UpdateError> {
    let bad = |reason| {
        Err(UpdateError::BadPath {
            path: path.to_owned(),
            reason,
        })
    };
    if !path.starts_with('/') {
        return bad("it is not absolute");
    }
    if path.contains('\0') {
        return bad("it has a NUL byte");
    }
    if path == "/" {
        return Ok(());
    }
    for component in path[1..].split('/') {
        match component {
            "" => return bad("it has an empty component or a trailing slash"),
            "." | ".." => return bad("it has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// `/a`, `/a/b` for `/a/b/c`: every ancestor but the root.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .skip(1)
        .map(move |(i, _)| &path[..i])
}

fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The pattern's owner: the path itself or an ancestor (not the root) that `excluded` names,
/// as the planner decides what to leave alone.
fn excluded_by<'p>(path: &'p str, excluded: &Filter) -> Option<&'p str> {
    if path == "/" {
        return None;
    }
    std::iter::once(path)
        .chain(ancestors(path))
        .find(|p| excluded.excludes(p))
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Small durable-I/O helpers.

fn fsync_dir(dir: &Path) -> Result<(), UpdateError> {
    match File::open(dir) {
        Ok(f) => f.sync_all().map_err(io_err(dir)),
        // A directory removed by the update (or its rollback) has nothing left to sync.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn syncfs(dir: &Path) -> Result<(), UpdateError> {
    let f = File::open(dir).map_err(io_err(dir))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    if rc != 0 {
        return Err(io_err(dir)(io::Error::last_os_error()));
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    match path.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}

fn remove_tree(path: &Path) -> Result<(), UpdateError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), UpdateError> {
    fs::rename(from, to).map_err(|error| UpdateError::Io {
        path: to.to_owned(),
        error: io::Error::new(
            error.kind(),
            format!("rename from {}: {error}", from.display()),
        ),
    })
}

/// chown before chmod: chown clears set-id bits that the mode may want.
fn set_meta(path: &Path, mode: u32, uid: u32, gid: u32) -> Result<(), UpdateError> {
    let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Services to restart (in stop order), to reload, and whether to reboot.
fn services_of(triggers: &[Trigger]) -> Result<(Vec<String>, Vec<String>, bool), UpdateError> {
    let (mut stop, mut reload, mut reboot) = (Vec::<String>::new(), Vec::<String>::new(), false);
    for trigger in triggers {
        if trigger.do_reboot {
            // Dominator: a reboot stands in for restarting the service.
            reboot = true;
            continue;
        }
        let service = trigger.service.trim();
        if service.is_empty() || service.starts_with('-') {
            return Err(UpdateError::Config(format!(
                "trigger service name {:?} cannot be passed to the service command",
                trigger.service
            )));
        }
        if trigger.do_reload {
            if !stop.iter().chain(&reload).any(|s| s == service) {
                reload.push(service.to_owned());
            }
        } else if !stop.iter().any(|s| s == service) {
            // A restart covers a reload of the same service.
            reload.retain(|s| s != service);
            stop.push(service.to_owned());
        }
    }
    Ok((stop, reload, reboot))
}

// ---------------------------------------------------------------------------------------------
// Progress of one run, to know what a rollback must undo.

#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// Services whose stop was attempted.
    stopped: usize,
    /// The services were started again on the new files.
    started: bool,
    rebooted: bool,
}

impl Progress {
    /// After a restart nothing is known: assume the worst, every step is idempotent.
    fn unknown(stop: usize, rebooted: bool) -> Progress {
        Progress {
            stopped: stop,
            started: true,
            rebooted,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Fresh,
    /// Roll a crashed activation forward.
    Recovering,
    /// The reboot happened: only the health check is left.
    AfterReboot,
}

struct Timing {
    begin: Instant,
    /// Set when recovering: the update began in an earlier process.
    began_unix_ms: Option<i64>,
    window_start: Option<Instant>,
    window_end: Option<Instant>,
}

impl Timing {
    fn new() -> Timing {
        Timing {
            begin: Instant::now(),
            began_unix_ms: None,
            window_start: None,
            window_end: None,
        }
    }

    fn recovered(began_unix_ms: i64) -> Timing {
        Timing {
            began_unix_ms: Some(began_unix_ms),
            ..Timing::new()
        }
    }

    fn activation(&self) -> Duration {
        match (self.window_start, self.window_end) {
            (Some(start), Some(end)) => end.saturating_duration_since(start),
            (Some(start), None) => start.elapsed(),
            _ => Duration::ZERO,
        }
    }

    fn duration(&self) -> Duration {
        match self.began_unix_ms {
            Some(ms) => Duration::from_millis((now_unix_ms() - ms).max(0) as u64),
            None => self.begin.elapsed(),
        }
    }
}

impl Updater {
    pub fn new(root: &Path, state_dir: &Path, services: Services) -> Result<Updater, UpdateError> {
        let root = fs::canonicalize(root).map_err(io_err(root))?;
        if !root.is_dir() {
            return Err(UpdateError::Config(format!(
                "root {} is not a directory",
                root.display()
            )));
        }
        fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let state_dir = fs::canonicalize(state_dir).map_err(io_err(state_dir))?;
        if root.starts_with(&state_dir) {
            return Err(UpdateError::Config(format!(
                "root {} lies inside the state directory {}",
                root.display(),
                state_dir.display()
            )));
        }
        let service_argv = shell_words::split(&services.service_cmd).map_err(|e| {
            UpdateError::Config(format!("service command {:?}: {e}", services.service_cmd))
        })?;
        if service_argv.is_empty() {
            return Err(UpdateError::Config("the service command is empty".into()));
        }
        let dev = fs::metadata(&root).map_err(io_err(&root))?.dev();
        let state_dev = fs::metadata(&state_dir).map_err(io_err(&state_dir))?.dev();
        // rename(2) and link(2) only work within one file system.
        let (staging, rollback) = if state_dev == dev {
            (state_dir.join("staging"), state_dir.join("rollback"))
        } else {
            let staging = root.join(".subd-staging");
            let rollback = staging.join("rollback");
            (staging, rollback)
        };
        for dir in [&staging, &rollback] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            // Staged files carry their final modes, but may be bound for directories that are
            // closed to others: keep them out of reach until they are in place.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }
        let objects = ObjectStore::open(&state_dir.join("objects"))?;
        Ok(Updater {
            root,
            state_dir,
            staging,
            rollback,
            dev,
            objects,
            services,
            service_argv,
            lock: Mutex::new(()),
            crash_at: None,
            ticks: AtomicUsize::new(0),
        })
    }

    /// Where staged files go: `<state_dir>/staging` when on the root's file system (so
    /// rename(2) works), else `<root>/.subd-staging`. The agent excludes it from scans.
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Applies `request`, blocking until it is applied, rolled back or refused. `excluded`:
    /// paths left alone (a path is excluded if it or an ancestor matches).
    pub fn apply(&self, request: &UpdateRequest, excluded: &Filter) -> Report {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let timing = Timing::new();
        let journal = match self.check_and_prepare(request, excluded) {
            Ok(journal) => journal,
            Err(UpdateError::SimulatedCrash) => return self.crashed(request.plan_id),
            Err(e) => {
                let outcome = if e.is_refusal() {
                    Outcome::Refused
                } else {
                    Outcome::Failed
                };
                // Nothing visible changed: leave no staged or saved files behind.
                if !matches!(e, UpdateError::Unfinished { .. }) {
                    let _ = remove_tree(&self.staged_dir(request.plan_id));
                    let _ = remove_tree(&self.saved_dir(request.plan_id));
                }
                let report = Report {
                    plan_id: request.plan_id,
                    image: request.image.clone(),
                    outcome,
                    error: Some(match outcome {
                        Outcome::Failed => format!("{e} (nothing was changed)"),
                        _ => e.to_string(),
                    }),
                    activation: Duration::ZERO,
                    duration: timing.duration(),
                    steps: request.steps.len(),
                    services: Vec::new(),
                    touched: Vec::new(),
                    finished_unix_ms: now_unix_ms(),
                };
                if let Err(e) = self.persist_report(&report) {
                    tracing::warn!("cannot persist the update report: {e}");
                }
                return report;
            }
        };
        self.activate_and_finish(journal, timing, Resume::Fresh)
    }

    /// At start-up: finish or roll back an update a crash interrupted, and say which. Also
    /// removes staged and saved files no journal refers to.
    pub fn recover(&self) -> Option<Report> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let journal = match self.read_journal() {
            Ok(None) => {
                self.clean_leftovers(None);
                return None;
            }
            Ok(Some(journal)) => journal,
            Err(e) => {
                // Without the journal there is no telling what to undo: leave everything for
                // an operator, and refuse further updates (the journal file stays).
                return Some(Report {
                    plan_id: 0,
                    image: String::new(),
                    outcome: Outcome::Failed,
                    error: Some(format!("{e}; it is left in place for an operator")),
                    activation: Duration::ZERO,
                    duration: Duration::ZERO,
                    steps: 0,
                    services: Vec::new(),
                    touched: Vec::new(),
                    finished_unix_ms: now_unix_ms(),
                });
            }
        };
        self.clean_leftovers(Some(journal.plan_id));
        let timing = Timing::recovered(journal.started_unix_ms);
        Some(match journal.phase.clone() {
            Phase::Prepared => self.finish(
                journal,
                timing,
                Outcome::Failed,
                Some("subd stopped before activating the update; nothing was changed".into()),
                false,
            ),
            Phase::Activating => self.activate_and_finish(journal, timing, Resume::Recovering),
            Phase::Rebooting => self.activate_and_finish(journal, timing, Resume::AfterReboot),
            Phase::RollingBack {
                outcome,
                error,
                rebooted,
            } => {
                let progress = Progress::unknown(journal.stop.len(), rebooted);
                self.roll_back(journal, timing, progress, outcome, error)
            }
            Phase::Finished { report } => {
                if let Err(e) = self.persist_report(&report) {
                    tracing::warn!("cannot persist the update report: {e}");
                }
                if let Err(e) = self.clean_up(&journal) {
                    tracing::warn!("cannot clean up after plan {}: {e}", journal.plan_id);
                }
                report
            }
        })
    }

    /// The last finished update's report, persisted in the state dir.
    pub fn last_report(&self) -> Option<Report> {
        let bytes = fs::read(self.state_dir.join(LAST_REPORT_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    // -----------------------------------------------------------------------------------------
    // Paths.

    fn host(&self, path: &str) -> PathBuf {
        match path.strip_prefix('/') {
            Some("") | None => self.root.clone(),
            Some(rest) => self.root.join(rest),
        }
    }

    fn staged_dir(&self, plan_id: u64) -> PathBuf {
        self.staging.join(plan_id.to_string())
    }

    fn saved_dir(&self, plan_id: u64) -> PathBuf {
        self.rollback.join(plan_id.to_string())
    }

    fn staged(&self, plan_id: u64, op: usize) -> PathBuf {
        self.staged_dir(plan_id).join(op.to_string())
    }

    fn saved(&self, plan_id: u64, op: usize) -> PathBuf {
        self.saved_dir(plan_id).join(op.to_string())
    }

    fn journal_path(&self) -> PathBuf {
        self.state_dir.join(JOURNAL_FILE)
    }

    // -----------------------------------------------------------------------------------------
    // Test hook: a simulated SIGKILL before any chosen mutation.

    #[cfg(test)]
    fn crash_after(mut self, mutations: usize) -> Updater {
        self.crash_at = Some(mutations);
        self
    }

    /// Called before every change to the disk or to a service, so that a test can stop the
    /// applier between any two of them as a SIGKILL would.
    fn tick(&self) -> Result<(), UpdateError> {
        match self.crash_at {
            Some(limit) if self.ticks.fetch_add(1, Ordering::SeqCst) >= limit => {
                Err(UpdateError::SimulatedCrash)
            }
            _ => Ok(()),
        }
    }

    fn crashed(&self, plan_id: u64) -> Report {
        Report {
            plan_id,
            image: String::new(),
            outcome: Outcome::Failed,
            error: Some(UpdateError::SimulatedCrash.to_string()),
            activation: Duration::ZERO,
            duration: Duration::ZERO,
            steps: 0,
            services: Vec::new(),
            touched: Vec::new(),
            finished_unix_ms: now_unix_ms(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Journal I/O.

    fn write_journal(&self, journal: &Journal) -> Result<(), UpdateError> {
        self.tick()?;
        let bytes = serde_json::to_vec(journal).map_err(|e| UpdateError::Journal {
            path: self.journal_path(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.journal_path(), &bytes)
    }

    fn read_journal(&self) -> Result<Option<Journal>, UpdateError> {
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let journal: Journal =
            serde_json::from_slice(&bytes).map_err(|e| UpdateError::Journal {
                path: path.clone(),
                detail: format!("unreadable: {e}"),
            })?;
        if journal.version != JOURNAL_VERSION {
            return Err(UpdateError::Journal {
                path,
                detail: format!("version {} is not {JOURNAL_VERSION}", journal.version),
            });
        }
        Ok(Some(journal))
    }

    fn persist_report(&self, report: &Report) -> Result<(), UpdateError> {
        self.tick()?;
        let path = self.state_dir.join(LAST_REPORT_FILE);
        let bytes = serde_json::to_vec_pretty(report).map_err(|e| UpdateError::Journal {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Removes staged and saved trees of every plan but `keep`.
    fn clean_leftovers(&self, keep: Option<u64>) {
        let keep = keep.map(|k| k.to_string());
        for dir in [&self.staging, &self.rollback] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                if path == self.rollback || keep.as_deref() == name.to_str() {
                    continue;
                }
                if let Err(e) = remove_tree(&path) {
                    tracing::warn!("cannot remove leftover {}: {e}", path.display());
                }
            }
        }
        let _ = fs::remove_file(self.journal_path().with_extension("tmp"));
    }

    /// After the report is persisted: the old versions are no longer needed.
    fn clean_up(&self, journal: &Journal) -> Result<(), UpdateError> {
        remove_tree(&self.saved_dir(journal.plan_id))?;
        remove_tree(&self.staged_dir(journal.plan_id))?;
        let path = self.journal_path();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
            _ => {}
        }
        fsync_dir(&self.state_dir)
    }

    // -----------------------------------------------------------------------------------------
    // Check: everything that can refuse the update, before anything is written.

    fn check_and_prepare(
        &self,
        request: &UpdateRequest,
        excluded: &Filter,
    ) -> Result<Journal, UpdateError> {
        if self.journal_path().exists() {
            let plan_id = self.read_journal().ok().flatten().map_or(0, |j| j.plan_id);
            return Err(UpdateError::Unfinished { plan_id });
        }
        let (stop, reload, reboot) = services_of(&request.triggers)?;
        let (ops, stages) = self.check(&request.steps, excluded)?;
        let mut journal = Journal {
            version: JOURNAL_VERSION,
            plan_id: request.plan_id,
            image: request.image.clone(),
            started_unix_ms: now_unix_ms(),
            steps: request.steps.len(),
            phase: Phase::Prepared,
            stop,
            reload,
            reboot,
            ops,
        };
        self.prepare(&mut journal, &stages)?;
        Ok(journal)
    }

    fn check(
        &self,
        steps: &[Step],
        excluded: &Filter,
    ) -> Result<(Vec<Op>, Vec<Option<Stage>>), UpdateError> {
        let conflict = |path: &str, reason: String| UpdateError::Conflict {
            path: path.to_owned(),
            reason,
        };
        let mut by_path: HashMap<&str, usize> = HashMap::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let path = step.path();
            check_syntax(path)?;
            if by_path.insert(path, i).is_some() {
                return Err(conflict(path, "appears twice in the plan".into()));
            }
            if let Some(matched) = excluded_by(path, excluded) {
                return Err(UpdateError::Excluded {
                    path: path.to_owned(),
                    matched: matched.to_owned(),
                });
            }
            self.not_ours(path)?;
            match step {
                Step::Write(e) if path == "/" && e.kind != Kind::Directory => {
                    return Err(conflict(path, "the root must stay a directory".into()));
                }
                Step::Write(e) => match e.kind {
                    Kind::File if !self.objects.contains(&e.hash) => {
                        return Err(UpdateError::ObjectMissing {
                            path: path.to_owned(),
                            hash: to_hex(&e.hash),
                        });
                    }
                    Kind::HardLink => {
                        check_syntax(&e.link_target)?;
                        self.not_ours(&e.link_target)?;
                        if e.link_target == path || e.link_target == "/" {
                            return Err(conflict(
                                path,
                                format!("cannot be a hard link to {:?}", e.link_target),
                            ));
                        }
                    }
                    Kind::Symlink if e.link_target.is_empty() || e.link_target.contains('\0') => {
                        return Err(conflict(path, "symlink target is empty or has NUL".into()));
                    }
                    _ => {}
                },
                Step::Metadata(e) if !matches!(e.kind, Kind::File | Kind::Directory) => {
                    return Err(conflict(
                        path,
                        "a metadata step must name a file or a directory".into(),
                    ));
                }
                Step::Delete(_) if path == "/" => {
                    return Err(UpdateError::BadPath {
                        path: path.to_owned(),
                        reason: "the root cannot be deleted",
                    });
                }
                _ => {}
            }
        }

        let mut disk = Disk {
            updater: self,
            seen: HashMap::new(),
        };
        // What earlier steps leave at a path (None: removed).
        let mut planned: HashMap<&str, Option<NodeKind>> = HashMap::new();
        // Directories the plan creates: they start empty, whatever the disk holds there now.
        let mut fresh: HashSet<&str> = HashSet::new();
        let mut removed: HashSet<&str> = HashSet::new();
        let mut ops = Vec::with_capacity(steps.len());
        let mut stages = Vec::with_capacity(steps.len());
        for step in steps {
            let path = step.path();
            self.check_parents(path, &planned, &fresh, &mut disk)?;
            let parent = parent(path);
            let parent_fresh = parent.is_some_and(|p| fresh.contains(p));
            let current = if parent_fresh { None } else { disk.get(path)? };
            if let (Some(p), false) = (parent, parent_fresh) {
                if let Some(node) = disk.get(p)? {
                    self.same_fs(path, &node)?;
                }
            }
            let (action, stage) = match step {
                Step::Delete(_) => match current {
                    None => (Action::Nothing, None),
                    Some(node) => {
                        self.same_fs(path, &node)?;
                        if node.kind == NodeKind::Dir {
                            self.check_empty(path, &removed)?;
                        }
                        removed.insert(path);
                        planned.insert(path, None);
                        (Action::Remove { old: node.old() }, None)
                    }
                },
                Step::Metadata(e) => {
                    let want = if e.kind == Kind::File {
                        NodeKind::File
                    } else {
                        NodeKind::Dir
                    };
                    match current {
                        Some(node) if node.kind == want => {
                            planned.insert(path, Some(want));
                            let action = Action::SetMeta {
                                old: node.old(),
                                mode: e.mode & 0o7777,
                                uid: e.uid,
                                gid: e.gid,
                            };
                            (action, None)
                        }
                        other => {
                            return Err(conflict(
                                path,
                                format!(
                                    "a metadata step expects {} but the disk has {}",
                                    if want == NodeKind::File {
                                        "a regular file"
                                    } else {
                                        "a directory"
                                    },
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                Step::Write(e) => match current {
                    // A directory stays the same inode, keeping whatever it holds.
                    Some(node) if node.kind == NodeKind::Dir && e.kind == Kind::Directory => {
                        planned.insert(path, Some(NodeKind::Dir));
                        let action = Action::SetMeta {
                            old: node.old(),
                            mode: e.mode & 0o7777,
                            uid: e.uid,
                            gid: e.gid,
                        };
                        (action, None)
                    }
                    _ => {
                        if let Some(node) = current {
                            self.same_fs(path, &node)?;
                            if node.kind == NodeKind::Dir {
                                self.check_empty(path, &removed)?;
                            }
                        }
                        let (stage, kind) = match e.kind {
                            Kind::File => (
                                Stage::File {
                                    hash: e.hash,
                                    size: e.size,
                                    mode: e.mode & 0o7777,
                                    uid: e.uid,
                                    gid: e.gid,
                                },
                                NodeKind::File,
                            ),
                            Kind::Symlink => (
                                Stage::Symlink {
                                    target: e.link_target.clone(),
                                    uid: e.uid,
                                    gid: e.gid,
                                },
                                NodeKind::Symlink,
                            ),
                            Kind::Directory => (
                                Stage::Dir {
                                    mode: e.mode & 0o7777,
                                    uid: e.uid,
                                    gid: e.gid,
                                },
                                NodeKind::Dir,
                            ),
                            Kind::HardLink => (
                                self.link_source(path, &e.link_target, steps, &by_path, &mut disk)?,
                                NodeKind::File,
                            ),
                        };
                        if kind == NodeKind::Dir {
                            fresh.insert(path);
                        }
                        planned.insert(path, Some(kind));
                        let action = Action::Place {
                            new_ino: 0,
                            new_dir: kind == NodeKind::Dir,
                            old: current.map(|n| n.old()),
                        };
                        (action, Some(stage))
                    }
                },
            };
            ops.push(Op {
                path: path.to_owned(),
                action,
            });
            stages.push(stage);
        }
        Ok((ops, stages))
    }

    /// subd's own files are never managed, even if an image lists them.
    fn not_ours(&self, path: &str) -> Result<(), UpdateError> {
        let host = self.host(path);
        if path != "/" && (host.starts_with(&self.state_dir) || host.starts_with(&self.staging)) {
            return Err(UpdateError::Conflict {
                path: path.to_owned(),
                reason: "lies in subd's own state or staging directory".into(),
            });
        }
        Ok(())
    }

    /// Every ancestor is a real directory when the step runs: on disk and not a symlink, or
    /// made one by an earlier step.
    fn check_parents(
        &self,
        path: &str,
        planned: &HashMap<&str, Option<NodeKind>>,
        fresh: &HashSet<&str>,
        disk: &mut Disk<'_>,
    ) -> Result<(), UpdateError> {
        let bad = |parent: &str, reason| UpdateError::BadParent {
            path: path.to_owned(),
            parent: parent.to_owned(),
            reason,
        };
        let mut above_fresh = false;
        for ancestor in ancestors(path) {
            match planned.get(ancestor) {
                Some(Some(NodeKind::Dir)) => {}
                Some(Some(_)) => {
                    return Err(bad(
                        ancestor,
                        "is not a directory after the steps before it",
                    ))
                }
                Some(None) => return Err(bad(ancestor, "is deleted by an earlier step")),
                // Inside a directory the plan creates, only what the plan creates exists: what
                // the disk shows there now is the replaced node's, possibly through a symlink.
                None if above_fresh => {
                    return Err(bad(
                        ancestor,
                        "does not exist and no earlier step creates it",
                    ))
                }
                None => match disk.get(ancestor)? {
                    Some(node) if node.kind == NodeKind::Dir => {}
                    Some(node) if node.kind == NodeKind::Symlink => {
                        return Err(UpdateError::ThroughSymlink {
                            path: path.to_owned(),
                            through: ancestor.to_owned(),
                        })
                    }
                    Some(_) => return Err(bad(ancestor, "is not a directory")),
                    None => {
                        return Err(bad(
                            ancestor,
                            "does not exist and no earlier step creates it",
                        ))
                    }
                },
            }
            above_fresh = fresh.contains(ancestor);
        }
        Ok(())
    }

    fn same_fs(&self, path: &str, node: &Node) -> Result<(), UpdateError> {
        if node.dev != self.dev {
            return Err(UpdateError::Conflict {
                path: path.to_owned(),
                reason: format!(
                    "is on another file system than the root and subd's staging directory {} (rename(2) cannot reach it)",
                    self.staging.display()
                ),
            });
        }
        Ok(())
    }

    /// A directory can only be replaced or removed once the plan has removed all it holds:
    /// anything else in it is not the plan's to destroy.
    fn check_empty(&self, path: &str, removed: &HashSet<&str>) -> Result<(), UpdateError> {
        let host = self.host(path);
        for entry in fs::read_dir(&host).map_err(io_err(&host))? {
            let entry = entry.map_err(io_err(&host))?;
            let name = entry.file_name();
            let child = match name.to_str() {
                Some(name) => format!("{path}/{name}"),
                None => {
                    return Err(UpdateError::Conflict {
                        path: path.to_owned(),
                        reason: "is a directory holding a name that is not UTF-8".into(),
                    })
                }
            };
            if !removed.contains(child.as_str()) {
                return Err(UpdateError::Conflict {
                    path: path.to_owned(),
                    reason: format!(
                        "is a directory to replace or delete, but it holds {child:?}, which the plan does not remove"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The inode a hard link names: the one staged for its target, or the file on disk.
    fn link_source(
        &self,
        path: &str,
        target: &str,
        steps: &[Step],
        by_path: &HashMap<&str, usize>,
        disk: &mut Disk<'_>,
    ) -> Result<Stage, UpdateError> {
        let not_a_file = |what: &str| UpdateError::Conflict {
            path: path.to_owned(),
            reason: format!("is a hard link to {target:?}, which {what}"),
        };
        match by_path.get(target).map(|&k| (k, &steps[k])) {
            Some((k, Step::Write(t))) if t.kind == Kind::File => return Ok(Stage::LinkStaged(k)),
            Some((_, Step::Metadata(t))) if t.kind == Kind::File => {}
            Some(_) => return Err(not_a_file("is not a regular file after the update")),
            None => {}
        }
        for ancestor in ancestors(target) {
            match disk.get(ancestor)? {
                Some(node) if node.kind == NodeKind::Dir => {}
                Some(node) if node.kind == NodeKind::Symlink => {
                    return Err(UpdateError::ThroughSymlink {
                        path: target.to_owned(),
                        through: ancestor.to_owned(),
                    })
                }
                _ => return Err(not_a_file("does not exist")),
            }
        }
        match disk.get(target)? {
            Some(node) if node.kind == NodeKind::File => {
                self.same_fs(target, &node)?;
                Ok(Stage::LinkDisk(target.to_owned()))
            }
            other => Err(not_a_file(&format!(
                "the plan does not write and the disk has as {}",
                describe(other)
            ))),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Prepare: nothing visible changes.

    fn prepare(&self, journal: &mut Journal, stages: &[Option<Stage>]) -> Result<(), UpdateError> {
        let plan_id = journal.plan_id;
        let (staged_dir, saved_dir) = (self.staged_dir(plan_id), self.saved_dir(plan_id));
        for dir in [&staged_dir, &saved_dir] {
            remove_tree(dir)?;
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        // Copying and hashing dominate for large images: spread the files over the cores.
        let files: Vec<(usize, &Stage)> = stages
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Some(s @ Stage::File { .. }) => Some((i, s)),
                _ => None,
            })
            .collect();
        let mut inodes: Vec<(usize, u64)> = files
            .par_iter()
            .map(|&(i, stage)| {
                let path = &journal.ops[i].path;
                self.stage(plan_id, i, path, stage).map(|ino| (i, ino))
            })
            .collect::<Result<_, _>>()?;
        // Then the rest, in order: links need their staged target to exist.
        for (i, stage) in stages.iter().enumerate() {
            if let Some(stage) = stage.as_ref().filter(|s| !matches!(s, Stage::File { .. })) {
                let ino = self.stage(plan_id, i, &journal.ops[i].path, stage)?;
                inodes.push((i, ino));
            }
        }
        for (i, ino) in inodes {
            if let Action::Place { new_ino, .. } = &mut journal.ops[i].action {
                *new_ino = ino;
            }
        }
        for (i, op) in journal.ops.iter().enumerate() {
            if let Action::Place { old: Some(old), .. } = &op.action {
                if !old.dir {
                    let (target, saved) = (self.host(&op.path), self.saved(plan_id, i));
                    fs::hard_link(&target, &saved).map_err(io_err(&saved))?;
                    // The recorded old metadata must be this inode's, or rollback would
                    // restore something nobody saw.
                    if lstat(&saved)?.map(|n| n.ino) != Some(old.ino) {
                        return Err(UpdateError::Changed {
                            path: op.path.clone(),
                            detail: "replaced while the update was being checked".into(),
                        });
                    }
                }
            }
        }
        // One syncfs makes every staged inode and saved link durable at the cost of one flush,
        // where an fsync per file would wait for a journal commit each: the journal written
        // next must never name data that a power cut could lose.
        syncfs(&staged_dir)?;
        self.write_journal(journal)
    }

    /// Builds one new inode in the staging directory, its final metadata set; returns its
    /// inode number.
    fn stage(
        &self,
        plan_id: u64,
        op: usize,
        path: &str,
        stage: &Stage,
    ) -> Result<u64, UpdateError> {
        let dst = self.staged(plan_id, op);
        match stage {
            Stage::File {
                hash,
                size,
                mode,
                uid,
                gid,
            } => self.stage_file(path, &dst, hash, *size, *mode, *uid, *gid),
            Stage::Symlink { target, uid, gid } => {
                std::os::unix::fs::symlink(target, &dst).map_err(io_err(&dst))?;
                std::os::unix::fs::lchown(&dst, Some(*uid), Some(*gid)).map_err(io_err(&dst))?;
                Ok(fs::symlink_metadata(&dst).map_err(io_err(&dst))?.ino())
            }
            Stage::Dir { mode, uid, gid } => {
                fs::create_dir(&dst).map_err(io_err(&dst))?;
                set_meta(&dst, *mode, *uid, *gid)?;
                Ok(fs::symlink_metadata(&dst).map_err(io_err(&dst))?.ino())
            }
            Stage::LinkStaged(k) => {
                let src = self.staged(plan_id, *k);
                fs::hard_link(&src, &dst).map_err(io_err(&dst))?;
                Ok(fs::symlink_metadata(&dst).map_err(io_err(&dst))?.ino())
            }
            Stage::LinkDisk(target) => {
                // link(2) does not follow a final symlink, and the check saw no symlink above.
                let src = self.host(target);
                fs::hard_link(&src, &dst).map_err(io_err(&dst))?;
                let meta = fs::symlink_metadata(&dst).map_err(io_err(&dst))?;
                if !meta.file_type().is_file() {
                    return Err(UpdateError::Changed {
                        path: target.clone(),
                        detail: "is no longer a regular file".into(),
                    });
                }
                Ok(meta.ino())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stage_file(
        &self,
        path: &str,
        dst: &Path,
        hash: &Hash,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<u64, UpdateError> {
        let src = self.objects.path(hash);
        let mut input = File::open(&src).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => UpdateError::ObjectMissing {
                path: path.to_owned(),
                hash: to_hex(hash),
            },
            _ => io_err(&src)(e),
        })?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(io_err(dst))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut copied = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io_err(&src))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(dst))?;
            copied += n as u64;
        }
        let got = *hasher.finalize().as_bytes();
        if got != *hash || copied != size {
            return Err(UpdateError::ObjectCorrupt {
                path: path.to_owned(),
                hash: to_hex(hash),
                detail: format!(
                    "{copied} bytes hashing to {} (expected {size} bytes)",
                    to_hex(&got)
                ),
            });
        }
        std::os::unix::fs::fchown(&out, Some(uid), Some(gid)).map_err(io_err(dst))?;
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err(dst))?;
        Ok(out.metadata().map_err(io_err(dst))?.ino())
    }

    // -----------------------------------------------------------------------------------------
    // Activate.

    fn activate_and_finish(
        &self,
        mut journal: Journal,
        mut timing: Timing,
        resume: Resume,
    ) -> Report {
        let mut progress = match resume {
            Resume::Fresh => Progress::default(),
            // The crashed run may have stopped any of them.
            Resume::Recovering => Progress {
                stopped: journal.stop.len(),
                ..Progress::default()
            },
            Resume::AfterReboot => Progress::unknown(journal.stop.len(), true),
        };
        let result = match resume {
            Resume::AfterReboot => Ok(()),
            _ => self.forward(&mut journal, &mut timing, &mut progress),
        }
        .and_then(|()| self.health_check());
        match result {
            Ok(()) => {
                let note = (journal.reboot && self.services.reboot_cmd.is_none()).then(|| {
                    "a reboot trigger fired but subd has no reboot command: the machine needs a reboot"
                        .to_owned()
                });
                self.finish(journal, timing, Outcome::Applied, note, false)
            }
            Err(UpdateError::SimulatedCrash) => self.crashed(journal.plan_id),
            Err(e) => {
                let outcome = match e {
                    UpdateError::Health { .. } => Outcome::RolledBack,
                    _ => Outcome::Failed,
                };
                self.roll_back(journal, timing, progress, outcome, e.to_string())
            }
        }
    }

    fn forward(
        &self,
        journal: &mut Journal,
        timing: &mut Timing,
        progress: &mut Progress,
    ) -> Result<(), UpdateError> {
        journal.phase = Phase::Activating;
        self.write_journal(journal)?;
        timing.window_start = Some(Instant::now());
        for (i, service) in journal.stop.iter().enumerate() {
            progress.stopped = progress.stopped.max(i + 1);
            self.tick()?;
            self.service(service, "stop")?;
        }
        let pause = std::env::var(PAUSE_AFTER_STEPS_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        let pause_here = |applied: usize| {
            if pause == Some(applied) {
                tracing::warn!("{PAUSE_AFTER_STEPS_ENV}={applied}: test hook, sleeping 30 s");
                std::thread::sleep(Duration::from_secs(30));
            }
        };
        pause_here(0);
        for (i, op) in journal.ops.iter().enumerate() {
            self.forward_op(journal.plan_id, i, op)?;
            pause_here(i + 1);
        }
        self.sync_dirs(journal)?;
        progress.started = true;
        for service in journal.stop.iter().rev() {
            self.tick()?;
            self.service(service, "start")?;
        }
        timing.window_end = Some(Instant::now());
        for service in &journal.reload {
            self.tick()?;
            self.service(service, "reload")?;
        }
        if journal.reboot {
            if let Some(cmd) = &self.services.reboot_cmd {
                journal.phase = Phase::Rebooting;
                self.write_journal(journal)?;
                self.tick()?;
                self.shell(cmd)?;
                progress.rebooted = true;
            }
        }
        Ok(())
    }

    fn forward_op(&self, plan_id: u64, i: usize, op: &Op) -> Result<(), UpdateError> {
        let target = self.host(&op.path);
        let changed = |detail: &str| UpdateError::Changed {
            path: op.path.clone(),
            detail: detail.to_owned(),
        };
        match &op.action {
            Action::Nothing => Ok(()),
            Action::SetMeta {
                old,
                mode,
                uid,
                gid,
            } => match lstat(&target)? {
                Some(node) if node.ino == old.ino => {
                    self.tick()?;
                    set_meta(&target, *mode, *uid, *gid)
                }
                _ => Err(changed(
                    "it is no longer the inode the update was prepared for",
                )),
            },
            Action::Remove { old } => match lstat(&target)? {
                None => Ok(()),
                Some(node) if node.ino == old.ino => {
                    self.tick()?;
                    rename(&target, &self.saved(plan_id, i))
                }
                Some(_) => Err(changed(
                    "it is no longer the inode the update was prepared for",
                )),
            },
            Action::Place {
                new_ino,
                new_dir,
                old,
            } => {
                let current = lstat(&target)?;
                if current.is_some_and(|n| n.ino == *new_ino) {
                    return Ok(());
                }
                match (current, old) {
                    (None, _) => {}
                    (Some(node), Some(old)) if node.ino == old.ino => {
                        if old.dir {
                            // rename(2) cannot put a file over a directory: move the (empty)
                            // directory aside first.
                            self.tick()?;
                            rename(&target, &self.saved(plan_id, i))?;
                        } else if *new_dir {
                            // Nor a directory over a file; the old inode is safe under
                            // rollback/ already.
                            self.tick()?;
                            fs::remove_file(&target).map_err(io_err(&target))?;
                        }
                    }
                    (Some(_), _) => {
                        return Err(changed(
                            "something else appeared there after the update was prepared",
                        ))
                    }
                }
                self.tick()?;
                rename(&self.staged(plan_id, i), &target)
            }
        }
    }

    /// Makes the renames durable: the directories are what changed.
    fn sync_dirs(&self, journal: &Journal) -> Result<(), UpdateError> {
        let mut dirs: Vec<&str> = journal
            .ops
            .iter()
            .filter(|op| !matches!(op.action, Action::Nothing | Action::SetMeta { .. }))
            .filter_map(|op| parent(&op.path))
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        for dir in dirs {
            fsync_dir(&self.host(dir))?;
        }
        fsync_dir(&self.saved_dir(journal.plan_id))?;
        fsync_dir(&self.staged_dir(journal.plan_id))
    }

    fn health_check(&self) -> Result<(), UpdateError> {
        let Some(cmd) = &self.services.health_cmd else {
            return Ok(());
        };
        self.tick()?;
        self.shell(cmd).map_err(|e| match e {
            UpdateError::CommandFailed { detail, .. } => UpdateError::Health {
                command: cmd.clone(),
                detail,
            },
            other => other,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Roll back.

    fn roll_back(
        &self,
        mut journal: Journal,
        mut timing: Timing,
        progress: Progress,
        outcome: Outcome,
        error: String,
    ) -> Report {
        journal.phase = Phase::RollingBack {
            outcome,
            error: error.clone(),
            rebooted: progress.rebooted,
        };
        let mut error = error;
        match self.write_journal(&journal) {
            Err(UpdateError::SimulatedCrash) => return self.crashed(journal.plan_id),
            // Undoing now is still better than leaving the update half done.
            Err(e) => error.push_str(&format!("; cannot record the rollback: {e}")),
            Ok(()) => {}
        }
        if timing.window_start.is_none() {
            timing.window_start = Some(Instant::now());
        }
        match self.restore(&journal, progress) {
            Ok(notes) => {
                timing.window_end = Some(Instant::now());
                for note in notes {
                    error.push_str("; during rollback: ");
                    error.push_str(&note);
                }
                self.finish(journal, timing, outcome, Some(error), progress.rebooted)
            }
            Err(UpdateError::SimulatedCrash) => self.crashed(journal.plan_id),
            Err(e) => {
                // The journal and the saved old versions stay: recover() at the next start
                // retries, and no other update is accepted meanwhile.
                timing.window_end = Some(Instant::now());
                let report = self.report(
                    &journal,
                    &timing,
                    Outcome::Failed,
                    Some(format!(
                        "{error}; rollback incomplete ({e}): retried when subd restarts"
                    )),
                );
                if let Err(e) = self.persist_report(&report) {
                    tracing::warn!("cannot persist the update report: {e}");
                }
                report
            }
        }
    }

    /// Puts every touched path back; service failures are noted, not fatal, since the files
    /// matter more than a service that will not come back.
    fn restore(&self, journal: &Journal, progress: Progress) -> Result<Vec<String>, UpdateError> {
        let mut notes = Vec::new();
        if progress.started {
            // They run on the new files: stop them before the old files come back.
            for service in &journal.stop {
                self.tick()?;
                if let Err(e) = self.service(service, "stop") {
                    notes.push(e.to_string());
                }
            }
        }
        for (i, op) in journal.ops.iter().enumerate().rev() {
            self.backward_op(journal.plan_id, i, op)?;
        }
        self.sync_dirs(journal)?;
        let stopped = if progress.started {
            journal.stop.len()
        } else {
            progress.stopped.min(journal.stop.len())
        };
        for service in journal.stop[..stopped].iter().rev() {
            self.tick()?;
            if let Err(e) = self.service(service, "start") {
                notes.push(e.to_string());
            }
        }
        if progress.started {
            for service in &journal.reload {
                self.tick()?;
                if let Err(e) = self.service(service, "reload") {
                    notes.push(e.to_string());
                }
            }
        }
        Ok(notes)
    }

    fn backward_op(&self, plan_id: u64, i: usize, op: &Op) -> Result<(), UpdateError> {
        let target = self.host(&op.path);
        let saved = self.saved(plan_id, i);
        match &op.action {
            Action::Nothing => Ok(()),
            Action::SetMeta { old, .. } => match lstat(&target)? {
                Some(node) if node.ino == old.ino => {
                    self.tick()?;
                    set_meta(&target, old.mode, old.uid, old.gid)
                }
                _ => Ok(()),
            },
            Action::Remove { .. } => match lstat(&target)? {
                None if lstat(&saved)?.is_some() => {
                    self.tick()?;
                    rename(&saved, &target)
                }
                _ => Ok(()),
            },
            Action::Place {
                new_ino,
                new_dir,
                old,
            } => {
                match lstat(&target)? {
                    Some(node) if node.ino == *new_ino => {
                        if old.is_some_and(|o| !o.dir) && !new_dir {
                            // The mirror of the forward rename: the name never dangles.
                            self.tick()?;
                            return rename(&saved, &target);
                        }
                        self.tick()?;
                        if *new_dir {
                            fs::remove_dir(&target).map_err(io_err(&target))?;
                        } else {
                            fs::remove_file(&target).map_err(io_err(&target))?;
                        }
                    }
                    // The old version, never replaced, or not ours to touch.
                    Some(_) => return Ok(()),
                    None => {}
                }
                if old.is_some() && lstat(&saved)?.is_some() {
                    self.tick()?;
                    rename(&saved, &target)?;
                }
                Ok(())
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Finish.

    fn report(
        &self,
        journal: &Journal,
        timing: &Timing,
        outcome: Outcome,
        error: Option<String>,
    ) -> Report {
        Report {
            plan_id: journal.plan_id,
            image: journal.image.clone(),
            outcome,
            error,
            activation: timing.activation(),
            duration: timing.duration(),
            steps: journal.steps,
            services: journal
                .stop
                .iter()
                .chain(&journal.reload)
                .cloned()
                .collect(),
            touched: journal.ops.iter().map(|op| op.path.clone()).collect(),
            finished_unix_ms: now_unix_ms(),
        }
    }

    fn finish(
        &self,
        mut journal: Journal,
        timing: Timing,
        outcome: Outcome,
        error: Option<String>,
        reboot_after: bool,
    ) -> Report {
        let report = self.report(&journal, &timing, outcome, error);
        journal.phase = Phase::Finished {
            report: report.clone(),
        };
        let persisted = self
            .write_journal(&journal)
            .and_then(|()| self.persist_report(&report));
        match persisted {
            Err(UpdateError::SimulatedCrash) => return self.crashed(journal.plan_id),
            Err(e) => {
                // Keep the old versions: without a durable report, recover() must find them.
                tracing::warn!("cannot persist the report of plan {}: {e}", journal.plan_id);
                return report;
            }
            Ok(()) => {}
        }
        if let Err(e) = self.tick().and_then(|()| self.clean_up(&journal)) {
            if matches!(e, UpdateError::SimulatedCrash) {
                return self.crashed(journal.plan_id);
            }
            tracing::warn!("cannot clean up after plan {}: {e}", journal.plan_id);
        }
        if reboot_after {
            // The rollback restored files that only a reboot puts back into use.
            if let Some(cmd) = &self.services.reboot_cmd {
                if let Err(e) = self.shell(cmd) {
                    tracing::warn!("reboot after rollback: {e}");
                }
            }
        }
        report
    }

    // -----------------------------------------------------------------------------------------
    // Commands.

    fn service(&self, service: &str, action: &str) -> Result<(), UpdateError> {
        let Some((program, args)) = self.service_argv.split_first() else {
            return Err(UpdateError::Config("the service command is empty".into()));
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        if Path::new(program).file_name().and_then(|n| n.to_str()) == Some("systemctl") {
            cmd.arg(action).arg(service);
        } else {
            cmd.arg(service).arg(action);
        }
        let shown = format!("{} {service} {action}", self.services.service_cmd);
        self.run(cmd, &shown)
    }

    fn shell(&self, script: &str) -> Result<(), UpdateError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        self.run(cmd, script)
    }

    /// Output goes to a file, not a pipe: a service script that leaves a daemon holding its
    /// stdout open would otherwise block us until the daemon exits.
    fn run(&self, mut cmd: Command, shown: &str) -> Result<(), UpdateError> {
        let out_path = self.state_dir.join(COMMAND_OUTPUT_FILE);
        let out = File::create(&out_path).map_err(io_err(&out_path))?;
        let err = out.try_clone().map_err(io_err(&out_path))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let failed = |detail: String| UpdateError::CommandFailed {
            command: shown.to_owned(),
            detail,
        };
        let status = cmd
            .status()
            .map_err(|e| failed(format!("cannot run it: {e}")))?;
        if status.success() {
            return Ok(());
        }
        let output = fs::read(&out_path).unwrap_or_default();
        let tail = String::from_utf8_lossy(&output[output.len().saturating_sub(500)..])
            .trim()
            .to_owned();
        Err(failed(if tail.is_empty() {
            status.to_string()
        } else {
            format!("{status}: {tail}")
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dom_storage::image::Entry;

    use super::*;

    fn ids() -> (u32, u32) {
        // SAFETY: plain getters with no arguments.
        unsafe { (libc::geteuid(), libc::getegid()) }
    }

    /// Someone else when we are root (so chown is exercised), ourselves otherwise.
    fn other_owner() -> (u32, u32) {
        if ids().0 == 0 {
            (1234, 2345)
        } else {
            ids()
        }
    }

    /// A root, a state dir with an object cache, a service script, a place outside the root.
    struct Fx {
        dir: tempfile::TempDir,
        root: PathBuf,
        state: PathBuf,
        log: PathBuf,
        script: PathBuf,
        outside: PathBuf,
    }

    impl Fx {
        fn new() -> Fx {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path();
            let (root, state, outside) =
                (base.join("root"), base.join("state"), base.join("outside"));
            for d in [&root, &state, &outside] {
                fs::create_dir_all(d).unwrap();
            }
            fs::write(outside.join("secret"), b"outside the root").unwrap();
            let log = base.join("services.log");
            let script = base.join("svc");
            // Logs "SERVICE ACTION <app.conf at that moment>"; fails on the action named in
            // the file `fail`, if any.
            fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"$1 $2 $(cat '{root}/etc/app.conf' 2>/dev/null)\" >> '{log}'\n\
                     if [ -e '{fail}' ] && [ \"$1 $2\" = \"$(cat '{fail}')\" ]; then echo \"cannot $2 $1\" >&2; exit 1; fi\n",
                    root = root.display(),
                    log = log.display(),
                    fail = base.join("fail").display()
                ),
            )
            .unwrap();
            fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
            Fx {
                dir,
                root,
                state,
                log,
                script,
                outside,
            }
        }

        fn services(&self) -> Services {
            Services {
                service_cmd: self.script.display().to_string(),
                health_cmd: None,
                reboot_cmd: None,
            }
        }

        fn updater(&self, services: Services) -> Updater {
            Updater::new(&self.root, &self.state, services).unwrap()
        }

        fn fail_on(&self, service_action: &str) {
            fs::write(self.dir.path().join("fail"), service_action).unwrap();
        }

        fn object(&self, content: &[u8]) -> Hash {
            let hash = *blake3::hash(content).as_bytes();
            let store = ObjectStore::open(&self.state.join("objects")).unwrap();
            let path = store.path(&hash);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
            hash
        }

        fn file(&self, path: &str, content: &[u8], mode: u32) -> Entry {
            let (uid, gid) = ids();
            Entry::file(
                path,
                mode,
                uid,
                gid,
                content.len() as u64,
                self.object(content),
            )
        }

        fn host(&self, path: &str) -> PathBuf {
            self.root.join(path.trim_start_matches('/'))
        }

        fn put_file(&self, path: &str, content: &[u8], mode: u32) {
            fs::write(self.host(path), content).unwrap();
            fs::set_permissions(self.host(path), fs::Permissions::from_mode(mode)).unwrap();
        }

        fn put_dir(&self, path: &str) {
            fs::create_dir(self.host(path)).unwrap();
            fs::set_permissions(self.host(path), fs::Permissions::from_mode(0o755)).unwrap();
        }

        fn put_symlink(&self, path: &str, target: &str) {
            std::os::unix::fs::symlink(target, self.host(path)).unwrap();
        }

        fn ino(&self, path: &str) -> u64 {
            fs::symlink_metadata(self.host(path)).unwrap().ino()
        }

        fn log(&self) -> Vec<String> {
            fs::read_to_string(&self.log)
                .unwrap_or_default()
                .lines()
                .map(|l| l.trim().to_owned())
                .collect()
        }

        /// Every path under the root: kind, content or link target, and with `meta` mode and
        /// owner. The temporary directory's name is replaced so fixtures compare equal.
        fn snapshot(&self, meta: bool) -> BTreeMap<String, String> {
            let mut out = BTreeMap::new();
            self.walk(&self.root, meta, &mut out);
            out
        }

        fn walk(&self, dir: &Path, meta: bool, out: &mut BTreeMap<String, String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = format!("/{}", path.strip_prefix(&self.root).unwrap().display());
                if rel == "/.subd-staging" {
                    continue;
                }
                let m = fs::symlink_metadata(&path).unwrap();
                let owner = if meta {
                    format!(" {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
                } else {
                    String::new()
                };
                let value = if m.is_dir() {
                    self.walk(&path, meta, out);
                    format!("dir{owner}")
                } else if m.file_type().is_symlink() {
                    let target = fs::read_link(&path).unwrap().display().to_string();
                    let target = target.replace(&self.dir.path().display().to_string(), "$TMP");
                    format!("symlink -> {target}")
                } else {
                    let content = String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned();
                    format!("file{owner} {content:?}")
                };
                out.insert(rel, value);
            }
        }

        /// No journal, no staged or saved files left.
        fn assert_clean(&self) {
            assert!(
                !self.state.join(JOURNAL_FILE).exists(),
                "journal left behind"
            );
            for dir in ["staging", "rollback"] {
                let left: Vec<_> = fs::read_dir(self.state.join(dir)).unwrap().collect();
                assert!(left.is_empty(), "{dir} not empty: {left:?}");
            }
        }
    }

    fn request(plan_id: u64, steps: Vec<Step>, triggers: Vec<Trigger>) -> UpdateRequest {
        UpdateRequest {
            plan_id,
            image: "img/1".into(),
            steps,
            triggers,
        }
    }

    fn trigger(service: &str, line: &str, reload: bool) -> Trigger {
        Trigger {
            match_lines: vec![line.into()],
            service: service.into(),
            do_reload: reload,
            do_reboot: false,
            high_impact: false,
        }
    }

    fn dir(path: &str, mode: u32) -> Entry {
        let (uid, gid) = ids();
        Entry::directory(path, mode, uid, gid)
    }

    fn symlink(path: &str, target: &str) -> Entry {
        let (uid, gid) = ids();
        Entry::symlink(path, uid, gid, target)
    }

    /// A machine with a bit of everything the plan below changes.
    fn before(fx: &Fx) {
        fx.put_dir("/etc");
        fx.put_file("/etc/app.conf", b"old", 0o644);
        fx.put_file("/etc/motd", b"motd", 0o644);
        fx.put_symlink("/etc/link", "a");
        fs::hard_link(fx.host("/etc/motd"), fx.host("/etc/hard")).unwrap();
        fx.put_file("/etc/conf.d", b"was a file", 0o644);
        // A symlink out of the root, replaced by a directory: nothing may go through it.
        fx.put_symlink("/etc/sym2dir", &fx.outside.display().to_string());
        fx.put_dir("/opt");
        fx.put_dir("/opt/stray");
        fx.put_file("/opt/stray/f", b"stray", 0o600);
        fx.put_dir("/srv");
        fx.put_file("/srv/old", b"old srv", 0o644);
        fx.put_dir("/var");
        fx.put_file("/var/keep", b"untouched", 0o644);
    }

    /// Deletes deepest first, then writes in tree order, as the planner emits them.
    fn plan(fx: &Fx) -> Vec<Step> {
        let (uid, gid) = other_owner();
        let mut motd = fx.file("/etc/motd", b"motd", 0o600);
        (motd.uid, motd.gid) = (uid, gid);
        let mut tool = fx.file("/usr/bin/tool", b"#!tool", 0o4755);
        (tool.uid, tool.gid) = (uid, gid);
        vec![
            Step::Delete("/srv/old".into()),
            Step::Delete("/opt/stray/f".into()),
            Step::Delete("/opt/stray".into()),
            Step::Delete("/gone".into()),
            Step::Write(dir("/etc", 0o750)),
            Step::Write(fx.file("/etc/app.conf", b"new", 0o600)),
            Step::Write(dir("/etc/conf.d", 0o755)),
            Step::Write(fx.file("/etc/conf.d/a", b"a", 0o644)),
            Step::Write(Entry::hard_link("/etc/hard", "/etc/app.conf")),
            Step::Write(symlink("/etc/link", "b")),
            Step::Metadata(motd),
            Step::Write(dir("/etc/sym2dir", 0o700)),
            Step::Write(fx.file("/etc/sym2dir/f", b"inside", 0o644)),
            Step::Write(fx.file("/srv", b"srv is a file now", 0o644)),
            Step::Write(dir("/usr", 0o755)),
            Step::Write(dir("/usr/bin", 0o755)),
            Step::Write(tool),
        ]
    }

    fn triggers() -> Vec<Trigger> {
        vec![
            trigger("app", "/etc/app\\.conf", false),
            trigger("ssh", "/etc/link", true),
        ]
    }

    #[test]
    fn an_empty_root_becomes_the_image() {
        let fx = Fx::new();
        let (uid, gid) = other_owner();
        let mut conf = fx.file("/etc/app.conf", b"v1", 0o640);
        (conf.uid, conf.gid) = (uid, gid);
        let mut link = symlink("/etc/motd.link", "motd");
        (link.uid, link.gid) = (uid, gid);
        let steps = vec![
            Step::Write(dir("/etc", 0o755)),
            Step::Write(conf),
            Step::Write(fx.file("/etc/motd", b"hello", 0o644)),
            Step::Write(Entry::hard_link("/etc/motd.hard", "/etc/motd")),
            Step::Write(link),
            Step::Write(dir("/var", 0o700)),
            Step::Write(dir("/var/lib", 0o755)),
            Step::Write(fx.file("/var/lib/empty", b"", 0o4755)),
        ];
        let updater = fx.updater(fx.services());
        let report = updater.apply(&request(7, steps, vec![]), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Applied, "{report:?}");
        assert_eq!(report.error, None);
        let (me_u, me_g) = ids();
        let expected: BTreeMap<String, String> = [
            ("/etc", format!("dir 755 {me_u}:{me_g}")),
            ("/etc/app.conf", format!("file 640 {uid}:{gid} \"v1\"")),
            ("/etc/motd", format!("file 644 {me_u}:{me_g} \"hello\"")),
            (
                "/etc/motd.hard",
                format!("file 644 {me_u}:{me_g} \"hello\""),
            ),
            ("/etc/motd.link", "symlink -> motd".into()),
            ("/var", format!("dir 700 {me_u}:{me_g}")),
            ("/var/lib", format!("dir 755 {me_u}:{me_g}")),
            ("/var/lib/empty", format!("file 4755 {me_u}:{me_g} \"\"")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(fx.snapshot(true), expected);
        assert_eq!(fx.ino("/etc/motd"), fx.ino("/etc/motd.hard"));
        let link_meta = fs::symlink_metadata(fx.host("/etc/motd.link")).unwrap();
        assert_eq!((link_meta.uid(), link_meta.gid()), (uid, gid));

        assert_eq!(report.steps, 8);
        assert_eq!(report.touched.len(), 8);
        assert_eq!(report.touched[1], "/etc/app.conf");
        assert!(report.services.is_empty());
        assert!(report.activation > Duration::ZERO && report.activation <= report.duration);
        assert!(fx.log().is_empty(), "no trigger, no service command");
        fx.assert_clean();
        // The report survives a restart.
        drop(updater);
        let again = fx.updater(fx.services());
        assert_eq!(again.last_report(), Some(report));
        assert_eq!(again.recover(), None);
    }

    #[test]
    fn content_mode_links_kinds_and_strays_all_change() {
        let fx = Fx::new();
        before(&fx);
        let motd_ino = fx.ino("/etc/motd");
        let updater = fx.updater(fx.services());
        let report = updater.apply(&request(1, plan(&fx), vec![]), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Applied, "{report:?}");
        let (me_u, me_g) = ids();
        let (uid, gid) = other_owner();
        let expected: BTreeMap<String, String> = [
            ("/etc", format!("dir 750 {me_u}:{me_g}")),
            ("/etc/app.conf", format!("file 600 {me_u}:{me_g} \"new\"")),
            ("/etc/conf.d", format!("dir 755 {me_u}:{me_g}")),
            ("/etc/conf.d/a", format!("file 644 {me_u}:{me_g} \"a\"")),
            ("/etc/hard", format!("file 600 {me_u}:{me_g} \"new\"")),
            ("/etc/link", "symlink -> b".into()),
            ("/etc/motd", format!("file 600 {uid}:{gid} \"motd\"")),
            ("/etc/sym2dir", format!("dir 700 {me_u}:{me_g}")),
            (
                "/etc/sym2dir/f",
                format!("file 644 {me_u}:{me_g} \"inside\""),
            ),
            ("/opt", format!("dir 755 {me_u}:{me_g}")),
            (
                "/srv",
                format!("file 644 {me_u}:{me_g} \"srv is a file now\""),
            ),
            ("/usr", format!("dir 755 {me_u}:{me_g}")),
            ("/usr/bin", format!("dir 755 {me_u}:{me_g}")),
            ("/usr/bin/tool", format!("file 4755 {uid}:{gid} \"#!tool\"")),
            ("/var", format!("dir 755 {me_u}:{me_g}")),
            ("/var/keep", format!("file 644 {me_u}:{me_g} \"untouched\"")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(fx.snapshot(true), expected);
        assert_eq!(fx.ino("/etc/hard"), fx.ino("/etc/app.conf"));
        assert_eq!(
            fx.ino("/etc/motd"),
            motd_ino,
            "a metadata fix keeps the inode"
        );
        let outside: Vec<_> = fs::read_dir(&fx.outside).unwrap().collect();
        assert_eq!(
            outside.len(),
            1,
            "nothing went through the symlink out of the root"
        );
        fx.assert_clean();
    }

    #[test]
    fn services_stop_before_the_files_change_and_start_after() {
        let fx = Fx::new();
        before(&fx);
        let triggers = vec![
            trigger("app", "/etc/app\\.conf", false),
            trigger("web", "/etc/.*", false),
            trigger("ssh", "/etc/link", true),
            // A restart covers a reload of the same service.
            trigger("app", "/etc/app\\.conf", true),
        ];
        let updater = fx.updater(fx.services());
        let report = updater.apply(&request(2, plan(&fx), triggers), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Applied, "{report:?}");
        assert_eq!(
            fx.log(),
            [
                "app stop old",
                "web stop old",
                "web start new",
                "app start new",
                "ssh reload new"
            ]
        );
        assert_eq!(report.services, ["app", "web", "ssh"]);
        assert!(report.activation > Duration::ZERO);
    }

    #[test]
    fn systemctl_takes_the_action_before_the_service_and_the_command_keeps_its_arguments() {
        let fx = Fx::new();
        before(&fx);
        let bin = fx.dir.path().join("my bin");
        fs::create_dir(&bin).unwrap();
        let systemctl = bin.join("systemctl");
        fs::write(
            &systemctl,
            format!("#!/bin/sh\necho \"$@\" >> '{}'\n", fx.log.display()),
        )
        .unwrap();
        fs::set_permissions(&systemctl, fs::Permissions::from_mode(0o755)).unwrap();
        let services = Services {
            service_cmd: format!("'{}' --no-block", systemctl.display()),
            ..Services::default()
        };
        let updater = fx.updater(services);
        let report = updater.apply(&request(3, plan(&fx), triggers()), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Applied, "{report:?}");
        assert_eq!(
            fx.log(),
            [
                "--no-block stop app",
                "--no-block start app",
                "--no-block reload ssh"
            ]
        );
    }

    #[test]
    fn a_failing_health_check_puts_every_file_back_byte_for_byte() {
        let fx = Fx::new();
        before(&fx);
        let old = fx.snapshot(true);
        let inodes: Vec<u64> = ["/etc/app.conf", "/etc/motd", "/etc/link", "/etc/conf.d"]
            .iter()
            .map(|p| fx.ino(p))
            .collect();
        let services = Services {
            health_cmd: Some("echo unhealthy >&2; exit 3".into()),
            ..fx.services()
        };
        let updater = fx.updater(services);
        let report = updater.apply(&request(4, plan(&fx), triggers()), &Filter::empty());
        assert_eq!(report.outcome, Outcome::RolledBack, "{report:?}");
        let error = report.error.clone().unwrap_or_default();
        assert!(error.contains("unhealthy"), "{error}");
        assert_eq!(fx.snapshot(true), old);
        let after: Vec<u64> = ["/etc/app.conf", "/etc/motd", "/etc/link", "/etc/conf.d"]
            .iter()
            .map(|p| fx.ino(p))
            .collect();
        assert_eq!(after, inodes, "the old inodes themselves are back");
        assert_eq!(fx.ino("/etc/hard"), fx.ino("/etc/motd"));
        assert_eq!(
            fx.log(),
            [
                "app stop old",
                "app start new",
                "ssh reload new",
                "app stop new",
                "app start old",
                "ssh reload old"
            ]
        );
        assert_eq!(report.touched.len(), plan(&fx).len());
        fx.assert_clean();
        assert_eq!(updater.last_report(), Some(report));
    }

    #[test]
    fn a_failing_service_command_fails_the_update_and_restores_the_files() {
        // Start fails after the files changed: everything goes back.
        let fx = Fx::new();
        before(&fx);
        let old = fx.snapshot(true);
        fx.fail_on("app start");
        let report = fx
            .updater(fx.services())
            .apply(&request(5, plan(&fx), triggers()), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
        assert!(report
            .error
            .unwrap_or_default()
            .contains("cannot start app"));
        assert_eq!(fx.snapshot(true), old);
        fx.assert_clean();

        // Stop fails: the files are never touched, and what was stopped is started again.
        let fx = Fx::new();
        before(&fx);
        let old = fx.snapshot(true);
        fx.fail_on("web stop");
        let triggers = vec![
            trigger("app", "/etc/app\\.conf", false),
            trigger("web", "/etc/.*", false),
        ];
        let report = fx
            .updater(fx.services())
            .apply(&request(6, plan(&fx), triggers), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
        assert_eq!(fx.snapshot(true), old);
        assert_eq!(
            fx.log(),
            [
                "app stop old",
                "web stop old",
                "web start old",
                "app start old"
            ]
        );
        fx.assert_clean();
    }

    #[test]
    fn refused_plans_change_nothing() {
        let fx = Fx::new();
        before(&fx);
        fx.put_symlink("/escape", &fx.outside.display().to_string());
        fx.put_dir("/var/log");
        fx.put_dir("/var/data");
        fx.put_file("/var/data/unmanaged", b"not the plan's", 0o644);
        let good = Step::Write(fx.file("/etc/new", b"fine", 0o644));
        let missing = {
            let mut e = fx.file("/etc/missing", b"x", 0o644);
            e.hash = [9; 32];
            e
        };
        let corrupt = fx.file("/etc/corrupt", b"right content", 0o644);
        let store = ObjectStore::open(&fx.state.join("objects")).unwrap();
        fs::write(store.path(&corrupt.hash), b"wrong content").unwrap();
        let cases: Vec<(Vec<Step>, &str, &str)> = vec![
            (
                vec![Step::Write(fx.file("etc/x", b"x", 0o644))],
                "",
                "not absolute",
            ),
            (
                vec![Step::Write(fx.file("/etc/../x", b"x", 0o644))],
                "",
                "'..'",
            ),
            (
                vec![Step::Write(fx.file("/etc//x", b"x", 0o644))],
                "",
                "empty component",
            ),
            (
                vec![Step::Write(fx.file("/etc/x/", b"x", 0o644))],
                "",
                "trailing slash",
            ),
            (
                vec![good.clone(), Step::Write(fx.file("/escape/f", b"x", 0o644))],
                "",
                "symlink on disk",
            ),
            (
                vec![Step::Write(Entry::hard_link("/etc/h", "/escape/secret"))],
                "",
                "symlink on disk",
            ),
            (
                vec![
                    good.clone(),
                    Step::Write(fx.file("/var/log/x", b"x", 0o644)),
                ],
                "/var/log",
                "excluded",
            ),
            (
                vec![Step::Write(fx.file("/etc/app.conf", b"x", 0o644))],
                "/etc/app\\.conf",
                "excluded",
            ),
            (
                vec![good.clone(), Step::Write(missing)],
                "",
                "not in the local cache",
            ),
            (vec![good.clone(), Step::Write(corrupt)], "", "corrupt"),
            (
                vec![Step::Delete("/var/data".into())],
                "",
                "does not remove",
            ),
            (
                vec![Step::Write(fx.file("/var/data", b"x", 0o644))],
                "",
                "does not remove",
            ),
            (
                vec![Step::Write(fx.file("/nope/x", b"x", 0o644))],
                "",
                "does not exist",
            ),
            (
                vec![Step::Metadata(fx.file("/etc/link", b"x", 0o644))],
                "",
                "disk has a symlink",
            ),
            (vec![Step::Delete("/".into())], "", "root cannot be deleted"),
            (vec![good.clone(), good.clone()], "", "twice"),
            (
                vec![
                    Step::Delete("/etc/motd".into()),
                    Step::Write(fx.file("/etc/motd/x", b"x", 0o644)),
                ],
                "",
                "deleted by an earlier step",
            ),
        ];
        let old = fx.snapshot(true);
        let updater = fx.updater(fx.services());
        for (i, (steps, filter, why)) in cases.into_iter().enumerate() {
            let filter = if filter.is_empty() {
                Filter::empty()
            } else {
                Filter::new(vec![filter.into()]).unwrap()
            };
            let report = updater.apply(&request(100 + i as u64, steps, triggers()), &filter);
            let error = report.error.clone().unwrap_or_default();
            assert_eq!(report.outcome, Outcome::Refused, "case {i}: {report:?}");
            assert!(
                error.contains(why),
                "case {i}: {error:?} should say {why:?}"
            );
            assert!(report.touched.is_empty() && report.services.is_empty());
            assert_eq!(fx.snapshot(true), old, "case {i} changed the root");
            assert!(fx.log().is_empty(), "case {i} ran a service command");
            fx.assert_clean();
        }
        let outside: Vec<_> = fs::read_dir(&fx.outside).unwrap().collect();
        assert_eq!(outside.len(), 1);
    }

    /// Simulates SIGKILL before each mutation in turn; at that instant every path must be
    /// wholly old or new, and after `recover` the whole tree must be the old one or the new
    /// one, as the report says, with every service running.
    fn crash_everywhere(healthy: bool) {
        let services = |fx: &Fx| Services {
            health_cmd: (!healthy).then(|| "exit 1".to_owned()),
            ..fx.services()
        };
        let (old, new) = {
            let fx = Fx::new();
            before(&fx);
            let old = fx.snapshot(true);
            let report = fx
                .updater(fx.services())
                .apply(&request(9, plan(&fx), triggers()), &Filter::empty());
            assert_eq!(report.outcome, Outcome::Applied);
            (old, fx.snapshot(true))
        };
        let content = |tree: &BTreeMap<String, String>, path: &str| {
            tree.get(path).map(|v| {
                // Kind and content only: mode and owner of a metadata fix may be half done.
                let mut parts = v.splitn(2, ' ');
                let kind = parts.next().unwrap_or_default().to_owned();
                let rest = parts.next().unwrap_or_default();
                match kind.as_str() {
                    "file" => format!("file {}", rest.splitn(3, ' ').nth(2).unwrap_or_default()),
                    "dir" => kind,
                    _ => v.clone(),
                }
            })
        };
        let paths: Vec<String> = old.keys().chain(new.keys()).cloned().collect();
        let mut crashes = 0;
        for k in 0.. {
            let fx = Fx::new();
            before(&fx);
            let updater = fx.updater(services(&fx)).crash_after(k);
            let report = updater.apply(&request(9, plan(&fx), triggers()), &Filter::empty());
            drop(updater);
            if report.error.as_deref() != Some("simulated crash (test hook)") {
                let want = if healthy {
                    Outcome::Applied
                } else {
                    Outcome::RolledBack
                };
                assert_eq!(report.outcome, want, "uninterrupted run: {report:?}");
                break;
            }
            crashes += 1;
            let now = fx.snapshot(true);
            for path in &paths {
                let (was, will, is) = (
                    content(&old, path),
                    content(&new, path),
                    content(&now, path),
                );
                // Only a kind change between directory and non-directory takes two renames.
                let kind_change = was.as_deref().map(|v| v.starts_with("dir"))
                    != will.as_deref().map(|v| v.starts_with("dir"))
                    && was.is_some()
                    && will.is_some();
                assert!(
                    is == was || is == will || (kind_change && is.is_none()),
                    "crash at {k}: {path} is {is:?}, neither {was:?} nor {will:?}"
                );
            }

            let updater = fx.updater(services(&fx));
            let second = fx.updater(services(&fx));
            let recovered = updater.recover();
            let after = fx.snapshot(true);
            match &recovered {
                None => assert_eq!(after, old, "crash at {k}: no journal, so nothing changed"),
                Some(r) if r.outcome == Outcome::Applied => {
                    assert!(healthy, "crash at {k}: {r:?}");
                    assert_eq!(after, new, "crash at {k}: rolled forward")
                }
                Some(r) => {
                    assert!(
                        matches!(r.outcome, Outcome::RolledBack | Outcome::Failed),
                        "{r:?}"
                    );
                    assert_eq!(after, old, "crash at {k}: rolled back ({r:?})")
                }
            }
            if let Some(r) = &recovered {
                assert_eq!(r.plan_id, 9);
                assert_eq!(second.last_report().as_ref(), Some(r));
            }
            assert_eq!(updater.recover(), None, "recovering twice does nothing");
            fx.assert_clean();
            // Every service that was touched ends running.
            let mut last: HashMap<String, String> = HashMap::new();
            for line in fx.log() {
                let mut words = line.split(' ');
                if let (Some(s), Some(a)) = (words.next(), words.next()) {
                    last.insert(s.to_owned(), a.to_owned());
                }
            }
            assert!(
                last.values().all(|a| a != "stop"),
                "crash at {k}: a service is left stopped: {:?}",
                fx.log()
            );
            // And the machine takes the next update.
            let next = updater.apply(&request(10, vec![], vec![]), &Filter::empty());
            assert_ne!(next.outcome, Outcome::Refused, "crash at {k}: {next:?}");
        }
        // Two journal writes, the stop, 21 operations, start, reload, report, clean-up (and
        // the rollback's own when unhealthy).
        assert!(crashes >= 27, "only {crashes} crash points");
    }

    #[test]
    fn a_crash_anywhere_in_a_healthy_update_recovers_to_old_or_new() {
        crash_everywhere(true);
    }

    #[test]
    fn a_crash_anywhere_in_a_rollback_recovers_to_old() {
        crash_everywhere(false);
    }

    #[test]
    fn an_interrupted_update_blocks_the_next_until_recovered() {
        let fx = Fx::new();
        before(&fx);
        let old = fx.snapshot(true);
        // Crash a few operations into the activation.
        let updater = fx.updater(fx.services()).crash_after(6);
        let report = updater.apply(&request(11, plan(&fx), triggers()), &Filter::empty());
        assert_eq!(report.error.as_deref(), Some("simulated crash (test hook)"));
        drop(updater);
        assert_ne!(
            fx.snapshot(true),
            old,
            "the crash left a half-applied update"
        );
        let updater = fx.updater(fx.services());
        let refused = updater.apply(&request(12, vec![], vec![]), &Filter::empty());
        assert_eq!(refused.outcome, Outcome::Refused);
        assert!(refused
            .error
            .unwrap_or_default()
            .contains("plan 11 is unfinished"));
        let recovered = updater.recover().expect("a journal to recover");
        assert_eq!(
            (recovered.plan_id, recovered.outcome),
            (11, Outcome::Applied)
        );
        assert_eq!(recovered.touched.len(), plan(&fx).len());
        let next = updater.apply(&request(12, vec![], vec![]), &Filter::empty());
        assert_eq!(next.outcome, Outcome::Applied);
        assert_eq!(updater.last_report().map(|r| r.plan_id), Some(12));
    }

    #[test]
    fn a_reboot_trigger_reboots_once_and_the_health_check_runs_after_the_restart() {
        let fx = Fx::new();
        before(&fx);
        let mut triggers = triggers();
        triggers.push(Trigger {
            match_lines: vec!["/usr/bin/.*".into()],
            service: "kernel".into(),
            do_reload: false,
            do_reboot: true,
            high_impact: true,
        });
        let services = Services {
            reboot_cmd: Some(format!("echo reboot >> '{}'", fx.log.display())),
            health_cmd: Some(format!("echo health >> '{}'", fx.log.display())),
            ..fx.services()
        };
        // Find the instant right after the reboot command was recorded: the reboot kills subd.
        let mut k = 0;
        loop {
            let fx2 = Fx::new();
            before(&fx2);
            let services2 = Services {
                reboot_cmd: Some("true".into()),
                ..fx2.services()
            };
            let report = fx2
                .updater(services2)
                .crash_after(k)
                .apply(&request(13, plan(&fx2), triggers.clone()), &Filter::empty());
            assert!(report.error.is_some(), "never reached the reboot");
            let journal = fx2.updater(fx2.services()).read_journal().unwrap();
            if matches!(journal.map(|j| j.phase), Some(Phase::Rebooting)) {
                break;
            }
            k += 1;
        }
        // With the real reboot command, stop just after it ran (k + 1: the tick before it).
        let report = fx
            .updater(services.clone())
            .crash_after(k + 1)
            .apply(&request(13, plan(&fx), triggers.clone()), &Filter::empty());
        assert!(report.error.is_some());
        assert_eq!(fx.log().last().map(String::as_str), Some("reboot"));
        let recovered = fx.updater(services).recover().expect("journal");
        assert_eq!(recovered.outcome, Outcome::Applied, "{recovered:?}");
        assert_eq!(
            fx.log(),
            [
                "app stop old",
                "app start new",
                "ssh reload new",
                "reboot",
                "health"
            ],
            "no second reboot, no service restarted after it"
        );
        assert!(!recovered.services.contains(&"kernel".to_owned()));
        fx.assert_clean();
    }

    #[test]
    fn a_state_dir_on_another_file_system_stages_inside_the_root() {
        let Ok(elsewhere) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let fx = Fx::new();
        let dev = |p: &Path| fs::metadata(p).unwrap().dev();
        if dev(elsewhere.path()) == dev(&fx.root) {
            return;
        }
        before(&fx);
        let old = fx.snapshot(true);
        let state = elsewhere.path().join("state");
        let unhealthy = Services {
            health_cmd: Some("false".into()),
            ..fx.services()
        };
        let updater = Updater::new(&fx.root, &state, unhealthy).unwrap();
        assert_eq!(updater.staging_dir(), fx.root.join(".subd-staging"));
        // The objects live in this state dir's cache.
        let copy = |entry: &Entry| {
            let from = ObjectStore::open(&fx.state.join("objects"))
                .unwrap()
                .path(&entry.hash);
            let to = ObjectStore::open(&state.join("objects"))
                .unwrap()
                .path(&entry.hash);
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(from, to).unwrap();
        };
        let steps = plan(&fx);
        for step in &steps {
            if let Step::Write(e) = step {
                if e.kind == Kind::File {
                    copy(e);
                }
            }
        }
        let report = updater.apply(&request(20, steps.clone(), triggers()), &Filter::empty());
        assert_eq!(report.outcome, Outcome::RolledBack, "{report:?}");
        assert_eq!(fx.snapshot(true), old);
        let report = Updater::new(&fx.root, &state, fx.services())
            .unwrap()
            .apply(&request(21, steps, triggers()), &Filter::empty());
        assert_eq!(report.outcome, Outcome::Applied, "{report:?}");
        let staged = fx.file("/.subd-staging/x", b"x", 0o644);
        copy(&staged);
        let report = updater.apply(
            &request(22, vec![Step::Write(staged)], vec![]),
            &Filter::empty(),
        );
        assert_eq!(report.outcome, Outcome::Refused);
        let leftovers: Vec<_> = fs::read_dir(fx.root.join(".subd-staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers,
            ["rollback"],
            "only the (empty) rollback area remains"
        );
        assert_eq!(
            fs::read_dir(fx.root.join(".subd-staging/rollback"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn paths_and_services_are_checked() {
        for bad in ["", "x", "/a//b", "/a/", "/a/./b", "/a/../b", "/a\0b"] {
            assert!(check_syntax(bad).is_err(), "{bad:?}");
        }
        for good in ["/", "/a", "/a/b.c/..d"] {
            assert!(check_syntax(good).is_ok(), "{good:?}");
        }
        assert_eq!(ancestors("/a/b/c").collect::<Vec<_>>(), ["/a", "/a/b"]);
        assert_eq!(ancestors("/a").count(), 0);
        assert_eq!(
            (parent("/a"), parent("/a/b"), parent("/")),
            (Some("/"), Some("/a"), None)
        );
        let filter = Filter::new(vec!["/var/log".into()]).unwrap();
        assert_eq!(excluded_by("/var/log/x/y", &filter), Some("/var/log"));
        assert_eq!(excluded_by("/var/logs", &filter), None);
        assert!(services_of(&[trigger("-x", "/", false)]).is_err());
    }
}
