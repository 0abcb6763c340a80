//! pf-os: the one home of pf's OS process plumbing.
//!
//! Every pf crate (and xtask) reads `/proc`, prepares children for `exec`, signals through
//! pidfds, maps exit statuses and makes scratch directories through this crate, so a fix to any
//! of them is made once:
//!
//! - [`proc`]: pure parsers of `/proc/PID/stat`, `/proc/PID/status` and `/proc/PID/fd` links,
//!   unit-tested on captured text, and thin readers around them;
//! - [`fd`]: descriptor hygiene between fork and exec (close-on-exec of everything inherited,
//!   with a fallback for kernels before 5.11), pidfds;
//! - [`Exit`]: how a process ended, convertible to [`std::process::ExitStatus`] and to pf's exit
//!   code;
//! - [`memory`]: large blocks of pf's heap go back to the kernel when freed;
//! - [`scratch`]: private, `flock`ed scratch directories whose abandoned copies (a killed pf
//!   cannot clean up) are swept, and bounded keeping of failure directories;
//! - [`abandon`]: ending the process at once when its work is interrupted, with every process
//!   it started killed and every scratch directory it holds removed;
//! - [`guard`]: a process that lets a tree criu left stopped run on when this one dies before
//!   it could kill it or let it go.
//!
//! It knows nothing about CRIU, stores or goblins.

pub mod abandon;
mod error;
mod exit;
pub mod fd;
pub mod guard;
pub mod memory;
pub mod proc;
pub mod scratch;

pub use crate::error::{Error, Result};
pub use crate::exit::Exit;
