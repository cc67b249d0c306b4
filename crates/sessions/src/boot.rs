//! The kernel factory: everything needed to make a kernel for a session
//! (its directories and storage, its sandbox, its environment and network
//! policy, the zygote it is forked from, its egress socket), and to
//! destroy one. The pool and the session workers use it; it knows nothing
//! of sessions, keys or the store.

use crate::{Config, NetworkPolicy, SessionError};
use kiln_kernel::{Completion, Kernel, KernelDirs, KernelSpec, CONNECTION_FILE, INSIDE_HOME};
use kiln_protocol::Language;
use kiln_runtime::Runtime;
use kiln_sandbox::{Sandboxes, Zygote, ZygoteSpec};
use rand::distr::{Alphanumeric, SampleString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Makes and destroys kernels.
#[derive(Debug)]
pub(crate) struct Kernels {
    cfg: Arc<Config>,
    runtime: OnceLock<Runtime>,
    /// Where kernels run: the server's sandboxes.
    sandboxes: Sandboxes,
    /// The fork servers kernels are started from (each once started),
    /// used in turn.
    zygotes: Vec<tokio::sync::Mutex<ZygoteSlot>>,
    /// The zygote the next kernel is forked from (modulo their number).
    next_zygote: AtomicUsize,
    /// The egress proxy, when the server's policy allows any egress.
    egress: OnceLock<EgressProxy>,
    /// The languages the runtime runs, Python first (set with it).
    languages: OnceLock<Vec<Language>>,
}

/// The zygote of this server, and when it last failed to start.
#[derive(Debug, Default)]
pub(crate) struct ZygoteSlot {
    running: Option<Zygote>,
    failed_at: Option<Instant>,
}

impl ZygoteSlot {
    /// Stop the zygote, if one runs, and wait until it has ended.
    pub(crate) async fn stop(&mut self) {
        if let Some(z) = self.running.take() {
            z.stop().await;
        }
    }
}

impl Kernels {
    pub(crate) fn new(cfg: Arc<Config>) -> Self {
        let sandboxes = Sandboxes::new(cfg.sandbox.clone(), cfg.sessions_dir.clone());
        let zygotes = (0..cfg.zygotes.max(1)).map(|_| tokio::sync::Mutex::new(ZygoteSlot::default())).collect();
        Kernels {
            cfg,
            runtime: OnceLock::new(),
            sandboxes,
            zygotes,
            next_zygote: AtomicUsize::new(0),
            egress: OnceLock::new(),
            languages: OnceLock::new(),
        }
    }

    /// The languages kernels can be made for (none before the runtime is
    /// set), Python first.
    pub(crate) fn languages(&self) -> &[Language] {
        self.languages.get().map_or(&[], Vec::as_slice)
    }

    /// The server's sandboxes.
    pub(crate) fn sandboxes(&self) -> &Sandboxes {
        &self.sandboxes
    }

    /// Take `runtime` into use: kernels can be made from now on.
    pub(crate) async fn set_runtime(&self, runtime: Runtime) -> Result<(), SessionError> {
        if let Some(owner) = self.sandboxes.file_owner() {
            for path in std::iter::once(runtime.root.clone()).chain(runtime.base_prefix()) {
                if let Some(hidden) = kiln_sandbox::hidden_inside(&path) {
                    return Err(SessionError::Broken(format!(
                        "the Python runtime's {} is inside {hidden}, which every session's sandbox replaces with \
                         its own, so kernels could not see it; keep the runtime and its base Python elsewhere",
                        path.display()
                    )));
                }
            }
            self.start_egress(&runtime).await?;
            // The session user must own the shared runtime for its
            // copy-on-write layer to accept writes (the runtime itself is
            // never written: it is read-only or overlaid in every sandbox).
            let root = runtime.root.clone();
            tokio::task::spawn_blocking(move || own_runtime(&root, owner))
                .await
                .map_err(|e| SessionError::Broken(e.to_string()))?
                .map_err(|e| SessionError::Broken(format!("could not prepare the runtime for sandboxes: {e}")))?;
        }
        let languages = runtime.languages();
        tracing::info!(languages = ?languages, "kernels available");
        let _ = self.languages.set(languages);
        let _ = self.runtime.set(runtime);
        Ok(())
    }

    /// The policy of kernels booted without one of their own (the pool's).
    pub(crate) fn default_network(&self) -> NetworkPolicy {
        if self.cfg.sandbox.is_some() {
            self.cfg.network
        } else {
            NetworkPolicy::None
        }
    }

    /// Stop the kernel and remove its directory.
    pub(crate) async fn destroy(&self, kernel: Kernel) {
        kernel.kill().await;
        destroy_dir(kernel.dirs().root.clone()).await;
    }

    /// Leave nothing of the server's on the host (at shutdown, once no
    /// kernel is left): no zygote, no cgroup, no registration.
    pub(crate) async fn release(&self) {
        for slot in &self.zygotes {
            slot.lock().await.stop().await;
        }
        let sandboxes = self.sandboxes.clone();
        let _ = tokio::task::spawn_blocking(move || sandboxes.release()).await;
    }

    /// Boot a kernel in a new session directory: its storage (a quota'd
    /// tmpfs when sandboxed) with a work dir and a seeded home.
    pub(crate) async fn boot_new(
        &self,
        network: NetworkPolicy,
        language: Language,
        priority: crate::Priority,
    ) -> Result<Kernel, SessionError> {
        let runtime = self.runtime.get().ok_or(SessionError::NotReady)?.clone();
        let name = format!("k_{}", Alphanumeric.sample_string(&mut rand::rng(), 16));
        let dirs = KernelDirs::under(self.cfg.sessions_dir.join(name));
        let prepared = {
            let (dirs, sandboxes) = (dirs.clone(), self.sandboxes.clone());
            tokio::task::spawn_blocking(move || prepare_dirs(&dirs, &sandboxes, &runtime)).await
        };
        match prepared {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                destroy_dir(dirs.root.clone()).await;
                return Err(SessionError::KernelUnavailable(format!("preparing {}: {e}", dirs.root.display())));
            }
            Err(e) => return Err(SessionError::KernelUnavailable(e.to_string())),
        }
        let booted = self.boot_in(dirs.clone(), network, language, priority).await;
        if booted.is_err() {
            destroy_dir(dirs.root).await;
        }
        booted
    }

    /// Boot a kernel in prepared `dirs`, with `network` as its policy
    /// (never wider than the server's: the operator's `--network` is the
    /// ceiling of every key's), running `language`. Python kernels are
    /// forked from the zygote (when it runs); the others start as new
    /// processes in the same sandbox.
    pub(crate) async fn boot_in(
        &self,
        dirs: KernelDirs,
        network: NetworkPolicy,
        language: Language,
        priority: crate::Priority,
    ) -> Result<Kernel, SessionError> {
        let runtime = self.runtime.get().ok_or(SessionError::NotReady)?;
        if !self.languages().contains(&language) {
            return Err(SessionError::UnsupportedLanguage { asked: language, runs: self.languages_text() });
        }
        let isolated = self.cfg.sandbox.is_some();
        let network = network.min(self.default_network());
        let egress = if isolated { self.egress_policy(network)? } else { None };
        // The runtime is shown copy-on-write (pip installs land in the
        // session's layer); its base interpreter read-only.
        let (home, mounts, shared) = if isolated {
            let mounts = kiln_sandbox::Mounts {
                binds: runtime
                    .base_prefix()
                    .into_iter()
                    .map(|p| kiln_sandbox::Bind { src: p.clone(), dst: p, writable: false })
                    .collect(),
                overlay: None,
            };
            (std::path::PathBuf::from(INSIDE_HOME), mounts, Some(runtime.root.clone()))
        } else {
            (dirs.home.clone(), kiln_sandbox::Mounts::default(), None)
        };
        let mut env = runtime.kernel_env(&home);
        env.extend(runtime.language_env(language, &home));
        if let Some(url) = self.egress.get().map(|e| e.npm_registry.clone()) {
            // Deno's `npm:` imports use the registry this host's npm uses.
            env.push(("NPM_CONFIG_REGISTRY".into(), url.into()));
        }
        // The lean kernel sends no output past the cap the server keeps.
        env.push(("KILN_MAX_OUTPUT_BYTES".into(), self.cfg.max_output_bytes.to_string().into()));
        if isolated {
            // The sandbox's /tmp, /dev/shm, IPC and pid namespaces are the
            // session's own: the batch tests' runner puts them back after
            // each test, and no test may signal a pid below its own
            // (without a sandbox they are the host's).
            env.push(("KILN_PRIVATE_TMP".into(), "1".into()));
        }
        match self.cfg.sandbox.as_ref().map(|_| network) {
            Some(NetworkPolicy::None) => {
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
                env.push(("KILN_NETWORK".into(), policy.as_str().into()));
            }
            None => {}
        }
        let zygote = if isolated && language == Language::Python { self.zygote(runtime).await } else { None };
        let argv = match runtime.kernel_argv(language, CONNECTION_FILE) {
            Some(argv) => argv,
            None => self.cfg.kernel.argv(&runtime.python()),
        };
        let completion = match language {
            Language::Javascript | Language::Typescript => Completion::DenoFence,
            Language::Python | Language::Bash => Completion::Idle,
        };
        let spec = KernelSpec {
            argv,
            warm_up: (language != Language::Python || !self.cfg.kernel.warms_itself())
                .then(|| kiln_runtime::Runtime::warm_up_code(language).to_string()),
            completion,
            env,
            boot_timeout: self.cfg.boot_timeout,
            sandboxes: self.sandboxes.clone(),
            mounts,
            shared,
            zygote,
            max_frame_bytes: max_frame_bytes(self.cfg.max_output_bytes),
            cpu_weight: priority.cpu_weight(),
        };
        let kernel = Kernel::start(&spec, dirs).await.map_err(|e| {
            tracing::error!(error = %e, "kernel boot failed");
            SessionError::KernelUnavailable(e.to_string())
        })?;
        if let Some((proxy, policy)) = egress {
            if let Err(e) = proxy.open(&kernel, policy) {
                kernel.kill().await;
                return Err(e);
            }
        }
        Ok(kernel)
    }

    /// Whether a kernel about to boot gets a proxy, the one place that
    /// decides it: none when `network` allows no egress, else the proxy and
    /// the policy to open the kernel's port with once it has booted
    /// ([`EgressProxy::open`]), or an error when the proxy is not running.
    fn egress_policy(
        &self,
        network: NetworkPolicy,
    ) -> Result<Option<(&EgressProxy, Arc<kiln_sandbox::egress::Policy>)>, SessionError> {
        Ok(Some(match (network, self.egress.get()) {
            (NetworkPolicy::None, _) => return Ok(None),
            (_, None) => return Err(SessionError::KernelUnavailable("the egress proxy is not running".into())),
            (NetworkPolicy::Registries, Some(proxy)) => (proxy, proxy.pypi.clone()),
            (NetworkPolicy::Full, Some(proxy)) => (proxy, proxy.full.clone()),
        }))
    }

    /// The running zygote, started on first use and again if it has died.
    /// `None` when disabled, or when it could not start (then kernels are
    /// started as new interpreters, and a new zygote is tried a minute
    /// later).
    async fn zygote(&self, runtime: &Runtime) -> Option<Zygote> {
        self.cfg.sandbox.as_ref()?.zygote_library.as_ref()?;
        let index = self.next_zygote.fetch_add(1, Ordering::Relaxed) % self.zygotes.len().max(1);
        let mut slot = self.zygotes.get(index)?.lock().await;
        if let Some(z) = slot.running.as_ref().filter(|z| z.is_alive()) {
            return Some(z.clone());
        }
        if slot.failed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return None;
        }
        // The first zygote's directory is `zygote/`; the others' are in it.
        let dir = match index {
            0 => self.sandboxes.zygote_dir(),
            i => self.sandboxes.zygote_dir().join(i.to_string()),
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(error = %e, "cannot create the zygote's directory; booting kernels without it");
            slot.failed_at = Some(Instant::now());
            return None;
        }
        let mut env = runtime.kernel_env(std::path::Path::new(INSIDE_HOME));
        // matplotlib reads its configuration directory once, at import: the
        // zygote imports it with the runtime's own, where the font cache is.
        for (name, value) in env.iter_mut() {
            if name == "MPLCONFIGDIR" {
                *value = runtime.matplotlib_dir().into();
            }
        }
        // IPython picks its directory when the lean kernel's shell is built
        // in the zygote; give it one that exists on the host (each kernel
        // moves to its own home's after the fork).
        env.push(("IPYTHONDIR".into(), dir.join("ipython").into()));
        let mut preload = vec![self.cfg.kernel.preload().to_string()];
        preload.extend(runtime.profile.preload().iter().map(|m| m.to_string()));
        let spec = ZygoteSpec {
            python: runtime.python(),
            env,
            preload,
            log: dir.join("log"),
            ready_timeout: self.cfg.boot_timeout.max(Duration::from_secs(60)),
        };
        let started = Instant::now();
        match self.sandboxes.start_zygote(&spec).await {
            Ok(z) => {
                tracing::info!(ms = started.elapsed().as_millis() as u64, zygote = index, "zygote ready");
                slot.running = Some(z.clone());
                slot.failed_at = None;
                Some(z)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the zygote did not start; booting kernels without it");
                slot.running = None;
                slot.failed_at = Some(Instant::now());
                None
            }
        }
    }

    /// The languages, as listed in messages.
    pub(crate) fn languages_text(&self) -> String {
        self.languages().iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The host uid that must own files written for sessions.
    pub(crate) fn file_owner(&self) -> Option<u32> {
        self.sandboxes.file_owner()
    }

    /// Get the egress proxy ready when the server's policy allows any
    /// egress: the package index hosts are read once, here. Under `none`
    /// nothing runs at all, and no session gets a socket.
    async fn start_egress(&self, runtime: &Runtime) -> Result<(), SessionError> {
        if !self.cfg.network.allows_egress() || self.egress.get().is_some() {
            return Ok(());
        }
        let rt = runtime.clone();
        let mut hosts = tokio::task::spawn_blocking(move || rt.index_hosts())
            .await
            .map_err(|e| SessionError::Broken(e.to_string()))?
            .map_err(|e| SessionError::Broken(format!("could not read pip's index configuration: {e}")))?;
        let npm_registry = tokio::task::spawn_blocking(kiln_runtime::npm_registry)
            .await
            .map_err(|e| SessionError::Broken(e.to_string()))?
            .map_err(|e| SessionError::Broken(format!("could not read npm's registry configuration: {e}")))?;
        hosts.extend(kiln_runtime::url_host(&npm_registry).filter(|h| !hosts.contains(h)));
        let proxy = EgressProxy {
            egress: kiln_sandbox::egress::Egress::new(self.cfg.egress),
            npm_registry,
            pypi: Arc::new(kiln_sandbox::egress::Policy::Hosts(hosts)),
            full: Arc::new(kiln_sandbox::egress::Policy::Full),
        };
        let ceiling = if self.cfg.network == NetworkPolicy::Full { &proxy.full } else { &proxy.pypi };
        tracing::info!(
            policy = %ceiling.describe(),
            connections_per_session = self.cfg.egress.connections,
            idle_timeout = ?self.cfg.egress.idle_timeout,
            "session network policy"
        );
        let _ = self.egress.set(proxy);
        Ok(())
    }
}

/// The egress proxy and the two policies sessions may have.
#[derive(Debug)]
struct EgressProxy {
    egress: kiln_sandbox::egress::Egress,
    /// The npm registry (URL) Deno's `npm:` imports are pointed at.
    npm_registry: String,
    pypi: Arc<kiln_sandbox::egress::Policy>,
    full: Arc<kiln_sandbox::egress::Policy>,
}

impl EgressProxy {
    /// Open a booted kernel's proxy: a listener of its own inside its
    /// sandbox's network (so one session's connections are counted, capped
    /// and closed apart from every other's), served by this server until
    /// the sandbox ends. Made after the boot, when the namespace exists;
    /// the kernel has run nothing of a user's yet.
    fn open(&self, kernel: &Kernel, policy: Arc<kiln_sandbox::egress::Policy>) -> Result<(), SessionError> {
        let unavailable = |e: std::io::Error| {
            SessionError::KernelUnavailable(format!("could not open the session's egress proxy: {e}"))
        };
        let listener = kernel.sandbox().listen_inside(kiln_sandbox::egress::PROXY_PORT).map_err(unavailable)?;
        let port = self.egress.open(listener, policy).map_err(unavailable)?;
        // The listener lives exactly as long as the sandbox that uses it.
        port.close_on_exit(kernel.sandbox().exit_watch());
        Ok(())
    }
}

/// The largest single message kiln reads from a kernel: the output limit
/// twice over (JSON escapes a string's control characters) and room for the
/// message's envelope. Legitimate output never comes near it (the lean
/// kernel sends at most 64 KiB of text per message); a larger frame cuts the
/// kernel off before the server buffers it.
fn max_frame_bytes(max_output_bytes: usize) -> u64 {
    (max_output_bytes as u64).saturating_mul(2).saturating_add(1 << 20)
}

/// Remove a kernel's directory (or one of its run directories), unmounting
/// what was mounted there first: the workspace (`data`) and the run
/// directories' tmpfs (`run*`, or `dir` itself).
pub(crate) async fn destroy_dir(dir: std::path::PathBuf) {
    let result = tokio::task::spawn_blocking(move || {
        let children = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path());
        for point in children.chain([dir.clone()]) {
            // Not a mount point: nothing to do.
            if let Err(e) = kiln_sandbox::remove_storage(&point) {
                return Err((point, e));
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((dir, e)),
            _ => Ok(()),
        }
    })
    .await;
    if let Ok(Err((dir, e))) = result {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a session directory");
    }
}

/// Create a kernel's directories: root (server only), storage, work, home.
fn prepare_dirs(dirs: &KernelDirs, sandboxes: &Sandboxes, runtime: &Runtime) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dirs.root)?;
    sandboxes.create_storage(&dirs.data)?;
    std::fs::create_dir_all(&dirs.work)?;
    std::fs::create_dir_all(&dirs.home)?;
    let owner = sandboxes.file_owner();
    if owner.is_some() {
        std::fs::create_dir_all(dirs.layer_upper())?;
        std::fs::create_dir_all(dirs.layer_work())?;
    }
    runtime.seed_home(&dirs.home)?;
    if let Some(owner) = owner {
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
fn own_runtime(root: &std::path::Path, owner: u32) -> std::io::Result<()> {
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
