//! `domadm machine ...`

use std::collections::BTreeMap;

use clap::Subcommand;
use dom_proto::v1 as pb;
use dom_storage::event::{Change, Event};
use dom_storage::names;
use serde::Serialize;

use crate::output::{self, dash};
use crate::Context;

#[derive(Subcommand, Debug)]
pub enum MachineCommand {
    /// Add a machine to the fleet.
    #[command(
        after_help = "Example:\n  domadm machine add web-01 --tag role=web --tag dc=dc1 --required web/2026.11.01 \\\n      --reason 'new rack'"
    )]
    Add {
        /// The machine's hostname (RFC 1123; stored lower-case).
        host: String,
        /// A label for selecting machines, KEY=VALUE; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// The image the machine must run.
        #[arg(long, value_name = "IMAGE")]
        required: Option<String>,
        /// The image to preload for the next update.
        #[arg(long, value_name = "IMAGE")]
        planned: Option<String>,
    },
    /// Every machine with its required and planned images and tags.
    #[command(after_help = "Example:\n  domadm machine list -o json")]
    List,
    /// One machine.
    #[command(after_help = "Example:\n  domadm machine show web-01")]
    Show { host: String },
    /// Import Dominator's MDB JSON, applying the difference to the fleet as one event.
    #[command(
        after_help = "Example:\n  domadm machine import mdb.json --dry-run\n\nThe file is a JSON array of {\"Hostname\", \"RequiredImage\", \"PlannedImage\"}; other fields\nare ignored and empty strings mean unset. Machines the file does not name are left alone."
    )]
    Import {
        file: std::path::PathBuf,
        /// Show the changes without making them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a machine from the fleet (its history stays in the log).
    #[command(after_help = "Example:\n  domadm machine remove web-01 --reason 'decommissioned'")]
    Remove { host: String },
    /// Hold one machine's updates for a while; the pause ends by itself (`--for 0s` ends it now).
    #[command(
        after_help = "Example:\n  domadm machine pause web-01 --for 1h --reason 'disk swap'"
    )]
    Pause {
        host: String,
        /// How long, e.g. 90s, 30m, 1h, 2d.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        duration: std::time::Duration,
    },
    /// Let the machine take an update held as unsafe (one deleting most of its files), to its
    /// current required image.
    #[command(
        after_help = "Example:\n  domadm machine clear-safety web-01 --reason 'image really is that small'"
    )]
    ClearSafety { host: String },
}

/// `90s`, `30m`, `1h`, `1h30m`, `2d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 30m or 1h: {e}"))
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    names::check_tag(key, value).map_err(|e| e.to_string())?;
    Ok((key.to_owned(), value.to_owned()))
}

#[derive(Serialize)]
pub struct Machine {
    hostname: String,
    required_image: Option<String>,
    planned_image: Option<String>,
    tags: BTreeMap<String, String>,
    added_at: u64,
    changed_at: u64,
}

fn optional(text: String) -> Option<String> {
    Some(text).filter(|t| !t.is_empty())
}

impl From<pb::Machine> for Machine {
    fn from(m: pb::Machine) -> Self {
        Machine {
            hostname: m.hostname,
            required_image: optional(m.required_image),
            planned_image: optional(m.planned_image),
            tags: m.tags,
            added_at: m.added_at,
            changed_at: m.changed_at,
        }
    }
}

impl From<&dom_storage::fleet::Machine> for Machine {
    fn from(m: &dom_storage::fleet::Machine) -> Self {
        Machine {
            hostname: m.hostname.clone(),
            required_image: m.required_image.clone(),
            planned_image: m.planned_image.clone(),
            tags: m.tags.clone(),
            added_at: m.added_at,
            changed_at: m.changed_at,
        }
    }
}

pub fn print_machines(format: output::Format, machines: &[Machine]) -> anyhow::Result<()> {
    output::print(format, &machines, &HEADERS, rows(machines))
}

fn describe(change: &Change) -> String {
    let name = |i: &Option<String>| i.clone().unwrap_or_else(|| "(none)".into());
    match change {
        Change::MachineAdded {
            hostname,
            required_image,
            planned_image,
            ..
        } => {
            format!(
                "add {hostname} required {} planned {}",
                name(required_image),
                name(planned_image)
            )
        }
        Change::RequiredImageSet { hostnames, image } => format!(
            "set required image of {} to {}",
            hostnames.join(","),
            name(image)
        ),
        Change::PlannedImageSet { hostnames, image } => format!(
            "set planned image of {} to {}",
            hostnames.join(","),
            name(image)
        ),
        other => other.kind().to_owned(),
    }
}

fn tags_text(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn rows(machines: &[Machine]) -> Vec<Vec<String>> {
    machines
        .iter()
        .map(|m| {
            vec![
                m.hostname.clone(),
                dash(m.required_image.as_deref().unwrap_or("")),
                dash(m.planned_image.as_deref().unwrap_or("")),
                dash(&tags_text(&m.tags)),
            ]
        })
        .collect()
}

const HEADERS: [&str; 4] = ["HOSTNAME", "REQUIRED", "PLANNED", "TAGS"];

#[derive(Serialize)]
struct Committed {
    journal_index: u64,
    log_index: u64,
    hash: String,
    time: String,
}

/// Commits one change and reports where it landed in the log.
pub async fn commit(ctx: &mut Context, change: Change, done: &str) -> anyhow::Result<()> {
    let event = Event {
        actor: ctx.actor()?,
        time_unix_ms: 0,
        reason: ctx.reason.clone(),
        change,
    };
    // An image commits only once its objects are on a majority, which takes as long as
    // there are objects to copy: a 40,000-file image on a busy cluster outlasted 30 s.
    let long = matches!(event.change, Change::ImageAdded { .. });
    let request = pb::AppendRequest {
        event: Some(event.into()),
    };
    let append = |c| {
        let request = request.clone();
        async move { crate::client::admin(c).append(request).await }
    };
    let reply = if long {
        ctx.cluster.call_long(append).await?
    } else {
        ctx.cluster.call(append).await?
    };
    let committed = Committed {
        journal_index: reply.journal_index,
        log_index: reply.log_index,
        hash: hex::encode(&reply.journal_hash),
        time: output::rfc3339(reply.time_unix_ms),
    };
    match ctx.output {
        output::Format::Json => println!("{}", serde_json::to_string_pretty(&committed)?),
        output::Format::Table => println!("{done} (journal #{})", committed.journal_index),
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct MdbMachine {
    #[serde(rename = "Hostname")]
    hostname: String,
    #[serde(rename = "RequiredImage", default)]
    required_image: String,
    #[serde(rename = "PlannedImage", default)]
    planned_image: String,
}

/// The changes that make the fleet match an MDB: machines added, and required or planned
/// images set where they differ. Machines the MDB does not name are left alone.
fn import_changes(mdb: &[MdbMachine], fleet: &[pb::Machine]) -> anyhow::Result<Vec<Change>> {
    let known: BTreeMap<&str, &pb::Machine> =
        fleet.iter().map(|m| (m.hostname.as_str(), m)).collect();
    let image = |name: &str| -> anyhow::Result<Option<String>> {
        Ok(if name.is_empty() {
            None
        } else {
            Some(names::canonical_image_name(name)?)
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut changes = Vec::new();
    for entry in mdb {
        let hostname = names::canonical_hostname(&entry.hostname)?;
        if !seen.insert(hostname.clone()) {
            anyhow::bail!("{hostname} is listed twice");
        }
        let (required, planned) = (image(&entry.required_image)?, image(&entry.planned_image)?);
        match known.get(hostname.as_str()) {
            None => changes.push(Change::MachineAdded {
                hostname,
                tags: BTreeMap::new(),
                required_image: required,
                planned_image: planned,
            }),
            Some(m) => {
                if optional(m.required_image.clone()) != required {
                    changes.push(Change::RequiredImageSet {
                        hostnames: vec![hostname.clone()],
                        image: required,
                    });
                }
                if optional(m.planned_image.clone()) != planned {
                    changes.push(Change::PlannedImageSet {
                        hostnames: vec![hostname],
                        image: planned,
                    });
                }
            }
        }
    }
    Ok(changes)
}

impl MachineCommand {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        match self {
            MachineCommand::Import { file, dry_run } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                let mdb: Vec<MdbMachine> = serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("{} is not Dominator MDB JSON: {e}", file.display())
                })?;
                let fleet = ctx
                    .cluster
                    .call(|c| async move {
                        crate::client::admin(c)
                            .list_machines(pb::ListMachinesRequest {})
                            .await
                    })
                    .await?
                    .machines;
                let changes = import_changes(&mdb, &fleet)?;
                if changes.is_empty() {
                    println!(
                        "nothing to import: the fleet already matches {}",
                        file.display()
                    );
                    return Ok(());
                }
                if dry_run {
                    for change in &changes {
                        println!("would {}", describe(change));
                    }
                    println!("dry run: nothing was changed");
                    return Ok(());
                }
                let lines: Vec<String> = changes.iter().map(describe).collect();
                let count = changes.len();
                commit(
                    ctx,
                    Change::Batch(changes),
                    &format!("imported {} ({count} change(s))", file.display()),
                )
                .await?;
                if ctx.output == output::Format::Table {
                    lines.iter().for_each(|l| println!("  {l}"));
                }
                Ok(())
            }
            MachineCommand::Add {
                host,
                tags,
                required,
                planned,
            } => {
                let hostname = names::canonical_hostname(&host)?;
                let canonical =
                    |i: Option<String>| i.map(|i| names::canonical_image_name(&i)).transpose();
                let change = Change::MachineAdded {
                    hostname: hostname.clone(),
                    tags: tags.into_iter().collect(),
                    required_image: canonical(required)?,
                    planned_image: canonical(planned)?,
                };
                commit(ctx, change, &format!("machine {hostname} added")).await
            }
            MachineCommand::Remove { host } => {
                let hostname = names::canonical_hostname(&host)?;
                commit(
                    ctx,
                    Change::MachineRemoved {
                        hostname: hostname.clone(),
                    },
                    &format!("machine {hostname} removed"),
                )
                .await
            }
            MachineCommand::List => {
                let reply = ctx
                    .cluster
                    .call(|c| async move {
                        crate::client::admin(c)
                            .list_machines(pb::ListMachinesRequest {})
                            .await
                    })
                    .await?;
                let machines: Vec<Machine> =
                    reply.machines.into_iter().map(Machine::from).collect();
                output::print(ctx.output, &machines, &HEADERS, rows(&machines))
            }
            MachineCommand::Pause { host, duration } => {
                if ctx.reason.trim().is_empty() {
                    anyhow::bail!("say why with --reason: status shows it while the pause lasts");
                }
                let hostname = names::canonical_hostname(&host)?;
                let done = if duration.is_zero() {
                    format!("pause of {hostname} ended")
                } else {
                    format!(
                        "{hostname} paused for {}",
                        humantime::format_duration(duration)
                    )
                };
                commit(
                    ctx,
                    Change::MachinePaused {
                        hostname,
                        duration_ms: duration.as_millis().try_into().unwrap_or(u64::MAX),
                    },
                    &done,
                )
                .await
            }
            MachineCommand::ClearSafety { host } => {
                let hostname = names::canonical_hostname(&host)?;
                let request = pb::GetMachineRequest {
                    hostname: hostname.clone(),
                };
                let machine = ctx
                    .cluster
                    .call(|c| {
                        let request = request.clone();
                        async move { crate::client::admin(c).get_machine(request).await }
                    })
                    .await?;
                if machine.required_image.is_empty() {
                    anyhow::bail!("{hostname} has no required image, so no update to clear");
                }
                let done = format!(
                    "{hostname} may take its update to {} even though it deletes most files",
                    machine.required_image
                );
                commit(
                    ctx,
                    Change::SafetyCleared {
                        hostname,
                        image: machine.required_image,
                    },
                    &done,
                )
                .await
            }
            MachineCommand::Show { host } => {
                let hostname = names::canonical_hostname(&host)?;
                let request = pb::GetMachineRequest { hostname };
                let machine: Machine = ctx
                    .cluster
                    .call(|c| {
                        let request = request.clone();
                        async move { crate::client::admin(c).get_machine(request).await }
                    })
                    .await?
                    .into();
                let status = crate::status::one(ctx, &machine.hostname).await?;
                let mut rows = rows(std::slice::from_ref(&machine));
                rows[0].push(machine.added_at.to_string());
                rows[0].push(machine.changed_at.to_string());
                rows[0].push(status.active_image.clone().unwrap_or_else(|| "-".into()));
                rows[0].push(status.state.clone());
                let mut headers = HEADERS.to_vec();
                headers.extend(["ADDED AT", "CHANGED AT", "ACTIVE", "STATE"]);
                // The machine's record, plus what status knows of it.
                let mut value = serde_json::to_value(&machine)?;
                if let (Some(object), serde_json::Value::Object(extra)) =
                    (value.as_object_mut(), serde_json::to_value(&status)?)
                {
                    for (key, v) in extra {
                        object.entry(key).or_insert(v);
                    }
                }
                output::print(ctx.output, &value, &headers, rows)
            }
        }
    }
}
