//! `domadm halt`, `domadm resume` and `domadm policy`: the fleet-wide brake and rollout limits,
//! each change an event in the log.

use anyhow::bail;
use clap::{Args, Subcommand};
use dom_proto::v1 as pb;
use dom_storage::event::{Change, PolicyChange};
use serde::Serialize;

use crate::machine::commit;
use crate::output::{self, rfc3339};
use crate::Context;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// The halt and the rollout limits in force.
    #[command(after_help = "Example:\n  domadm policy show -o json")]
    Show,
    /// Change rollout limits (0 removes a limit); unnamed limits stay as they are.
    #[command(
        after_help = "Examples:\n  domadm policy set --max-updating 10% --max-high-impact 1 --reason 'careful week'\n  domadm policy set --fetch-bytes-per-sec 20000000\n  domadm policy set --brake-failure-share 25%"
    )]
    Set(PolicySet),
}

#[derive(Args, Debug)]
pub struct PolicySet {
    /// At most N machines, or P% of the fleet, updating at once.
    #[arg(long, value_name = "N|P%")]
    max_updating: Option<String>,
    /// At most N machines in a HighImpact or DoReboot update at once.
    #[arg(long, value_name = "N")]
    max_high_impact: Option<u64>,
    /// Object download rate per machine.
    #[arg(long, value_name = "N")]
    fetch_bytes_per_sec: Option<u64>,
    /// Halt updates when more than P% of the machines that recently updated to one image failed
    /// their health check (default 10%; 100% turns the brake off).
    #[arg(long, value_name = "P%")]
    brake_failure_share: Option<String>,
}

fn percent(text: &str) -> anyhow::Result<u32> {
    let Some(number) = text.strip_suffix('%') else {
        bail!("{text:?} is not a percentage like 10%");
    };
    let p: u32 = number
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{text:?} is not a percentage like 10%"))?;
    if p > 100 {
        bail!("{text:?}: a percentage is at most 100%");
    }
    Ok(p)
}

#[derive(Serialize)]
struct Policy {
    halted: bool,
    halt_reason: Option<String>,
    halt_actor: Option<String>,
    halted_since: Option<String>,
    /// A number of machines, "P%", or null for no limit.
    max_updating: serde_json::Value,
    max_high_impact: Option<u64>,
    fetch_bytes_per_sec: Option<u64>,
    brake_failure_share: String,
}

fn nonzero(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

impl PolicyCommand {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        match self {
            PolicyCommand::Show => {
                let p = ctx
                    .cluster
                    .call(|c| async move {
                        crate::client::admin(c)
                            .get_policy(pb::GetPolicyRequest {})
                            .await
                    })
                    .await?;
                let policy = Policy {
                    halted: p.halted,
                    halt_reason: p.halted.then(|| p.halt_reason.clone()),
                    halt_actor: p.halted.then(|| p.halt_actor.clone()),
                    halted_since: p.halted.then(|| rfc3339(p.halt_since_unix_ms)),
                    max_updating: match (p.max_updating, p.max_updating_percent) {
                        (0, 0) => serde_json::Value::Null,
                        (0, pc) => format!("{pc}%").into(),
                        (n, _) => n.into(),
                    },
                    max_high_impact: nonzero(p.max_high_impact),
                    fetch_bytes_per_sec: nonzero(p.fetch_bytes_per_sec),
                    brake_failure_share: format!("{}%", p.brake_failure_percent),
                };
                let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                let rows = vec![
                    vec![
                        "halted".into(),
                        if policy.halted {
                            format!(
                                "yes, since {} by {}: {}",
                                show(policy.halted_since.clone()),
                                show(policy.halt_actor.clone()),
                                show(policy.halt_reason.clone())
                            )
                        } else {
                            "no".into()
                        },
                    ],
                    vec![
                        "max updating".into(),
                        match &policy.max_updating {
                            serde_json::Value::Null => "no limit".into(),
                            serde_json::Value::String(s) => s.clone(),
                            v => v.to_string(),
                        },
                    ],
                    vec![
                        "max high impact".into(),
                        policy
                            .max_high_impact
                            .map_or("no limit".into(), |n| n.to_string()),
                    ],
                    vec![
                        "fetch bytes/s per machine".into(),
                        policy
                            .fetch_bytes_per_sec
                            .map_or("agent default".into(), |n| n.to_string()),
                    ],
                    vec![
                        "brake failure share".into(),
                        policy.brake_failure_share.clone(),
                    ],
                ];
                output::print(ctx.output, &policy, &["SETTING", "VALUE"], rows)
            }
            PolicyCommand::Set(set) => {
                let mut change = PolicyChange {
                    max_high_impact: set.max_high_impact,
                    fetch_bytes_per_sec: set.fetch_bytes_per_sec,
                    ..PolicyChange::default()
                };
                if let Some(m) = &set.max_updating {
                    if m.ends_with('%') {
                        change.max_updating_percent = Some(percent(m)?);
                    } else {
                        change.max_updating = Some(m.parse().map_err(|_| {
                            anyhow::anyhow!("--max-updating {m:?} is not a number or a percentage")
                        })?);
                    }
                }
                if let Some(b) = &set.brake_failure_share {
                    change.brake_failure_percent = Some(percent(b)?);
                }
                if change == PolicyChange::default() {
                    bail!("nothing to set: name at least one limit");
                }
                commit(ctx, Change::PolicySet(change), "policy changed").await
            }
        }
    }
}

/// `domadm halt`: no machine starts an update until `domadm resume`.
pub async fn halt(ctx: &mut Context) -> anyhow::Result<()> {
    if ctx.reason.trim().is_empty() {
        bail!("say why with --reason: it is shown to everyone until updates resume");
    }
    commit(ctx, Change::UpdatesHalted, "updates halted").await
}

pub async fn resume(ctx: &mut Context) -> anyhow::Result<()> {
    commit(ctx, Change::UpdatesResumed, "updates resumed").await
}
