//! The network policy of a session: what its code may reach.
//!
//! One type for the concept wherever it appears: the server's `--network`
//! ceiling, a key's own policy in the store and in `kiln keys`, and the
//! policy a session is booted with. Policies are ordered by what they allow
//! (`none` < `registries` < `full`: the package registries are public HTTPS
//! hosts, so everything `registries` reaches `full` reaches too), which makes the operator's
//! flag a ceiling: a key can narrow it, never widen it ([`NetworkPolicy::within`]).

use serde::{Deserialize, Serialize};

/// What a session may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// Nothing at all: the session's network namespace has only loopback
    /// and no proxy.
    None,
    /// Only the package registries this machine is configured for: pip's
    /// index and npm's registry (Deno's `npm:` imports), over HTTPS,
    /// through kiln's egress proxy. `pypi`, its first name, is accepted too.
    #[serde(alias = "pypi")]
    Registries,
    /// Public addresses over HTTP(S) through kiln's egress proxy; never this
    /// host or a private network.
    Full,
}

impl NetworkPolicy {
    /// Every policy, narrowest first.
    pub const ALL: [NetworkPolicy; 3] = [NetworkPolicy::None, NetworkPolicy::Registries, NetworkPolicy::Full];

    /// The policy's name, as written in flags, the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPolicy::None => "none",
            NetworkPolicy::Registries => "registries",
            NetworkPolicy::Full => "full",
        }
    }

    /// The name the store keeps. `registries` is stored under its first
    /// name, `pypi`, so databases written before the rename (and their
    /// `CHECK` constraints) stay valid, and older nodes sharing a database
    /// can read it.
    pub fn stored_name(self) -> &'static str {
        match self {
            NetworkPolicy::Registries => "pypi",
            other => other.as_str(),
        }
    }

    /// Whether egress is allowed at all (a proxy is needed).
    pub fn allows_egress(self) -> bool {
        self != NetworkPolicy::None
    }

    /// `self` if the `ceiling` allows it; otherwise the error to show the
    /// operator.
    pub fn within(self, ceiling: NetworkPolicy) -> Result<NetworkPolicy, PolicyAboveCeiling> {
        if self <= ceiling {
            Ok(self)
        } else {
            Err(PolicyAboveCeiling { asked: self, ceiling })
        }
    }
}

impl std::fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown network policy {0:?}: use none, registries (or its old name pypi) or full")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for NetworkPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "pypi" {
            return Ok(NetworkPolicy::Registries);
        }
        NetworkPolicy::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

/// A key asked for more network than the server allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "network policy {asked} is wider than this server's --network {ceiling}; a key can only narrow the \
     server's policy (use {ceiling} or narrower, or raise the server's --network)"
)]
pub struct PolicyAboveCeiling {
    /// What was asked for.
    pub asked: NetworkPolicy,
    /// The server's policy.
    pub ceiling: NetworkPolicy,
}

#[cfg(test)]
mod tests {
    use super::NetworkPolicy::{self, Full, None, Registries};

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in NetworkPolicy::ALL {
            assert_eq!(p.as_str().parse::<NetworkPolicy>(), Ok(p));
            assert_eq!(serde_json::to_value(p).ok(), Some(serde_json::json!(p.as_str())));
        }
        assert!("FULL".parse::<NetworkPolicy>().is_err());
        for p in NetworkPolicy::ALL {
            assert_eq!(p.stored_name().parse::<NetworkPolicy>(), Ok(p));
        }
        assert!("".parse::<NetworkPolicy>().is_err());
    }

    #[test]
    fn pypi_is_the_old_name_of_the_registries_policy() {
        assert_eq!("pypi".parse::<NetworkPolicy>(), Ok(Registries));
        assert_eq!(serde_json::from_value::<NetworkPolicy>(serde_json::json!("pypi")).ok(), Some(Registries));
        assert_eq!(Registries.as_str(), "registries");
        assert_eq!(Registries.stored_name(), "pypi");
    }

    #[test]
    fn a_key_can_narrow_the_server_s_policy_but_never_widen_it() {
        assert_eq!(None.within(Full), Ok(None));
        assert_eq!(Registries.within(Registries), Ok(Registries));
        assert!(Full.within(Registries).is_err());
        assert!(Registries.within(None).is_err());
        let msg = Full.within(None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("wider than this server's --network none"), "{msg}");
    }
}
