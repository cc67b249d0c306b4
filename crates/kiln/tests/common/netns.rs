//! Network namespaces that tests create to stand in for the internet (or
//! for a host with addresses of its own): never an outside address.

use std::process::Command;

/// Run `ip` with `args`; panics (naming the command) if it fails.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?}");
}

/// A `/24` in `10.<second>.0.0/16` that no interface of this host has now,
/// for a test's link to the host. Tests of one binary that run at once pass
/// different `slot`s (0 to 3) and so never pick the same one; a link left
/// behind by a crashed run is stepped over, not collided with.
pub fn free_subnet(second: u8, slot: u8) -> u8 {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap();
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = std::process::id() % 63;
    (0..63)
        .map(|j| (((start + j) % 63) * 4 + u32::from(slot % 4) + 1) as u8)
        .find(|x| !used.contains(&format!(" 10.{second}.{x}.")))
        .expect("no free test subnet")
}
