//! dom-bench: whole-system measurements, each beside what an operator would use instead, in
//! the same run. Every subcommand starts what it needs on loopback, cleans up, prints a
//! summary and ends with one JSON line of figures.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dom_tests::{free_port, Cluster};

#[derive(Parser)]
#[command(name = "dom-bench", about = "Measure dom beside the alternatives")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Ingest a generated tree into a three-replica cluster, beside `tar -c | b3sum` of it.
    Ingest {
        /// Total bytes of the generated tree.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Number of files.
        #[arg(long, default_value_t = 40_000)]
        files: u64,
    },
    /// Scan a generated tree with the agent's scanner (a full checksum sweep, no rate limit),
    /// beside `b3sum --num-threads 2` and `sha512sum` over the same files.
    Scan {
        /// Total bytes of the generated tree.
        #[arg(long, default_value = "1G", value_parser = parse_bytes)]
        bytes: u64,
        /// Number of files.
        #[arg(long, default_value_t = 40_000)]
        files: u64,
        /// Timed runs of each contender; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Apply an update of generated files with the agent's Updater, measuring the activation
    /// window (first service stop to last start) beside writing each file in place.
    Update {
        /// Number of files the update replaces.
        #[arg(long, default_value_t = 1000)]
        files: usize,
        /// Bytes per file.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Runs of each contender; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// N simulated agents (real gRPC streams, one process) against a real three-replica
    /// cluster: connect and comply, a fleet-wide assign, leader memory and CPU, reconnect
    /// bytes, and recovery after the leader is killed.
    Agents {
        /// Simulated machines.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Files in the image.
        #[arg(long, default_value_t = 2000)]
        files: u64,
    },
    /// Durable commits per second and commit latency on a three-replica cluster, beside a
    /// three-member etcd cluster (when `etcd` is on PATH) under the same workload.
    Writes {
        /// Concurrent writers, one run per level.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        concurrency: Vec<usize>,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Replay a generated journal (`audit replay --data-dir`), and answer `audit log --machine`
    /// through the audit index beside a scan of the journal.
    Replay {
        /// Number of events in the generated journal.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
}

fn replay(events: u64) {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("replica");
    eprintln!("generating a journal of {events} events");
    let started = Instant::now();
    dom_benches::journal::generate(&dir, events);
    let generate_s = started.elapsed().as_secs_f64();

    // In process, phase by phase, to show where replay's time goes.
    let started = Instant::now();
    let (_log, sm) =
        dom_storage::open_when_released(&dir, Duration::from_secs(10)).expect("open store");
    let view = sm.view();
    let open_s = started.elapsed().as_secs_f64();
    let read_all = || {
        let started = Instant::now();
        let mut n = 0u64;
        for item in view.journal(1, u64::MAX) {
            item.expect("record");
            n += 1;
        }
        assert_eq!(n, events);
        started.elapsed().as_secs_f64()
    };
    // sled materializes each page from its log on first touch; the second pass is from cache.
    let cold_read_s = read_all();
    let warm_read_s = read_all();
    let started = Instant::now();
    // The fold `domadm audit replay --data-dir` runs: admitting (read, verify chain) on
    // one thread while applying on another.
    let replayed = dom_storage::replay::Replay::new(dom_storage::replay::Until::End)
        .fold(view.journal(1, u64::MAX))
        .expect("replay");
    assert_eq!(replayed.head(), view.journal_head());
    let fold_s = started.elapsed().as_secs_f64();

    // `audit log --machine`: the audit index beside a scan that decodes every record.
    let host = format!("host-{:07}", (events / 20).max(1) / 2);
    let started = Instant::now();
    let indexed: Vec<u64> = view.indexed(true, &host).expect("index");
    let records: Vec<_> = indexed
        .iter()
        .map(|i| view.journal_record(*i).expect("record"))
        .collect();
    let indexed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let scanned: Vec<u64> = view
        .journal(1, u64::MAX)
        .filter_map(|item| {
            let (index, record) = item.ok()?;
            let event = dom_storage::event::Event::decode(&record.event).ok()?;
            event
                .change
                .machines_named()
                .contains(&host.as_str())
                .then_some(index)
        })
        .collect();
    let scan_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(indexed, scanned, "the index and the scan disagree");
    assert_eq!(records.len(), indexed.len());
    drop((view, sm, _log));

    // The real command, on the stopped replica's data dir (it reads the journal files in place).
    let domadm = dom_tests::bin("domadm");
    let started = Instant::now();
    let out = Command::new(domadm)
        .args(["audit", "replay", "--at", &events.to_string(), "--data-dir"])
        .arg(&dir)
        .args(["-o", "json"])
        .stdout(Stdio::null())
        .status()
        .expect("run domadm");
    assert!(out.success(), "audit replay failed");
    let cli_s = started.elapsed().as_secs_f64();
    let per_sec = |s: f64| (events as f64 / s).round();

    println!("replay of a {events}-event journal (generated through the state machine in {generate_s:.1} s):");
    println!("  in process: open {open_s:.2} s; read every record {cold_read_s:.2} s cold, {warm_read_s:.2} s warm ({} records/s)", per_sec(warm_read_s));
    println!(
        "  in process, warm: read, verify chain | decode, apply (two threads):  {fold_s:.2} s, {} events/s",
        per_sec(fold_s)
    );
    println!(
        "  domadm audit replay --data-dir (read the journal files, verify, fold): {cli_s:.2} s, {} events/s",
        per_sec(cli_s)
    );
    println!("  audit log --machine {host}: audit index {indexed_ms:.2} ms vs journal scan {scan_ms:.0} ms ({} events)", indexed.len());
    let json = serde_json::json!({
        "replay": {
            "events": events,
            "events_per_sec": per_sec(cli_s),
            "in_process_fold_events_per_sec": per_sec(fold_s),
            "open_s": (open_s * 100.0).round() / 100.0,
            "cold_read_records_per_sec": per_sec(cold_read_s),
            "warm_read_records_per_sec": per_sec(warm_read_s),
            "log_machine_indexed_ms": (indexed_ms * 100.0).round() / 100.0,
            "log_machine_scan_ms": scan_ms.round(),
        }
    });
    println!("{json}");
}

/// Writes `files` files totalling `bytes` under `root`, 200 to a directory, with content
/// that does not compress or deduplicate.
fn generate(root: &Path, bytes: u64, files: u64) -> std::io::Result<()> {
    let size = (bytes / files.max(1)) as usize;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; size];
    for i in 0..files {
        let dir = root.join(format!("d{:04}", i / 200));
        if i % 200 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        std::fs::File::create(dir.join(format!("f{i:06}")))?.write_all(&buf)?;
    }
    Ok(())
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    (bytes as f64 / 1e6 / secs * 10.0).round() / 10.0
}

fn tar_b3sum(root: &Path) -> Option<f64> {
    if Command::new("b3sum")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("b3sum is not on PATH (cargo install b3sum): baseline skipped");
        return None;
    }
    let start = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -cf - . | b3sum > /dev/null",
            root.display()
        ))
        .status()
        .ok()?;
    status.success().then(|| start.elapsed().as_secs_f64())
}

fn ingest(bytes: u64, files: u64) {
    let work = tempfile::tempdir().expect("temp dir");
    let tree = work.path().join("tree");
    eprintln!("generating {files} files, {bytes} bytes");
    generate(&tree, bytes, files).expect("generate tree");
    let real_bytes = bytes / files.max(1) * files;

    let baseline = tar_b3sum(&tree);
    let cluster = Cluster::start_with_default_timing(3, &[]);
    cluster.wait_leader(None);
    let add = |name: &str| {
        let start = Instant::now();
        let out = cluster.domadm(&["image", "add", name, tree.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "image add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        start.elapsed().as_secs_f64()
    };
    let first = add("bench/1");
    // The same tree again: everything is hashed, nothing is uploaded.
    let again = add("bench/2");

    println!("ingest of {files} files, {real_bytes} bytes into a 3-replica cluster:");
    println!(
        "  dom image add (hash, upload, replicate to a majority, commit): {first:.2} s, {} MB/s",
        mb_s(real_bytes, first)
    );
    println!(
        "  dom image add of the same tree again (hash only, 0 bytes sent):  {again:.2} s, {} MB/s",
        mb_s(real_bytes, again)
    );
    match baseline {
        Some(secs) => println!(
            "  tar -c | b3sum:                                                {secs:.2} s, {} MB/s",
            mb_s(real_bytes, secs)
        ),
        None => println!("  tar -c | b3sum: not measured"),
    }
    let json = serde_json::json!({
        "ingest": {
            "bytes": real_bytes,
            "files": files,
            "dom_mb_s": mb_s(real_bytes, first),
            "dom_rehash_mb_s": mb_s(real_bytes, again),
            "tar_b3sum_mb_s": baseline.map(|s| mb_s(real_bytes, s)),
        }
    });
    println!("{json}");
}

/// `1G`, `512M`, `64K` or a plain number of bytes (binary multiples).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size like 1G, 512M or 4096"))
}

fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Seconds for `find ROOT -type f -print0 | xargs -0 TOOL... > /dev/null`: xargs packs as
/// many paths into each command as the argument limit allows, so a few processes are started
/// for the whole tree, not one per file.
fn time_tool(root: &Path, tool: &str) -> Option<f64> {
    let start = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find '{}' -type f -print0 | xargs -0 {tool} > /dev/null",
            root.display()
        ))
        .status()
        .ok()?;
    status.success().then(|| start.elapsed().as_secs_f64())
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn scan(bytes: u64, files: u64, runs: usize) {
    use dom_agent::scan::{scan, ScanConfig};
    let runs = runs.max(1);
    let work = tempfile::tempdir().expect("temp dir");
    let tree = work.path().join("tree");
    eprintln!("generating {files} files, {bytes} bytes");
    generate(&tree, bytes, files).expect("generate tree");
    let real_bytes = bytes / files.max(1) * files;
    let config = ScanConfig {
        root: tree.clone(),
        excluded: dom_storage::image::Filter::empty(),
        bytes_per_sec: None,
        one_file_system: true,
        strict: true,
    };
    // Untimed: the tree was just written, but read it once so every contender starts from a
    // warm page cache and the figures compare hashing and file handling, not the disk.
    let warm = scan(&config, None, true).expect("scan");
    assert_eq!(warm.bytes_read(), real_bytes, "the scan read every byte");
    assert_eq!(warm.files_read(), files, "the scan read every file");

    let mut dom_times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let tree = scan(&config, None, true).expect("scan");
        dom_times.push(start.elapsed().as_secs_f64());
        assert_eq!(tree.root_hash(), warm.root_hash());
    }
    let dom = median(dom_times);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut missing = Vec::new();
    let mut baseline = |tool: &str, args: &str| -> Option<f64> {
        if !on_path(tool) {
            eprintln!("{tool} is not on PATH: baseline skipped");
            missing.push(tool.to_owned());
            return None;
        }
        let times: Option<Vec<f64>> = (0..runs)
            .map(|_| time_tool(&tree, &format!("{tool} {args}")))
            .collect();
        times.map(median)
    };
    let b3sum = baseline("b3sum", "--num-threads 2");
    let sha512sum = baseline("sha512sum", "");

    let line = |name: &str, secs: Option<f64>| match secs {
        Some(secs) => println!(
            "  {name:<44} {secs:>6.3} s, {:>7.1} MB/s",
            mb_s(real_bytes, secs)
        ),
        None => println!("  {name:<44} not measured (not on PATH)"),
    };
    println!(
        "scan of {files} files, {real_bytes} bytes, page cache warm (read once untimed first), \
         median of {runs} runs, {cores} cores:"
    );
    line("dom scan (full checksum sweep, no rate limit)", Some(dom));
    line("find | xargs b3sum --num-threads 2", b3sum);
    line("find | xargs sha512sum (one thread)", sha512sum);
    if let Some(b3) = b3sum {
        println!("  dom / b3sum: {:.2}x", b3 / dom);
    }
    if let Some(sha) = sha512sum {
        println!("  dom / sha512sum: {:.2}x", sha / dom);
    }
    let mut json = serde_json::json!({
        "bench": "scan",
        "bytes": real_bytes,
        "files": files,
        "dom_mb_s": mb_s(real_bytes, dom),
        "b3sum_mb_s": b3sum.map(|s| mb_s(real_bytes, s)),
        "sha512sum_mb_s": sha512sum.map(|s| mb_s(real_bytes, s)),
    });
    if !missing.is_empty() {
        json["note"] = format!("not on PATH, not measured: {}", missing.join(", ")).into();
    }
    println!("{json}");
}

/// The activation window of an update of `files` files, side by side in one run: dom's
/// Updater (content staged and synced before the services stop, then renamed into place) and
/// the naive way (stop, open/truncate/write each file in place, start). Both restart one
/// service through the same no-op command, so the difference is the file work in between.
fn update(files: usize, size: usize, runs: usize) {
    use dom_agent::update::{Outcome, Services, UpdateRequest, Updater};
    use dom_storage::image::{Entry, Filter, Trigger};
    use dom_storage::objects::ObjectStore;
    use dom_storage::plan::Step;
    use std::os::unix::fs::MetadataExt;

    let runs = runs.max(1);
    let work = tempfile::tempdir().expect("temp dir");
    let (root, state) = (work.path().join("root"), work.path().join("state"));
    std::fs::create_dir_all(&state).expect("state dir");
    let me = std::fs::metadata(work.path()).expect("temp dir metadata");
    let (uid, gid) = (me.uid(), me.gid());
    let content = |version: &str, i: usize| {
        let mut data = format!("{version} version of file {i}\n").into_bytes();
        data.resize(size.max(data.len()), b'#');
        data
    };
    let rel = |i: usize| format!("d{:02}/f{i:05}", i / 200);

    // The object cache holds every new version, as the fetch step leaves it.
    let store = ObjectStore::open(&state.join("objects")).expect("object store");
    let mut steps = Vec::with_capacity(files);
    let mut new_versions = Vec::with_capacity(files);
    for i in 0..files {
        let data = content("new", i);
        let hash = *blake3::hash(&data).as_bytes();
        let object = store.path(&hash);
        std::fs::create_dir_all(object.parent().expect("fan-out dir")).expect("object dir");
        std::fs::write(&object, &data).expect("write object");
        let entry = Entry::file(
            &format!("/{}", rel(i)),
            0o644,
            uid,
            gid,
            data.len() as u64,
            hash,
        );
        steps.push(Step::Write(entry));
        new_versions.push(data);
    }
    let trigger = Trigger {
        match_lines: vec!["/d.*".into()],
        service: "bench".into(),
        do_reload: false,
        do_reboot: false,
        high_impact: false,
    };
    let services = Services {
        service_cmd: "true".into(),
        health_cmd: None,
        reboot_cmd: None,
    };
    let old_tree = || {
        let _ = std::fs::remove_dir_all(&root);
        for i in 0..files {
            let path = root.join(rel(i));
            if i % 200 == 0 {
                std::fs::create_dir_all(path.parent().expect("dir")).expect("tree dir");
            }
            std::fs::write(&path, content("old", i)).expect("old file");
        }
        // Both contenders start from a clean page cache state.
        let _ = Command::new("sync").status();
    };
    let service = |action: &str| {
        let ok = Command::new("true")
            .args(["bench", action])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "service command failed");
    };
    let check_new = || {
        for i in [0, files / 2, files - 1] {
            let got = std::fs::read(root.join(rel(i))).expect("read back");
            assert!(got == new_versions[i], "file {i} is not the new version");
        }
    };

    let (mut dom, mut dom_total, mut in_place) = (Vec::new(), Vec::new(), Vec::new());
    eprintln!("{runs} runs of each, alternating");
    for run in 0..runs {
        old_tree();
        let updater = Updater::new(&root, &state, services.clone()).expect("updater");
        let request = UpdateRequest {
            plan_id: run as u64 + 1,
            image: "bench".into(),
            steps: steps.clone(),
            triggers: vec![trigger.clone()],
        };
        let report = updater.apply(&request, &Filter::empty());
        assert_eq!(report.outcome, Outcome::Applied, "{:?}", report.error);
        check_new();
        dom.push(report.activation.as_secs_f64() * 1000.0);
        dom_total.push(report.duration.as_secs_f64() * 1000.0);

        old_tree();
        let start = Instant::now();
        service("stop");
        for (i, data) in new_versions.iter().enumerate() {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(root.join(rel(i)))
                .expect("open in place");
            file.write_all(data).expect("write in place");
        }
        service("start");
        in_place.push(start.elapsed().as_secs_f64() * 1000.0);
        check_new();
    }

    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let round = |x: f64| (x * 100.0).round() / 100.0;
        (round(v[v.len() / 2]), round(v[0]), round(v[v.len() - 1]))
    };
    let (dom_ms, dom_min, dom_max) = stats(dom);
    let (total_ms, _, _) = stats(dom_total);
    let (naive_ms, naive_min, naive_max) = stats(in_place);
    println!(
        "update of {files} files of {size} bytes, one restarted service (`true bench stop|start`), median of {runs} runs:"
    );
    println!(
        "  dom Updater, stop -> rename staged files into place -> fsync dirs -> start: {dom_ms} ms (min {dom_min}, max {dom_max})"
    );
    println!(
        "    whole update, staging, copy-verify and syncfs before the window included:  {total_ms} ms"
    );
    println!(
        "  in place, stop -> open/truncate/write each file (no fsync) -> start:         {naive_ms} ms (min {naive_min}, max {naive_max})"
    );
    let json = serde_json::json!({
        "bench": "update",
        "files": files,
        "dom_activation_ms": dom_ms,
        "in_place_activation_ms": naive_ms,
    });
    println!("{json}");
}

/// Writes `files` small files (in directories of 200), `changed` of them (every
/// `files/changed`-th) with a second version's content.
fn small_tree(root: &Path, files: u64, version: u32, every: u64) -> std::io::Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{:04}", i / 200));
        if i % 200 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let v = if every > 0 && i % every == 0 {
            version
        } else {
            1
        };
        std::fs::write(
            dir.join(format!("f{i:06}")),
            format!("file {i} version {v}\n"),
        )?;
    }
    Ok(())
}

/// Adds machines given as Dominator MDB entries, in one batch event.
fn import_machines(
    cluster: &Cluster,
    dir: &Path,
    machines: impl Iterator<Item = serde_json::Value>,
) {
    let mdb: Vec<serde_json::Value> = machines.collect();
    let path = dir.join("mdb.json");
    std::fs::write(&path, serde_json::to_vec(&mdb).expect("json")).expect("write mdb");
    let out = cluster.domadm(&["machine", "import", path.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn agents_bench(n: usize, files: u64) {
    use dom_benches::agents::{self, Connections, Counters};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let work = tempfile::tempdir().expect("temp dir");
    eprintln!("generating two versions of a {files}-file image (1% of files differ)");
    for v in 1..=2u32 {
        small_tree(&work.path().join(format!("v{v}")), files, v, 100).expect("generate tree");
    }
    let mut cluster = Cluster::start_with_default_timing(3, &[]);
    cluster.wait_leader(None);
    let mut roots = std::collections::HashMap::new();
    for v in 1..=2 {
        let name = format!("bench/{v}");
        let src = work.path().join(format!("v{v}"));
        let out = cluster.domadm(&["image", "add", &name, src.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "image add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for image in cluster
        .domadm_json(&["image", "list"])
        .as_array()
        .expect("images")
    {
        let root = hex::decode(image["root_hash"].as_str().unwrap_or_default()).unwrap_or_default();
        roots.insert(image["name"].as_str().unwrap_or_default().to_owned(), root);
    }
    import_machines(
        &cluster,
        work.path(),
        (0..n).map(
            |i| serde_json::json!({"Hostname": format!("sim-{i:05}"), "RequiredImage": "bench/1"}),
        ),
    );

    // The leader's memory for the fleet and its images alone, before any agent connects.
    let rss_fleet = agents::rss_bytes(cluster.pid(cluster.wait_leader(None)).expect("leader pid"));
    let addrs: Vec<String> = cluster.endpoints().split(',').map(str::to_owned).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // Lazy channels start their connection tasks on this runtime.
    let _entered = runtime.enter();
    let sim = Arc::new(agents::Sim {
        controllers: addrs.clone(),
        connections: Connections::new(&addrs, n),
        roots: Arc::new(std::sync::Mutex::new(roots)),
        counters: Counters::new(n),
        start: Instant::now(),
    });
    let (counters, start) = (&sim.counters, sim.start);
    eprintln!("starting {n} simulated agents");
    for i in 0..n {
        runtime.spawn(agents::agent(
            i,
            format!("sim-{i:05}"),
            "bench/1".into(),
            sim.clone(),
        ));
    }
    let limit = Duration::from_secs(600);
    let connect_compliant_s = runtime.block_on(agents::wait_compliant(&addrs, "bench/1", n, limit));
    let leader_pid = cluster.pid(cluster.wait_leader(None)).expect("leader pid");
    let rss_connected = agents::rss_bytes(leader_pid);
    // What N compliant machines cost the leader while nothing changes: heartbeats and
    // keepalives only, so it should stay near what an idle cluster costs.
    let idle_cpu_before = agents::cpu_seconds(leader_pid);
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let leader_idle_cpu_percent = 100.0 * (agents::cpu_seconds(leader_pid) - idle_cpu_before)
        / idle_started.elapsed().as_secs_f64();
    let cpu_before = agents::cpu_seconds(leader_pid);
    // The simulated agents share the cores with the cluster: what they take is shown beside
    // what the leader takes, since it is CPU the leader could not have.
    let sim_cpu_before = agents::cpu_seconds(std::process::id());

    counters.plans.store(0, Ordering::SeqCst);
    let assign_start = start.elapsed();
    let out = cluster.domadm(&["assign", "--required", "bench/2", "--all"]);
    assert!(
        out.status.success(),
        "assign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // domadm lists the fleet, commits, and returns once the event is applied: the part of
    // the figures before the leader can plan anything.
    let assign_command_s = (start.elapsed() - assign_start).as_secs_f64();
    let mut rss_peak = rss_connected;
    let plans_start = Instant::now();
    while counters.plans.load(Ordering::SeqCst) < n {
        rss_peak = rss_peak.max(agents::rss_bytes(leader_pid));
        assert!(
            plans_start.elapsed() < limit,
            "not every agent got its plan"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let [first_plan, median_plan, last_plan] = counters.plan_spread(assign_start);
    let assign_to_last_plan_s = last_plan.as_secs_f64();
    runtime.block_on(agents::wait_compliant(&addrs, "bench/2", n, limit));
    let rollout_s = (start.elapsed() - assign_start).as_secs_f64();
    rss_peak = rss_peak.max(agents::rss_bytes(leader_pid));
    let leader_cpu_s = agents::cpu_seconds(leader_pid) - cpu_before;
    let sim_cpu_s = agents::cpu_seconds(std::process::id()) - sim_cpu_before;

    counters.connect_bytes.store(0, Ordering::SeqCst);
    counters.connects.store(0, Ordering::SeqCst);
    // Leadership may have moved under load: kill whoever leads now.
    let leader = cluster.wait_leader(None);
    let killed = Instant::now();
    cluster.kill(leader);
    let others = cluster.addrs_except(leader);
    runtime.block_on(agents::wait_compliant(&others, "bench/2", n, limit));
    let failover_to_compliant_s = killed.elapsed().as_secs_f64();
    let connects = counters.connects.load(Ordering::SeqCst).max(1);
    let reconnect_bytes_per_agent = counters.connect_bytes.load(Ordering::SeqCst) / connects;

    println!("{n} simulated agents, image of {files} files, 3 replicas on loopback:");
    println!("  all connected and compliant:           {connect_compliant_s:.2} s");
    println!(
        "  assign (all) to the first, median, last agent's plan: {:.3}, {:.3}, {assign_to_last_plan_s:.3} s",
        first_plan.as_secs_f64(),
        median_plan.as_secs_f64()
    );
    println!("  domadm assign --all (list the fleet, commit): {assign_command_s:.3} s");
    println!("  assign (all) to all compliant again:   {rollout_s:.2} s");
    println!(
        "  leader RSS: {} MiB before any agent, {} MiB connected, {} MiB peak; leader CPU during the rollout: {leader_cpu_s:.2} s (the simulated agents: {sim_cpu_s:.2} s)",
        rss_fleet >> 20,
        rss_connected >> 20,
        rss_peak >> 20
    );
    println!("  leader CPU with all {n} compliant and nothing changing: {leader_idle_cpu_percent:.1}% of a core");
    println!("  bytes a compliant agent sends to reconnect (hello + description): {reconnect_bytes_per_agent}");
    println!(
        "  leader SIGKILLed -> all compliant on the new leader: {failover_to_compliant_s:.2} s"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "agents",
            "agents": n,
            "files": files,
            "connect_compliant_s": connect_compliant_s,
            "assign_to_last_plan_s": assign_to_last_plan_s,
            "assign_to_first_plan_s": first_plan.as_secs_f64(),
            "assign_to_median_plan_s": median_plan.as_secs_f64(),
            "assign_command_s": assign_command_s,
            "rollout_s": rollout_s,
            "leader_rss_bytes": rss_peak,
            "leader_rss_before_agents_bytes": rss_fleet,
            "leader_rss_connected_bytes": rss_connected,
            "leader_cpu_s": leader_cpu_s,
            "sim_cpu_s": sim_cpu_s,
            "leader_idle_cpu_percent": leader_idle_cpu_percent,
            "reconnect_bytes_per_agent": reconnect_bytes_per_agent,
            "failover_to_compliant_s": failover_to_compliant_s,
        })
    );
    runtime.shutdown_background();
}

fn writes_bench(levels: &[usize], seconds: u64) {
    use dom_benches::writes::{self, EtcdCluster, VALUE_BYTES};
    use std::time::Duration;

    let most = levels.iter().copied().max().unwrap_or(1);
    let cluster = Cluster::start_with_default_timing(3, &[]);
    let leader = cluster.wait_leader(None);
    let work = tempfile::tempdir().expect("temp dir");
    import_machines(
        &cluster,
        work.path(),
        (0..most).map(|i| serde_json::json!({"Hostname": format!("bench-{i}")})),
    );
    let leader_addr = cluster.replicas[&leader].addr.clone();

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _entered = runtime.enter();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let etcd = EtcdCluster::start(&ports);
    match &etcd {
        Some(e) => runtime.block_on(e.wait_ready()),
        None => eprintln!(
            "note: no etcd on PATH (benches/setup.sh installs Debian's etcd-server); dom only"
        ),
    }
    let duration = Duration::from_secs(seconds);
    println!(
        "durable writes of {VALUE_BYTES}-byte values, 3 replicas/members on loopback, {seconds} s per level:"
    );
    for &c in levels {
        let dom = runtime.block_on(writes::dom(&leader_addr, c, duration));
        let etcd_figures = etcd
            .as_ref()
            .map(|e| runtime.block_on(writes::etcd(&e.endpoints, c, duration)));
        let ratio = etcd_figures.map(|e| dom.per_sec / e.per_sec.max(f64::MIN_POSITIVE));
        println!(
            "  concurrency {c:>3}: dom {:>8.0} writes/s p50 {:>6.2} ms p99 {:>6.2} ms{}",
            dom.per_sec,
            dom.p50_ms,
            dom.p99_ms,
            etcd_figures.map_or(String::new(), |e| format!(
                " | etcd {:>8.0} writes/s p50 {:>6.2} ms p99 {:>6.2} ms | dom/etcd {:.2}",
                e.per_sec,
                e.p50_ms,
                e.p99_ms,
                ratio.unwrap_or(0.0)
            ))
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "writes",
                "concurrency": c,
                "dom_events_per_sec": dom.per_sec,
                "dom_p50_ms": dom.p50_ms,
                "dom_p99_ms": dom.p99_ms,
                "etcd_events_per_sec": etcd_figures.map(|e| e.per_sec),
                "etcd_p50_ms": etcd_figures.map(|e| e.p50_ms),
                "etcd_p99_ms": etcd_figures.map(|e| e.p99_ms),
                "ratio": ratio,
            })
        );
    }
    drop(etcd);
}

fn main() {
    match Cli::parse().command {
        Bench::Ingest { bytes, files } => ingest(bytes, files),
        Bench::Scan { bytes, files, runs } => scan(bytes, files, runs),
        Bench::Replay { events } => replay(events),
        Bench::Update { files, size, runs } => update(files, size, runs),
        Bench::Agents { agents, files } => agents_bench(agents, files),
        Bench::Writes {
            concurrency,
            seconds,
        } => writes_bench(&concurrency, seconds),
    }
}
