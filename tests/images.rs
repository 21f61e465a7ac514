//! Images on a real three-replica cluster: ingestion from every source kind, exact
//! materialization, deduplicated uploads, hostile input, replication and garbage collection.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dom_tests::{wait_for, Cluster};

/// A tree with every kind of entry and a few awkward modes.
fn make_tree(root: &Path, files: usize, seed: u8) {
    let dir = |p: &str, mode: u32| {
        std::fs::create_dir_all(root.join(p)).unwrap();
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    dir("etc/ssh", 0o755);
    dir("usr/bin", 0o755);
    dir("var/empty", 0o700);
    for i in 0..files {
        let content: Vec<u8> = (0..(i * 97 % 5000))
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8))
            .collect();
        std::fs::write(root.join(format!("usr/bin/tool-{i:03}")), content).unwrap();
    }
    std::fs::write(
        root.join("etc/ssh/sshd_config"),
        format!("Port 22\n# {seed}\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("etc/ssh/sshd_config"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(root.join("usr/bin/suid"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::write(root.join("etc/empty"), b"").unwrap();
    std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::hard_link(root.join("etc/passwd"), root.join("etc/passwd-")).unwrap();
    std::os::unix::fs::symlink("../../etc/passwd", root.join("usr/bin/pw")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("etc/dangling")).unwrap();
}

/// The tree as GNU tar writes it (the tar crate's builder does not keep hard links).
fn tar_of(root: &Path) -> Vec<u8> {
    let out = std::process::Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(root)
        .args(["-cf", "-", "."])
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Everything `image get` must reproduce: per path, kind, mode, content or target, and which
/// paths share an inode.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let meta = entry.path().symlink_metadata().unwrap();
        let what = if meta.is_dir() {
            format!("dir {:o}", meta.mode() & 0o7777)
        } else if meta.file_type().is_symlink() {
            format!(
                "link {}",
                std::fs::read_link(entry.path()).unwrap().display()
            )
        } else {
            let first = inodes
                .entry(meta.ino())
                .or_insert_with(|| rel.clone())
                .clone();
            let content = blake3::hash(&std::fs::read(entry.path()).unwrap())
                .to_hex()
                .to_string();
            format!(
                "file {:o} {} same-as {}",
                meta.mode() & 0o7777,
                content,
                first
            )
        };
        out.insert(rel, what);
    }
    out
}

fn added_root(cluster: &Cluster, name: &str) -> String {
    let images = cluster.domadm_json(&["image", "list"]);
    let image = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed"));
    image["root_hash"].as_str().unwrap().to_owned()
}

fn add(cluster: &Cluster, name: &str, source: &Path, extra: &[&str]) -> std::process::Output {
    let source = source.to_str().unwrap();
    let mut args = vec!["image", "add", name, source];
    args.extend(extra);
    cluster.domadm(&args)
}

fn add_ok(cluster: &Cluster, name: &str, source: &Path) -> String {
    let out = add(cluster, name, source, &[]);
    assert!(
        out.status.success(),
        "image add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn objects_on(cluster: &Cluster, id: u64) -> usize {
    let dir = cluster.replicas[&id].data_dir.join("objects");
    walkdir::WalkDir::new(&dir)
        .min_depth(2)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && !e.path().starts_with(dir.join("tmp")))
        .count()
}

#[test]
fn every_source_kind_gives_one_root_and_get_reproduces_the_tree() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    make_tree(&tree, 40, 1);
    let tar = tar_of(&tree);
    let plain = work.path().join("tree.tar");
    std::fs::write(&plain, &tar).unwrap();
    let gz = work.path().join("tree.tar.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    encoder.write_all(&tar).unwrap();
    encoder.finish().unwrap();
    let zst = work.path().join("tree.tar.zst");
    std::fs::write(&zst, zstd::encode_all(tar.as_slice(), 3).unwrap()).unwrap();

    let sources: [(&str, &PathBuf); 4] = [
        ("os/dir", &tree),
        ("os/tar", &plain),
        ("os/gz", &gz),
        ("os/zst", &zst),
    ];
    let mut roots = Vec::new();
    for (name, source) in sources {
        add_ok(&cluster, name, source);
        roots.push(added_root(&cluster, name));
    }
    assert!(
        roots.windows(2).all(|w| w[0] == w[1]),
        "roots differ by source kind: {roots:?}"
    );

    let expected = describe(&tree);
    for name in ["os/dir", "os/gz"] {
        let out_dir = work.path().join(name.replace('/', "-"));
        let out = cluster.domadm(&["image", "get", name, out_dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "image get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = describe(&out_dir);
        // The root directory's own mode comes from the source directory, which tempfile made.
        assert_eq!(
            got.iter().skip(1).collect::<Vec<_>>(),
            expected.iter().skip(1).collect::<Vec<_>>(),
            "{name}"
        );
    }
    let again = cluster.domadm(&[
        "image",
        "get",
        "os/dir",
        work.path().join("os-dir").to_str().unwrap(),
    ]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "image get into a non-empty dir must refuse"
    );
}

#[test]
fn a_second_image_sharing_most_files_uploads_only_the_new_bytes() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let work = tempfile::tempdir().unwrap();
    let (first, second) = (work.path().join("v1"), work.path().join("v2"));
    make_tree(&first, 40, 1);
    make_tree(&second, 40, 2);
    // 4 of the 40 tools change: 10% of the files.
    for i in 0..4 {
        std::fs::write(
            second.join(format!("usr/bin/tool-{i:03}")),
            format!("new tool {i}"),
        )
        .unwrap();
    }
    let said = add_ok(&cluster, "web/1", &first);
    assert!(said.contains("uploaded"), "{said}");
    let said = add_ok(&cluster, "web/2", &second);
    // Changed: 4 tools, sshd_config and the manifest.
    assert!(
        said.contains("uploaded 6 of"),
        "second upload sent more than the changes: {said}"
    );
    let diff = cluster.domadm(&["image", "diff", "web/1", "web/2"]);
    let text = String::from_utf8_lossy(&diff.stdout);
    assert!(text.contains("0 added, 0 removed, 5 changed"), "{text}");
}

#[test]
fn hostile_sources_are_refused_whole() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let before = cluster.wait_converged();
    let work = tempfile::tempdir().unwrap();
    let entry = |path: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        // Raw names, so the archive can say what a well-behaved builder would refuse to.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        (header, data.to_vec())
    };
    let archive = |entries: Vec<(tar::Header, Vec<u8>)>| {
        let mut out = Vec::new();
        for (header, data) in entries {
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    };
    use tar::EntryType as T;
    let good = archive(vec![entry("etc/a", T::Regular, None, &[7u8; 4000])]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute.tar",
            archive(vec![entry("/etc/passwd", T::Regular, None, b"x")]),
            "absolute",
        ),
        (
            "dotdot.tar",
            archive(vec![entry("etc/../../x", T::Regular, None, b"x")]),
            "..",
        ),
        (
            "symlink-escape.tar",
            archive(vec![
                entry("etc", T::Symlink, Some("/etc"), b""),
                entry("etc/passwd", T::Regular, None, b"x"),
            ]),
            "symlink",
        ),
        (
            "hardlink-out.tar",
            archive(vec![entry("etc/x", T::Link, Some("../../etc/shadow"), b"")]),
            "outside",
        ),
        (
            "hardlink-missing.tar",
            archive(vec![entry("etc/x", T::Link, Some("etc/none"), b"")]),
            "not a regular file",
        ),
        (
            "device.tar",
            archive(vec![entry("dev/null", T::Char, None, b"")]),
            "device",
        ),
        (
            "fifo.tar",
            archive(vec![entry("run/f", T::Fifo, None, b"")]),
            "FIFO",
        ),
        (
            "collide.tar",
            archive(vec![
                entry("etc/a", T::Regular, None, b"1"),
                entry("etc/a", T::Regular, None, b"2"),
            ]),
            "twice",
        ),
        (
            "nonutf8.tar",
            archive(vec![entry("etc/caf\u{e9}", T::Regular, None, b"x")]),
            "UTF-8",
        ),
        ("truncated.tar", good[..1000].to_vec(), "truncated"),
    ];
    let mut cases = cases;
    // A Latin-1 name: one byte 0xe9, not UTF-8.
    let latin1 = cases.iter_mut().find(|c| c.0 == "nonutf8.tar").unwrap();
    let at = latin1.1.windows(3).position(|w| w == b"caf").unwrap() + 3;
    latin1.1.splice(at..at + 2, [0xe9, 0]);
    {
        let mut header = tar::Header::from_byte_slice(&latin1.1[..512]).clone();
        header.set_cksum();
        latin1.1[..512].copy_from_slice(header.as_bytes());
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let noisy: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    gz.write_all(&archive(vec![entry("etc/noise", T::Regular, None, &noisy)]))
        .unwrap();
    let mut gz = gz.finish().unwrap();
    let mid = gz.len() / 2;
    gz[mid..mid + 8].iter_mut().for_each(|b| *b ^= 0xff);
    cases.push(("corrupt.tar.gz", gz, "corrupt"));

    for (file, bytes, needle) in cases {
        let path = work.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let out = add(&cluster, "bad/image", &path, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{file} was not refused: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{file}: expected {needle:?} in {stderr:?}"
        );
    }
    let good_path = work.path().join("good.tar");
    std::fs::write(&good_path, &good).unwrap();
    std::fs::write(work.path().join("bad-filter"), "/tmp/(unclosed\n").unwrap();
    std::fs::write(
        work.path().join("bad-triggers"),
        "[{\"MatchLines\": [\"/etc/.*\"], \"Service\": ",
    )
    .unwrap();
    for (flag, file, needle) in [
        ("--filter", "bad-filter", "regular expression"),
        ("--triggers", "bad-triggers", "JSON"),
    ] {
        let out = add(
            &cluster,
            "bad/image",
            &good_path,
            &[flag, work.path().join(file).to_str().unwrap()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(stderr.contains(needle), "{file}: {stderr}");
    }
    assert_eq!(
        cluster.wait_converged(),
        before,
        "a refused image changed the log"
    );
}

#[test]
fn images_survive_a_leader_death_and_a_wiped_replica_refills() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(None);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    make_tree(&tree, 30, 3);
    add_ok(&cluster, "web/1", &tree);
    let expected = describe(&tree);
    let stored = objects_on(&cluster, leader);
    for id in 1..=3 {
        wait_for("objects on every replica", Duration::from_secs(20), || {
            (objects_on(&cluster, id) == stored).then_some(())
        });
    }

    cluster.kill(leader);
    cluster.wait_leader(Some(leader));
    let out_dir = work.path().join("after-kill");
    let out = cluster.domadm(&["image", "get", "web/1", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        describe(&out_dir).into_iter().skip(1).collect::<Vec<_>>(),
        expected.clone().into_iter().skip(1).collect::<Vec<_>>()
    );

    // Wipe the old leader's data dir entirely; it rejoins empty and refills from its peers.
    std::fs::remove_dir_all(&cluster.replicas[&leader].data_dir).unwrap();
    cluster.spawn(leader);
    cluster.wait_converged();
    wait_for(
        "the wiped replica to refill",
        Duration::from_secs(30),
        || (objects_on(&cluster, leader) == stored).then_some(()),
    );
    // And the cluster still takes images with it back.
    let second = work.path().join("tree2");
    make_tree(&second, 5, 4);
    add_ok(&cluster, "web/2", &second);
}

#[test]
fn garbage_collection_removes_exactly_what_no_live_image_references() {
    // The grace period must outlast an upload until its image commits (with 0, a collection
    // can fall between the two and the add fails, safely, asking for a re-upload).
    let cluster = Cluster::start(3, &["--gc-interval-secs", "1", "--gc-grace-secs", "5"]);
    cluster.wait_leader(None);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    make_tree(&a, 10, 1);
    make_tree(&b, 10, 2);
    std::fs::write(a.join("etc/only-in-a"), "a alone").unwrap();
    add_ok(&cluster, "app/a", &a);
    add_ok(&cluster, "app/b", &b);
    let count = |id| objects_on(&cluster, id);
    let with_both = count(1);
    // Deleting an image in use is refused; once unused, it goes, and so do its own objects.
    let host = cluster.domadm(&["machine", "add", "h1", "--required", "app/a"]);
    assert!(host.status.success());
    let refused = cluster.domadm(&["image", "delete", "app/a"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("still required"));
    assert!(cluster
        .domadm(&["machine", "remove", "h1"])
        .status
        .success());
    assert!(cluster
        .domadm(&["image", "delete", "app/a"])
        .status
        .success());
    // a's manifest, its sshd_config and only-in-a are a's alone.
    for id in 1..=3 {
        wait_for(
            "collection on every replica",
            Duration::from_secs(20),
            || (count(id) == with_both - 3).then_some(()),
        );
    }
    let out_dir = work.path().join("b-out");
    let out = cluster.domadm(&["image", "get", "app/b", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "a live image lost objects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reuse = add(&cluster, "app/a", &a, &[]);
    assert_eq!(reuse.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&reuse.stderr).contains("never reused"));
}

/// Tens of thousands of tiny files (an /etc, a /usr/share/doc) once made HTTP/2 close the
/// upload for too many small DATA frames; small objects now travel many to a message, and
/// replicas push them to each other the same way.
#[test]
fn an_image_of_many_tiny_files_uploads_and_replicates() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let src = cluster.dir.path().join("tiny");
    for i in 0..30_000 {
        let dir = src.join(format!("d{:03}", i / 200));
        if i % 200 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i}")), format!("tiny file {i}\n")).unwrap();
    }
    add_ok(&cluster, "tiny/1", &src);
    let got = cluster.dir.path().join("got");
    let out = cluster.domadm(&["image", "get", "tiny/1", got.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(describe(&got), describe(&src));
    // Every replica ends up with every object (30,000 files and the manifest).
    for id in 1..=3 {
        wait_for(
            "replicas to hold every object",
            Duration::from_secs(120),
            || (objects_on(&cluster, id) == 30_001).then_some(()),
        );
    }
}
