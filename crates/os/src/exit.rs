//! How a process ended, in one type: from a raw wait status or an [`ExitStatus`], to an
//! [`ExitStatus`] and to pf's exit code (the code, or 128 + N for signal N, as shells do).

use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;

/// How a process ended: its exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// A raw `waitpid` status. One that is neither an exit nor a kill (a stop, which a wait
    /// without `WUNTRACED` never returns) reads as `Code(-1)`.
    pub fn from_wait_status(status: i32) -> Self {
        if libc::WIFEXITED(status) {
            Self::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Self::Signal(libc::WTERMSIG(status))
        } else {
            Self::Code(-1)
        }
    }

    /// The same ending as an [`ExitStatus`] (a raw wait status).
    pub fn to_status(self) -> ExitStatus {
        match self {
            Self::Code(c) => ExitStatus::from_raw((c & 0xff) << 8),
            Self::Signal(s) => ExitStatus::from_raw(s & 0x7f),
        }
    }

    /// pf's exit code for it: the code (low 8 bits), or 128 + N for signal N.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Code(c) => (c & 0xff) as u8,
            Self::Signal(s) => 128u8.wrapping_add((s & 0x7f) as u8),
        }
    }

    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }
}

impl From<ExitStatus> for Exit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(sig)) => Self::Signal(sig),
            (None, None) => Self::Code(-1),
        }
    }
}

impl From<Exit> for ExitStatus {
    fn from(exit: Exit) -> Self {
        exit.to_status()
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit status {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(Exit::from_wait_status(7 << 8), Exit::Code(7));
        assert_eq!(Exit::from_wait_status(9), Exit::Signal(9));
        assert_eq!(Exit::from_wait_status(0x137f), Exit::Code(-1), "a stop");
    }

    #[test]
    fn converts_both_ways_and_to_pf_codes() {
        for exit in [
            Exit::Code(0),
            Exit::Code(3),
            Exit::Code(255),
            Exit::Signal(9),
        ] {
            assert_eq!(Exit::from(exit.to_status()), exit);
        }
        assert_eq!(Exit::Code(3).exit_code(), 3);
        assert_eq!(Exit::Code(256 + 4).exit_code(), 4);
        assert_eq!(Exit::Signal(9).exit_code(), 137);
        assert_eq!(Exit::Signal(15).exit_code(), 143);
        assert!(Exit::Code(0).success() && !Exit::Signal(9).success());
        assert_eq!(Exit::Signal(9).to_status().signal(), Some(9));
        assert_eq!(Exit::Code(0).to_string(), "exit status 0");
        assert_eq!(Exit::Signal(9).to_string(), "killed by signal 9");
    }
}
