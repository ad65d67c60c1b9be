//! Watching the configuration paths for changes (notify), debounced into reload requests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Changes closer together than this make one reload (editors write files in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Keeps the watch alive; reload requests arrive on `changes`.
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::Receiver<()>,
}

impl ConfigWatch {
    /// Watches every path: directories recursively; for a file, its directory, because editors
    /// and Kubernetes ConfigMaps replace files rather than write them in place.
    pub fn new(paths: &[PathBuf]) -> notify::Result<Self> {
        let (tx, changes) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
            if relevant {
                let _ = tx.try_send(()); // one pending request is enough
            }
        })?;
        for path in paths {
            let (target, mode) = if path.is_dir() {
                (path.as_path(), RecursiveMode::Recursive)
            } else {
                (
                    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")),
                    RecursiveMode::NonRecursive,
                )
            };
            watcher.watch(target, mode)?;
        }
        Ok(Self { _watcher: watcher, changes })
    }

    /// Waits for a change, then for the burst it belongs to to settle.
    pub async fn changed(&mut self) {
        if self.changes.recv().await.is_none() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            if self.changes.try_recv().is_err() {
                return;
            }
        }
    }
}
