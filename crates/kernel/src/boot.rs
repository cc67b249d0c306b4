//! Booting a kernel: connection file, process, sockets, and the handshake
//! that proves both the shell and the iopub channel work.

use crate::guard::Guard;
use crate::{Kernel, KernelError, Sender};
use jupyter_protocol::connection_info::Transport;
use jupyter_protocol::{ConnectionInfo, JupyterMessageContent, KernelInfoRequest};
use jupyter_zmq_client::{
    create_client_iopub_connection, create_client_shell_connection_with_identity, peer_identity_for_session,
    JupyterMessage,
};
use rand::Rng;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep, Instant};

/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Which kernel implementation runs the session's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelKind {
    /// kiln's lean kernel (`python -m kiln_kernel`): IPython's shell on a
    /// single-threaded protocol loop, a few times faster per cell.
    #[default]
    Lean,
    /// The reference: `ipykernel`.
    Ipykernel,
}

/// Where a kernel's command line names its connection file (as in a
/// Jupyter kernel spec's `argv`).
pub const CONNECTION_FILE: &str = "{connection_file}";

impl KernelKind {
    /// The command line that starts this kernel with `python`, with
    /// [`CONNECTION_FILE`] where the connection file goes.
    pub fn argv(self, python: &Path) -> Vec<OsString> {
        let mut argv = vec![python.as_os_str().to_owned()];
        argv.extend(self.args(CONNECTION_FILE.into()));
        argv
    }

    /// Whether the kernel runs its own warm-up cell before it answers its
    /// first request (kiln's lean kernel does, `kernel.py`), so that
    /// [`KernelSpec::warm_up`] need not send one: the request, its
    /// statuses and its reply cost a fresh session ~1.4 ms of CPU
    /// (BENCHMARKS.md, "Latest (2026-12-04)").
    pub fn warms_itself(self) -> bool {
        self == KernelKind::Lean
    }

    /// `python` arguments that start this kernel on `connection_file`.
    fn args(self, connection_file: PathBuf) -> Vec<OsString> {
        match self {
            KernelKind::Lean => vec!["-m".into(), "kiln_kernel".into(), "-f".into(), connection_file.into()],
            KernelKind::Ipykernel => vec![
                "-m".into(),
                "ipykernel_launcher".into(),
                "-f".into(),
                connection_file.into(),
                // History in memory: no sqlite file per session, no locking.
                "--HistoryManager.hist_file=:memory:".into(),
            ],
        }
    }

    /// The module the zygote should import so that forking this kernel
    /// starts it without importing anything.
    pub fn preload(self) -> &'static str {
        match self {
            KernelKind::Lean => "kiln_kernel.kernel",
            KernelKind::Ipykernel => "ipykernel.kernelapp",
        }
    }
}

impl std::str::FromStr for KernelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lean" => Ok(KernelKind::Lean),
            "ipykernel" => Ok(KernelKind::Ipykernel),
            other => Err(format!("unknown kernel {other:?}: use lean or ipykernel")),
        }
    }
}

/// How a cell's outputs are known to be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Completion {
    /// At the kernel's `idle` status for the request (Jupyter's rule; the
    /// Python kernels and ipykernel-based ones publish everything first).
    #[default]
    Idle,
    /// Deno's kernel publishes what a cell printed from a queue that races
    /// its `idle` status, so output can arrive after it. After `idle`, a
    /// silent fence cell prints a marker through the same queue: what came
    /// before the marker is the cell's, in order (see [`crate::execute`]).
    DenoFence,
}

/// How to start a kernel.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    /// The kernel's command line, the program first (absolute, as the
    /// kernel sees it), with [`CONNECTION_FILE`] where the connection file
    /// goes.
    pub argv: Vec<OsString>,
    /// A silent cell run before the kernel is handed out (in the kernel's
    /// language), so the first real cell does not pay first-use costs;
    /// `None` for a kernel that runs its own before it answers
    /// ([`KernelKind::warms_itself`]).
    pub warm_up: Option<String>,
    /// How a cell's outputs are known to be complete.
    pub completion: Completion,
    /// The kernel's complete environment.
    pub env: Vec<(OsString, OsString)>,
    /// How long a boot may take before it is abandoned.
    pub boot_timeout: Duration,
    /// The server's sandboxes: isolated (the default) or plain processes.
    pub sandboxes: kiln_sandbox::Sandboxes,
    /// What the sandbox shows beyond the kernel's own directories (the
    /// runtime's base interpreter, the egress socket); the kernel adds its
    /// work dir, home, socket directory and copy-on-write layer.
    pub mounts: kiln_sandbox::Mounts,
    /// A shared directory (the runtime) to show copy-on-write, its writes
    /// kept in the session's storage (`data/.layer`).
    pub shared: Option<PathBuf>,
    /// Fork it from this zygote instead of starting a new interpreter
    /// (sandboxed kernels only).
    pub zygote: Option<kiln_sandbox::Zygote>,
    /// The largest ZeroMQ frame kiln reads from the kernel (see
    /// [`crate::guard`]); a larger one cuts the kernel off.
    pub max_frame_bytes: u64,
    /// The sandbox's CPU weight while it boots (see
    /// [`kiln_sandbox::CpuWeight`]); the session may change it later.
    pub cpu_weight: kiln_sandbox::CpuWeight,
}

/// Where the work dir appears inside a sandbox (the kernel's cwd).
pub const INSIDE_WORK: &str = "/work";
/// `$HOME` inside a sandbox.
pub const INSIDE_HOME: &str = "/home/user";
/// The socket directory inside a sandbox.
pub const INSIDE_RUN: &str = "/run/kiln";

/// The directories of one kernel.
///
/// Every place a sandboxed session can write is bounded: `work`, `home`
/// and the runtime layer are on `data`, the session's size-limited tmpfs;
/// `run` (sockets, connection file, the kernel's log) is a tmpfs of
/// [`kiln_sandbox::RUN_DIR_BYTES`] of its own, which the session user may write only
/// while the kernel binds its sockets (see [`KernelDirs::lock_run`]).
/// `root` itself is never shown inside.
#[derive(Debug, Clone)]
pub struct KernelDirs {
    /// Holds everything below; only the server sees it (the sandbox's
    /// own files). Removed at teardown.
    pub root: PathBuf,
    /// The session's storage (a quota'd tmpfs when sandboxed).
    pub data: PathBuf,
    /// The kernel's cwd: uploaded files land here (`data/work`).
    pub work: PathBuf,
    /// `$HOME` of the kernel (`data/home`).
    pub home: PathBuf,
    /// Connection file and ipc sockets; fresh for every boot.
    pub run: PathBuf,
}

impl KernelDirs {
    /// The standard layout under `root`.
    pub fn under(root: PathBuf) -> Self {
        let data = root.join("data");
        KernelDirs { work: data.join("work"), home: data.join("home"), run: root.join("run"), data, root }
    }

    /// The same directories with a fresh, empty `run` directory, for a
    /// restarted kernel (stale sockets of the dead one must not be mistaken
    /// for the new one's).
    pub fn with_new_run(&self) -> Self {
        let n: u32 = rand::rng().random();
        KernelDirs { run: self.root.join(format!("run-{n:08x}")), ..self.clone() }
    }

    /// The session's private writes to the shared runtime (overlay upper).
    pub fn layer_upper(&self) -> PathBuf {
        self.data.join(".layer").join("upper")
    }

    /// overlayfs's scratch directory for [`Self::layer_upper`].
    pub fn layer_work(&self) -> PathBuf {
        self.data.join(".layer").join("work")
    }

    /// The kernel process's own log (startup messages, crashes, and the
    /// lean kernel's echo of fd-level output). In the run directory, so
    /// bounded: the kernel keeps it open (its real stdout and stderr), so
    /// code in the session can write to it.
    pub fn log(&self) -> PathBuf {
        self.run.join("kernel.log")
    }

    /// Take the run directory back from the session user, once the kernel
    /// has bound its sockets and before any session code runs: it becomes
    /// the server's again (the owner of `root`), mode 0700, so the session
    /// can neither write there nor swap a socket for a link that the
    /// server's ZeroMQ client would follow on a reconnect.
    pub fn lock_run(&self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let server = std::fs::metadata(&self.root)?;
        for p in [self.run.join("kernel.json"), self.run.clone()] {
            std::os::unix::fs::chown(&p, Some(server.uid()), Some(server.gid()))?;
        }
        Ok(())
    }
}

fn prepare(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Prepare { path: path.to_path_buf(), source }
}

impl Kernel {
    /// Start a kernel in `dirs` and wait until it answers on both its shell
    /// and iopub channels. `dirs.work` and `dirs.home` must exist; the run
    /// directory is made here.
    pub async fn start(spec: &KernelSpec, dirs: KernelDirs) -> Result<Kernel, KernelError> {
        spec.sandboxes.create_run_dir(&dirs.run).map_err(prepare(&dirs.run))?;
        let info = connection_info(&dirs.run)?;
        let conn_file = dirs.run.join("kernel.json");
        // The kernel finds its sockets where the sandbox mounts them.
        let owner = spec.sandboxes.file_owner();
        let (kernel_info, conn_arg, cwd) = match owner {
            Some(_) => {
                let inside = ConnectionInfo { ip: format!("{INSIDE_RUN}/k"), ..info.clone() };
                (inside, PathBuf::from(INSIDE_RUN).join("kernel.json"), PathBuf::from(INSIDE_WORK))
            }
            None => (info.clone(), conn_file.clone(), dirs.work.clone()),
        };
        let json = serde_json::to_vec(&kernel_info)
            .map_err(|e| KernelError::Prepare { path: conn_file.clone(), source: std::io::Error::other(e) })?;
        write_private(&conn_file, &json).map_err(prepare(&conn_file))?;
        if let Some(owner) = owner {
            // The user inside creates its sockets here and reads the file.
            for p in [&dirs.run, &conn_file] {
                std::os::unix::fs::chown(p, Some(owner), Some(owner)).map_err(prepare(p))?;
            }
        }
        let mut mounts = spec.mounts.clone();
        for (src, dst) in [(&dirs.work, INSIDE_WORK), (&dirs.home, INSIDE_HOME), (&dirs.run, INSIDE_RUN)] {
            mounts.binds.push(kiln_sandbox::Bind { src: src.clone(), dst: dst.into(), writable: true });
        }
        mounts.overlay = spec.shared.as_ref().map(|lower| kiln_sandbox::Overlay {
            lower: lower.clone(),
            upper: dirs.layer_upper(),
            work: dirs.layer_work(),
        });
        let lossy = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        let conn_arg = lossy(conn_arg.as_os_str());
        let mut argv = spec.argv.iter().map(|a| lossy(a).replace(CONNECTION_FILE, &conn_arg));
        let program = kiln_sandbox::Program {
            path: argv.next().map(PathBuf::from).unwrap_or_default(),
            args: argv.collect(),
            // The work dir, for the batch tests' runner of a kernel that is
            // not kiln's own (which records its starting cwd instead).
            env: spec
                .env
                .iter()
                .map(|(k, v)| (lossy(k), lossy(v)))
                .chain([("KILN_WORK_DIR".to_string(), lossy(cwd.as_os_str()))])
                .collect(),
            cwd,
        };
        let started = Instant::now();
        let log = dirs.log();
        let zygote = spec.zygote.as_ref().filter(|_| owner.is_some());
        let sandbox = spec
            .sandboxes
            .spawn(kiln_sandbox::Spawn {
                dir: &dirs.root,
                log: &log,
                program,
                mounts,
                zygote,
                cpu_weight: spec.cpu_weight,
            })
            .await?;
        let spawned = started.elapsed();
        let deadline = Instant::now() + spec.boot_timeout;
        let kernel = connect(sandbox, dirs, &info, spec, deadline).await?;
        if owner.is_some() {
            if let Err(source) = kernel.dirs.lock_run() {
                kernel.kill().await;
                return Err(KernelError::Prepare { path: kernel.dirs.run.clone(), source });
            }
        }
        tracing::debug!(
            spawn_ms = spawned.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "kernel booted"
        );
        Ok(kernel)
    }
}

async fn connect(
    sandbox: kiln_sandbox::Sandbox,
    dirs: KernelDirs,
    info: &ConnectionInfo,
    spec: &KernelSpec,
    deadline: Instant,
) -> Result<Kernel, KernelError> {
    let max_frame_bytes = spec.max_frame_bytes;
    // 1. Wait for the kernel to bind its five sockets (connecting to an ipc
    //    path that does not exist yet fails instead of retrying).
    let sockets: Vec<PathBuf> = [info.shell_port, info.iopub_port, info.stdin_port, info.control_port, info.hb_port]
        .iter()
        .map(|p| PathBuf::from(format!("{}-{}", info.ip, p)))
        .collect();
    let waiting = Instant::now();
    loop {
        if let Some(exit) = sandbox.exit() {
            let log = tail(&dirs.log());
            sandbox.kill_and_wait().await;
            return Err(KernelError::DiedDuringBoot { exit, log });
        }
        if sockets.iter().all(|s| s.exists()) {
            tracing::debug!(ms = waiting.elapsed().as_secs_f64() * 1e3, "kernel sockets bound");
            break;
        }
        if Instant::now() > deadline {
            sandbox.kill_and_wait().await;
            return Err(KernelError::BootTimeout);
        }
        sleep(Duration::from_millis(2)).await;
    }

    // 2. Put the size guard in front of the two channels kiln reads (see
    //    `guard`), in the server-only directory.
    let front = dirs.root.join("g");
    let guard = match Guard::start(&front, Path::new(&info.ip), &[info.shell_port, info.iopub_port], max_frame_bytes) {
        Ok(g) => g,
        Err(source) => {
            sandbox.kill_and_wait().await;
            return Err(KernelError::Prepare { path: front, source });
        }
    };
    let guarded = ConnectionInfo { ip: front.to_string_lossy().into_owned(), ..info.clone() };

    // 3. Connect shell (with a stable identity) and iopub, through the
    //    guard. Interrupts are signals, so no control channel is needed.
    let session = uuid::Uuid::new_v4().to_string();
    let sockets = async {
        let identity = peer_identity_for_session(&session)?;
        let shell = create_client_shell_connection_with_identity(&guarded, &session, identity).await?;
        let iopub = create_client_iopub_connection(&guarded, "", &session).await?;
        Ok::<_, jupyter_zmq_client::RuntimeError>((shell, iopub))
    };
    let (shell, mut iopub) = match sockets.await {
        Ok(s) => s,
        Err(e) => {
            sandbox.kill_and_wait().await;
            return Err(e.into());
        }
    };
    let (shell_send, mut shell_recv) = shell.split();

    // 4. Readers: own tasks forward each channel into a queue, so that the
    //    executor can select over them without cancelling a ZeroMQ read.
    let (iopub_tx, iopub_rx) = mpsc::channel(1024);
    let iopub_reader = tokio::spawn(async move {
        while let Ok(msg) = iopub.read().await {
            if iopub_tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let (shell_tx, shell_rx) = mpsc::channel(64);
    let shell_reader = tokio::spawn(async move {
        while let Ok(msg) = shell_recv.read().await {
            if shell_tx.send(msg).await.is_err() {
                break;
            }
        }
    });

    let mut kernel = Kernel {
        sandbox,
        dirs,
        shell: Sender(shell_send),
        shell_replies: shell_rx,
        iopub: iopub_rx,
        readers: vec![iopub_reader.abort_handle(), shell_reader.abort_handle()],
        guard,
        completion: spec.completion,
    };

    // 5. Handshake: repeat kernel_info_request until one is answered on
    //    shell *and* its busy/idle status arrives on iopub. Only then are
    //    outputs of the first cell sure not to be lost to a late iopub
    //    subscription (ZeroMQ's slow-joiner problem).
    match handshake(&mut kernel, deadline).await {
        Ok(()) => {
            if let Some(code) = &spec.warm_up {
                warm_up(&mut kernel, code, deadline).await;
            }
            Ok(kernel)
        }
        Err(e) => {
            kernel.kill().await;
            Err(e)
        }
    }
}

async fn handshake(kernel: &mut Kernel, deadline: Instant) -> Result<(), KernelError> {
    // Done when one of our requests has been answered on shell and one's
    // status has arrived on iopub (in either order). A status published
    // before the iopub subscription reached the kernel is lost, so ask
    // again: soon at first (a forked kernel is ready in milliseconds),
    // then less often.
    let (mut replied, mut published) = (false, false);
    let mut ids: Vec<String> = Vec::new();
    let mut wait = Duration::from_millis(5);
    loop {
        if let Some(exit) = kernel.sandbox.exit() {
            let log = tail(&kernel.dirs.log());
            return Err(KernelError::DiedDuringBoot { exit, log });
        }
        if Instant::now() > deadline {
            return Err(KernelError::BootTimeout);
        }
        let req: JupyterMessage = KernelInfoRequest {}.into();
        ids.push(req.header.msg_id.clone());
        kernel.send_shell(req).await?;
        let round = Instant::now() + wait;
        wait = (wait * 2).min(Duration::from_millis(250));
        loop {
            tokio::select! {
                Some(msg) = kernel.shell_replies.recv() => {
                    if matches!(msg.content, JupyterMessageContent::KernelInfoReply(_)) {
                        replied = true;
                    }
                }
                Some(msg) = kernel.iopub.recv() => {
                    let ours = msg.parent_header.as_ref().is_some_and(|h| ids.contains(&h.msg_id));
                    if ours && matches!(msg.content, JupyterMessageContent::Status(_)) {
                        published = true;
                    }
                }
                _ = tokio::time::sleep_until(round) => break,
            }
            if replied && published {
                // The rest of these requests' messages are ignored: the
                // executor only takes messages of its own request.
                return Ok(());
            }
        }
    }
}

/// Run one silent cell before the kernel is handed to a session. A forked
/// kernel's first cell copies the pages it writes (copy-on-write) and fills
/// IPython's caches, which takes several milliseconds; doing it here keeps
/// that off the session's first request. Silent: no execution count, no
/// history, no outputs. A failure is left for the first real cell to meet.
async fn warm_up(kernel: &mut Kernel, code: &str, deadline: Instant) {
    let request: JupyterMessage = jupyter_protocol::ExecuteRequest {
        code: code.to_string(),
        silent: true,
        store_history: false,
        user_expressions: None,
        allow_stdin: false,
        stop_on_error: false,
    }
    .into();
    let id = request.header.msg_id.clone();
    if kernel.send_shell(request).await.is_err() {
        return;
    }
    let until = deadline.min(Instant::now() + Duration::from_secs(10));
    loop {
        tokio::select! {
            msg = kernel.iopub.recv() => match msg {
                Some(m) if m.parent_header.as_ref().is_some_and(|h| h.msg_id == id)
                    && matches!(&m.content, JupyterMessageContent::Status(s)
                        if s.execution_state == jupyter_protocol::ExecutionState::Idle) => return,
                Some(_) => {}
                None => return,
            },
            Some(_) = kernel.shell_replies.recv() => {}
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

/// A connection over ipc files `run/k-1` .. `run/k-5` with a fresh key.
fn connection_info(run: &Path) -> Result<ConnectionInfo, KernelError> {
    let prefix = run.join("k");
    let longest = format!("{}-5", prefix.display());
    if longest.len() > MAX_SOCKET_PATH {
        return Err(KernelError::SocketPathTooLong { path: PathBuf::from(longest) });
    }
    let key: [u8; 32] = rand::rng().random();
    Ok(ConnectionInfo {
        ip: prefix.to_string_lossy().into_owned(),
        transport: Transport::IPC,
        shell_port: 1,
        iopub_port: 2,
        stdin_port: 3,
        control_port: 4,
        hb_port: 5,
        key: key.iter().map(|b| format!("{b:02x}")).collect(),
        signature_scheme: "hmac-sha256".to_string(),
        kernel_name: Some("python3".to_string()),
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

/// The last lines of a kernel log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    lines[start..].join("\n")
}
