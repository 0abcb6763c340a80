//! A run of a file's pages read where they lie: a read-only shared mapping whose pages are all
//! faulted in at once, instead of a `pread` that copies them into a buffer first. For the pages
//! files pf stores (CRIU's, in pf's own scratch directory on tmpfs) that copy was a fifth of a
//! freeze's CPU.
//!
//! The `unsafe` here is the mapping's: its bytes are handed out as a slice for as long as the
//! mapping lives. A caller maps only files that nothing shrinks meanwhile (a mapped page past a
//! file's end is a SIGBUS), and never bytes a thread may punch a hole in meanwhile (pf frees a
//! pages file's memory behind its packer, in bytes read for the last time, and only once the
//! thread that followed the dump is out of its last step). Nor holes: populating a hole in a
//! tmpfs file allocates it, where reading it does not.
#![allow(unsafe_code)]

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once populating a mapping was refused as unknown (`EINVAL`: a kernel before 5.14), so
/// that every later run is read at once instead of mapped and unmapped first.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// `len` bytes of a file from a page-aligned offset, mapped read-only.
pub(crate) struct Mapped {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

// The mapping is read-only and owned: it may be used and dropped on any thread.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Map `len` bytes (more than 0) of `file` from `at` (a multiple of the page size) and
    /// fault them all in. None when they cannot all be: past the end of the file (populating
    /// says so, rather than a later SIGBUS), or no mapping to be had; the caller then reads.
    pub(crate) fn of(file: &File, at: u64, len: usize) -> Option<Self> {
        use rustix::mm::{Advice, MapFlags, ProtFlags};
        if len == 0
            || !at.is_multiple_of(crate::pack::PAGE_SIZE as u64)
            || UNSUPPORTED.load(Ordering::Relaxed)
        {
            return None;
        }
        // SAFETY: a new mapping at an address the kernel chooses, so nothing else is replaced.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                file,
                at,
            )
        }
        .ok()?;
        let mapped = Self { ptr, len };
        // SAFETY: the range is the mapping just made.
        match unsafe { rustix::mm::madvise(ptr, len, Advice::LinuxPopulateRead) } {
            Ok(()) => Some(mapped),
            Err(e) => {
                // A kernel before 5.14: never again in this process.
                if e == rustix::io::Errno::INVAL {
                    UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `ptr` for as long as `self` lives (the mapping is
        // only undone by `drop`); see the module's note on what may change in them.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, which no slice outlives (they borrow `self`).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr, self.len) } {
            tracing::debug!(error = %e, "unmapping a file's pages");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::PAGE_SIZE;
    use std::io::Write as _;

    #[test]
    fn pages_map_as_the_file_has_them_and_never_past_its_end() {
        let mut file = tempfile::tempfile().expect("temp file");
        let bytes: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        file.write_all(&bytes).expect("write");
        let mapped = Mapped::of(&file, PAGE_SIZE as u64, 2 * PAGE_SIZE).expect("mapped");
        assert_eq!(mapped.bytes(), &bytes[PAGE_SIZE..]);
        // A page past the end would be a SIGBUS when touched: refused instead.
        assert!(Mapped::of(&file, PAGE_SIZE as u64, 3 * PAGE_SIZE).is_none());
        assert!(Mapped::of(&file, 3 * PAGE_SIZE as u64, PAGE_SIZE).is_none());
        // Not at a page boundary, or nothing: refused.
        assert!(Mapped::of(&file, 1, PAGE_SIZE).is_none());
        assert!(Mapped::of(&file, 0, 0).is_none());
    }
}
