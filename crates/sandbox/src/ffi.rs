//! The C entry point of the sandbox, for the zygote.
//!
//! The zygote (see [`crate::zygote`]) is a Python process that has already
//! imported the kernel and the heavy packages. It loads this crate as a
//! shared library (`libkiln_sandbox.so`, built beside the `kiln` binary) and,
//! in each freshly forked child, calls [`kiln_sandbox_enter`], which runs
//! exactly the steps the `kiln __sandbox-init` helper runs (see
//! [`crate::init`]) and returns only in the confined program process. The
//! child then goes on to run the kernel in the memory it shares,
//! copy-on-write, with the zygote.

use crate::jail::Jail;
use std::io::Write;

/// Build the sandbox described by the JSON [`Jail`] in `jail[..len]` around
/// the calling process. Returns 0 in the confined program process; the
/// sandbox's other processes never return. Returns the failed step's code
/// if the description cannot be read; later failures end the process with
/// that code.
///
/// # Safety
/// `jail` must point to `len` readable bytes, and the caller must be
/// single-threaded (a child just forked from a single-threaded call site).
#[no_mangle]
pub unsafe extern "C" fn kiln_sandbox_enter(jail: *const u8, len: usize) -> i32 {
    if jail.is_null() {
        return 101;
    }
    // SAFETY: the caller guarantees `len` readable bytes at `jail`; they are
    // only read, and not kept beyond this call.
    let bytes = unsafe { std::slice::from_raw_parts(jail, len) };
    let jail: Jail = match serde_json::from_slice(bytes) {
        Ok(j) => j,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kiln sandbox: step ReadPolicy failed: {e}");
            return 101;
        }
    };
    // The zygote is single-threaded, so the death signal is tied to it for
    // good (it follows the parent *thread*): if the zygote dies, so does
    // this sandbox, and with its outer process the whole pid namespace.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        let _ = writeln!(std::io::stderr(), "kiln sandbox: step ForkInit failed: {e}");
        return 106;
    }
    crate::init::enter(&jail);
    0
}
