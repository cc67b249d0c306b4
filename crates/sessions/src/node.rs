//! Who this node is, as session ids say it.
//!
//! A session id is `ses_` followed by 32 letters and digits: a 4-character
//! tag of the node (from a SHA-256 of its node id), the 6-character random
//! incarnation of the process that created it, and 22 random characters
//! (131 bits: the id stays unguessable). Any node can read from an id alone
//! which node and which incarnation hold the session, with no lookup. Ids of
//! the older format (`ses_` and 24 random characters) name no node.

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

/// Characters of the node tag.
const TAG_LEN: usize = 4;
/// Characters of the incarnation.
const INCARNATION_LEN: usize = 6;
/// Random characters after them.
const RANDOM_LEN: usize = 22;
/// Letters and digits after `ses_`.
pub const ID_CHARS: usize = TAG_LEN + INCARNATION_LEN + RANDOM_LEN;

/// This node and this process's incarnation of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `--node-id`.
    pub node_id: String,
    /// The tag ids carry for it.
    pub tag: String,
    /// Random, new at every start (and after a lost lease).
    pub incarnation: String,
}

impl Identity {
    /// A fresh incarnation of `node_id`.
    pub fn new(node_id: &str) -> Identity {
        Identity {
            node_id: node_id.to_string(),
            tag: tag_of(node_id),
            incarnation: Alphanumeric.sample_string(&mut rand::rng(), INCARNATION_LEN),
        }
    }

    /// A new session id owned by this incarnation.
    pub fn mint(&self) -> String {
        format!("ses_{}{}{}", self.tag, self.incarnation, Alphanumeric.sample_string(&mut rand::rng(), RANDOM_LEN))
    }
}

/// The tag of `node_id`: 4 base-62 characters of its SHA-256.
pub fn tag_of(node_id: &str) -> String {
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let hash = Sha256::digest(node_id.as_bytes());
    let mut n = u64::from_be_bytes([hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7]]);
    (0..TAG_LEN)
        .map(|_| {
            let d = DIGITS[(n % 62) as usize];
            n /= 62;
            char::from(d)
        })
        .collect()
}

/// The node tag and incarnation an id names, if it is of the node-naming
/// format.
pub fn owner_of(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("ses_")?;
    if rest.len() != ID_CHARS || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some((&rest[..TAG_LEN], &rest[TAG_LEN..TAG_LEN + INCARNATION_LEN]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_names_its_node_and_incarnation_and_nothing_else_parses() {
        let me = Identity::new("node-a");
        let id = me.mint();
        assert_eq!(id.len(), 4 + ID_CHARS);
        assert_eq!(owner_of(&id), Some((me.tag.as_str(), me.incarnation.as_str())));
        assert_ne!(me.mint(), id, "the random part differs");
        assert_eq!(tag_of("node-a"), me.tag, "the tag is stable");
        assert_ne!(tag_of("node-b"), me.tag);
        assert_ne!(Identity::new("node-a").incarnation, me.incarnation, "a new start is a new incarnation");
        for bad in ["ses_abc", "x", "", &id.replace("ses_", "sez_"), &format!("{id}x"), &id.replacen('a', "-", 1)] {
            if bad.len() == id.len() && bad.starts_with("ses_") && bad[4..].bytes().all(|b| b.is_ascii_alphanumeric()) {
                continue;
            }
            assert_eq!(owner_of(bad), None, "{bad}");
        }
        // The older format names no node.
        assert_eq!(owner_of("ses_abcdefghijklmnopqrstuvwx"), None);
    }
}
