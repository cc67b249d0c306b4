//! The policy, run: every program of [`super::filters`] executed as the
//! kernel would on sample syscalls, by a classic-BPF interpreter of its own.

use super::*;
use std::collections::BTreeSet;

#[test]
fn no_syscall_is_both_allowed_and_denied() {
    let allowed: BTreeSet<i64> = ALLOWED.iter().map(|(n, _)| *n).collect();
    for (nr, why) in DENIED {
        assert!(!allowed.contains(nr), "syscall {nr} is denied ({why}) but also allowed");
    }
}

#[test]
fn every_entry_has_a_reason() {
    assert!(ALLOWED.iter().chain(DENIED).all(|(_, why)| why.len() > 3));
}

#[test]
fn the_dangerous_syscalls_are_denied() {
    let allowed: BTreeSet<i64> = ALLOWED.iter().map(|(n, _)| *n).collect();
    for nr in [
        libc::SYS_mount,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_ptrace,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_clock_settime,
        libc::SYS_settimeofday,
        libc::SYS_clone3,
        libc::SYS_io_uring_setup,
    ] {
        assert!(!allowed.contains(&nr), "{nr} must not be allowed");
    }
}

/// `AUDIT_ARCH_X86_64` and `AUDIT_ARCH_I386` (linux/audit.h): the ELF
/// machine with the 64-bit and little-endian flags.
const ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const ARCH_I386: u32 = 3 | 0x4000_0000;

/// What the kernel would decide: run every filter on one syscall (as
/// classic BPF over `struct seccomp_data`) and combine their results as
/// `seccomp_run_filters` does.
fn verdict(nr: i64, arch: u32, args: [u64; 6]) -> u32 {
    verdict_of(&filters().unwrap_or_default(), nr, arch, args)
}

fn verdict_of(progs: &[BpfProgram], nr: i64, arch: u32, args: [u64; 6]) -> u32 {
    assert!(progs.len() >= 2, "an allowlist and the clone3 filter at least");
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as u32).to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    // The kernel runs the newest filter first and keeps a result only if
    // its action (compared as a signed number: kill < trap < errno <
    // allow) is strictly more restrictive: among equals the newest wins.
    let action = |ret: u32| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32;
    let mut result = libc::SECCOMP_RET_ALLOW;
    for prog in progs.iter().rev() {
        let ret = run(prog, &data);
        if action(ret) < action(result) {
            result = ret;
        }
    }
    result
}

/// A classic-BPF interpreter for the instructions seccompiler emits.
fn run(prog: &[seccompiler::sock_filter], data: &[u8; 64]) -> u32 {
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let ins = &prog[pc];
        let (code, k) = (u32::from(ins.code), ins.k);
        pc += 1;
        match code & 0x07 {
            libc::BPF_LD => {
                assert_eq!(code, libc::BPF_LD | libc::BPF_W | libc::BPF_ABS);
                let at = k as usize;
                acc = u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            }
            libc::BPF_ALU => {
                assert_eq!(code, libc::BPF_ALU | libc::BPF_AND | libc::BPF_K);
                acc &= k;
            }
            libc::BPF_JMP => {
                let taken = match code & 0xf0 {
                    libc::BPF_JA => {
                        pc += k as usize;
                        continue;
                    }
                    libc::BPF_JEQ => acc == k,
                    libc::BPF_JGT => acc > k,
                    libc::BPF_JGE => acc >= k,
                    libc::BPF_JSET => acc & k != 0,
                    other => panic!("unexpected jump {other:#x}"),
                };
                pc += usize::from(if taken { ins.jt } else { ins.jf });
            }
            libc::BPF_RET => return k,
            other => panic!("unexpected instruction class {other:#x}"),
        }
    }
}

const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> u32 {
    let [d, t, p] = [domain, kind, protocol].map(|v| u64::from(v as u32));
    verdict(libc::SYS_socket, ARCH_X86_64, [d, t, p, 0, 0, 0])
}

#[test]
fn allowed_syscalls_pass_and_others_get_eperm() {
    assert_eq!(verdict(libc::SYS_read, ARCH_X86_64, [0; 6]), ALLOW);
    assert_eq!(verdict(libc::SYS_getpid, ARCH_X86_64, [0; 6]), ALLOW);
    assert_eq!(verdict(libc::SYS_restart_syscall, ARCH_X86_64, [0; 6]), ALLOW);
    for (nr, why) in DENIED {
        let want = if *nr == libc::SYS_clone3 { ENOSYS } else { EPERM };
        assert_eq!(verdict(*nr, ARCH_X86_64, [0; 6]), want, "{nr} ({why})");
    }
}

#[test]
fn clone_is_allowed_only_without_namespace_flags() {
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
    assert_eq!(verdict(libc::SYS_clone, ARCH_X86_64, [thread, 0, 0, 0, 0, 0]), ALLOW);
    let user = thread | libc::CLONE_NEWUSER as u64;
    assert_eq!(verdict(libc::SYS_clone, ARCH_X86_64, [user, 0, 0, 0, 0, 0]), EPERM);
}

#[test]
fn only_the_listed_socket_families_can_be_created() {
    for kind in [libc::SOCK_STREAM, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC] {
        for domain in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
            assert_eq!(socket(domain, kind, 0), ALLOW, "family {domain}");
        }
    }
    assert_eq!(socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE), ALLOW);
    let listed: BTreeSet<libc::c_int> = SOCKET_FAMILIES.iter().map(|f| f.domain).collect();
    // Every other family the kernel knows (AF_MAX is below 64).
    for domain in (0..64).filter(|d| !listed.contains(d)) {
        assert_eq!(socket(domain, libc::SOCK_STREAM, 0), EPERM, "family {domain}");
        assert_eq!(socket(domain, libc::SOCK_DGRAM, 0), EPERM, "family {domain}");
    }
    for (domain, why) in DENIED_FAMILIES {
        assert!(!listed.contains(domain), "{domain} is denied ({why}) but listed");
    }
    // Upper bits of an int argument are ignored by the kernel: a family
    // with junk above bit 31 is still that family.
    let vsock_high = (1u64 << 32) | u64::from(libc::AF_VSOCK as u32);
    assert_eq!(verdict(libc::SYS_socket, ARCH_X86_64, [vsock_high, 1, 0, 0, 0, 0]), EPERM);
}

#[test]
fn netlink_is_limited_to_the_routing_protocol() {
    // NETLINK_KOBJECT_UEVENT carries the host's device events.
    for protocol in (0..32).filter(|p| *p != libc::NETLINK_ROUTE) {
        assert_eq!(socket(libc::AF_NETLINK, libc::SOCK_DGRAM, protocol), EPERM, "protocol {protocol}");
    }
    assert!(DENIED_NETLINK.iter().all(|(p, _)| *p != libc::NETLINK_ROUTE));
}

#[test]
fn socketpair_is_for_unix_sockets_only() {
    let pair =
        |domain: libc::c_int| verdict(libc::SYS_socketpair, ARCH_X86_64, [u64::from(domain as u32), 1, 0, 0, 0, 0]);
    assert_eq!(pair(libc::AF_UNIX), ALLOW);
    assert_eq!(pair(libc::AF_VSOCK), EPERM);
    assert_eq!(pair(libc::AF_INET), EPERM);
}

#[test]
fn other_abis_cannot_reach_the_kernel() {
    // x32: the same numbers with a high bit; none is allowed.
    for nr in [libc::SYS_getpid, libc::SYS_read, libc::SYS_unshare, libc::SYS_socket] {
        assert_eq!(verdict(nr | X32_SYSCALL_BIT, ARCH_X86_64, [0; 6]), EPERM, "x32 {nr}");
    }
    // i386 (int 0x80): its numbers mean other syscalls; the process dies.
    assert_eq!(verdict(libc::SYS_getpid, ARCH_I386, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
}

#[test]
fn the_allowlist_is_installed_in_short_pieces() {
    let progs = filters().unwrap_or_default();
    assert_eq!(progs.len(), PIECES + 1);
    let whole = filters_in(1).unwrap_or_default();
    assert!(whole[0].len() > ALLOWED.len(), "one check per allowed syscall at least");
    for piece in &progs[..PIECES] {
        assert!(piece.len() < whole[0].len() / 2, "a piece of {} instructions", piece.len());
    }
}

#[test]
fn the_pieces_decide_every_syscall_as_the_whole_list_does() {
    let (whole, pieces) = (filters_in(1).unwrap_or_default(), filters().unwrap_or_default());
    let namespaces = NAMESPACE_FLAGS | libc::CLONE_VM as u64;
    let families = [libc::AF_UNIX, libc::AF_INET, libc::AF_NETLINK, libc::AF_VSOCK, libc::AF_PACKET];
    let arg_sets = [[0; 6], [namespaces, 0, 0, 0, 0, 0]]
        .into_iter()
        .chain(families.map(|f| [u64::from(f as u32), 1, 0, 0, 0, 0]))
        .chain([[u64::from(libc::AF_NETLINK as u32), 3, libc::NETLINK_AUDIT as u64, 0, 0, 0]]);
    for args in arg_sets {
        for nr in (0..600).chain((0..600).map(|n| n | X32_SYSCALL_BIT)).chain([u32::MAX as i64]) {
            for arch in [ARCH_X86_64, ARCH_I386] {
                assert_eq!(
                    verdict_of(&pieces, nr, arch, args),
                    verdict_of(&whole, nr, arch, args),
                    "syscall {nr:#x}, arch {arch:#x}, arguments {args:?}"
                );
            }
        }
    }
}

#[test]
fn a_piece_lets_through_only_the_numbers_in_its_range() {
    let refuse = || sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: EPERM };
    let with = |range| -> Vec<sock_filter> { others_allowed(range).into_iter().chain([refuse()]).collect() };
    let judge = |prog: &[sock_filter], nr: u32| {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        run(prog, &data)
    };
    let middle = with((Some(10), Some(20)));
    let ends = [(0, ALLOW), (9, ALLOW), (10, EPERM), (19, EPERM), (20, ALLOW), (u32::MAX, ALLOW)];
    for (nr, want) in ends {
        assert_eq!(judge(&middle, nr), want, "{nr} in [10, 20)");
    }
    let (first, last) = (with((None, Some(20))), with((Some(10), None)));
    assert_eq!([judge(&first, 0), judge(&first, 19), judge(&first, 20)], [EPERM, EPERM, ALLOW]);
    assert_eq!([judge(&last, 9), judge(&last, 10), judge(&last, u32::MAX)], [ALLOW, EPERM, EPERM]);
    assert!(others_allowed((None, None)).is_empty());
}
