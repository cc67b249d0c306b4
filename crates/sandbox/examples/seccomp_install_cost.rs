//! What installing kiln's seccomp policy costs the process that installs it
//! (every sandbox's program does, once): threads that each install the
//! policy on themselves and end, beside threads that install nothing; the
//! difference of the process's CPU per thread is the installation's cost.
//! The allowlist is measured as one program and in 2 to 12 pieces (kiln
//! installs [`kiln_sandbox::seccomp::PIECES`]). BENCHMARKS.md, "Installing
//! the seccomp policy".
//!
//! ```text
//! cargo run --release -p kiln-sandbox --example seccomp_install_cost [-- THREADS]
//! ```

use kiln_sandbox::seccomp::{filters_in, PIECES};
use nix::sys::resource::{getrusage, UsageWho};
use seccompiler::BpfProgram;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: u32 = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(500);
    let idle = per_thread(&[], threads)?;
    println!("{threads} threads each; the policy's cost per installation (CPU, beyond a thread's own {idle:.3} ms):");
    for pieces in [1, 2, 4, 6, 8, 12] {
        let programs = filters_in(pieces)?;
        let lengths: Vec<usize> = programs.iter().map(Vec::len).collect();
        let cost = per_thread(&programs, threads)? - idle;
        let mark = if pieces == PIECES { " (kiln)" } else { "" };
        println!("  {pieces:>2} piece(s){mark}: {cost:.3} ms; instructions per program {lengths:?}");
    }
    Ok(())
}

/// CPU milliseconds of this process per thread that installs `programs`
/// on itself and ends.
fn per_thread(programs: &[BpfProgram], threads: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let before = cpu()?;
    for _ in 0..threads {
        let programs = programs.to_vec();
        std::thread::spawn(move || programs.iter().try_for_each(|p| seccompiler::apply_filter(p)))
            .join()
            .map_err(|_| "a thread panicked")??;
    }
    Ok((cpu()? - before).as_secs_f64() * 1e3 / f64::from(threads))
}

fn cpu() -> nix::Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let time = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(time(usage.user_time()) + time(usage.system_time()))
}
