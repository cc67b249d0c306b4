//! A Jupyter kernel client: boot a kernel, run cells, collect what they show.
//!
//! A [`Kernel`] is one Jupyter kernel process (IPython, Deno, bash_kernel)
//! started through the sandbox crate
//! and driven over the Jupyter messaging protocol (runtimed's
//! `jupyter-protocol` types on pure-Rust ZeroMQ). Its sockets are `ipc://`
//! files in a private directory, never TCP: the kernel will live in a
//! network namespace with no route to the host, and Unix sockets in a shared
//! directory cross that boundary while TCP cannot.
//!
//! Outputs are matched to their request by `parent_header.msg_id` and
//! collected from iopub, in order, until the kernel reports `idle` for that
//! request, exactly as a notebook front-end does (see [`collect`]).
#![forbid(unsafe_code)]

mod boot;
mod collect;
mod execute;
mod fence;
pub mod guard;

pub use boot::{Completion, KernelDirs, KernelKind, KernelSpec, CONNECTION_FILE, INSIDE_HOME, INSIDE_RUN, INSIDE_WORK};
pub use collect::{outputs_of, strip_ansi};
pub use execute::{End, ExecLimits, Execution};

use jupyter_zmq_client::{DealerSendConnection, JupyterMessage};
use kiln_sandbox::Sandbox;
use tokio::sync::mpsc;

/// Why a kernel could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A directory or the connection file could not be written.
    #[error("could not prepare the kernel directory {path}: {source}")]
    Prepare { path: std::path::PathBuf, source: std::io::Error },
    /// The socket path would exceed the Unix socket limit.
    #[error("the kernel socket path {path} is too long for a Unix socket; use a shorter data directory")]
    SocketPathTooLong { path: std::path::PathBuf },
    /// The process could not be started.
    #[error(transparent)]
    Sandbox(#[from] kiln_sandbox::SandboxError),
    /// The kernel exited while booting; `log` is the end of its output.
    #[error("the kernel exited while starting ({exit}): {log}")]
    DiedDuringBoot { exit: kiln_sandbox::Exit, log: String },
    /// The kernel did not answer within the boot timeout.
    #[error("the kernel did not become ready within the boot timeout")]
    BootTimeout,
    /// ZeroMQ or message encoding failed.
    #[error("kernel messaging failed: {0}")]
    Messaging(#[from] jupyter_zmq_client::RuntimeError),
}

/// A running kernel and the client connected to it.
#[derive(Debug)]
pub struct Kernel {
    sandbox: Sandbox,
    dirs: KernelDirs,
    shell: Sender,
    shell_replies: mpsc::Receiver<JupyterMessage>,
    iopub: mpsc::Receiver<JupyterMessage>,
    /// The socket reader tasks. ZeroMQ sockets reconnect forever to a dead
    /// peer, so they must be stopped explicitly, never left to notice.
    readers: Vec<tokio::task::AbortHandle>,
    /// The size guard between the kernel's sockets and this client.
    guard: guard::Guard,
    /// How a cell's outputs are known to be complete.
    completion: boot::Completion,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Newtype so the connection (which is not `Debug`) can live in a `Debug`
/// struct.
struct Sender(DealerSendConnection);

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShellSender")
    }
}

impl Kernel {
    /// The sandbox the kernel runs in.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The directories the kernel uses.
    pub fn dirs(&self) -> &KernelDirs {
        &self.dirs
    }

    /// Whether the kernel process is still running.
    pub fn is_alive(&self) -> bool {
        self.sandbox.exit().is_none()
    }

    /// Stop the kernel and every process it started, and wait for it.
    ///
    /// There is no polite `shutdown_request` first: a session's state is
    /// discarded anyway, and a kill cannot be ignored by hostile code.
    pub async fn kill(&self) {
        for r in &self.readers {
            r.abort();
        }
        self.guard.stop();
        self.sandbox.kill_and_wait().await;
    }

    async fn send_shell(&mut self, msg: JupyterMessage) -> Result<(), KernelError> {
        self.shell.0.send(msg).await?;
        Ok(())
    }
}
