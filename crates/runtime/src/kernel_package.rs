//! kiln's own Python package in the runtime: `kiln_kernel`, the lean
//! kernel (`kiln_kernel.kernel`, run as `python -m kiln_kernel`, with its
//! modules `wire`, `streams`, `display`, `shell` and `handlers`), the
//! zygote that forks kernels (`kiln_kernel.zygote`) and the fidelity check
//! that compares the lean kernel with ipykernel (`kiln_kernel.fidelity`).
//!
//! The sources are compiled into the kiln binary and written into the
//! runtime's `site-packages` whenever they differ from what is there, so a
//! runtime built by an older kiln gets the current kernel without a
//! rebuild of its packages.

use crate::{Runtime, RuntimeError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The package's files, relative to `site-packages/kiln_kernel/`, in the
/// order they are written: the modules the entry points import first, the
/// entry points (`kernel.py`, `__main__.py`, `zygote.py`) last, so that a
/// kernel starting during an upgrade finds either the old entry point or a
/// new one whose modules are all there.
const FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../python/kiln_kernel/__init__.py")),
    ("wire.py", include_str!("../python/kiln_kernel/wire.py")),
    ("streams.py", include_str!("../python/kiln_kernel/streams.py")),
    ("display.py", include_str!("../python/kiln_kernel/display.py")),
    ("shell.py", include_str!("../python/kiln_kernel/shell.py")),
    ("handlers.py", include_str!("../python/kiln_kernel/handlers.py")),
    ("fidelity.py", include_str!("../python/kiln_kernel/fidelity.py")),
    ("kernel.py", include_str!("../python/kiln_kernel/kernel.py")),
    ("__main__.py", include_str!("../python/kiln_kernel/__main__.py")),
    ("zygote.py", include_str!("../python/kiln_kernel/zygote.py")),
];

impl Runtime {
    /// The runtime's `site-packages` directory.
    pub fn site_packages(&self) -> Result<PathBuf, RuntimeError> {
        let lib = self.root.join("lib");
        let entries =
            std::fs::read_dir(&lib).map_err(|source| RuntimeError::Io { what: "read", path: lib.clone(), source })?;
        entries.flatten().map(|e| e.path().join("site-packages")).find(|p| p.is_dir()).ok_or_else(|| RuntimeError::Io {
            what: "find site-packages in",
            path: lib,
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    /// Write the `kiln_kernel` package into the runtime where it differs.
    /// Each file is replaced atomically, so a kernel starting meanwhile sees
    /// the old file or the new one, never half of one.
    pub fn install_kernel_package(&self) -> Result<(), RuntimeError> {
        let dir = self.site_packages()?.join("kiln_kernel");
        std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        for (name, text) in FILES {
            let path = dir.join(name);
            if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
                continue;
            }
            write_atomically(&dir, &path, text.as_bytes()).map_err(|source| RuntimeError::Io {
                what: "write",
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    // Readable by the session user: the kernel runs from these files.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_source() -> &'static str {
        FILES.iter().find(|(n, _)| *n == "kernel.py").map(|(_, t)| *t).unwrap_or_default()
    }

    #[test]
    fn the_package_is_written_once_and_rewritten_when_changed() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let sp = root.path().join("lib/python3.11/site-packages");
        std::fs::create_dir_all(&sp)?;
        let rt = Runtime { root: root.path().to_path_buf(), profile: crate::Profile::Minimal };
        rt.install_kernel_package()?;
        let kernel = sp.join("kiln_kernel/kernel.py");
        assert_eq!(std::fs::read_to_string(&kernel)?, kernel_source());
        std::fs::write(&kernel, "stale")?;
        rt.install_kernel_package()?;
        assert_eq!(std::fs::read_to_string(&kernel)?, kernel_source());
        Ok(())
    }
}
