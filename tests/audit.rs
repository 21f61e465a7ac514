//! The audit trail on a real cluster: replay equals the live state at every index, filters
//! return exactly the matching events, and verify finds an altered record in a copied data dir.

use std::path::Path;

use dom_tests::Cluster;
use serde_json::Value;

fn tarball(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
    let tree = dir.join(name);
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), content).unwrap();
    let tar = dir.join(format!("{name}.tar"));
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    tar
}

fn run(cluster: &Cluster, args: &[&str]) {
    let out = cluster.domadm(args);
    assert!(
        out.status.success(),
        "domadm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn indexes(log: &Value) -> Vec<u64> {
    log.as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect()
}

#[test]
fn replay_at_every_index_equals_the_live_state_then_and_filters_are_exact() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let work = tempfile::tempdir().unwrap();
    let (one, two, three) = (
        tarball(work.path(), "one", "1"),
        tarball(work.path(), "two", "2"),
        tarball(work.path(), "three", "3"),
    );
    let script: Vec<Vec<&str>> = vec![
        vec![
            "image",
            "add",
            "app/1",
            one.to_str().unwrap(),
            "--actor",
            "builder",
        ],
        vec![
            "image",
            "add",
            "app/2",
            two.to_str().unwrap(),
            "--actor",
            "builder",
        ],
        vec![
            "machine",
            "add",
            "h1",
            "--required",
            "app/1",
            "--tag",
            "role=web",
            "--actor",
            "alice",
            "--reason",
            "rack 4",
        ],
        vec![
            "machine",
            "add",
            "h2",
            "--required",
            "app/1",
            "--planned",
            "app/2",
            "--actor",
            "alice",
        ],
        vec!["machine", "add", "h3", "--actor", "bob"],
        vec![
            "machine",
            "remove",
            "h3",
            "--actor",
            "bob",
            "--reason",
            "decommissioned",
        ],
        vec![
            "image",
            "add",
            "app/3",
            three.to_str().unwrap(),
            "--actor",
            "builder",
        ],
        vec!["image", "delete", "app/3", "--actor", "carol"],
    ];
    let mut live = vec![];
    for args in &script {
        run(&cluster, args);
        live.push((
            cluster.domadm_json(&["machine", "list"]),
            cluster.domadm_json(&["image", "list"]),
        ));
    }
    for (i, (machines, images)) in live.iter().enumerate() {
        let at = (i + 1).to_string();
        let replayed = cluster.domadm_json(&["audit", "replay", "--at", &at]);
        assert_eq!(replayed["index"], i as u64 + 1);
        assert_eq!(
            &replayed["machines"], machines,
            "machines differ at index {at}"
        );
        assert_eq!(&replayed["images"], images, "images differ at index {at}");
        assert_eq!(replayed["halted"], false);
    }
    let past_end = cluster.domadm(&["audit", "replay", "--at", "99"]);
    assert_eq!(past_end.status.code(), Some(1));

    let log = |filter: &[&str]| {
        let mut args = vec!["audit", "log"];
        args.extend(filter);
        indexes(&cluster.domadm_json(&args))
    };
    assert_eq!(log(&[]), (1..=8).collect::<Vec<_>>());
    assert_eq!(log(&["--machine", "h1"]), [3]);
    assert_eq!(log(&["--machine", "H3"]), [5, 6]);
    assert_eq!(log(&["--image", "app/1"]), [1, 3, 4]);
    assert_eq!(log(&["--image", "app/2"]), [2, 4]);
    assert_eq!(log(&["--actor", "alice"]), [3, 4]);
    assert_eq!(log(&["--kind", "image_deleted"]), [8]);
    assert_eq!(log(&["--actor", "bob", "--kind", "machine_removed"]), [6]);
    assert_eq!(log(&["--since", "1h"]).len(), 8);
    assert_eq!(log(&["--until", "2000-01-01T00:00:00Z"]), Vec::<u64>::new());
    let entry = &cluster.domadm_json(&["audit", "log", "--machine", "h1"])[0];
    assert_eq!(
        (
            entry["actor"].as_str(),
            entry["reason"].as_str(),
            entry["kind"].as_str()
        ),
        (Some("alice"), Some("rack 4"), Some("machine_added"))
    );
    assert_eq!(entry["hash"].as_str().map(str::len), Some(64));
}

#[test]
fn verify_passes_a_healthy_cluster_and_finds_an_altered_record_in_a_copy() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    cluster.add_machines((1..=6).map(|i| format!("web-{i}")));
    let head = cluster.wait_converged();
    let verified = cluster.domadm_json(&["audit", "verify"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["replicas"].as_array().unwrap().len(), 3);
    assert!(verified["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["head_hash"] == head.as_str() && r["head_index"] == 6));

    // Stop a replica, copy its data dir, and change one record's event behind the chain's back.
    let id = 3;
    cluster.stop(id);
    let copy = tempfile::tempdir().unwrap();
    for part in ["sled", "journal"] {
        let source = cluster.replicas[&id].data_dir.join(part);
        for entry in walkdir::WalkDir::new(&source) {
            let entry = entry.unwrap();
            let target = copy
                .path()
                .join(part)
                .join(entry.path().strip_prefix(&source).unwrap());
            if entry.file_type().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let clean = cluster.domadm_json(&[
        "audit",
        "verify",
        "--data-dir",
        copy.path().to_str().unwrap(),
    ]);
    assert_eq!(clean["ok"], true, "{clean}");
    // Replay reads a stopped replica's journal files in place.
    let data_dir = cluster.replicas[&id].data_dir.clone();
    for (at, machines) in [("6", 6), ("2", 2)] {
        let replayed = cluster.domadm_json(&[
            "audit",
            "replay",
            "--at",
            at,
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]);
        assert_eq!(replayed["index"], at.parse::<u64>().unwrap(), "{replayed}");
        assert_eq!(replayed["machines"].as_array().unwrap().len(), machines);
    }
    {
        // Record 4's event follows its hash in the segment file; change a byte of it.
        let journal = copy.path().join("journal");
        let (_, record) = dom_storage::journal_store::read_dir(&journal)
            .unwrap()
            .map(|r| r.unwrap())
            .find(|(index, _)| *index == 4)
            .unwrap();
        let segment = std::fs::read_dir(&journal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let mut bytes = std::fs::read(&segment).unwrap();
        let event_at = bytes.windows(32).position(|w| w == record.hash).unwrap() + 32;
        let at = event_at + record.event.iter().position(|b| *b == b't').unwrap();
        bytes[at] = b'T';
        std::fs::write(&segment, bytes).unwrap();
    }
    let out = cluster.domadm(&[
        "audit",
        "verify",
        "--data-dir",
        copy.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("journal record 4"),
        "verify did not name index 4: {stderr}"
    );
}

#[test]
fn mdb_import_and_assignments_leave_a_history_an_investigator_can_read() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let work = tempfile::tempdir().unwrap();
    let tar = tarball(work.path(), "base", "base");
    for image in ["web/2026.11.01", "web/2026.11.15", "db/2026.10.20"] {
        run(&cluster, &["image", "add", image, tar.to_str().unwrap()]);
    }
    run(&cluster, &["machine", "add", "web-01", "--tag", "role=web"]);
    let mdb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../storage/testdata/fixtures/mdb.json");
    let mdb = mdb.to_str().unwrap();

    // Dry runs write nothing.
    let head = cluster.wait_converged();
    run(&cluster, &["machine", "import", mdb, "--dry-run"]);
    run(
        &cluster,
        &[
            "assign",
            "--required",
            "web/2026.11.15",
            "--selector",
            "role=web",
            "--dry-run",
        ],
    );
    assert_eq!(cluster.wait_converged(), head, "a dry run wrote to the log");

    run(
        &cluster,
        &[
            "machine",
            "import",
            mdb,
            "--actor",
            "migration",
            "--reason",
            "from Dominator",
        ],
    );
    let machines = cluster.domadm_json(&["machine", "list"]);
    let required: Vec<(&str, &str)> = machines
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["hostname"].as_str().unwrap(),
                m["required_image"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        required,
        [
            ("db-01", "db/2026.10.20"),
            ("web-01", "web/2026.11.01"),
            ("web-02", "web/2026.11.01")
        ]
    );
    let import_index = cluster.domadm_json(&["audit", "log", "--kind", "batch"])[0]["index"]
        .as_u64()
        .unwrap();
    let again = cluster.domadm(&["machine", "import", mdb]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to import"));

    run(
        &cluster,
        &[
            "assign",
            "--required",
            "web/2026.11.15",
            "web-01",
            "web-02",
            "--actor",
            "alice",
            "--reason",
            "roll web",
        ],
    );
    let refused = cluster.domadm(&["assign", "--required", "web/9", "--all"]);
    assert_eq!(refused.status.code(), Some(1));
    let empty = cluster.domadm(&[
        "assign",
        "--planned",
        "db/2026.10.20",
        "--selector",
        "role=none",
    ]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(cluster
        .domadm(&[
            "assign",
            "--planned",
            "db/2026.10.20",
            "--selector",
            "role=none",
            "--allow-empty"
        ])
        .status
        .success());

    // The earlier required image is what replay shows at the import's index.
    let then = cluster.domadm_json(&["audit", "replay", "--at", &import_index.to_string()]);
    let web01 = then["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["hostname"] == "web-01")
        .unwrap();
    assert_eq!(web01["required_image"], "web/2026.11.01");
    let history = cluster.domadm_json(&["audit", "log", "--machine", "web-01"]);
    let last = history.as_array().unwrap().last().unwrap();
    assert_eq!(
        (last["actor"].as_str(), last["reason"].as_str()),
        (Some("alice"), Some("roll web"))
    );
    assert_eq!(last["event"]["image"], "web/2026.11.15");

    let bad = work.path().join("bad.json");
    std::fs::write(&bad, "[{\"Hostname\": \"x\"").unwrap();
    let head = cluster.wait_converged();
    assert_eq!(
        cluster
            .domadm(&["machine", "import", bad.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    std::fs::write(
        &bad,
        r#"[{"Hostname": "new-01", "RequiredImage": "no/such"}, {"Hostname": "new-02"}]"#,
    )
    .unwrap();
    assert_eq!(
        cluster
            .domadm(&["machine", "import", bad.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        cluster.wait_converged(),
        head,
        "a refused import wrote to the log"
    );
    assert_eq!(cluster.domadm_json(&["audit", "verify"])["ok"], true);
}
