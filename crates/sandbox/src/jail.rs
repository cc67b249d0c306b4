//! What an isolated session looks like: the data the server hands to the
//! sandbox helper (`kiln __sandbox-init <file>`), serialised as JSON into a
//! directory only the server can read.

use crate::cgroup::Cgroup;
use crate::{Limits, Mounts, Program};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Host uid that the session's root maps to; its user (uid 1000 inside) is
/// `UID_BASE + 1000`. Chosen far above real users and the usual subordinate
/// id ranges (100000-165535), so no host account owns these ids.
pub const UID_BASE: u32 = 1_000_000;
/// The unprivileged user the kernel runs as, inside.
pub const USER_ID: u32 = 1000;

/// Host uid/gid of the session user (owner of its files on the host).
pub fn host_user_id() -> u32 {
    UID_BASE + USER_ID
}

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bind {
    /// Path on the host.
    pub src: PathBuf,
    /// Path inside the sandbox.
    pub dst: PathBuf,
    /// Whether the session may write there.
    pub writable: bool,
}

/// Everything the helper needs to build one sandbox and start its program:
/// the server's limits, the kernel's mounts and program, and where to build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Jail {
    /// The session's cgroup(s), created by the server; the helper joins them.
    pub cgroup: Option<Cgroup>,
    /// An empty host directory the new root is assembled on (in the
    /// sandbox's private mount namespace; the host sees nothing mounted).
    pub root: PathBuf,
    /// What the sandbox shows of the host.
    pub mounts: Mounts,
    /// The server's limits.
    pub limits: Limits,
    /// Whether to install the seccomp filter (always, except to debug).
    pub seccomp: bool,
    /// What runs inside.
    pub program: Program,
}

/// What the server asks the zygote for, one per kernel: the sandbox to
/// build, and the file the kernel's standard output and error go to (its
/// log). Serialised by the server ([`crate::Sandboxes`]), read by the
/// zygote's child ([`crate::ffi::kiln_zygote_fork`]): the server borrows
/// what it sends, the child owns what it read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForkRequest<'a> {
    /// The sandbox, as the helper would read it.
    pub jail: Cow<'a, Jail>,
    /// The kernel's log (created if missing, appended to).
    pub log: Cow<'a, Path>,
}

/// A copy-on-write view of a shared directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overlay {
    /// The shared, never modified directory (host path; also the path inside).
    pub lower: PathBuf,
    /// The session's writes (host path, on the session's workspace).
    pub upper: PathBuf,
    /// overlayfs's scratch directory (same filesystem as `upper`).
    pub work: PathBuf,
}

/// System directories shown read-only at the same path, when they exist.
pub const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];

/// Host `/etc` entries shown read-only: the dynamic linker's cache, the
/// trust store, time zone, pip's configuration. Nothing about users, hosts,
/// or the machine's identity.
pub const ETC_BINDS: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "alternatives",
    "localtime",
    "pip.conf",
    "mime.types",
    "fonts",
    "protocols",
    "services",
];

/// `/etc` files written fresh for every session.
pub const ETC_FILES: &[(&str, &str)] = &[
    (
        "passwd",
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    ),
    ("group", "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"),
    ("hostname", "kiln\n"),
    ("hosts", "127.0.0.1 localhost kiln\n::1 localhost ip6-localhost ip6-loopback\n"),
    ("resolv.conf", ""),
    ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\nservices: files\nprotocols: files\n"),
];
