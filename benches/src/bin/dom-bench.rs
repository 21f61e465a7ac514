//! dom-bench: whole-system measurements, each beside what an operator would use instead, in
//! the same run. Every subcommand starts what it needs on loopback, cleans up, prints a
//! summary and ends with one JSON line of figures.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::{Parser, Subcommand};
use dom_tests::Cluster;

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
    let cluster = Cluster::start(3, &[]);
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

fn main() {
    match Cli::parse().command {
        Bench::Ingest { bytes, files } => ingest(bytes, files),
    }
}
