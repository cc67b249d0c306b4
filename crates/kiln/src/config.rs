//! Settings of `kiln serve`: command line, `KILN_*` environment variables,
//! and a TOML config file, in that order of precedence, then defaults.

use crate::choices::{KernelChoice, LogFormat, ProfileChoice, SandboxMode, ZygoteMode};
use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Options of `kiln serve`. Each is also a `KILN_*` variable and a key of
/// the config file (same name, with `_` for `-`).
#[derive(Debug, Args, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ServeArgs {
    /// Config file (TOML) [default: <config dir>/kiln/config.toml, if present]
    #[arg(long, env = "KILN_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8787]
    #[arg(long, env = "KILN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where keys, the database and session directories live
    /// [default: <user data dir>/kiln]
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The database keys, sessions and usage are kept in: unset for SQLite
    /// in the data directory (one node), or `postgres://user:password@host:port/dbname`
    /// for a PostgreSQL that several kiln nodes share (`?host=/run/postgresql`
    /// for a Unix socket). Tables are created and migrated at start.
    #[arg(long, env = "KILN_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// This node's name in a shared database: its sessions are marked with
    /// it, and a restart ends only its own [default: the host name]
    #[arg(long, env = "KILN_NODE_ID")]
    pub node_id: Option<String>,
    /// The URL this node's peers reach its API on, e.g.
    /// `http://10.0.0.5:8787` (in Kubernetes, the pod IP from the downward
    /// API). Setting it makes the node one of a cluster sharing --database:
    /// it registers, renews a lease, and serves or forwards (one hop) any
    /// request for any session.
    #[arg(long, env = "KILN_ADVERTISE")]
    pub advertise: Option<String>,
    /// The secret the nodes of a cluster sign forwarded requests with (the
    /// same on every node, at least 16 characters); required with
    /// --advertise
    #[arg(long, env = "KILN_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// How long a node's lease lasts unrenewed (renewed every third of it):
    /// a node that dies is known lost, and its sessions answer
    /// session_lost, within it [default: 6s; 1s to 10s]
    #[arg(long, env = "KILN_LEASE", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub lease: Option<Duration>,
    /// Where the Python runtime is built and cached [default: <user cache dir>/kiln]
    #[arg(long, env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// An accepted API key (repeatable; comma-separated in KILN_API_KEY).
    /// `KEY:none`, `KEY:registries` (or `KEY:pypi`) or `KEY:full` gives the key's sessions their
    /// own network policy. Without any key, kiln generates one on first start.
    #[arg(long = "api-key", env = "KILN_API_KEY", value_delimiter = ',', hide_env_values = true)]
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Lifetime of a session from its start, e.g. 60m, 90s [default: 60m]
    #[arg(long, env = "KILN_SESSION_TTL", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub session_ttl: Option<Duration>,
    /// Time limit of one execution when the request sets none [default: 10m]
    #[arg(long, env = "KILN_EXEC_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub exec_timeout: Option<Duration>,
    /// Largest time limit a request may set [default: 60m]
    #[arg(long, env = "KILN_MAX_EXEC_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub max_exec_timeout: Option<Duration>,
    /// Most items one batch request may hold, 1 to 1000 [default: 1000]
    #[arg(long, env = "KILN_MAX_BATCH_ITEMS", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_batch_items: Option<u16>,
    /// Ready kernels kept for new sessions [default: 2]
    #[arg(long, env = "KILN_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// Live sessions on this server [default: 256]
    #[arg(long, env = "KILN_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Live sessions per API key [default: 64]
    #[arg(long, env = "KILN_MAX_SESSIONS_PER_KEY")]
    pub max_sessions_per_key: Option<usize>,
    /// Executions running at once on this server [default: 256]
    #[arg(long, env = "KILN_MAX_EXECUTIONS")]
    pub max_executions: Option<usize>,
    /// Executions one API key may run at once [default: 32]
    #[arg(long, env = "KILN_MAX_EXECUTIONS_PER_KEY")]
    pub max_executions_per_key: Option<usize>,
    /// Executions one API key may have waiting for a place; past it 429
    /// `rate_limited` [default: 1024]
    #[arg(long, env = "KILN_EXECUTION_QUEUE_PER_KEY")]
    pub execution_queue_per_key: Option<usize>,
    /// Largest request body in bytes [default: 52428800 (50 MiB)]
    #[arg(long, env = "KILN_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Bytes of output kept per execution [default: 10485760 (10 MiB)]
    #[arg(long, env = "KILN_MAX_OUTPUT_BYTES")]
    pub max_output_bytes: Option<usize>,
    /// Base Python the runtime is built from [default: python3 on PATH]
    #[arg(long, env = "KILN_PYTHON")]
    pub python: Option<PathBuf>,
    /// Runtime profile: `full` (the 30 documented packages) or `minimal`
    /// (kernel, matplotlib, numpy, pandas) [default: full]
    #[arg(long, env = "KILN_PROFILE", value_enum)]
    pub profile: Option<ProfileChoice>,
    /// Isolation of sessions: `namespaces` (needs root) or `none` (no
    /// isolation at all: for trusted code and development only)
    /// [default: namespaces]
    #[arg(long, env = "KILN_SANDBOX", value_enum)]
    pub sandbox: Option<SandboxMode>,
    /// Kernel: `lean` (kiln's single-threaded kernel on IPython's shell,
    /// the same outputs several times faster) or `ipykernel` [default: lean]
    #[arg(long, env = "KILN_KERNEL", value_enum)]
    pub kernel: Option<KernelChoice>,
    /// Fork kernels from a zygote that has the runtime's heavy packages
    /// imported (`on`), or start a new interpreter for each (`off`)
    /// [default: on]
    #[arg(long, env = "KILN_ZYGOTE", value_enum)]
    pub zygote: Option<ZygoteMode>,
    /// Zygotes of the runtime, 1 to 64: kernels are forked from each in
    /// turn, so new sessions are not serialised behind one process's forks
    /// [default: one per four cores, at least one]
    #[arg(long, env = "KILN_ZYGOTES", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub zygotes: Option<u16>,
    /// Memory per session, e.g. 2GiB [default: 2GiB]
    #[arg(long, env = "KILN_MEMORY_LIMIT", value_parser = parse_bytes)]
    #[serde(default, with = "opt_bytes")]
    pub memory_limit: Option<u64>,
    /// Size of a session's work dir and home, e.g. 1GiB [default: 1GiB]
    #[arg(long, env = "KILN_DISK_LIMIT", value_parser = parse_bytes)]
    #[serde(default, with = "opt_bytes")]
    pub disk_limit: Option<u64>,
    /// Size of a session's /tmp [default: 512MiB]
    #[arg(long, env = "KILN_TMP_LIMIT", value_parser = parse_bytes)]
    #[serde(default, with = "opt_bytes")]
    pub tmp_limit: Option<u64>,
    /// Processes and threads per session [default: 512]
    #[arg(long, env = "KILN_PIDS_LIMIT")]
    pub pids_limit: Option<u64>,
    /// CPU cores per session (a CFS quota; sessions also get equal CPU
    /// shares, so a busy session cannot starve the others) [default: all]
    #[arg(long, env = "KILN_CPU_LIMIT")]
    pub cpu_limit: Option<f64>,
    /// What sessions may reach: `none`, `registries` (only the package
    /// index this machine's pip uses and the registry its npm uses, through
    /// kiln's proxy; `pypi` is its old name) or `full` (public HTTP(S)
    /// through kiln's proxy; never this host or private networks)
    /// [default: registries]
    #[arg(long, env = "KILN_NETWORK", value_parser = crate::choices::parse_network)]
    pub network: Option<kiln_protocol::NetworkPolicy>,
    /// Connections a session may have open through the egress proxy at
    /// once [default: 64]
    #[arg(long, env = "KILN_EGRESS_CONNECTIONS")]
    pub egress_connections: Option<usize>,
    /// An egress tunnel with no traffic either way for this long is closed
    /// [default: 2m]
    #[arg(long, env = "KILN_EGRESS_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub egress_idle_timeout: Option<Duration>,
    /// An egress tunnel is closed after this long, busy or not [default: 1h]
    #[arg(long, env = "KILN_EGRESS_MAX_DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub egress_max_duration: Option<Duration>,
    /// Open connections to the API at once; more wait to be accepted
    /// [default: 1024]
    #[arg(long, env = "KILN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers once it started, and
    /// the longest pause allowed while it sends a body [default: 10s]
    #[arg(long, env = "KILN_HTTP_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub http_header_timeout: Option<Duration>,
    /// An API connection with no request in flight is closed after this
    /// long (a running execution is never cut) [default: 30s]
    #[arg(long, env = "KILN_HTTP_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub http_idle_timeout: Option<Duration>,
    /// On SIGTERM, how long running executions may finish before every
    /// session is torn down [default: 30s]
    #[arg(long, env = "KILN_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub shutdown_grace: Option<Duration>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Options of `kiln runtime build`.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// Runtime profile: full or minimal
    #[arg(long, env = "KILN_PROFILE", value_enum, default_value_t = ProfileChoice::Full)]
    profile: ProfileChoice,
    /// Base Python [default: python3 on PATH]
    #[arg(long, env = "KILN_PYTHON")]
    python: Option<PathBuf>,
    /// Cache directory [default: <user cache dir>/kiln]
    #[arg(long, env = "KILN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl RuntimeArgs {
    pub fn runtime_config(self) -> anyhow::Result<kiln_runtime::RuntimeConfig> {
        Ok(kiln_runtime::RuntimeConfig {
            profile: self.profile.into(),
            python: self.python,
            cache_dir: self.cache_dir.map_or_else(default_cache_dir, Ok)?,
        })
    }
}

/// Fully resolved settings.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database: kiln_store::Database,
    pub node_id: String,
    pub api_keys: Vec<String>,
    pub runtime: kiln_runtime::RuntimeConfig,
    pub sessions: kiln_sessions::Config,
    pub max_body_bytes: usize,
    /// What sessions may reach: the ceiling of every key's own policy.
    pub network: kiln_sessions::NetworkPolicy,
    pub http: crate::http::HttpLimits,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    /// What resolving found worth a warning; logged once logging is set up
    /// (which needs `log_format`, so it cannot be set up before).
    pub warnings: Vec<String>,
    /// Set when this node is one of a cluster (`--advertise`).
    pub cluster: Option<ClusterSettings>,
}

/// A cluster node's settings.
#[derive(Debug)]
pub struct ClusterSettings {
    /// Where peers reach this node.
    pub advertise: String,
    /// Signs forwarded requests (never printed).
    pub secret: Secret,
    /// The node's lease.
    pub lease: Duration,
}

/// A value that is never printed.
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Settings {
    /// Merge the command line/environment over the config file over defaults.
    pub fn resolve(cli: ServeArgs) -> anyhow::Result<Settings> {
        let file = load_file(cli.config.as_deref())?;
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                cli.$field.or(file.$field).unwrap_or_else(|| $default)
            };
        }
        let data_dir = match cli.data_dir.or(file.data_dir) {
            Some(d) => d,
            None => dirs::data_dir().context("no user data directory; pass --data-dir")?.join("kiln"),
        };
        let database = kiln_store::Database::from_setting(cli.database.or(file.database).as_deref(), &data_dir)?;
        let node_id = match cli.node_id.or(file.node_id) {
            Some(n) => n,
            None => default_node_id()?,
        };
        anyhow::ensure!(
            !node_id.is_empty() && node_id.len() <= 128 && !node_id.chars().any(char::is_control),
            "--node-id must be 1 to 128 printable characters"
        );
        let cluster = match cli.advertise.or(file.advertise).filter(|a| !a.trim().is_empty()) {
            None => None,
            Some(advertise) => {
                let advertise = advertise.trim().trim_end_matches('/').to_string();
                anyhow::ensure!(
                    advertise.starts_with("http://") && advertise.len() > "http://".len(),
                    "--advertise must be the http:// URL peers reach this node on, e.g. http://10.0.0.5:8787"
                );
                let secret = cli.cluster_secret.or(file.cluster_secret).unwrap_or_default();
                anyhow::ensure!(
                    secret.len() >= 16,
                    "--advertise needs --cluster-secret (KILN_CLUSTER_SECRET): the same secret of at least 16 \
                     characters on every node, which signs the requests nodes forward to each other"
                );
                let lease = cli.lease.or(file.lease).unwrap_or(Duration::from_secs(6));
                anyhow::ensure!(
                    (Duration::from_secs(1)..=Duration::from_secs(10)).contains(&lease),
                    "--lease must be between 1s and 10s"
                );
                Some(ClusterSettings { advertise, secret: Secret(secret), lease })
            }
        };
        let cache_dir = match cli.cache_dir.or(file.cache_dir) {
            Some(d) => d,
            None => default_cache_dir()?,
        };
        let mut warnings = Vec::new();
        let sandbox_mode = pick!(sandbox, SandboxMode::Namespaces);
        if let Some(hidden) =
            kiln_sandbox::hidden_inside(&cache_dir).filter(|_| sandbox_mode == SandboxMode::Namespaces)
        {
            anyhow::bail!(
                "the cache directory {} (--cache-dir or KILN_CACHE_DIR) is inside {hidden}, which every session's \
                 sandbox replaces with its own, so kernels could not see the Python runtime kept there; \
                 choose a cache directory elsewhere, e.g. /var/cache/kiln",
                cache_dir.display()
            );
        }
        let profile: kiln_runtime::Profile = pick!(profile, ProfileChoice::Full).into();
        let mut api_keys = if cli.api_keys.is_empty() { file.api_keys } else { cli.api_keys };
        api_keys.retain(|k| !k.trim().is_empty());
        let log_format = pick!(log_format, LogFormat::Text);
        let exec_timeout = pick!(exec_timeout, Duration::from_secs(600));
        let network = pick!(network, kiln_sessions::NetworkPolicy::Registries);
        let max_exec_timeout = pick!(max_exec_timeout, Duration::from_secs(3600));
        let kernel: kiln_kernel::KernelKind = pick!(kernel, KernelChoice::Lean).into();
        let helper = std::env::current_exe().context("cannot find the kiln binary itself")?;
        let egress = {
            let d = kiln_sandbox::egress::Limits::default();
            kiln_sandbox::egress::Limits {
                connections: positive("--egress-connections", pick!(egress_connections, d.connections))?,
                idle_timeout: nonzero("--egress-idle-timeout", pick!(egress_idle_timeout, d.idle_timeout))?,
                max_duration: nonzero("--egress-max-duration", pick!(egress_max_duration, d.max_duration))?,
                ..d
            }
        };
        let zygote_library = match pick!(zygote, ZygoteMode::On) {
            ZygoteMode::On => zygote_library(&helper, &mut warnings),
            ZygoteMode::Off => None,
        };
        Ok(Settings {
            listen: pick!(listen, SocketAddr::from(([127, 0, 0, 1], 8787))),
            runtime: kiln_runtime::RuntimeConfig { profile, python: cli.python.or(file.python), cache_dir },
            sessions: kiln_sessions::Config {
                sessions_dir: data_dir.join("sessions"),
                ttl: pick!(session_ttl, Duration::from_secs(3600)),
                exec_timeout,
                max_exec_timeout: max_exec_timeout.max(exec_timeout),
                max_batch_items: usize::from(pick!(max_batch_items, 1000)).clamp(1, kiln_protocol::MAX_BATCH_ITEMS),
                interrupt_grace: Duration::from_secs(3),
                max_output_bytes: pick!(max_output_bytes, 10 << 20),
                pool_size: pick!(pool_size, 2),
                zygotes: usize::from(pick!(zygotes, default_zygotes())).clamp(1, 64),
                max_sessions: pick!(max_sessions, 256),
                max_sessions_per_key: pick!(max_sessions_per_key, 64),
                admission: kiln_sessions::AdmissionLimits {
                    total: positive("--max-executions", pick!(max_executions, 256))?,
                    per_key: positive("--max-executions-per-key", pick!(max_executions_per_key, 32))?,
                    queue_per_key: pick!(execution_queue_per_key, 1024),
                },
                boot_timeout: Duration::from_secs(60),
                kernel,
                sandbox: match sandbox_mode {
                    SandboxMode::Unisolated => None,
                    SandboxMode::Namespaces => Some(kiln_sandbox::SandboxSpec {
                        helper,
                        zygote_library,
                        limits: kiln_sandbox::Limits {
                            memory_bytes: pick!(memory_limit, 2 << 30),
                            pids: pick!(pids_limit, 512),
                            cpus: pick!(
                                cpu_limit,
                                std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
                            ),
                            disk_bytes: pick!(disk_limit, 1 << 30),
                            tmp_bytes: pick!(tmp_limit, 512 << 20),
                            nofile: 4096,
                        },
                    }),
                },
                network,
                egress,
            },
            max_body_bytes: pick!(max_body_bytes, 50 << 20),
            network,
            http: crate::http::HttpLimits {
                max_connections: positive("--max-connections", pick!(max_connections, 1024))?,
                header_timeout: nonzero("--http-header-timeout", pick!(http_header_timeout, Duration::from_secs(10)))?,
                idle_timeout: nonzero("--http-idle-timeout", pick!(http_idle_timeout, Duration::from_secs(30)))?,
            },
            shutdown_grace: pick!(shutdown_grace, Duration::from_secs(30)),
            api_keys,
            data_dir,
            database,
            node_id,
            log_format,
            warnings,
            cluster,
        })
    }
}

fn positive(flag: &str, n: usize) -> anyhow::Result<usize> {
    anyhow::ensure!(n > 0, "{flag} must be at least 1");
    Ok(n)
}

fn nonzero(flag: &str, d: Duration) -> anyhow::Result<Duration> {
    anyhow::ensure!(!d.is_zero(), "{flag} must be longer than zero");
    Ok(d)
}

/// The sandbox as a shared library, built beside the kiln binary; the
/// zygote loads it. Without it kernels start as new interpreters.
fn zygote_library(kiln: &std::path::Path, warnings: &mut Vec<String>) -> Option<PathBuf> {
    let dir = kiln.parent()?;
    // `cargo build` puts it beside the binary; `cargo test` leaves it in
    // `deps/`, and a targeted `cargo test -p kiln` refreshes only that one:
    // take the newer, or sessions would run stale sandbox code.
    let lib = dir.join("libkiln_sandbox.so");
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let found = [lib.clone(), dir.join("deps").join("libkiln_sandbox.so")]
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| modified(p));
    if found.is_some() {
        found
    } else {
        warnings.push(format!(
            "no sandbox library beside the kiln binary ({}): kernels start without the zygote (slower)",
            lib.display()
        ));
        None
    }
}

/// The host name: unique per machine, and the pod name in Kubernetes.
pub fn default_node_id() -> anyhow::Result<String> {
    let host = nix::unistd::gethostname().context("could not read the host name; pass --node-id")?;
    host.into_string().map_err(|_| anyhow::anyhow!("the host name is not UTF-8; pass --node-id"))
}

fn default_cache_dir() -> anyhow::Result<PathBuf> {
    Ok(dirs::cache_dir().context("no user cache directory; pass --cache-dir")?.join("kiln"))
}

fn load_file(explicit: Option<&std::path::Path>) -> anyhow::Result<ServeArgs> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match dirs::config_dir().map(|d| d.join("kiln").join("config.toml")) {
            Some(p) if p.is_file() => p,
            _ => return Ok(ServeArgs::default()),
        },
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("could not read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// `1073741824`, `512MiB`, `2GiB`, `100M`, `64k`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    Ok((n * mult as f64) as u64)
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<Size>::deserialize(d)? {
            None => Ok(None),
            Some(Size::Number(n)) => Ok(Some(n)),
            Some(Size::Text(t)) => super::parse_bytes(&t).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// One zygote per four cores, at least one: a zygote spends about 2-3 ms
/// of its own (serial) time per fork, so one keeps up with a few hundred
/// new sessions a second, which is what four cores can create.
fn default_zygotes() -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    u16::try_from(cores.div_ceil(4)).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(super::parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(super::parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(super::parse_bytes("1000"), Ok(1000));
        assert!(super::parse_bytes("lots").is_err());
        assert!(super::parse_bytes("5 parsecs").is_err());
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}
