//! VIP allocation for MeshExternalServices.
//!
//! Addresses come in order from the start of the range and are never handed to another service
//! while the process lives. The allocator is plain state: [`crate::vip_store`] keeps it in a
//! state directory so that every service keeps its VIP across restarts, and a configuration is
//! compiled against a copy that is kept only when the configuration is accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CIDR: &str = "242.0.0.0/8";
pub const CIDR_ENV: &str = "KUMA_IPAM_MESH_EXTERNAL_SERVICE_CIDR";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{CIDR_ENV}: '{value}' is not a CIDR: {error}")]
    BadCidr { value: String, error: ipnet::AddrParseError },
}

/// What survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IpamState {
    cidr: String,
    /// Offset in the range of the next address to try.
    next: u128,
    /// `mesh/name` → VIP, including services no longer configured (so their VIP is not reused).
    assigned: BTreeMap<String, IpAddr>,
}

#[derive(Debug, Clone)]
pub struct Ipam {
    cidr: IpNet,
    state: IpamState,
    in_use: HashSet<IpAddr>,
    /// Addresses services ask for (`status.vip.ip`), and which: a service that had one of them
    /// before gets another.
    requested: HashMap<IpAddr, String>,
    /// Assignments changed since [`Ipam::mark_saved`].
    dirty: bool,
}

impl Ipam {
    /// The range from `KUMA_IPAM_MESH_EXTERNAL_SERVICE_CIDR`, or Kuma's default `242.0.0.0/8`.
    pub fn cidr_from_env() -> Result<IpNet, IpamError> {
        let value = std::env::var(CIDR_ENV).unwrap_or_else(|_| DEFAULT_CIDR.to_string());
        value.trim().parse().map_err(|error| IpamError::BadCidr { value, error })
    }

    /// An empty allocator for `cidr`.
    pub fn in_memory(cidr: IpNet) -> Self {
        Self {
            cidr: cidr.trunc(),
            state: IpamState { cidr: cidr.trunc().to_string(), ..IpamState::default() },
            in_use: HashSet::new(),
            requested: HashMap::new(),
            dirty: false,
        }
    }

    /// An allocator for `cidr` that keeps the assignments of `saved` that fall in it.
    pub fn restore(cidr: IpNet, saved: IpamState) -> Self {
        let mut ipam = Self::in_memory(cidr);
        let same_range = saved.cidr == ipam.state.cidr;
        for (key, ip) in saved.assigned {
            // After a range change, old addresses are meaningless: services get new ones.
            if ipam.cidr.contains(&ip) {
                ipam.in_use.insert(ip);
                ipam.state.assigned.insert(key, ip);
            }
        }
        if same_range {
            ipam.state.next = saved.next;
        }
        ipam
    }

    /// The state to save, when it changed since the last save.
    pub fn unsaved(&self) -> Option<&IpamState> {
        self.dirty.then_some(&self.state)
    }

    pub fn mark_saved(&mut self) {
        self.dirty = false;
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
        // Kept unless another service now asks for it (a VIP exported from another cluster,
        // allocated from the same range).
        if current.is_some_and(|ip| self.requested.get(&ip).map_or(true, |by| by == key)) {
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

    /// Forgets which services asked for which address: each compile says it again.
    pub fn clear_requests(&mut self) {
        self.requested.clear();
    }

    /// Keeps `ip` for service `key`, which asks for it.
    pub fn reserve(&mut self, key: &str, ip: IpAddr) {
        self.in_use.insert(ip);
        self.requested.insert(ip, key.to_string());
    }

    fn record(&mut self, key: &str, ip: IpAddr) {
        self.in_use.insert(ip);
        self.state.assigned.insert(key.to_string(), ip);
        self.dirty = true;
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

    /// A service whose saved VIP another now asks for gets a new one: both listened on one
    /// address (and on one port, the configuration was refused).
    #[test]
    fn a_saved_vip_another_service_asks_for_is_given_up() {
        let mut ipam = Ipam::in_memory(net("242.0.0.0/8"));
        let first: IpAddr = "242.0.0.1".parse().unwrap();
        assert_eq!(ipam.assign("default/a", None), Some(first));
        ipam.reserve("default/b", first);
        let moved = ipam.assign("default/a", None).unwrap();
        assert_ne!(moved, first);
        assert_eq!(ipam.assign("default/b", Some(first)), Some(first));
        assert_eq!(ipam.assign("default/a", None), Some(moved), "and keeps its new one");
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
        let mut ipam = Ipam::in_memory(net("242.0.0.0/8"));
        ipam.assign("m/a", None);
        ipam.assign("m/b", None);
        // "m/a" is gone from the configuration; a new service must not get its address.
        let mut ipam = Ipam::restore(net("242.0.0.0/8"), ipam.unsaved().unwrap().clone());
        assert_eq!(ipam.assign("m/c", None), Some("242.0.0.3".parse().unwrap()));
        assert_eq!(ipam.assign("m/b", None), Some("242.0.0.2".parse().unwrap()));
    }

    #[test]
    fn range_change_drops_old_assignments() {
        let mut ipam = Ipam::in_memory(net("242.0.0.0/8"));
        ipam.assign("m/a", None);
        let mut ipam = Ipam::restore(net("10.1.0.0/16"), ipam.unsaved().unwrap().clone());
        assert_eq!(ipam.assign("m/a", None), Some("10.1.0.1".parse().unwrap()));
    }
}
