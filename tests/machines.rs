//! The loop: real `subd` processes on temp roots, driven by a real three-replica cluster to
//! their required images, through tampering, triggers, failed health checks, agent crashes
//! and leader failover.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use dom_tests::{add_image, ok, tree_root, wait_for, write, Cluster};

const CONVERGE: Duration = Duration::from_secs(60);
/// The issue's bound for correcting a tampering with default rate limits.
const CORRECT: Duration = Duration::from_secs(30);

fn base_image(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src-base");
    write(&src, "/etc/app.conf", "port = 80\n", 0o644);
    write(&src, "/etc/motd", "welcome\n", 0o644);
    write(&src, "/usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755);
    std::os::unix::fs::symlink("motd", src.join("etc/motd.link")).unwrap();
    std::fs::hard_link(src.join("usr/bin/tool"), src.join("usr/bin/tool2")).unwrap();
    std::fs::create_dir_all(src.join("var/log")).unwrap();
    src
}

#[test]
fn an_empty_root_converges_and_every_tampering_is_corrected() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let src = base_image(cluster.dir.path());
    let filter = cluster.dir.path().join("filter");
    std::fs::write(&filter, "/etc/hostname\n/etc/local\\..*\n").unwrap();
    let root_hash = add_image(
        &cluster,
        "base/1",
        &src,
        &["--filter", filter.to_str().unwrap()],
    );
    ok(cluster.domadm(&["machine", "add", "m1", "--required", "base/1"]));

    // Default rate limits: no --scan-bytes-per-sec.
    let agent = cluster.agent("m1", &["--service-cmd", "true"]);
    let status = cluster.wait_compliant("m1", "base/1", CONVERGE);
    assert_eq!(status["deviations"], 0);
    assert_eq!(status["last_update"]["outcome"], "applied");
    let root = agent.root.clone();
    // The machine is the image: contents, modes, links, ownership.
    assert_eq!(tree_root(&root, &[]), root_hash);
    let got = cluster.dir.path().join("got");
    ok(cluster.domadm(&["image", "get", "base/1", got.to_str().unwrap()]));
    let diff = std::process::Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&got)
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert_eq!(
        std::fs::metadata(root.join("usr/bin/tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );

    // Paths the image's filter names are the machine's own.
    write(&root, "/etc/hostname", "m1\n", 0o644);
    write(&root, "/etc/local.conf", "precious\n", 0o600);

    // Each tampering, one at a time, is found and put back.
    type Tamper = Box<dyn Fn(&Path)>;
    let tamperings: Vec<(&str, Tamper)> = vec![
        (
            "/etc/app.conf",
            Box::new(|r: &Path| write(r, "/etc/app.conf", "port = 8080\n", 0o644)),
        ),
        (
            "/etc/motd",
            Box::new(|r: &Path| std::fs::remove_file(r.join("etc/motd")).unwrap()),
        ),
        (
            "/etc/stray",
            Box::new(|r: &Path| write(r, "/etc/stray", "intruder\n", 0o755)),
        ),
        (
            "/usr/bin/tool",
            Box::new(|r: &Path| {
                std::fs::set_permissions(
                    r.join("usr/bin/tool"),
                    std::fs::Permissions::from_mode(0o4777),
                )
                .unwrap()
            }),
        ),
    ];
    for (path, tamper) in tamperings {
        tamper(&root);
        let status = cluster.wait_status(
            "m1",
            &format!("drift at {path} noticed and corrected"),
            CORRECT,
            |s| {
                s["state"] == "compliant"
                    && s["drift"].as_array().is_some_and(|d| {
                        d.iter()
                            .any(|d| d["path"] == path && d["corrected"] == true)
                    })
            },
        );
        assert_eq!(status["active_image"], "base/1");
        assert_eq!(
            tree_root(&root, &["/etc/hostname", "/etc/local\\..*"]),
            root_hash,
            "after correcting {path}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "m1\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/local.conf")).unwrap(),
        "precious\n"
    );
    assert!(!root.join("etc/stray").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/app.conf")).unwrap(),
        "port = 80\n"
    );
}

#[test]
fn triggers_run_in_order_and_a_failed_health_check_rolls_back() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let dir = cluster.dir.path();
    let log = dir.join("services.log");
    let root_dir = dir.join("roots").join("m2");
    let service = dir.join("service.sh");
    std::fs::write(
        &service,
        format!(
            "#!/bin/sh\necho \"$1 $2 $(cat {}/etc/app.conf 2>/dev/null)\" >> {}\n",
            root_dir.display(),
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&service, std::fs::Permissions::from_mode(0o755)).unwrap();
    let triggers = dir.join("triggers.json");
    std::fs::write(
        &triggers,
        r#"[{"MatchLines": ["/etc/app\\.conf"], "Service": "app"},
            {"MatchLines": ["/etc/web\\.conf"], "Service": "web", "DoReload": true}]"#,
    )
    .unwrap();
    let version = |n: &str, app: &str, web: &str| {
        let src = dir.join(format!("src-{n}"));
        write(&src, "/etc/app.conf", app, 0o644);
        write(&src, "/etc/web.conf", web, 0o644);
        write(&src, "/etc/other", "unchanged\n", 0o644);
        add_image(
            &cluster,
            &format!("app/{n}"),
            &src,
            &["--triggers", triggers.to_str().unwrap()],
        );
    };
    version("1", "v1\n", "w1\n");
    version("2", "v2\n", "w1\n");
    version("3", "bad\n", "w3\n");

    ok(cluster.domadm(&["machine", "add", "m2", "--required", "app/1"]));
    let health = format!("! grep -q bad {}/etc/app.conf", root_dir.display());
    let _agent = cluster.agent(
        "m2",
        &[
            "--service-cmd",
            service.to_str().unwrap(),
            "--health-cmd",
            &health,
        ],
    );
    cluster.wait_compliant("m2", "app/1", CONVERGE);
    std::fs::write(&log, "").unwrap();

    // Only app.conf changes: app is stopped while the old file is in place, started on the new.
    ok(cluster.domadm(&["assign", "--required", "app/2", "m2"]));
    let status = cluster.wait_compliant("m2", "app/2", CONVERGE);
    assert_eq!(
        status["last_update"]["services"],
        serde_json::json!(["app"])
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "app stop v1\napp start v2\n"
    );

    // app/3 fails its health check: the machine is put back on app/2 and shows failed.
    std::fs::write(&log, "").unwrap();
    ok(cluster.domadm(&["assign", "--required", "app/3", "m2"]));
    let status = cluster.wait_status("m2", "failed on app/3", CONVERGE, |s| {
        s["state"] == "failed"
    });
    assert_eq!(status["last_update"]["outcome"], "rolled_back");
    assert_eq!(status["last_update"]["image"], "app/3");
    assert_eq!(status["active_image"], "app/2");
    assert_eq!(
        std::fs::read_to_string(root_dir.join("etc/app.conf")).unwrap(),
        "v2\n"
    );
    assert_eq!(
        std::fs::read_to_string(root_dir.join("etc/web.conf")).unwrap(),
        "w1\n"
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        calls.starts_with("app stop v2\n") && calls.contains("web reload"),
        "services during the failed update: {calls}"
    );
    // It is not retried in a loop: still failed, still on app/2, a while later.
    std::thread::sleep(Duration::from_secs(5));
    let status = cluster.machine_status("m2").unwrap();
    assert_eq!(status["state"], "failed");
    assert_eq!(status["last_update"]["outcome"], "rolled_back");
}

#[test]
fn a_subd_killed_mid_update_leaves_no_partial_file_and_converges() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let src = cluster.dir.path().join("src-big");
    let content = |i: usize| format!("{i:08}").repeat(8 << 10);
    for i in 0..200 {
        write(&src, &format!("/data{}/f{i}", i % 4), &content(i), 0o644);
    }
    let root_hash = add_image(&cluster, "big/1", &src, &[]);
    ok(cluster.domadm(&["machine", "add", "m3", "--required", "big/1"]));
    let mut agent = cluster.agent("m3", &[]);
    agent.kill();
    agent.set_env("SUBD_TEST_PAUSE_AFTER_STEPS", Some("60"));
    agent.spawn();
    cluster.wait_status("m3", "updating", CONVERGE, |s| s["state"] == "updating");
    wait_for("the update to pause part way", CONVERGE, || {
        agent
            .log()
            .contains("SUBD_TEST_PAUSE_AFTER_STEPS")
            .then_some(())
    });
    agent.kill();
    // Every file is wholly there or not there at all; nothing half-written lies in the root.
    let mut present = 0;
    for entry in walkdir::WalkDir::new(&agent.root) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let name = entry.file_name().to_str().unwrap();
            let i: usize = name
                .trim_start_matches('f')
                .parse()
                .unwrap_or_else(|_| panic!("stray file {name}"));
            assert_eq!(std::fs::read_to_string(entry.path()).unwrap(), content(i));
            present += 1;
        }
    }
    assert!(
        present > 0 && present < 200,
        "{present} files in place when killed"
    );

    agent.set_env("SUBD_TEST_PAUSE_AFTER_STEPS", None);
    agent.spawn();
    cluster.wait_compliant("m3", "big/1", CONVERGE);
    assert_eq!(tree_root(&agent.root, &[]), root_hash);
}

#[test]
fn machines_converge_through_a_leader_failover() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(None);
    let src = cluster.dir.path().join("src-fleet");
    for i in 0..300 {
        write(
            &src,
            &format!("/opt/app/f{i}"),
            &format!("{i}").repeat(4096),
            0o644,
        );
    }
    let root_hash = add_image(&cluster, "fleet/1", &src, &[]);
    let hosts = ["n1", "n2", "n3"];
    for h in hosts {
        ok(cluster.domadm(&["machine", "add", h, "--required", "fleet/1"]));
    }
    let agents: Vec<_> = hosts
        .iter()
        .map(|h| cluster.agent(h, &["--fetch-bytes-per-sec", "400000"]))
        .collect();
    // Kill the leader while the machines are still fetching.
    cluster.wait_status("n1", "fetching", CONVERGE, |s| s["state"] == "fetching");
    cluster.kill(leader);
    cluster.wait_leader(Some(leader));
    for (h, a) in hosts.iter().zip(&agents) {
        cluster.wait_compliant(h, "fleet/1", Duration::from_secs(120));
        assert_eq!(tree_root(&a.root, &[]), root_hash, "{h}");
    }
}

#[test]
fn an_agent_for_a_machine_outside_the_fleet_is_refused_clearly() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(None);
    let agent = cluster.agent("ghost", &[]);
    wait_for("the refusal in the agent's log", CONVERGE, || {
        agent
            .log()
            .contains("machine ghost is not in the fleet")
            .then_some(())
    });
    assert_eq!(
        std::fs::read_dir(&agent.root).unwrap().count(),
        0,
        "nothing touched"
    );
}
