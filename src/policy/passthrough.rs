//! MeshPassthrough, merged and compiled: what the transparent listener does with traffic whose
//! destination is no MeshExternalService.
//!
//! Pure. The policies that select this sidecar are merged as Kuma merges them (most specific
//! `passthroughMode` wins, `appendMatch` lists are appended), then compiled into lookups by
//! destination address (IP, CIDR), by TLS SNI and by HTTP Host. Every match allows, so the only
//! question a lookup answers is whether one does; Kuma's ordering of its Envoy filter chains
//! (exact before wildcard, port before no port) decides nothing here.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::resources::egress::{PassthroughConf, PassthroughMatch, PassthroughMode};

/// The transparent listener's passthrough, as the configuration sets it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Passthrough {
    pub mode: PassthroughMode,
    /// The merged `appendMatch` list (used with `Matched`), duplicates removed.
    pub rules: Vec<PassthroughMatch>,
    /// `mesh/name` of each MeshPassthrough merged, lowest precedence first; empty: no policy,
    /// the default (`All`).
    pub policies: Vec<String>,
    #[serde(skip)]
    addresses: Vec<AddressRule>,
    #[serde(skip)]
    domains: Vec<DomainRule>,
}

impl Default for Passthrough {
    /// No MeshPassthrough: everything passes, as before policies existed.
    fn default() -> Self {
        Self {
            mode: PassthroughMode::All,
            rules: Vec::new(),
            policies: Vec::new(),
            addresses: Vec::new(),
            domains: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct AddressRule {
    net: IpNet,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
struct DomainRule {
    pattern: Pattern,
    port: Option<u16>,
    /// `tls` (matched by SNI); else one of the HTTP protocols (matched by Host).
    tls: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    /// A bare `*`.
    Any,
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name below it, not the name itself.
    Below(String),
}

impl Pattern {
    fn parse(value: &str) -> Self {
        let value = value.trim_end_matches('.').to_ascii_lowercase();
        match value.strip_prefix('*') {
            Some("") => Self::Any,
            Some(rest) => Self::Below(rest.to_string()),
            None => Self::Exact(value),
        }
    }

    /// `name`: lowercase, without a final dot.
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => exact == name,
            Self::Below(suffix) => name.len() > suffix.len() && name.ends_with(suffix.as_str()),
        }
    }
}

/// Why passthrough let a destination through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// `passthroughMode: All`.
    All,
    /// An IP or CIDR match on the original destination.
    Address,
}

impl Passthrough {
    /// Merges the selected policies' confs, lowest precedence first.
    pub fn merge<'a>(confs: impl IntoIterator<Item = (String, &'a PassthroughConf)>) -> Self {
        let mut plan = Self::default();
        let mut mode = None;
        for (policy, conf) in confs {
            mode = conf.passthrough_mode.or(mode);
            for rule in conf.append_match.iter().flatten() {
                if !plan.rules.contains(rule) {
                    plan.rules.push(rule.clone());
                }
            }
            plan.policies.push(policy);
        }
        if plan.policies.is_empty() {
            return plan;
        }
        // Kuma's plugin: a MeshPassthrough without a mode means `Matched`.
        plan.mode = mode.unwrap_or(PassthroughMode::Matched);
        for rule in &plan.rules {
            let port = rule.port.and_then(|p| u16::try_from(p).ok());
            match rule.type_.as_str() {
                "IP" | "CIDR" => {
                    let net = rule
                        .value
                        .parse::<IpNet>()
                        .ok()
                        .or_else(|| rule.value.parse::<std::net::IpAddr>().ok().map(IpNet::from));
                    if let Some(net) = net {
                        plan.addresses.push(AddressRule { net: net.trunc(), port });
                    }
                }
                "Domain" => plan.domains.push(DomainRule {
                    pattern: Pattern::parse(&rule.value),
                    port,
                    tls: rule.protocol == "tls",
                }),
                _ => {}
            }
        }
        plan
    }

    /// Whether `dst` passes on its address alone (any protocol).
    pub fn allows_address(&self, dst: SocketAddr) -> Option<Allowed> {
        match self.mode {
            PassthroughMode::All => Some(Allowed::All),
            PassthroughMode::None => None,
            PassthroughMode::Matched => self
                .addresses
                .iter()
                .any(|r| r.port.map_or(true, |p| p == dst.port()) && r.net.contains(&dst.ip()))
                .then_some(Allowed::Address),
        }
    }

    /// Whether any domain rule could match a connection to `port`: if not, its bytes need not
    /// be read to refuse it.
    pub fn has_domain_rules(&self, port: u16) -> bool {
        self.mode == PassthroughMode::Matched && self.domains.iter().any(|r| r.port.map_or(true, |p| p == port))
    }

    /// Whether an `http`, `http2` or `grpc` Domain rule covers `port`: Kuma has an HTTP filter
    /// chain there only then (a port with only `tls` rules closes plain HTTP, no 503).
    pub fn has_http_rules(&self, port: u16) -> bool {
        self.mode == PassthroughMode::Matched
            && self.domains.iter().any(|r| !r.tls && r.port.map_or(true, |p| p == port))
    }

    /// A TLS connection to `port` that names `sni`.
    pub fn allows_sni(&self, sni: &str, port: u16) -> bool {
        self.allows_domain(sni, port, true)
    }

    /// An HTTP request to `port` for `host` (without its port).
    pub fn allows_host(&self, host: &str, port: u16) -> bool {
        self.allows_domain(host, port, false)
    }

    fn allows_domain(&self, name: &str, port: u16, tls: bool) -> bool {
        if self.mode != PassthroughMode::Matched {
            return self.mode == PassthroughMode::All;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.domains.iter().any(|r| r.tls == tls && r.port.map_or(true, |p| p == port) && r.pattern.matches(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(type_: &str, value: &str, port: Option<u32>, protocol: &str) -> PassthroughMatch {
        PassthroughMatch { type_: type_.into(), value: value.into(), port, protocol: protocol.into() }
    }

    fn plan(mode: Option<PassthroughMode>, rules: Vec<PassthroughMatch>) -> Passthrough {
        let conf = PassthroughConf { passthrough_mode: mode, append_match: Some(rules) };
        Passthrough::merge([("default/p".to_string(), &conf)])
    }

    #[test]
    fn only_http_rules_open_a_port_to_http() {
        let p =
            plan(None, vec![rule("Domain", "a.test", Some(443), "tls"), rule("Domain", "b.test", Some(80), "http")]);
        assert!(p.has_domain_rules(443) && !p.has_http_rules(443), "tls only: plain HTTP is closed");
        assert!(p.has_http_rules(80));
        assert!(!p.has_domain_rules(8080));
    }

    #[test]
    fn no_policy_passes_everything_and_a_policy_without_mode_means_matched() {
        let none = Passthrough::merge([]);
        assert_eq!(none.mode, PassthroughMode::All);
        assert_eq!(none.allows_address("192.0.2.1:5432".parse().unwrap()), Some(Allowed::All));
        let p = plan(None, vec![]);
        assert_eq!(p.mode, PassthroughMode::Matched);
        assert_eq!(p.allows_address("192.0.2.1:5432".parse().unwrap()), None);
    }

    #[test]
    fn addresses_match_by_ip_cidr_and_port() {
        let p = plan(
            Some(PassthroughMode::Matched),
            vec![
                rule("IP", "192.0.2.10", Some(5432), "tcp"),
                rule("CIDR", "198.51.100.0/24", None, "tcp"),
                rule("CIDR", "2001:db8::/32", Some(443), "tls"),
            ],
        );
        let ok = |a: &str| p.allows_address(a.parse().unwrap()).is_some();
        assert!(ok("192.0.2.10:5432"));
        assert!(!ok("192.0.2.10:5433"), "the port is part of the rule");
        assert!(!ok("192.0.2.11:5432"));
        assert!(ok("198.51.100.77:1"), "no port: all ports");
        assert!(ok("[2001:db8::5]:443"));
        assert!(!ok("[2001:db9::5]:443"));
    }

    #[test]
    fn domains_exact_wildcard_and_protocol() {
        let p = plan(
            None,
            vec![
                rule("Domain", "API.example.com", Some(443), "tls"),
                rule("Domain", "*.wild.test", Some(443), "tls"),
                rule("Domain", "web.test", None, "http"),
                rule("Domain", "*.h.test", Some(8080), "http2"),
            ],
        );
        assert!(p.allows_sni("api.example.com", 443));
        assert!(p.allows_sni("api.example.com.", 443));
        assert!(!p.allows_sni("api.example.com", 8443));
        assert!(!p.allows_host("api.example.com", 443), "a tls rule is not an HTTP rule");
        assert!(p.allows_sni("a.wild.test", 443) && p.allows_sni("a.b.wild.test", 443));
        assert!(!p.allows_sni("wild.test", 443), "*.x does not match x");
        assert!(!p.allows_sni("evilwild.test", 443));
        assert!(p.allows_host("WEB.test", 80) && p.allows_host("web.test", 9999));
        assert!(p.allows_host("x.h.test", 8080) && !p.allows_host("x.h.test", 8081));
        assert!(p.has_domain_rules(443) && p.has_domain_rules(1), "web.test has no port");
    }

    #[test]
    fn merging_replaces_the_mode_and_appends_matches() {
        let a = PassthroughConf {
            passthrough_mode: Some(PassthroughMode::None),
            append_match: Some(vec![rule("IP", "192.0.2.1", None, "tcp")]),
        };
        let b = PassthroughConf {
            passthrough_mode: Some(PassthroughMode::Matched),
            append_match: Some(vec![rule("IP", "192.0.2.2", None, "tcp"), rule("IP", "192.0.2.1", None, "tcp")]),
        };
        let p = Passthrough::merge([("default/a".to_string(), &a), ("default/b".to_string(), &b)]);
        assert_eq!(p.mode, PassthroughMode::Matched);
        assert_eq!(p.rules.len(), 2, "the duplicate is kept once: {:?}", p.rules);
        assert!(p.allows_address("192.0.2.1:1".parse().unwrap()).is_some());
        assert!(p.allows_address("192.0.2.2:1".parse().unwrap()).is_some());
        let none = PassthroughConf { passthrough_mode: Some(PassthroughMode::None), append_match: None };
        let p = Passthrough::merge([("default/b".to_string(), &b), ("default/n".to_string(), &none)]);
        assert_eq!(p.mode, PassthroughMode::None);
        assert!(p.allows_address("192.0.2.1:1".parse().unwrap()).is_none() && !p.allows_host("x", 80));
    }
}
