//! `domadm demo --exit-when-converged`, run as a user would: the fleet ends on the second
//! image, every machine's root is exactly that image's tree, and nothing the demo started is
//! left running.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// What a tree holds at each path below its top: kind, mode and content (or link target).
fn tree(top: &Path) -> BTreeMap<String, (String, u32, Vec<u8>)> {
    let mut entries = BTreeMap::new();
    for entry in walkdir::WalkDir::new(top).min_depth(1) {
        let entry = entry.unwrap();
        let path = entry.path();
        let meta = std::fs::symlink_metadata(path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let value = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).unwrap();
            (
                "symlink".into(),
                0,
                target.into_os_string().into_encoded_bytes(),
            )
        } else if meta.is_dir() {
            ("dir".into(), mode, Vec::new())
        } else {
            ("file".into(), mode, std::fs::read(path).unwrap())
        };
        let relative = path.strip_prefix(top).unwrap().display().to_string();
        entries.insert(relative, value);
    }
    entries
}

/// Whether process `pid` runs and mentions `dir` on its command line.
fn running_in(pid: &str, dir: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(dir))
        .unwrap_or(false)
}

#[test]
fn the_demo_converges_on_the_second_image_and_leaves_nothing_running() {
    let temp = tempfile::TempDir::new().unwrap();
    let dir = std::fs::canonicalize(temp.path()).unwrap();
    let started = Instant::now();
    let out = Command::new(dom_tests::bin("domadm"))
        .args(["demo", "--exit-when-converged", "--machines", "3", "--dir"])
        .arg(&dir)
        .env("USER", "tester")
        .stdin(Stdio::null())
        .output()
        .expect("run domadm demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}) after {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status,
        started.elapsed()
    );
    assert!(
        stdout.contains("every machine is compliant on demo/v2"),
        "{stdout}"
    );

    // Each machine is the second image, exactly: the source tree the demo ingested.
    let image = tree(&dir.join("images/v2"));
    assert!(image.len() > 30, "a sample image of a few dozen paths");
    for host in ["m1", "m2", "m3"] {
        let root = dir.join("roots").join(host);
        assert_eq!(tree(&root), image, "{host}'s root is not demo/v2");
        let conf = std::fs::read_to_string(root.join("etc/app/app.conf")).unwrap();
        assert!(conf.contains("version = 2"), "{host}: {conf}");
        assert!(!root
            .join("usr/share/doc/app/examples/example-08.conf")
            .exists());
        // The trigger stopped app on the old app.conf and started it on the new.
        let services =
            std::fs::read_to_string(dir.join("logs").join(format!("services-{host}.log"))).unwrap();
        assert!(
            services.contains("app stop (app.conf version 1)\napp start (app.conf version 2)\n"),
            "{host}'s service calls: {services}"
        );
    }

    // Nothing the demo started outlives it.
    let pids = std::fs::read_to_string(dir.join("pids")).unwrap();
    let started: Vec<&str> = pids
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        started.len() >= 3 + 3,
        "three replicas and three agents: {pids}"
    );
    let dir_text = dir.display().to_string();
    for pid in &started {
        assert!(!running_in(pid, &dir_text), "process {pid} still runs");
    }
    let strays: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.chars().all(|c| c.is_ascii_digit()))
        .filter(|pid| running_in(pid, &dir_text))
        .collect();
    assert!(
        strays.is_empty(),
        "processes left in {dir_text}: {strays:?}"
    );
}
