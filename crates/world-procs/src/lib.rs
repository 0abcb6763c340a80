//! pf-world-procs: runs CRIU to capture and restore process trees through a pf store.
//!
//! This is the only crate in the workspace that runs the `criu` binary or reads CRIU images.
//! [`criu::probe`] finds a usable criu (cached per process).

pub mod criu;
mod error;
pub mod images;
mod proc;
mod runner;
mod sys;
#[doc(hidden)]
pub mod test_support;

pub use crate::criu::probe;
pub use crate::error::{Error, Result};

/// How a process ended: its exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit status {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}
