//! How every dom binary writes its log: to stderr, filtered by `RUST_LOG` (else the binary's
//! default), coloured only on a terminal.
//!
//! Lines are handed to a writer thread rather than written by the task that logs them: a
//! daemon logs a line per machine at a fleet-wide rollout, and a slow reader of stderr (a busy
//! journald, a full pipe) must not stall the runtime that serves agents and Raft. Should the
//! writer fall this far behind, lines are dropped, and tracing-appender says how many.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Lines queued for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 128_000;

/// Sets up the log. Keep the guard for the life of the process: dropping it writes out
/// what is queued.
pub fn init(default_filter: &str) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .init();
    guard
}
