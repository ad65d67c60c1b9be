//! VIP allocation for MeshExternalServices.
//!
//! Addresses come in order from the start of the range and are never handed to another service
//! while the process lives. With a state directory the assignments survive restarts, so every
//! service keeps its VIP whatever else is added or removed.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CIDR: &str = "242.0.0.0/8";
pub const CIDR_ENV: &str = "KUMA_IPAM_MESH_EXTERNAL_SERVICE_CIDR";
const STATE_FILE: &str = "vips.json";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{CIDR_ENV}: '{value}' is not a CIDR: {error}")]
    BadCidr { value: String, error: ipnet::AddrParseError },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    cidr: String,
    /// Offset in the range of the next address to try.
    next: u128,
    /// `mesh/name` → VIP, including services no longer configured (so their VIP is not reused).
    assigned: BTreeMap<String, IpAddr>,
}

#[derive(Debug)]
pub struct Ipam {
    cidr: IpNet,
    state_file: Option<PathBuf>,
    state: State,
    in_use: HashSet<IpAddr>,
    dirty: bool,
}

impl Ipam {
    /// The range from `KUMA_IPAM_MESH_EXTERNAL_SERVICE_CIDR`, or Kuma's default `242.0.0.0/8`.
    pub fn cidr_from_env() -> Result<IpNet, IpamError> {
        let value = std::env::var(CIDR_ENV).unwrap_or_else(|_| DEFAULT_CIDR.to_string());
        value.trim().parse().map_err(|error| IpamError::BadCidr { value, error })
    }

    /// An allocator that keeps its assignments in memory only.
    pub fn in_memory(cidr: IpNet) -> Self {
        Self {
            cidr: cidr.trunc(),
            state_file: None,
            state: State { cidr: cidr.trunc().to_string(), ..State::default() },
            in_use: HashSet::new(),
            dirty: false,
        }
    }

    /// An allocator backed by `dir/vips.json`, created on first save.
    pub fn with_state_dir(cidr: IpNet, dir: &Path) -> Result<Self, IpamError> {
        let path = dir.join(STATE_FILE);
        let mut ipam = Self::in_memory(cidr);
        ipam.state_file = Some(path.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ipam),
            Err(e) => return Err(IpamError::State { path, message: e.to_string() }),
        };
        let state: State =
            serde_json::from_str(&text).map_err(|e| IpamError::State { path: path.clone(), message: e.to_string() })?;
        let same_range = state.cidr == ipam.state.cidr;
        for (key, ip) in state.assigned {
            // After a range change, old addresses are meaningless: services get new ones.
            if ipam.cidr.contains(&ip) {
                ipam.in_use.insert(ip);
                ipam.state.assigned.insert(key, ip);
            }
        }
        if same_range {
            ipam.state.next = state.next;
        }
        Ok(ipam)
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// The VIP of service `key` (`mesh/name`): `requested` (from `status.vip.ip`) if given, else
    /// the one it had, else the next free one. `None` when the range is exhausted.
    pub fn assign(&mut self, key: &str, requested: Option<IpAddr>) -> Option<IpAddr> {
        let current = self.state.assigned.get(key).copied();
        if let Some(ip) = requested {
            if current != Some(ip) {
                self.record(key, ip);
            }
            return Some(ip);
        }
        if current.is_some() {
            return current;
        }
        let (first, last) = self.host_offsets();
        let start = self.state.next.max(first);
        for offset in start..=last {
            let ip = self.address_at(offset);
            if !self.in_use.contains(&ip) {
                self.state.next = offset + 1;
                self.record(key, ip);
                return Some(ip);
            }
        }
        None
    }

    fn record(&mut self, key: &str, ip: IpAddr) {
        self.in_use.insert(ip);
        self.state.assigned.insert(key.to_string(), ip);
        self.dirty = true;
    }

    /// Writes the assignments if anything changed since the last save (atomically: temp + rename).
    pub fn save(&mut self) -> Result<(), IpamError> {
        let Some(path) = &self.state_file else { return Ok(()) };
        if !self.dirty {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| IpamError::State { path: path.clone(), message: e.to_string() };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let text = serde_json::to_string_pretty(&self.state).map_err(|e| err(&e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| err(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| err(&e))?;
        self.dirty = false;
        Ok(())
    }

    /// First and last usable offsets: IPv4 skips the network and broadcast addresses, IPv6 the
    /// subnet-router anycast address, except on the tiny prefixes where those do not exist.
    fn host_offsets(&self) -> (u128, u128) {
        let host_bits = u32::from(self.cidr.max_prefix_len() - self.cidr.prefix_len());
        let last = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
        match self.cidr {
            IpNet::V4(_) if host_bits >= 2 => (1, last - 1),
            IpNet::V6(_) if host_bits >= 2 => (1, last),
            _ => (0, last),
        }
    }

    fn address_at(&self, offset: u128) -> IpAddr {
        match self.cidr {
            IpNet::V4(net) => IpAddr::V4((u32::from(net.network()) + offset as u32).into()),
            IpNet::V6(net) => IpAddr::V6((u128::from(net.network()) + offset).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn sequential_from_start_of_range() {
        let mut ipam = Ipam::in_memory(net("242.0.0.0/8"));
        assert_eq!(ipam.assign("default/a", None), Some("242.0.0.1".parse().unwrap()));
        assert_eq!(ipam.assign("default/b", None), Some("242.0.0.2".parse().unwrap()));
        assert_eq!(ipam.assign("default/a", None), Some("242.0.0.1".parse().unwrap()));
    }

    #[test]
    fn requested_vip_is_kept_and_skipped_by_others() {
        let mut ipam = Ipam::in_memory(net("242.0.0.0/8"));
        assert_eq!(ipam.assign("default/a", Some("242.0.0.1".parse().unwrap())), Some("242.0.0.1".parse().unwrap()));
        assert_eq!(ipam.assign("default/b", None), Some("242.0.0.2".parse().unwrap()));
    }

    #[test]
    fn exhaustion_and_tiny_ranges() {
        let mut ipam = Ipam::in_memory(net("10.0.0.0/30"));
        assert_eq!(ipam.assign("m/a", None), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(ipam.assign("m/b", None), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(ipam.assign("m/c", None), None);
        let mut single = Ipam::in_memory(net("10.0.0.7/32"));
        assert_eq!(single.assign("m/a", None), Some("10.0.0.7".parse().unwrap()));
        let mut v6 = Ipam::in_memory(net("fd00::/120"));
        assert_eq!(v6.assign("m/a", None), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn never_reuses_addresses_of_removed_services() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::with_state_dir(net("242.0.0.0/8"), dir.path()).unwrap();
        ipam.assign("m/a", None);
        ipam.assign("m/b", None);
        ipam.save().unwrap();
        // "m/a" is gone from the configuration; a new service must not get its address.
        let mut ipam = Ipam::with_state_dir(net("242.0.0.0/8"), dir.path()).unwrap();
        assert_eq!(ipam.assign("m/c", None), Some("242.0.0.3".parse().unwrap()));
        assert_eq!(ipam.assign("m/b", None), Some("242.0.0.2".parse().unwrap()));
    }

    #[test]
    fn range_change_drops_old_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::with_state_dir(net("242.0.0.0/8"), dir.path()).unwrap();
        ipam.assign("m/a", None);
        ipam.save().unwrap();
        let mut ipam = Ipam::with_state_dir(net("10.1.0.0/16"), dir.path()).unwrap();
        assert_eq!(ipam.assign("m/a", None), Some("10.1.0.1".parse().unwrap()));
    }

    #[test]
    fn corrupt_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let err = Ipam::with_state_dir(net("242.0.0.0/8"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("vips.json"), "{err}");
    }
}
