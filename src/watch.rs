//! Watching the configuration paths for changes (notify), debounced into reload requests.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Changes closer together than this make one reload (editors write files in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Keeps the watch alive; reload requests arrive on `changes`.
pub struct ConfigWatch {
    watcher: notify::RecommendedWatcher,
    changes: mpsc::Receiver<()>,
    /// The directories given, each with the inode it was watched at.
    dirs: Vec<(PathBuf, Option<u64>)>,
}

impl ConfigWatch {
    /// Watches every path: directories recursively, and for a file or a directory, its parent
    /// too: editors and Kubernetes ConfigMaps replace files rather than write them in place,
    /// and a directory replaced whole (`mv conf.new conf`) must be watched anew. Only events
    /// under the given paths count.
    pub fn new(paths: &[PathBuf]) -> notify::Result<Self> {
        let (tx, changes) = mpsc::channel(1);
        let watched = paths.to_vec();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = event.is_ok_and(|e| {
                !matches!(e.kind, notify::EventKind::Access(_))
                    && e.paths.iter().any(|p| watched.iter().any(|w| p.starts_with(w)))
            });
            if relevant {
                let _ = tx.try_send(()); // one pending request is enough
            }
        })?;
        let mut dirs = Vec::new();
        for path in paths {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            watcher.watch(parent, RecursiveMode::NonRecursive)?;
            if path.is_dir() {
                watcher.watch(path, RecursiveMode::Recursive)?;
                dirs.push((path.clone(), inode(path)));
            }
        }
        Ok(Self { watcher, changes, dirs })
    }

    /// Waits for a change, then for the burst it belongs to to settle.
    pub async fn changed(&mut self) {
        if self.changes.recv().await.is_none() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            if self.changes.try_recv().is_err() {
                break;
            }
        }
        self.follow_replaced_dirs();
    }

    /// A directory given that is now another one (replaced, or deleted and made again) is
    /// watched anew: the old watch went with the old directory.
    fn follow_replaced_dirs(&mut self) {
        for (dir, watched_inode) in &mut self.dirs {
            let now = inode(dir);
            if now == *watched_inode {
                continue;
            }
            let _ = self.watcher.unwatch(dir);
            if now.is_some() {
                if let Err(error) = self.watcher.watch(dir, RecursiveMode::Recursive) {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch the replaced configuration directory; SIGHUP reloads it");
                }
            }
            *watched_inode = now;
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}
