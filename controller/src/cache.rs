//! Small shared caches of values that are costly to make: decoded manifests, image-to-image
//! transitions, encoded plans.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A small map of values that are costly to make, which forgets an arbitrary entry when full
/// (manifests, transitions and plans are cheap to rebuild and few are live at once). Askers
/// for the same key wait for one maker rather than each making it: at a fleet-wide
/// assignment, thousands of sessions ask for the same manifest and plan in the same instant.
pub struct Cache<K, V> {
    map: HashMap<K, Arc<tokio::sync::OnceCell<Arc<V>>>>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V> Cache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Cache {
            map: HashMap::new(),
            capacity,
        }
    }

    fn cell(&mut self, key: &K) -> Arc<tokio::sync::OnceCell<Arc<V>>> {
        if let Some(cell) = self.map.get(key) {
            return cell.clone();
        }
        if self.map.len() >= self.capacity {
            if let Some(victim) = self.map.keys().next().cloned() {
                self.map.remove(&victim);
            }
        }
        let cell = Arc::new(tokio::sync::OnceCell::new());
        self.map.insert(key.clone(), cell.clone());
        cell
    }
}

/// The value for `key`, made by `make` unless it is cached or being made; a failure is not
/// cached, so the next asker tries again.
pub async fn cached<K, V, E, F>(cache: &Mutex<Cache<K, V>>, key: &K, make: F) -> Result<Arc<V>, E>
where
    K: std::hash::Hash + Eq + Clone,
    F: std::future::Future<Output = Result<V, E>>,
{
    let cell = cache.lock().unwrap_or_else(|p| p.into_inner()).cell(key);
    cell.get_or_try_init(|| async { make.await.map(Arc::new) })
        .await
        .cloned()
}

/// [`cached`] for values whose making cannot fail.
pub async fn cached_sure<K, V>(
    cache: &Mutex<Cache<K, V>>,
    key: &K,
    make: impl FnOnce() -> V,
) -> Arc<V>
where
    K: std::hash::Hash + Eq + Clone,
{
    let made: Result<_, std::convert::Infallible> = cached(cache, key, async { Ok(make()) }).await;
    let Ok(value) = made;
    value
}
