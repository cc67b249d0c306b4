//! One mapping for the zygote's Python object arenas, so that they can be
//! backed by huge pages.
//!
//! CPython's object allocator takes its memory in arenas of 1 MiB, each its
//! own `mmap`. After the zygote imports the runtime's packages, ~40 MB of
//! its private memory sits in about a hundred such mappings, each smaller
//! than a 2 MiB huge page, so the zygote's huge-page step (`MADV_COLLAPSE`
//! in `zygote.py`) cannot back them, and every fork copies one page-table
//! entry per 4 KiB of them, then tears those entries down when the child
//! exits: each session's init and kernel are forks, and a fork's cost is
//! mostly its page tables.
//!
//! So the zygote installs [`alloc`] and [`free`] as the interpreter's arena
//! allocator (`PyObject_SetArenaAllocator`, through the C entry points in
//! [`crate::ffi`]) before it imports anything heavy. Arenas of [`CHUNK`]
//! bytes are carved from one range reserved once ([`reserve`]: address
//! space only, inaccessible and not committed) and made readable and
//! writable as they are handed out, so the arenas in use lie side by side
//! in one mapping that can be collapsed into huge pages. An arena of
//! another size, one the interpreter mapped before the switch, and every
//! arena once the range is full go through plain `mmap`/`munmap`, exactly
//! as CPython's own allocator does.
//!
//! Once its imports are done, the zygote [seals](seal) the range: the part
//! past its last arena goes back, so that a session's address space is no
//! larger than with CPython's allocator (a program that lowers its own
//! `RLIMIT_AS`, as judging harnesses do, keeps the room it had). Every fork
//! inherits the allocator with its own copy of what is left of the range
//! and of the bitmap of chunks in use (both are private memory): processes
//! never share an arena, and a child's arenas are its own.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// CPython's arena size on 64-bit builds (3.10 and later).
const CHUNK: usize = 1 << 20;
/// Chunks in the range until it is sealed: 1 GiB of address space, far
/// more than the runtime's imports take (~40 MiB).
const CHUNKS: usize = 1024;
/// A huge page: the range starts on one, so that it can be collapsed whole.
const HUGE: usize = 2 << 20;

/// The start of the reserved range; 0 until [`reserve`] succeeded.
static BASE: AtomicUsize = AtomicUsize::new(0);
/// How many chunks, from the start, are still the range's: [`CHUNKS`]
/// until [`seal`].
static LIMIT: AtomicUsize = AtomicUsize::new(CHUNKS);
/// One bit per chunk of the range: set while it is an arena.
static USED: [AtomicU64; CHUNKS / 64] = [const { AtomicU64::new(0) }; CHUNKS / 64];

/// Claim the lowest free chunk of `bits` below `limit`; `None` when every
/// one is in use. Lock-free (CPython calls the allocator with its own lock
/// held, but nothing here may block, whatever calls it).
fn claim(bits: &[AtomicU64], limit: usize) -> Option<usize> {
    for (w, word) in bits.iter().enumerate().take(limit.div_ceil(64)) {
        let mut seen = word.load(Ordering::Relaxed);
        loop {
            let bit = (!seen).trailing_zeros() as usize;
            if bit == 64 || w * 64 + bit >= limit {
                break;
            }
            match word.compare_exchange_weak(seen, seen | (1 << bit), Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(w * 64 + bit),
                Err(now) => seen = now,
            }
        }
    }
    None
}

/// One past the highest chunk of `bits` in use (0 when none is).
fn high_water(bits: &[AtomicU64]) -> usize {
    bits.iter()
        .enumerate()
        .rev()
        .find_map(|(w, word)| {
            let v = word.load(Ordering::Acquire);
            (v != 0).then(|| w * 64 + 64 - v.leading_zeros() as usize)
        })
        .unwrap_or(0)
}

/// Give chunk `i` of `bits` back.
fn release(bits: &[AtomicU64], i: usize) {
    if let Some(word) = bits.get(i / 64) {
        word.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }
}

/// Which chunk of a range starting at `base` the arena at `addr` of `size`
/// bytes is, if it is one.
fn chunk_of(base: usize, limit: usize, addr: usize, size: usize) -> Option<usize> {
    if base == 0 || size != CHUNK || addr < base || !(addr - base).is_multiple_of(CHUNK) {
        return None;
    }
    Some((addr - base) / CHUNK).filter(|i| *i < limit)
}

/// Reserve the range (once; later calls do nothing). Address space only:
/// `PROT_NONE` and `MAP_NORESERVE`, so it costs no memory until arenas are
/// handed out of it.
pub(crate) fn reserve() -> std::io::Result<()> {
    if BASE.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    let len = CHUNKS * CHUNK + HUGE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping at an address the kernel picks; no
    // existing memory is touched.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = p as usize;
    let base = start.next_multiple_of(HUGE);
    // Unmap the slack on both sides of the aligned range.
    // SAFETY: both pieces lie inside the mapping just made, which nothing
    // else knows of yet.
    unsafe {
        if base > start {
            libc::munmap(p, base - start);
        }
        let end = base + CHUNKS * CHUNK;
        if start + len > end {
            libc::munmap(end as *mut c_void, start + len - end);
        }
    }
    BASE.store(base, Ordering::Release);
    Ok(())
}

/// Give back the part of the range past its last arena in use, and hand
/// out no chunk there any more (see the module's header). Returns the
/// chunks the range keeps.
pub(crate) fn seal() -> usize {
    let base = BASE.load(Ordering::Acquire);
    let limit = LIMIT.load(Ordering::Acquire);
    if base == 0 {
        return 0;
    }
    // Up to a huge page's boundary: the tail of the last one is still
    // backed by it.
    let keep = high_water(&USED).next_multiple_of(HUGE / CHUNK).min(limit);
    if keep < limit {
        LIMIT.store(keep, Ordering::Release);
        // SAFETY: the chunks from `keep` on are inside the range, and none
        // is an arena (all are past the highest bit set), nor will be: the
        // limit was lowered first.
        unsafe {
            libc::munmap((base + keep * CHUNK) as *mut c_void, (limit - keep) * CHUNK);
        }
    }
    keep
}

/// An arena of `size` bytes: a chunk of the range when it is one and one is
/// free, else a mapping of its own. Null when no memory could be mapped
/// (CPython then reports the allocation failure).
pub(crate) fn alloc(size: usize) -> *mut c_void {
    let base = BASE.load(Ordering::Acquire);
    if base != 0 && size == CHUNK {
        if let Some(i) = claim(&USED, LIMIT.load(Ordering::Acquire)) {
            let p = (base + i * CHUNK) as *mut c_void;
            // SAFETY: the chunk lies inside the reserved range and, its bit
            // just claimed, belongs to no arena; only its protection changes.
            if unsafe { libc::mprotect(p, CHUNK, libc::PROT_READ | libc::PROT_WRITE) } == 0 {
                return p;
            }
            release(&USED, i);
        }
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a new anonymous mapping at an address the kernel picks.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p
    }
}

/// Take back an arena CPython no longer uses. A chunk of the range is
/// replaced by fresh inaccessible address space (its pages go back to the
/// system at once) and becomes free; any other arena is unmapped.
///
/// # Safety
/// `ptr` and `size` must be an arena from [`alloc`], or one CPython's own
/// allocator mapped before [`alloc`] was installed, that nothing uses any
/// more.
pub(crate) unsafe fn free(ptr: *mut c_void, size: usize) {
    match chunk_of(BASE.load(Ordering::Acquire), LIMIT.load(Ordering::Acquire), ptr as usize, size) {
        Some(i) => {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED;
            // SAFETY: the chunk is inside the reserved range and its arena
            // is unused (the caller's promise); MAP_FIXED replaces exactly it.
            let p = unsafe { libc::mmap(ptr, CHUNK, libc::PROT_NONE, flags, -1, 0) };
            // Should that fail, the chunk stays claimed: never handed out
            // twice.
            if p != libc::MAP_FAILED {
                release(&USED, i);
            }
        }
        None => {
            // SAFETY: an arena of `size` bytes mapped for CPython that it no
            // longer uses (the caller's promise).
            unsafe {
                libc::munmap(ptr, size);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn bits(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn claims_hand_out_the_lowest_free_chunk_below_the_limit_and_none_when_all_are_taken() {
        let b = bits(3);
        let got: Vec<_> = (0..130).map(|_| claim(&b, 130)).collect();
        assert_eq!(got, (0..130).map(Some).collect::<Vec<_>>());
        assert_eq!(claim(&b, 130), None, "the limit is not a word's end");
        release(&b, 70);
        release(&b, 3);
        assert_eq!(claim(&b, 130), Some(3));
        assert_eq!(claim(&b, 130), Some(70));
        assert_eq!(claim(&b, 130), None);
        assert_eq!(claim(&b, 192), Some(130), "a higher limit opens the rest");
    }

    #[test]
    fn the_high_water_mark_is_one_past_the_highest_chunk_in_use() {
        let b = bits(3);
        assert_eq!(high_water(&b), 0);
        for _ in 0..5 {
            claim(&b, 192);
        }
        assert_eq!(high_water(&b), 5);
        b[1].store(1 << 63, Ordering::Relaxed);
        assert_eq!(high_water(&b), 128);
        release(&b, 127);
        release(&b, 2);
        assert_eq!(high_water(&b), 5);
    }

    #[test]
    fn only_whole_chunks_inside_the_range_are_its_own() {
        let base = 64 * HUGE;
        assert_eq!(chunk_of(base, CHUNKS, base, CHUNK), Some(0));
        assert_eq!(chunk_of(base, CHUNKS, base + 5 * CHUNK, CHUNK), Some(5));
        assert_eq!(chunk_of(base, CHUNKS, base + (CHUNKS - 1) * CHUNK, CHUNK), Some(CHUNKS - 1));
        assert_eq!(chunk_of(base, CHUNKS, base + CHUNKS * CHUNK, CHUNK), None, "past the end");
        assert_eq!(chunk_of(base, 4, base + 4 * CHUNK, CHUNK), None, "past the sealed end");
        assert_eq!(chunk_of(base, CHUNKS, base - CHUNK, CHUNK), None, "before the start");
        assert_eq!(chunk_of(base, CHUNKS, base + 4096, CHUNK), None, "not on a chunk");
        assert_eq!(chunk_of(base, CHUNKS, base, 256 << 10), None, "another size");
        assert_eq!(chunk_of(0, CHUNKS, 0, CHUNK), None, "no range");
    }

    /// The only test that uses the process's range (it seals it).
    #[test]
    fn arenas_come_from_the_range_are_reused_after_free_and_none_past_the_seal() {
        reserve().expect("reserve");
        let base = BASE.load(Ordering::Acquire);
        assert_eq!(base % HUGE, 0);
        let a = alloc(CHUNK);
        assert_eq!(chunk_of(base, CHUNKS, a as usize, CHUNK), Some(0));
        // SAFETY: a is a fresh, writable 1 MiB arena of this test's.
        unsafe {
            std::ptr::write_bytes(a.cast::<u8>(), 7, CHUNK);
            free(a, CHUNK);
        }
        let b = alloc(CHUNK);
        assert_eq!(a, b, "the freed chunk is the lowest free one again");
        // SAFETY: b is a fresh arena (its pages were discarded at free).
        let first = unsafe { *b.cast::<u8>() };
        assert_eq!(first, 0, "a reused chunk starts zeroed, like a new mapping");
        // Another size is a mapping of its own.
        let c = alloc(256 << 10);
        assert!(!c.is_null());
        assert!(chunk_of(base, CHUNKS, c as usize, 256 << 10).is_none());
        // Sealed with one arena in use: the range keeps a huge page's worth.
        assert_eq!(seal(), 2);
        let d = alloc(CHUNK);
        assert_eq!(chunk_of(base, CHUNKS, d as usize, CHUNK), Some(1));
        let e = alloc(CHUNK);
        assert!(!e.is_null());
        assert_eq!(chunk_of(base, 2, e as usize, CHUNK), None, "past the seal: a mapping of its own");
        // SAFETY: e is writable memory of this test's.
        unsafe { std::ptr::write_bytes(e.cast::<u8>(), 1, CHUNK) };
        // SAFETY: all are this test's arenas, unused from here on.
        unsafe {
            free(e, CHUNK);
            free(d, CHUNK);
            free(c, 256 << 10);
            free(b, CHUNK);
        }
        assert_eq!(high_water(&USED), 0);
    }
}
