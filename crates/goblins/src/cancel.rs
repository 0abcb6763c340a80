//! [`Cancel`]: how a caller stops a [`crate::warm_up`] or a [`crate::fork_and_collect`] from
//! another thread — a signal-handling thread, a Python `KeyboardInterrupt`, a UI button.
//!
//! A cancel is a flag plus a pipe that turns readable when the flag is set, so the workflows,
//! which wait in `poll(2)` on the goblin's pipes, wake at once instead of noticing it later.

use std::io::{PipeReader, PipeWriter, Write as _};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Not cancelled.
const LIVE: i32 = 0;
/// Cancelled without a signal.
const PLAIN: i32 = -1;

/// A cancellation token, cheap to clone; every clone cancels the same work.
///
/// What a cancel does depends on the stage it arrives in, and each workflow says so: a warm-up
/// that is still waiting kills its goblin and returns [`Error::Cancelled`]; one that already
/// froze skips the rest of its drain; a fork-and-collect passes the signal (SIGKILL for a plain
/// [`Cancel::cancel`]) to every clone and returns what they printed until they ended.
#[derive(Debug, Clone)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// [`LIVE`], [`PLAIN`], or the signal number.
    state: AtomicI32,
    /// Readable once cancelled (one byte is written, never read).
    wake_r: PipeReader,
    /// Written once, by the first cancel.
    wake_w: Mutex<Option<PipeWriter>>,
}

impl Cancel {
    /// A token that is not cancelled yet (it owns a small pipe).
    pub fn new() -> Result<Cancel> {
        let (wake_r, wake_w) =
            std::io::pipe().map_err(|e| Error::sys("create the cancel pipe", e))?;
        Ok(Cancel {
            inner: Arc::new(Inner {
                state: AtomicI32::new(LIVE),
                wake_r,
                wake_w: Mutex::new(Some(wake_w)),
            }),
        })
    }

    /// Cancel, with no signal to pass on (clones of a fork-and-collect get SIGKILL).
    pub fn cancel(&self) {
        self.set(PLAIN);
    }

    /// Cancel because this process received `signal` (say `libc::SIGINT`): the signal is
    /// passed on to the clones of a fork-and-collect and reported in [`Error::Cancelled`].
    pub fn cancel_with_signal(&self, signal: i32) {
        self.set(if signal > 0 { signal } else { PLAIN });
    }

    /// Whether any clone of this token has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.inner.state.load(Ordering::SeqCst) != LIVE
    }

    /// The signal the token was cancelled with (`None`: not cancelled, or without a signal).
    pub fn signal(&self) -> Option<i32> {
        let state = self.inner.state.load(Ordering::SeqCst);
        (state > 0).then_some(state)
    }

    /// A descriptor that turns readable once cancelled, for `poll(2)`.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.inner.wake_r.as_fd()
    }

    fn set(&self, state: i32) {
        // The first cancel wins; later ones change nothing.
        if self
            .inner
            .state
            .compare_exchange(LIVE, state, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let mut guard = self
                .inner
                .wake_w
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(mut w) = guard.take() {
                // One byte in an empty pipe cannot block; the pipe then stays readable.
                let _ = w.write_all(b"x");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cancel_wins_and_wakes_poll() {
        let cancel = Cancel::new().expect("cancel");
        assert!(!cancel.is_cancelled());
        assert_eq!(cancel.signal(), None);
        let clone = cancel.clone();
        let t = std::thread::spawn(move || clone.cancel_with_signal(libc::SIGINT));
        let mut fds = [nix::poll::PollFd::new(
            cancel.fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).expect("poll");
        t.join().expect("join");
        assert_eq!(n, 1, "the cancel woke poll");
        assert!(cancel.is_cancelled());
        assert_eq!(cancel.signal(), Some(libc::SIGINT));
        cancel.cancel();
        assert_eq!(cancel.signal(), Some(libc::SIGINT), "the first cancel wins");

        let plain = Cancel::new().expect("cancel");
        plain.cancel();
        assert!(plain.is_cancelled());
        assert_eq!(plain.signal(), None);
    }
}
