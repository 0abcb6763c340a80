//! The one raw system call goblins need that pf-os does not wrap: registering a pidfd with
//! tokio. Spawning clean children and pidfds come from `pf_os::fd`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;

/// Register a pidfd with the current tokio runtime, to await the process's exit (the pidfd
/// turns readable then). Panics outside a runtime, like every tokio I/O constructor.
pub(crate) fn watch_pidfd(pidfd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `register_with_interest` requires the descriptor to stay open and the same for
    // the AsyncFd's whole life. The AsyncFd owns the OwnedFd: nothing else can close or replace
    // it, and `as_raw_fd` of an OwnedFd always returns the same number.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}
