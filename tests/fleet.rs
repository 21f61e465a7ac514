//! Fleet control on a real three-replica cluster with real `subd` processes: planned images
//! preloaded, rollout limits (also across a leader failover), halt and resume, the automatic
//! brake, the safety hold and pauses.

use std::time::{Duration, Instant};

use dom_tests::{add_image, ok, tree_root, write, Agent, Cluster};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

/// Two versions of a small image: `NAME/1` and `NAME/2` (app.conf changes).
fn two_versions(cluster: &Cluster, name: &str, files: usize) -> (String, String) {
    let mut roots = Vec::new();
    for v in 1..=2 {
        let src = cluster.dir.path().join(format!("src-{name}-{v}"));
        write(&src, "/etc/app.conf", &format!("version {v}\n"), 0o644);
        for i in 0..files {
            write(
                &src,
                &format!("/usr/share/{name}/f{i}"),
                &format!("{v}-{i}\n").repeat(64),
                0o644,
            );
        }
        roots.push(add_image(cluster, &format!("{name}/{v}"), &src, &[]));
    }
    (roots[0].clone(), roots[1].clone())
}

fn fleet(cluster: &Cluster, hosts: &[&str], image: &str, args: &[&str]) -> Vec<Agent> {
    for h in hosts {
        ok(cluster.domadm(&["machine", "add", h, "--required", image]));
    }
    let agents: Vec<Agent> = hosts.iter().map(|h| cluster.agent(h, args)).collect();
    for h in hosts {
        cluster.wait_compliant(h, image, CONVERGE);
    }
    agents
}

fn statuses(cluster: &Cluster) -> Vec<Value> {
    let out = cluster.domadm(&["status", "-o", "json"]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn a_planned_image_is_preloaded_and_then_activated_without_fetching() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    two_versions(&cluster, "pre", 20);
    let _agents = fleet(&cluster, &["p1"], "pre/1", &[]);
    ok(cluster.domadm(&["assign", "--planned", "pre/2", "p1"]));
    let status = cluster.wait_status("p1", "pre/2 preloaded", CONVERGE, |s| {
        s["preloaded_image"] == "pre/2"
    });
    assert_eq!(status["state"], "compliant", "a preload activates nothing");
    assert_eq!(status["active_image"], "pre/1");
    assert_eq!(status["last_fetch"]["preload"], true);
    assert!(status["last_fetch"]["bytes_downloaded"].as_u64().unwrap() > 0);

    ok(cluster.domadm(&["assign", "--required", "pre/2", "p1"]));
    let status = cluster.wait_compliant("p1", "pre/2", CONVERGE);
    assert_eq!(status["last_fetch"]["preload"], false);
    assert_eq!(status["last_fetch"]["image"], "pre/2");
    assert_eq!(
        status["last_fetch"]["bytes_downloaded"], 0,
        "everything the update needed was preloaded: {status}"
    );
}

#[test]
fn the_concurrency_limit_holds_through_a_leader_failover() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let (_, v2_root) = two_versions(&cluster, "lim", 10);
    let hosts = ["l1", "l2", "l3", "l4"];
    // A slow health check keeps each update open long enough to overlap if the limit failed.
    let agents = fleet(&cluster, &hosts, "lim/1", &["--health-cmd", "sleep 1"]);
    ok(cluster.domadm(&[
        "policy",
        "set",
        "--max-updating",
        "1",
        "--reason",
        "one at a time",
    ]));
    let policy = cluster.domadm_json(&["policy", "show"]);
    assert_eq!(policy["max_updating"], 1);

    ok(cluster.domadm(&["assign", "--required", "lim/2", "--all"]));
    let start = Instant::now();
    let mut most = 0;
    let mut killed = None;
    loop {
        let all = statuses(&cluster);
        let updating = all.iter().filter(|s| s["state"] == "updating").count();
        most = most.max(updating);
        let done = all
            .iter()
            .filter(|s| s["state"] == "compliant" && s["active_image"] == "lim/2")
            .count();
        if done == hosts.len() {
            break;
        }
        // Mid-rollout, the leader dies; the new one rebuilds its view from the agents.
        if killed.is_none() && done >= 1 {
            let leader = cluster.wait_leader(None);
            cluster.kill(leader);
            cluster.wait_leader(Some(leader));
            killed = Some(leader);
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "rollout did not finish: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(killed.is_some());
    assert_eq!(most, 1, "more than one machine updating at once");
    for a in &agents {
        assert_eq!(tree_root(&a.root, &[]), v2_root);
    }
}

#[test]
fn agents_of_a_deposed_leader_move_to_the_new_one() {
    let cluster = Cluster::start(3, &[]);
    let old = cluster.wait_leader(None);
    let (_, v2_root) = two_versions(&cluster, "dep", 5);
    let agents = fleet(&cluster, &["d1", "d2"], "dep/1", &[]);
    // Frozen past the election timeout, the leader is replaced; thawed, it still holds the
    // agents' streams and learns only from its peers that it no longer leads.
    cluster.pause(old);
    let peers = cluster.addrs_except(old).join(",");
    let new = dom_tests::wait_for("a new leader", Duration::from_secs(30), || {
        let leader = cluster.status_at(&peers)?["leader"].as_u64()?;
        (leader != old).then_some(leader)
    });
    cluster.resume(old);
    // The new leader plans for them only once they have moved to it.
    ok(cluster.domadm(&["assign", "--required", "dep/2", "--all"]));
    for a in &agents {
        cluster.wait_compliant(&a.hostname, "dep/2", CONVERGE);
        assert_eq!(tree_root(&a.root, &[]), v2_root);
    }
    assert_eq!(cluster.wait_leader(None), new, "leadership moved again");
}

#[test]
fn halt_stops_new_updates_and_resume_releases_them() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    two_versions(&cluster, "halt", 5);
    let agents = fleet(&cluster, &["h1"], "halt/1", &[]);
    let refused = cluster.domadm(&["halt"]);
    assert_eq!(refused.status.code(), Some(1), "a halt needs a reason");
    ok(cluster.domadm(&["halt", "--reason", "bad week"]));
    let policy = cluster.domadm_json(&["policy", "show"]);
    assert_eq!(
        (policy["halted"].clone(), policy["halt_reason"].clone()),
        (Value::Bool(true), "bad week".into())
    );

    ok(cluster.domadm(&["assign", "--required", "halt/2", "h1"]));
    std::thread::sleep(Duration::from_secs(5));
    let status = cluster.machine_status("h1").unwrap();
    assert_eq!(status["active_image"], "halt/1");
    assert_eq!(status["state"], "deviant");
    assert!(
        status["detail"].as_str().unwrap().contains("halted"),
        "{status}"
    );
    let table = ok(cluster.domadm(&["status"]));
    assert!(table.contains("UPDATES HALTED: bad week"), "{table}");
    let conf = agents[0].root.join("etc/app.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "version 1\n");

    ok(cluster.domadm(&["resume"]));
    cluster.wait_compliant("h1", "halt/2", CONVERGE);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "version 2\n");
}

#[test]
fn a_rollout_failing_its_health_checks_halts_itself() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    two_versions(&cluster, "brk", 5);
    let hosts = ["b1", "b2", "b3"];
    let roots: Vec<_> = hosts
        .iter()
        .map(|h| cluster.dir.path().join("roots").join(h))
        .collect();
    let agents: Vec<Agent> = {
        for h in hosts {
            ok(cluster.domadm(&["machine", "add", h, "--required", "brk/1"]));
        }
        hosts
            .iter()
            .zip(&roots)
            .map(|(h, root)| {
                // Healthy on version 1, sick on version 2.
                let health = format!("grep -q 'version 1' {}/etc/app.conf", root.display());
                cluster.agent(h, &["--health-cmd", &health])
            })
            .collect()
    };
    for h in hosts {
        cluster.wait_compliant(h, "brk/1", CONVERGE);
    }
    ok(cluster.domadm(&["assign", "--required", "brk/2", "--all"]));
    let policy = dom_tests::wait_for("the automatic brake", CONVERGE, || {
        let p = cluster.domadm_json(&["policy", "show"]);
        (p["halted"] == true).then_some(p)
    });
    assert_eq!(policy["halt_actor"], "domd");
    let reason = policy["halt_reason"].as_str().unwrap();
    assert!(
        reason.contains("brk/2") && reason.contains("health check"),
        "{reason}"
    );
    let log = cluster.domadm_json(&["audit", "log", "--actor", "domd"]);
    assert_eq!(log.as_array().unwrap().len(), 1, "{log}");
    assert_eq!(log[0]["kind"], "updates_halted");
    // Every machine that tried was rolled back to version 1.
    for (h, a) in hosts.iter().zip(&agents) {
        let s = cluster.wait_status(h, "settled", CONVERGE, |s| {
            s["state"] != "updating" && s["state"] != "fetching"
        });
        assert_eq!(
            std::fs::read_to_string(a.root.join("etc/app.conf")).unwrap(),
            "version 1\n",
            "{s}"
        );
    }
}

#[test]
fn an_update_deleting_most_files_is_held_until_safety_is_cleared() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let big = cluster.dir.path().join("src-big");
    for i in 0..30 {
        write(&big, &format!("/srv/f{i}"), "data\n", 0o644);
    }
    add_image(&cluster, "big/1", &big, &[]);
    let tiny = cluster.dir.path().join("src-tiny");
    write(&tiny, "/etc/motd", "tiny\n", 0o644);
    let tiny_root = add_image(&cluster, "tiny/1", &tiny, &[]);
    let agents = fleet(&cluster, &["s1"], "big/1", &[]);

    ok(cluster.domadm(&["assign", "--required", "tiny/1", "s1"]));
    let status = cluster.wait_status("s1", "held as unsafe", CONVERGE, |s| {
        s["detail"]
            .as_str()
            .is_some_and(|d| d.contains("held as unsafe"))
    });
    assert_eq!(status["active_image"], "big/1");
    assert!(agents[0].root.join("srv/f0").exists());

    ok(cluster.domadm(&[
        "machine",
        "clear-safety",
        "s1",
        "--reason",
        "it really is tiny",
    ]));
    cluster.wait_compliant("s1", "tiny/1", CONVERGE);
    assert_eq!(tree_root(&agents[0].root, &[]), tiny_root);
}

#[test]
fn a_paused_machine_is_skipped_until_its_pause_ends() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    two_versions(&cluster, "pz", 5);
    let agents = fleet(&cluster, &["z1", "z2"], "pz/1", &[]);
    let missing_reason = cluster.domadm(&["machine", "pause", "z1", "--for", "8s"]);
    assert_eq!(missing_reason.status.code(), Some(1));
    ok(cluster.domadm(&[
        "machine",
        "pause",
        "z1",
        "--for",
        "8s",
        "--reason",
        "disk swap",
    ]));
    let paused_at = Instant::now();
    ok(cluster.domadm(&["assign", "--required", "pz/2", "--all"]));
    cluster.wait_compliant("z2", "pz/2", CONVERGE);
    if paused_at.elapsed() < Duration::from_secs(6) {
        let z1 = cluster.machine_status("z1").unwrap();
        assert_eq!(z1["active_image"], "pz/1", "{z1}");
        assert!(z1["detail"].as_str().unwrap().contains("disk swap"), "{z1}");
        assert!(z1["paused_until"].is_string());
    }
    cluster.wait_compliant("z1", "pz/2", CONVERGE);
    assert!(
        paused_at.elapsed() >= Duration::from_secs(7),
        "the pause was not honoured"
    );
    assert_eq!(
        std::fs::read_to_string(agents[0].root.join("etc/app.conf")).unwrap(),
        "version 2\n"
    );
}

#[test]
fn two_images_with_one_tree_each_reach_their_own_machines() {
    // Machines on one base planning toward images of the same tree share the planning work,
    // but each must get its own image: the name is what it reports and what its filter,
    // triggers and compliance are judged by.
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let (_, twin_root) = two_versions(&cluster, "tw", 5);
    let src = cluster.dir.path().join("src-tw-2");
    for name in ["twin/a", "twin/b"] {
        assert_eq!(add_image(&cluster, name, &src, &[]), twin_root);
    }
    let agents = fleet(&cluster, &["w1", "w2"], "tw/1", &[]);
    ok(cluster.domadm(&["assign", "--required", "twin/a", "w1"]));
    ok(cluster.domadm(&["assign", "--required", "twin/b", "w2"]));
    cluster.wait_compliant("w1", "twin/a", CONVERGE);
    cluster.wait_compliant("w2", "twin/b", CONVERGE);
    for agent in &agents {
        assert_eq!(tree_root(&agent.root, &[]), twin_root);
    }
}
