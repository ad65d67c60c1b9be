//! `mesh-egress run`: configuration → live snapshot → listeners, plus the admin server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::AccessLog;
use crate::admin::{self, AdminCommand, AdminError, AdminListener, AdminState};
use crate::catalog::{ipam::IpamError, Catalog, CompileOptions, Ipam};
use crate::config;
use crate::dns::{DnsProxy, Forwarders};
use crate::listen::{self, KindCell, ListenerKind, OriginalDst};
use crate::live::{Live, Snapshot};
use crate::proxy::{Proxy, ProxySettings};
use crate::resources::Diagnostics;
use crate::upstream;
use crate::vip_store::{VipStore, VipStoreError};

#[derive(Debug)]
pub struct Options {
    pub config_paths: Vec<PathBuf>,
    /// HTTP: time allowed until the response headers arrive (`None`: no limit).
    pub request_timeout: Option<std::time::Duration>,
    pub state_dir: Option<PathBuf>,
    pub compile: CompileOptions,
    pub admin: Option<SocketAddr>,
    /// The admin on a unix socket (`--admin unix:///path`), off the network.
    pub admin_unix: Option<PathBuf>,
    /// The readiness listener (kuma-dp's `--readiness-port`): `/ready` only.
    pub readiness: Option<SocketAddr>,
    /// The process's command line, for `/server_info`.
    pub command_line: Vec<String>,
    /// Changes the log filter at run time (`POST /logging`).
    pub log_control: Option<Arc<dyn admin::LogControl>>,
    pub admin_timeouts: admin::AdminTimeouts,
    pub dns_limits: crate::dns::DnsLimits,
    pub http_limits: crate::proxy::http::HttpLimits,
    /// DNS proxy address (UDP and TCP).
    pub dns: Option<SocketAddr>,
    /// Where the DNS proxy forwards unknown names; empty: the nameservers of /etc/resolv.conf.
    pub dns_forwarders: Vec<SocketAddr>,
    pub transparent: Option<SocketAddr>,
    pub bind_vips: bool,
    pub timeouts: crate::proxy::ConnectionTimeouts,
    /// HTTP/1 `Upgrade` protocols passed through as tunnels (default: `websocket`).
    pub upgrade_protocols: Vec<String>,
    /// Allow the transparent listener and outbounds on non-loopback addresses.
    pub listen_allow_remote: bool,
    pub passthrough: bool,
    pub access_log: Option<AccessLog>,
    pub upstream: upstream::Settings,
    /// Runtimes that run the data path, one accept loop each per listener; empty: the runtime
    /// `start` runs on.
    pub workers: Vec<tokio::runtime::Handle>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration:\n{0}")]
    InvalidConfig(Diagnostics),
    #[error("the configuration could not be compiled: {0}")]
    Compile(String),
    #[error("{addr} ({kind} listener) is not a loopback address: anyone who reaches it could use the external services; run with --listen-allow-remote to allow it")]
    RemoteListener { addr: SocketAddr, kind: ListenerKind },
    #[error("the new configuration would take working services out of traffic (fix them, or remove them to take them out on purpose):\n{}", .0.join("\n"))]
    WouldBreak(Vec<String>),
    #[error("cannot listen on {addr} ({kind} listener): {error}")]
    Bind { addr: SocketAddr, kind: ListenerKind, error: std::io::Error },
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    VipStore(#[from] VipStoreError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

struct BoundListener {
    kind: Arc<KindCell>,
    local: SocketAddr,
    /// One accept loop per worker runtime.
    tasks: Vec<JoinHandle<()>>,
}

impl BoundListener {
    /// Stops accepting and waits until every accept loop has ended (the sockets are closed).
    async fn stop(self) {
        tracing::info!(listener = %self.local, kind = %self.kind.get(), "listener removed");
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub struct Server {
    options: Options,
    settings: Arc<upstream::Settings>,
    vip_store: VipStore,
    ipam: Ipam,
    live: Arc<Live>,
    proxy: Arc<Proxy>,
    listeners: HashMap<SocketAddr, BoundListener>,
    admin: Option<Arc<AdminState>>,
    admin_addr: Option<SocketAddr>,
    readiness_addr: Option<SocketAddr>,
    admin_commands: Option<tokio::sync::mpsc::UnboundedReceiver<AdminCommand>>,
    dns: Option<(SocketAddr, [JoinHandle<()>; 2])>,
    /// The DNS proxy's tasks on `[::1]` (see [`ipv6_loopback_twin`]).
    dns_v6: Option<(SocketAddr, [JoinHandle<()>; 2])>,
    /// The transparent listener's `[::1]` twin.
    transparent_v6: Option<SocketAddr>,
    draining: watch::Sender<bool>,
    workers: Vec<tokio::runtime::Handle>,
}

impl Server {
    /// Loads the configuration and binds everything; fails on an invalid configuration or a
    /// port that cannot be bound. Must run inside a tokio runtime.
    pub async fn start(mut options: Options, original_dst: Arc<dyn OriginalDst>) -> Result<Self, ServerError> {
        let vip_store = VipStore::new(options.state_dir.as_deref());
        let ipam = vip_store.load(Ipam::cidr_from_env()?)?;
        let settings = Arc::new(std::mem::take(&mut options.upstream));
        let workers = match std::mem::take(&mut options.workers) {
            w if w.is_empty() => vec![tokio::runtime::Handle::current()],
            w => w,
        };
        let live = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let draining = watch::Sender::new(false);
        let (transparent_v6, dns_v6) =
            (ipv6_loopback_twin(options.transparent, false), ipv6_loopback_twin(options.dns, true));
        let proxy = Arc::new(Proxy {
            live: live.clone(),
            settings: ProxySettings {
                passthrough: options.passthrough,
                connect_timeout: settings.connect_timeout,
                request_timeout: options.request_timeout,
                upgrade_protocols: options.upgrade_protocols.iter().cloned().collect(),
                timeouts: options.timeouts,
                http_limits: options.http_limits,
                vip_cidr: Some(ipam.cidr()),
                own_listeners: [
                    options.admin,
                    options.dns,
                    options.transparent,
                    options.readiness,
                    transparent_v6,
                    dns_v6,
                ]
                .into_iter()
                .flatten()
                .collect(),
            },
            original_dst,
            access_log: options.access_log.clone(),
            connections: Arc::default(),
            draining: draining.subscribe(),
            upstream_settings: settings.clone(),
        });
        let mut server = Self {
            options,
            settings,
            vip_store,
            ipam,
            live,
            proxy,
            listeners: HashMap::new(),
            admin: None,
            admin_addr: None,
            readiness_addr: None,
            admin_commands: None,
            dns: None,
            dns_v6: None,
            transparent_v6,
            draining,
            workers,
        };
        server.start_admin()?;
        server.apply_config().await?;
        if let Some(addr) = server.options.dns {
            // A loop through our own port is refused before binding, so the answer does not
            // depend on whether the port happens to be free.
            if addr.port() != 0 {
                Forwarders::new(server.options.dns_forwarders.clone(), addr)?;
            }
            let sockets = DnsProxy::bind(addr).await?;
            let bound = sockets.udp.local_addr().unwrap_or(addr);
            let forwarders = match server.options.dns_forwarders.clone() {
                servers if servers.is_empty() => Forwarders::system(bound),
                servers => Forwarders::new(servers, bound)?,
            };
            let dns = DnsProxy::new(server.live.clone(), forwarders, server.options.dns_limits);
            server.dns = Some((bound, dns.serve(sockets)));
            tracing::info!(dns = %bound, "DNS proxy listening (UDP and TCP)");
            if let Some(twin) = dns_v6 {
                // Best effort, as its probe: a port taken since is said, not fatal.
                match DnsProxy::bind(twin).await {
                    Ok(sockets) => {
                        server.dns_v6 = Some((twin, dns.serve(sockets)));
                        tracing::info!(dns = %twin, "DNS proxy listening (UDP and TCP)");
                    }
                    Err(error) => {
                        tracing::warn!(dns = %twin, %error, "not listening on the IPv6 loopback twin of the DNS proxy: IPv6 queries redirected there find no proxy")
                    }
                }
            }
        }
        server.publish_listeners();
        if let Some(state) = &server.admin {
            state.ready.store(true, Ordering::Release);
        }
        Ok(server)
    }

    /// The admin listeners (TCP or unix, and the readiness port) on their own thread.
    fn start_admin(&mut self) -> Result<(), ServerError> {
        let o = &self.options;
        if o.admin.is_none() && o.admin_unix.is_none() && o.readiness.is_none() {
            return Ok(());
        }
        let (mut state, commands) = AdminState::new(self.live.clone(), o.command_line.clone(), o.log_control.clone());
        state.timeouts = o.admin_timeouts;
        let mut listeners = Vec::new();
        if let Some(addr) = o.admin {
            let (listener, bound) = AdminListener::bind_tcp(addr, false)?;
            listeners.push(listener);
            self.admin_addr = Some(bound);
        }
        if let Some(path) = &o.admin_unix {
            listeners.push(AdminListener::bind_unix(path)?);
        }
        if let Some(addr) = o.readiness {
            let (listener, bound) = AdminListener::bind_tcp(addr, true)?;
            listeners.push(listener);
            self.readiness_addr = Some(bound);
        }
        let state = Arc::new(state);
        admin::spawn(listeners, state.clone())?;
        self.admin = Some(state);
        self.admin_commands = Some(commands);
        Ok(())
    }

    /// What the admin asks of the process (`/drain_listeners`, `/quitquitquit`); taken once,
    /// by the run loop.
    pub fn admin_commands(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<AdminCommand>> {
        self.admin_commands.take()
    }

    /// The bound readiness listener (useful with port 0).
    pub fn readiness_addr(&self) -> Option<SocketAddr> {
        self.readiness_addr
    }

    /// `POST /drain_listeners`: stops accepting; open connections go on. `/ready` answers 503.
    /// DNS goes on being answered until the process exits: the application may still resolve
    /// (Kuma's DNS, in kuma-dp, outlives Envoy's listeners too).
    pub fn drain_listeners(&mut self) {
        self.stop_listening();
        if let Some(state) = &self.admin {
            state.draining.store(true, Ordering::Release);
            state.ready.store(false, Ordering::Release);
        }
        self.publish_listeners();
    }

    /// `kind address` of every listener, for the admin's `/listeners`.
    fn publish_listeners(&self) {
        let Some(state) = &self.admin else { return };
        let mut list: Vec<String> = self.listeners.values().map(|l| format!("{} {}", l.kind.get(), l.local)).collect();
        list.extend(self.dns.iter().chain(&self.dns_v6).map(|(addr, _)| format!("dns {addr}")));
        list.extend(self.admin_addr.map(|addr| format!("admin {addr}")));
        list.extend(self.options.admin_unix.as_ref().map(|p| format!("admin unix://{}", p.display())));
        list.extend(self.readiness_addr.map(|addr| format!("readiness {addr}")));
        list.sort();
        *state.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = list;
    }

    /// Loads the configuration again; an invalid one, or one whose new listeners cannot be
    /// bound, is rejected and the running one stays, whole.
    pub async fn reload(&mut self) -> Result<(), ServerError> {
        let result = self.apply_config().await;
        crate::metrics::metrics().config_reload(result.is_ok());
        self.publish_listeners();
        result
    }

    /// Compile → bind the new listeners → swap the snapshot → retire the old listeners. Nothing
    /// changes until every step that can fail has succeeded.
    async fn apply_config(&mut self) -> Result<(), ServerError> {
        let (paths, options) = (self.options.config_paths.clone(), self.options.compile.clone());
        // Against a copy of the VIP allocator: a rejected configuration assigns no VIPs.
        let mut ipam = self.ipam.clone();
        let previous = self.live.load_full();
        // Parsing and compiling a large configuration takes a while: not on this thread, which
        // also serves DNS.
        let (compiled, tls, ipam, previous) = tokio::task::spawn_blocking(move || {
            let (compiled, tls) = config::load(&paths, &options, &mut ipam, Some(&previous));
            (compiled, tls, ipam, previous)
        })
        .await
        .map_err(|e| ServerError::Compile(e.to_string()))?;
        for warning in compiled.diagnostics.warnings() {
            tracing::warn!("{warning}");
        }
        if compiled.diagnostics.has_errors() {
            return Err(ServerError::InvalidConfig(compiled.diagnostics));
        }
        // A service that works is not broken by a reload (a certificate pasted wrong, a secret
        // gone mid-rotation): the running configuration stays (Envoy keeps that cluster's last
        // version). At start-up, there is nothing to keep: it starts broken.
        let working: std::collections::HashSet<String> =
            previous.catalog.services().iter().filter(|s| s.broken.is_none()).map(|s| s.key()).collect();
        let would_break: Vec<String> = compiled
            .catalog
            .services()
            .iter()
            .filter(|s| working.contains(&s.key()))
            .filter_map(|s| {
                let line = s.origin.line.map(|l| format!(":{l}")).unwrap_or_default();
                Some(format!("{}{line}: {}: {}", s.origin.file.display(), s.key(), s.broken.as_ref()?))
            })
            .collect();
        if !would_break.is_empty() {
            return Err(ServerError::WouldBreak(would_break));
        }
        // Valid, and maybe meant, but more often a directory caught half written or emptied.
        if compiled.catalog.services().is_empty() && !previous.catalog.services().is_empty() {
            tracing::warn!(
                services = previous.catalog.services().len(),
                "the new configuration has no MeshExternalService: every service, its listeners and DNS names go"
            );
        }
        let desired = self.desired_listeners(&compiled.catalog);
        if !self.options.listen_allow_remote {
            let remote = desired
                .iter()
                .filter(|(a, k)| **k != ListenerKind::Vip && !a.ip().is_loopback())
                .min_by_key(|(a, _)| **a);
            if let Some((&addr, &kind)) = remote {
                return Err(ServerError::RemoteListener { addr, kind });
            }
        }
        let (new, open) = self.bind_new_listeners(&desired).await?;
        for broken in config::broken_services(&compiled).0 {
            tracing::error!("{broken}");
        }
        let snapshot = Snapshot::new(compiled.catalog, tls, Some(&previous), &self.settings);
        drop(previous);
        // Stored at once: building it made its TLS clients the pools' (`Pool::use_tls`).
        self.live.store(Arc::new(snapshot));
        // The new listeners accept only now, and those that stay change kind now: a connection
        // finds its service as this snapshot routes it.
        let _ = open.send(true);
        self.change_listener_kinds(&desired);
        self.ipam = ipam;
        if let Err(e) = self.vip_store.save(&mut self.ipam) {
            tracing::warn!(error = %e, "VIP assignments not saved; they may change after a restart");
        }
        self.retire_listeners(&desired).await;
        self.listeners.extend(new);
        Ok(())
    }

    fn desired_listeners(&self, catalog: &Catalog) -> HashMap<SocketAddr, ListenerKind> {
        let mut desired = HashMap::new();
        for o in catalog.outbounds() {
            desired.insert(o.address, ListenerKind::Outbound);
        }
        if self.options.bind_vips {
            for (addr, _) in catalog.vip_listeners() {
                desired.entry(addr).or_insert(ListenerKind::Vip);
            }
        }
        for addr in [self.options.transparent, self.transparent_v6].into_iter().flatten() {
            desired.insert(addr, ListenerKind::Transparent);
        }
        desired
    }

    /// Binds the addresses `desired` adds; they accept once the returned sender says so. When
    /// one fails, those bound here are closed again and the error names the address.
    async fn bind_new_listeners(
        &self,
        desired: &HashMap<SocketAddr, ListenerKind>,
    ) -> Result<(Vec<(SocketAddr, BoundListener)>, tokio::sync::watch::Sender<bool>), ServerError> {
        let mut new: Vec<_> = desired.iter().filter(|(addr, _)| !self.listeners.contains_key(addr)).collect();
        new.sort_by_key(|(addr, _)| **addr);
        let (open, opened) = tokio::sync::watch::channel(false);
        let mut bound = Vec::new();
        for (&addr, &kind) in new {
            let cell = KindCell::new(kind);
            match listen::serve(addr, &cell, &self.workers, &self.proxy, &opened) {
                Ok((local, tasks)) => {
                    tracing::info!(listener = %local, %kind, workers = tasks.len(), "listening");
                    bound.push((addr, BoundListener { kind: cell, local, tasks }));
                }
                // The transparent listener's `[::1]` twin is best effort, as its probe: a port
                // taken since is said, not fatal (the next reload tries again).
                Err(error) if Some(addr) == self.transparent_v6 => {
                    tracing::warn!(listener = %addr, %error, "not listening on the IPv6 loopback twin of the transparent listener: IPv6 traffic redirected there finds no proxy");
                }
                Err(error) => {
                    let error = ServerError::Bind { addr, kind, error };
                    tracing::error!("{error}");
                    for (_, listener) in bound {
                        listener.stop().await;
                    }
                    return Err(error);
                }
            }
        }
        Ok((bound, open))
    }

    /// A listener that stays at its address with another kind keeps its socket and only changes
    /// how it routes.
    fn change_listener_kinds(&self, desired: &HashMap<SocketAddr, ListenerKind>) {
        for (addr, listener) in &self.listeners {
            if let Some(&kind) = desired.get(addr) {
                if listener.kind.get() != kind {
                    tracing::info!(listener = %listener.local, from = %listener.kind.get(), to = %kind, "listener changes kind");
                    listener.kind.set(kind);
                }
            }
        }
    }

    /// Stops the listeners no longer wanted.
    async fn retire_listeners(&mut self, desired: &HashMap<SocketAddr, ListenerKind>) {
        let gone: Vec<SocketAddr> = self.listeners.keys().filter(|a| !desired.contains_key(a)).copied().collect();
        for addr in gone {
            if let Some(listener) = self.listeners.remove(&addr) {
                listener.stop().await;
            }
        }
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound address of the DNS proxy (useful with port 0).
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|(addr, _)| *addr)
    }

    /// The bound address of the transparent listener (useful with port 0).
    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        let transparent = self.listeners.values().filter(|l| l.kind.get() == ListenerKind::Transparent);
        transparent.min_by_key(|l| l.local.is_ipv6()).map(|l| l.local)
    }

    /// Graceful drain: stops accepting, asks HTTP connections to finish their requests and
    /// close, and waits for open connections up to `deadline`. Returns how many were still
    /// open when it gave up (they close when the process exits).
    pub async fn drain(&mut self, deadline: Duration) -> usize {
        self.drain_listeners();
        self.draining.send_replace(true);
        let connections = self.proxy.connections.clone();
        let _ = tokio::time::timeout(deadline, connections.all_closed()).await;
        connections.count()
    }

    /// Stops accepting on every proxy listener.
    pub fn stop_listening(&mut self) {
        for (_, l) in self.listeners.drain() {
            l.tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_listening();
        for (_, tasks) in self.dns.take().into_iter().chain(self.dns_v6.take()) {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

/// `[::1]` on the port of an IPv4 loopback listener, where this host has IPv6: what
/// `transparent-proxy install --ipv6` redirects the application's IPv6 connections and DNS to
/// (`REDIRECT` sends them to `::1`, which an IPv4 listener does not hear). Best effort: `None`
/// for another address, port 0 (tests), a host without IPv6, or a port something else holds
/// there (said once: IPv6 redirected traffic then finds no proxy).
fn ipv6_loopback_twin(addr: Option<SocketAddr>, udp_too: bool) -> Option<SocketAddr> {
    let addr = addr.filter(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST && a.port() != 0)?;
    let twin = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port());
    if std::net::UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_err() {
        return None; // no IPv6 here
    }
    let free = std::net::TcpListener::bind(twin).and_then(|_| {
        if udp_too {
            std::net::UdpSocket::bind(twin).map(drop)
        } else {
            Ok(())
        }
    });
    match free {
        Ok(()) => Some(twin),
        Err(error) => {
            tracing::warn!(listener = %twin, %error, "not listening on the IPv6 loopback twin of {addr}: IPv6 traffic redirected there (transparent-proxy install --ipv6) finds no proxy");
            None
        }
    }
}
