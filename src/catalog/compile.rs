//! Compiling loaded resources into a [`Catalog`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::extension::Registry;
use super::material::{self, Secrets};
use super::{
    Access, Catalog, ClientIdentity, Condition, Endpoint, EndpointAddress, Ipam, Outbound, Protocol, SanMatch, Service,
    TlsPolicy, TlsVersion, VerificationMode,
};
use crate::policy::routes::{Backend, ServiceRoutes};
use crate::policy::{selects_service, PolicySet, Target as PolicyTarget};
use crate::resources::kinds::{HostnameGeneratorSpec, MeshExternalServiceSpec, TlsSpec};
use crate::resources::policy::TargetRef;
use crate::resources::{
    Diagnostic, Diagnostics, Kind, Meta, Origin, Resource, LABEL_DISPLAY_NAME, LABEL_NAMESPACE, LABEL_ZONE,
};
use crate::template::{Template, Values};

/// Kuma's default template for MeshExternalService hostnames.
pub(super) const DEFAULT_TEMPLATE: &str = "{{ .DisplayName }}.extsvc.mesh.local";
pub(super) const DEFAULT_GENERATOR_NAME: &str = "builtin-default";
/// Kuma's variable naming a CA file that stands in for the OS trust store.
pub const SYSTEM_CA_ENV: &str = "KUMA_DATAPLANE_RUNTIME_DYNAMIC_SYSTEM_CA_PATH";

#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The local zone, for `{{ .Zone }}` when a service has no `kuma.io/zone` label.
    pub zone: String,
    /// Apply [`DEFAULT_TEMPLATE`] when no HostnameGenerator is configured.
    pub default_hostnames: bool,
    pub extensions: Registry,
    /// CA file standing in for the OS store (`KUMA_DATAPLANE_RUNTIME_DYNAMIC_SYSTEM_CA_PATH`).
    pub system_ca_file: Option<PathBuf>,
    /// The Dataplane this sidecar serves (`--dataplane`); `None`: every Dataplane in the
    /// configuration, and in each mesh the only one as the workload.
    pub dataplane: Option<String>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            zone: String::new(),
            default_hostnames: true,
            extensions: Registry::default(),
            system_ca_file: None,
            dataplane: None,
        }
    }
}

impl CompileOptions {
    /// Defaults plus what Kuma's environment variables set.
    pub fn from_env() -> Self {
        let system_ca_file = std::env::var_os(SYSTEM_CA_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self { system_ca_file, ..Self::default() }
    }
}

/// A catalog and what was found while building it. With any error diagnostic the configuration
/// must not be used; a broken service (see [`Service::broken`]) only takes itself out.
#[derive(Debug)]
pub struct Compiled {
    pub catalog: Catalog,
    pub diagnostics: Diagnostics,
}

struct Generator {
    name: String,
    template: Template,
    spec: HostnameGeneratorSpec,
}

pub fn compile(resources: &[Resource], options: &CompileOptions, ipam: &mut Ipam) -> Compiled {
    let mut diagnostics = Diagnostics::default();
    let mut secrets = Secrets::new();
    let mut forbidden_meshes = Vec::new();
    let mut generators = Vec::new();
    let mut services: Vec<(&Meta, &MeshExternalServiceSpec, Option<IpAddr>)> = Vec::new();
    // A name is a resource's identity within its type, mesh and namespace, as in Kuma's store:
    // a second one (a file copied into a subdirectory, say) is an error, not a silent override
    // or a policy applied twice. MeshExternalServices are checked with their VIPs below.
    let mut seen: HashMap<(&str, &str, Option<&str>, &str), &Meta> = HashMap::new();
    for r in resources {
        let type_name = r.kind.type_name();
        if !matches!(r.kind, Kind::MeshExternalService { .. }) {
            let namespace = r.meta.labels.get(crate::resources::LABEL_NAMESPACE).map(String::as_str);
            match seen.entry((type_name, &r.meta.mesh, namespace, &r.meta.name)) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    let first = &first.get().origin;
                    let message = format!(
                        "duplicate {type_name} {}/{}: already defined in {}:{}",
                        r.meta.mesh,
                        r.meta.name,
                        first.file.display(),
                        first.line.unwrap_or(0)
                    );
                    diagnostics.push(Diagnostic::error(&r.meta.origin, "name", message));
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(&r.meta);
                }
            }
        }
        match &r.kind {
            Kind::Secret(data) => {
                secrets.insert((r.meta.mesh.clone(), r.meta.name.clone()), data.clone());
            }
            Kind::Mesh(spec) if spec.routing.default_forbid_mesh_external_service_access => {
                forbidden_meshes.push(r.meta.name.as_str());
            }
            Kind::HostnameGenerator(spec) if spec.selector.mesh_external_service.is_some() => {
                // Validation already reported a template that does not parse.
                if let Ok(template) = Template::parse(&spec.template) {
                    generators.push(Generator { name: r.meta.name.clone(), template, spec: spec.clone() });
                }
            }
            Kind::MeshExternalService { spec, status_vip } => services.push((&r.meta, spec, *status_vip)),
            _ => {}
        }
    }
    if generators.is_empty() && options.default_hostnames {
        if let Ok(template) = Template::parse(DEFAULT_TEMPLATE) {
            generators.push(Generator {
                name: DEFAULT_GENERATOR_NAME.to_string(),
                template,
                spec: HostnameGeneratorSpec::default(),
            });
        }
    }

    // Kuma's order: file order, then name. `resources` is in file order already.
    let file_rank = file_ranks(resources);
    services.sort_by(|a, b| (file_rank[&*a.0.origin.file], &a.0.name).cmp(&(file_rank[&*b.0.origin.file], &b.0.name)));

    let mut catalog = Catalog::default();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    // Addresses asked for are taken before any is handed out: an earlier service without one
    // must not get the address a later one asks for.
    ipam.clear_requests();
    for (meta, _, requested) in &services {
        if let Some(ip) = requested {
            ipam.reserve(&format!("{}/{}", meta.mesh, meta.name), *ip);
        }
    }
    for (meta, spec, status_vip) in services {
        let key = format!("{}/{}", meta.mesh, meta.name);
        if let Some(&first) = by_key.get(&key) {
            let first = &catalog.services[first].origin;
            let message = format!(
                "duplicate MeshExternalService {key}: already defined in {}:{}",
                first.file.display(),
                first.line.unwrap_or(0)
            );
            diagnostics.push(Diagnostic::error(&meta.origin, "name", message));
            continue;
        }
        let mut service = service(meta, spec, options, &secrets);
        service.vip = ipam.assign(&key, status_vip);
        if service.vip.is_none() && service.broken.is_none() {
            service.broken =
                Some(format!("could not allocate vip for MeshExternalService {}: No addresses left", meta.name));
        }
        by_key.insert(key, catalog.services.len());
        catalog.services.push(Arc::new(service));
    }

    apply_policies(resources, options, &forbidden_meshes, &mut catalog, &mut diagnostics);
    assign_hostnames(&mut catalog, &generators, options);
    index_vips(&mut catalog, &mut diagnostics);
    outbounds(resources, &mut catalog, &by_key, &mut diagnostics);
    Compiled { catalog, diagnostics }
}

fn file_ranks(resources: &[Resource]) -> HashMap<&Path, usize> {
    let mut ranks = HashMap::new();
    for r in resources {
        let next = ranks.len();
        ranks.entry(&*r.meta.origin.file).or_insert(next);
    }
    ranks
}

fn service(meta: &Meta, spec: &MeshExternalServiceSpec, options: &CompileOptions, secrets: &Secrets) -> Service {
    let m = spec.match_.clone().unwrap_or_default();
    let mut broken = None;
    let extension = spec.extension.as_ref().map(|e| e.type_.clone());
    if let Some(ext) = &spec.extension {
        broken = options.extensions.check(&ext.type_, ext.config.as_ref()).err();
    }
    let tls = match spec.tls.as_ref().filter(|t| t.enabled && spec.extension.is_none()) {
        Some(tls) => match tls_policy(tls, &meta.mesh, secrets) {
            Ok(policy) => Some(policy),
            Err(reason) => {
                broken = broken.or(Some(reason));
                None
            }
        },
        None => None,
    };
    let protocol = m.protocol.as_deref().and_then(Protocol::parse).unwrap_or(Protocol::Tcp);
    Service {
        name: meta.name.clone(),
        mesh: meta.mesh.clone(),
        display_name: meta.labels.get(LABEL_DISPLAY_NAME).cloned().unwrap_or_else(|| meta.name.clone()),
        namespace: meta.labels.get(LABEL_NAMESPACE).cloned().unwrap_or_default(),
        labels: meta.labels.clone(),
        origin: meta.origin.clone(),
        port: m.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
        protocol,
        endpoints: spec.endpoints.iter().filter_map(endpoint).collect(),
        tls,
        extension,
        access: Access::Allowed,
        access_by: None,
        vip: None,
        hostnames: Vec::new(),
        conditions: Vec::new(),
        broken,
        policies: Arc::default(),
        routes: None,
    }
}

/// Merges the policies that apply to each service into it.
fn apply_policies(
    resources: &[Resource],
    options: &CompileOptions,
    forbidden_meshes: &[&str],
    catalog: &mut Catalog,
    diagnostics: &mut Diagnostics,
) {
    let set = PolicySet::new(resources, options.dataplane.as_deref());
    if let Some(name) = &options.dataplane {
        if !resources.iter().any(|r| matches!(r.kind, Kind::Dataplane(_)) && &r.meta.name == name) {
            diagnostics.push(Diagnostic::warning(
                &Origin::flag("--dataplane"),
                "",
                format!(
                    "no Dataplane named {name} in the configuration: policies that select Dataplanes select nothing"
                ),
            ));
        }
    }
    for mesh in set.workload_unknown() {
        diagnostics.push(Diagnostic::warning(
            &Origin::flag("--dataplane"),
            "",
            format!("mesh {mesh} has several Dataplanes: name this sidecar's with --dataplane, or MeshTrafficPermission items that select Dataplanes, services or subsets match none"),
        ));
    }
    let origin_of = |policy: &str| {
        resources
            .iter()
            .find(|r| matches!(r.kind, Kind::Policy(_)) && format!("{}/{}", r.meta.mesh, r.meta.name) == policy)
            .map(|r| r.meta.origin.clone())
    };
    let targets: Vec<PolicyTarget<'_>> = catalog.services.iter().map(|s| target(s)).collect();
    diagnostics.extend(set.check_references(&targets, origin_of).0);
    let effective: Vec<_> =
        catalog.services.iter().map(|s| set.effective(&target(s), &s.origin, diagnostics)).collect();
    let route_set = set.routes(resources);
    let routes: Vec<ServiceRoutes> = catalog
        .services
        .iter()
        .map(|s| route_set.for_service(&target(s), s.protocol != Protocol::Tcp, diagnostics))
        .collect();
    let access: Vec<_> =
        catalog.services.iter().map(|s| set.access(&target(s), forbidden_meshes.contains(&s.mesh.as_str()))).collect();
    for (index, ((mut routes, effective), access)) in routes.into_iter().zip(effective).zip(access).enumerate() {
        resolve_backends(catalog, index, &mut routes, diagnostics);
        let protocol = catalog.services[index].protocol;
        for rule in routes.http.iter_mut().flat_map(|table| table.rules.iter_mut()) {
            rule.policies = set.route_level(&rule.route, protocol).map(Arc::new);
        }
        let service = Arc::make_mut(&mut catalog.services[index]);
        service.access = access.access;
        service.access_by = access.by;
        if !effective.is_empty() {
            service.policies = Arc::new(effective);
        }
        if routes.http.is_some() || routes.tcp.is_some() {
            service.routes = Some(Arc::new(routes));
        }
    }
    catalog.ignored_policies = set.ignored().iter().chain(&route_set.ignored).cloned().collect();
    catalog.passthrough = Arc::new(set.passthrough().clone());
    catalog.passthrough_access_log = set.passthrough_access_log();
}

/// Points each route backend at the catalog's service it names (same mesh, by name or labels).
/// HTTP routes split only to HTTP-family services (as Kuma); a backend that names nothing
/// usable is reported and gets no traffic.
fn resolve_backends(catalog: &Catalog, index: usize, routes: &mut ServiceRoutes, diagnostics: &mut Diagnostics) {
    let owner = &catalog.services[index];
    let find = |backend: &mut Backend, http: bool, diagnostics: &mut Diagnostics| {
        let r = &backend.reference;
        let found = catalog.services.iter().position(|s| {
            s.mesh == owner.mesh
                && r.kind == "MeshExternalService"
                && selects_service(
                    &TargetRef {
                        name: r.name.clone(),
                        namespace: r.namespace.clone(),
                        labels: r.labels.clone(),
                        ..TargetRef::default()
                    },
                    None,
                    &target(s),
                )
        });
        let problem = match found {
            None => Some(format!(
                "backendRef {} {} names no MeshExternalService of mesh {}",
                r.kind,
                r.name.as_deref().unwrap_or("(by labels)"),
                owner.mesh
            )),
            Some(i) if http && catalog.services[i].protocol == Protocol::Tcp => Some(format!(
                "backendRef {} is a tcp service: an HTTP route splits only to http, http2 and grpc services",
                catalog.services[i].key()
            )),
            Some(_) => None,
        };
        match problem {
            Some(message) => {
                let about = format!("MeshExternalService {}", owner.key());
                diagnostics.push(Diagnostic::warning(&owner.origin, "routes", message).about(about));
            }
            None => backend.service = found,
        }
    };
    if let Some(http) = routes.http.as_mut() {
        for backend in http.backends_mut() {
            find(backend, true, diagnostics);
        }
    }
    if let Some(tcp) = routes.tcp.as_mut() {
        for backend in &mut tcp.backends {
            find(backend, false, diagnostics);
        }
    }
}

fn target(s: &Service) -> PolicyTarget<'_> {
    PolicyTarget {
        mesh: &s.mesh,
        name: &s.name,
        display_name: &s.display_name,
        namespace: &s.namespace,
        labels: &s.labels,
    }
}

fn endpoint(spec: &crate::resources::kinds::EndpointSpec) -> Option<Endpoint> {
    let address = spec.address.as_deref()?;
    let priority = spec.priority.and_then(|p| u8::try_from(p).ok()).unwrap_or(0);
    if let Some(path) = address.strip_prefix("unix://") {
        return Some(Endpoint { address: EndpointAddress::Unix(PathBuf::from(path)), port: 0, priority });
    }
    let port = u16::try_from(spec.port?).ok()?;
    let address = match address.parse::<IpAddr>() {
        Ok(ip) => EndpointAddress::Ip(ip),
        Err(_) => EndpointAddress::Dns(address.trim_end_matches('.').to_ascii_lowercase()),
    };
    Some(Endpoint { address, port, priority })
}

/// Builds the TLS settings; the error names the field (`spec.tls.verification.caCert: ...`).
fn tls_policy(tls: &TlsSpec, mesh: &str, secrets: &Secrets) -> Result<TlsPolicy, String> {
    let version = tls.version.clone().unwrap_or_default();
    let bound = |v: Option<&str>, auto: TlsVersion| match v {
        Some("TLS13") => TlsVersion::Tls13,
        Some("TLS10" | "TLS11" | "TLS12") => TlsVersion::Tls12,
        _ => auto,
    };
    let ver = tls.verification.clone().unwrap_or_default();
    let mode = match ver.mode.as_deref() {
        Some("SkipSAN") => VerificationMode::SkipSAN,
        Some("SkipCA") => VerificationMode::SkipCA,
        Some("SkipAll") => VerificationMode::SkipAll,
        _ => VerificationMode::Secured,
    };
    let field = |name: &str, e: String| format!("spec.tls.verification.{name}: {e}");
    let ca = ver
        .ca_cert
        .as_ref()
        .map(|s| material::certificates(s, mesh, secrets).map_err(|e| field("caCert", e)))
        .transpose()?;
    let client = match (&ver.client_cert, &ver.client_key) {
        (Some(cert), Some(key)) => Some(ClientIdentity {
            chain: material::certificates(cert, mesh, secrets).map_err(|e| field("clientCert", e))?,
            key: material::private_key(key, mesh, secrets).map_err(|e| field("clientKey", e))?,
        }),
        _ => None,
    };
    Ok(TlsPolicy {
        min: bound(version.min.as_deref(), TlsVersion::Tls12),
        max: bound(version.max.as_deref(), TlsVersion::Tls13),
        mode,
        server_name: ver.server_name.map(|n| n.trim_end_matches('.').to_ascii_lowercase()),
        subject_alt_names: ver
            .subject_alt_names
            .into_iter()
            .map(|san| match san.type_.as_deref() {
                Some("Prefix") => SanMatch::Prefix(san.value),
                _ => SanMatch::Exact(san.value),
            })
            .collect(),
        ca,
        client,
    })
}

/// Renders every matching generator for every service, in service order; first one wins a name.
fn assign_hostnames(catalog: &mut Catalog, generators: &[Generator], options: &CompileOptions) {
    for index in 0..catalog.services.len() {
        let service = &catalog.services[index];
        if service.vip.is_none() {
            continue; // no VIP, nothing a name could point at
        }
        let mut hostnames = Vec::new();
        let mut conditions = Vec::new();
        for g in generators.iter().filter(|g| selects(g, service)) {
            let values = Values {
                name: &service.name,
                display_name: &service.display_name,
                namespace: &service.namespace,
                mesh: &service.mesh,
                zone: service.labels.get(LABEL_ZONE).map_or(options.zone.as_str(), String::as_str),
                labels: &service.labels,
            };
            let condition = |status: &str, reason: &str, message: String| Condition {
                type_: "Generated".into(),
                status: status.into(),
                reason: reason.into(),
                message,
                generator: g.name.clone(),
            };
            let hostname = match g.template.render(&values) {
                Err(e) => {
                    conditions.push(condition("False", "TemplateError", e.to_string()));
                    continue;
                }
                Ok(h) => h,
            };
            if !crate::resources::is_lowercase_rfc1123(&hostname) {
                let message = format!("'{hostname}' is not a valid lowercase RFC 1123 DNS name");
                conditions.push(condition("False", "TemplateError", message));
                continue;
            }
            match catalog.by_hostname.get(&hostname) {
                Some(&owner) if owner != index => {
                    let message = format!("hostname {hostname} is already used by {}", catalog.services[owner].key());
                    conditions.push(condition("False", "Collision", message));
                }
                Some(_) => {} // two generators rendered the same name for this service
                None => {
                    catalog.by_hostname.insert(hostname.clone(), index);
                    conditions.push(condition("True", "Generated", hostname.clone()));
                    hostnames.push(hostname);
                }
            }
        }
        let service = Arc::make_mut(&mut catalog.services[index]);
        service.hostnames = hostnames;
        service.conditions = conditions;
    }
}

fn selects(g: &Generator, service: &Service) -> bool {
    if g.name == DEFAULT_GENERATOR_NAME {
        return true;
    }
    let Some(selector) = &g.spec.selector.mesh_external_service else { return false };
    selector.match_labels.iter().all(|(k, v)| service.labels.get(k) == Some(v))
}

fn index_vips(catalog: &mut Catalog, diagnostics: &mut Diagnostics) {
    for (index, service) in catalog.services.iter().enumerate() {
        let Some(vip) = service.vip else { continue };
        let addr = SocketAddr::new(vip, service.port);
        if let Some(&other) = catalog.by_vip.get(&addr) {
            let message = format!("VIP {addr} is already used by {}", catalog.services[other].key());
            diagnostics.push(Diagnostic::error(&service.origin, "status.vip.ip", message));
            continue;
        }
        catalog.by_vip.insert(addr, index);
    }
}

fn outbounds(
    resources: &[Resource],
    catalog: &mut Catalog,
    by_key: &HashMap<String, usize>,
    diagnostics: &mut Diagnostics,
) {
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    for r in resources {
        let Kind::Dataplane(spec) = &r.kind else { continue };
        for (i, o) in spec.networking.outbound.iter().enumerate() {
            let Some(backend) = o.backend_ref.as_ref().filter(|b| b.kind == "MeshExternalService") else { continue };
            let path = format!("networking.outbound[{i}]");
            let ip = o.address.as_deref().map_or(Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)), str::parse);
            let (Ok(ip), Some(port)) = (ip, o.port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)) else {
                continue; // reported by validation
            };
            let address = SocketAddr::new(ip, port);
            let key = format!("{}/{}", r.meta.mesh, backend.name);
            let Some(&service) = by_key.get(&key) else {
                let message = format!("MeshExternalService {key} is not defined");
                diagnostics.push(Diagnostic::error(&r.meta.origin, format!("{path}.backendRef.name"), message));
                continue;
            };
            let owner = format!("Dataplane {}/{} {path}", r.meta.mesh, r.meta.name);
            if let Some(first) = seen.insert(address, owner.clone()) {
                let message = format!("address {address} is already used by {first}");
                diagnostics.push(Diagnostic::error(&r.meta.origin, path, message));
                continue;
            }
            catalog.outbounds.push(Outbound { address, dataplane: r.meta.name.clone(), service });
        }
    }
}
