//! Handing this terminal's foreground to a restored shell, and taking it back.

use std::os::fd::AsFd as _;

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Pid, getpgid, tcgetpgrp, tcsetpgrp};

/// Taken before a shell is restored: while alive, the restored shell's group may own the
/// terminal on stdin; on drop the group that had it before the restore gets it back. (CRIU hands
/// the terminal to the restored shell's group itself, during the restore, so the group to give
/// it back to must be read before; and a restore that fails after that must give it back too.)
#[derive(Debug)]
pub(crate) struct Foreground {
    previous: Option<Pid>,
}

impl Foreground {
    /// Remember which group has the terminal on stdin now (pf's, run in the foreground).
    pub(crate) fn keep() -> Self {
        // A background group that sets the foreground gets SIGTTOU unless it is blocked; pf is in
        // the background when it takes the terminal back.
        let mut ttou = SigSet::empty();
        ttou.add(Signal::SIGTTOU);
        if let Err(err) = ttou.thread_block() {
            tracing::debug!(%err, "cannot block SIGTTOU");
        }
        Self {
            previous: tcgetpgrp(std::io::stdin().as_fd()).ok(),
        }
    }

    /// Make `pid`'s process group the foreground group of the terminal on stdin (the restore has
    /// put the shell in pf's session, so it may have it; CRIU has usually done so already).
    /// Best effort: if it cannot, pf says so and nothing changes.
    pub(crate) fn give(&self, pid: i32) {
        let stdin = std::io::stdin();
        match getpgid(Some(Pid::from_raw(pid))) {
            Ok(group) => {
                if let Err(err) = tcsetpgrp(stdin.as_fd(), group) {
                    tracing::warn!(
                        %err,
                        pid,
                        "cannot give this terminal to the restored shell: it has no job \
                         control, and Ctrl-C typed at it reaches pf"
                    );
                }
            }
            Err(err) => tracing::debug!(%err, pid, "cannot read the restored shell's group"),
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        if let Some(group) = self.previous
            && tcgetpgrp(stdin.as_fd()).ok() != Some(group)
            && let Err(err) = tcsetpgrp(stdin.as_fd(), group)
        {
            tracing::debug!(%err, "cannot take the terminal back");
        }
    }
}
