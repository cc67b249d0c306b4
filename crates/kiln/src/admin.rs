//! Operator commands that work on the store directly: `kiln keys
//! create|list|revoke` and `kiln usage`, on the data directory's SQLite
//! file or on the PostgreSQL a cluster shares (`--database`). Running
//! servers pick up key changes within about a second.

use crate::table::print_table;
use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_store::{Database, KeyOptions, KeyOrigin, NetworkPolicy, Store};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the store is.
#[derive(Debug, Args)]
pub struct DataDir {
    /// kiln's data directory [default: <user data dir>/kiln]
    #[arg(long, env = "KILN_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The PostgreSQL the servers share (`postgres://...`), as given to
    /// `kiln serve --database`; unset for the data directory's SQLite file
    #[arg(long, env = "KILN_DATABASE_URL", global = true, hide_env_values = true)]
    database: Option<String>,
}

impl DataDir {
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(dirs::data_dir().context("no user data directory; pass --data-dir")?.join("kiln")),
        }
    }

    pub(crate) async fn store(&self) -> anyhow::Result<Arc<dyn Store>> {
        let db = Database::from_setting(self.database.as_deref(), &self.path()?)?;
        if let Database::Sqlite(path) = &db {
            anyhow::ensure!(
                path.exists(),
                "no kiln database at {}: start `kiln serve` once, or pass the --data-dir (or --database) it uses",
                path.display()
            );
        }
        // This command writes no sessions, so its node name is only a label
        // (PostgreSQL shows it as the connection's application name).
        let opts = kiln_store::OpenOptions::new(format!("{}/admin", crate::config::default_node_id()?));
        kiln_store::open(&db, &opts)
            .await
            .with_context(|| format!("could not open kiln's database ({})", db.redacted()))
    }
}

/// `kiln keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key; it is shown once, only its hash is stored.
    Create {
        /// A name to recognise it by.
        #[arg(long, default_value = "created")]
        label: String,
        /// Live sessions it may have (below the server's per-key limit).
        #[arg(long)]
        max_sessions: Option<u64>,
        /// Executions it may run at once, 1 to 100000, instead of the
        /// server's --max-executions-per-key; its queue of waiting
        /// executions scales with it [default: the server's]
        #[arg(long, value_name = "N", alias = "max-concurrent-executions",
              value_parser = clap::value_parser!(u64).range(1..=kiln_protocol::MAX_KEY_EXECUTIONS))]
        max_executions_per_key: Option<u64>,
        /// Its sessions' network policy: none, registries (old name: pypi) or full; never wider
        /// than the server's --network.
        #[arg(long)]
        network: Option<NetworkPolicy>,
        /// Make it an admin key: it may list, create and revoke keys through
        /// the API (/v1/admin/keys) and the console page.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List the keys (ids, never the keys themselves).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke a key by id (`key_...`); its requests are refused from then on.
    Revoke {
        /// The key's id, as `kiln keys list` shows it.
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create { label, max_sessions, max_executions_per_key, network, admin, data } => {
            if let Some(asked) = network {
                let ceiling = server_network(&data.path()?)?;
                crate::ceiling::check("this key", asked, ceiling)?;
            }
            let store = data.store().await?;
            let key = kiln_server::generate_key();
            let options = KeyOptions { max_sessions, max_executions_per_key, network, admin };
            let rec = store.add_key(kiln_server::hash_key(&key), KeyOrigin::Created, &label, &options).await?;
            println!("{key}");
            eprintln!("created {} ({}); store the key now: kiln keeps only its hash", rec.id, rec.label);
        }
        KeysCommand::List { json, data } => {
            let keys = data.store().await?.keys().await?;
            if json {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "id": k.id, "origin": k.origin.as_str(), "label": k.label,
                            "created_at": k.created_at.to_rfc3339(),
                            "max_sessions": k.options.max_sessions, "network": k.options.network,
                            "max_executions_per_key": k.options.max_executions_per_key,
                            "admin": k.options.admin,
                            "revoked_at": k.revoked_at.map(|t| t.to_rfc3339()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let rows = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.origin.to_string(),
                            k.label.clone(),
                            k.created_at.format("%Y-%m-%d %H:%M").to_string(),
                            k.options.network.map_or_else(|| "server".into(), |n| n.to_string()),
                            k.options.max_sessions.map_or_else(|| "server".into(), |n| n.to_string()),
                            k.options.max_executions_per_key.map_or_else(|| "server".into(), |n| n.to_string()),
                            if k.options.admin { "yes".into() } else { "no".into() },
                            if k.revoked_at.is_some() { "revoked".into() } else { "active".into() },
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "ORIGIN",
                        "LABEL",
                        "CREATED",
                        "NETWORK",
                        "MAX SESSIONS",
                        "MAX EXECUTIONS",
                        "ADMIN",
                        "STATUS",
                    ],
                    rows,
                );
            }
        }
        KeysCommand::Revoke { id, data } => {
            anyhow::ensure!(data.store().await?.revoke_key(&id).await?, "no key {id}; `kiln keys list` shows the ids");
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

/// The network policy of the server on `data_dir`: what its last start
/// recorded there, or else what `kiln serve` would start with now (the
/// config file and `KILN_NETWORK` over the default).
fn server_network(data_dir: &std::path::Path) -> anyhow::Result<kiln_protocol::NetworkPolicy> {
    if let Some(p) = crate::ceiling::recorded(data_dir)? {
        return Ok(p);
    }
    use clap::{Args as _, FromArgMatches as _};
    let matches =
        crate::config::ServeArgs::augment_args(clap::Command::new("serve")).try_get_matches_from(["serve"])?;
    let args = crate::config::ServeArgs::from_arg_matches(&matches)?;
    Ok(crate::config::Settings::resolve(args)?.network)
}

/// `kiln usage`: what every key has used.
pub async fn usage(json: bool, data: DataDir) -> anyhow::Result<()> {
    let all = data.store().await?.usage_all().await?;
    if json {
        let rows: Vec<_> = all
            .iter()
            .map(|u| {
                serde_json::json!({
                    "key_id": u.key_id, "sessions_started": u.sessions_started, "executions": u.executions,
                    "execution_seconds": u.execution_seconds, "cpu_seconds": u.cpu_seconds,
                    "peak_memory_bytes": u.peak_memory_bytes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let rows = all
        .iter()
        .map(|u| {
            vec![
                u.key_id.clone(),
                u.sessions_started.to_string(),
                u.executions.to_string(),
                format!("{:.1}", u.execution_seconds),
                format!("{:.1}", u.cpu_seconds),
                format!("{} MiB", u.peak_memory_bytes >> 20),
            ]
        })
        .collect();
    print_table(&["KEY", "SESSIONS", "EXECUTIONS", "EXEC SECONDS", "CPU SECONDS", "PEAK MEMORY"], rows);
    Ok(())
}
