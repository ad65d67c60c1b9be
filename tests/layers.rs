//! The module graph has no cycles: every `crate::` path in `src/` names a module listed before
//! its own in `mesh_egress::LAYERS` (or its own), and every module is listed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/proxy/http.rs` → `proxy`); `None` for the crate
/// roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).unwrap().components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The modules named by `crate::<name>` in code (comments and doc comments excluded).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            // `crate::{a, b::c}` names several modules.
            let group = match rest.strip_prefix('{') {
                Some(inner) => inner.split('}').next().unwrap_or(""),
                None => rest,
            };
            for path in group.split(',') {
                let name: String = path.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
                if !rest.starts_with('{') {
                    break;
                }
            }
        }
    }
    out
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let rank = |m: &str| mesh_egress::LAYERS.iter().position(|l| *l == m);
    let mut modules = BTreeSet::new();
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        let own = rank(&module).unwrap_or_else(|| panic!("module `{module}` ({}) is not in LAYERS", file.display()));
        modules.insert(module.clone());
        for used in imports(&std::fs::read_to_string(file).unwrap()) {
            match rank(&used) {
                Some(r) if r <= own => {}
                Some(_) => violations.push(format!("{}: `{module}` uses `{used}`, a layer above it", file.display())),
                None => violations.push(format!("{}: `crate::{used}` is not a module in LAYERS", file.display())),
            }
        }
    }
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
    let listed: BTreeSet<String> = mesh_egress::LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, modules, "LAYERS lists exactly the crate's modules");
}

#[test]
fn the_checker_sees_imports_in_code_only() {
    let text = "use crate::live::Live;\n/// see [`crate::server`]\nlet x = crate::metrics::metrics(); // crate::admin\nuse crate::{dns, tls::X};\n";
    assert_eq!(imports(text).into_iter().collect::<Vec<_>>(), ["dns", "live", "metrics", "tls"]);
}
