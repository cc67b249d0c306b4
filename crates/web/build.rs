//! Rebuild this crate when the built web assets change.
//!
//! `rust-embed` reads `web/dist` while the crate compiles and `include_bytes!`
//! each file it finds, so cargo notices a changed file but never a new one
//! (Vite names assets by their content hash), nor `web/dist` appearing after
//! a build without it. Watching the directory covers both. When it does not
//! exist yet, `web/` itself is watched (its own mtime changes when `dist` is
//! created), so a later `npm run build` is picked up by the next
//! `cargo build`. The scripts skip `npm run build` when the sources did not
//! change, so an unchanged playground never costs a relink.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let web = manifest.join("../../web");
    let dist = web.join("dist");
    if dist.join("index.html").is_file() {
        println!("cargo:rerun-if-changed={}", dist.display());
    } else {
        println!("cargo:rerun-if-changed={}", web.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}
