//! The difference between two manifests, path by path.

use std::cmp::Ordering;

use super::manifest::{tree_cmp, Entry, Manifest};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference<'a> {
    Added(&'a Entry),
    Removed(&'a Entry),
    /// Same path, different kind, metadata, content or target.
    Changed {
        from: &'a Entry,
        to: &'a Entry,
    },
}

impl Difference<'_> {
    pub fn path(&self) -> &str {
        match self {
            Difference::Added(e) | Difference::Removed(e) => &e.path,
            Difference::Changed { to, .. } => &to.path,
        }
    }
}

/// What changing `from` into `to` takes, in tree order. Both manifests are already in tree
/// order, so this is one merge pass.
pub fn diff<'a>(from: &'a Manifest, to: &'a Manifest) -> Vec<Difference<'a>> {
    let (a, b) = (from.entries(), to.entries());
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        let order = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => tree_cmp(&x.path, &y.path),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                out.push(Difference::Removed(&a[i]));
                i += 1;
            }
            Ordering::Greater => {
                out.push(Difference::Added(&b[j]));
                j += 1;
            }
            Ordering::Equal => {
                if a[i] != b[j] {
                    out.push(Difference::Changed {
                        from: &a[i],
                        to: &b[j],
                    });
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: Vec<Entry>) -> Manifest {
        let mut entries = vec![
            Entry::directory("/", 0o755, 0, 0),
            Entry::directory("/etc", 0o755, 0, 0),
        ];
        entries.extend(extra);
        Manifest::new(entries).unwrap()
    }

    #[test]
    fn added_removed_and_changed_paths_in_tree_order() {
        let a = manifest(vec![
            Entry::file("/etc/a", 0o644, 0, 0, 1, [1; 32]),
            Entry::file("/etc/b", 0o644, 0, 0, 1, [2; 32]),
            Entry::file("/etc/c", 0o644, 0, 0, 1, [3; 32]),
        ]);
        let b = manifest(vec![
            Entry::file("/etc/b", 0o600, 0, 0, 1, [2; 32]),
            Entry::file("/etc/c", 0o644, 0, 0, 1, [3; 32]),
            Entry::symlink("/etc/d", 0, 0, "c"),
        ]);
        let d = diff(&a, &b);
        let summary: Vec<(char, &str)> = d
            .iter()
            .map(|x| match x {
                Difference::Added(e) => ('+', e.path.as_str()),
                Difference::Removed(e) => ('-', e.path.as_str()),
                Difference::Changed { to, .. } => ('~', to.path.as_str()),
            })
            .collect();
        assert_eq!(summary, [('-', "/etc/a"), ('~', "/etc/b"), ('+', "/etc/d")]);
        assert!(diff(&a, &a).is_empty());
    }
}
