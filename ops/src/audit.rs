//! `domadm audit ...`: the journal, for investigators.
//!
//! Every replica keeps the whole hash-chained journal. `log` and `export` read it with filters,
//! `replay` folds it up to a point in history with the same fold the replicas use, and
//! `verify` recomputes every replica's chain and compares them. `--data-dir` reads a stopped
//! replica's data dir (through a private copy, so the original is never touched).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use dom_proto::v1 as pb;
use dom_storage::event::{Change, Event, Hash};
use dom_storage::journal::{self, JournalHead, JournalRecord};
use dom_storage::replay::{Replay, Until};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::client::{admin, channel_to};
use crate::output::{self, rfc3339};
use crate::Context;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Filters {
    /// Only events that name this machine.
    #[arg(long, value_name = "HOST")]
    machine: Option<String>,
    /// Only events that name this image.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Only events of this kind (machine_added, required_image_set, ...).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Only events at or after this time: RFC 3339, or an age like 30m, 2h, 7d.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only events at or before this time: RFC 3339, or an age like 30m, 2h, 7d.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Who changed what, when and why. `--actor NAME` selects that actor's events.
    #[command(
        after_help = "Examples:\n  domadm audit log --machine web-01\n  domadm audit log --actor alice --since 2h -o json\n  domadm audit log --follow"
    )]
    Log {
        #[command(flatten)]
        filters: Filters,
        /// Keep printing events as they commit.
        #[arg(long)]
        follow: bool,
    },
    /// The whole fleet as it stood at a journal index or a time.
    #[command(
        after_help = "Examples:\n  domadm audit replay --at 120\n  domadm audit replay --at 2026-11-20T09:00:00Z -o json\n  domadm audit replay --at 120 --data-dir /backup/replica-2"
    )]
    Replay {
        /// A journal index, or an RFC 3339 time (the last event at or before it).
        #[arg(long, value_name = "INDEX|TIME")]
        at: String,
        /// Read a stopped replica's data dir (or a copy) instead of the cluster.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Recompute every replica's hash chain and compare their heads.
    #[command(
        after_help = "Examples:\n  domadm audit verify\n  domadm audit verify --data-dir /backup/replica-2"
    )]
    Verify {
        /// Verify a stopped replica's data dir (or a copy) instead of the cluster.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Every event as JSON lines, with the hashes that let a copy be checked later.
    /// `--actor NAME` selects that actor's events.
    #[command(
        after_help = "Example:\n  domadm audit export --since 2026-11-01T00:00:00Z > audit.jsonl"
    )]
    Export {
        #[command(flatten)]
        filters: Filters,
    },
}

/// Parses RFC 3339 or an age (`90s`, `30m`, `2h`, `7d`) into Unix milliseconds.
pub fn parse_time(text: &str, now: OffsetDateTime) -> anyhow::Result<i64> {
    if let Ok(t) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let age = crate::machine::parse_duration(text)
        .map_err(|_| anyhow::anyhow!("{text:?} is neither RFC 3339 nor an age like 2h"))?;
    let seconds = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
    Ok(now
        .unix_timestamp()
        .saturating_sub(seconds)
        .saturating_mul(1000))
}

/// The event's own fields as JSON: part of the output contract, so spelled out here.
pub fn change_json(change: &Change) -> Value {
    let opt = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
    match change {
        Change::ImageAdded {
            name,
            root_hash,
            files,
            bytes,
            manifest_hash,
            filter,
            triggers,
        } => json!({
            "name": name, "root_hash": hex::encode(root_hash), "files": files, "bytes": bytes,
            "manifest_hash": manifest_hash.map(hex::encode), "filter": filter, "triggers": triggers,
        }),
        Change::ImageDeleted { name } => json!({ "name": name }),
        Change::MachineAdded {
            hostname,
            tags,
            required_image,
            planned_image,
        } => json!({
            "hostname": hostname, "tags": tags,
            "required_image": opt(required_image), "planned_image": opt(planned_image),
        }),
        Change::MachineUpdated { hostname, tags } => json!({ "hostname": hostname, "tags": tags }),
        Change::MachineRemoved { hostname } => json!({ "hostname": hostname }),
        Change::RequiredImageSet { hostnames, image }
        | Change::PlannedImageSet { hostnames, image } => {
            json!({ "hostnames": hostnames, "image": opt(image) })
        }
        Change::UpdatesHalted | Change::UpdatesResumed => json!({}),
        Change::PolicySet(p) => json!({
            "max_updating": p.max_updating,
            "max_updating_percent": p.max_updating_percent,
            "max_high_impact": p.max_high_impact,
            "fetch_bytes_per_sec": p.fetch_bytes_per_sec,
            "brake_failure_percent": p.brake_failure_percent,
        }),
        Change::MachinePaused {
            hostname,
            duration_ms,
        } => json!({ "hostname": hostname, "duration_ms": duration_ms }),
        Change::SafetyCleared { hostname, image } => {
            json!({ "hostname": hostname, "image": image })
        }
        Change::Batch(changes) => json!({
            "changes": changes.iter().map(|c| {
                let mut v = change_json(c);
                if let Some(map) = v.as_object_mut() {
                    map.insert("kind".into(), Value::String(c.kind().into()));
                }
                v
            }).collect::<Vec<_>>(),
        }),
    }
}

/// A filter made ready to test events.
struct Matcher {
    machine: Option<String>,
    image: Option<String>,
    actor: Option<String>,
    kind: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
}

impl Matcher {
    /// `actor` is the global `--actor`, which on audit commands selects events by that actor.
    fn new(f: &Filters, actor: Option<String>) -> anyhow::Result<Matcher> {
        let now = OffsetDateTime::now_utc();
        Ok(Matcher {
            machine: f
                .machine
                .as_deref()
                .map(dom_storage::names::canonical_hostname)
                .transpose()?,
            image: f
                .image
                .as_deref()
                .map(dom_storage::names::canonical_image_name)
                .transpose()?,
            actor,
            kind: f.kind.clone(),
            since: f.since.as_deref().map(|t| parse_time(t, now)).transpose()?,
            until: f.until.as_deref().map(|t| parse_time(t, now)).transpose()?,
        })
    }

    fn matches(&self, e: &Event) -> bool {
        self.machine
            .as_deref()
            .is_none_or(|m| e.change.machines_named().contains(&m))
            && self
                .image
                .as_deref()
                .is_none_or(|i| e.change.images_named().contains(&i))
            && self.actor.as_deref().is_none_or(|a| e.actor == a)
            && self.kind.as_deref().is_none_or(|k| e.change.kind() == k)
            && self.since.is_none_or(|s| e.time_unix_ms >= s)
            && self.until.is_none_or(|u| e.time_unix_ms <= u)
    }
}

#[derive(Serialize)]
struct LogRecord {
    index: u64,
    time: String,
    actor: String,
    reason: String,
    kind: &'static str,
    event: Value,
    hash: String,
}

fn log_record(index: u64, hash: &[u8], event: &Event) -> LogRecord {
    LogRecord {
        index,
        time: rfc3339(event.time_unix_ms),
        actor: event.actor.clone(),
        reason: event.reason.clone(),
        kind: event.change.kind(),
        event: change_json(&event.change),
        hash: hex::encode(hash),
    }
}

fn decode(index: u64, bytes: &[u8]) -> anyhow::Result<Event> {
    Event::decode(bytes).with_context(|| format!("journal record {index}"))
}

/// Streams records from the replica that answers (the leader, when one is known).
async fn read_journal(
    ctx: &mut Context,
    request: pb::ReadJournalRequest,
) -> anyhow::Result<tonic::Streaming<pb::JournalRecord>> {
    Ok(ctx
        .cluster
        .call(|c| {
            let request = request.clone();
            async move { admin(c).read_journal(request).await }
        })
        .await?)
}

/// A private copy of a data dir's sled database and journal, opened; the original is never
/// written.
fn open_copy(
    data_dir: &Path,
) -> anyhow::Result<(tempfile::TempDir, dom_storage::state_machine::FleetView)> {
    if !data_dir.join("sled").join("db").is_file() {
        bail!("{} is not a domd data dir (no sled/db)", data_dir.display());
    }
    let copy = tempfile::Builder::new().prefix("domadm-audit-").tempdir()?;
    for part in ["sled", "journal"] {
        let source = data_dir.join(part);
        if !source.exists() {
            continue;
        }
        for entry in walkdir::WalkDir::new(&source) {
            let entry = entry?;
            let target = copy
                .path()
                .join(part)
                .join(entry.path().strip_prefix(&source)?);
            if entry.file_type().is_dir() {
                std::fs::create_dir_all(&target)?;
            } else {
                std::fs::copy(entry.path(), &target)
                    .with_context(|| format!("copying {}", entry.path().display()))?;
            }
        }
    }
    let (_log, sm) = dom_storage::open(copy.path())
        .with_context(|| format!("opening a copy of {}", data_dir.display()))?;
    Ok((copy, sm.view()))
}

impl AuditCommand {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        match self {
            AuditCommand::Log { filters, follow } => log(ctx, &filters, follow, false).await,
            AuditCommand::Export { filters } => log(ctx, &filters, false, true).await,
            AuditCommand::Replay { at, data_dir } => replay(ctx, &at, data_dir.as_deref()).await,
            AuditCommand::Verify { data_dir } => verify(ctx, data_dir.as_deref()).await,
        }
    }
}

async fn log(
    ctx: &mut Context,
    filters: &Filters,
    follow: bool,
    export: bool,
) -> anyhow::Result<()> {
    let matcher = Matcher::new(filters, ctx.actor.clone())?;
    // The replica's audit index answers machine and image queries without a scan.
    let request = pb::ReadJournalRequest {
        from: 1,
        follow,
        machine: matcher.machine.clone().unwrap_or_default(),
        image: if matcher.machine.is_none() {
            matcher.image.clone().unwrap_or_default()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let mut stream = read_journal(ctx, request).await?;
    let lines = export || follow;
    let mut collected = Vec::new();
    while let Some(record) = stream.next().await {
        let record = record.map_err(|s| anyhow::anyhow!("reading the journal: {}", s.message()))?;
        let event = decode(record.index, &record.event)?;
        if !matcher.matches(&event) {
            continue;
        }
        let entry = log_record(record.index, &record.hash, &event);
        if lines {
            if export || ctx.output == output::Format::Json {
                println!("{}", serde_json::to_string(&entry)?);
            } else {
                println!("{}", table_line(&entry));
            }
        } else {
            collected.push(entry);
        }
    }
    if !lines {
        let rows = collected
            .iter()
            .map(|e| {
                vec![
                    e.index.to_string(),
                    e.time.clone(),
                    e.actor.clone(),
                    e.kind.to_owned(),
                    summary(&e.event),
                    e.reason.clone(),
                ]
            })
            .collect();
        output::print(
            ctx.output,
            &collected,
            &["INDEX", "TIME", "ACTOR", "KIND", "WHAT", "REASON"],
            rows,
        )?;
    }
    Ok(())
}

fn summary(event: &Value) -> String {
    let Some(map) = event.as_object() else {
        return String::new();
    };
    if let Some(changes) = map.get("changes").and_then(Value::as_array) {
        let parts: Vec<String> = changes
            .iter()
            .map(|c| format!("{} {}", c["kind"].as_str().unwrap_or("?"), summary(c)))
            .collect();
        return format!("{} change(s): {}", changes.len(), parts.join("; "));
    }
    map.iter()
        .filter(|(k, v)| {
            !v.is_null()
                && v.as_object().is_none_or(|o| !o.is_empty())
                && !matches!(
                    k.as_str(),
                    "root_hash" | "manifest_hash" | "filter" | "triggers" | "kind"
                )
        })
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            Value::Array(a) => format!(
                "{k}={}",
                a.iter()
                    .map(|x| x
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn table_line(e: &LogRecord) -> String {
    format!(
        "{:>6}  {}  {}  {}  {}  {}",
        e.index,
        e.time,
        e.actor,
        e.kind,
        summary(&e.event),
        e.reason
    )
}

#[derive(Serialize)]
struct Replayed {
    index: u64,
    time: Option<String>,
    machines: Vec<crate::machine::Machine>,
    images: Vec<crate::image::Image>,
    halted: bool,
}

async fn replay(ctx: &mut Context, at: &str, data_dir: Option<&Path>) -> anyhow::Result<()> {
    let until = match at.parse::<u64>() {
        Ok(index) => Until::Index(index),
        Err(_) => Until::Time(parse_time(at, OffsetDateTime::now_utc())?),
    };
    let stop_index = until.last_index();
    let replayer = match data_dir {
        // The journal's segment files are all a replay reads: no copy, and no sled to open.
        Some(dir) if dir.join("journal").is_dir() => {
            let records = dom_storage::journal_store::read_dir(&dir.join("journal"))
                .with_context(|| format!("reading the journal in {}", dir.display()))?;
            Replay::new(until).fold(records)?
        }
        // A data dir of a build that kept the journal in sled: open a copy, which moves it.
        Some(dir) => {
            let (_copy, view) = open_copy(dir)?;
            Replay::new(until).fold(view.journal(1, stop_index.unwrap_or(u64::MAX)))?
        }
        None => {
            let mut replayer = Replay::new(until);
            let request = pb::ReadJournalRequest {
                from: 1,
                to: stop_index.unwrap_or(0),
                ..Default::default()
            };
            let mut stream = read_journal(ctx, request).await?;
            while let Some(record) = stream.next().await {
                let record =
                    record.map_err(|s| anyhow::anyhow!("reading the journal: {}", s.message()))?;
                let hash: Hash = record
                    .hash
                    .as_slice()
                    .try_into()
                    .context("bad hash in journal record")?;
                let stored = JournalRecord {
                    log_index: record.log_index,
                    hash,
                    event: record.event,
                };
                if !replayer.feed(record.index, &stored)? {
                    break;
                }
            }
            replayer
        }
    };
    let index = replayer.head().index;
    if let Some(asked) = stop_index {
        if index < asked {
            bail!("the journal ends at index {index}; there is no index {asked}");
        }
    }
    let state = &replayer.state;
    let replayed = Replayed {
        index,
        time: replayer.time_unix_ms.map(rfc3339),
        machines: state
            .machines()
            .map(crate::machine::Machine::from)
            .collect(),
        images: state.images().map(crate::image::Image::from).collect(),
        halted: state.policy().halt.is_some(),
    };
    match ctx.output {
        output::Format::Json => println!("{}", serde_json::to_string_pretty(&replayed)?),
        output::Format::Table => {
            println!(
                "fleet at journal index {} ({}){}",
                replayed.index,
                replayed.time.as_deref().unwrap_or("empty journal"),
                if replayed.halted {
                    ", updates halted"
                } else {
                    ""
                }
            );
            println!();
            crate::machine::print_machines(output::Format::Table, &replayed.machines)?;
            println!();
            crate::image::print_images(output::Format::Table, &replayed.images)?;
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct ReplicaHead {
    id: u64,
    head_index: u64,
    head_hash: String,
}

#[derive(Serialize)]
struct Verified {
    ok: bool,
    replicas: Vec<ReplicaHead>,
    problems: Vec<String>,
}

/// Walks one journal: its head, every record's hash (for comparing replicas) and the first
/// break in its chain, if any.
fn walk<'a>(
    records: impl Iterator<Item = anyhow::Result<(u64, JournalRecord)>> + 'a,
) -> anyhow::Result<(JournalHead, Vec<Hash>, Option<String>)> {
    let mut head = JournalHead::default();
    let mut hashes = Vec::new();
    for item in records {
        let (index, record) = item?;
        match journal::verify(head, [(index, &record)]) {
            Ok(next) => {
                head = next;
                hashes.push(record.hash);
            }
            Err(e) => return Ok((head, hashes, Some(e.to_string()))),
        }
    }
    Ok((head, hashes, None))
}

async fn verify(ctx: &mut Context, data_dir: Option<&Path>) -> anyhow::Result<()> {
    let mut replicas = Vec::new();
    let mut problems = Vec::new();
    let mut chains: BTreeMap<u64, Vec<Hash>> = BTreeMap::new();
    match data_dir {
        Some(dir) => {
            let (_copy, view) = open_copy(dir)?;
            let stored_head = view.journal_head();
            let (head, hashes, broken) = walk(
                view.journal(1, u64::MAX)
                    .map(|r| r.map_err(anyhow::Error::from)),
            )?;
            if let Some(b) = broken {
                problems.push(format!("{}: {b}", dir.display()));
            } else if head != stored_head {
                problems.push(format!(
                    "{}: records end at {} but the stored head is {}",
                    dir.display(),
                    head.index,
                    stored_head.index
                ));
            }
            replicas.push(ReplicaHead {
                id: 0,
                head_index: head.index,
                head_hash: hex::encode(head.hash),
            });
            chains.insert(0, hashes);
        }
        None => {
            let status = ctx
                .cluster
                .call(|c| async move { admin(c).cluster_status(pb::ClusterStatusRequest {}).await })
                .await?;
            for member in status.members {
                let request = pb::ReadJournalRequest {
                    from: 1,
                    ..Default::default()
                };
                let stream = match admin(channel_to(&member.addr)?).read_journal(request).await {
                    Ok(s) => s.into_inner(),
                    Err(s) => {
                        problems.push(format!(
                            "replica {} ({}) could not be read: {}",
                            member.id,
                            member.addr,
                            s.message()
                        ));
                        continue;
                    }
                };
                let records: Vec<anyhow::Result<(u64, JournalRecord)>> = stream
                    .map(|r| {
                        let r = r.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                        let hash: Hash = r.hash.as_slice().try_into().context("bad hash")?;
                        Ok((
                            r.index,
                            JournalRecord {
                                log_index: r.log_index,
                                hash,
                                event: r.event,
                            },
                        ))
                    })
                    .collect()
                    .await;
                let (head, hashes, broken) = walk(records.into_iter())?;
                if let Some(b) = broken {
                    problems.push(format!("replica {}: {b}", member.id));
                }
                replicas.push(ReplicaHead {
                    id: member.id,
                    head_index: head.index,
                    head_hash: hex::encode(head.hash),
                });
                chains.insert(member.id, hashes);
            }
            // Replicas may lag, but where two both hold an index they must agree.
            let ids: Vec<u64> = chains.keys().copied().collect();
            for pair in ids.windows(2) {
                let (a, b) = (&chains[&pair[0]], &chains[&pair[1]]);
                if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                    problems.push(format!(
                        "replicas {} and {} diverge at journal index {}",
                        pair[0],
                        pair[1],
                        i + 1
                    ));
                }
            }
        }
    }
    let verified = Verified {
        ok: problems.is_empty(),
        replicas,
        problems,
    };
    match ctx.output {
        output::Format::Json => println!("{}", serde_json::to_string_pretty(&verified)?),
        output::Format::Table => {
            let rows = verified
                .replicas
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.head_index.to_string(),
                        r.head_hash.clone(),
                    ]
                })
                .collect();
            output::print(
                output::Format::Table,
                &verified,
                &["REPLICA", "HEAD INDEX", "HEAD HASH"],
                rows,
            )?;
            for p in &verified.problems {
                println!("problem: {p}");
            }
            println!(
                "{}",
                if verified.ok {
                    "ok: every chain is intact and the replicas agree"
                } else {
                    "NOT OK"
                }
            );
        }
    }
    if !verified.ok {
        bail!(
            "the journal failed verification: {}",
            verified.problems.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_ages() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(
            parse_time("2h", now).unwrap(),
            (1_800_000_000 - 7200) * 1000
        );
        assert_eq!(
            parse_time("7d", now).unwrap(),
            (1_800_000_000 - 7 * 86_400) * 1000
        );
        assert_eq!(
            parse_time("2027-01-15T08:00:00Z", now).unwrap(),
            1_800_000_000_000
        );
        assert!(parse_time("yesterday", now).is_err());
        assert_eq!(
            parse_time("1h30m", now).unwrap(),
            (1_800_000_000 - 5400) * 1000
        );
        assert!(parse_time("5 parsecs", now).is_err());
    }
}
