//! kiln's own Python package in the runtime: `kiln_kernel`, the lean
//! kernel (`kiln_kernel.kernel`, run as `python -m kiln_kernel`, with its
//! modules `wire`, `publisher`, `streams`, `flusher`, `display`, `shell`
//! and `handlers`), the batch tests' runner (`kiln_kernel.judge`), the
//! zygote that forks kernels (`kiln_kernel.zygote`), the relay that serves
//! Deno's TCP-only kernel on kiln's sockets (`kiln_kernel.relay`), the bash
//! kernel's launcher (`kiln_kernel.bash`) and the
//! fidelity check that compares the lean kernel with ipykernel
//! (`kiln_kernel.fidelity`).
//!
//! The sources are compiled into the kiln binary and written into the
//! runtime, in a directory named by their hash
//! (`<runtime>/kiln-kernel/<hash>/kiln_kernel`) that kernels find through
//! `PYTHONPATH`. So a runtime built by an older kiln gets the current kernel
//! without a rebuild of its packages, and two kiln versions sharing one
//! cache (an upgrade in place, a developer's checkouts) each run their own
//! kernel: neither ever overwrites the package the other is running.

use crate::{Runtime, RuntimeError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The package's files, relative to `kiln_kernel/`.
const FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../python/kiln_kernel/__init__.py")),
    ("wire.py", include_str!("../python/kiln_kernel/wire.py")),
    ("publisher.py", include_str!("../python/kiln_kernel/publisher.py")),
    ("streams.py", include_str!("../python/kiln_kernel/streams.py")),
    ("flusher.py", include_str!("../python/kiln_kernel/flusher.py")),
    ("display.py", include_str!("../python/kiln_kernel/display.py")),
    ("shell.py", include_str!("../python/kiln_kernel/shell.py")),
    ("handlers.py", include_str!("../python/kiln_kernel/handlers.py")),
    ("fidelity.py", include_str!("../python/kiln_kernel/fidelity.py")),
    ("kernel.py", include_str!("../python/kiln_kernel/kernel.py")),
    ("__main__.py", include_str!("../python/kiln_kernel/__main__.py")),
    ("zygote.py", include_str!("../python/kiln_kernel/zygote.py")),
    ("judge.py", include_str!("../python/kiln_kernel/judge.py")),
    ("workdir.py", include_str!("../python/kiln_kernel/workdir.py")),
    ("guard.py", include_str!("../python/kiln_kernel/guard.py")),
    ("forkserver.py", include_str!("../python/kiln_kernel/forkserver.py")),
    ("recorder.py", include_str!("../python/kiln_kernel/recorder.py")),
    ("testrun.py", include_str!("../python/kiln_kernel/testrun.py")),
    ("ipc.py", include_str!("../python/kiln_kernel/ipc.py")),
    ("relay.py", include_str!("../python/kiln_kernel/relay.py")),
    ("bash.py", include_str!("../python/kiln_kernel/bash.py")),
];

/// The first 12 hex digits of the SHA-256 of the package's names and
/// contents: its version, as far as the file system is concerned.
fn package_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, text) in FILES {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
    })
}

impl Runtime {
    /// The directory that holds this kiln's `kiln_kernel` package: the
    /// kernels' `PYTHONPATH`.
    pub fn kernel_package_dir(&self) -> PathBuf {
        self.root.join("kiln-kernel").join(package_hash())
    }

    /// Write this kiln's `kiln_kernel` package into the runtime, unless it
    /// is there. It is written into a scratch directory and renamed into
    /// place, so a kernel never sees half a package, and a concurrent
    /// writer of the same version simply finds it done.
    pub fn install_kernel_package(&self) -> Result<(), RuntimeError> {
        let dir = self.kernel_package_dir();
        if dir.join("kiln_kernel").join("__init__.py").is_file() {
            return Ok(());
        }
        let parent = self.root.join("kiln-kernel");
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| RuntimeError::Io { what, path, source }
        };
        std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
        let scratch = tempfile::Builder::new().prefix(".new-").tempdir_in(&parent).map_err(io("create in", &parent))?;
        let package = scratch.path().join("kiln_kernel");
        std::fs::create_dir(&package).map_err(io("create", &package))?;
        for (name, text) in FILES {
            let path = package.join(name);
            write_readable(&path, text.as_bytes()).map_err(io("write", &path))?;
        }
        // Readable by the session user, who runs the kernel from here.
        for d in [scratch.path(), package.as_path()] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(io("set permissions of", d))?;
        }
        let scratch = scratch.keep();
        match std::fs::rename(&scratch, &dir) {
            Ok(()) => Ok(()),
            // Another kiln of this version got there first.
            Err(_) if dir.join("kiln_kernel").join("__init__.py").is_file() => {
                let _ = std::fs::remove_dir_all(&scratch);
                Ok(())
            }
            Err(source) => {
                let _ = std::fs::remove_dir_all(&scratch);
                Err(RuntimeError::Io { what: "move into place", path: dir, source })
            }
        }
    }
}

fn write_readable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_source() -> &'static str {
        FILES.iter().find(|(n, _)| *n == "kernel.py").map(|(_, t)| *t).unwrap_or_default()
    }

    #[test]
    fn each_version_of_the_package_has_its_own_directory_and_is_never_rewritten(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let rt = Runtime { root: root.path().to_path_buf(), profile: crate::Profile::Minimal };
        rt.install_kernel_package()?;
        let dir = rt.kernel_package_dir();
        assert!(dir.starts_with(root.path().join("kiln-kernel")));
        let kernel = dir.join("kiln_kernel/kernel.py");
        assert_eq!(std::fs::read_to_string(&kernel)?, kernel_source());
        // Present: a second install (another kiln of this version) leaves it alone.
        std::fs::write(dir.join("kiln_kernel/marker"), "kept")?;
        rt.install_kernel_package()?;
        assert!(dir.join("kiln_kernel/marker").is_file());
        // No scratch directory is left behind.
        let entries: Vec<_> = std::fs::read_dir(root.path().join("kiln-kernel"))?.flatten().collect();
        assert_eq!(entries.len(), 1);
        Ok(())
    }

    #[test]
    fn every_module_of_the_package_s_sources_is_in_the_binary() -> std::io::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kiln_kernel");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".py"))
            .collect();
        let mut embedded: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
        on_disk.sort();
        embedded.sort();
        assert_eq!(embedded, on_disk);
        Ok(())
    }

    #[test]
    fn kernels_find_the_package_through_their_pythonpath() {
        let rt = Runtime { root: "/rt".into(), profile: crate::Profile::Minimal };
        let env = rt.kernel_env(Path::new("/home/user"));
        let path = env.iter().find(|(k, _)| k == "PYTHONPATH").map(|(_, v)| v.clone());
        assert_eq!(path, Some(rt.kernel_package_dir().into_os_string()));
    }
}
