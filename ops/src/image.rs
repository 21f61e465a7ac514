//! `domadm image ...`

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use dom_proto::v1 as pb;
use dom_storage::event::{trigger_from_pb, Change, Hash};
use dom_storage::image::{diff, parse_triggers, Difference, Entry, Filter, Kind, Manifest};
use dom_storage::names;
use dom_storage::objects::to_hex;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::client::{admin, objects};
use crate::ingest::{read_source, Ingested};
use crate::machine::commit;
use crate::output::{self, rfc3339};
use crate::Context;

const CHUNK: usize = 1 << 20;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Ingest a directory or tarball as a new image, uploading only what the cluster lacks.
    #[command(
        after_help = "Examples:\n  domadm image add web/2026.11.15 ./rootfs --filter filter --triggers triggers.json\n  domadm image add db/2026.10.20 db.tar.zst"
    )]
    Add {
        /// Image name, path-like (`web/2026.11.15`).
        name: String,
        /// A directory, .tar, .tar.gz or .tar.zst.
        source: PathBuf,
        /// Dominator filter file: regular expressions of paths the image leaves alone.
        #[arg(long, value_name = "FILE")]
        filter: Option<PathBuf>,
        /// Dominator triggers file (JSON): services to restart when paths change.
        #[arg(long, value_name = "FILE")]
        triggers: Option<PathBuf>,
    },
    /// Every image the cluster knows, deleted ones marked.
    #[command(after_help = "Example:\n  domadm image list -o json")]
    List,
    /// One image: counts, bytes, root hash, filter and triggers.
    #[command(after_help = "Example:\n  domadm image show web/2026.11.15")]
    Show { name: String },
    /// Paths added, removed and changed from image A to image B.
    #[command(after_help = "Example:\n  domadm image diff web/2026.11.01 web/2026.11.15")]
    Diff { a: String, b: String },
    /// Withdraw an image (refused while a machine requires or plans it). Its name stays taken.
    #[command(after_help = "Example:\n  domadm image delete web/2026.10.01 --reason superseded")]
    Delete { name: String },
    /// Write an image's tree into DIR (which must not exist or be empty), exactly: contents,
    /// modes, symlinks, hard links, and ownership when run as root.
    #[command(after_help = "Example:\n  domadm image get web/2026.11.15 /tmp/web")]
    Get { name: String, dir: PathBuf },
}

#[derive(Serialize)]
pub struct Image {
    name: String,
    root_hash: String,
    files: u64,
    bytes: u64,
    created_at: String,
    deleted: bool,
    manifest_hash: String,
    filter: Vec<String>,
    triggers: Vec<dom_storage::image::Trigger>,
}

impl From<pb::Image> for Image {
    fn from(i: pb::Image) -> Self {
        Image {
            name: i.name,
            root_hash: hex::encode(&i.root_hash),
            files: i.files,
            bytes: i.bytes,
            created_at: rfc3339(i.created_at_unix_ms),
            deleted: i.deleted,
            manifest_hash: hex::encode(&i.manifest_hash),
            filter: i.filter,
            triggers: i.triggers.into_iter().map(trigger_from_pb).collect(),
        }
    }
}

impl From<&dom_storage::fleet::Image> for Image {
    fn from(i: &dom_storage::fleet::Image) -> Self {
        Image {
            name: i.name.clone(),
            root_hash: hex::encode(i.root_hash),
            files: i.files,
            bytes: i.bytes,
            created_at: rfc3339(i.created_at_unix_ms),
            deleted: i.deleted_at.is_some(),
            manifest_hash: i.manifest_hash.map(hex::encode).unwrap_or_default(),
            filter: i.filter.clone(),
            triggers: i.triggers.clone(),
        }
    }
}

pub fn print_images(format: output::Format, list: &[Image]) -> anyhow::Result<()> {
    let rows = list
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.root_hash.chars().take(16).collect(),
                i.files.to_string(),
                i.bytes.to_string(),
                i.created_at.clone(),
                if i.deleted {
                    "deleted".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    output::print(
        format,
        &list,
        &["NAME", "ROOT HASH", "FILES", "BYTES", "CREATED", ""],
        rows,
    )
}

/// A byte progress bar on a terminal (hidden otherwise); `len` may be learned later.
fn progress(len: Option<u64>, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        len,
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

async fn images(ctx: &mut Context) -> anyhow::Result<Vec<pb::Image>> {
    Ok(ctx
        .cluster
        .call(|c| async move { admin(c).list_images(pb::ListImagesRequest {}).await })
        .await?
        .images)
}

async fn find(ctx: &mut Context, name: &str) -> anyhow::Result<pb::Image> {
    let name = names::canonical_image_name(name)?;
    images(ctx)
        .await?
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| anyhow::anyhow!("unknown image {name:?}"))
}

/// Streams one object from the cluster into `out`, checking its hash.
async fn fetch(
    ctx: &mut Context,
    hash: Hash,
    out: &mut (impl Write + ?Sized),
) -> anyhow::Result<u64> {
    let request = pb::GetRequest {
        hash: hash.to_vec(),
    };
    let mut stream = ctx
        .cluster
        .call(|c| {
            let request = request.clone();
            async move { objects(c).get(request).await }
        })
        .await?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|s| anyhow::anyhow!("fetching object {}: {}", to_hex(&hash), s.message()))?;
        hasher.update(&chunk.data);
        out.write_all(&chunk.data)?;
        size += chunk.data.len() as u64;
    }
    if hasher.finalize().as_bytes() != &hash {
        bail!("object {} arrived corrupt", to_hex(&hash));
    }
    Ok(size)
}

pub async fn manifest_of(ctx: &mut Context, image: &pb::Image) -> anyhow::Result<Manifest> {
    let hash: Hash = image
        .manifest_hash
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("image {} has no manifest", image.name))?;
    let mut bytes = Vec::new();
    fetch(ctx, hash, &mut bytes).await?;
    Ok(Manifest::decode(&bytes)?)
}

impl ImageCommand {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        match self {
            ImageCommand::Add {
                name,
                source,
                filter,
                triggers,
            } => add(ctx, &name, &source, filter, triggers).await,
            ImageCommand::List => {
                let list: Vec<Image> = images(ctx).await?.into_iter().map(Image::from).collect();
                print_images(ctx.output, &list)
            }
            ImageCommand::Show { name } => {
                let image = Image::from(find(ctx, &name).await?);
                let triggers: Vec<String> = image
                    .triggers
                    .iter()
                    .map(|t| {
                        format!(
                            "{} <- {}{}",
                            t.service,
                            t.match_lines.join(" "),
                            if t.do_reboot {
                                " (reboot)"
                            } else if t.do_reload {
                                " (reload)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect();
                let rows = vec![
                    vec!["name".into(), image.name.clone()],
                    vec!["root hash".into(), image.root_hash.clone()],
                    vec!["manifest".into(), image.manifest_hash.clone()],
                    vec!["files".into(), image.files.to_string()],
                    vec!["bytes".into(), image.bytes.to_string()],
                    vec!["created".into(), image.created_at.clone()],
                    vec!["deleted".into(), image.deleted.to_string()],
                    vec!["filter".into(), image.filter.join("\n")],
                    vec!["triggers".into(), triggers.join("\n")],
                ];
                output::print(ctx.output, &image, &["", ""], rows)
            }
            ImageCommand::Diff { a, b } => {
                let (image_a, image_b) = (find(ctx, &a).await?, find(ctx, &b).await?);
                let (from, to) = (
                    manifest_of(ctx, &image_a).await?,
                    manifest_of(ctx, &image_b).await?,
                );
                print_diff(ctx.output, &diff(&from, &to))
            }
            ImageCommand::Delete { name } => {
                let name = names::canonical_image_name(&name)?;
                commit(
                    ctx,
                    Change::ImageDeleted { name: name.clone() },
                    &format!("image {name} deleted"),
                )
                .await
            }
            ImageCommand::Get { name, dir } => {
                let image = find(ctx, &name).await?;
                if image.deleted {
                    bail!("image {} was deleted", image.name);
                }
                let manifest = manifest_of(ctx, &image).await?;
                materialize(ctx, &manifest, &dir).await?;
                println!(
                    "image {} written to {} ({} files, {} bytes)",
                    image.name,
                    dir.display(),
                    manifest.files(),
                    manifest.bytes()
                );
                Ok(())
            }
        }
    }
}

#[derive(Serialize)]
struct DiffJson {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
}

fn change_text(from: &Entry, to: &Entry) -> String {
    let mut parts = Vec::new();
    if from.kind != to.kind {
        parts.push(format!("{:?} -> {:?}", from.kind, to.kind));
    }
    if from.mode != to.mode {
        parts.push(format!("mode {:o} -> {:o}", from.mode, to.mode));
    }
    if (from.uid, from.gid) != (to.uid, to.gid) {
        parts.push(format!(
            "owner {}:{} -> {}:{}",
            from.uid, from.gid, to.uid, to.gid
        ));
    }
    if from.hash != to.hash || from.size != to.size {
        parts.push(format!("content ({} -> {} bytes)", from.size, to.size));
    }
    if from.link_target != to.link_target {
        parts.push(format!("target {} -> {}", from.link_target, to.link_target));
    }
    parts.join(", ")
}

fn print_diff(format: output::Format, differences: &[Difference<'_>]) -> anyhow::Result<()> {
    let pick = |f: fn(&Difference<'_>) -> bool| {
        differences
            .iter()
            .filter(|d| f(d))
            .map(|d| d.path().to_owned())
            .collect::<Vec<_>>()
    };
    let json = DiffJson {
        added: pick(|d| matches!(d, Difference::Added(_))),
        removed: pick(|d| matches!(d, Difference::Removed(_))),
        changed: pick(|d| matches!(d, Difference::Changed { .. })),
    };
    match format {
        output::Format::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        output::Format::Table => {
            let mut out = std::io::stdout().lock();
            for d in differences {
                match d {
                    Difference::Added(e) => writeln!(out, "+ {}", e.path)?,
                    Difference::Removed(e) => writeln!(out, "- {}", e.path)?,
                    Difference::Changed { from, to } => {
                        writeln!(out, "~ {} ({})", to.path, change_text(from, to))?
                    }
                }
            }
            writeln!(
                out,
                "{} added, {} removed, {} changed",
                json.added.len(),
                json.removed.len(),
                json.changed.len()
            )?;
        }
    }
    Ok(())
}

async fn add(
    ctx: &mut Context,
    name: &str,
    source: &Path,
    filter: Option<PathBuf>,
    triggers: Option<PathBuf>,
) -> anyhow::Result<()> {
    let name = names::canonical_image_name(name)?;
    // The leader decides, but there is no point hashing and uploading for a name that is taken.
    if let Some(taken) = images(ctx).await?.into_iter().find(|i| i.name == name) {
        if taken.deleted {
            bail!("image name {name:?} belonged to a deleted image and is never reused");
        }
        bail!("image {name:?} already exists");
    }
    let filter = match filter {
        Some(path) => Filter::parse(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => Filter::empty(),
    };
    let triggers = match triggers {
        Some(path) => parse_triggers(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => Vec::new(),
    };
    let spool = tempfile::Builder::new()
        .prefix("domadm-ingest-")
        .tempdir()?;
    // The directory reader sets the total once its walk knows it; an archive's is unknown.
    let bar = progress(None, "hashing");
    let source_owned = source.to_owned();
    let filter_owned = filter.clone();
    let spool_path = spool.path().to_owned();
    let bar_clone = bar.clone();
    let Ingested {
        manifest,
        mut contents,
        filtered,
    } = tokio::task::spawn_blocking(move || {
        read_source(&source_owned, &filter_owned, &spool_path, &bar_clone)
    })
    .await??;
    bar.finish_and_clear();
    let manifest_bytes = manifest.encode();
    let manifest_hash = *blake3::hash(&manifest_bytes).as_bytes();
    let manifest_path = spool.path().join("manifest");
    std::fs::write(&manifest_path, &manifest_bytes)?;
    contents.insert(manifest_hash, manifest_path);

    // Upload to the leader, which must hold everything before it commits the image.
    let status = ctx
        .cluster
        .call(|c| async move { admin(c).cluster_status(pb::ClusterStatusRequest {}).await })
        .await?;
    let target = status
        .members
        .iter()
        .find(|m| m.id == status.leader)
        .map(|m| m.addr.clone())
        .unwrap_or_else(|| ctx.cluster.preferred());
    let mut wanted: Vec<Hash> = contents.keys().copied().collect();
    wanted.sort_unstable();
    let mut missing = Vec::new();
    for batch in wanted.chunks(10_000) {
        let request = pb::MissingRequest {
            hashes: batch.iter().map(|h| h.to_vec()).collect(),
        };
        let reply = objects(crate::client::channel_to(&target)?)
            .missing(request)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        missing.extend(
            reply
                .into_inner()
                .missing
                .into_iter()
                .filter_map(|h| <Hash>::try_from(h.as_slice()).ok()),
        );
    }
    let upload_bytes: u64 = missing
        .iter()
        .filter_map(|h| contents.get(h))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let bar = progress(Some(upload_bytes), "uploading");
    let uploads: Vec<(Hash, PathBuf)> = missing
        .iter()
        .filter_map(|h| contents.get(h).map(|p| (*h, p.clone())))
        .collect();
    let uploaded = uploads.len();
    if !uploads.is_empty() {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::ObjectChunk>(8);
        let bar_reader = bar.clone();
        let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut batch = dom_storage::objects::WholeBatch::default();
            for (hash, path) in uploads {
                let mut file = std::fs::File::open(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let size = file.metadata()?.len();
                if size <= dom_storage::objects::SMALL_OBJECT {
                    let mut data = vec![0u8; size as usize];
                    file.read_exact(&mut data).with_context(|| {
                        format!("{} changed while being uploaded", path.display())
                    })?;
                    bar_reader.inc(size);
                    if let Some(full) = batch.add(hash, data) {
                        if tx.blocking_send(full).is_err() {
                            return Ok(());
                        }
                    }
                    continue;
                }
                if let Some(rest) = batch.take() {
                    if tx.blocking_send(rest).is_err() {
                        return Ok(());
                    }
                }
                let mut first = true;
                let mut sent = 0u64;
                loop {
                    let mut data = vec![0u8; CHUNK.min((size - sent) as usize)];
                    file.read_exact(&mut data).with_context(|| {
                        format!("{} changed while being uploaded", path.display())
                    })?;
                    sent += data.len() as u64;
                    bar_reader.inc(data.len() as u64);
                    let chunk = pb::ObjectChunk {
                        hash: if first { hash.to_vec() } else { vec![] },
                        size: if first { size } else { 0 },
                        data,
                        whole: Vec::new(),
                    };
                    first = false;
                    if tx.blocking_send(chunk).is_err() {
                        return Ok(());
                    }
                    if sent >= size {
                        break;
                    }
                }
            }
            if let Some(rest) = batch.take() {
                let _ = tx.blocking_send(rest);
            }
            Ok(())
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let put = objects(crate::client::bulk_channel_to(&target)?)
            .put(stream)
            .await;
        reader.await??;
        put.map_err(|s| anyhow::anyhow!("upload to {target} failed: {}", s.message()))?;
    }
    bar.finish_and_clear();

    let root_hash = manifest.root_hash_where(|p| !filter.excludes(p));
    let change = Change::ImageAdded {
        name: name.clone(),
        root_hash,
        files: manifest.files(),
        bytes: manifest.bytes(),
        manifest_hash: Some(manifest_hash),
        filter: filter.lines().to_vec(),
        triggers,
    };
    if ctx.output == output::Format::Table {
        eprintln!(
            "{}: {} files, {} bytes ({} paths filtered); uploaded {} of {} objects ({} bytes)",
            name,
            manifest.files(),
            manifest.bytes(),
            filtered,
            uploaded,
            wanted.len(),
            upload_bytes
        );
    }
    commit(
        ctx,
        change,
        &format!("image {name} added, root hash {}", to_hex(&root_hash)),
    )
    .await
}

/// Writes `manifest` under `dir`. Paths were checked when the manifest was built (absolute,
/// no `..`, nothing under a symlink), and every file is created new, so nothing is written
/// outside `dir`.
async fn materialize(ctx: &mut Context, manifest: &Manifest, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let as_root = unsafe { libc::geteuid() } == 0;
    let local = |path: &str| dir.join(path.trim_start_matches('/'));
    let mut written: std::collections::HashMap<Hash, PathBuf> = std::collections::HashMap::new();
    let bar = progress(Some(manifest.bytes()), "writing");
    for entry in manifest.entries() {
        let target = local(&entry.path);
        match entry.kind {
            Kind::Directory => {
                if entry.path != "/" {
                    std::fs::create_dir(&target)
                        .with_context(|| format!("creating {}", target.display()))?;
                }
            }
            Kind::File => {
                if let Some(copy) = written.get(&entry.hash) {
                    std::fs::copy(copy, &target)
                        .with_context(|| format!("writing {}", target.display()))?;
                } else {
                    let mut file = std::fs::File::options()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .with_context(|| format!("creating {}", target.display()))?;
                    fetch(ctx, entry.hash, &mut file).await?;
                    written.insert(entry.hash, target.clone());
                }
                bar.inc(entry.size);
            }
            Kind::Symlink => symlink(&entry.link_target, &target)
                .with_context(|| format!("creating {}", target.display()))?,
            Kind::HardLink => std::fs::hard_link(local(&entry.link_target), &target)
                .with_context(|| format!("linking {}", target.display()))?,
        }
        if as_root && entry.kind != Kind::HardLink {
            std::os::unix::fs::lchown(&target, Some(entry.uid), Some(entry.gid))
                .with_context(|| format!("chown {}", target.display()))?;
        }
        // After chown, which clears setuid and setgid bits.
        if entry.kind == Kind::File {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(entry.mode))?;
        }
    }
    // Directory modes last, so a read-only directory does not stop its own contents.
    for entry in manifest
        .entries()
        .iter()
        .rev()
        .filter(|e| e.kind == Kind::Directory)
    {
        std::fs::set_permissions(
            local(&entry.path),
            std::fs::Permissions::from_mode(entry.mode),
        )?;
    }
    bar.finish_and_clear();
    Ok(())
}
