//! Watching the configuration paths for changes (notify), debounced into reload requests.

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
    /// The directories given (absolute), watched anew after each burst of changes.
    dirs: Vec<PathBuf>,
}

impl ConfigWatch {
    /// Watches every path: a directory recursively, and its parent, so that one replaced whole
    /// (`mv conf.new conf`, deleted and made again) is seen; for a file, its directory, because
    /// editors and `sed -i` replace files rather than write them in place, and a Kubernetes
    /// ConfigMap's update swaps only `..data` beside the file. An event counts when it is under
    /// a directory given, or for a file when it is the file itself or a `..` entry beside it
    /// (an access log written next to the file must not reload; notify reports absolute paths),
    /// or when the kernel's queue overflowed and events were lost.
    pub fn new(paths: &[PathBuf]) -> notify::Result<Self> {
        let cwd = std::env::current_dir().map_err(notify::Error::io)?;
        let absolute: Vec<PathBuf> = paths.iter().map(|p| cwd.join(p)).collect();
        let scopes: Vec<Scope> =
            absolute.iter().map(|p| if p.is_dir() { Scope::Dir(p.clone()) } else { Scope::File(p.clone()) }).collect();
        let (tx, changes) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = match event {
                Ok(e) => {
                    e.need_rescan()
                        || (!matches!(e.kind, notify::EventKind::Access(_))
                            && e.paths.iter().any(|p| scopes.iter().any(|s| s.covers(p))))
                }
                Err(error) => {
                    tracing::warn!(%error, "watching the configuration failed; SIGHUP reloads it");
                    false
                }
            };
            if relevant {
                let _ = tx.try_send(()); // one pending request is enough
            }
        })?;
        let mut dirs = Vec::new();
        for path in absolute {
            if path.is_dir() {
                watcher.watch(&path, RecursiveMode::Recursive)?;
                if let Err(error) = watcher.watch(parent(&path), RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %path.display(), %error, "cannot watch the directory's parent: a replaced directory is seen at the next SIGHUP");
                }
                dirs.push(path);
            } else {
                watcher.watch(parent(&path), RecursiveMode::NonRecursive)?;
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
        self.watch_dirs_anew();
    }

    /// The directories given are watched anew: one replaced, or deleted and made again (often
    /// with the same inode), lost its watch with the old one. Adding a watch again is harmless.
    /// After each burst of changes, and on SIGHUP.
    pub fn watch_dirs_anew(&mut self) {
        for dir in &self.dirs {
            let _ = self.watcher.unwatch(dir);
            if !dir.is_dir() {
                continue;
            }
            if let Err(error) = self.watcher.watch(dir, RecursiveMode::Recursive) {
                tracing::warn!(dir = %dir.display(), %error, "cannot watch the configuration directory; SIGHUP reloads it");
            }
        }
    }
}

/// What a path given covers.
enum Scope {
    Dir(PathBuf),
    File(PathBuf),
}

impl Scope {
    fn covers(&self, event: &Path) -> bool {
        match self {
            Self::Dir(dir) => event.starts_with(dir),
            Self::File(file) => {
                event == file
                    || (event.parent() == file.parent()
                        && event.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"..")))
            }
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"))
}
