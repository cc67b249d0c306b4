//! The Python environment that sessions run in, provisioned by kiln itself.
//!
//! A runtime is a virtual environment built from a lock file shipped in this
//! crate (`locks/<profile>.txt`: the full dependency closure, pinned, so two
//! machines build the same thing). It lives in a cache directory keyed by the
//! lock's content and the base interpreter, so it survives data-dir changes
//! and restarts, and a changed lock builds a new one beside the old.
//!
//! A runtime is either complete or not used: the marker file
//! `kiln-runtime.json` is written last, after the imports were verified, and
//! a directory without it is removed and rebuilt. Builds take an exclusive
//! `flock` on a lock file beside the directory, so two kiln processes never
//! build the same runtime at once (the second waits, then finds it done).
#![forbid(unsafe_code)]

mod build;
mod kernel_package;
mod languages;
mod progress;

pub use build::ensure;
pub use languages::{npm_registry, url_host};
pub use progress::Progress;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Which set of packages a runtime carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// The kernel, inline plotting, numpy and pandas.
    Minimal,
    /// Everything the TCI documentation lists as pre-installed.
    Full,
}

/// What a session's first plot (`plt.plot(...)`, shown inline) imports
/// beyond `matplotlib.pyplot`; both profiles preload it ([`Profile::preload`]).
const FIRST_PLOT: [&str; 7] = [
    "matplotlib.backends.backend_agg",
    "IPython.core.pylabtools",
    "PIL.BmpImagePlugin",
    "PIL.GifImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.PpmImagePlugin",
    "PIL.features",
];

impl Profile {
    /// The profile's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Minimal => "minimal",
            Profile::Full => "full",
        }
    }

    /// The lock file's content.
    pub fn lock(self) -> &'static str {
        match self {
            Profile::Minimal => include_str!("../locks/minimal.txt"),
            Profile::Full => include_str!("../locks/full.txt"),
        }
    }

    /// Modules the zygote imports before forking kernels, so that a
    /// session's first `import` of them is a dictionary lookup. Importing
    /// has no side effect a session could notice beyond `sys.modules` (and
    /// Pillow's table of image formats, which its plugins fill as its first
    /// open or save would).
    ///
    /// Besides what sessions import by name, what a session's first plot
    /// imports (measured: ~12 ms of CPU in the sandbox, every session): the
    /// Agg backend (with its extension module), IPython's matplotlib
    /// helpers and the Pillow plugins its first save loads. Never anything
    /// of `matplotlib_inline`: importing its backend turns on IPython's
    /// matplotlib integration for the shell that exists at that moment. In
    /// the zygote there is none yet, so a kernel would then never get it
    /// (no figure shown at the end of a cell); a session gets it on its first
    /// plot, as with ipykernel.
    pub fn preload(self) -> Vec<&'static str> {
        const COMMON: &[&str] =
            &["IPython", "numpy", "pandas", "matplotlib", "matplotlib.pyplot", "PIL.Image", "json", "asyncio"];
        let more: &[&str] = match self {
            Profile::Minimal => &[],
            Profile::Full => &["scipy", "seaborn", "requests"],
        };
        [COMMON, &FIRST_PLOT, more].concat()
    }

    /// Modules imported to verify a build.
    fn smoke_imports(self) -> &'static [&'static str] {
        match self {
            Profile::Minimal => &["ipykernel", "matplotlib_inline", "matplotlib.pyplot", "numpy", "pandas"],
            Profile::Full => FULL_IMPORTS,
        }
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minimal" => Ok(Profile::Minimal),
            "full" => Ok(Profile::Full),
            other => Err(format!("unknown runtime profile {other:?}; available: full, minimal")),
        }
    }
}

/// The import names of the 30 documented packages (plus the kernel's own).
pub const FULL_IMPORTS: &[&str] = &[
    "ipykernel",
    "matplotlib_inline",
    "aiohttp",
    "bs4",
    "bokeh",
    "gensim",
    "imageio",
    "joblib",
    "librosa",
    "matplotlib.pyplot",
    "nltk",
    "numpy",
    "cv2",
    "openpyxl",
    "pandas",
    "plotly",
    "pytest",
    "docx",
    "pytz",
    "requests",
    "skimage",
    "sklearn",
    "scipy",
    "seaborn",
    "soundfile",
    "spacy",
    "textblob",
    "tornado",
    "urllib3",
    "xarray",
    "xlrd",
    "sympy",
    // The bash kernel (JavaScript's, Deno, is checked by running it).
    "bash_kernel",
];

/// Where and from what to build a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The package set.
    pub profile: Profile,
    /// The base interpreter; `python3` on `PATH` when absent.
    pub python: Option<PathBuf>,
    /// Root of kiln's cache (runtimes go in `runtimes/` below it).
    pub cache_dir: PathBuf,
}

/// Why a runtime could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No usable base Python.
    #[error("no usable Python found ({tried}): {reason}. Install Python 3.10+ or pass --python PATH")]
    NoPython { tried: String, reason: String },
    /// A filesystem step failed.
    #[error("could not {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A build command failed.
    #[error("{step} failed ({status}); its last output:\n{output}")]
    Step { step: &'static str, status: String, output: String },
}

/// A complete runtime, ready for kernels.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The virtual environment's root.
    pub root: PathBuf,
    /// Its profile.
    pub profile: Profile,
}

impl Runtime {
    /// The interpreter kernels run with.
    pub fn python(&self) -> PathBuf {
        self.root.join("bin").join("python")
    }

    /// The base interpreter's prefix (from `pyvenv.cfg`): the venv links to
    /// it, so a sandbox must show it too.
    pub fn base_prefix(&self) -> Option<PathBuf> {
        let cfg = std::fs::read_to_string(self.root.join("pyvenv.cfg")).ok()?;
        let home = cfg.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "home").then(|| PathBuf::from(v.trim()))
        })?;
        // `home` is the base interpreter's bin directory.
        home.parent().map(Path::to_path_buf)
    }

    /// The hosts of the package index this machine's pip is configured to
    /// use (its index-url and extra-index-urls from configuration files and
    /// the environment; pip's default index and file host when none is set).
    pub fn index_hosts(&self) -> Result<Vec<String>, RuntimeError> {
        let out = std::process::Command::new(self.python()).args(["-c", INDEX_HOSTS_PY]).output().map_err(|e| {
            RuntimeError::Step {
                step: "reading pip's configuration",
                status: "could not start".into(),
                output: e.to_string(),
            }
        })?;
        if !out.status.success() {
            return Err(RuntimeError::Step {
                step: "reading pip's configuration",
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|h| !h.is_empty()).collect())
    }

    /// Prepare a new session's home directory (on the host): matplotlib's
    /// font cache, built once at provisioning, is copied in so the first plot
    /// does not rebuild it and matplotlib finds a writable config dir.
    pub fn seed_home(&self, home: &Path) -> std::io::Result<()> {
        let dst = home.join(".config").join("matplotlib");
        std::fs::create_dir_all(&dst)?;
        for entry in std::fs::read_dir(mpl_config_dir(&self.root))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::copy(entry.path(), dst.join(entry.file_name()))?;
            }
        }
        Ok(())
    }

    /// The matplotlib configuration directory built with the runtime (its
    /// font cache); read-only to sessions, which get a copy in their home.
    pub fn matplotlib_dir(&self) -> PathBuf {
        mpl_config_dir(&self.root)
    }

    /// The fixed environment a kernel starts with; `home` is its home as the
    /// kernel sees it. Nothing of the server's own environment is passed on
    /// except pip's index and trust settings, so that `!pip install`
    /// behaves as pip does on this host.
    pub fn kernel_env(&self, home: &Path) -> Vec<(OsString, OsString)> {
        let bin = self.root.join("bin");
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()).into()),
            ("VIRTUAL_ENV".into(), self.root.clone().into()),
            ("HOME".into(), home.into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("PYTHONUNBUFFERED".into(), "1".into()),
            ("MPLBACKEND".into(), "module://matplotlib_inline.backend_inline".into()),
            ("MPLCONFIGDIR".into(), home.join(".config").join("matplotlib").into()),
            ("USER".into(), "user".into()),
            ("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into()),
            // This kiln's own kernel package (see `kernel_package`).
            ("PYTHONPATH".into(), self.kernel_package_dir().into()),
        ];
        for name in PIP_PASSTHROUGH {
            if let Some(v) = std::env::var_os(name) {
                env.push(((*name).into(), v));
            }
        }
        env
    }
}

/// pip settings a session inherits from the host, so installs reach the
/// same index with the same trust store.
const PIP_PASSTHROUGH: &[&str] =
    &["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE"];

/// Prints the index hosts pip would use, one per line.
const INDEX_HOSTS_PY: &str = r#"
import os
from urllib.parse import urlparse
from pip._internal.configuration import Configuration
from pip._internal.models.index import PyPI
conf = Configuration(isolated=False)
conf.load()
urls = []
for key, value in conf.items():
    if key.endswith(("index-url", "extra-index-url")):
        urls += value.split()
urls += os.environ.get("PIP_INDEX_URL", "").split() + os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
hosts = {urlparse(u).hostname for u in urls}
if not any(k.endswith(".index-url") for k, _ in conf.items()) and not os.environ.get("PIP_INDEX_URL"):
    hosts |= {urlparse(PyPI.url).hostname, PyPI.file_storage_domain}
print(chr(10).join(sorted(h for h in hosts if h)))
"#;

fn mpl_config_dir(root: &Path) -> PathBuf {
    root.join("share").join("kiln").join("matplotlib")
}
