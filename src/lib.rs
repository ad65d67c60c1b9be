//! mesh-egress: a sidecar proxy for Kuma `MeshExternalService` resources.
//!
//! Data flows one way: [`resources`] (files → typed, validated resources) → [`catalog`]
//! (compiled, immutable view) → the data path.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod catalog;
pub mod config;
pub mod dns;
pub mod listen;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod resources;
pub mod server;
pub mod template;
pub mod tls;
pub mod tproxy;
pub mod upstream;
pub mod watch;
