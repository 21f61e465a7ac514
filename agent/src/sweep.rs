//! The scanner's two workers: continuous checksum sweeps, and metadata passes in between.
//!
//! A sweep reads and hashes every file at the paced rate, at idle priority; on a large machine
//! it takes a long time, so a second worker runs a cheap metadata pass every few seconds (a
//! file keeps its hash while its inode, size, mtime and ctime are unchanged; only changed
//! files are read, unpaced) and ordinary changes are seen within seconds. When a sweep ends, a metadata pass over its result brings
//! it up to date and it replaces the current tree: that is how a change no timestamp shows
//! (a media error, a direct block write) is found. Each published tree carries a sequence
//! number; a metadata pass that started from an older tree than the current one is dropped,
//! so a slow pass never undoes a sweep's findings.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dom_storage::image::Filter;
use tokio::sync::watch;

use crate::scan::{lower_priority, scan, ScanConfig, Tree};

/// The current tree as the agent sees it.
#[derive(Clone)]
pub struct Snapshot {
    pub seq: u64,
    pub tree: Arc<Tree>,
    /// A full checksum sweep has finished since the agent started.
    pub swept: bool,
}

/// Least time between the end of one sweep and the start of the next, so an unpaced agent
/// (tests, benchmarks) does not spin.
const SWEEP_PAUSE: Duration = Duration::from_secs(1);

pub struct Scanner {
    config: Mutex<ScanConfig>,
    /// Hashing threads at idle CPU and I/O priority, for unpaced passes.
    idle: rayon::ThreadPool,
    current: watch::Sender<Option<Snapshot>>,
    poke: (Mutex<bool>, Condvar),
    interval: Duration,
}

impl Scanner {
    /// Starts both workers; the receiver sees each new tree (None until the first pass ends).
    pub fn start(
        config: ScanConfig,
        interval: Duration,
    ) -> (Arc<Scanner>, watch::Receiver<Option<Snapshot>>) {
        let (current, receiver) = watch::channel(None);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let idle = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("scan-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .unwrap_or_else(|e| panic!("cannot start the scanner's threads: {e}"));
        let scanner = Arc::new(Scanner {
            config: Mutex::new(config),
            idle,
            current,
            poke: (Mutex::new(false), Condvar::new()),
            interval,
        });
        let s = scanner.clone();
        std::thread::Builder::new()
            .name("metadata-pass".into())
            .spawn(move || s.metadata_worker())
            .unwrap_or_else(|e| panic!("cannot start the scanner thread: {e}"));
        let s = scanner.clone();
        std::thread::Builder::new()
            .name("sweep".into())
            .spawn(move || s.sweep_worker())
            .unwrap_or_else(|e| panic!("cannot start the sweep thread: {e}"));
        (scanner, receiver)
    }

    /// Changes what is left alone (a new base image brings its filter), and rescans.
    pub fn set_excluded(&self, excluded: Filter) {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .excluded = excluded;
        self.rescan_now();
    }

    /// Runs a metadata pass now (after an update, say) rather than at the next interval.
    pub fn rescan_now(&self) {
        let (lock, wake) = &self.poke;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
    }

    fn config(&self) -> ScanConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.current.borrow().clone()
    }

    /// Publishes `tree` if nothing newer than `from_seq` was published meanwhile.
    fn publish(&self, from_seq: u64, tree: Tree, swept: bool) {
        self.current.send_if_modified(|current| {
            let (seq, was_swept, same) = match current {
                Some(c) => (
                    c.seq,
                    c.swept,
                    c.tree.root_hash() == tree.root_hash()
                        && c.tree.mount_points() == tree.mount_points(),
                ),
                None => (0, false, false),
            };
            if seq != from_seq {
                return false;
            }
            if same && was_swept >= swept {
                return false;
            }
            *current = Some(Snapshot {
                seq: seq + 1,
                tree: Arc::new(tree),
                swept: swept || was_swept,
            });
            true
        });
    }

    fn metadata_worker(&self) {
        lower_priority();
        loop {
            let current = self.snapshot();
            let from_seq = current.as_ref().map_or(0, |c| c.seq);
            // Metadata passes are not paced. The first reads everything once, at idle CPU and
            // I/O priority, so it takes only what the machine leaves unused (paced at 2%, a
            // large root would keep the machine undescribed for most of an hour after every
            // agent restart). Later passes read only files whose metadata changed, which the
            // machine just wrote; pacing them would delay seeing a change by its size.
            let config = ScanConfig {
                bytes_per_sec: None,
                ..self.config()
            };
            let previous = current.as_ref().map(|c| c.tree.as_ref());
            match self.idle.install(|| scan(&config, previous, false)) {
                Ok(tree) => self.publish(from_seq, tree, false),
                Err(e) => tracing::warn!("metadata pass failed: {e}"),
            }
            let (lock, wake) = &self.poke;
            let mut poked = lock.lock().unwrap_or_else(|p| p.into_inner());
            if !*poked {
                poked = wake
                    .wait_timeout(poked, self.interval)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *poked = false;
        }
    }

    fn sweep_worker(&self) {
        lower_priority();
        loop {
            std::thread::sleep(SWEEP_PAUSE);
            let Some(start) = self.snapshot() else {
                continue;
            };
            let config = self.config();
            let swept = match scan(&config, Some(&start.tree), true) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("checksum sweep failed: {e}");
                    continue;
                }
            };
            // Bring the sweep up to date with what changed while it ran, then let it replace
            // whatever the metadata worker published meanwhile.
            let Some(now) = self.snapshot() else { continue };
            match scan(&config, Some(&swept), false) {
                Ok(tree) => {
                    if tree.root_hash() != now.tree.root_hash() {
                        tracing::debug!("the sweep's tree differs from the last metadata pass");
                    }
                    self.force_publish(tree, true);
                }
                Err(e) => tracing::warn!("metadata pass after a sweep failed: {e}"),
            }
        }
    }

    /// Runs a metadata pass in the calling thread and makes its tree current: it started
    /// after whatever the caller just did, so it wins over any pass still running. It is not
    /// paced: it re-reads what an update just wrote (and read), which is the update's cost,
    /// not background scanning's, and the leader waits on it.
    pub fn pass_now(&self) -> Option<Snapshot> {
        let current = self.snapshot();
        let config = ScanConfig {
            bytes_per_sec: None,
            ..self.config()
        };
        match scan(&config, current.as_ref().map(|c| c.tree.as_ref()), false) {
            Ok(tree) => self.force_publish(tree, false),
            Err(e) => tracing::warn!("metadata pass failed: {e}"),
        }
        self.snapshot()
    }

    fn force_publish(&self, tree: Tree, swept: bool) {
        let seq = self.current.borrow().as_ref().map_or(0, |c| c.seq);
        self.publish(seq, tree, swept);
    }
}
