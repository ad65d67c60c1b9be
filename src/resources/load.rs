//! Reading resource files: directories, multi-document YAML/JSON, `kind: List`, both spellings.

use std::collections::HashSet;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};

use super::kinds::{
    DataplaneSpec, HostnameGeneratorSpec, KubeObject, KubeSecret, Labels, MeshExternalServiceSpec, MeshSpec,
    UniversalSecret, UniversalWithSpec,
};
use super::policy::{Policy, PolicyKind, PolicySpec};
use super::route::{Route, RouteKind, RouteSpec};
use super::validate;
use super::{Diagnostic, Kind, Loaded, Meta, Origin, Resource, DEFAULT_MESH, LABEL_MESH, LABEL_NAMESPACE};
use base64::Engine as _;

const KUMA_SECRET_TYPE: &str = "system.kuma.io/secret";
/// Envelope keys of the Universal spelling of kinds that keep their fields at the top level.
const UNIVERSAL_ENVELOPE: [&str; 6] = ["type", "name", "mesh", "labels", "creationTime", "modificationTime"];

/// Largest configuration file read (10,000 services take about 1.5 MiB).
pub(super) const MAX_FILE_BYTES: u64 = 16 << 20;
/// Deepest flow nesting (`[`, `{`) accepted: Kuma's resources need about ten levels, and the
/// YAML parser's time grows with the square of the depth.
pub(super) const MAX_NESTING: usize = 64;

/// Loads every file named, and every `*.yaml`, `*.yml` and `*.json` below the directories named,
/// in path order, then validates what was read.
pub fn load_paths(paths: &[PathBuf]) -> Loaded {
    let mut out = Loaded::default();
    for path in paths {
        let mut files = Vec::new();
        if let Err(e) = collect_files(path, &mut files, &mut HashSet::new()) {
            out.diagnostics.push(Diagnostic::file_error(path, format!("cannot read: {e}")));
            continue;
        }
        for file in files {
            match fs::metadata(&file).map(|m| m.len()) {
                Ok(size) if size > MAX_FILE_BYTES => {
                    let message = format!(
                        "is {size} bytes, more than the {} MiB a configuration file may have",
                        MAX_FILE_BYTES >> 20
                    );
                    out.diagnostics.push(Diagnostic::file_error(&file, message));
                    continue;
                }
                _ => {}
            }
            match fs::read_to_string(&file) {
                Ok(text) => load_str(&file, &text, &mut out),
                Err(e) => out.diagnostics.push(Diagnostic::file_error(&file, format!("cannot read: {e}"))),
            }
        }
    }
    out
}

/// `seen`: the directories read so far, by device and inode: a directory reached again through
/// a symlink (a loop, `a -> .`) is read once, where two such links made 2^40 paths to walk.
fn collect_files(path: &Path, files: &mut Vec<PathBuf>, seen: &mut HashSet<(u64, u64)>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path)?;
    if !meta.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        let hidden = entry.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue; // editors' swap files, Kubernetes ConfigMap `..data` links
        }
        if entry.is_dir() {
            collect_files(&entry, files, seen)?;
        } else if entry.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json")) {
            files.push(entry);
        }
    }
    Ok(())
}

/// Reads the documents of one file's text into `out`.
pub fn load_str(file: &Path, text: &str, out: &mut Loaded) {
    if let Some(line) = nesting_beyond(text, MAX_NESTING) {
        let message = format!("nesting deeper than {MAX_NESTING} levels at line {line}: not a Kuma resource");
        out.diagnostics.push(Diagnostic::file_error(file, message));
        return;
    }
    let file: Arc<Path> = Arc::from(file);
    for (doc, first_line) in split_documents(text) {
        let origin = Origin { file: file.clone(), line: Some(first_line) };
        let value: Value = match serde_norway::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                out.diagnostics.push(yaml_error(&origin, &e));
                continue;
            }
        };
        if value.is_null() {
            continue; // empty document or comments only
        }
        Document { text: Some(doc), origin, path: String::new() }.load(value, out);
    }
}

/// The line where flow collections (`[`, `{`) nest deeper than `max`, outside quotes and
/// comments; a cheap scan that spares the parser inputs built to be slow.
fn nesting_beyond(text: &str, max: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut previous = ' ';
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\n') => {
                line += 1;
                // Quoted scalars may span lines; a comment never does.
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') if previous.is_whitespace() => {
                // A comment: skip to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
                previous = ' ';
                continue;
            }
            (None, '[' | '{') => {
                depth += 1;
                if depth > max {
                    return Some(line);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
    }
    None
}

/// Splits YAML text on `---` lines; yields each document with the line its content starts on.
fn split_documents(text: &str) -> Vec<(&str, usize)> {
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current document
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed == "..." || trimmed.starts_with("--- ") {
            docs.push((&text[start..offset], start_line));
            start = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    docs.push((&text[start..], start_line));
    docs.into_iter()
        .map(|(doc, line)| {
            // From the first content on, not leading comments: the document's line, and the
            // parser's lines (counted from the text it is given) added to it, are then right.
            let skipped: Vec<&str> = doc
                .split_inclusive('\n')
                .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
                .collect();
            let bytes: usize = skipped.iter().map(|l| l.len()).sum();
            (&doc[bytes..], line + skipped.len())
        })
        .collect()
}

fn yaml_error(origin: &Origin, e: &serde_norway::Error) -> Diagnostic {
    let mut origin = origin.clone();
    let mut message = e.to_string();
    if let Some(loc) = e.location() {
        origin.line = Some(origin.line.unwrap_or(1) + loc.line() - 1);
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    // serde_norway prefixes the field path itself: "spec.tls: unknown field ..."
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => Diagnostic::error(&origin, path, rest),
        _ => Diagnostic::error(&origin, "", message),
    }
}

/// One document (or one item of a `List`) being read.
struct Document<'a> {
    /// Source text, when the document is a whole YAML document (gives line numbers on errors).
    text: Option<&'a str>,
    origin: Origin,
    /// Path prefix for `List` items, e.g. `items[2].`.
    path: String,
}

impl Document<'_> {
    fn load(&self, value: Value, out: &mut Loaded) {
        let Some(map) = value.as_mapping() else {
            out.diagnostics.push(Diagnostic::error(&self.origin, &self.path, "a resource must be a mapping"));
            return;
        };
        let kube_kind = map.get("apiVersion").and(map.get("kind")).and_then(Value::as_str);
        let universal_type = map.get("type").and_then(Value::as_str);
        if kube_kind == Some("List") {
            return self.load_list(map, out);
        }
        if let Some(kind) = kube_kind
            .or(universal_type)
            .filter(|k| !KNOWN_KINDS.contains(k) && PolicyKind::parse(k).is_none() && RouteKind::parse(k).is_none())
        {
            let message = format!("kind {kind} is not used by mesh-egress; skipped");
            out.diagnostics.push(Diagnostic::warning(&self.origin, &self.path, message));
            return;
        }
        let result = match (kube_kind, universal_type) {
            (Some(kind), _) => self.load_kube(kind, &value),
            (None, Some(kind)) => self.load_universal(kind, &value),
            (None, None) => {
                Err(self.error("", "neither `type` (Universal) nor `apiVersion` and `kind` (Kubernetes) is set"))
            }
        };
        match result {
            Ok(Some(resource)) => {
                let before = out.diagnostics.0.len();
                validate::resource(&resource, &mut out.diagnostics);
                let label = resource_label(&resource);
                for d in &mut out.diagnostics.0[before..] {
                    d.resource = Some(label.clone());
                }
                out.resources.push(resource);
            }
            Ok(None) => {}
            Err(d) => out.diagnostics.push(d),
        }
    }

    fn load_list(&self, map: &Mapping, out: &mut Loaded) {
        let items = map.get("items").and_then(Value::as_sequence).cloned().unwrap_or_default();
        for (i, item) in items.into_iter().enumerate() {
            let doc = Document { text: None, origin: self.origin.clone(), path: format!("{}items[{i}]", self.path) };
            doc.load(item, out);
        }
    }

    fn load_kube(&self, kind: &str, value: &Value) -> Result<Option<Resource>, Diagnostic> {
        if let Some(kind) = RouteKind::parse(kind) {
            let obj: KubeObject<RouteSpec> = self.typed(value)?;
            let route = Route { kind, spec: obj.spec.unwrap_or_default() };
            return Ok(Some(Resource { meta: self.kube_meta(obj.metadata), kind: Kind::Route(route) }));
        }
        if let Some(kind) = PolicyKind::parse(kind) {
            let obj: KubeObject<PolicySpec> = self.typed(value)?;
            let policy = Policy { kind, spec: obj.spec.unwrap_or_default() };
            return Ok(Some(Resource { meta: self.kube_meta(obj.metadata), kind: Kind::Policy(policy) }));
        }
        Ok(Some(match kind {
            "MeshExternalService" => {
                let obj: KubeObject<MeshExternalServiceSpec> = self.typed(value)?;
                let status_vip = self.status_vip(obj.status.as_ref())?;
                let meta = self.kube_meta(obj.metadata);
                Resource { meta, kind: Kind::MeshExternalService { spec: obj.spec.unwrap_or_default(), status_vip } }
            }
            "HostnameGenerator" => {
                let obj: KubeObject<HostnameGeneratorSpec> = self.typed(value)?;
                Resource {
                    meta: self.kube_meta(obj.metadata),
                    kind: Kind::HostnameGenerator(obj.spec.unwrap_or_default()),
                }
            }
            "Mesh" => {
                let obj: KubeObject<MeshSpec> = self.typed(value)?;
                let mut meta = self.kube_meta(obj.metadata);
                meta.mesh = meta.name.clone();
                Resource { meta, kind: Kind::Mesh(obj.spec.unwrap_or_default()) }
            }
            "Dataplane" => {
                let obj: KubeObject<DataplaneSpec> = self.typed(value)?;
                Resource { meta: self.kube_meta(obj.metadata), kind: Kind::Dataplane(obj.spec.unwrap_or_default()) }
            }
            "Secret" => {
                if value.get("type").and_then(Value::as_str) != Some(KUMA_SECRET_TYPE) {
                    return Ok(None); // not a Kuma secret: nothing to do with us
                }
                let secret: KubeSecret = self.typed(value)?;
                let data = secret.data.get("value").ok_or_else(|| self.error("data.value", "must be defined"))?;
                let bytes = self.base64(data, "data.value")?;
                Resource { meta: self.kube_meta(secret.metadata), kind: Kind::Secret(bytes) }
            }
            _ => return Ok(None),
        }))
    }

    fn load_universal(&self, kind: &str, value: &Value) -> Result<Option<Resource>, Diagnostic> {
        if let Some(kind) = RouteKind::parse(kind) {
            let r: UniversalWithSpec<RouteSpec> = self.typed(value)?;
            let route = Route { kind, spec: r.spec.unwrap_or_default() };
            let meta = universal_meta(r.name, r.mesh, r.labels, &self.origin);
            return Ok(Some(Resource { meta, kind: Kind::Route(route) }));
        }
        if let Some(kind) = PolicyKind::parse(kind) {
            let r: UniversalWithSpec<PolicySpec> = self.typed(value)?;
            let policy = Policy { kind, spec: r.spec.unwrap_or_default() };
            let meta = universal_meta(r.name, r.mesh, r.labels, &self.origin);
            return Ok(Some(Resource { meta, kind: Kind::Policy(policy) }));
        }
        Ok(Some(match kind {
            "MeshExternalService" => {
                let r: UniversalWithSpec<MeshExternalServiceSpec> = self.typed(value)?;
                let status_vip = self.status_vip(r.status.as_ref())?;
                let meta = universal_meta(r.name, r.mesh, r.labels, &self.origin);
                Resource { meta, kind: Kind::MeshExternalService { spec: r.spec.unwrap_or_default(), status_vip } }
            }
            "HostnameGenerator" => {
                let r: UniversalWithSpec<HostnameGeneratorSpec> = self.typed(value)?;
                let meta = universal_meta(r.name, r.mesh, r.labels, &self.origin);
                Resource { meta, kind: Kind::HostnameGenerator(r.spec.unwrap_or_default()) }
            }
            "Secret" => {
                let r: UniversalSecret = self.typed(value)?;
                let bytes = self.base64(&r.data, "data")?;
                Resource { meta: universal_meta(r.name, r.mesh, r.labels, &self.origin), kind: Kind::Secret(bytes) }
            }
            "Mesh" => {
                let (mut meta, fields) = self.universal_flat(value)?;
                meta.mesh = meta.name.clone();
                Resource { meta, kind: Kind::Mesh(self.deserialize_value(fields)?) }
            }
            "Dataplane" => {
                let (meta, fields) = self.universal_flat(value)?;
                Resource { meta, kind: Kind::Dataplane(self.deserialize_value(fields)?) }
            }
            _ => return Ok(None),
        }))
    }

    /// Splits a Universal Mesh/Dataplane into its envelope and its own fields.
    fn universal_flat(&self, value: &Value) -> Result<(Meta, Value), Diagnostic> {
        let mut fields = value.as_mapping().cloned().unwrap_or_default();
        let name = fields.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let mesh = fields.get("mesh").and_then(Value::as_str).map(str::to_string);
        let labels: Labels = match fields.get("labels") {
            Some(l) => serde_norway::from_value(l.clone()).map_err(|e| self.error("labels", e.to_string()))?,
            None => Labels::new(),
        };
        for key in UNIVERSAL_ENVELOPE {
            fields.remove(key);
        }
        Ok((universal_meta(name, mesh, labels, &self.origin), Value::Mapping(fields)))
    }

    fn kube_meta(&self, metadata: super::kinds::ObjectMeta) -> Meta {
        let mut labels = metadata.labels;
        let mesh = labels.get(LABEL_MESH).cloned().unwrap_or_else(|| DEFAULT_MESH.to_string());
        if let Some(ns) = metadata.namespace {
            labels.entry(LABEL_NAMESPACE.to_string()).or_insert(ns);
        }
        Meta { name: metadata.name, mesh, labels, origin: self.origin.clone() }
    }

    fn status_vip(&self, status: Option<&Value>) -> Result<Option<IpAddr>, Diagnostic> {
        let ip = status.and_then(|s| s.get("vip")).and_then(|v| v.get("ip")).and_then(Value::as_str);
        match ip {
            None | Some("") => Ok(None),
            Some(text) => {
                let ip: IpAddr =
                    text.parse().map_err(|_| self.error("status.vip.ip", format!("'{text}' is not an IP address")))?;
                // A VIP is listened on (`--bind-vips`) and answered by the DNS proxy: the
                // unspecified address would listen on every interface.
                let canonical = ip.to_canonical(); // `::ffff:0.0.0.0` too
                let broadcast = matches!(canonical, IpAddr::V4(v4) if v4.is_broadcast());
                if canonical.is_unspecified() || canonical.is_multicast() || broadcast {
                    let message = format!("'{ip}' is not usable as a VIP: it must be a unicast address");
                    return Err(self.error("status.vip.ip", message));
                }
                Ok(Some(ip))
            }
        }
    }

    fn base64(&self, data: &str, field: &str) -> Result<Vec<u8>, Diagnostic> {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| self.error(field, format!("must be base64: {e}")))
    }

    /// Deserializes the whole document. The text is parsed again only when that fails, for the
    /// error's line.
    fn typed<T: DeserializeOwned>(&self, value: &Value) -> Result<T, Diagnostic> {
        let error = match self.deserialize_value(value.clone()) {
            Ok(typed) => return Ok(typed),
            Err(error) => error,
        };
        match self.text {
            Some(text) => serde_norway::from_str(text).map_err(|e| yaml_error(&self.origin, &e)),
            None => Err(error),
        }
    }

    fn deserialize_value<T: DeserializeOwned>(&self, value: Value) -> Result<T, Diagnostic> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            self.error(&path, e.inner().to_string())
        })
    }

    fn error(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        let path = match (self.path.is_empty(), field.is_empty()) {
            (true, _) => field.to_string(),
            (false, true) => self.path.clone(),
            (false, false) => format!("{}.{field}", self.path),
        };
        Diagnostic::error(&self.origin, path, message)
    }
}

const KNOWN_KINDS: [&str; 5] = ["MeshExternalService", "HostnameGenerator", "Mesh", "Secret", "Dataplane"];

fn universal_meta(name: String, mesh: Option<String>, labels: Labels, origin: &Origin) -> Meta {
    Meta { name, mesh: mesh.unwrap_or_else(|| DEFAULT_MESH.to_string()), labels, origin: origin.clone() }
}

pub(super) fn resource_label(r: &Resource) -> String {
    let kind = match &r.kind {
        Kind::Policy(p) => p.kind.as_str(),
        Kind::Route(r) => r.kind.as_str(),
        Kind::MeshExternalService { .. } => "MeshExternalService",
        Kind::HostnameGenerator(_) => "HostnameGenerator",
        Kind::Mesh(_) => "Mesh",
        Kind::Secret(_) => "Secret",
        Kind::Dataplane(_) => "Dataplane",
    };
    format!("{kind} {}/{}", r.meta.mesh, r.meta.name)
}
