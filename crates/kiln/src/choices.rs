//! The closed sets of values `kiln serve` and `kiln runtime build` accept,
//! as types: clap lists them in `--help` and refuses anything else with the
//! valid choices named, and the config file is checked by serde against the
//! same names. Each maps onto the type of the crate that uses it.

use clap::ValueEnum;
use serde::Deserialize;

/// `--sandbox`: how sessions are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Namespaces, cgroups, seccomp and landlock (needs root).
    Namespaces,
    /// No isolation at all: for trusted code and development only.
    #[value(name = "none")]
    #[serde(rename = "none")]
    Unisolated,
}

/// `--kernel`: which kernel runs Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    /// kiln's lean kernel on IPython's shell.
    Lean,
    /// The reference, ipykernel.
    Ipykernel,
}

impl From<KernelChoice> for kiln_kernel::KernelKind {
    fn from(k: KernelChoice) -> Self {
        match k {
            KernelChoice::Lean => kiln_kernel::KernelKind::Lean,
            KernelChoice::Ipykernel => kiln_kernel::KernelKind::Ipykernel,
        }
    }
}

/// `--zygote`: fork kernels from a pre-imported process, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZygoteMode {
    On,
    Off,
}

/// `--profile`: the runtime's package set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileChoice {
    /// The packages the TCI documentation lists.
    Full,
    /// The kernel, matplotlib, numpy and pandas.
    Minimal,
}

impl From<ProfileChoice> for kiln_runtime::Profile {
    fn from(p: ProfileChoice) -> Self {
        match p {
            ProfileChoice::Full => kiln_runtime::Profile::Full,
            ProfileChoice::Minimal => kiln_runtime::Profile::Minimal,
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `--network` (and a key's `KEY:policy`): parsed by the policy's own
/// `FromStr`, so the CLI, the config file and the API accept one set of names.
pub fn parse_network(s: &str) -> Result<kiln_protocol::NetworkPolicy, String> {
    s.parse().map_err(|e| format!("{e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_is_spelled_the_same_on_the_command_line_and_in_the_config_file() {
        fn same<T: ValueEnum + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>() {
            use serde::de::IntoDeserializer;
            for v in T::value_variants() {
                let name = v.to_possible_value().unwrap().get_name().to_string();
                let d: serde::de::value::StrDeserializer<serde::de::value::Error> = name.as_str().into_deserializer();
                assert_eq!(&T::deserialize(d).unwrap(), v, "{name}");
            }
        }
        same::<SandboxMode>();
        same::<KernelChoice>();
        same::<ZygoteMode>();
        same::<ProfileChoice>();
        same::<LogFormat>();
    }

    #[test]
    fn an_unknown_network_policy_is_refused_with_its_name() {
        assert!(parse_network("everything").unwrap_err().contains("everything"));
        assert_eq!(parse_network("none"), Ok(kiln_protocol::NetworkPolicy::None));
    }
}
