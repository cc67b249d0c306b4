//! The steps of sandbox set-up and the exit code of each, as one table used
//! by both sides: the helper and init exit with a step's code when it fails
//! ([`crate::init`]), and the server names the step when it reports a
//! kernel's exit ([`crate::Exit`]).
//!
//! The codes avoid everything else a sandbox's processes may exit with:
//! 1 and 2 (errors of the program itself), 101 (a Rust panic), 120 (an
//! exception in the zygote's child), 126 and 127 (a shell's "cannot
//! execute" and "not found"), and 128+N (killed by signal N, reported by
//! init for its program).

/// One step of sandbox set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    ReadPolicy,
    JoinCgroup,
    Pipe,
    Unshare,
    MapIds,
    ForkInit,
    Rootfs,
    Limits,
    ForkProgram,
    DropPrivileges,
    Landlock,
    Seccomp,
    Exec,
    /// The server (or the zygote, or the helper) went away while the
    /// sandbox was being built.
    Orphaned,
}

/// Each step, its exit code and what it does, for messages.
const TABLE: &[(Step, i32, &str)] = &[
    (Step::ReadPolicy, 80, "reading the sandbox description"),
    (Step::JoinCgroup, 81, "joining the session's cgroups"),
    (Step::Pipe, 82, "creating the set-up pipes"),
    (Step::Unshare, 83, "creating the namespaces"),
    (Step::MapIds, 84, "mapping the user namespace's ids"),
    (Step::ForkInit, 85, "starting the sandbox's init"),
    (Step::Rootfs, 86, "building the root filesystem"),
    (Step::Limits, 87, "setting resource limits"),
    (Step::ForkProgram, 88, "starting the program"),
    (Step::DropPrivileges, 89, "dropping privileges"),
    (Step::Landlock, 90, "applying landlock"),
    (Step::Seccomp, 91, "installing the seccomp filter"),
    (Step::Exec, 92, "executing the program"),
    (Step::Orphaned, 93, "staying attached to the server (it went away)"),
];

impl Step {
    /// The exit code of this step's failure.
    pub(crate) fn code(self) -> i32 {
        TABLE.iter().find(|(s, _, _)| *s == self).map_or(1, |(_, c, _)| *c)
    }

    /// The step whose failure exits with `code`, if any.
    pub(crate) fn from_code(code: i32) -> Option<Step> {
        TABLE.iter().find(|(_, c, _)| *c == code).map(|(s, _, _)| *s)
    }

    /// What the step does.
    pub(crate) fn describe(self) -> &'static str {
        TABLE.iter().find(|(s, _, _)| *s == self).map_or("", |(_, _, d)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_has_its_own_code_that_collides_with_no_other_exit() {
        let mut seen = std::collections::HashSet::new();
        for (step, code, _) in TABLE {
            assert!(seen.insert(*code), "{step:?} shares code {code}");
            assert_eq!(Step::from_code(*code), Some(*step));
            assert_eq!(step.code(), *code);
            // Not a panic (101), an exception (1, 120), a shell's 126/127,
            // nor a signal status (128+N).
            assert!(![1, 2, 101, 120, 126, 127].contains(code) && *code < 128, "{step:?}: {code}");
        }
        assert_eq!(Step::from_code(101), None);
        assert_eq!(Step::from_code(137), None);
    }
}
