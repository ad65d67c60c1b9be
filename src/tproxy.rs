//! iptables rules for transparent proxying, as `kumactl install transparent-proxy` writes them:
//! the application's outbound TCP goes to the transparent listener, its DNS (UDP and TCP 53)
//! to the DNS proxy; the proxy's own traffic (by uid) is left alone so it never loops.
//!
//! Everything lives in chains of our own, reached by jumps from `nat OUTPUT`, so uninstall
//! removes exactly what install added.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

pub const CHAIN: &str = "MESH_EGRESS_OUTPUT";
pub const DEFAULT_REDIRECT_PORT: u16 = 15001;
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Kuma's default uid for the sidecar.
pub const DEFAULT_PROXY_UID: u32 = 5678;

#[derive(Debug, thiserror::Error)]
pub enum TproxyError {
    #[error("changing iptables rules needs root (CAP_NET_ADMIN); run as root or use --dry-run to print the rules")]
    NotRoot,
    #[error("{0} not found: install iptables (Debian: apt-get install iptables)")]
    Missing(&'static str),
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("running {command}: {source}")]
    Io { command: String, source: std::io::Error },
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub redirect_port: u16,
    pub dns_port: u16,
    /// Redirect DNS (UDP and TCP port 53) to the DNS proxy.
    pub redirect_dns: bool,
    pub proxy_uid: u32,
    /// The mark on the proxy's own sockets (`run --socket-mark`): returned like its uid.
    pub proxy_mark: Option<u32>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }
}

/// The jumps from `nat OUTPUT` into our chain.
const JUMPS: [&str; 2] = ["-p tcp", "-p udp --dport 53"];

impl Rules {
    /// The rules in iptables-restore format, for `--noflush` (other chains are untouched).
    pub fn render(&self, family: Family) -> String {
        let mut out = String::from("*nat\n");
        out.push_str(&format!(":{CHAIN} - [0:0]\n"));
        for jump in JUMPS {
            out.push_str(&format!("-A OUTPUT {jump} -j {CHAIN}\n"));
        }
        // The proxy's own connections and DNS forwards go where they were going: no loop.
        out.push_str(&format!("-A {CHAIN} -m owner --uid-owner {} -j RETURN\n", self.proxy_uid));
        if let Some(mark) = self.proxy_mark {
            out.push_str(&format!("-A {CHAIN} -m mark --mark {mark:#x} -j RETURN\n"));
        }
        if self.redirect_dns {
            for proto in ["udp", "tcp"] {
                out.push_str(&format!("-A {CHAIN} -p {proto} --dport 53 -j REDIRECT --to-ports {}\n", self.dns_port));
            }
        }
        out.push_str(&format!("-A {CHAIN} -d {} -j RETURN\n", family.loopback()));
        // This host's own addresses (the pod's IP, another container's port through it) leave by
        // the loopback interface: not redirected, as Kuma's `-o lo ... -j RETURN`.
        out.push_str(&format!("-A {CHAIN} -o lo -j RETURN\n"));
        for port in &self.exclude_ports {
            out.push_str(&format!("-A {CHAIN} -p tcp --dport {port} -j RETURN\n"));
        }
        for cidr in self
            .exclude_cidrs
            .iter()
            .filter(|c| matches!((c, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)))
        {
            out.push_str(&format!("-A {CHAIN} -d {cidr} -j RETURN\n"));
        }
        out.push_str(&format!("-A {CHAIN} -p tcp -j REDIRECT --to-ports {}\n", self.redirect_port));
        out.push_str("COMMIT\n");
        out
    }
}

fn require_root() -> Result<(), TproxyError> {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    });
    if uid.as_deref() == Some("0") {
        Ok(())
    } else {
        Err(TproxyError::NotRoot)
    }
}

fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, TproxyError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => TproxyError::Missing(program),
            _ => TproxyError::Io { command: command.clone(), source },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| TproxyError::Io { command: command.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| TproxyError::Io { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(TproxyError::Failed { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the rules; an earlier install is replaced, so running it twice is harmless.
pub fn install(rules: &Rules, family: Family) -> Result<(), TproxyError> {
    require_root()?;
    uninstall(family)?;
    run(family.restore(), &["--noflush"], Some(&rules.render(family)))?;
    Ok(())
}

/// Removes the jumps and our chain, and nothing else. Succeeds when nothing is installed.
pub fn uninstall(family: Family) -> Result<(), TproxyError> {
    require_root()?;
    let iptables = family.iptables();
    for jump in JUMPS {
        let mut args = vec!["-t", "nat", "-D", "OUTPUT"];
        args.extend(jump.split(' '));
        args.extend(["-j", CHAIN]);
        // Delete every copy (e.g. after an install with an older version).
        while run(iptables, &args, None).is_ok() {}
    }
    if chain_exists(family)? {
        run(iptables, &["-t", "nat", "-F", CHAIN], None)?;
        run(iptables, &["-t", "nat", "-X", CHAIN], None)?;
    }
    Ok(())
}

fn chain_exists(family: Family) -> Result<bool, TproxyError> {
    match run(family.iptables(), &["-t", "nat", "-n", "-L", CHAIN], None) {
        Ok(_) => Ok(true),
        Err(TproxyError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Parses `--exclude-cidrs` entries; a bare IP is a host route.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("'{s}' is not a CIDR or IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            redirect_port: 15001,
            dns_port: 15053,
            redirect_dns: true,
            proxy_uid: 5678,
            proxy_mark: Some(0x4d45),
            exclude_ports: vec![22],
            exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        }
    }

    #[test]
    fn ipv4_rules() {
        assert_eq!(
            rules().render(Family::V4),
            "*nat\n\
             :MESH_EGRESS_OUTPUT - [0:0]\n\
             -A OUTPUT -p tcp -j MESH_EGRESS_OUTPUT\n\
             -A OUTPUT -p udp --dport 53 -j MESH_EGRESS_OUTPUT\n\
             -A MESH_EGRESS_OUTPUT -m owner --uid-owner 5678 -j RETURN\n\
             -A MESH_EGRESS_OUTPUT -m mark --mark 0x4d45 -j RETURN\n\
             -A MESH_EGRESS_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053\n\
             -A MESH_EGRESS_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053\n\
             -A MESH_EGRESS_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
             -A MESH_EGRESS_OUTPUT -o lo -j RETURN\n\
             -A MESH_EGRESS_OUTPUT -p tcp --dport 22 -j RETURN\n\
             -A MESH_EGRESS_OUTPUT -d 10.0.0.0/8 -j RETURN\n\
             -A MESH_EGRESS_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
             COMMIT\n"
        );
    }

    #[test]
    fn ipv6_rules_keep_only_v6_exclusions_and_can_skip_dns() {
        let mut r = rules();
        r.redirect_dns = false;
        let text = r.render(Family::V6);
        assert!(text.contains("-A MESH_EGRESS_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(text.contains("-A MESH_EGRESS_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!text.contains("10.0.0.0/8"));
        assert!(!text.contains("--to-ports 15053"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert!(parse_cidr("nope").unwrap_err().contains("nope"));
    }
}
