//! The Merkle root of an image's managed tree.
//!
//! Each entry hashes its kind, metadata and content (files: the content's blake3; symlinks:
//! the target; hard links: the path they name); a directory hashes its metadata and its
//! children's names and hashes in name order. The root is the root directory's hash. An agent
//! builds entries from a live directory and gets the same root exactly when the trees match,
//! and equal subtrees have equal hashes, so two trees can be compared top-down.

use std::collections::HashMap;

use super::manifest::{parent, Entry, Kind, Manifest};
use crate::event::Hash;

fn leaf_hash(entry: &Entry, children: Option<Vec<(&str, Hash)>>) -> Hash {
    let mut h = blake3::Hasher::new();
    let tag: &[u8] = match entry.kind {
        Kind::File => b"file",
        Kind::Directory => b"dir",
        Kind::Symlink => b"symlink",
        Kind::HardLink => b"hardlink",
    };
    h.update(tag);
    if entry.kind != Kind::HardLink {
        h.update(&entry.mode.to_be_bytes());
        h.update(&entry.uid.to_be_bytes());
        h.update(&entry.gid.to_be_bytes());
    }
    match entry.kind {
        Kind::File => {
            h.update(&entry.size.to_be_bytes());
            h.update(&entry.hash);
        }
        Kind::Symlink | Kind::HardLink => {
            h.update(&(entry.link_target.len() as u64).to_be_bytes());
            h.update(entry.link_target.as_bytes());
        }
        Kind::Directory => {
            let mut children = children.unwrap_or_default();
            children.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            for (name, hash) in children {
                h.update(&(name.len() as u64).to_be_bytes());
                h.update(name.as_bytes());
                h.update(&hash);
            }
        }
    }
    *h.finalize().as_bytes()
}

impl Manifest {
    /// The Merkle root over every entry the filter keeps (`keep` returns false for paths the
    /// image leaves alone, and their subtrees go with them).
    pub fn root_hash_where(&self, keep: impl Fn(&str) -> bool) -> Hash {
        // Children come after their parent in tree order, so walking backwards finishes every
        // directory's children before the directory itself.
        let mut children: HashMap<&str, Vec<(&str, Hash)>> = HashMap::new();
        let mut root = [0; 32];
        for entry in self.entries().iter().rev() {
            if entry.path != "/" && !keep(&entry.path) {
                children.remove(entry.path.as_str());
                continue;
            }
            let hash = leaf_hash(entry, children.remove(entry.path.as_str()));
            match parent(&entry.path) {
                Some(parent) => {
                    let name = &entry.path[entry.path.rfind('/').map_or(0, |i| i + 1)..];
                    children.entry(parent).or_default().push((name, hash));
                }
                None => root = hash,
            }
        }
        root
    }

    /// The Merkle root of the whole manifest.
    pub fn root_hash(&self) -> Hash {
        self.root_hash_where(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Entry;

    fn tree(extra: Vec<Entry>) -> Manifest {
        let mut entries = vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::directory("/etc", 0o755, 0, 0),
            Entry::file("/etc/a", 0o644, 0, 0, 1, [1; 32]),
            Entry::file("/etc/b", 0o644, 0, 0, 1, [2; 32]),
        ];
        entries.extend(extra);
        Manifest::new(entries).unwrap()
    }

    #[test]
    fn any_change_of_content_metadata_or_shape_changes_the_root() {
        let base = tree(vec![]).root_hash();
        assert_eq!(tree(vec![]).root_hash(), base, "deterministic");
        let variants = [
            tree(vec![Entry::file("/x", 0o644, 0, 0, 0, [0; 32])]),
            tree(vec![Entry::directory("/x", 0o755, 0, 0)]),
            tree(vec![Entry::symlink("/x", 0, 0, "/etc/a")]),
            tree(vec![Entry::hard_link("/x", "/etc/a")]),
        ];
        let mut roots: Vec<Hash> = variants.iter().map(Manifest::root_hash).collect();
        roots.push(base);
        let mut unique = roots.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), roots.len(), "distinct trees share a root");

        let mut entries = tree(vec![]).entries().to_vec();
        entries[2].mode = 0o600;
        assert_ne!(Manifest::new(entries.clone()).unwrap().root_hash(), base);
        entries[2].mode = 0o644;
        entries[2].hash = [9; 32];
        assert_ne!(Manifest::new(entries).unwrap().root_hash(), base);
    }

    #[test]
    fn filtered_paths_do_not_count() {
        let with_tmp = tree(vec![
            Entry::directory("/tmp", 0o1777, 0, 0),
            Entry::file("/tmp/junk", 0o644, 0, 0, 3, [3; 32]),
        ]);
        let filtered = with_tmp.root_hash_where(|p| !p.starts_with("/tmp"));
        assert_eq!(filtered, tree(vec![]).root_hash());
    }
}
