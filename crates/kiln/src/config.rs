//! Settings of `kiln serve`: command line, `KILN_*` environment variables,
//! and a TOML config file, in that order of precedence, then defaults.

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
    /// Where the Python runtime is built and cached [default: <user cache dir>/kiln]
    #[arg(long, env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// An accepted API key (repeatable; comma-separated in KILN_API_KEY).
    /// Without any, kiln generates one on first start.
    #[arg(
        long = "api-key",
        env = "KILN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
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
    /// Ready kernels kept for new sessions [default: 2]
    #[arg(long, env = "KILN_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// Live sessions on this server [default: 256]
    #[arg(long, env = "KILN_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Live sessions per API key [default: 64]
    #[arg(long, env = "KILN_MAX_SESSIONS_PER_KEY")]
    pub max_sessions_per_key: Option<usize>,
    /// Largest request body in bytes [default: 52428800 (50 MiB)]
    #[arg(long, env = "KILN_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Bytes of output kept per execution [default: 10485760 (10 MiB)]
    #[arg(long, env = "KILN_MAX_OUTPUT_BYTES")]
    pub max_output_bytes: Option<usize>,
    /// Base Python the runtime is built from [default: python3 on PATH]
    #[arg(long, env = "KILN_PYTHON")]
    pub python: Option<PathBuf>,
    /// Runtime profile [default: minimal]
    #[arg(long, env = "KILN_PROFILE")]
    pub profile: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "KILN_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// Options of `kiln runtime build`.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// Runtime profile
    #[arg(long, env = "KILN_PROFILE", default_value = "minimal")]
    profile: String,
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
            profile: self.profile.parse().map_err(anyhow::Error::msg)?,
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
    pub api_keys: Vec<String>,
    pub runtime: kiln_runtime::RuntimeConfig,
    pub sessions: kiln_sessions::Config,
    pub max_body_bytes: usize,
    pub log_format: String,
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
            None => dirs::data_dir()
                .context("no user data directory; pass --data-dir")?
                .join("kiln"),
        };
        let cache_dir = match cli.cache_dir.or(file.cache_dir) {
            Some(d) => d,
            None => default_cache_dir()?,
        };
        let profile: kiln_runtime::Profile = pick!(profile, "minimal".to_string())
            .parse()
            .map_err(anyhow::Error::msg)?;
        let mut api_keys = if cli.api_keys.is_empty() {
            file.api_keys
        } else {
            cli.api_keys
        };
        api_keys.retain(|k| !k.trim().is_empty());
        let log_format = pick!(log_format, "text".to_string());
        anyhow::ensure!(
            log_format == "text" || log_format == "json",
            "--log-format must be `text` or `json`, not {log_format:?}"
        );
        let exec_timeout = pick!(exec_timeout, Duration::from_secs(600));
        let max_exec_timeout = pick!(max_exec_timeout, Duration::from_secs(3600));
        Ok(Settings {
            listen: pick!(listen, SocketAddr::from(([127, 0, 0, 1], 8787))),
            runtime: kiln_runtime::RuntimeConfig {
                profile,
                python: cli.python.or(file.python),
                cache_dir,
            },
            sessions: kiln_sessions::Config {
                sessions_dir: data_dir.join("sessions"),
                ttl: pick!(session_ttl, Duration::from_secs(3600)),
                exec_timeout,
                max_exec_timeout: max_exec_timeout.max(exec_timeout),
                interrupt_grace: Duration::from_secs(3),
                max_output_bytes: pick!(max_output_bytes, 10 << 20),
                pool_size: pick!(pool_size, 2),
                max_sessions: pick!(max_sessions, 256),
                max_sessions_per_key: pick!(max_sessions_per_key, 64),
                boot_timeout: Duration::from_secs(60),
            },
            max_body_bytes: pick!(max_body_bytes, 50 << 20),
            api_keys,
            data_dir,
            log_format,
        })
    }
}

fn default_cache_dir() -> anyhow::Result<PathBuf> {
    Ok(dirs::cache_dir()
        .context("no user cache directory; pass --cache-dir")?
        .join("kiln"))
}

fn load_file(explicit: Option<&std::path::Path>) -> anyhow::Result<ServeArgs> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match dirs::config_dir().map(|d| d.join("kiln").join("config.toml")) {
            Some(p) if p.is_file() => p,
            _ => return Ok(ServeArgs::default()),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("could not read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
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
