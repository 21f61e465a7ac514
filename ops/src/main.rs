//! domadm: the operators' command line for a dom cluster.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod assign;
mod audit;
mod client;
mod cluster;
mod demo;
mod image;
mod ingest;
mod machine;
mod output;
mod policy;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use client::Cluster;
use output::Format;

#[derive(Parser, Debug)]
#[command(
    name = "domadm",
    version,
    about = "Operate a dom cluster: machines, images, the fleet log"
)]
pub struct Cli {
    /// Controller replicas to try, comma-separated; leader hints are followed.
    #[arg(
        long,
        env = "DOM_ENDPOINTS",
        default_value = "127.0.0.1:6970",
        global = true,
        value_name = "HOST:PORT,..."
    )]
    endpoints: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    output: Format,
    /// Who is making the change, recorded in the log (default: $USER).
    #[arg(long, global = true)]
    pub actor: Option<String>,
    /// Why the change is made, recorded in the log.
    #[arg(long, global = true, default_value = "")]
    reason: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The controller replicas and their Raft state.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Machines in the fleet and their assignments.
    #[command(subcommand)]
    Machine(machine::MachineCommand),
    /// Images known to the cluster.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Set the required or planned image of machines, atomically.
    Assign(assign::Assign),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  domadm completions bash > /etc/bash_completion.d/domadm")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The audit log: history, point-in-time replay, chain verification, export.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Each machine as its agent reports it: required and active image, state, deviations,
    /// last update, drift.
    Status(status::Status),
    /// Stop every machine from starting an update (fetches for planned images go on).
    #[command(after_help = "Example:\n  domadm halt --reason 'web/2026.11.15 breaks logins'")]
    Halt,
    /// Let updates start again after a halt.
    Resume,
    /// Rollout limits and the automatic brake.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Start a local fleet on loopback (three replicas, N machines) and show it converging.
    Demo(demo::Demo),
}

/// What every command gets: the cluster connection and the global flags.
pub struct Context {
    pub cluster: Cluster,
    pub output: Format,
    pub actor: Option<String>,
    pub reason: String,
}

impl Context {
    pub fn actor(&self) -> anyhow::Result<String> {
        self.actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .or_else(|| std::env::var("LOGNAME").ok())
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("no actor: pass --actor NAME or set $USER or $LOGNAME"))
    }
}

impl Cli {
    async fn run(self) -> anyhow::Result<()> {
        let Cli {
            endpoints,
            output,
            actor,
            reason,
            command,
        } = self;
        let context = || -> anyhow::Result<Context> {
            let cluster = Cluster::new(&endpoints).map_err(anyhow::Error::msg)?;
            Ok(Context {
                cluster,
                output,
                actor: actor.clone(),
                reason: reason.clone(),
            })
        };
        match command {
            Command::Cluster(cmd) => cmd.run(&mut context()?).await,
            Command::Machine(cmd) => cmd.run(&mut context()?).await,
            Command::Image(cmd) => cmd.run(&mut context()?).await,
            Command::Audit(cmd) => cmd.run(&mut context()?).await,
            Command::Assign(cmd) => cmd.run(&mut context()?).await,
            Command::Status(cmd) => cmd.run(&mut context()?).await,
            Command::Halt => policy::halt(&mut context()?).await,
            Command::Resume => policy::resume(&mut context()?).await,
            Command::Policy(cmd) => cmd.run(&mut context()?).await,
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut <Cli as clap::CommandFactory>::command(),
                    "domadm",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
            Command::Demo(demo) => demo.run(actor).await,
        }
    }
}

fn main() -> ExitCode {
    let _log = dom_proto::logging::init("warn");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("domadm: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domadm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
