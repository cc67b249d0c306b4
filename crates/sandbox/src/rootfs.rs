//! The session's filesystem view, built by init inside its own mount
//! namespace: a fresh tmpfs root holding only what the runtime needs.
//!
//! Read-only: the system directories, the runtime and its base interpreter,
//! a few `/etc` entries (linker cache, trust store), the egress socket.
//! Written fresh: `/etc` identity files (no host users, no host name).
//! Writable: the session's work and home directories (a size-limited tmpfs
//! mounted by the server), the runtime's overlay (its upper layer on that
//! same tmpfs), a private size-limited `/tmp` and `/dev/shm`, and a private
//! `devpts` with a bounded number of terminals. The socket directory
//! `/run/kiln` is writable only while the kernel binds its sockets (the
//! server takes it back before any session code runs). `/dev` holds only
//! null, zero, full, random, urandom and tty, and is read-only; `/proc` is
//! the session's own pid namespace, with the entries in [`PROC_MASKED`]
//! hidden and those in [`PROC_READ_ONLY`] read-only, as container runtimes
//! do. Then `pivot_root`, detach the host's tree, and make the root itself
//! read-only.

use crate::jail::{Bind, Jail, ETC_BINDS, ETC_FILES, SYSTEM_DIRS};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

type R = Result<(), String>;

/// `/proc` entries hidden from the session, and why: a file reads as empty
/// (`/dev/null` is bound over it), a directory as an empty read-only tmpfs.
/// The first group is the default of runc, containerd, Docker and
/// Kubernetes; the rest are kiln's choice: host information that nothing a
/// session runs needs, and that an attacker would read first. Entries this
/// kernel does not have are skipped.
pub const PROC_MASKED: &[(&str, &str)] = &[
    ("acpi", "host firmware tables (runc)"),
    ("asound", "host sound devices (runc)"),
    ("interrupts", "host devices and per-CPU interrupt counts, a timing side channel (Docker, Kubernetes)"),
    ("kcore", "the host's physical memory as a core file (runc)"),
    ("keys", "kernel keys visible to the uid; the keyring is not namespaced (runc)"),
    ("latency_stats", "host scheduling latencies (runc)"),
    ("timer_list", "host timers and the tasks that armed them (runc)"),
    ("timer_stats", "host timer statistics (runc)"),
    ("sched_debug", "every host task (runc)"),
    ("scsi", "host disks (runc)"),
    ("config.gz", "the host kernel's build configuration: which features and mitigations an exploit can count on"),
    ("kallsyms", "the host kernel's symbols"),
    ("modules", "the host kernel's loaded modules"),
    ("iomem", "the host's physical memory map"),
    ("ioports", "the host's I/O port map"),
    ("mtrr", "the host's memory type registers"),
    ("softirqs", "per-CPU soft interrupt counts, the same side channel as interrupts"),
    ("cmdline", "the host kernel's command line (on a VM it names the hypervisor's control ports)"),
    ("kmsg", "the host kernel's log"),
    ("key-users", "keyring usage of every host user"),
    ("buddyinfo", "the host's page allocator state, read by heap-shaping exploits"),
    ("pagetypeinfo", "the host's page allocator state"),
    ("zoneinfo", "the host's page allocator state"),
    ("slabinfo", "the host's slab allocator state, read by heap-shaping exploits"),
    ("vmallocinfo", "the host kernel's virtual memory layout"),
    ("kpagecount", "physical page information (rowhammer-class attacks)"),
    ("kpageflags", "physical page information"),
    ("kpagecgroup", "physical page information"),
];

/// `/proc` entries that stay readable but not writable, and why (runc's
/// read-only paths).
pub const PROC_READ_ONLY: &[(&str, &str)] = &[
    ("sys", "kernel parameters: reading is harmless, writing them is the host's business"),
    ("sysrq-trigger", "magic SysRq commands"),
    ("bus", "host buses (PCI configuration space)"),
    ("fs", "filesystem parameters"),
    ("irq", "interrupt routing"),
];

/// Pseudo-terminals one session may hold at once (`!cmd` takes one while it
/// runs). The kernel's limit (`kernel.pty.max`) is shared by every devpts
/// instance, so without this one session could take them all.
pub const MAX_PTYS: u32 = 64;

fn ctx<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Build the root and pivot into it.
pub(crate) fn build(jail: &Jail) -> R {
    let none: Option<&str> = None;
    // Nothing we mount may propagate back to the host.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(ctx("make / private"))?;
    let root = &jail.root;
    mount(Some("tmpfs"), root, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("size=16m,mode=0755"))
        .map_err(ctx("tmpfs root"))?;

    for dir in SYSTEM_DIRS {
        let host = Path::new(dir);
        match std::fs::symlink_metadata(host) {
            Ok(m) if m.file_type().is_symlink() => {
                // Merged-/usr systems: /bin -> usr/bin. Recreate the link.
                let target = std::fs::read_link(host).map_err(ctx(dir))?;
                std::os::unix::fs::symlink(target, inside(root, host)).map_err(ctx(dir))?;
            }
            Ok(_) => bind(root, &Bind { src: host.into(), dst: host.into(), writable: false })?,
            Err(_) => {}
        }
    }
    for b in &jail.mounts.binds {
        bind(root, b)?;
    }
    if let Some(o) = &jail.mounts.overlay {
        let dst = inside(root, &o.lower);
        std::fs::create_dir_all(&dst).map_err(ctx(dst.display()))?;
        let opts =
            format!("lowerdir={},upperdir={},workdir={}", o.lower.display(), o.upper.display(), o.work.display());
        mount(Some("overlay"), &dst, Some("overlay"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(opts.as_str()))
            .map_err(ctx(format!("overlay on {}", o.lower.display())))?;
    }

    // /etc: identity files written fresh, a few host entries read-only.
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(ctx("mkdir /etc"))?;
    for (name, content) in ETC_FILES {
        std::fs::write(etc.join(name), content).map_err(ctx(name))?;
    }
    for name in ETC_BINDS {
        let host = Path::new("/etc").join(name);
        if host.exists() {
            bind(root, &Bind { src: host.clone(), dst: host, writable: false })?;
        }
    }

    // /dev: a tmpfs with bind mounts of the harmless nodes (a user
    // namespace cannot mknod).
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(ctx("mkdir /dev"))?;
    mount(Some("tmpfs"), &dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("size=64k,mode=0755"))
        .map_err(ctx("tmpfs /dev"))?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(node);
        std::fs::write(dev.join(node), b"").map_err(ctx(node))?;
        mount(Some(&host), &dev.join(node), none, MsFlags::MS_BIND, none).map_err(ctx(node))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).map_err(ctx(link))?;
    }
    // A private devpts: pseudo-terminals for `!cmd` (IPython runs shell
    // commands under a pty), none of the host's terminals, at most MAX_PTYS.
    let pts = dev.join("pts");
    std::fs::create_dir_all(&pts).map_err(ctx("mkdir /dev/pts"))?;
    let pts_opts = format!("newinstance,ptmxmode=0666,mode=0620,max={MAX_PTYS}");
    mount(Some("devpts"), &pts, Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some(pts_opts.as_str()))
        .map_err(ctx("mount /dev/pts"))?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")).map_err(ctx("ptmx"))?;
    let shm = dev.join("shm");
    let tmp_opts = format!("size={},mode=1777", jail.limits.tmp_bytes);
    std::fs::create_dir_all(&shm).map_err(ctx("mkdir /dev/shm"))?;
    mount(Some("tmpfs"), &shm, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(tmp_opts.as_str()))
        .map_err(ctx("tmpfs /dev/shm"))?;
    // /dev itself is complete: nothing more may be created in it.
    mount(none, &dev, none, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, none)
        .map_err(ctx("remount /dev read-only"))?;

    // /tmp: private, size-limited.
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(ctx("mkdir /tmp"))?;
    mount(Some("tmpfs"), &tmp, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(tmp_opts.as_str()))
        .map_err(ctx("tmpfs /tmp"))?;

    // /proc of this pid namespace, minus what container runtimes hide.
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(ctx("mkdir /proc"))?;
    mount(Some("proc"), &proc, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, none)
        .map_err(ctx("mount /proc"))?;
    mask_proc(&proc)?;

    // Swap roots; the old root is detached, so no host path stays reachable.
    nix::unistd::chdir(root).map_err(ctx("chdir new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(ctx("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(ctx("detach old root"))?;
    nix::unistd::chdir("/").map_err(ctx("chdir /"))?;
    // The root tmpfs itself becomes read-only now that it is complete.
    mount(none, "/", none, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV, none)
        .map_err(ctx("remount / read-only"))?;
    Ok(())
}

/// Hide [`PROC_MASKED`] and write-protect [`PROC_READ_ONLY`] in the proc
/// instance mounted at `proc`. These mounts belong to a mount namespace
/// owned by the host's user namespace: nothing in the session can unmount
/// them.
fn mask_proc(proc: &Path) -> R {
    let none: Option<&str> = None;
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (name, _why) in PROC_MASKED {
        let path = proc.join(name);
        match std::fs::symlink_metadata(&path) {
            Err(_) => continue, // not in this kernel
            Ok(m) if m.is_dir() => {
                mount(Some("tmpfs"), &path, Some("tmpfs"), locked | MsFlags::MS_RDONLY, Some("size=4k,mode=0555"))
            }
            Ok(_) => mount(Some("/dev/null"), &path, none, MsFlags::MS_BIND, none),
        }
        .map_err(ctx(format!("mask /proc/{name}")))?;
    }
    for (name, _why) in PROC_READ_ONLY {
        let path = proc.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        mount(Some(&path), &path, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
            .and_then(|()| {
                mount(none, &path, none, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | locked, none)
            })
            .map_err(ctx(format!("read-only /proc/{name}")))?;
    }
    Ok(())
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Bind `b.src` at `b.dst` under `root`; read-only binds keep the flags the
/// kernel locks on the source mount (nosuid, nodev, noexec), or the
/// read-only remount would be refused.
fn bind(root: &Path, b: &Bind) -> R {
    let none: Option<&str> = None;
    let dst = inside(root, &b.dst);
    let src = &b.src;
    let meta = std::fs::metadata(src).map_err(ctx(b.src.display()))?;
    if meta.is_dir() {
        std::fs::create_dir_all(&dst).map_err(ctx(dst.display()))?;
    } else {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(ctx(parent.display()))?;
        }
        std::fs::write(&dst, b"").map_err(ctx(dst.display()))?;
    }
    mount(Some(src), &dst, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
        .map_err(ctx(format!("bind {}", b.src.display())))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
    if !b.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    if let Ok(st) = statvfs(&dst) {
        let f = st.flags();
        for (fs, ms) in [
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        ] {
            if f.contains(fs) {
                flags |= ms;
            }
        }
    }
    mount(none, &dst, none, flags, none).map_err(ctx(format!("remount {}", b.dst.display())))
}

/// Bring the namespace's loopback interface up, so code can use
/// `localhost` among its own processes. The namespace has no other
/// interface: nothing outside is reachable.
pub fn loopback_up() -> R {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(ctx("socket"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq, which lives for the whole call;
    // the descriptor is a valid socket we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Landlock, where the kernel has it, as a second wall behind the mount
/// namespace: writes only to the session's writable places.
pub(crate) fn landlock(jail: &Jail) -> R {
    use landlock::{
        path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
    };
    let abi = ABI::V3;
    let mut writable: Vec<PathBuf> = jail.mounts.binds.iter().filter(|b| b.writable).map(|b| b.dst.clone()).collect();
    // The overlaid runtime takes writes into the session's own layer.
    writable.extend(jail.mounts.overlay.iter().map(|o| o.lower.clone()));
    writable
        .extend(["/tmp", "/dev/shm", "/dev/pts", "/dev/null", "/dev/zero", "/dev/full", "/dev/tty"].map(PathBuf::from));
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&writable, AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| e.to_string())?;
    let _ = status;
    Ok(())
}
