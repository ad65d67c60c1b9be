//! Loading configuration paths all the way to a compiled catalog: what `validate`, `inspect` and
//! `run` share.

use std::path::PathBuf;

use crate::catalog::{self, CompileOptions, Compiled, Ipam};
use crate::live::{Snapshot, TlsClients};
use crate::resources::{self, Diagnostic, Diagnostics, Resource};

/// Reads, validates and compiles `paths`. Load and compile diagnostics come back together, with
/// one error per broken service, so that callers see every problem at once.
pub fn load(
    paths: &[PathBuf],
    options: &CompileOptions,
    ipam: &mut Ipam,
    previous: Option<&Snapshot>,
) -> (Compiled, TlsClients) {
    let loaded = resources::load_paths(paths);
    let (mut compiled, tls) = compile(&loaded.resources, options, ipam, previous);
    let mut diagnostics = loaded.diagnostics;
    diagnostics.extend(compiled.diagnostics.0);
    compiled.diagnostics = diagnostics;
    (compiled, tls)
}

/// Compiles `resources` and builds the TLS clients of their services (reusing `previous`'s
/// where nothing changed); a client that cannot be built breaks its service.
pub fn compile(
    resources: &[Resource],
    options: &CompileOptions,
    ipam: &mut Ipam,
    previous: Option<&Snapshot>,
) -> (Compiled, TlsClients) {
    let mut compiled = catalog::compile(resources, options, ipam);
    let tls = TlsClients::build(&mut compiled.catalog, options.system_ca_file.clone(), previous);
    (compiled, tls)
}

/// The errors that make a service unusable, as diagnostics (for `validate`).
pub fn broken_services(compiled: &Compiled) -> Diagnostics {
    let mut out = Diagnostics::default();
    for s in compiled.catalog.services() {
        if let Some(reason) = &s.broken {
            let (path, message) = match reason.split_once(": ") {
                Some((path, message)) if path.starts_with("spec.") => (path, message),
                _ => ("", reason.as_str()),
            };
            out.push(Diagnostic::error(&s.origin, path, message).about(format!("MeshExternalService {}", s.key())));
        }
    }
    out
}
