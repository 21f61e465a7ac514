//! The manifest: every path of an image in tree order, checked to be a well-formed tree.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use dom_proto::v1 as pb;
use prost::Message;

use crate::event::Hash;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    File,
    Directory,
    Symlink,
    /// Another name for the regular file at `link_target`.
    HardLink,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Absolute, normalized: `/`, `/etc`, `/etc/passwd`.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files: content size and blake3; zero otherwise.
    pub size: u64,
    pub hash: Hash,
    /// Symlinks: the target as written; hard links: the path of the file.
    pub link_target: String,
}

impl Entry {
    pub fn directory(path: &str, mode: u32, uid: u32, gid: u32) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: Kind::Directory,
            mode,
            uid,
            gid,
            size: 0,
            hash: [0; 32],
            link_target: String::new(),
        }
    }

    pub fn file(path: &str, mode: u32, uid: u32, gid: u32, size: u64, hash: Hash) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: Kind::File,
            mode,
            uid,
            gid,
            size,
            hash,
            link_target: String::new(),
        }
    }

    pub fn symlink(path: &str, uid: u32, gid: u32, target: &str) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: Kind::Symlink,
            mode: 0o777,
            uid,
            gid,
            size: 0,
            hash: [0; 32],
            link_target: target.to_owned(),
        }
    }

    pub fn hard_link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: Kind::HardLink,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            hash: [0; 32],
            link_target: target.to_owned(),
        }
    }

    /// The parent directory's path; `None` for the root.
    pub fn parent(&self) -> Option<&str> {
        parent(&self.path)
    }
}

pub(crate) fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    path.rfind('/')
        .map(|i| if i == 0 { "/" } else { &path[..i] })
}

/// Compares paths component by component, so that a directory's contents sort right after it
/// (`/a`, `/a/b`, `/a.b`), which plain string order does not give.
pub fn tree_cmp(a: &str, b: &str) -> Ordering {
    a.split('/')
        .filter(|c| !c.is_empty())
        .cmp(b.split('/').filter(|c| !c.is_empty()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("path {0:?} is absolute inside the source")]
    Absolute(String),
    #[error("path {0:?} climbs out with '..'")]
    DotDot(String),
    #[error("path {0:?} is empty or has an empty name")]
    Empty(String),
    #[error("path {0:?} has a NUL byte")]
    Nul(String),
    #[error("path {0:?} appears twice")]
    Duplicate(String),
    #[error(
        "path {path:?} lies under {through:?}, which is a symlink: it would escape through it"
    )]
    ThroughSymlink { path: String, through: String },
    #[error("path {path:?} lies under {parent:?}, which is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    #[error("the manifest has no root directory")]
    NoRoot,
    #[error("hard link {path:?} names {target:?}, which is not a regular file of the image")]
    HardLinkTarget { path: String, target: String },
    #[error("manifest is not valid protobuf: {0}")]
    Malformed(String),
    #[error("manifest entry {0:?} has an unknown kind")]
    UnknownKind(String),
    #[error("manifest entry {0:?} has a hash that is not 32 bytes")]
    BadHash(String),
}

/// Makes a relative path from a source (`./etc/x`, `etc/x/`) absolute and canonical
/// (`/etc/x`), refusing absolute paths and `..`. `.` and `` name the root.
pub fn normalize_path(raw: &str) -> Result<String, ManifestError> {
    if raw.contains('\0') {
        return Err(ManifestError::Nul(raw.to_owned()));
    }
    if raw.starts_with('/') {
        return Err(ManifestError::Absolute(raw.to_owned()));
    }
    let mut parts = Vec::new();
    for component in raw.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(ManifestError::DotDot(raw.to_owned())),
            name => parts.push(name),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Whether `path` is an absolute path in the canonical form `normalize_path` gives (`/`,
/// `/etc/x`): what a manifest entry's path must be when it comes from the network.
pub fn is_normalized(path: &str) -> bool {
    path.strip_prefix('/')
        .is_some_and(|rest| normalize_path(rest).is_ok_and(|p| p == path))
}

/// A checked manifest: tree order, unique paths, a root directory, every parent a directory,
/// hard links naming files of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
}

impl Manifest {
    pub fn new(mut entries: Vec<Entry>) -> Result<Manifest, ManifestError> {
        entries.sort_by(|a, b| tree_cmp(&a.path, &b.path));
        canonical_hard_links(&mut entries);
        let mut kinds: BTreeMap<&str, Kind> = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            if i > 0 && entries[i - 1].path == entry.path {
                return Err(ManifestError::Duplicate(entry.path.clone()));
            }
            if !entry.path.starts_with('/')
                || (entry.path.len() > 1 && entry.path.ends_with('/'))
                || entry.path.contains("//")
            {
                return Err(ManifestError::Empty(entry.path.clone()));
            }
            if entry.path.split('/').any(|c| c == "." || c == "..") {
                return Err(ManifestError::DotDot(entry.path.clone()));
            }
            match entry.parent() {
                None if entry.kind != Kind::Directory => {
                    return Err(ManifestError::ParentNotDirectory {
                        path: "/".into(),
                        parent: "/".into(),
                    })
                }
                None => {}
                Some(parent) => match kinds.get(parent) {
                    Some(Kind::Directory) => {}
                    Some(Kind::Symlink) => {
                        return Err(ManifestError::ThroughSymlink {
                            path: entry.path.clone(),
                            through: parent.to_owned(),
                        })
                    }
                    _ => {
                        return Err(ManifestError::ParentNotDirectory {
                            path: entry.path.clone(),
                            parent: parent.to_owned(),
                        })
                    }
                },
            }
            kinds.insert(&entry.path, entry.kind);
        }
        if kinds.get("/") != Some(&Kind::Directory) {
            return Err(ManifestError::NoRoot);
        }
        for entry in entries.iter().filter(|e| e.kind == Kind::HardLink) {
            if kinds.get(entry.link_target.as_str()) != Some(&Kind::File) {
                return Err(ManifestError::HardLinkTarget {
                    path: entry.path.clone(),
                    target: entry.link_target.clone(),
                });
            }
        }
        Ok(Manifest { entries })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| tree_cmp(&e.path, path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Regular files (hard links not counted again).
    pub fn files(&self) -> u64 {
        self.entries.iter().filter(|e| e.kind == Kind::File).count() as u64
    }

    /// Content bytes of the regular files.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.size)
            .sum()
    }

    /// Each distinct content hash once, in order.
    pub fn object_hashes(&self) -> Vec<Hash> {
        let mut hashes: Vec<Hash> = self
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.hash)
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    pub fn encode(&self) -> Vec<u8> {
        pb::Manifest {
            entries: self.entries.iter().map(entry_to_pb).collect(),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let message =
            pb::Manifest::decode(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        Manifest::new(
            message
                .entries
                .into_iter()
                .map(entry_from_pb)
                .collect::<Result<_, _>>()?,
        )
    }
}

/// Among the names of one file, the first in tree order holds the content and metadata and the
/// others are hard links to it, whatever order the source listed them in, so one tree always
/// gives one manifest (and one root hash), and writing in tree order finds each link's target
/// already there.
fn canonical_hard_links(entries: &mut [Entry]) {
    let index: BTreeMap<String, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        if entry.kind == Kind::HardLink {
            if let Some(&target) = index.get(&entry.link_target) {
                if entries[target].kind == Kind::File {
                    groups.entry(target).or_default().push(i);
                }
            }
        }
    }
    for (file, links) in groups {
        let first = links.iter().copied().chain([file]).min().unwrap_or(file);
        let first_path = entries[first].path.clone();
        if first != file {
            let mut holder = entries[file].clone();
            holder.path = first_path.clone();
            let demoted = Entry::hard_link(&entries[file].path, &first_path);
            entries[first] = holder;
            entries[file] = demoted;
        }
        for link in links.into_iter().filter(|l| *l != first) {
            entries[link].link_target = first_path.clone();
        }
    }
}

pub fn entry_to_pb(e: &Entry) -> pb::ManifestEntry {
    let kind = match e.kind {
        Kind::File => pb::EntryKind::File,
        Kind::Directory => pb::EntryKind::Directory,
        Kind::Symlink => pb::EntryKind::Symlink,
        Kind::HardLink => pb::EntryKind::HardLink,
    };
    pb::ManifestEntry {
        path: e.path.clone(),
        kind: kind as i32,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        hash: if e.kind == Kind::File {
            e.hash.to_vec()
        } else {
            Vec::new()
        },
        link_target: e.link_target.clone(),
    }
}

pub fn entry_from_pb(e: pb::ManifestEntry) -> Result<Entry, ManifestError> {
    let kind = match pb::EntryKind::try_from(e.kind) {
        Ok(pb::EntryKind::File) => Kind::File,
        Ok(pb::EntryKind::Directory) => Kind::Directory,
        Ok(pb::EntryKind::Symlink) => Kind::Symlink,
        Ok(pb::EntryKind::HardLink) => Kind::HardLink,
        _ => return Err(ManifestError::UnknownKind(e.path)),
    };
    let hash = if kind == Kind::File {
        e.hash
            .as_slice()
            .try_into()
            .map_err(|_| ManifestError::BadHash(e.path.clone()))?
    } else {
        [0; 32]
    };
    Ok(Entry {
        path: e.path,
        kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        hash,
        link_target: e.link_target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Vec<Entry> {
        vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::directory("/etc", 0o755, 0, 0),
            Entry::file("/etc/passwd", 0o644, 0, 0, 5, [1; 32]),
            Entry::hard_link("/etc/passwd-", "/etc/passwd"),
            Entry::symlink("/etc/localtime", 0, 0, "/usr/share/zoneinfo/UTC"),
            Entry::directory("/etc.d", 0o700, 1, 1),
        ]
    }

    #[test]
    fn tree_order_keeps_a_directory_with_its_contents() {
        let manifest = Manifest::new(sample()).unwrap();
        let paths: Vec<&str> = manifest.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/",
                "/etc",
                "/etc/localtime",
                "/etc/passwd",
                "/etc/passwd-",
                "/etc.d"
            ]
        );
        assert_eq!(manifest.get("/etc/passwd").map(|e| e.size), Some(5));
        assert_eq!((manifest.files(), manifest.bytes()), (1, 5));
    }

    #[test]
    fn encoding_round_trips() {
        let manifest = Manifest::new(sample()).unwrap();
        assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
    }

    #[test]
    fn malformed_trees_are_refused() {
        let with = |extra: Entry| {
            let mut entries = sample();
            entries.push(extra);
            Manifest::new(entries)
        };
        assert!(matches!(
            with(Entry::file("/etc/passwd", 0o644, 0, 0, 1, [2; 32])),
            Err(ManifestError::Duplicate(_))
        ));
        assert!(matches!(
            with(Entry::file("/etc/localtime/x", 0o644, 0, 0, 1, [2; 32])),
            Err(ManifestError::ThroughSymlink { .. })
        ));
        assert!(matches!(
            with(Entry::file("/etc/passwd/x", 0o644, 0, 0, 1, [2; 32])),
            Err(ManifestError::ParentNotDirectory { .. })
        ));
        assert!(matches!(
            with(Entry::file("/usr/x", 0o644, 0, 0, 1, [2; 32])),
            Err(ManifestError::ParentNotDirectory { .. })
        ));
        assert!(matches!(
            with(Entry::hard_link("/etc/x", "/etc/localtime")),
            Err(ManifestError::HardLinkTarget { .. })
        ));
        assert!(matches!(
            with(Entry::hard_link("/etc/x", "/outside")),
            Err(ManifestError::HardLinkTarget { .. })
        ));
        assert!(matches!(Manifest::new(vec![]), Err(ManifestError::NoRoot)));
    }

    #[test]
    fn the_first_name_in_tree_order_holds_a_hard_linked_file() {
        let listed_late_first = vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::file("/b", 0o600, 1, 1, 3, [4; 32]),
            Entry::hard_link("/a", "/b"),
            Entry::hard_link("/c", "/b"),
        ];
        let manifest = Manifest::new(listed_late_first).unwrap();
        let expected = Manifest::new(vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::file("/a", 0o600, 1, 1, 3, [4; 32]),
            Entry::hard_link("/b", "/a"),
            Entry::hard_link("/c", "/a"),
        ])
        .unwrap();
        assert_eq!(manifest, expected);
    }

    #[test]
    fn source_paths_are_normalized_or_refused() {
        assert_eq!(normalize_path("./etc/x/").unwrap(), "/etc/x");
        assert_eq!(normalize_path(".").unwrap(), "/");
        assert!(matches!(
            normalize_path("/etc/x"),
            Err(ManifestError::Absolute(_))
        ));
        assert!(matches!(
            normalize_path("etc/../../x"),
            Err(ManifestError::DotDot(_))
        ));
    }
}
