//! Bearer API keys.
//!
//! Only SHA-256 hashes of keys are held, here and in the store. A presented
//! key is hashed and compared with every known hash in constant time, with
//! no early exit, so neither the comparison nor the position of a match
//! leaks through timing.

use kiln_sessions::{Caller, NetworkPolicy};
use sha2::{Digest, Sha256};
use std::sync::RwLock;
use subtle::ConstantTimeEq;

/// SHA-256 of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// One accepted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Its id.
    pub id: String,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Its own network policy, if not the server's.
    pub network: Option<NetworkPolicy>,
    /// Its own live-session limit.
    pub max_sessions: Option<u64>,
    /// Its own limit of executions at once.
    pub max_executions_per_key: Option<u64>,
    /// Whether it may use the admin endpoints.
    pub admin: bool,
}

/// The accepted keys.
#[derive(Debug, Default)]
pub struct KeyRing {
    ring: RwLock<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    keys: Vec<KeyEntry>,
    /// Keys inserted or removed through the admin endpoints, counted so that
    /// a reload read from the store before such a change cannot undo it.
    changes: u64,
}

impl KeyRing {
    /// A ring of these keys.
    pub fn new(keys: Vec<KeyEntry>) -> Self {
        KeyRing { ring: RwLock::new(Ring { keys, changes: 0 }) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the accepted keys (after keys were created or revoked).
    pub fn replace(&self, keys: Vec<KeyEntry>) {
        self.write().keys = keys;
    }

    /// How many keys were inserted or removed so far; pass it to
    /// [`KeyRing::replace_unless_changed`].
    pub fn changes(&self) -> u64 {
        self.read().changes
    }

    /// Replace the accepted keys with a list read from the store, unless a
    /// key was inserted or removed since [`KeyRing::changes`] said `since`
    /// (the list may predate it; the next reload will include it).
    pub fn replace_unless_changed(&self, since: u64, keys: Vec<KeyEntry>) {
        let mut ring = self.write();
        if ring.changes == since {
            ring.keys = keys;
        }
    }

    /// Accept a key now (it was just stored).
    pub fn insert(&self, entry: KeyEntry) {
        let mut ring = self.write();
        ring.keys.retain(|k| k.id != entry.id);
        ring.keys.push(entry);
        ring.changes += 1;
    }

    /// Refuse a key from now on (it was just revoked).
    pub fn remove(&self, id: &str) {
        let mut ring = self.write();
        ring.keys.retain(|k| k.id != id);
        ring.changes += 1;
    }

    /// The accepted key `id`, if it is accepted.
    pub fn get(&self, id: &str) -> Option<KeyEntry> {
        self.read().keys.iter().find(|k| k.id == id).cloned()
    }

    /// Whether the accepted key `id` is an admin key.
    pub fn is_admin(&self, id: &str) -> bool {
        self.read().keys.iter().any(|k| k.id == id && k.admin)
    }

    /// Who presented `presented`, if it is an accepted key.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let h = hash_key(presented);
        let ring = self.read();
        let mut found = None;
        for k in ring.keys.iter() {
            if bool::from(k.hash.ct_eq(&h)) {
                found = Some(Caller {
                    key_id: k.id.clone(),
                    network: k.network,
                    max_sessions: k.max_sessions,
                    max_executions_per_key: k.max_executions_per_key,
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_known_key_authenticates_and_yields_its_id() {
        let entry = |id: &str, key: &str, network| KeyEntry {
            id: id.into(),
            hash: hash_key(key),
            network,
            max_sessions: None,
            max_executions_per_key: None,
            admin: false,
        };
        let ring =
            KeyRing::new(vec![entry("key_a", "secret-a", None), entry("key_b", "secret-b", Some(NetworkPolicy::None))]);
        assert_eq!(
            ring.authenticate("secret-b"),
            Some(Caller {
                key_id: "key_b".into(),
                network: Some(NetworkPolicy::None),
                max_sessions: None,
                max_executions_per_key: None
            })
        );
        assert_eq!(ring.authenticate("secret-c"), None);
        assert_eq!(ring.authenticate(""), None);
    }

    #[test]
    fn a_reload_read_before_a_key_was_created_or_revoked_does_not_undo_it() {
        let entry = |id: &str, admin| KeyEntry {
            id: id.into(),
            hash: hash_key(id),
            network: None,
            max_sessions: None,
            max_executions_per_key: None,
            admin,
        };
        let ring = KeyRing::new(vec![entry("key_admin", true)]);
        assert!(ring.is_admin("key_admin") && !ring.is_admin("key_new"));
        // A reload starts, reads the store; meanwhile a key is created.
        let since = ring.changes();
        let stale = vec![entry("key_admin", true)];
        ring.insert(entry("key_new", false));
        ring.replace_unless_changed(since, stale.clone());
        assert!(ring.authenticate("key_new").is_some(), "the stale list did not drop the new key");
        assert!(!ring.is_admin("key_new"));
        // The next reload, read after the change, applies.
        let since = ring.changes();
        ring.replace_unless_changed(since, stale);
        assert!(ring.authenticate("key_new").is_none());
        ring.remove("key_admin");
        assert!(ring.authenticate("key_admin").is_none() && !ring.is_admin("key_admin"));
    }
}
