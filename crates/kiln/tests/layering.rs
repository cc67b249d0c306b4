//! The arrows run one way. Between crates: `server` → `mcp` → `sessions` →
//! `kernel`/`sandbox`/`runtime`/`store` → `protocol`, never back. Inside
//! `sessions` and `server`: no module imports a module that imports it
//! back. Read from the sources, so a new back-edge fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

/// The `kiln-*` crates a crate's Cargo.toml depends on (normal dependencies).
fn kiln_dependencies(krate: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(common::repo().join("crates").join(krate).join("Cargo.toml")).unwrap();
    let mut deps = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[dependencies]" {
            if let Some(name) = line.split(['.', ' ', '=']).next().and_then(|n| n.strip_prefix("kiln-")) {
                deps.insert(name.to_string());
            }
        }
    }
    assert!(text.contains(&format!("name = \"kiln-{krate}\"")), "not kiln-{krate}'s manifest");
    deps
}

#[test]
fn lower_crates_never_depend_on_higher_ones() {
    // The reader finds what is there.
    assert!(kiln_dependencies("sessions").contains("kernel"));
    // Each crate with the crates it must never depend on.
    let above: &[(&str, &[&str])] = &[
        ("protocol", &["server", "sessions", "kernel", "sandbox", "runtime", "store", "mcp", "client"]),
        ("kernel", &["server", "sessions", "mcp"]),
        ("sandbox", &["server", "sessions", "kernel", "mcp"]),
        ("runtime", &["server", "sessions", "kernel", "mcp"]),
        ("store", &["server", "sessions", "kernel", "sandbox", "runtime", "mcp"]),
        ("sessions", &["server", "mcp", "client"]),
        ("mcp", &["server"]),
        ("server", &["client"]),
    ];
    for (krate, forbidden) in above {
        let deps = kiln_dependencies(krate);
        for f in *forbidden {
            assert!(!deps.contains(*f), "kiln-{krate} depends on kiln-{f}, a crate above it");
        }
    }
}

/// For each module of a crate's `src/` (non-test code), the sibling
/// modules it names through `crate::` or `super::`.
fn module_imports(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let dir = common::repo().join("crates").join(krate).join("src");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let mut uses = BTreeSet::new();
        for prefix in ["crate::", "super::"] {
            for (i, _) in code.match_indices(prefix) {
                let rest = &code[i + prefix.len()..];
                let module: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !module.is_empty() && module != name {
                    uses.insert(module);
                }
            }
        }
        out.insert(name, uses);
    }
    out
}

#[test]
fn no_module_of_sessions_or_server_imports_one_that_imports_it_back() {
    for krate in ["sessions", "server"] {
        let imports = module_imports(krate);
        assert!(imports.len() > 5, "{krate}: {imports:?}");
        for (a, uses) in &imports {
            for b in uses {
                let back = imports.get(b).is_some_and(|u| u.contains(a));
                assert!(!back, "in kiln-{krate}, {a} and {b} import each other");
            }
        }
    }
}
