//! `domadm assign`: set the required or planned image of many machines in one event.

use std::collections::BTreeMap;

use anyhow::bail;
use clap::{ArgGroup, Args};
use dom_proto::v1 as pb;
use dom_storage::event::Change;
use dom_storage::image::diff;
use dom_storage::names;
use serde::Serialize;

use crate::client::admin;
use crate::machine::commit;
use crate::output;
use crate::Context;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("slot").required(true).args(["required", "planned"])))]
#[command(group(ArgGroup::new("which").required(true).args(["hosts", "selector", "all"])))]
#[command(
    after_help = "Examples:\n  domadm assign --required web/2026.11.15 web-01 web-02 --reason 'roll web'\n  domadm assign --planned web/2026.12.01 --selector role=web --dry-run\n  domadm assign --required base/7 --all"
)]
pub struct Assign {
    /// The image the machines must run.
    #[arg(long, value_name = "IMAGE")]
    required: Option<String>,
    /// The image to preload on the machines for their next update.
    #[arg(long, value_name = "IMAGE")]
    planned: Option<String>,
    /// Machines by hostname.
    hosts: Vec<String>,
    /// Machines whose tag KEY has VALUE.
    #[arg(long, value_name = "KEY=VALUE")]
    selector: Option<String>,
    /// Every machine.
    #[arg(long)]
    all: bool,
    /// Show what would change, and how many files per image pair, without changing anything.
    #[arg(long)]
    dry_run: bool,
    /// Succeed when the selector matches no machine.
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Serialize)]
struct Planned {
    hostname: String,
    from: Option<String>,
    to: String,
}

#[derive(Serialize)]
struct Pair {
    from: Option<String>,
    to: String,
    machines: usize,
    files_changed: usize,
}

#[derive(Serialize)]
struct DryRun {
    changes: Vec<Planned>,
    pairs: Vec<Pair>,
}

impl Assign {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        let (image, required) = match (&self.required, &self.planned) {
            (Some(i), None) => (names::canonical_image_name(i)?, true),
            (None, Some(i)) => (names::canonical_image_name(i)?, false),
            _ => bail!("give exactly one of --required and --planned"),
        };
        let images = ctx
            .cluster
            .call(|c| async move { admin(c).list_images(pb::ListImagesRequest {}).await })
            .await?
            .images;
        match images.iter().find(|i| i.name == image) {
            None => bail!("unknown image {image:?}"),
            Some(i) if i.deleted => bail!("image {image:?} was deleted"),
            Some(_) => {}
        }
        let machines = ctx
            .cluster
            .call(|c| async move { admin(c).list_machines(pb::ListMachinesRequest {}).await })
            .await?
            .machines;
        let by_name: BTreeMap<&str, &pb::Machine> =
            machines.iter().map(|m| (m.hostname.as_str(), m)).collect();
        let chosen: Vec<&pb::Machine> = if self.all {
            machines.iter().collect()
        } else if let Some(selector) = &self.selector {
            let (key, value) = selector
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--selector {selector:?} is not KEY=VALUE"))?;
            machines
                .iter()
                .filter(|m| m.tags.get(key).map(String::as_str) == Some(value))
                .collect()
        } else {
            let mut chosen = Vec::new();
            for host in &self.hosts {
                let host = names::canonical_hostname(host)?;
                chosen.push(
                    *by_name
                        .get(host.as_str())
                        .ok_or_else(|| anyhow::anyhow!("unknown machine {host:?}"))?,
                );
            }
            chosen
        };
        if chosen.is_empty() && !self.allow_empty {
            bail!("no machine matches (use --allow-empty to accept that)");
        }
        let current = |m: &pb::Machine| {
            let slot = if required {
                &m.required_image
            } else {
                &m.planned_image
            };
            Some(slot.clone()).filter(|s| !s.is_empty())
        };
        let changes: Vec<Planned> = chosen
            .iter()
            .filter(|m| current(m).as_deref() != Some(image.as_str()))
            .map(|m| Planned {
                hostname: m.hostname.clone(),
                from: current(m),
                to: image.clone(),
            })
            .collect();
        if self.dry_run {
            return dry_run(ctx, &images, changes).await;
        }
        if changes.is_empty() {
            println!("nothing to change: every machine named already has {image}");
            return Ok(());
        }
        let hostnames: Vec<String> = changes.iter().map(|c| c.hostname.clone()).collect();
        let count = hostnames.len();
        let change = if required {
            Change::RequiredImageSet {
                hostnames,
                image: Some(image.clone()),
            }
        } else {
            Change::PlannedImageSet {
                hostnames,
                image: Some(image.clone()),
            }
        };
        let role = if required { "required" } else { "planned" };
        commit(
            ctx,
            change,
            &format!("{image} is now the {role} image of {count} machine(s)"),
        )
        .await
    }
}

async fn dry_run(
    ctx: &mut Context,
    images: &[pb::Image],
    changes: Vec<Planned>,
) -> anyhow::Result<()> {
    let mut pairs: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
    for change in &changes {
        *pairs
            .entry((change.from.clone(), change.to.clone()))
            .or_default() += 1;
    }
    let mut counted = Vec::new();
    for ((from, to), machines) in pairs {
        let find = |name: &str| images.iter().find(|i| i.name == name);
        let to_manifest = crate::image::manifest_of(
            ctx,
            find(&to).ok_or_else(|| anyhow::anyhow!("unknown image {to:?}"))?,
        )
        .await?;
        let files_changed = match from.as_deref().and_then(find) {
            Some(image) => diff(&crate::image::manifest_of(ctx, image).await?, &to_manifest).len(),
            None => to_manifest.entries().len(),
        };
        counted.push(Pair {
            from,
            to,
            machines,
            files_changed,
        });
    }
    let report = DryRun {
        changes,
        pairs: counted,
    };
    match ctx.output {
        output::Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        output::Format::Table => {
            let rows = report
                .changes
                .iter()
                .map(|c| {
                    vec![
                        c.hostname.clone(),
                        c.from.clone().unwrap_or_else(|| "-".into()),
                        c.to.clone(),
                    ]
                })
                .collect();
            output::print(
                output::Format::Table,
                &report,
                &["HOSTNAME", "FROM", "TO"],
                rows,
            )?;
            for p in &report.pairs {
                println!(
                    "{} -> {}: {} machine(s), {} path(s) change",
                    p.from.as_deref().unwrap_or("(none)"),
                    p.to,
                    p.machines,
                    p.files_changed
                );
            }
            println!("dry run: nothing was changed");
        }
    }
    Ok(())
}
