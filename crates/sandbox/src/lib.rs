//! Starts a session's kernel as a contained process and tears it down.
//!
//! The API is deliberately small so that other kernels and other isolation
//! backends (namespaces, a microVM) fit behind it:
//!
//! - a [`SandboxSpec`] says how every sandbox of a server is built (limits,
//!   the helper binary, the zygote's library): set once from the server's
//!   configuration;
//! - [`Sandboxes`] is the server's handle on the host: it claims the server's
//!   place there (cgroups, workspaces), cleans up after dead predecessors,
//!   prepares session storage and [spawns](Sandboxes::spawn) a [`Program`]
//!   with its per-kernel [`Mounts`];
//! - a [`Sandbox`] is one running kernel and everything it started: signal
//!   it, watch it end, kill it.
//!
//! Every process starts with exactly the environment its program names
//! (nothing of the server's leaks), with stdin closed and its own output
//! going to a log file.
//!
//! Isolated (the default for sessions), a kernel is started through the
//! sandbox helper ([`helper_main`], see `init` for its steps) or forked from
//! a [`Zygote`]: own user, pid, mount, network, ipc, uts and cgroup
//! namespaces, a minimal read-only root, cgroup limits on memory, processes
//! and CPU, no capabilities, `no_new_privs`, landlock and a default-deny
//! seccomp filter. cgroups, the helper's description (`jail`) and the
//! workspaces are private to this crate.
//!
//! This is the only crate with `unsafe` code: each block names the invariant
//! it relies on.
// The workspace denies unsafe code; this crate is the one exception.
#![allow(unsafe_code)]

mod arenas;
mod cgroup;
pub mod egress;
mod ffi;
mod headroom;
mod init;
mod jail;
mod process;
mod registry;
mod rootfs;
mod sandboxes;
pub mod seccomp;
mod step;
mod workspace;
mod zygote;

pub use cgroup::CpuWeight;
pub use headroom::memory_available;
pub use init::main as helper_main;
pub use jail::{Bind, Overlay};
pub use sandboxes::{instance_cgroups, remove_storage, Sandbox, Sandboxes, Spawn, RUN_DIR_BYTES};
pub use zygote::{Zygote, ZygoteError, ZygoteSpec};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitStatus;

/// How every sandbox of a server is built. Set once from the server's
/// configuration; what differs per kernel ([`Program`], [`Mounts`]) is added
/// at [spawn](Sandboxes::spawn).
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The kiln binary, re-executed as the sandbox helper
    /// (`kiln __sandbox-init`).
    pub helper: PathBuf,
    /// `libkiln_sandbox.so`, to fork kernels from a zygote; `None` starts a
    /// new interpreter for every kernel.
    pub zygote_library: Option<PathBuf>,
    /// What each sandbox may use.
    pub limits: Limits,
}

/// What each sandbox may use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (processes, page cache, tmpfs pages), bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU time as a number of cores (e.g. 1.0).
    pub cpus: f64,
    /// Size of the work dir + home (a tmpfs mounted by the server), bytes.
    pub disk_bytes: u64,
    /// Size of the private `/tmp` (and `/dev/shm`), bytes.
    pub tmp_bytes: u64,
    /// Open files per process.
    pub nofile: u64,
}

/// The program a sandbox runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// Absolute path of the program (inside the sandbox when isolated).
    pub path: PathBuf,
    /// Its arguments, without the program name.
    pub args: Vec<String>,
    /// Its complete environment; nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// Working directory (inside the sandbox when isolated).
    pub cwd: PathBuf,
}

/// What one sandbox shows of the host, beyond the standard system
/// directories: added per kernel at spawn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounts {
    /// Host paths to show inside (the runtime's base interpreter, the
    /// session's work dir, home and socket directory).
    pub binds: Vec<Bind>,
    /// A host directory shown through an overlay: reads come from it, writes
    /// go to the session's own upper layer (`!pip install` into the shared
    /// runtime, privately).
    pub overlay: Option<Overlay>,
}

/// Errors of sandbox set-up, one per step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The log file could not be created.
    #[error("could not create the process log {path}: {source}")]
    Log { path: PathBuf, source: std::io::Error },
    /// The program could not be started.
    #[error("could not start {program}: {source}")]
    Spawn { program: PathBuf, source: std::io::Error },
    /// The zygote could not fork the kernel.
    #[error(transparent)]
    Zygote(#[from] zygote::ZygoteError),
    /// [`Sandboxes::claim`] was not called before the first spawn.
    #[error("the server has not claimed its place on the host yet")]
    Unclaimed,
    /// The session's cgroup could not be created.
    #[error("could not create the session's cgroup (is kiln running as root?): {0}")]
    Cgroup(std::io::Error),
    /// The helper's instructions could not be written.
    #[error("could not write the sandbox description {path}: {source}")]
    Spec { path: PathBuf, source: std::io::Error },
}

/// Places where every sandbox shows something of its own (a private
/// `/tmp`, its own `/dev` and `/proc`, fresh `/etc` files, the session's
/// directories): a host path below one of them cannot be shown inside, so
/// a runtime or interpreter kept there would be invisible to kernels.
pub const HIDDEN_INSIDE: &[&str] = &["/tmp", "/dev", "/proc", "/sys", "/etc", "/run/kiln", "/work", "/home/user"];

/// The place of [`HIDDEN_INSIDE`] that `path` (absolute, symbolic links
/// resolved as far as the path exists) lies in, if any.
pub fn hidden_inside(path: &std::path::Path) -> Option<&'static str> {
    let resolved = resolve(path);
    HIDDEN_INSIDE.iter().copied().find(|h| resolved.starts_with(h) || path.starts_with(h))
}

/// `path` made absolute, `.` and `..` removed, and the longest existing
/// prefix with its symbolic links resolved.
fn resolve(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut clean = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    let mut existing = clean.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return clean,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    out.extend(rest.iter().rev());
    out
}

/// How a contained process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if it was killed by one.
    pub signal: Option<i32>,
}

impl From<ExitStatus> for Exit {
    fn from(s: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Exit { code: s.code(), signal: s.signal() }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A failed step of sandbox set-up has its own code.
        if let Some(step) = self.code.and_then(step::Step::from_code) {
            return write!(f, "the sandbox could not be built: {} failed (exit code {})", step.describe(), step.code());
        }
        // The sandbox helper reports a program killed by signal N as 128+N.
        let signal = self.signal.or(self.code.filter(|c| (129..=192).contains(c)).map(|c| c - 128));
        match (self.code, signal) {
            (_, Some(9)) => write!(f, "killed (SIGKILL, e.g. out of memory)"),
            (_, Some(s)) => write!(f, "killed by signal {s}"),
            (Some(c), _) => write!(f, "exit code {c}"),
            _ => write!(f, "unknown exit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn paths_the_sandbox_replaces_are_recognised_however_they_are_written() {
        assert_eq!(hidden_inside(Path::new("/tmp/kiln-cache")), Some("/tmp"));
        assert_eq!(hidden_inside(Path::new("/tmp/./a/../kiln")), Some("/tmp"));
        assert_eq!(hidden_inside(Path::new("/var/tmp/../../tmp/x")), Some("/tmp"));
        assert_eq!(hidden_inside(Path::new("/dev/shm/kiln")), Some("/dev"));
        assert_eq!(hidden_inside(Path::new("/var/cache/kiln")), None);
        assert_eq!(hidden_inside(Path::new("/tmpfoo/kiln")), None);
        assert_eq!(hidden_inside(Path::new("/root/.cache/kiln")), None);
    }
}
