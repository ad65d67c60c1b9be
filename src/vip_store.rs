//! VIP assignments kept in a state directory (`vips.json`), so that services keep their
//! addresses across restarts. The allocator itself is [`crate::catalog::Ipam`].

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::catalog::ipam::IpamState;
use crate::catalog::Ipam;

const STATE_FILE: &str = "vips.json";

#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {message}")]
pub struct VipStoreError {
    path: PathBuf,
    message: String,
}

/// Where an allocator is loaded from and saved to; `None` keeps it in memory only.
#[derive(Debug, Clone, Default)]
pub struct VipStore {
    path: Option<PathBuf>,
}

impl VipStore {
    pub fn new(state_dir: Option<&Path>) -> Self {
        Self { path: state_dir.map(|dir| dir.join(STATE_FILE)) }
    }

    /// The saved allocator for `cidr`, or an empty one when nothing was saved yet.
    pub fn load(&self, cidr: IpNet) -> Result<Ipam, VipStoreError> {
        let Some(path) = &self.path else { return Ok(Ipam::in_memory(cidr)) };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ipam::in_memory(cidr)),
            Err(e) => return Err(self.error(&e)),
        };
        let saved: IpamState = serde_json::from_str(&text).map_err(|e| self.error(&e))?;
        Ok(Ipam::restore(cidr, saved))
    }

    /// Writes the assignments if anything changed since the last save (atomically: temp + rename).
    pub fn save(&self, ipam: &mut Ipam) -> Result<(), VipStoreError> {
        let (Some(path), Some(state)) = (&self.path, ipam.unsaved()) else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.error(&e))?;
        }
        let text = serde_json::to_string_pretty(state).map_err(|e| self.error(&e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| self.error(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| self.error(&e))?;
        ipam.mark_saved();
        Ok(())
    }

    fn error(&self, e: &dyn std::fmt::Display) -> VipStoreError {
        VipStoreError { path: self.path.clone().unwrap_or_default(), message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn assignments_survive_a_restart_including_removed_services() {
        let dir = tempfile::tempdir().unwrap();
        let store = VipStore::new(Some(dir.path()));
        let mut ipam = store.load(net("242.0.0.0/8")).unwrap();
        ipam.assign("m/a", None);
        ipam.assign("m/b", None);
        store.save(&mut ipam).unwrap();
        let mut ipam = store.load(net("242.0.0.0/8")).unwrap();
        assert_eq!(ipam.assign("m/c", None), Some("242.0.0.3".parse().unwrap()));
        assert_eq!(ipam.assign("m/b", None), Some("242.0.0.2".parse().unwrap()));
    }

    #[test]
    fn corrupt_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let err = VipStore::new(Some(dir.path())).load(net("242.0.0.0/8")).unwrap_err().to_string();
        assert!(err.contains("vips.json"), "{err}");
    }
}
