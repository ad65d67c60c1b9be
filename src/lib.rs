//! mesh-egress: a sidecar proxy for Kuma `MeshExternalService` resources.
//!
//! Data flows one way: [`resources`] (files → typed, validated resources) → [`catalog`]
//! (compiled, immutable view) → [`live`] (TLS clients and upstreams) → the data path.

/// The module layers, bottom first: a module may use only the modules listed before it (and
/// itself), so the graph has no cycles. `tests/layers.rs` checks every `crate::` path in `src/`
/// against this list; docs/architecture.md explains each layer.
pub const LAYERS: &[&str] = &[
    // Vocabulary: plain data every layer shares, and which worker a thread is.
    "model",
    "worker",
    // Helpers for unit tests (loopback sockets).
    "test_support",
    // The mark on the proxy's own sockets, how they write, and how bulk flows move between them.
    "socket_mark",
    "sendmsg",
    "splice",
    // Configuration as written: files → typed, validated resources (templates are theirs).
    "template",
    "log_format",
    // Speaking gRPC as a client (health checks, OTLP export).
    "grpc_wire",
    "resources",
    // Which policies apply to each service, merged as Kuma merges them.
    "policy",
    // Configuration compiled: pure, no I/O, no clock, no TLS library.
    "catalog",
    "vip_store",
    // Runtime building blocks: TLS origination, metrics, endpoints and pooled connections.
    "tls",
    "metrics",
    "access_log",
    "trace",
    "upstream",
    // A configuration ready for traffic, and loading one.
    "live",
    "config",
    // The data path.
    "listen",
    "proxy",
    "dns",
    // The control plane and the process.
    "admin",
    "tproxy",
    "watch",
    "server",
    // Entry points for the fuzz targets.
    "fuzzing",
];

pub mod access_log;
pub mod admin;
pub mod catalog;
pub mod config;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc_wire;
pub mod listen;
pub mod live;
pub mod log_format;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod proxy;
pub mod resources;
pub mod sendmsg;
pub mod server;
pub mod socket_mark;
pub mod splice;
pub mod template;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod tproxy;
pub mod trace;
pub mod upstream;
pub mod vip_store;
pub mod watch;
pub mod worker;
