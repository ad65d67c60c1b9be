//! Validation with Kuma's messages, each at its field path. All problems are reported.

use std::net::IpAddr;

use super::kinds::{DataSource, DataplaneSpec, HostnameGeneratorSpec, MeshExternalServiceSpec, TlsSpec};
use super::{Diagnostic, Diagnostics, Kind, Resource};
use crate::template::Template;

const PROTOCOLS: [&str; 4] = ["tcp", "grpc", "http", "http2"];
const TLS_VERSIONS: [&str; 5] = ["TLSAuto", "TLS10", "TLS11", "TLS12", "TLS13"];
const MODES: [&str; 4] = ["SkipSAN", "SkipCA", "SkipAll", "Secured"];
const SAN_TYPES: [&str; 2] = ["Prefix", "Exact"];
const MAX_NAME_LEN: usize = 63;
pub(super) const MAX_PRIORITY: i64 = 128;
pub(super) const UNIX_SCHEME: &str = "unix://";

/// Collects the violations of one resource into `out`.
pub(super) fn resource(r: &Resource, out: &mut Diagnostics) {
    let mut v = Violations { origin: &r.meta.origin, out };
    if r.meta.name.is_empty() {
        v.error("name", "must not be empty");
    } else if r.meta.name.len() > MAX_NAME_LEN {
        v.error("name", format!("must not be longer than {MAX_NAME_LEN} characters"));
    }
    match &r.kind {
        Kind::MeshExternalService { spec, .. } => mesh_external_service(spec, &mut v),
        Kind::HostnameGenerator(spec) => hostname_generator(spec, &mut v),
        Kind::Dataplane(spec) => dataplane(spec, &mut v),
        Kind::Policy(policy) => super::policy::validate(policy, &r.meta, &mut v),
        Kind::Route(route) => {
            super::route::validate(route, &mut v);
            let to = route.spec.to.iter().flatten().map(|to| &to.target_ref);
            if let Some(message) = super::policy::Role::refused(&r.meta, to, false) {
                v.error("spec.to", message);
            }
        }
        Kind::Mesh(_) | Kind::Secret(_) => {}
    }
}

pub(super) struct Violations<'a> {
    origin: &'a super::Origin,
    out: &'a mut Diagnostics,
}

impl Violations<'_> {
    pub(super) fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Diagnostic::error(self.origin, path, message));
    }

    pub(super) fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Diagnostic::warning(self.origin, path, message));
    }
}

fn one_of(field: &str, allowed: &[&str]) -> String {
    let quoted: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    format!("\"{field}\" must be one of [{}]", quoted.join(", "))
}

fn valid_port(port: i64) -> bool {
    (1..=65535).contains(&port)
}

fn mesh_external_service(spec: &MeshExternalServiceSpec, v: &mut Violations<'_>) {
    let m = spec.match_.clone().unwrap_or_default();
    let match_type = m.type_.as_deref().unwrap_or("HostnameGenerator");
    if match_type != "HostnameGenerator" {
        v.error("spec.match.type", format!("unrecognized type '{match_type}' - only 'HostnameGenerator' is supported"));
    }
    if !m.port.is_some_and(valid_port) {
        v.error("spec.match.port", "port must be a valid (1-65535)");
    }
    if !PROTOCOLS.contains(&m.protocol.as_deref().unwrap_or("tcp")) {
        v.error("spec.match.protocol", one_of("protocol", &PROTOCOLS));
    }

    if let Some(ext) = &spec.extension {
        if ext.type_.is_empty() {
            v.error("spec.extension.type", "must not be empty");
        }
        return; // the extension validates endpoints and tls itself
    }
    if spec.endpoints.is_empty() {
        v.error("spec.endpoints", "must not be empty");
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        endpoint(i, ep, v);
    }
    if let Some(tls) = &spec.tls {
        self::tls(tls, v);
    }
}

fn endpoint(i: usize, ep: &super::kinds::EndpointSpec, v: &mut Violations<'_>) {
    let at = |field: &str| format!("spec.endpoints[{i}].{field}");
    let address = ep.address.as_deref().unwrap_or_default();
    if let Some(path) = address.strip_prefix(UNIX_SCHEME) {
        if !path.starts_with('/') || path.len() < 2 {
            v.error(at("address"), "unix socket path must be absolute, e.g. unix:///run/app.sock");
        } else if path.split('/').any(|c| c == "..") {
            v.error(at("address"), "unix socket path must not contain '..' components");
        }
        if ep.port.is_some() {
            v.warning(at("port"), "is ignored when endpoint is a unix path");
        }
    } else if address.parse::<IpAddr>().is_ok() || is_dns_name(address) {
        let kind = if address.parse::<IpAddr>().is_ok() { "an IP" } else { "a hostname" };
        match ep.port {
            None => v.error(at("port"), format!("must be defined when endpoint is {kind}")),
            Some(p) if !valid_port(p) => v.error(at("port"), "port must be a valid (1-65535)"),
            Some(_) => {}
        }
    } else {
        v.error(at("address"), "address has to be a valid IP or hostname");
    }
    if let Some(priority) = ep.priority {
        if !(0..=MAX_PRIORITY).contains(&priority) {
            v.error(at("priority"), format!("must be between 0 and {MAX_PRIORITY}"));
        }
    }
}

fn tls(tls: &TlsSpec, v: &mut Violations<'_>) {
    if tls.allow_renegotiation {
        v.warning(
            "spec.tls.allowRenegotiation",
            "mesh-egress (rustls) never renegotiates TLS; the setting has no effect",
        );
    }
    if let Some(version) = &tls.version {
        let min = version.min.as_deref();
        let max = version.max.as_deref();
        let min_ok = check_version("min", min, v);
        let max_ok = check_version("max", max, v);
        // TLSAuto is no bound (Kuma ranks it with TLS10 and so rejects `min: TLS13, max: TLSAuto`).
        if let (true, true, Some(min), Some(max)) = (min_ok, max_ok, min, max) {
            if min != "TLSAuto" && max != "TLSAuto" && version_order(min) > version_order(max) {
                v.error("spec.tls.version.min", "min version must be lower than max");
            }
        }
        if let Some(old @ ("TLS10" | "TLS11")) = min {
            v.warning(
                "spec.tls.version.min",
                format!("{old} is below what rustls speaks; TLS12 is used as the minimum"),
            );
        }
        if let Some(old @ ("TLS10" | "TLS11")) = max {
            v.error(
                "spec.tls.version.max",
                format!(
                    "{old} is not supported: mesh-egress (rustls) speaks TLS 1.2 and 1.3 only; use TLS12 or higher"
                ),
            );
        }
    }
    let Some(ver) = &tls.verification else { return };
    if let Some(mode) = &ver.mode {
        if !MODES.contains(&mode.as_str()) {
            v.error("spec.tls.verification.mode", one_of("mode", &MODES));
        }
    }
    if let Some(name) = &ver.server_name {
        if !is_dns_name(name) {
            v.error("spec.tls.verification.serverName", "must be a valid DNS name");
        }
    }
    for (i, san) in ver.subject_alt_names.iter().enumerate() {
        if !SAN_TYPES.contains(&san.type_.as_deref().unwrap_or("Exact")) {
            v.error(format!("spec.tls.verification.subjectAltNames[{i}].type"), one_of("type", &SAN_TYPES));
        }
        if san.value.is_empty() {
            v.error(format!("spec.tls.verification.subjectAltNames[{i}].value"), "must not be empty");
        } else if san.type_.as_deref() == Some("Prefix") && !san.value.ends_with(['.', '-']) {
            // Kuma's rule (a raw string prefix, as its Envoy config) stays; say what it accepts.
            v.warning(
                format!("spec.tls.verification.subjectAltNames[{i}].value"),
                format!(
                    "prefix '{0}' does not end at a label boundary ('.' or '-'): it also accepts names such as '{0}.evil.example'",
                    san.value
                ),
            );
        }
    }
    match (&ver.client_cert, &ver.client_key) {
        (Some(_), None) => v.error("spec.tls.verification.clientKey", "must be defined when clientCert is defined"),
        (None, Some(_)) => v.error("spec.tls.verification.clientCert", "must be defined when clientKey is defined"),
        _ => {}
    }
    for (field, source) in [("caCert", &ver.ca_cert), ("clientCert", &ver.client_cert), ("clientKey", &ver.client_key)]
    {
        if let Some(source) = source {
            data_source(&format!("spec.tls.verification.{field}"), source, v);
        }
    }
}

fn check_version(field: &str, value: Option<&str>, v: &mut Violations<'_>) -> bool {
    match value {
        Some(value) if !TLS_VERSIONS.contains(&value) => {
            v.error(format!("spec.tls.version.{field}"), one_of(field, &TLS_VERSIONS));
            false
        }
        _ => true,
    }
}

fn version_order(v: &str) -> usize {
    TLS_VERSIONS.iter().position(|&known| known == v).unwrap_or(0)
}

fn data_source(path: &str, source: &DataSource, v: &mut Violations<'_>) {
    let set = [&source.inline, &source.inline_string, &source.secret].into_iter().flatten().count();
    if set != 1 {
        v.error(path, "exactly one of inline, inlineString or secret must be defined");
    }
    if let Some(inline) = &source.inline {
        use base64::Engine as _;
        if let Err(e) = base64::engine::general_purpose::STANDARD.decode(inline.trim()) {
            v.error(format!("{path}.inline"), format!("must be base64: {e}"));
        }
    }
    if source.secret.as_deref() == Some("") {
        v.error(format!("{path}.secret"), "must not be empty");
    }
}

fn hostname_generator(spec: &HostnameGeneratorSpec, v: &mut Violations<'_>) {
    let s = &spec.selector;
    let kinds = [&s.mesh_service, &s.mesh_external_service, &s.mesh_multi_zone_service].into_iter().flatten().count();
    if kinds != 1 {
        v.error(
            "spec.selector",
            "exactly one of meshService, meshExternalService or meshMultiZoneService must be defined",
        );
    }
    if spec.template.is_empty() {
        v.error("spec.template", "must not be empty");
    } else if let Err(e) = Template::parse(&spec.template) {
        v.error("spec.template", format!("couldn't parse template: {e}"));
    }
}

fn dataplane(spec: &DataplaneSpec, v: &mut Violations<'_>) {
    for (i, outbound) in spec.networking.outbound.iter().enumerate() {
        let at = |field: &str| format!("networking.outbound[{i}].{field}");
        if !outbound.port.is_some_and(valid_port) {
            v.error(at("port"), "port must be a valid (1-65535)");
        }
        if let Some(address) = &outbound.address {
            if address.parse::<IpAddr>().is_err() {
                v.error(at("address"), "address has to be a valid IP address");
            }
        }
        match &outbound.backend_ref {
            None => v.warning(at("backendRef"), "not defined: only backendRef outbounds are used by mesh-egress"),
            Some(r) if r.kind != "MeshExternalService" => v.warning(
                at("backendRef.kind"),
                format!("{} outbounds are not handled by mesh-egress; skipped", r.kind),
            ),
            Some(r) if r.name.is_empty() => v.error(at("backendRef.name"), "must not be empty"),
            Some(_) => {}
        }
    }
}

/// A DNS name as Kuma's validator accepts it (any case, 253 octets, labels of 63).
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 || name.parse::<IpAddr>().is_ok() {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// A lowercase RFC 1123 name, as generated hostnames must be.
pub fn is_lowercase_rfc1123(name: &str) -> bool {
    !name.bytes().any(|b| b.is_ascii_uppercase() || b == b'_') && is_dns_name(name) && !name.ends_with('.')
}
