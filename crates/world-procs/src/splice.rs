//! Pages handed to a pipe by reference (`vmsplice`) instead of copied into it.
//!
//! A pipe's reader and writer copy under one lock, so a pages file written into CRIU's image
//! pipe with `write` costs CRIU's read (a copy into memory it faults in) plus pf's copy, one
//! after the other, for every MiB. `vmsplice` puts references to pf's pages in the pipe
//! instead, which takes the lock for a few microseconds a MiB.
//!
//! The pipe then holds pf's pages until CRIU reads them, so they must never change after they
//! were spliced: each chunk gets a mapping of its own ([`PageBuf`]), filled once, then sealed
//! ([`Sealed`], which gives no way to write it) and unmapped when done, or given back for
//! writing by [`Released`] only once its pages have left the pipe. Unmapping leaves the pages
//! to the pipe's references; no allocator ever hands them out again. `mmap`, `munmap` and
//! `vmsplice` are the `unsafe` calls here, each with a `SAFETY` note.
//!
//! Only for pipes whose reader copies the bytes out (`read`): CRIU reads pages files that way
//! (criu/pagemap.c). A reader that splices out of the pipe would take the page references
//! with it, past the point `Released` counts on; CRIU does that with other images (pipe data,
//! ghost files), which pf therefore never serves from here.
#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::ptr::NonNull;

/// A page-aligned buffer in an anonymous private mapping of its own, writable until sealed.
#[derive(Debug)]
pub(crate) struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a PageBuf owns its mapping alone (like a Box<[u8]>); nothing else points into it.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only reads (`as_slice`); writes need `&mut`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// A zeroed buffer of `len` bytes (rounded up to whole pages in the mapping), its pages
    /// faulted in at once (`MAP_POPULATE`), cheaper than one fault per page on first write.
    pub(crate) fn new(len: usize) -> std::io::Result<Self> {
        use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous};
        if len == 0 {
            return Err(std::io::Error::other("an empty page buffer"));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks: it aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::POPULATE,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap gave a null mapping"))?;
        Ok(Self { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by `self`, and
        // borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// No more writing: the buffer may now be spliced.
    pub(crate) fn seal(self) -> Sealed {
        Sealed(self)
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and length and is unmapped
        // once, here; no slice of it outlives `self` (they borrow it). Pages a pipe still
        // references stay alive for the pipe.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A [`PageBuf`] that is never written again.
#[derive(Debug)]
pub(crate) struct Sealed(PageBuf);

impl Sealed {
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and readable; a Sealed gives no way to write it.
        unsafe { std::slice::from_raw_parts(self.0.ptr.as_ptr(), self.0.len) }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len
    }
}

impl Sealed {
    /// The buffer back for writing, which only [`Released`] gives: once its pages have left
    /// the pipe.
    fn unseal(self) -> PageBuf {
        self.0
    }
}

/// Buffers spliced whole into one pipe, given back for writing once their pages have left it.
///
/// A pipe holds at most its size in pages (`F_GETPIPE_SZ` / 4096: one page a slot, as
/// [`splice`] fills them with whole pages of page-aligned buffers) and gives them to the reader
/// in order. So once that many pages were spliced after a buffer's last one, the reader has
/// copied out and released every page of the buffer, and writing it again cannot reach it.
#[derive(Debug)]
pub(crate) struct Released {
    /// Pages the pipe can hold.
    capacity: u64,
    /// Bytes spliced so far.
    spliced: u64,
    /// Buffers spliced whole, with the bytes spliced once each was.
    waiting: std::collections::VecDeque<(u64, Sealed)>,
}

impl Released {
    /// For `pipe`.
    pub(crate) fn new(pipe: &impl AsFd) -> std::io::Result<Self> {
        let bytes = rustix::pipe::fcntl_getpipe_size(pipe)?;
        Ok(Self {
            capacity: (bytes as u64).div_ceil(PAGE),
            spliced: 0,
            waiting: std::collections::VecDeque::new(),
        })
    }

    /// `bytes` more were spliced.
    pub(crate) fn spliced(&mut self, bytes: usize) {
        self.spliced += bytes as u64;
    }

    /// `buf` is spliced whole.
    pub(crate) fn done(&mut self, buf: Sealed) {
        self.waiting.push_back((self.spliced, buf));
    }

    /// A buffer whose pages have all left `pipe` (the pipe given to [`new`](Self::new)), if
    /// one has.
    pub(crate) fn take(&mut self, pipe: &impl AsFd) -> Option<PageBuf> {
        let (end, _) = self.waiting.front()?;
        // Whole pages after it only: rounding down errs on the side of waiting. The larger of
        // the size read first and now (the kernel never shrinks a pipe below what it holds).
        if (self.spliced - end) / PAGE < self.capacity {
            return None;
        }
        let now = rustix::pipe::fcntl_getpipe_size(pipe)
            .map_or(u64::MAX, |bytes| (bytes as u64).div_ceil(PAGE));
        if (self.spliced - end) / PAGE < now {
            return None;
        }
        self.waiting.pop_front().map(|(_, buf)| buf.unseal())
    }
}

const PAGE: u64 = 4096;

/// Splice `bufs` (each a part of a [`Sealed`] buffer, in order) into `pipe` without blocking,
/// as much as it takes: the bytes spliced, or `WouldBlock` if the pipe is full.
pub(crate) fn splice(pipe: &impl AsFd, bufs: &[(&Sealed, usize)]) -> std::io::Result<usize> {
    use rustix::pipe::{IoSliceRaw, SpliceFlags, vmsplice};
    let slices: Vec<IoSliceRaw<'_>> = bufs
        .iter()
        .map(|(buf, from)| IoSliceRaw::from_slice(&buf.as_slice()[*from..]))
        .collect();
    // SAFETY: every slice is of a Sealed buffer, which stays mapped while borrowed here and is
    // written again only after `Released` gives it back, once the pipe no longer holds its
    // pages; what the pipe keeps are page references, valid after the mapping goes. vmsplice
    // only reads the memory (no SPLICE_F_GIFT).
    let n = unsafe { vmsplice(pipe, &slices, SpliceFlags::NONBLOCK) }?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn spliced_pages_read_back_as_written_after_the_buffer_is_gone() {
        let (mut rx, tx) = std::io::pipe().expect("pipe");
        let mut bufs = Vec::new();
        for k in 0..3u8 {
            let mut buf = PageBuf::new(3 * 4096).expect("mmap");
            for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
                *b = k.wrapping_mul(31).wrapping_add(i as u8);
            }
            bufs.push(buf.seal());
        }
        let want: Vec<u8> = bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect();
        // From 100 bytes into the first: a part of a buffer is spliced as well.
        let parts: Vec<(&Sealed, usize)> = bufs
            .iter()
            .enumerate()
            .map(|(k, b)| (b, if k == 0 { 100 } else { 0 }))
            .collect();
        let n = splice(&tx, &parts).expect("vmsplice");
        assert_eq!(n, want.len() - 100);
        drop(parts);
        drop(bufs);
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).expect("read");
        assert_eq!(got, want[100..]);
    }

    #[test]
    fn a_buffer_comes_back_once_a_pipes_worth_was_spliced_after_it() {
        let (mut rx, tx) = std::io::pipe().expect("pipe");
        let mut released = Released::new(&tx).expect("pipe size");
        let capacity = released.capacity as usize;
        assert!(capacity >= 16, "a pipe of {capacity} pages");
        let page = |fill: u8| {
            let mut buf = PageBuf::new(4096).expect("mmap");
            buf.as_mut_slice().fill(fill);
            buf.seal()
        };
        let first = page(1);
        released.spliced(splice(&tx, &[(&first, 0)]).expect("splice"));
        released.done(first);
        for k in 1..=capacity {
            assert!(released.take(&tx).is_none(), "back after {k} pages");
            // The pipe is full before the last of these: the first page is read to make room.
            if k == capacity {
                let mut one = [0u8; 4096];
                rx.read_exact(&mut one).expect("read");
                assert!(one.iter().all(|&b| b == 1));
            }
            let next = page(2);
            released.spliced(splice(&tx, &[(&next, 0)]).expect("splice"));
            released.done(next);
        }
        let mut again = released
            .take(&tx)
            .expect("the first buffer is out of the pipe");
        again.as_mut_slice().fill(9);
        drop(tx);
        let mut rest = Vec::new();
        rx.read_to_end(&mut rest).expect("read");
        assert_eq!(rest.len(), capacity * 4096);
        assert!(
            rest.iter().all(|&b| b == 2),
            "a reused buffer reached the pipe"
        );
    }

    #[test]
    fn a_full_pipe_would_block() {
        let (_rx, tx) = std::io::pipe().expect("pipe");
        let mut buf = PageBuf::new(1 << 20).expect("mmap");
        buf.as_mut_slice().fill(7);
        let buf = buf.seal();
        let mut sent = 0;
        let err = loop {
            match splice(&tx, &[(&buf, 0)]) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(sent < 64 << 20, "a pipe that never fills");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        assert!(sent > 0);
    }
}
