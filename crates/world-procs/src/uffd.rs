//! The userfaultfd interface pf's lazy-pages daemon uses (linux/userfaultfd.h): reading
//! `struct uffd_msg` events and the `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` and `UFFDIO_UNREGISTER`
//! ioctls, on descriptors `criu restore --lazy-pages` opened (with the non-cooperative events:
//! fork, remap, remove, unmap) and sent to us. Neither std, nix nor rustix wraps these ioctls,
//! hence the `unsafe` here: two calls, each with a `SAFETY` note.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// `_IOWR(0xAA, 0x03, struct uffdio_copy)` (40 bytes).
const UFFDIO_COPY: u64 = 0xC028_AA03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)` (32 bytes).
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
/// `_IOR(0xAA, 0x01, struct uffdio_range)` (16 bytes).
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)` (16 bytes).
const UFFDIO_WAKE: u64 = 0x8010_AA02;
// The numbers above use the generic `_IOC` encoding (x86, arm, riscv …), not powerpc's, mips' or
// sparc's.
#[cfg(any(
    target_arch = "powerpc64",
    target_arch = "mips64",
    target_arch = "sparc64"
))]
compile_error!("the userfaultfd ioctl numbers here are for the generic _IOC encoding");

/// One event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A task touched the missing page at `address` (not page aligned).
    PageFault { address: u64 },
    /// The task forked; the child's memory is tracked by the new userfaultfd `ufd` (a
    /// descriptor the kernel installed in this process).
    Fork { ufd: i32 },
    /// `mremap` moved `[from, from + len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED|MADV_REMOVE)` dropped `[start, end)`: it reads as zeros now.
    Remove { start: u64, end: u64 },
    /// `munmap` (or a mapping over it) removed `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// Anything else (a kernel newer than this code).
    Unknown(u8),
}

fn word(msg: &[u8; MSG_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// Parse one `struct uffd_msg`: `u8 event`, 7 reserved bytes, then the event's arguments.
pub(crate) fn parse(msg: &[u8; MSG_LEN]) -> Event {
    match msg[0] {
        // pagefault { u64 flags; u64 address; u32 ptid }
        EVENT_PAGEFAULT => Event::PageFault {
            address: word(msg, 16),
        },
        // fork { u32 ufd }
        EVENT_FORK => Event::Fork {
            ufd: i32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]),
        },
        // remap { u64 from; u64 to; u64 len }
        EVENT_REMAP => Event::Remap {
            from: word(msg, 8),
            to: word(msg, 16),
            len: word(msg, 24),
        },
        // remove { u64 start; u64 end } (unmap alike)
        EVENT_REMOVE => Event::Remove {
            start: word(msg, 8),
            end: word(msg, 16),
        },
        EVENT_UNMAP => Event::Unmap {
            start: word(msg, 8),
            end: word(msg, 16),
        },
        other => Event::Unknown(other),
    }
}

/// Read the next event from `uffd` (opened non-blocking by CRIU): `None` when there is none.
pub(crate) fn read_event(uffd: BorrowedFd<'_>) -> std::io::Result<Option<Event>> {
    let mut msg = [0u8; MSG_LEN];
    loop {
        match rustix::io::read(uffd, &mut msg) {
            Ok(MSG_LEN) => return Ok(Some(parse(&msg))),
            Ok(0) => return Ok(None),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "a userfaultfd message of {n} bytes"
                )));
            }
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Take ownership of the descriptor a fork event installed in this process.
pub(crate) fn adopt(ufd: i32) -> Option<OwnedFd> {
    // SAFETY: the kernel installed `ufd` in our table for this event and nothing else refers
    // to it; it is owned from here on.
    (ufd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(ufd) })
}

/// What a copy (or a zero fill) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filled {
    /// This many bytes went in (all asked for, or fewer: the rest is to be tried again).
    Bytes(u64),
    /// The first page is already there (`EEXIST`).
    Exists,
    /// The address is not in an area this userfaultfd tracks any more (`ENOENT`): unmapped
    /// or unregistered meanwhile.
    NotTracked,
    /// The address space is changing (`EAGAIN`, a fork or remap event not read yet).
    Busy,
    /// The process is gone (`ESRCH`, `ENOSPC`).
    Gone,
}

/// `ioctl` with a pointer argument, as `Ok(())` or the errno.
fn ioctl<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> Result<(), i32> {
    // SAFETY: `arg` is the struct `request` is defined with (size encoded in the request
    // number), valid for reads and writes for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

/// What the errno of a copy or zero fill that put nothing in means; `None`: a real error.
fn failure(errno: i32, done: i64) -> Option<Filled> {
    if done > 0 {
        return Some(Filled::Bytes(done as u64));
    }
    let errno = if done < 0 { (-done) as i32 } else { errno };
    match errno {
        libc::EEXIST => Some(Filled::Exists),
        libc::ENOENT => Some(Filled::NotTracked),
        libc::EAGAIN => Some(Filled::Busy),
        libc::ESRCH | libc::ENOSPC => Some(Filled::Gone),
        _ => None,
    }
}

/// `UFFDIO_COPY` `src` (whole pages) to `dst`, waking whoever waits on those pages.
pub(crate) fn copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> std::io::Result<Filled> {
    #[repr(C)]
    struct UffdioCopy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    let mut arg = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    match ioctl(uffd, UFFDIO_COPY, &mut arg) {
        Ok(()) => Ok(Filled::Bytes(src.len() as u64)),
        Err(errno) => {
            failure(errno, arg.copy).ok_or_else(|| std::io::Error::from_raw_os_error(errno))
        }
    }
}

/// `UFFDIO_ZEROPAGE` `[start, start + len)`: map zeros there, waking whoever waits.
pub(crate) fn zero(uffd: BorrowedFd<'_>, start: u64, len: u64) -> std::io::Result<Filled> {
    #[repr(C)]
    struct UffdioZeropage {
        start: u64,
        len: u64,
        mode: u64,
        zeropage: i64,
    }
    let mut arg = UffdioZeropage {
        start,
        len,
        mode: 0,
        zeropage: 0,
    };
    match ioctl(uffd, UFFDIO_ZEROPAGE, &mut arg) {
        Ok(()) => Ok(Filled::Bytes(len)),
        Err(errno) => {
            failure(errno, arg.zeropage).ok_or_else(|| std::io::Error::from_raw_os_error(errno))
        }
    }
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `UFFDIO_UNREGISTER` `[start, start + len)`; `Ok(false)` when it could not be done because
/// the address space is gone or the area could not be split (`ENOMEM` says either; the caller
/// then keeps answering faults there itself).
pub(crate) fn unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> std::io::Result<bool> {
    let mut arg = UffdioRange { start, len };
    match ioctl(uffd, UFFDIO_UNREGISTER, &mut arg) {
        Ok(()) => Ok(true),
        Err(libc::ENOMEM) | Err(libc::ESRCH) => Ok(false),
        Err(errno) => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// `UFFDIO_WAKE` `[start, start + len)`: whoever waits on a fault there tries again (after
/// pf found nothing to put there: the area went away meanwhile).
pub(crate) fn wake(uffd: BorrowedFd<'_>, start: u64, len: u64) {
    let mut arg = UffdioRange { start, len };
    let _ = ioctl(uffd, UFFDIO_WAKE, &mut arg);
}

/// Whether `fd` is a userfaultfd (what CRIU must have sent).
pub(crate) fn is_userfaultfd(fd: &impl AsFd) -> bool {
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    std::fs::read_link(link).is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IOWR(0xAA, 0x3F, struct uffdio_api)` (24 bytes).
    const UFFDIO_API: u64 = 0xC018_AA3F;
    /// `_IOWR(0xAA, 0x00, struct uffdio_register)` (32 bytes).
    const UFFDIO_REGISTER: u64 = 0xC020_AA00;

    #[test]
    fn a_tree_holding_a_userfaultfd_of_its_own_is_refused_at_once() {
        // This process plays one: a page of its memory registered for missing-page faults
        // (`um` in its smaps) through a userfaultfd it holds. Waiting would not help: it is
        // refused before the first wait.
        // SAFETY: a system call on integers; the result is checked before it is used as an fd.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(raw >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = [0xAAu64, 0, 0];
        ioctl(uffd.as_fd(), UFFDIO_API, &mut api).expect("UFFDIO_API");
        let page = 4096usize;
        // SAFETY: a new private anonymous mapping, never touched (touching it would wait for a
        // server), unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // range { start, len }, mode (MISSING), ioctls (out).
        let mut register = [addr as u64, page as u64, 1, 0];
        ioctl(uffd.as_fd(), UFFDIO_REGISTER, &mut register).expect("UFFDIO_REGISTER");
        let me = std::process::id() as i32;
        let started = std::time::Instant::now();
        let result = crate::capture::wait_for_lazy_memory(&[me]);
        let took = started.elapsed();
        // SAFETY: the mapping made above, not used after this.
        unsafe { libc::munmap(addr, page) };
        drop(uffd);
        assert!(
            matches!(result, Err(crate::Error::OwnUserfaultfd { pid }) if pid == me),
            "{result:?}"
        );
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        // With the mapping and the descriptor gone, nothing is waited for.
        crate::capture::wait_for_lazy_memory(&[me]).expect("nothing served");
    }

    fn msg(event: u8, words: [u64; 3]) -> [u8; MSG_LEN] {
        let mut m = [0u8; MSG_LEN];
        m[0] = event;
        for (i, w) in words.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn events_are_parsed_as_the_kernel_lays_them_out() {
        assert_eq!(
            parse(&msg(EVENT_PAGEFAULT, [1, 0x7f00_1234, 99])),
            Event::PageFault {
                address: 0x7f00_1234
            }
        );
        assert_eq!(parse(&msg(EVENT_FORK, [7, 0, 0])), Event::Fork { ufd: 7 });
        assert_eq!(
            parse(&msg(EVENT_REMAP, [0x1000, 0x9000, 0x2000])),
            Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        assert_eq!(
            parse(&msg(EVENT_REMOVE, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            parse(&msg(EVENT_UNMAP, [0x1000, 0x3000, 0])),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(parse(&msg(0x42, [0, 0, 0])), Event::Unknown(0x42));
    }

    #[test]
    fn a_partial_copy_counts_what_went_in_and_errors_say_what_to_do() {
        assert_eq!(failure(libc::EAGAIN, 8192), Some(Filled::Bytes(8192)));
        assert_eq!(
            failure(libc::EEXIST, -i64::from(libc::EEXIST)),
            Some(Filled::Exists)
        );
        assert_eq!(failure(libc::ENOENT, 0), Some(Filled::NotTracked));
        assert_eq!(
            failure(libc::EAGAIN, -i64::from(libc::EAGAIN)),
            Some(Filled::Busy)
        );
        assert_eq!(failure(libc::ESRCH, 0), Some(Filled::Gone));
        assert_eq!(failure(libc::EINVAL, -i64::from(libc::EINVAL)), None);
    }
}
