//! A three-replica cluster of real `domd` processes, driven by `domadm`.

use std::time::Duration;

use dom_storage::journal::{self, JournalHead, JournalRecord};
use dom_tests::{wait_for, Cluster};

fn names(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:03}")).collect()
}

/// Reads a stopped replica's whole journal and checks its chain.
fn journal_of(cluster: &Cluster, id: u64) -> (JournalHead, Vec<(u64, JournalRecord)>) {
    let (_log, sm) =
        dom_storage::open(&cluster.replicas[&id].data_dir).expect("open stopped replica");
    let view = sm.view();
    let records: Vec<(u64, JournalRecord)> = view
        .journal(1, u64::MAX)
        .map(|r| r.expect("journal record"))
        .collect();
    let head = journal::verify(JournalHead::default(), records.iter().map(|(i, r)| (*i, r)))
        .expect("intact chain");
    assert_eq!(
        head,
        view.journal_head(),
        "replica {id}: stored head differs from its records"
    );
    (head, records)
}

#[test]
fn writes_replicate_to_every_replica() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    cluster.add_machines(names("web", 1..=20));
    let head = cluster.wait_converged();
    assert_ne!(head, "0".repeat(64));
    assert_eq!(cluster.machine_names(), names("web", 1..=20));
    let status = cluster.status().expect("status");
    for member in status["members"].as_array().expect("members") {
        assert_eq!(member["journal_index"], 20, "{member}");
    }
}

#[test]
fn killing_the_leader_elects_another_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(None);
    cluster.add_machines(names("web", 1..=30));
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(Some(leader));
    assert_ne!(new_leader, leader);
    assert_eq!(
        cluster.machine_names(),
        names("web", 1..=30),
        "acknowledged writes lost in failover"
    );
    // The cluster keeps taking writes with one replica down, and the old leader catches up.
    cluster.add_machines(names("db", 1..=5));
    cluster.spawn(leader);
    let head = cluster.wait_converged();
    assert_eq!(cluster.member(leader)["journal_hash"], head);
    assert_eq!(cluster.machine_names().len(), 35);
}

#[test]
fn a_stopped_replica_restarts_from_disk_and_catches_up() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(None);
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.add_machines(names("web", 1..=10));
    cluster.wait_converged();
    cluster.stop(follower);
    cluster.add_machines(names("web", 11..=20));
    cluster.spawn(follower);
    let head = cluster.wait_converged();
    assert_eq!(cluster.member(follower)["journal_index"], 20);
    assert_eq!(cluster.member(follower)["journal_hash"], head);
}

#[test]
fn a_replica_behind_a_purged_log_catches_up_by_snapshot_and_holds_the_whole_journal() {
    // Snapshot every 10 entries, so the leader purges what the stopped replica still needs.
    let mut cluster = Cluster::start(3, &["--snapshot-logs", "10"]);
    let leader = cluster.wait_leader(None);
    let lagging = (1..=3).rev().find(|id| *id != leader).expect("a follower");
    cluster.add_machines(names("web", 1..=5));
    cluster.wait_converged();
    let stopped_at = cluster.member(lagging)["last_log_index"]
        .as_u64()
        .expect("last log index");
    cluster.stop(lagging);
    cluster.add_machines(names("web", 6..=60));
    let leader = cluster.wait_leader(None);
    wait_for(
        "the leader to purge past the stopped replica's log",
        Duration::from_secs(20),
        || (cluster.member(leader)["purged_index"].as_u64()? > stopped_at).then_some(()),
    );
    cluster.spawn(lagging);
    let head = cluster.wait_converged();
    assert_eq!(cluster.member(lagging)["journal_index"], 60);

    // Stop everything and read the journals straight from the data dirs.
    for id in 1..=3 {
        cluster.stop(id);
    }
    let log = cluster.log(lagging);
    assert!(
        log.contains("installed snapshot"),
        "replica {lagging} did not install a snapshot:\n{log}"
    );
    let (lagging_head, lagging_records) = journal_of(&cluster, lagging);
    let (leader_head, leader_records) = journal_of(&cluster, leader);
    assert_eq!(lagging_head.index, 60);
    assert_eq!(hex::encode(lagging_head.hash), head);
    assert_eq!(lagging_head, leader_head);
    assert_eq!(lagging_records, leader_records, "journals differ");
}

#[test]
fn bad_input_is_refused_clearly_and_writes_nothing() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    cluster.add_machines(["web-01".to_owned()]);
    let before = cluster.wait_converged();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["machine", "add", "web-01"], 1, "already exists"),
        (&["machine", "add", "bad host"], 1, "hostname"),
        (
            &["machine", "add", "web-02", "--required", "no/such-image"],
            1,
            "unknown image",
        ),
        (
            &["machine", "add", "web-02", "--required", "../etc"],
            1,
            "image name",
        ),
        (
            &["machine", "add", "web-02", "--tag", "novalue"],
            2,
            "KEY=VALUE",
        ),
        (&["machine", "remove", "db-07"], 1, "unknown machine"),
        (&["machine", "show", "db-07"], 1, "unknown machine"),
        (&["machine", "frobnicate"], 2, "unrecognized subcommand"),
    ];
    for (args, code, needle) in cases {
        let out = cluster.domadm(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "domadm {args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "domadm {args:?} said {stderr:?}, expected {needle:?}"
        );
        if *code == 1 {
            assert_eq!(
                stderr.trim().lines().count(),
                1,
                "domadm {args:?} said more than one line: {stderr}"
            );
        }
    }
    assert_eq!(
        cluster.wait_converged(),
        before,
        "a refused command changed the log"
    );
    assert_eq!(cluster.machine_names(), vec!["web-01"]);
}

#[test]
fn an_unreachable_cluster_is_one_clear_line() {
    let out = std::process::Command::new(dom_tests::bin("domadm"))
        .args([
            "--endpoints",
            "127.0.0.1:1",
            "--actor",
            "t",
            "machine",
            "list",
        ])
        .output()
        .expect("run domadm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cannot reach any controller"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1);
}

#[test]
fn starting_twice_on_one_data_dir_fails_clearly() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let out = cluster.domd_command(2).output().expect("run second domd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
}
