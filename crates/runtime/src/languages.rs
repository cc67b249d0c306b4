//! The languages a runtime runs, and how each one's kernel is started.
//!
//! Python is IPython (the lean kernel or ipykernel, chosen by the server).
//! JavaScript and TypeScript are Deno's own Jupyter kernel (`deno jupyter
//! --kernel`), from PyPI's `deno` wheel: the binary lands in the venv's
//! `bin/` with no other download. Deno's kernel listens on TCP only, while
//! kiln's kernels live in network namespaces the server cannot reach and
//! speak over `ipc://` sockets in their run directory; so Deno runs behind
//! `kiln_kernel.relay`, which serves kiln's sockets inside the sandbox,
//! passes their bytes to Deno's loopback ports, and turns the interrupt
//! signal into Jupyter's `interrupt_request` (a signal would kill Deno).
//! bash is `bash_kernel` (ipykernel driving a bash through a pseudo
//! terminal: what a notebook with the bash kernel shows), started by
//! `kiln_kernel.bash`, which completes its `kernel_info`.
//!
//! Which languages a runtime runs is its profile's list, narrowed to the
//! kernels actually installed.

use crate::{Profile, Runtime, RuntimeError};
use kiln_protocol::Language;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

impl Profile {
    /// The languages this profile's lock installs a kernel for.
    pub fn languages(self) -> &'static [Language] {
        match self {
            // Deno alone is ~110 MB: `minimal` stays Python-only.
            Profile::Minimal => &[Language::Python],
            Profile::Full => &Language::ALL,
        }
    }
}

impl Runtime {
    /// Deno, as installed by the `deno` wheel.
    pub fn deno(&self) -> PathBuf {
        self.root.join("bin").join("deno")
    }

    /// The languages this runtime can run: its profile's, each only if its
    /// kernel is installed. Python first (the default).
    pub fn languages(&self) -> Vec<Language> {
        self.profile
            .languages()
            .iter()
            .copied()
            .filter(|l| match l {
                Language::Python => true,
                Language::Javascript | Language::Typescript => self.deno().is_file(),
                Language::Bash => self.has_package("bash_kernel"),
            })
            .collect()
    }

    fn has_package(&self, name: &str) -> bool {
        let lib = self.root.join("lib");
        std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("site-packages").join(name).join("__init__.py").is_file())
    }

    /// The command line of a kernel for `language` other than Python (whose
    /// kernel the server chooses), with `conn` where the connection file
    /// goes.
    pub fn kernel_argv(&self, language: Language, conn: &str) -> Option<Vec<OsString>> {
        let python: OsString = self.python().into();
        match language {
            Language::Python => None,
            Language::Javascript | Language::Typescript => Some(vec![
                python,
                "-m".into(),
                "kiln_kernel.relay".into(),
                conn.into(),
                "--".into(),
                self.deno().into(),
                "jupyter".into(),
                "--kernel".into(),
                "--conn".into(),
            ]),
            Language::Bash => Some(vec![python, "-m".into(), "kiln_kernel.bash".into(), "-f".into(), conn.into()]),
        }
    }

    /// What a kernel for `language` needs in its environment beyond
    /// [`Runtime::kernel_env`]; `home` as the kernel sees it.
    pub fn language_env(&self, language: Language, home: &Path) -> Vec<(OsString, OsString)> {
        match language {
            Language::Python => Vec::new(),
            Language::Javascript | Language::Typescript => vec![
                // Deno's cache (npm packages, compiled modules) in the
                // session's own size-limited home.
                ("DENO_DIR".into(), home.join(".cache").join("deno").into()),
                ("DENO_NO_UPDATE_CHECK".into(), "1".into()),
                ("DENO_NO_PROMPT".into(), "1".into()),
                // Plain tracebacks: no colour codes to strip.
                ("NO_COLOR".into(), "1".into()),
            ],
            Language::Bash => vec![("TERM".into(), "dumb".into())],
        }
    }

    /// A silent cell the kernel runs before a session takes it, so that its
    /// first real cell does not pay for first-use costs (sent by kiln to a
    /// kernel that does not run its own, `KernelKind::warms_itself`).
    pub fn warm_up_code(language: Language) -> &'static str {
        match language {
            Language::Python => "print(end='')\n",
            Language::Javascript | Language::Typescript => "void 0;\n",
            Language::Bash => ":\n",
        }
    }
}

/// The registry this machine's npm is configured for (`npm config get
/// registry`: its `.npmrc` files and `npm_config_registry`), or npm's
/// default when npm is not installed. Deno's `npm:` imports are pointed at
/// the same registry (`NPM_CONFIG_REGISTRY`).
pub fn npm_registry() -> Result<String, RuntimeError> {
    const DEFAULT: &str = "https://registry.npmjs.org/";
    let out = match std::process::Command::new("npm").args(["config", "get", "registry"]).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DEFAULT.to_string()),
        Err(e) => {
            return Err(RuntimeError::Step {
                step: "reading npm's configuration",
                status: "could not start".into(),
                output: e.to_string(),
            })
        }
    };
    if !out.status.success() {
        return Err(RuntimeError::Step {
            step: "reading npm's configuration",
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(if url.is_empty() || url == "undefined" { DEFAULT.to_string() } else { url })
}

/// The host name of a registry URL (`https://host[:port]/path`).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().map(|h| h.trim_start_matches('['))?
    } else {
        host.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_give_their_host() {
        assert_eq!(url_host("https://registry.npmjs.org/").as_deref(), Some("registry.npmjs.org"));
        assert_eq!(url_host("https://user:pw@npm.example.com:8443/repo/").as_deref(), Some("npm.example.com"));
        assert_eq!(url_host("https://[2001:db8::1]/").as_deref(), Some("2001:db8::1"));
        assert_eq!(url_host("https:///"), None);
    }

    #[test]
    fn full_runs_every_language_and_minimal_only_python() {
        assert_eq!(Profile::Full.languages(), &Language::ALL);
        assert_eq!(Profile::Minimal.languages(), &[Language::Python]);
    }
}
