//! The operator's `--network` is the ceiling of every key's network policy:
//! a key can narrow it, never widen it.
//!
//! Asking for more is an error where the key is made: `kiln serve` refuses
//! to start with `--api-key KEY:full` under `--network none`, and `kiln keys
//! create --network full` is refused for a data directory whose server runs
//! narrower (each `kiln serve` records its policy in the data directory for
//! that check). A stored key that exceeds the ceiling later (the server was
//! restarted narrower) is clamped to it, with a warning.

use anyhow::Context;
use kiln_protocol::NetworkPolicy;
use kiln_server::KeyEntry;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file, in the data directory, that holds the policy of the server
/// that last started on it.
fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("network-policy")
}

/// Record `ceiling` as this data directory's server policy.
pub fn record(data_dir: &Path, ceiling: NetworkPolicy) -> anyhow::Result<()> {
    let path = record_path(data_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{ceiling}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("could not record the network policy in {}", path.display()))
}

/// The policy recorded by the last server on `data_dir`, if any. A file
/// that does not hold a policy is an error, never a silent default.
pub fn recorded(data_dir: &Path) -> anyhow::Result<Option<NetworkPolicy>> {
    let path = record_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let policy = text.trim().parse().with_context(|| format!("{} is damaged", path.display()))?;
            Ok(Some(policy))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("could not read {}", path.display())),
    }
}

/// A configured key's policy, checked against the ceiling; `which` names
/// the key in the message (never the key itself).
pub fn check(which: &str, asked: NetworkPolicy, ceiling: NetworkPolicy) -> anyhow::Result<NetworkPolicy> {
    asked.within(ceiling).with_context(|| format!("{which} asks for network policy {asked}"))
}

/// Clamps stored keys to the ceiling, warning once per key.
#[derive(Debug)]
pub struct Clamp {
    ceiling: NetworkPolicy,
    warned: Mutex<HashSet<String>>,
}

impl Clamp {
    pub fn new(ceiling: NetworkPolicy) -> Self {
        Clamp { ceiling, warned: Mutex::new(HashSet::new()) }
    }

    /// `keys` with every policy above the ceiling lowered to it.
    pub fn apply(&self, mut keys: Vec<KeyEntry>) -> Vec<KeyEntry> {
        for k in &mut keys {
            let Some(asked) = k.network else { continue };
            if asked.within(self.ceiling).is_ok() {
                continue;
            }
            k.network = Some(self.ceiling);
            if self.warned.lock().unwrap_or_else(|p| p.into_inner()).insert(k.id.clone()) {
                tracing::warn!(
                    key = %k.id,
                    key_policy = %asked,
                    server_policy = %self.ceiling,
                    "this key's network policy is wider than the server's --network; its sessions get the server's"
                );
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, network: Option<NetworkPolicy>) -> KeyEntry {
        KeyEntry {
            id: id.into(),
            hash: [0; 32],
            network,
            max_sessions: None,
            max_executions_per_key: None,
            admin: false,
        }
    }

    #[test]
    fn stored_keys_above_the_ceiling_are_clamped_and_narrower_ones_kept() {
        let clamp = Clamp::new(NetworkPolicy::Registries);
        let keys = clamp.apply(vec![
            key("a", Some(NetworkPolicy::Full)),
            key("b", Some(NetworkPolicy::None)),
            key("c", None),
            key("d", Some(NetworkPolicy::Registries)),
        ]);
        let got: Vec<_> = keys.iter().map(|k| k.network).collect();
        assert_eq!(
            got,
            [Some(NetworkPolicy::Registries), Some(NetworkPolicy::None), None, Some(NetworkPolicy::Registries)]
        );
    }

    #[test]
    fn a_configured_key_above_the_ceiling_is_an_error_that_names_it() {
        let e = check("the 2nd --api-key", NetworkPolicy::Full, NetworkPolicy::None).err().map(|e| format!("{e:#}"));
        let e = e.unwrap_or_default();
        assert!(e.contains("the 2nd --api-key asks for network policy full"), "{e}");
        assert!(e.contains("wider than this server's --network none"), "{e}");
        assert!(check("k", NetworkPolicy::None, NetworkPolicy::Registries).is_ok());
    }

    #[test]
    fn the_recorded_policy_round_trips_and_a_damaged_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(recorded(dir.path()), Ok(None)));
        assert!(record(dir.path(), NetworkPolicy::None).is_ok());
        assert!(matches!(recorded(dir.path()), Ok(Some(NetworkPolicy::None))));
        std::fs::write(record_path(dir.path()), "wide open\n").unwrap_or_default();
        assert!(recorded(dir.path()).is_err());
    }
}
