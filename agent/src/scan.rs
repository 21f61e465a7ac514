//! The scanner: the machine's tree as the agent sees it, in exactly the form an image has.
//!
//! A scan walks the tree from a root without following symlinks, lstat-ing every path, and
//! turns it into the same [`Entry`]s `domadm image add` makes from a directory, through the same
//! [`Manifest::new`], so a machine that matches its image has the image's Merkle root to the
//! bit. One code path serves both: `domadm` ingests a directory with a strict scan (anything an
//! image cannot hold is an error), and the agent scans its machine leniently (special files,
//! non-UTF-8 names and paths that vanish mid-walk are skipped and counted, since a live machine
//! always has some and one of them must not blind the agent to the rest).
//!
//! There are two kinds of pass:
//!
//! - **A full sweep** reads and hashes every regular file. It is the only way to see what no
//!   change notification reports: a sector gone bad under a file, bytes written to the block
//!   device beneath the file system, a file edited and its timestamps put back. The agent runs
//!   it slowly, at a fraction of the disk's speed ([`measure_read_speed`], `bytes_per_sec`), at
//!   the lowest CPU and I/O priority ([`lower_priority`]), so the machine's work does not notice.
//! - **A metadata pass** walks and lstat-s everything but reads only files whose
//!   `(dev, ino, size, mtime, ctime)` differ from the previous [`Tree`]; the others keep their
//!   hash. It costs a stat per path, so it can run every few seconds and sees ordinary changes
//!   (package installs, edits, chmod) almost at once. `ctime` is what makes it trustworthy: a
//!   program can set `mtime` back, but any write or metadata change moves `ctime` to the
//!   present, and only the kernel can set it.
//!
//! A file changed within a tick of the clock after it was read could keep its timestamps, so
//! a file whose `ctime` is less than [`RACY_WINDOW`] older than the start of the pass that read it
//! is not trusted by the next metadata pass and is read again (git's "racily clean" index
//! entries are the same problem).
//!
//! Unlimited scans (ingest, benchmarks, the agent's first look) hash files in parallel with
//! rayon, and large reads with blake3's own rayon split. Rate-limited scans read on the
//! calling thread, paced by a token bucket, so that [`lower_priority`] applies to all of it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dom_storage::image::{Entry, Filter, Manifest, ManifestError};
use rayon::prelude::*;

type Hash = [u8; 32];

/// A file whose ctime is this close to the start of the pass that read it is read again by
/// the next metadata pass. File systems stamp times from a coarse clock (a jiffy on Linux,
/// two seconds for FAT's mtime), so a write right after the read can leave the same stamps.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Read size: large enough that blake3's SIMD and rayon split pay off, small enough to stay
/// in cache beside the hasher.
const BUFFER: usize = 1 << 20;
/// Reads at least this large are hashed with blake3's rayon split in unlimited mode, so one
/// big file does not leave the other cores idle at the end of a sweep.
const RAYON_SPLIT: usize = 256 << 10;
/// Read size when rate-limited: the pacer sleeps after each read, so this is the largest
/// burst the disk sees.
const PACED_BUFFER: usize = 128 << 10;

/// What to scan and how.
#[derive(Debug, Clone)]
pub struct ScanConfig {
    pub root: PathBuf,
    /// Paths left alone: a path is skipped (and not descended) when it or any ancestor matches.
    pub excluded: Filter,
    /// Read bytes per second for file contents; None = unlimited, hash files in parallel (rayon).
    pub bytes_per_sec: Option<u64>,
    /// Do not descend into other file systems (st_dev differs from the root's); the agent uses
    /// true.
    pub one_file_system: bool,
    /// Agent (false): skip special files (devices, FIFOs, sockets), non-UTF-8 names and paths
    /// that vanish mid-walk, counting them. Ingest (true): refuse them with a clear error.
    pub strict: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("{} is not a directory", .0.display())]
    RootNotDirectory(PathBuf),
    #[error("{0} is a device node, FIFO or socket; images hold files, directories and links")]
    Special(String),
    #[error("{what} {raw:?} is not valid UTF-8")]
    NotUtf8 { what: &'static str, raw: String },
    #[error("{0} changed while it was read")]
    Changed(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// What a scan reports while it runs, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The walk is done: this many files, of this many bytes (as stat saw them), will be read.
    Walked { files: u64, bytes: u64 },
    /// This many more content bytes were read and hashed.
    Read(u64),
}

/// What a file's content was when it was read, to tell the next metadata pass whether it may
/// keep the hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    hash: Hash,
    /// False when the file changed too close to its read to trust the timestamps.
    trusted: bool,
}

/// The machine as scanned.
#[derive(Debug, Clone)]
pub struct Tree {
    manifest: Manifest,
    root_hash: Hash,
    /// By (dev, ino): hard links share one record, and a renamed file keeps its hash.
    seen: HashMap<(u64, u64), Seen>,
    mount_points: Vec<String>,
    skipped: u64,
    excluded: u64,
    bytes_read: u64,
    files_read: u64,
}

impl Tree {
    /// The tree in canonical form, the same as an image's manifest for the same tree.
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        Ok(self.manifest.clone())
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    /// Every entry in tree order.
    pub fn entries(&self) -> &[Entry] {
        self.manifest.entries()
    }

    /// The Merkle root, equal to the manifest's.
    pub fn root_hash(&self) -> Hash {
        self.root_hash
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.manifest.get(path)
    }

    pub fn len(&self) -> usize {
        self.manifest.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.entries().is_empty()
    }

    /// Directories not descended because they are other file systems. They are entries
    /// themselves, with the metadata of the mounted file system's root.
    pub fn mount_points(&self) -> &[String] {
        &self.mount_points
    }

    /// Paths skipped in agent mode: special files, non-UTF-8 names, paths that vanished.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Paths the exclusion filter left out (their contents not counted).
    pub fn excluded(&self) -> u64 {
        self.excluded
    }

    /// Content bytes actually read (hashed) in the pass that built this tree.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Files actually read in the pass that built this tree.
    pub fn files_read(&self) -> u64 {
        self.files_read
    }
}

/// A full checksum sweep when `previous` is None or `full` is true (every regular file read
/// and hashed); otherwise a cheap metadata pass: a file whose (dev, ino, size, mtime ns,
/// ctime ns) are unchanged from `previous` keeps its hash without being read.
pub fn scan(config: &ScanConfig, previous: Option<&Tree>, full: bool) -> Result<Tree, ScanError> {
    scan_with_progress(config, previous, full, &|_| {})
}

/// [`scan`], reporting progress. `progress` is called from rayon's threads in unlimited mode.
pub fn scan_with_progress(
    config: &ScanConfig,
    previous: Option<&Tree>,
    full: bool,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Tree, ScanError> {
    let started = unix_ns(SystemTime::now());
    let mut walk = walk(config)?;
    let previous = if full { None } else { previous };

    // Files whose content is known from the previous pass keep their hash unread.
    let mut seen = HashMap::with_capacity(walk.files.len());
    let mut to_read = Vec::new();
    for (i, file) in walk.files.iter().enumerate() {
        let known = previous
            .and_then(|p| p.seen.get(&(file.dev, file.ino)))
            .filter(|s| {
                s.trusted
                    && s.size == file.size
                    && s.mtime_ns == file.mtime_ns
                    && s.ctime_ns == file.ctime_ns
            });
        match known {
            Some(s) => {
                let holder = walk.entries[file.names[0].0]
                    .as_mut()
                    .expect("a file's entry is present until its read");
                holder.size = s.size;
                holder.hash = s.hash;
                seen.insert((file.dev, file.ino), *s);
            }
            None => to_read.push(i),
        }
    }
    progress(Progress::Walked {
        files: to_read.len() as u64,
        bytes: to_read.iter().map(|&i| walk.files[i].size).sum(),
    });

    let reader = Reader {
        strict: config.strict,
        started_ns: started,
        bytes_read: AtomicU64::new(0),
        noatime: AtomicBool::new(true),
        progress,
    };
    let outcomes: Vec<(usize, Outcome)> = match config.bytes_per_sec {
        None => to_read
            .par_iter()
            .map(|&i| {
                // Taken out rather than borrowed: while blake3's rayon split of a large read
                // waits, this thread may steal another file's read, which then finds an
                // empty buffer and makes its own.
                let mut buf = BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
                buf.resize(BUFFER, 0);
                let outcome = reader.read(&walk.files[i], &mut buf, &mut |_| {}, true);
                BUF.with(|b| *b.borrow_mut() = buf);
                outcome.map(|o| (i, o))
            })
            .collect::<Result<_, _>>()?,
        Some(rate) => {
            let mut pacer = Pacer::new(rate, PACED_BUFFER as u64);
            let clock = Instant::now();
            let mut buf = vec![0u8; PACED_BUFFER];
            let mut pace = |n: usize| {
                let wait = pacer.after_read(clock.elapsed(), n as u64);
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            };
            to_read
                .iter()
                .map(|&i| {
                    reader
                        .read(&walk.files[i], &mut buf, &mut pace, false)
                        .map(|o| (i, o))
                })
                .collect::<Result<_, _>>()?
        }
    };

    let files_read = outcomes.iter().filter(|(_, o)| o.read.is_some()).count() as u64;
    for (i, outcome) in outcomes {
        let file = &walk.files[i];
        walk.skipped += outcome.vanished.len() as u64;
        // Names that are gone are dropped; the name that was read holds the content
        // (Manifest::new then moves it to the first name in tree order).
        for &name in &outcome.vanished {
            walk.entries[file.names[name].0] = None;
        }
        let Some((holder, read)) = outcome.read else {
            continue;
        };
        let holder_index = file.names[holder].0;
        let holder = walk.entries[holder_index]
            .as_ref()
            .map(|e| e.path.clone())
            .expect("the holder's entry is present");
        walk.entries[holder_index] = Some(Entry::file(
            &holder, file.mode, file.uid, file.gid, read.size, read.hash,
        ));
        for (index, _) in &file.names {
            if let Some(link) = walk.entries[*index].as_mut() {
                if *index != holder_index {
                    link.link_target = holder.clone();
                }
            }
        }
        seen.insert(read.key, read.seen);
    }

    // Already in tree order: Manifest::new's sort finds one run and its hard-link
    // canonicalization changes nothing.
    let manifest = Manifest::new(walk.entries.into_iter().flatten().collect())?;
    Ok(Tree {
        root_hash: manifest.root_hash(),
        manifest,
        seen,
        mount_points: walk.mount_points,
        skipped: walk.skipped,
        excluded: walk.excluded,
        bytes_read: reader.bytes_read.into_inner(),
        files_read,
    })
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A regular file found by the walk: its names (entry index, path on disk; the first is the
/// one that holds the content) and what lstat said.
struct FoundFile {
    names: Vec<(usize, PathBuf)>,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    mode: u32,
    uid: u32,
    gid: u32,
}

struct Walk {
    /// `None` where a path turned out to have vanished.
    entries: Vec<Option<Entry>>,
    files: Vec<FoundFile>,
    mount_points: Vec<String>,
    skipped: u64,
    excluded: u64,
}

fn vanished(error: &io::Error) -> bool {
    // ENOTDIR: a directory replaced by a file; ELOOP: a file replaced by a symlink (opened
    // with O_NOFOLLOW); EINVAL: readlink of what is no longer a symlink.
    error.kind() == io::ErrorKind::NotFound
        || matches!(
            error.raw_os_error(),
            Some(libc::ENOTDIR | libc::ELOOP | libc::EINVAL)
        )
}

impl Walk {
    /// In agent mode a path that vanished is counted and skipped; in strict mode it is an error.
    fn tolerate(&mut self, strict: bool, path: &Path, error: io::Error) -> Result<(), ScanError> {
        if !strict && vanished(&error) {
            self.skipped += 1;
            Ok(())
        } else {
            Err(ScanError::Io {
                path: path.to_owned(),
                error,
            })
        }
    }
}

/// A path found in a directory listing, waiting for its turn in tree order.
struct Child {
    path: String,
    on_disk: PathBuf,
    meta: std::fs::Metadata,
}

/// Walks the tree in tree order (each directory's children by name, each directory's subtree
/// right after it), so the entries need no sorting and the first name of a hard-linked file
/// found is the one the manifest's canonical form gives the content to.
fn walk(config: &ScanConfig) -> Result<Walk, ScanError> {
    let root = &config.root;
    let io_error = |error| ScanError::Io {
        path: root.clone(),
        error,
    };
    // The root is followed if it is a symlink: it names the tree, it is not part of it.
    let meta = std::fs::metadata(root).map_err(io_error)?;
    if !meta.is_dir() {
        return Err(ScanError::RootNotDirectory(root.clone()));
    }
    let root_dev = meta.dev();
    let mut walk = Walk {
        entries: vec![Some(Entry::directory(
            "/",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
        ))],
        files: Vec::new(),
        mount_points: Vec::new(),
        skipped: 0,
        excluded: 0,
    };
    let mut inodes: HashMap<(u64, u64), usize> = HashMap::new();
    // Pending paths, the next in tree order on top.
    let mut stack: Vec<Child> = Vec::new();
    let children = walk.list(config, root, "/")?.map_err(io_error)?;
    stack.extend(children.into_iter().rev());
    while let Some(Child {
        path,
        on_disk,
        meta,
    }) = stack.pop()
    {
        let (mode, uid, gid) = (meta.mode() & 0o7777, meta.uid(), meta.gid());
        let kind = meta.file_type();
        if kind.is_dir() {
            if config.one_file_system && meta.dev() != root_dev {
                walk.entries
                    .push(Some(Entry::directory(&path, mode, uid, gid)));
                walk.mount_points.push(path);
                continue;
            }
            match walk.list(config, &on_disk, &path)? {
                Ok(children) => {
                    walk.entries
                        .push(Some(Entry::directory(&path, mode, uid, gid)));
                    stack.extend(children.into_iter().rev());
                }
                // Gone (or no longer a directory) since its parent was listed.
                Err(error) => walk.tolerate(config.strict, &on_disk, error)?,
            }
        } else if kind.is_symlink() {
            let target = match std::fs::read_link(&on_disk) {
                Ok(target) => target,
                Err(error) => {
                    walk.tolerate(config.strict, &on_disk, error)?;
                    continue;
                }
            };
            let Some(target) = target.to_str() else {
                if config.strict {
                    return Err(ScanError::NotUtf8 {
                        what: "symlink target",
                        raw: target.to_string_lossy().into_owned(),
                    });
                }
                walk.skipped += 1;
                continue;
            };
            walk.entries
                .push(Some(Entry::symlink(&path, uid, gid, target)));
        } else if kind.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(&file) = inodes.get(&key) {
                    let found: &mut FoundFile = &mut walk.files[file];
                    let holder = walk.entries[found.names[0].0]
                        .as_ref()
                        .map(|e| e.path.clone())
                        .unwrap_or_default();
                    found.names.push((walk.entries.len(), on_disk));
                    walk.entries.push(Some(Entry::hard_link(&path, &holder)));
                    continue;
                }
                inodes.insert(key, walk.files.len());
            }
            walk.files.push(FoundFile {
                names: vec![(walk.entries.len(), on_disk)],
                dev: key.0,
                ino: key.1,
                size: meta.size(),
                mtime_ns: stamp(meta.mtime(), meta.mtime_nsec()),
                ctime_ns: stamp(meta.ctime(), meta.ctime_nsec()),
                mode,
                uid,
                gid,
            });
            walk.entries
                .push(Some(Entry::file(&path, mode, uid, gid, 0, [0; 32])));
        } else if config.strict {
            return Err(ScanError::Special(path));
        } else {
            walk.skipped += 1;
        }
    }
    Ok(walk)
}

impl Walk {
    /// A directory's children that are not excluded, lstat-ed, in name order. The inner
    /// error is the directory's own (it could not be opened), for the caller to tolerate or
    /// not; the outer one is fatal.
    fn list(
        &mut self,
        config: &ScanConfig,
        dir: &Path,
        path: &str,
    ) -> Result<io::Result<Vec<Child>>, ScanError> {
        let listing = match std::fs::read_dir(dir) {
            Ok(listing) => listing,
            Err(error) => return Ok(Err(error)),
        };
        let mut children = Vec::new();
        let mut items = Vec::new();
        for item in listing {
            let item = match item {
                Ok(item) => item,
                Err(error) => {
                    self.tolerate(config.strict, dir, error)?;
                    break;
                }
            };
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                if config.strict {
                    let relative = item.path();
                    let relative = relative.strip_prefix(&config.root).unwrap_or(&relative);
                    return Err(ScanError::NotUtf8 {
                        what: "path",
                        raw: relative.to_string_lossy().into_owned(),
                    });
                }
                self.skipped += 1;
                continue;
            };
            let child = if path == "/" {
                format!("/{name}")
            } else {
                format!("{path}/{name}")
            };
            if config.excluded.excludes(&child) {
                self.excluded += 1;
                continue;
            }
            items.push((child, item));
        }
        // fstatat on the open directory: no path lookup from the root for each entry. When
        // unlimited, the stats of a large directory are spread over rayon's threads.
        let stat = |(child, item): (String, std::fs::DirEntry)| {
            let meta = item.metadata();
            (child, item, meta)
        };
        let stated: Vec<_> = if config.bytes_per_sec.is_none() && items.len() >= 32 {
            items.into_par_iter().map(stat).collect()
        } else {
            items.into_iter().map(stat).collect()
        };
        for (child, item, meta) in stated {
            match meta {
                Ok(meta) => children.push(Child {
                    path: child,
                    on_disk: item.path(),
                    meta,
                }),
                Err(error) => self.tolerate(config.strict, &item.path(), error)?,
            }
        }
        // Siblings in tree order are in byte order of their names.
        children.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(Ok(children))
    }
}

fn stamp(secs: i64, nsecs: i64) -> i128 {
    secs as i128 * 1_000_000_000 + nsecs as i128
}

fn unix_ns(time: SystemTime) -> i128 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    }
}

/// One file's read: which of its names (indices into `FoundFile::names`) had vanished, and
/// which name was read and what it held.
struct Outcome {
    vanished: Vec<usize>,
    read: Option<(usize, Content)>,
}

struct Content {
    size: u64,
    hash: Hash,
    key: (u64, u64),
    seen: Seen,
}

struct Reader<'a> {
    strict: bool,
    started_ns: i128,
    bytes_read: AtomicU64,
    /// O_NOATIME keeps a sweep from dirtying every inode's atime, but only the owner or
    /// CAP_FOWNER may ask for it; after the first refusal it is not asked for again.
    noatime: AtomicBool,
    progress: &'a (dyn Fn(Progress) + Sync),
}

impl Reader<'_> {
    fn open(&self, path: &Path) -> io::Result<File> {
        // O_NOFOLLOW and O_NONBLOCK: a name that became a symlink or a FIFO since the walk
        // must neither lead elsewhere nor block the scan.
        let base = libc::O_NOFOLLOW | libc::O_NONBLOCK;
        if self.noatime.load(Ordering::Relaxed) {
            match File::options()
                .read(true)
                .custom_flags(base | libc::O_NOATIME)
                .open(path)
            {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    self.noatime.store(false, Ordering::Relaxed)
                }
                other => return other,
            }
        }
        File::options().read(true).custom_flags(base).open(path)
    }

    fn read(
        &self,
        file: &FoundFile,
        buf: &mut [u8],
        after_read: &mut dyn FnMut(usize),
        parallel: bool,
    ) -> Result<Outcome, ScanError> {
        let mut vanished_names = Vec::new();
        for (tried, (_, path)) in file.names.iter().enumerate() {
            let io_error = |error| ScanError::Io {
                path: path.clone(),
                error,
            };
            let mut handle = match self.open(path) {
                Ok(handle) => handle,
                Err(error) if !self.strict && vanished(&error) => {
                    vanished_names.push(tried);
                    continue;
                }
                Err(error) => return Err(io_error(error)),
            };
            let meta = handle.metadata().map_err(io_error)?;
            if !meta.is_file() || (meta.dev(), meta.ino()) != (file.dev, file.ino) {
                // Replaced since the walk saw it: the walk's hard-link grouping no longer
                // holds, so the next pass is left to see it afresh.
                if self.strict {
                    return Err(ScanError::Changed(path.display().to_string()));
                }
                vanished_names.push(tried);
                continue;
            }
            // The other names of a hard-linked file must still be this file, or the tree
            // would hold links to what is no longer there. Rare enough for an lstat each.
            for (other, (_, other_path)) in file.names.iter().enumerate().skip(tried + 1) {
                let same = match std::fs::symlink_metadata(other_path) {
                    Ok(m) => m.is_file() && (m.dev(), m.ino()) == (file.dev, file.ino),
                    Err(error) if !self.strict && vanished(&error) => false,
                    Err(error) => {
                        return Err(ScanError::Io {
                            path: other_path.clone(),
                            error,
                        })
                    }
                };
                if !same {
                    if self.strict {
                        return Err(ScanError::Changed(other_path.display().to_string()));
                    }
                    vanished_names.push(other);
                }
            }
            if meta.size() > buf.len() as u64 {
                // Deeper readahead for files that span several reads. Only advice: its
                // failure changes nothing.
                // SAFETY: the descriptor is open for the duration of the call.
                unsafe {
                    libc::posix_fadvise(handle.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL)
                };
            }
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                let n = match handle.read(buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => return Err(io_error(error)),
                };
                if parallel && n >= RAYON_SPLIT {
                    hasher.update_rayon(&buf[..n]);
                } else {
                    hasher.update(&buf[..n]);
                }
                size += n as u64;
                self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                (self.progress)(Progress::Read(n as u64));
                after_read(n);
                // A short read that brings the file to the size fstat gave is its end: the
                // read that would return 0 costs a syscall per file and tells nothing more
                // (a file growing after either read shows in its ctime next time).
                if n < buf.len() && size == meta.size() {
                    break;
                }
            }
            let ctime_ns = stamp(meta.ctime(), meta.ctime_nsec());
            let hash = *hasher.finalize().as_bytes();
            return Ok(Outcome {
                vanished: vanished_names,
                read: Some((
                    tried,
                    Content {
                        size,
                        hash,
                        key: (meta.dev(), meta.ino()),
                        seen: Seen {
                            size: meta.size(),
                            mtime_ns: stamp(meta.mtime(), meta.mtime_nsec()),
                            ctime_ns,
                            hash,
                            // A file still growing or changed around the read is read again next
                            // time, whatever its timestamps say.
                            trusted: size == meta.size()
                                && ctime_ns < self.started_ns - RACY_WINDOW.as_nanos() as i128,
                        },
                    },
                )),
            });
        }
        Ok(Outcome {
            vanished: vanished_names,
            read: None,
        })
    }
}

/// A token bucket on bytes read, in its GCRA form: one timestamp (when the bytes read so far
/// are paid for at `rate`) instead of a token count refilled by a timer, so it is exact
/// integer arithmetic on a clock the caller passes in. The bucket holds `burst` bytes: enough
/// that the time a read itself takes counts towards its cost, and no more, so idle time earns
/// no burst and a sweep that paused in a metadata-heavy directory does not then hit the disk
/// at full speed.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    /// How far ahead of the clock the reads may run: `burst` bytes at `rate`.
    tolerance: Duration,
    /// Time (since the clock's origin) at which everything read so far is paid for.
    paid_until: Duration,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64, burst: u64) -> Pacer {
        let mut pacer = Pacer {
            rate: bytes_per_sec.max(1),
            tolerance: Duration::ZERO,
            paid_until: Duration::ZERO,
        };
        pacer.tolerance = pacer.cost(burst);
        pacer
    }

    fn cost(&self, bytes: u64) -> Duration {
        let ns = bytes as u128 * 1_000_000_000 / self.rate as u128;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Records `bytes` read by `now` and returns how long to sleep before reading again.
    pub fn after_read(&mut self, now: Duration, bytes: u64) -> Duration {
        self.paid_until =
            self.paid_until.max(now.saturating_sub(self.tolerance)) + self.cost(bytes);
        self.paid_until
            .saturating_sub(self.tolerance)
            .saturating_sub(now)
    }
}

/// Measures the read speed of the storage under `root` in bytes/s, reading file contents
/// (largest files first, without following mounts) for up to about a second or 256 MiB.
/// Reads bypass the page cache (O_DIRECT) where the file system allows it, so the figure is
/// the device's, not memory's. 0 when there was nothing to read.
pub fn measure_read_speed(root: &Path) -> u64 {
    const LIMIT_BYTES: u64 = 256 << 20;
    const LIMIT_TIME: Duration = Duration::from_secs(1);
    const CANDIDATES: usize = 20_000;
    let Ok(root_meta) = std::fs::metadata(root) else {
        return 0;
    };
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let mut dirs = vec![root.to_owned()];
    let mut seen = 0usize;
    // Breadth first, so a deep tree does not keep the search in one corner.
    let mut next = 0;
    while next < dirs.len() && seen < CANDIDATES {
        let Ok(listing) = std::fs::read_dir(&dirs[next]) else {
            next += 1;
            continue;
        };
        next += 1;
        for item in listing.flatten() {
            let Ok(meta) = item.metadata() else { continue };
            if meta.dev() != root_meta.dev() {
                continue;
            }
            if meta.is_dir() {
                dirs.push(item.path());
            } else if meta.is_file() && meta.size() > 0 {
                files.push((meta.size(), item.path()));
                seen += 1;
            }
        }
    }
    files.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));

    let mut raw = vec![0u8; BUFFER + 4096];
    let offset = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[offset..offset + BUFFER];
    let started = Instant::now();
    let mut total = 0u64;
    'files: for (_, path) in files {
        let direct = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOATIME)
            .open(&path);
        let Ok(mut handle) = direct.or_else(|_| File::open(&path)) else {
            continue;
        };
        loop {
            let n = match handle.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => match File::open(&path) {
                    // O_DIRECT accepted at open but refused at read (some file systems).
                    Ok(buffered) if total == 0 => {
                        handle = buffered;
                        continue;
                    }
                    _ => break,
                },
            };
            total += n as u64;
            if total >= LIMIT_BYTES || started.elapsed() >= LIMIT_TIME {
                break 'files;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if total == 0 || secs <= 0.0 {
        return 0;
    }
    (total as f64 / secs) as u64
}

/// Nice 19 and the idle I/O class for the calling thread (Linux keeps both per thread), so a
/// rate-limited sweep yields the CPU and the disk to anything else. Failures are logged: a
/// scan at normal priority is still a scan.
pub fn lower_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_IDLE: libc::c_int = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: plain syscalls on integers, naming this thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
        tracing::warn!(
            "could not lower the scanner's CPU priority: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: as above; ioprio_set has no libc wrapper.
    let set = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if set != 0 {
        tracing::warn!(
            "could not put the scanner in the idle I/O class: {}",
            io::Error::last_os_error()
        );
    }
}

/// The default exclusions as filter lines: the contents (not the directories themselves) of
/// places that hold state, scratch or kernel views rather than what an image installs.
pub fn default_exclusions() -> Vec<String> {
    [
        "/tmp",
        "/var/tmp",
        "/var/log",
        "/var/mail",
        "/var/spool",
        "/home",
        "/data",
        "/proc",
        "/sys",
        "/dev",
        "/run",
    ]
    .iter()
    .map(|dir| format!("{dir}/.*"))
    .collect()
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    use dom_storage::image::Kind;

    use super::*;

    fn config(root: &Path, strict: bool) -> ScanConfig {
        ScanConfig {
            root: root.to_owned(),
            excluded: Filter::empty(),
            bytes_per_sec: None,
            one_file_system: true,
            strict,
        }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn owner(path: &Path) -> (u32, u32, u32) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.mode() & 0o7777, meta.uid(), meta.gid())
    }

    /// A small tree with every kind of entry, and its manifest written out by hand.
    fn make_tree(root: &Path) -> Manifest {
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("var/empty")).unwrap();
        chmod(&root.join("var/empty"), 0o700);
        std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::hard_link(root.join("etc/passwd"), root.join("usr/bin/passwd-copy")).unwrap();
        std::fs::hard_link(root.join("etc/passwd"), root.join("etc/a-passwd")).unwrap();
        std::fs::write(root.join("etc/ssh/sshd_config"), b"Port 22\n").unwrap();
        chmod(&root.join("etc/ssh/sshd_config"), 0o600);
        std::fs::write(root.join("usr/bin/tool"), vec![7u8; 3 * BUFFER + 17]).unwrap();
        chmod(&root.join("usr/bin/tool"), 0o4755);
        std::fs::write(root.join("etc/empty"), b"").unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", root.join("usr/bin/pw")).unwrap();

        let dir = |path: &str| {
            let (mode, uid, gid) = owner(&root.join(path.trim_start_matches('/')));
            Entry::directory(path, mode, uid, gid)
        };
        let file = |path: &str, content: &[u8]| {
            let (mode, uid, gid) = owner(&root.join(&path[1..]));
            let hash = *blake3::hash(content).as_bytes();
            Entry::file(path, mode, uid, gid, content.len() as u64, hash)
        };
        let (_, uid, gid) = owner(&root.join("usr/bin/pw"));
        Manifest::new(vec![
            dir("/"),
            dir("/etc"),
            // The first name in tree order holds the content.
            file("/etc/a-passwd", b"root:x:0:0::/root:/bin/sh\n"),
            file("/etc/empty", b""),
            Entry::hard_link("/etc/passwd", "/etc/a-passwd"),
            dir("/etc/ssh"),
            file("/etc/ssh/sshd_config", b"Port 22\n"),
            dir("/usr"),
            dir("/usr/bin"),
            Entry::hard_link("/usr/bin/passwd-copy", "/etc/a-passwd"),
            Entry::symlink("/usr/bin/pw", uid, gid, "../../etc/passwd"),
            file("/usr/bin/tool", &vec![7u8; 3 * BUFFER + 17]),
            dir("/var"),
            dir("/var/empty"),
        ])
        .unwrap()
    }

    /// Lets files written now become older than the racy window, so a metadata pass trusts
    /// what the full sweep read.
    fn age() {
        std::thread::sleep(RACY_WINDOW + Duration::from_millis(100));
    }

    #[test]
    fn a_scan_equals_the_manifest_written_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        for strict in [true, false] {
            let tree = scan(&config(dir.path(), strict), None, true).unwrap();
            assert_eq!(tree.entries(), expected.entries());
            assert_eq!(tree.root_hash(), expected.root_hash());
            assert_eq!(tree.manifest().unwrap().root_hash(), expected.root_hash());
            assert_eq!(tree.len(), expected.entries().len());
            assert_eq!(tree.get("/etc/passwd").unwrap().kind, Kind::HardLink);
            assert_eq!(tree.bytes_read(), expected.bytes());
            assert_eq!(tree.files_read(), 4);
            assert_eq!((tree.skipped(), tree.excluded()), (0, 0));
            assert!(tree.mount_points().is_empty());
        }
    }

    #[test]
    fn a_paced_scan_gives_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        let mut config = config(dir.path(), false);
        config.bytes_per_sec = Some(1 << 40);
        let tree = scan(&config, None, true).unwrap();
        assert_eq!(tree.root_hash(), expected.root_hash());
    }

    #[test]
    fn exclusions_skip_a_subtree_but_not_the_directory_itself() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        std::fs::create_dir_all(dir.path().join("tmp/deep/er")).unwrap();
        std::fs::write(dir.path().join("tmp/deep/er/junk"), b"junk").unwrap();
        chmod(&dir.path().join("tmp"), 0o1777);
        let mut config = config(dir.path(), true);
        config.excluded = Filter::new(vec!["/tmp/.*".into(), "/usr/bin".into()]).unwrap();
        let tree = scan(&config, None, true).unwrap();
        assert_eq!(tree.get("/tmp").unwrap().mode, 0o1777);
        assert!(tree.get("/tmp/deep").is_none());
        assert!(tree.get("/usr/bin").is_none());
        assert!(tree.get("/usr").is_some());
        assert_eq!(tree.excluded(), 2, "an excluded directory counts once");
        // What is left equals the image's root over the paths its filter keeps.
        let tmp = dir.path().join("tmp");
        let (mode, uid, gid) = owner(&tmp);
        let mut entries = expected.entries().to_vec();
        entries.push(Entry::directory("/tmp", mode, uid, gid));
        let keep = |p: &str| !config.excluded.excludes(p);
        let with_tmp = Manifest::new(entries).unwrap();
        assert_eq!(tree.root_hash(), with_tmp.root_hash_where(keep));
        assert_eq!(
            tree.bytes_read(),
            expected.bytes() - (3 * BUFFER as u64 + 17)
        );
    }

    #[test]
    fn the_metadata_pass_reads_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        age();
        let config = config(dir.path(), false);
        let full = scan(&config, None, true).unwrap();
        assert_eq!(full.bytes_read(), expected.bytes());

        let quiet = scan(&config, Some(&full), false).unwrap();
        assert_eq!(quiet.bytes_read(), 0, "nothing changed, nothing read");
        assert_eq!(quiet.root_hash(), expected.root_hash());
        let again = scan(&config, Some(&quiet), false).unwrap();
        assert_eq!(again.bytes_read(), 0, "hashes carry over from pass to pass");

        // Same size, new content, and the mtime put back as it was: ctime still moves.
        let config_path = dir.path().join("etc/ssh/sshd_config");
        let mtime = std::fs::metadata(&config_path).unwrap().modified().unwrap();
        std::fs::write(&config_path, b"Port 23\n").unwrap();
        File::options()
            .write(true)
            .open(&config_path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let changed = scan(&config, Some(&again), false).unwrap();
        assert_eq!(changed.bytes_read(), 8, "only the changed file is read");
        assert_eq!(
            changed.get("/etc/ssh/sshd_config").unwrap().hash,
            *blake3::hash(b"Port 23\n").as_bytes()
        );
        assert_ne!(changed.root_hash(), expected.root_hash());

        // A mode change.
        chmod(&dir.path().join("usr/bin/tool"), 0o755);
        let chmodded = scan(&config, Some(&changed), false).unwrap();
        assert_eq!(chmodded.get("/usr/bin/tool").unwrap().mode, 0o755);
        let truth = scan(&config, None, true).unwrap();
        assert_eq!(chmodded.root_hash(), truth.root_hash());
        assert_eq!(chmodded.entries(), truth.entries());

        // `full` reads everything whatever the previous tree says.
        let swept = scan(&config, Some(&chmodded), true).unwrap();
        assert_eq!(swept.bytes_read(), expected.bytes() - 8 + 8);
    }

    #[test]
    fn a_file_changed_right_after_its_read_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fresh"), b"one").unwrap();
        let config = config(dir.path(), false);
        let full = scan(&config, None, true).unwrap();
        // Written less than the racy window before the sweep: the timestamps cannot be trusted
        // to show a later write, so the next pass reads it again.
        let next = scan(&config, Some(&full), false).unwrap();
        assert_eq!(next.bytes_read(), 3);
    }

    #[test]
    fn special_files_are_skipped_by_the_agent_and_refused_by_ingest() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        let fifo = CString::new(dir.path().join("etc/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();

        let tree = scan(&config(dir.path(), false), None, true).unwrap();
        assert_eq!(tree.skipped(), 2);
        assert_eq!(tree.root_hash(), expected.root_hash());

        let error = scan(&config(dir.path(), true), None, true).unwrap_err();
        assert!(matches!(error, ScanError::Special(_)), "{error}");
        assert!(error.to_string().contains("device node, FIFO or socket"));
    }

    #[test]
    fn non_utf8_names_are_skipped_by_the_agent_and_refused_by_ingest() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
        std::fs::write(dir.path().join("etc").join(latin1), b"x").unwrap();
        let tree = scan(&config(dir.path(), false), None, true).unwrap();
        assert_eq!(tree.skipped(), 1);
        assert_eq!(tree.root_hash(), expected.root_hash());
        let error = scan(&config(dir.path(), true), None, true).unwrap_err();
        assert!(error.to_string().contains("is not valid UTF-8"), "{error}");
    }

    #[test]
    fn a_path_that_vanishes_mid_scan_is_skipped_by_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        std::fs::write(dir.path().join("etc/doomed"), b"soon gone").unwrap();
        // Between the walk and the reads: the walk saw both, the reads find neither.
        let remove = |_: &Path| {
            let root = dir.path().to_owned();
            move |p: Progress| {
                if matches!(p, Progress::Walked { .. }) {
                    let _ = std::fs::remove_file(root.join("etc/doomed"));
                    let _ = std::fs::remove_file(root.join("etc/a-passwd"));
                }
            }
        };
        let tree = scan_with_progress(&config(dir.path(), false), None, true, &remove(dir.path()))
            .unwrap();
        assert_eq!(tree.skipped(), 2);
        assert!(tree.get("/etc/doomed").is_none());
        // The holder of a hard-linked file vanished: the next name holds the content.
        assert!(tree.get("/etc/a-passwd").is_none());
        assert_eq!(tree.get("/etc/passwd").unwrap().kind, Kind::File);
        assert_eq!(
            tree.get("/usr/bin/passwd-copy").unwrap().link_target,
            "/etc/passwd"
        );
        assert_eq!(
            tree.root_hash(),
            scan(&config(dir.path(), false), None, true)
                .unwrap()
                .root_hash()
        );

        std::fs::write(dir.path().join("etc/doomed"), b"soon gone").unwrap();
        let error = scan_with_progress(&config(dir.path(), true), None, true, &remove(dir.path()))
            .unwrap_err();
        assert!(matches!(error, ScanError::Io { .. }), "{error}");
    }

    #[test]
    fn progress_reports_the_total_then_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let expected = make_tree(dir.path());
        let events = Mutex::new(Vec::new());
        let record = |p: Progress| events.lock().unwrap().push(p);
        scan_with_progress(&config(dir.path(), true), None, true, &record).unwrap();
        let events = events.into_inner().unwrap();
        assert_eq!(
            events[0],
            Progress::Walked {
                files: 4,
                bytes: expected.bytes()
            }
        );
        let read: u64 = events[1..]
            .iter()
            .map(|p| match p {
                Progress::Read(n) => *n,
                other => panic!("{other:?} after the walk"),
            })
            .sum();
        assert_eq!(read, expected.bytes());
    }

    #[test]
    fn other_file_systems_are_not_descended() {
        // /dev is its own file system on Linux and usually has others mounted under it
        // (/dev/pts, /dev/shm); where it has none, there is nothing to check.
        let dev = Path::new("/dev");
        let Ok(root) = std::fs::metadata(dev) else {
            return;
        };
        let mounts: Vec<String> = std::fs::read_dir(dev)
            .unwrap()
            .flatten()
            .filter(|e| {
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                m.is_dir() && m.dev() != root.dev()
            })
            .map(|e| format!("/{}", e.file_name().to_string_lossy()))
            .collect();
        let tree = scan(&config(dev, false), None, false).unwrap();
        let mut found = tree.mount_points().to_vec();
        found.sort();
        let mut mounts = mounts;
        mounts.sort();
        assert_eq!(found, mounts);
        for mount in &mounts {
            assert_eq!(tree.get(mount).unwrap().kind, Kind::Directory);
            assert!(
                !tree
                    .entries()
                    .iter()
                    .any(|e| e.path.starts_with(&format!("{mount}/"))),
                "{mount} was descended"
            );
        }
    }

    #[test]
    fn the_pacer_charges_each_read_at_the_rate() {
        let mut pacer = Pacer::new(1_000_000, 0);
        let ms = Duration::from_millis;
        // Half a second's worth of bytes read at once: wait half a second.
        assert_eq!(pacer.after_read(ms(0), 500_000), ms(500));
        // Reading again on time: the next half second.
        assert_eq!(pacer.after_read(ms(500), 500_000), ms(500));
        // Early: the wait covers the remaining debt too.
        assert_eq!(pacer.after_read(ms(900), 100_000), ms(200));
        // Idle for ten seconds earns no burst.
        assert_eq!(pacer.after_read(ms(11_100), 1_000), ms(1));
        // With a burst of one read, the time a read takes is part of its cost: reads that take
        // 1 ms and cost 12.5 ms each go every 12.5 ms, not every 13.5 ms.
        let mut pacer = Pacer::new(8_000, 100);
        let (mut now, mut starts) = (Duration::ZERO, Vec::new());
        for _ in 0..5 {
            starts.push(now);
            now += ms(1);
            now += pacer.after_read(now, 100);
        }
        // The first two go at once: the burst, and the read the burst was paying for.
        assert_eq!(starts[1], ms(1));
        assert_eq!(starts[3] - starts[2], Duration::from_micros(12_500));
        assert_eq!(starts[4] - starts[3], Duration::from_micros(12_500));
        // A zero rate is treated as one byte a second rather than dividing by zero.
        assert_eq!(
            Pacer::new(0, 0).after_read(ms(0), 2),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn a_paced_sweep_averages_the_rate() {
        // A simulated clock: every read takes 1 ms, and the sweep sleeps as told.
        let rate = 10 << 20;
        let mut pacer = Pacer::new(rate, PACED_BUFFER as u64);
        let mut now = Duration::ZERO;
        let total: u64 = 1 << 30;
        let mut read = 0;
        while read < total {
            let n = (PACED_BUFFER as u64).min(total - read);
            now += Duration::from_millis(1);
            read += n;
            now += pacer.after_read(now, n);
        }
        // Within one burst of the exact figure (the last read's wait is not slept).
        let expected = total as f64 / rate as f64;
        let burst = PACED_BUFFER as f64 / rate as f64;
        assert!(
            (now.as_secs_f64() - expected).abs() <= burst + 0.001,
            "{now:?} for {expected} s"
        );
    }

    #[test]
    fn default_exclusions_leave_the_directories_but_not_their_contents() {
        let filter = Filter::new(default_exclusions()).unwrap();
        for dir in ["/tmp", "/var/log", "/proc", "/home", "/run"] {
            assert!(!filter.excludes(dir), "{dir}");
            assert!(filter.excludes(&format!("{dir}/x")), "{dir}/x");
            assert!(filter.excludes(&format!("{dir}/x/y")), "{dir}/x/y");
        }
        assert!(!filter.excludes("/etc/passwd"));
        assert!(!filter.excludes("/tmpfiles"));
        assert!(!filter.excludes("/var/lib/x"));
    }

    #[test]
    fn lower_priority_applies_to_the_calling_thread() {
        std::thread::spawn(|| {
            lower_priority();
            // SAFETY: plain syscalls on this thread.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
            assert_eq!(nice, 19);
            let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid) };
            assert_eq!(ioprio >> 13, 3, "idle class");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn read_speed_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![1u8; 8 << 20]).unwrap();
        assert!(measure_read_speed(dir.path()) > 0);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(measure_read_speed(empty.path()), 0);
    }
}
