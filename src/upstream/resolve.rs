//! Asynchronous DNS for endpoint names (hickory).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

/// Re-resolution never happens more often than this, whatever the record TTL.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Back-off after a failed lookup starts here and doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("resolving {name}: {message}")]
pub struct ResolveError {
    pub name: String,
    pub message: String,
}

pub struct Resolved {
    pub addresses: Vec<IpAddr>,
    /// When to ask again: the record TTL, at least [`MIN_REFRESH`] from now.
    pub refresh_at: Instant,
}

#[derive(Clone)]
pub struct DnsResolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver")
    }
}

impl DnsResolver {
    /// The system's resolvers, from `/etc/resolv.conf`.
    pub fn system() -> Result<Self, ResolveError> {
        let builder = TokioResolver::builder_tokio()
            .map_err(|e| ResolveError { name: "/etc/resolv.conf".into(), message: e.to_string() })?;
        Ok(Self { inner: builder.build() })
    }

    /// Plain-text DNS over UDP and TCP to `servers` only.
    pub fn with_nameservers(servers: &[SocketAddr]) -> Self {
        let configs: Vec<NameServerConfig> = servers
            .iter()
            .flat_map(|&addr| [NameServerConfig::new(addr, Protocol::Udp), NameServerConfig::new(addr, Protocol::Tcp)])
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), configs);
        let mut opts = ResolverOpts::default();
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let inner =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default()).with_options(opts).build();
        Self { inner }
    }

    pub async fn resolve(&self, name: &str) -> Result<Resolved, ResolveError> {
        // A final dot makes the name absolute: no search domains are tried.
        let fqdn = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
        let err = |message: String| ResolveError { name: name.to_string(), message };
        let lookup = self.inner.lookup_ip(fqdn.as_str()).await.map_err(|e| err(e.to_string()))?;
        let addresses: Vec<IpAddr> = lookup.iter().collect();
        if addresses.is_empty() {
            return Err(err("no addresses".into()));
        }
        let refresh_at = lookup.valid_until().max(Instant::now() + MIN_REFRESH);
        Ok(Resolved { addresses, refresh_at })
    }
}
