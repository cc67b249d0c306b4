//! `kiln serve`: open the store, settle the API keys, bind, provision the
//! runtime in the background, and serve until SIGTERM/SIGINT.

use crate::config::Settings;
use anyhow::Context;
use kiln_server::{app, hash_key, normalize_path, AppState, KeyEntry, KeyRing};
use kiln_sessions::{Manager, Readiness};
use kiln_store::{KeyOptions, KeyOrigin, Store};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tower::ServiceExt as _;

/// Logs go to stderr; stdout carries only the ready line and the first-start
/// key banner, so scripts can read them.
pub fn init_logging(format: crate::choices::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zeromq=error"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == crate::choices::LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn serve(s: Settings) -> anyhow::Result<()> {
    if s.sessions.sandbox.is_some() && !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!(
            "the session sandbox needs root (user namespaces with id maps, cgroups, mounts): \
             run kiln as root, or pass --sandbox none to run sessions without any isolation \
             (trusted code only)"
        );
    }
    if s.sessions.sandbox.is_none() {
        tracing::warn!("--sandbox none: sessions run WITHOUT isolation; never run untrusted code like this");
    }
    crate::fds::ensure(&crate::fds::Budget::of(&s))?;
    create_private_dir(&s.data_dir)?;
    create_private_dir(&s.sessions.sessions_dir)?;
    let store = kiln_store::open(&s.database, &kiln_store::OpenOptions::new(s.node_id.clone()))
        .await
        .with_context(|| format!("could not open kiln's database ({})", s.database.redacted()))?;
    tracing::info!(database = %s.database.redacted(), node = %s.node_id, "store opened");
    let version = store.keys_version().await?;
    let configured = settle_keys(&s, store.as_ref()).await?;
    crate::ceiling::record(&s.data_dir, s.network)?;
    let clamp = Arc::new(crate::ceiling::Clamp::new(s.network));
    let keys = Arc::new(KeyRing::new(clamp.apply(accepted_keys(&configured, store.as_ref()).await?)));
    tokio::spawn(reload_keys(keys.clone(), configured, store.clone(), version, clamp));

    let manager = Manager::new(s.sessions.clone(), store.clone());
    // From here on the server holds its place on the host (its registration,
    // cgroups and the tmpfs of its kernel directories): a start that fails
    // before it serves gives that back, as a stop does.
    let (cluster, listener, addr) = match take_place(&s, &manager, &store).await {
        Ok(placed) => placed,
        Err(e) => {
            manager.shutdown().await;
            return Err(e);
        }
    };

    // Provision in the background so /healthz can say "starting" meanwhile.
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    {
        let manager = manager.clone();
        let runtime_cfg = s.runtime.clone();
        tokio::spawn(async move {
            let built = tokio::task::spawn_blocking(move || {
                let mut progress = kiln_runtime::Progress::auto();
                kiln_runtime::ensure(&runtime_cfg, &mut progress)
            })
            .await;
            let result = match built {
                Ok(Ok(runtime)) => {
                    let root = runtime.root.clone();
                    manager.start(runtime).await.map(|()| root).map_err(anyhow::Error::from)
                }
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("could not provision the Python runtime")),
                Err(e) => Err(anyhow::Error::from(e)),
            };
            match result {
                Ok(root) => {
                    println!("kiln ready on http://{addr} (runtime {})", root.display());
                    let _ = std::io::stdout().flush();
                }
                Err(e) => {
                    manager.set_readiness(Readiness::Failed(format!("{e:#}")));
                    let _ = fatal_tx.send(e).await;
                }
            }
        });
    }

    let state = AppState { manager: manager.clone(), keys, max_body_bytes: s.max_body_bytes, cluster: cluster.clone() };
    let service = app(state).map_request(normalize_path);
    let fatal = Arc::new(std::sync::Mutex::new(None::<anyhow::Error>));
    let grace = s.shutdown_grace;
    let shutdown = {
        let fatal = fatal.clone();
        let manager = manager.clone();
        let cluster = cluster.clone();
        async move {
            tokio::select! {
                _ = shutdown_signal() => {
                    // Draining: the lease says so at once, so peers place
                    // new sessions elsewhere; this node's sessions still
                    // answer while running cells finish.
                    if let Some(c) = &cluster {
                        c.membership.drain().await;
                    }
                    tracing::info!(grace = ?grace, "shutting down: no new connections; running executions may finish");
                    // Past the grace period, end every session: the requests
                    // still running get `shutting_down` and the server exits.
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        manager.shutdown().await;
                    });
                }
                // Only a provisioning failure stops the server; the sender
                // is dropped (None) after a success, which must not.
                Some(e) = fatal_rx.recv() => {
                    *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
        }
    };
    axum::serve(listener, crate::http::MakeTracked::new(service))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")?;
    manager.shutdown().await;
    if let Some(c) = &cluster {
        c.membership.leave().await;
    }
    let fatal = fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Keys created or revoked with `kiln keys` (or on another node) apply
/// within about a second: the store's keys version is polled (one tiny
/// query), and the keys are read again only when it moved. While the
/// database is unavailable the last keys stay in force.
async fn reload_keys(
    keys: Arc<KeyRing>,
    configured: Vec<KeyEntry>,
    store: Arc<dyn Store>,
    mut seen: u64,
    clamp: Arc<crate::ceiling::Clamp>,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // The version is read before the keys: a change in between is
        // picked up by the next round, never lost.
        // A key created or revoked through the API while the store is read
        // is not undone by this (possibly older) list.
        let since = keys.changes();
        let reloaded = match store.keys_version().await {
            Ok(v) if v == seen => Ok(None),
            Ok(v) => accepted_keys(&configured, store.as_ref()).await.map(|k| Some((v, k))),
            Err(e) => Err(e.into()),
        };
        match reloaded {
            Ok(found) => {
                if failing {
                    tracing::info!("API keys can be read again");
                }
                failing = false;
                if let Some((v, k)) = found {
                    // Skipped after an API change: that change moved the
                    // version too, so the next round reads the keys again.
                    keys.replace_unless_changed(since, clamp.apply(k));
                    seen = v;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %format!("{e:#}"), "could not reload API keys; the last ones stay in force");
                }
                failing = true;
            }
        }
    }
}

/// Register the configured keys in the store and, on a first start with no
/// key at all, generate one, save it (0600) and show it once. Returns the
/// configured keys (with their policies). The operator's key is an admin
/// key: the first configured one, or the generated one.
async fn settle_keys(s: &Settings, store: &dyn Store) -> anyhow::Result<Vec<KeyEntry>> {
    let mut configured = Vec::new();
    // All checked before any is registered.
    for (i, k) in s.api_keys.iter().enumerate() {
        if let (_, Some(asked)) = split_policy(k) {
            crate::ceiling::check(&format!("--api-key number {}", i + 1), asked, s.network)?;
        }
    }
    for (i, k) in s.api_keys.iter().enumerate() {
        let (key, network) = split_policy(k);
        let rec = store.add_key(hash_key(key), KeyOrigin::Configured, "configured", &KeyOptions::default()).await?;
        configured.push(KeyEntry {
            id: rec.id,
            hash: rec.hash,
            network,
            max_sessions: None,
            max_executions_per_key: None,
            admin: i == 0,
        });
    }
    let managed = store.keys().await?.into_iter().filter(|r| r.origin.is_managed() && r.revoked_at.is_none()).count();
    if !configured.is_empty() || managed > 0 {
        return Ok(configured);
    }
    let key = kiln_server::generate_key();
    let path = s.data_dir.join("api-key");
    write_secret(&path, &key).with_context(|| format!("could not save the API key to {}", path.display()))?;
    store
        .add_key(
            hash_key(&key),
            KeyOrigin::Generated,
            "generated",
            &KeyOptions { admin: true, ..KeyOptions::default() },
        )
        .await?;
    let url = format!("http://{}", s.listen);
    println!(
        "Created an API key (saved in {path}, mode 0600; only its hash is in the database):\n\n    {key}\n\n\
         Try it:\n\n    curl -X POST {url}/tci/execute \\\n      -H \"Authorization: Bearer {key}\" \\\n      \
         -H \"Content-Type: application/json\" \\\n      -d '{{\"language\": \"python\", \"code\": \"print(42)\"}}'\n",
        path = path.display()
    );
    Ok(configured)
}

/// The accepted keys: the configured ones, and those kept in the store
/// (generated, or made with `kiln keys create`), minus revoked ones.
pub async fn accepted_keys(configured: &[KeyEntry], store: &dyn Store) -> anyhow::Result<Vec<KeyEntry>> {
    let stored = store.keys().await?;
    let revoked = |id: &str| stored.iter().any(|r| r.id == id && r.revoked_at.is_some());
    let mut keys: Vec<KeyEntry> = configured.iter().filter(|k| !revoked(&k.id)).cloned().collect();
    keys.extend(stored.iter().filter(|r| r.origin.is_managed() && r.revoked_at.is_none()).map(|r| KeyEntry {
        id: r.id.clone(),
        hash: r.hash,
        network: r.options.network,
        max_sessions: r.options.max_sessions,
        max_executions_per_key: r.options.max_executions_per_key,
        admin: r.options.admin,
    }));
    Ok(keys)
}

/// `KEY:none` → (`KEY`, Some(None policy)); a key without a known policy
/// suffix is taken whole.
fn split_policy(k: &str) -> (&str, Option<kiln_sessions::NetworkPolicy>) {
    match k.rsplit_once(':') {
        Some((key, policy)) if !key.is_empty() => match policy.parse() {
            Ok(network) => (key, Some(network)),
            Err(_) => (k, None),
        },
        _ => (k, None),
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    writeln!(f, "{secret}")?;
    f.sync_all()
}

/// Take the server's place: clean up after a previous run (and claim the
/// host's resources), join the cluster when one is configured, and bind
/// the listener.
async fn take_place(
    s: &Settings,
    manager: &Manager,
    store: &Arc<dyn Store>,
) -> anyhow::Result<(Option<Arc<kiln_server::Cluster>>, crate::http::Listener, std::net::SocketAddr)> {
    manager.recover().await.context("could not clean up after a previous run")?;

    // One of a cluster: register (a fresh incarnation) and keep the lease.
    let cluster = match &s.cluster {
        None => None,
        Some(c) => {
            if s.database.is_sqlite() {
                tracing::warn!(
                    "--advertise with the SQLite store: only nodes on this host can share it; use --database \
                    postgres://… for a real cluster"
                );
            }
            let membership =
                kiln_sessions::Membership::join(manager.clone(), store.clone(), Some(c.advertise.clone()), c.lease)
                    .await
                    .context("could not register this node in the database")?;
            Some(Arc::new(
                kiln_server::Cluster::new(membership, &c.secret.0, s.http.idle_timeout).map_err(anyhow::Error::msg)?,
            ))
        }
    };

    let bound: std::io::Result<_> = async {
        let listener = tokio::net::TcpListener::bind(s.listen).await?;
        let addr = listener.local_addr()?;
        Ok((listener, addr))
    }
    .await;
    match bound {
        Ok((listener, addr)) => Ok((cluster, crate::http::Listener::new(listener, s.http), addr)),
        Err(e) => {
            if let Some(c) = &cluster {
                c.membership.leave().await;
            }
            Err(anyhow::Error::from(e)
                .context(format!("could not listen on {}; is another kiln running? (--listen)", s.listen)))
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("could not create {}", dir.display()))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
