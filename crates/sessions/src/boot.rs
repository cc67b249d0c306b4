//! Booting kernels for sessions: their directories and storage, their
//! sandbox, their environment and network policy, and the egress proxies.

use crate::manager::{destroy_dir, Inner};
use crate::{Network, SandboxConfig, SessionError};
use kiln_kernel::{Kernel, KernelDirs, KernelSpec, SandboxSpec, INSIDE_HOME};
use kiln_runtime::Runtime;
use rand::distr::{Alphanumeric, SampleString};

impl Inner {
    /// Boot a kernel in a new session directory: its storage (a quota'd
    /// tmpfs when sandboxed) with a work dir and a seeded home.
    pub(crate) async fn boot_new(&self, network: Network) -> Result<Kernel, SessionError> {
        let runtime = self.runtime.get().ok_or(SessionError::NotReady)?.clone();
        let name = format!("k_{}", Alphanumeric.sample_string(&mut rand::rng(), 16));
        let dirs = KernelDirs::under(self.cfg.sessions_dir.join(name));
        let sandbox = self.cfg.sandbox.clone();
        let prepared = {
            let dirs = dirs.clone();
            tokio::task::spawn_blocking(move || prepare_dirs(&dirs, sandbox.as_ref(), &runtime)).await
        };
        match prepared {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                destroy_dir(dirs.root.clone()).await;
                return Err(SessionError::KernelUnavailable(format!("preparing {}: {e}", dirs.root.display())));
            }
            Err(e) => return Err(SessionError::KernelUnavailable(e.to_string())),
        }
        let booted = self.boot_in(dirs.clone(), network).await;
        if booted.is_err() {
            destroy_dir(dirs.root).await;
        }
        booted
    }

    /// Boot a kernel in prepared `dirs`, with `network` as its policy.
    pub(crate) async fn boot_in(&self, dirs: KernelDirs, network: Network) -> Result<Kernel, SessionError> {
        let runtime = self.runtime.get().ok_or(SessionError::NotReady)?;
        let (home, sandbox) = match &self.cfg.sandbox {
            None => (dirs.home.clone(), None),
            Some(sb) => {
                // The runtime is shown copy-on-write (pip installs land in
                // the session's layer); its base interpreter read-only.
                let read_only: Vec<std::path::PathBuf> = runtime.base_prefix().into_iter().collect();
                let spec = SandboxSpec {
                    helper: sb.helper.clone(),
                    read_only,
                    limits: kiln_sandbox::CgroupLimits { memory_bytes: sb.memory_bytes, pids: sb.pids, cpus: sb.cpus },
                    tmp_bytes: sb.tmp_bytes,
                    nofile: sb.nofile,
                    owner: kiln_sandbox::jail::host_user_id(),
                    overlay: Some(runtime.root.clone()),
                    egress_socket: network.socket_name().map(|n| sb.egress_dir.join(n)),
                };
                (std::path::PathBuf::from(INSIDE_HOME), Some(spec))
            }
        };
        let mut env = runtime.kernel_env(&home);
        match self.cfg.sandbox.as_ref().map(|_| network) {
            Some(Network::None) => {
                // Fail fast and say why, instead of retrying for a minute.
                env.push(("PIP_RETRIES".into(), "0".into()));
                env.push(("PIP_TIMEOUT".into(), "5".into()));
                env.push(("KILN_NETWORK".into(), "none".into()));
            }
            Some(policy) => {
                let proxy = format!("http://127.0.0.1:{}", kiln_sandbox::egress::PROXY_PORT);
                for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
                    env.push((var.into(), proxy.clone().into()));
                }
                for var in ["NO_PROXY", "no_proxy"] {
                    env.push((var.into(), "localhost,127.0.0.1,::1".into()));
                }
                let name = if policy == Network::Full { "full" } else { "pypi" };
                env.push(("KILN_NETWORK".into(), name.into()));
            }
            None => {}
        }
        let spec = KernelSpec { python: runtime.python(), env, boot_timeout: self.cfg.boot_timeout, sandbox };
        Kernel::start(&spec, dirs).await.map_err(|e| {
            tracing::error!(error = %e, "kernel boot failed");
            SessionError::KernelUnavailable(e.to_string())
        })
    }

    /// The host uid that must own files written for sessions.
    pub(crate) fn file_owner(&self) -> Option<u32> {
        self.cfg.sandbox.as_ref().map(|_| kiln_sandbox::jail::host_user_id())
    }

    /// Serve an egress proxy for each policy that allows egress (sessions
    /// may have their key's policy rather than the server's).
    pub(crate) async fn start_egress(&self, sb: &SandboxConfig, runtime: &Runtime) -> Result<(), SessionError> {
        for network in [Network::Pypi, Network::Full] {
            self.start_proxy(sb, runtime, network).await?;
        }
        Ok(())
    }

    async fn start_proxy(&self, sb: &SandboxConfig, runtime: &Runtime, network: Network) -> Result<(), SessionError> {
        let Some(name) = network.socket_name() else { return Ok(()) };
        let socket = sb.egress_dir.join(name);
        let policy = match network {
            Network::None => return Ok(()),
            Network::Full => kiln_sandbox::egress::Policy::Full,
            Network::Pypi => {
                let rt = runtime.clone();
                let hosts = tokio::task::spawn_blocking(move || rt.index_hosts())
                    .await
                    .map_err(|e| SessionError::Broken(e.to_string()))?
                    .map_err(|e| SessionError::Broken(format!("could not read pip's index configuration: {e}")))?;
                kiln_sandbox::egress::Policy::Hosts(hosts)
            }
        };
        if network == sb.network {
            tracing::info!(policy = %policy.describe(), "session network policy");
        }
        let task = tokio::spawn(async move {
            if let Err(e) = kiln_sandbox::egress::serve(&socket, policy).await {
                tracing::error!(error = %e, "the egress proxy stopped");
            }
        });
        self.egress.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        Ok(())
    }
}

/// Create a kernel's directories: root (server only), storage, work, home.
pub(crate) fn prepare_dirs(
    dirs: &KernelDirs,
    sandbox: Option<&SandboxConfig>,
    runtime: &Runtime,
) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dirs.root)?;
    std::fs::create_dir_all(&dirs.data)?;
    if let Some(sb) = sandbox {
        kiln_sandbox::workspace::mount_workspace(&dirs.data, sb.disk_bytes, kiln_sandbox::jail::host_user_id())?;
    }
    std::fs::create_dir_all(&dirs.work)?;
    std::fs::create_dir_all(&dirs.home)?;
    if sandbox.is_some() {
        std::fs::create_dir_all(dirs.layer_upper())?;
        std::fs::create_dir_all(dirs.layer_work())?;
    }
    runtime.seed_home(&dirs.home)?;
    if sandbox.is_some() {
        let owner = kiln_sandbox::jail::host_user_id();
        chown_tree(&dirs.data, owner)?;
    }
    Ok(())
}

fn chown_tree(dir: &std::path::Path, owner: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(owner), Some(owner))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

/// Give the runtime tree to `owner` unless it already has it.
pub(crate) fn own_runtime(root: &std::path::Path, owner: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let marker = root.join("kiln-runtime.json");
    if std::fs::symlink_metadata(&marker)?.uid() == owner {
        return Ok(());
    }
    // The marker last: a crash in between makes the next start redo it.
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path != marker {
            chown_tree(&path, owner)?;
        }
    }
    std::os::unix::fs::lchown(root, Some(owner), Some(owner))?;
    std::os::unix::fs::lchown(&marker, Some(owner), Some(owner))
}
