//! How pf's own heap gives memory back.
//!
//! glibc serves an allocation of 128 KiB or more with its own `mmap` and unmaps it when freed,
//! but every such free raises that threshold to the freed block's size (up to 32 MiB). After pf
//! frees its first 8 MiB pack buffer or 20 MB page map, later ones of that size come from the
//! heap, and the heap keeps what they leave: a 1 GiB re-freeze peaked at 119–133 MiB of RSS with
//! 60–70 MiB of it live. A fixed threshold keeps every large block mapped on its own and
//! returned at once (the same re-freeze: 83 MiB; `MALLOC_MMAP_THRESHOLD_=1048576` in the
//! environment did the same by hand).
#![allow(unsafe_code)]

/// Blocks of this size or more are mapped on their own and unmapped when freed.
pub const LARGE_BLOCK: usize = 1 << 20;

/// Fix the heap's `mmap` threshold at [`LARGE_BLOCK`] (glibc only; elsewhere there is nothing
/// to do). Call it first thing in `main`, before other threads allocate (and before logging
/// starts: it returns whether the threshold was set, for the caller to log).
pub fn return_large_blocks_at_once() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; any value is valid input, and a
        // refusal (0) leaves the default in place.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_BLOCK as libc::c_int) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn a_large_block_freed_goes_back_to_the_kernel() {
        assert!(return_large_blocks_at_once(), "glibc took the threshold");
        // SAFETY: sysconf reads a constant of the system.
        let page_kib = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64 / 1024;
        // Resident KiB: /proc/self/statm's second field, in pages. (Process-wide: the other
        // tests of this crate allocate far less than the 12-16 MiB this one looks for.)
        let rss = || -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
            let pages: u64 = statm
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .expect("resident pages");
            pages * page_kib
        };
        // 16 MiB: under glibc's largest dynamic threshold (32 MiB). Two rounds: the first would
        // raise that threshold to 16 MiB if no fixed one were set.
        for _ in 0..2 {
            let block = vec![1u8; 16 << 20];
            std::hint::black_box(&block);
            drop(block);
        }
        let before = rss();
        let block = vec![1u8; 16 << 20];
        std::hint::black_box(&block);
        let during = rss();
        drop(block);
        let after = rss();
        assert!(during >= before + 15 * 1024, "{before} → {during} KiB");
        assert!(
            after + 12 * 1024 < during,
            "{during} → {after} KiB after the free"
        );
    }
}
