//! Kuma resources: reading files in either spelling, and validating them with Kuma's messages.
//!
//! Pure: no sockets, no clocks. The output is a list of typed resources plus every diagnostic of
//! the load, so a caller can report all problems at once.

mod diagnostic;
pub mod egress;
pub mod kinds;
mod load;
pub mod policy;
pub mod route;
pub mod trace;
mod validate;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use kinds::Labels;
pub use load::{load_paths, load_str};
pub use validate::{is_dns_name, is_lowercase_rfc1123};

pub const DEFAULT_MESH: &str = "default";
pub const LABEL_DISPLAY_NAME: &str = "kuma.io/display-name";
pub const LABEL_NAMESPACE: &str = "k8s.kuma.io/namespace";
pub const LABEL_ZONE: &str = "kuma.io/zone";
pub const LABEL_MESH: &str = "kuma.io/mesh";
pub const LABEL_ORIGIN: &str = "kuma.io/origin";
pub const LABEL_POLICY_ROLE: &str = "kuma.io/policy-role";
/// Kuma's system namespace on Kubernetes: policies there apply mesh-wide.
pub const SYSTEM_NAMESPACE: &str = "kuma-system";

/// Where a resource came from: the file and the line its document starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: Option<usize>,
}

impl Origin {
    /// A command-line flag, for what it says about the configuration.
    pub fn flag(name: &str) -> Self {
        Self { file: Arc::from(Path::new(name)), line: None }
    }
}

/// What every resource has, whatever its spelling.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub name: String,
    pub mesh: String,
    pub labels: Labels,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    MeshExternalService {
        spec: kinds::MeshExternalServiceSpec,
        /// `status.vip.ip` from the input, kept as the service's VIP.
        status_vip: Option<IpAddr>,
    },
    HostnameGenerator(kinds::HostnameGeneratorSpec),
    Mesh(kinds::MeshSpec),
    Secret(Vec<u8>),
    Dataplane(kinds::DataplaneSpec),
    Policy(policy::Policy),
    Route(route::Route),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub meta: Meta,
    pub kind: Kind,
}

impl Kind {
    /// The resource's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::MeshExternalService { .. } => "MeshExternalService",
            Self::HostnameGenerator(_) => "HostnameGenerator",
            Self::Mesh(_) => "Mesh",
            Self::Secret(_) => "Secret",
            Self::Dataplane(_) => "Dataplane",
            Self::Policy(p) => p.kind.as_str(),
            Self::Route(r) => r.kind.as_str(),
        }
    }
}

/// The result of reading configuration: valid resources and everything said about the input.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Resource>,
    pub diagnostics: Diagnostics,
}

/// A `RegularExpression` match value as Envoy's RE2 `FullMatch`: the whole value must match.
/// Validation and matching both compile it here, so a value that loads always compiles to the
/// same whole-value test. The value must be a regular expression alone too: anchored only,
/// `(?x)/admin # comment` (its comment swallows the anchors) failed at matching, and
/// `/admin)|(.*` (balanced only by the anchors' group) would match every path.
pub fn full_match_regex(value: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(value)?;
    regex::Regex::new(&format!("^(?:{value})$"))
}

/// [`full_match_regex`] over bytes, for header values, which need not be UTF-8: it may name
/// bytes that are not UTF-8 (`(?-u:\xe9)`).
pub fn full_match_bytes_regex(value: &str) -> Result<regex::bytes::Regex, regex::Error> {
    regex::bytes::Regex::new(value)?;
    regex::bytes::Regex::new(&format!("^(?:{value})$"))
}
