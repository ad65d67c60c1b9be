//! The `mesh-egress` command line.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_egress::access_log::{AccessLog, Destination, Format as AccessFormat};
use mesh_egress::admin::{AdminAddr, AdminCommand};
use mesh_egress::catalog::{Access, CompileOptions, Compiled, Ipam, ServiceView};
use mesh_egress::config;
use mesh_egress::listen::SoOriginalDst;
use mesh_egress::resources::egress::PassthroughMode;
use mesh_egress::server::{Options, Server};
use mesh_egress::tproxy;
use mesh_egress::upstream::{EjectionPolicy, ResolverSource, Settings};
use mesh_egress::vip_store::VipStore;
use mesh_egress::watch::ConfigWatch;

// mimalloc's per-thread free lists suit a proxy's many short-lived, same-sized allocations
// (request state, header maps, task cells) better than glibc's bins.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mesh-egress",
    version,
    about = "A sidecar proxy that gives applications access to Kuma MeshExternalServices",
    long_about = "mesh-egress reads Kuma MeshExternalService, HostnameGenerator, Mesh, Secret and \
                  Dataplane resources (Universal or Kubernetes YAML/JSON) and proxies the \
                  application's traffic to the external endpoints they describe.\n\n\
                  Every flag can also be set with an environment variable MESH_EGRESS_<FLAG>, \
                  e.g. MESH_EGRESS_STATE_DIR. Kuma's KUMA_IPAM_MESH_EXTERNAL_SERVICE_CIDR sets the \
                  VIP range (default 242.0.0.0/8)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: load the configuration, bind the listeners and serve until SIGTERM/SIGINT.
    /// SIGHUP reloads the configuration (an invalid one is rejected; the running one stays);
    /// SIGUSR1 reopens the access-log files (log rotation).
    Run(Box<RunArgs>),
    /// Check configuration files; exit 0 when valid, 1 when not (one line per error on stdout,
    /// warnings on stderr).
    Validate {
        /// Files or directories (recursive: *.yaml, *.yml, *.json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        compile: CompileArgs,
    },
    /// Write or remove the iptables rules that redirect the application's outbound TCP to the
    /// transparent listener and its DNS to the DNS proxy (like `kumactl install transparent-proxy`).
    #[command(name = "transparent-proxy", subcommand)]
    TransparentProxy(TproxyAction),
    /// Show what a configuration compiles to: each service's hostnames, VIP, port, protocol,
    /// endpoints, TLS and status conditions.
    Inspect {
        /// Files or directories (recursive: *.yaml, *.yml, *.json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Read and record VIP assignments in this directory, exactly as `run` does, so the VIPs
        /// shown are the ones `run` uses. Without it, VIPs are assigned afresh in memory.
        #[arg(long, env = "MESH_EGRESS_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        compile: CompileArgs,
    },
}

#[derive(Subcommand)]
enum TproxyAction {
    /// Write the rules (replacing an earlier install).
    Install(TproxyArgs),
    /// Remove exactly what install added.
    Uninstall(TproxyArgs),
}

#[derive(Args)]
struct TproxyArgs {
    /// Print the rules (iptables-restore format) instead of applying them.
    #[arg(long)]
    dry_run: bool,
    /// Port of the transparent listener (`run --transparent`).
    #[arg(long, default_value_t = tproxy::DEFAULT_REDIRECT_PORT)]
    redirect_port: u16,
    /// Port of the DNS proxy (`run --dns`).
    #[arg(long, default_value_t = tproxy::DEFAULT_DNS_PORT)]
    dns_port: u16,
    /// Do not redirect DNS.
    #[arg(long)]
    no_dns: bool,
    /// The uid mesh-egress runs as; its traffic is never redirected.
    #[arg(long, default_value_t = tproxy::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// The mark on mesh-egress's own sockets (`run --socket-mark`), decimal or 0x hex, or
    /// `off`: traffic with it is never redirected either, whatever uid the proxy runs as.
    #[arg(long, default_value = "0x4d45", value_parser = mark)]
    proxy_mark: Mark,
    /// Destination ports not to redirect (comma separated).
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Destination CIDRs not to redirect (comma separated).
    #[arg(long, value_delimiter = ',', value_parser = tproxy::parse_cidr)]
    exclude_cidrs: Vec<ipnet::IpNet>,
    /// Also write ip6tables rules.
    #[arg(long)]
    ipv6: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration files or directories (repeatable; recursive: *.yaml, *.yml, *.json).
    #[arg(short = 'c', long = "config", required = true, env = "MESH_EGRESS_CONFIG", value_delimiter = ',')]
    config: Vec<PathBuf>,
    /// Directory where VIP assignments are kept, so services keep their VIPs across restarts.
    /// Without it, VIPs live only as long as the process.
    #[arg(long, env = "MESH_EGRESS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Admin server: IP:PORT, `unix:///path` (a unix socket, off the pod network), or `off`.
    /// GET /ready /metrics /stats /stats/prometheus /clusters /server_info /listeners
    /// /config_dump /endpoints; POST (loopback or unix admin only) /logging /healthcheck/fail
    /// /healthcheck/ok /drain_listeners /quitquitquit.
    #[arg(long, env = "MESH_EGRESS_ADMIN", default_value = "127.0.0.1:9901", value_parser = admin_or_off)]
    admin: AdminListen,
    /// A port on all addresses that answers GET /ready only, for kubelet probes (kuma-dp's
    /// --readiness-port), or `off`.
    #[arg(long, env = "MESH_EGRESS_READINESS_PORT", default_value = "9902", value_parser = port_or_off)]
    readiness_port: PortOrOff,
    /// DNS proxy address (UDP and TCP), or `off`: answers generated hostnames with their VIP
    /// and forwards other names.
    #[arg(long, env = "MESH_EGRESS_DNS", default_value = "127.0.0.1:15053", value_parser = addr_or_off)]
    dns: Listen,
    /// Where the DNS proxy forwards names it does not know, IP:PORT (repeatable).
    /// Default: the nameservers of /etc/resolv.conf.
    #[arg(long, env = "MESH_EGRESS_DNS_UPSTREAM", value_delimiter = ',')]
    dns_upstream: Vec<SocketAddr>,
    /// Transparent-proxy listener (iptables REDIRECT target), or `off`.
    #[arg(long, env = "MESH_EGRESS_TRANSPARENT", default_value = "127.0.0.1:15001", value_parser = addr_or_off)]
    transparent: Listen,
    /// Listen on VIP:port of every service (needs the VIP range routed locally, e.g.
    /// `ip route add local 242.0.0.0/8 dev lo`; binds with IP_FREEBIND).
    #[arg(long, env = "MESH_EGRESS_BIND_VIPS")]
    bind_vips: bool,
    /// Close transparent connections to destinations that are no MeshExternalService, whatever
    /// MeshPassthrough says (as `passthroughMode: None`). Without it and without a
    /// MeshPassthrough, they pass through (`All`).
    #[arg(long, env = "MESH_EGRESS_NO_PASSTHROUGH")]
    no_passthrough: bool,
    /// SO_MARK on the proxy's own outgoing sockets (endpoints, passthrough, DNS forwards), which
    /// `transparent-proxy install --proxy-mark` exempts from redirection; `off` for none.
    /// Needs CAP_NET_ADMIN; without it the proxy says so once and relies on its uid.
    #[arg(long, env = "MESH_EGRESS_SOCKET_MARK", default_value = "0x4d45", value_parser = mark)]
    socket_mark: Mark,
    /// Data-path worker threads (default: one per core).
    #[arg(long, env = "MESH_EGRESS_WORKERS")]
    workers: Option<usize>,
    /// Timeout for connecting to an endpoint, `0s` for none (Kuma's default: 5s).
    #[arg(long, env = "MESH_EGRESS_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration)]
    connect_timeout: Duration,
    /// Close an application connection (TCP flow, tunnel, passthrough) after this long without
    /// a byte either way; an HTTP connection after this long with no request open (as Envoy's
    /// idle_timeout: a long poll keeps it); `0s` for never (Kuma's MeshTimeout `idleTimeout`
    /// default: 1h).
    #[arg(long, env = "MESH_EGRESS_CONNECTION_IDLE_TIMEOUT", default_value = "1h", value_parser = duration)]
    connection_idle_timeout: Duration,
    /// TCP: once one side has closed its half, the flow ends after this long without a byte
    /// (HAProxy's client-fin/server-fin), `0s` never (the idle timeout still applies).
    #[arg(long, env = "MESH_EGRESS_HALF_CLOSE_TIMEOUT", default_value = "60s", value_parser = duration)]
    half_close_timeout: Duration,
    /// HTTP/1: time to receive a request's head; also how long a keep-alive connection waits
    /// for its next request (0: no limit but the connection idle timeout).
    #[arg(long, env = "MESH_EGRESS_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    header_read_timeout: Duration,
    /// HTTP/1: most headers in a request (431 beyond).
    #[arg(long, env = "MESH_EGRESS_MAX_REQUEST_HEADERS", default_value_t = mesh_egress::proxy::http::MAX_HEADERS)]
    max_request_headers: usize,
    /// Largest HTTP/1 request head and HTTP/2 header list, in bytes (431 beyond); at least 8192
    /// (the HTTP/1 server's smallest read buffer).
    #[arg(long, env = "MESH_EGRESS_MAX_HEADER_BYTES", default_value_t = mesh_egress::proxy::http::MAX_HEADER_BYTES, value_parser = header_bytes)]
    max_header_bytes: usize,
    /// HTTP/2 streams open at once per application connection (Envoy's default, 100).
    #[arg(long, env = "MESH_EGRESS_MAX_CONCURRENT_STREAMS", default_value_t = mesh_egress::proxy::http::MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,
    /// Time one upstream nameserver has to answer a forwarded DNS query (`0s`: none).
    #[arg(long, env = "MESH_EGRESS_DNS_FORWARD_TIMEOUT", default_value = "2s", value_parser = duration)]
    dns_forward_timeout: Duration,
    /// Forwarded DNS queries waiting for an answer at once; more get SERVFAIL at once.
    #[arg(long, env = "MESH_EGRESS_DNS_MAX_IN_FLIGHT", default_value_t = mesh_egress::dns::MAX_FORWARDS_IN_FLIGHT)]
    dns_max_in_flight: usize,
    /// A DNS-over-TCP connection without a query for this long is closed (`0s`: never).
    #[arg(long, env = "MESH_EGRESS_DNS_TCP_IDLE_TIMEOUT", default_value = "10s", value_parser = duration)]
    dns_tcp_idle_timeout: Duration,
    /// Time for an admin request's head to arrive (`0s`: none).
    #[arg(long, env = "MESH_EGRESS_ADMIN_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    admin_header_read_timeout: Duration,
    /// An admin connection with no byte either way for this long is closed (`0s`: never).
    #[arg(long, env = "MESH_EGRESS_ADMIN_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    admin_idle_timeout: Duration,
    /// HTTP/1 `Upgrade` protocols passed through as tunnels, comma-separated; a request asking
    /// for another (h2c, say) has its upgrade headers removed and is forwarded as it is.
    #[arg(long, env = "MESH_EGRESS_UPGRADE_PROTOCOLS", value_delimiter = ',', default_value = "websocket")]
    upgrade_protocols: Vec<String>,
    /// Open upstream connections per service; connects beyond fail at once (503 for HTTP)
    /// without counting against an endpoint (Envoy's circuit-breaker default: 1024).
    #[arg(long, env = "MESH_EGRESS_MAX_UPSTREAM_CONNECTIONS", default_value_t = mesh_egress::upstream::DEFAULT_MAX_CONNECTIONS)]
    max_upstream_connections: usize,
    /// HTTP/gRPC: time allowed from the end of the request body until the response headers
    /// arrive (as Envoy's route timeout; before the end, only a body nobody reads times out), `0s`
    /// for none (Kuma's MeshTimeout default is 15s). A gRPC `grpc-timeout` shorter than this wins.
    #[arg(long, env = "MESH_EGRESS_REQUEST_TIMEOUT", default_value = "15s", value_parser = duration)]
    request_timeout: Duration,
    /// Idle pooled HTTP/1 connections to endpoints, and HTTP/2 ones no request used, are closed
    /// after this long, `0s` for never (as MeshTimeout's `idleTimeout: 0s`; Kuma's default: 1h).
    #[arg(long, env = "MESH_EGRESS_IDLE_TIMEOUT", default_value = "1h", value_parser = duration)]
    idle_timeout: Duration,
    /// HTTP: a response body without data for this long is cut, `0s` for never (Kuma's
    /// MeshTimeout `streamIdleTimeout` default: 30m).
    #[arg(long, env = "MESH_EGRESS_STREAM_IDLE_TIMEOUT", default_value = "30m", value_parser = duration)]
    stream_idle_timeout: Duration,
    /// DNS server(s) for endpoint names, IP:PORT (repeatable). Default: /etc/resolv.conf.
    #[arg(long, env = "MESH_EGRESS_UPSTREAM_DNS", value_delimiter = ',')]
    upstream_dns: Vec<SocketAddr>,
    /// Consecutive connect failures that eject an endpoint address.
    #[arg(long, env = "MESH_EGRESS_EJECT_AFTER", default_value_t = 3)]
    eject_after: u32,
    /// How long the first ejection lasts; it doubles with each ejection in a row (up to 32x).
    #[arg(long, env = "MESH_EGRESS_EJECTION_TIME", default_value = "10s", value_parser = duration)]
    ejection_time: Duration,
    /// Log format.
    #[arg(long, env = "MESH_EGRESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Access log: `off`, `stdout`, or a file path. One line per TCP connection and per HTTP
    /// request, written by a thread of its own.
    #[arg(long, env = "MESH_EGRESS_ACCESS_LOG", default_value = "off")]
    access_log: String,
    /// Access log format.
    #[arg(long, env = "MESH_EGRESS_ACCESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    access_log_format: LogFormat,
    /// On SIGTERM/SIGINT: how long in-flight requests and connections may take to finish.
    #[arg(long, env = "MESH_EGRESS_DRAIN_TIMEOUT", default_value = "20s", value_parser = duration)]
    drain_timeout: Duration,
    /// Allow the admin server on a non-loopback address (it has no authentication).
    #[arg(long, env = "MESH_EGRESS_ADMIN_ALLOW_REMOTE")]
    admin_allow_remote: bool,
    /// Allow the DNS proxy on a non-loopback address (it forwards what it does not know: an open
    /// resolver to whoever can reach it).
    #[arg(long, env = "MESH_EGRESS_DNS_ALLOW_REMOTE")]
    dns_allow_remote: bool,
    /// Allow the transparent listener and Dataplane outbounds on non-loopback addresses (anyone
    /// who can reach them can use the external services).
    #[arg(long, env = "MESH_EGRESS_LISTEN_ALLOW_REMOTE")]
    listen_allow_remote: bool,
    /// Do not watch the configuration paths (reload on SIGHUP only).
    #[arg(long, env = "MESH_EGRESS_NO_WATCH")]
    no_watch: bool,
    #[command(flatten)]
    compile: CompileArgs,
}

/// The admin's address, or none (`off`).
#[derive(Clone, Debug)]
struct AdminListen(Option<AdminAddr>);

/// The longest a duration flag takes: a longer one is taken as this, a deadline that far being
/// none (and a clock read plus more would overflow).
const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `--max-header-bytes`: hyper's HTTP/1 server asserts a read buffer of at least 8 KiB, and a
/// smaller one made every HTTP connection's task panic.
fn header_bytes(s: &str) -> Result<usize, String> {
    const SMALLEST: usize = 8192;
    let bytes: usize = s.parse().map_err(|e| format!("{e}"))?;
    if bytes < SMALLEST {
        return Err(format!("must be at least {SMALLEST}"));
    }
    Ok(bytes)
}

/// A duration flag (humantime: `500ms`, `30s`, `1h`, `2d`).
fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    Ok(humantime::parse_duration(s)?.min(LONGEST))
}

/// `0s` means none for every timeout flag but `--drain-timeout` (0s: exit at once) and
/// `--ejection-time`; where a value of its own says so (`--request-timeout`, the stream idle
/// and header-read timeouts) it is handled there.
fn none_if_zero(duration: Duration) -> Duration {
    if duration.is_zero() {
        LONGEST
    } else {
        duration
    }
}

fn admin_or_off(s: &str) -> Result<AdminListen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(AdminListen(None));
    }
    AdminAddr::parse(s).map(|a| AdminListen(Some(a)))
}

/// A port, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct PortOrOff(Option<u16>);

fn port_or_off(s: &str) -> Result<PortOrOff, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(PortOrOff(None));
    }
    s.parse().map(|p| PortOrOff(Some(p))).map_err(|e| format!("'{s}' is not a port or `off`: {e}"))
}

/// A socket mark, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct Mark(Option<u32>);

fn mark(s: &str) -> Result<Mark, String> {
    mesh_egress::socket_mark::parse(s).map(Mark)
}

/// A listen address, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct Listen(Option<SocketAddr>);

fn addr_or_off(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|e| format!("'{s}' is not IP:PORT or `off`: {e}"))
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Clone)]
struct CompileArgs {
    /// Local zone name, the value of {{ .Zone }} for services without a kuma.io/zone label.
    #[arg(long, env = "MESH_EGRESS_ZONE", default_value = "")]
    zone: String,
    /// Do not apply the built-in hostname generator ({{ .DisplayName }}.extsvc.mesh.local)
    /// when the configuration has no HostnameGenerator.
    #[arg(long, env = "MESH_EGRESS_NO_DEFAULT_HOSTNAMES")]
    no_default_hostnames: bool,
    /// The Dataplane this sidecar serves: policies select it, and MeshTrafficPermission
    /// `from` items match its name, labels and inbound tags. Default: every Dataplane in the
    /// configuration, and in each mesh the only one as the workload.
    #[arg(long, env = "MESH_EGRESS_DATAPLANE")]
    dataplane: Option<String>,
}

impl CompileArgs {
    fn options(&self) -> CompileOptions {
        CompileOptions {
            zone: self.zone.clone(),
            default_hostnames: !self.no_default_hostnames,
            dataplane: self.dataplane.clone(),
            ..CompileOptions::from_env()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::TransparentProxy(action) => transparent_proxy(action),
        Command::Validate { paths, compile } => validate(&paths, &compile),
        Command::Inspect { paths, output, state_dir, compile } => inspect(&paths, output, state_dir, &compile),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-egress: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn transparent_proxy(action: TproxyAction) -> anyhow::Result<ExitCode> {
    let (install, args) = match action {
        TproxyAction::Install(args) => (true, args),
        TproxyAction::Uninstall(args) => (false, args),
    };
    let rules = tproxy::Rules {
        redirect_port: args.redirect_port,
        dns_port: args.dns_port,
        redirect_dns: !args.no_dns,
        proxy_uid: args.proxy_uid,
        proxy_mark: args.proxy_mark.0,
        exclude_ports: args.exclude_ports,
        exclude_cidrs: args.exclude_cidrs,
    };
    let families: &[tproxy::Family] =
        if args.ipv6 { &[tproxy::Family::V4, tproxy::Family::V6] } else { &[tproxy::Family::V4] };
    for &family in families {
        if args.dry_run {
            let label = if family == tproxy::Family::V4 { "iptables" } else { "ip6tables" };
            if install {
                print!("# {label}-restore --noflush\n{}", rules.render(family));
            } else {
                println!("# {label}: delete the OUTPUT jumps to {0}, then flush and delete {0}", tproxy::CHAIN);
            }
            continue;
        }
        if install {
            tproxy::install(&rules, family)?;
        } else {
            tproxy::uninstall(family)?;
        }
    }
    if !args.dry_run {
        eprintln!("transparent proxy rules {}", if install { "installed" } else { "removed" });
    }
    Ok(ExitCode::SUCCESS)
}

/// The log filter, changeable at run time through the admin (`POST /logging`).
#[derive(Debug)]
struct ReloadableFilter {
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
}

impl mesh_egress::admin::LogControl for ReloadableFilter {
    fn current(&self) -> String {
        self.handle.with_current(|f| f.to_string()).unwrap_or_default()
    }

    fn set(&self, directives: &str) -> Result<String, String> {
        let filter = tracing_subscriber::EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        Ok(self.current())
    }
}

static LOG_CONTROL: std::sync::OnceLock<Arc<ReloadableFilter>> = std::sync::OnceLock::new();

fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = LOG_CONTROL.set(Arc::new(ReloadableFilter { handle }));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
}

/// Runs for the worker's lifetime with a timer always due within half a second. tokio wakes its
/// I/O driver (an eventfd write and an extra epoll event) whenever a new timer is due before all
/// pending ones; with this one pending, a request's timeout (seconds away) never is, which saves a
/// system call and a wake-up on every request.
async fn keep_a_timer_due_soon() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // SIGHUP and SIGUSR1 are handled from the first moment there is a runtime to handle them:
    // their default action would end the process (logrotate's `postrotate kill -USR1` may come
    // at any time, start-up included).
    let control = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _in_runtime = control.enter();
        Signals { hangup: signal(SignalKind::hangup())?, reopen_logs: signal(SignalKind::user_defined1())? }
    };
    init_logging(args.log_format);
    // A sidecar holds two descriptors per proxied connection: take what the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    // The data path: one single-threaded runtime per worker thread, each accepting on its own
    // SO_REUSEPORT socket (no work stealing, as pingora's "no-steal" runtime). This thread runs
    // the control plane: loading and reloads, signals, DNS proxy and re-resolution.
    mesh_egress::worker::set_workers(workers);
    let handles = (0..workers)
        .map(|i| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
                mesh_egress::worker::enter(i);
                runtime.block_on(keep_a_timer_due_soon())
            })?;
            Ok(handle)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("starting the worker threads")?;
    control.block_on(serve(args, handles, signals))
}

/// The signals `run` handles besides termination, registered before anything else.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    reopen_logs: tokio::signal::unix::Signal,
}

async fn serve(args: RunArgs, workers: Vec<tokio::runtime::Handle>, signals: Signals) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let Signals { mut hangup, mut reopen_logs } = signals;
    let (admin_tcp, admin_unix) = match args.admin.0.clone() {
        Some(AdminAddr::Tcp(addr)) => (Some(addr), None),
        Some(AdminAddr::Unix(path)) => (None, Some(path)),
        None => (None, None),
    };
    if let Some(admin) = admin_tcp {
        anyhow::ensure!(
            admin.ip().is_loopback() || args.admin_allow_remote,
            "--admin {admin} is not a loopback address: the admin API has no authentication; add --admin-allow-remote to allow it"
        );
    }
    if let Some(dns) = args.dns.0 {
        anyhow::ensure!(
            dns.ip().is_loopback() || args.dns_allow_remote,
            "--dns {dns} is not a loopback address: the DNS proxy forwards unknown names, an open resolver to whoever reaches it; add --dns-allow-remote to allow it"
        );
    }
    state_dir_outside(args.state_dir.as_deref(), &args.config)?;
    let access_log = match args.access_log.as_str() {
        "off" => None,
        dest => {
            let destination = match dest {
                "stdout" | "-" => Destination::Stdout,
                path => Destination::File(PathBuf::from(path)),
            };
            let format = match args.access_log_format {
                LogFormat::Text => AccessFormat::Text,
                LogFormat::Json => AccessFormat::Json,
            };
            Some(AccessLog::start(destination, format).with_context(|| format!("opening the access log {dest}"))?)
        }
    };
    mesh_egress::socket_mark::set(args.socket_mark.0);
    let mut timeouts = mesh_egress::proxy::ConnectionTimeouts {
        idle: none_if_zero(args.connection_idle_timeout),
        half_close: none_if_zero(args.half_close_timeout),
        header_read: args.header_read_timeout,
        stream_idle: args.stream_idle_timeout,
    };
    timeouts.set_header_read(args.header_read_timeout);
    let options = Options {
        config_paths: args.config,
        request_timeout: Some(args.request_timeout).filter(|t| !t.is_zero()),
        state_dir: args.state_dir,
        compile: args.compile.options(),
        admin: admin_tcp,
        admin_unix,
        readiness: args.readiness_port.0.map(|port| SocketAddr::from(([0, 0, 0, 0], port))),
        command_line: std::env::args().collect(),
        log_control: LOG_CONTROL.get().cloned().map(|c| c as Arc<dyn mesh_egress::admin::LogControl>),
        admin_timeouts: mesh_egress::admin::AdminTimeouts {
            header_read: none_if_zero(args.admin_header_read_timeout),
            idle: none_if_zero(args.admin_idle_timeout),
        },
        dns_limits: mesh_egress::dns::DnsLimits {
            forward_timeout: none_if_zero(args.dns_forward_timeout),
            max_in_flight: args.dns_max_in_flight,
            tcp_idle: none_if_zero(args.dns_tcp_idle_timeout),
        },
        http_limits: mesh_egress::proxy::http::HttpLimits {
            max_headers: args.max_request_headers,
            max_header_bytes: args.max_header_bytes,
            max_concurrent_streams: args.max_concurrent_streams,
        },
        dns: args.dns.0,
        dns_forwarders: args.dns_upstream,
        transparent: args.transparent.0,
        bind_vips: args.bind_vips,
        listen_allow_remote: args.listen_allow_remote,
        upgrade_protocols: args.upgrade_protocols,
        timeouts,
        passthrough: !args.no_passthrough,
        access_log,
        workers,
        upstream: Settings {
            connect_timeout: none_if_zero(args.connect_timeout),
            max_connections: args.max_upstream_connections,
            idle_timeout: none_if_zero(args.idle_timeout),
            ejection: EjectionPolicy { consecutive_failures: args.eject_after, base_time: args.ejection_time },
            resolver: ResolverSource::new(args.upstream_dns),
        },
    };
    // Watched before the first load: a change while it runs brings a reload right after.
    let mut watch = if args.no_watch {
        None
    } else {
        Some(ConfigWatch::new(&options.config_paths).context("watching the configuration")?)
    };
    let mut server = Server::start(options, Arc::new(SoOriginalDst)).await?;
    if let Some(addr) = server.admin_addr() {
        tracing::info!(admin = %addr, "ready");
    }
    let mut terminate = signal(SignalKind::terminate())?;
    let mut admin_commands = server.admin_commands();
    let mut listeners_drained = false;
    loop {
        let changed = async {
            match watch.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        let admin = async {
            match admin_commands.as_mut() {
                Some(commands) => commands.recv().await,
                None => std::future::pending().await,
            }
        };
        let trigger = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            () = changed => "file change",
            _ = terminate.recv() => break,
            _ = reopen_logs.recv() => {
                tracing::info!("SIGUSR1: access log files are opened again before their next line");
                mesh_egress::access_log::reopen_files();
                continue;
            }
            _ = tokio::signal::ctrl_c() => break,
            command = admin => match command {
                Some(AdminCommand::Quit) => {
                    tracing::info!("admin: quitquitquit");
                    break;
                }
                Some(AdminCommand::DrainListeners) => {
                    tracing::info!("admin: draining listeners; open connections go on");
                    server.drain_listeners();
                    listeners_drained = true;
                    continue;
                }
                None => {
                    admin_commands = None;
                    continue;
                }
            },
        };
        if trigger == "SIGHUP" {
            if let Some(watch) = watch.as_mut() {
                watch.watch_dirs_anew(); // a directory replaced while its watch was lost
            }
        }
        if listeners_drained {
            tracing::info!(trigger, "listeners are drained (/drain_listeners): the configuration is not reloaded");
            continue;
        }
        match server.reload().await {
            Ok(()) => tracing::info!(trigger, "configuration reloaded"),
            Err(e) => tracing::error!(trigger, "reload rejected, the running configuration stays: {e}"),
        }
    }
    tracing::info!(deadline = ?args.drain_timeout, "draining");
    let left = server.drain(args.drain_timeout).await;
    if left > 0 {
        tracing::warn!(connections = left, "drain deadline passed; closing the rest");
    }
    Ok(ExitCode::SUCCESS)
}

fn load(paths: &[PathBuf], compile: &CompileArgs, store: &VipStore) -> anyhow::Result<(Compiled, Ipam)> {
    let mut ipam = store.load(Ipam::cidr_from_env()?)?;
    let (compiled, _) = config::load(paths, &compile.options(), &mut ipam, None);
    Ok((compiled, ipam))
}

fn validate(paths: &[PathBuf], compile: &CompileArgs) -> anyhow::Result<ExitCode> {
    let (compiled, _) = load(paths, compile, &VipStore::default())?;
    let mut errors = compiled.diagnostics.errors().cloned().collect::<Vec<_>>();
    errors.extend(config::broken_services(&compiled).0);
    for w in compiled.diagnostics.warnings() {
        eprintln!("{w}");
    }
    let mut stdout = std::io::stdout().lock();
    for e in &errors {
        writeln!(stdout, "{e}")?;
    }
    let services = compiled.catalog.services().len();
    if errors.is_empty() {
        eprintln!("valid: {services} MeshExternalService(s)");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("invalid: {} error(s)", errors.len());
        Ok(ExitCode::from(1))
    }
}

/// A state directory inside a configuration directory would have its `vips.json` read as
/// configuration (and rejected), and each of its writes would reload.
fn state_dir_outside(state_dir: Option<&Path>, config: &[PathBuf]) -> anyhow::Result<()> {
    let Some(state_dir) = state_dir else { return Ok(()) };
    let state = resolved(state_dir);
    // Below a hidden directory the loader reads nothing (`.state`): allowed.
    let read_as_config = |dir: &PathBuf| {
        let dir = resolved(dir);
        state.strip_prefix(&dir).is_ok_and(|rest| {
            !rest.components().any(|c| c.as_os_str().to_str().is_some_and(|name| name.starts_with('.')))
        })
    };
    match config.iter().find(|dir| dir.is_dir() && read_as_config(dir)) {
        Some(dir) => anyhow::bail!(
            "--state-dir {} is inside the configuration directory {}: its vips.json would be read as configuration; choose a directory outside it",
            state_dir.display(),
            dir.display()
        ),
        None => Ok(()),
    }
}

/// `path` with its symlinks resolved, also when its last components do not exist yet (a state
/// directory made on first save): the nearest existing ancestor resolved, the rest appended.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for ancestor in absolute.ancestors() {
        let (Ok(real), Ok(rest)) = (ancestor.canonicalize(), absolute.strip_prefix(ancestor)) else { continue };
        // What does not exist yet is read lexically: `new/../state` is `state`.
        return rest.components().fold(real, |mut path, part| {
            match part {
                std::path::Component::ParentDir => {
                    path.pop();
                }
                std::path::Component::Normal(name) => path.push(name),
                _ => {}
            }
            path
        });
    }
    absolute
}

fn inspect(
    paths: &[PathBuf],
    format: Format,
    state_dir: Option<PathBuf>,
    compile: &CompileArgs,
) -> anyhow::Result<ExitCode> {
    state_dir_outside(state_dir.as_deref(), paths)?;
    let store = VipStore::new(state_dir.as_deref());
    let (compiled, mut ipam) = load(paths, compile, &store)?;
    for d in &compiled.diagnostics.0 {
        eprintln!("{d}");
    }
    if compiled.diagnostics.has_errors() {
        return Ok(ExitCode::from(1));
    }
    store.save(&mut ipam).context("saving VIP assignments")?;
    let views: Vec<ServiceView> = compiled.catalog.services().iter().map(|s| ServiceView::from(&**s)).collect();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let passthrough = compiled.catalog.passthrough();
            let json = serde_json::json!({ "services": views, "passthrough": &**passthrough });
            writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
            for i in compiled.catalog.ignored_policies() {
                eprintln!("note: {} {} is not applied: {}", i.kind, i.policy, i.reason);
            }
        }
        Format::Table => write_table(&mut out, &views, &compiled)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn write_table(out: &mut impl std::io::Write, views: &[ServiceView], compiled: &Compiled) -> std::io::Result<()> {
    let rows: Vec<[String; 9]> = views
        .iter()
        .map(|v| {
            let tls = v.tls.as_ref().map_or("-".to_string(), |t| {
                format!("{:?}{}", t.mode, if t.client_certificate { "+mTLS" } else { "" })
            });
            let status = match (&v.broken, v.conditions.iter().find(|c| c.status == "False")) {
                (Some(reason), _) => format!("broken: {reason}"),
                (None, Some(c)) => format!("{}: {}", c.reason, c.message),
                (None, None) => match v.access {
                    Access::Allowed => "ok".into(),
                    Access::Forbidden => "forbidden by Mesh".into(),
                    Access::Denied => "denied by MeshTrafficPermission".into(),
                    Access::ShadowDenied => "ok (shadow deny)".into(),
                },
            };
            [
                v.name.clone(),
                v.mesh.clone(),
                if v.hostnames.is_empty() { "-".into() } else { v.hostnames.join(",") },
                v.vip.map_or("-".into(), |ip| ip.to_string()),
                v.port.to_string(),
                v.protocol.as_str().to_string(),
                v.endpoints.iter().map(|e| e.address.clone()).collect::<Vec<_>>().join(","),
                tls,
                status,
            ]
        })
        .collect();
    let header = ["NAME", "MESH", "HOSTNAMES", "VIP", "PORT", "PROTOCOL", "ENDPOINTS", "TLS", "STATUS"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        writeln!(out, "{}", line(&row.each_ref().map(String::as_str)))?;
    }
    for o in compiled.catalog.outbounds() {
        if let Some(s) = compiled.catalog.service(o.service) {
            writeln!(out, "outbound {} (Dataplane {}) -> {}", o.address, o.dataplane, s.key())?;
        }
    }
    for v in views {
        for source in &v.policies.sources {
            writeln!(out, "policy {}/{}: {} {} {}", v.mesh, v.name, source.kind.as_str(), source.policy, source.item)?;
        }
    }
    for v in views {
        let Some(routes) = &v.routes else { continue };
        let describe = |backends: &[mesh_egress::policy::routes::Backend]| -> String {
            if backends.is_empty() {
                return "itself".to_string();
            }
            let each: Vec<String> = backends
                .iter()
                .map(|b| {
                    format!(
                        "{} {} (weight {})",
                        b.reference.kind,
                        b.reference.name.as_deref().unwrap_or("(labels)"),
                        b.weight
                    )
                })
                .collect();
            each.join(", ")
        };
        for rule in &routes.http {
            writeln!(out, "route {}/{}: MeshHTTPRoute {} -> {}", v.mesh, v.name, rule.name, describe(&rule.backends))?;
        }
        if let Some(tcp) = &routes.tcp {
            writeln!(out, "route {}/{}: MeshTCPRoute {} -> {}", v.mesh, v.name, tcp.name, describe(&tcp.backends))?;
        }
    }
    for v in views {
        if let Some(by) = &v.access_by {
            writeln!(out, "access {}/{}: {:?} by {by}", v.mesh, v.name, v.access)?;
        }
    }
    let passthrough = compiled.catalog.passthrough();
    let from = if passthrough.policies.is_empty() {
        "no MeshPassthrough: the default".to_string()
    } else {
        format!("MeshPassthrough {}", passthrough.policies.join(", "))
    };
    writeln!(out, "passthrough {:?} ({from})", passthrough.mode)?;
    if passthrough.mode == PassthroughMode::Matched {
        for m in &passthrough.rules {
            let port = m.port.map_or("all ports".to_string(), |p| format!("port {p}"));
            writeln!(out, "passthrough allows {} {} {port} {}", m.type_, m.value, m.protocol)?;
        }
    }
    for i in compiled.catalog.ignored_policies() {
        writeln!(out, "policy {} {} not applied: {}", i.kind, i.policy, i.reason)?;
    }
    Ok(())
}
