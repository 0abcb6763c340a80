//! pf-goblins: processes that speak only through stdin, stdout and stderr — frozen with CRIU,
//! thawed onto fresh pipes, forked into many clones.
//!
//! A *goblin* is a process whose stdout is a pipe, whose stdin and stderr are pipes, files or
//! `/dev/null`, and nothing else matters to the outside world: a REPL, a language server over stdio, a Python or Lean session that took
//! minutes to warm up. Because its whole interface is its pipes, a snapshot of it can be
//! brought back any number of times, each copy wired to pipes of its own (files are reopened by
//! path, as CRIU does).
//!
//! - [`spawn`] starts a program as a goblin (its own session, stdio on pipes, no stray fds).
//! - [`freeze`] checkpoints a goblin into the store (a procs blob labelled `goblin=v1`) or into a
//!   plain CRIU images directory with a `goblin.json` beside the images.
//! - [`thaw`] restores one copy, in its own pid and mount namespaces, on three fresh pipes, and
//!   returns a [`Goblin`] you talk to and wait for; `thaw_async` (feature `tokio`) does the same
//!   over tokio pipes.
//! - [`fork`] restores `n` copies of one snapshot side by side, reading the images once.
//! - [`warm_up`] is the whole road to a warm snapshot: start a command, feed it input, wait for a
//!   ready line or for quiet (with a deadline, and a [`Cancel`]), freeze it, name the snapshot,
//!   drain what it printed.
//! - [`fork_and_collect`] thaws N clones, gives each its own input (see
//!   [`inputs_from_template`]), and gathers each one's output and exit status, each within its
//!   deadline. [`attach`] runs one goblin as if it were this program.
//! - [`load`] checks a snapshot and extracts its images once, for any number of later thaws and
//!   forks ([`Loaded::thaw`], [`Loaded::fork`]).
//!
//! Bytes that were written to a goblin's stdin but not yet read when it was frozen are saved in
//! the snapshot and reach every thawed copy before anything written after the thaw.
//!
//! Every [`Error`] has a [`Error::kind`]: the same [`ErrorKind`] as pf-world-procs' errors, so
//! "not a goblin" ([`ErrorKind::NotAGoblin`], with a [`NotAGoblinReason`]), "criu failed", "pid in
//! use" or "store corrupt" are told apart without matching text.
//!
//! ```no_run
//! use std::io::{BufRead, BufReader, Write};
//! use pf_goblins::{FreezeOptions, FreezeTarget, Source, ThawOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = pf_core::MemBlobStore::default();
//! let cmd = ["python3", "-u", "-c", "import sys\nn = 0\nfor l in sys.stdin:\n n += 1\n print(n)"];
//! let cmd: Vec<std::ffi::OsString> = cmd.iter().map(Into::into).collect();
//! let mut goblin = pf_goblins::spawn(&cmd, &pf_goblins::SpawnOptions::in_dir("/".into()))?;
//! goblin.stdin.as_mut().unwrap().write_all(b"a\nb\n")?;
//! let mut out = BufReader::new(goblin.stdout.take().unwrap());
//! let mut line = String::new();
//! out.read_line(&mut line)?; // "1"
//! out.read_line(&mut line)?; // "2"
//! let frozen = pf_goblins::freeze(
//!     goblin.pid(),
//!     FreezeTarget::Store(&store),
//!     &FreezeOptions { leave_running: false, shell_job: false },
//! )?;
//! let digest = frozen.digest().expect("frozen into the store");
//! let source = Source::Store { store: &store, digest };
//! for mut clone in pf_goblins::fork(&source, 4)? {
//!     clone.stdin.as_mut().unwrap().write_all(b"c\n")?; // each clone prints "3"
//! }
//! let again = pf_goblins::thaw(&source, &ThawOptions { new_pid_namespace: true })?;
//! # Ok(()) }
//! ```

mod attach;
mod cancel;
mod collect;
mod error;
mod freeze;
mod goblin;
mod pump;
mod spawn;
mod stdio;
#[cfg(feature = "tokio")]
mod sys;
mod thaw;
#[cfg(feature = "tokio")]
mod thaw_async;
mod warm;
mod wire;

pub use crate::attach::{Attach, attach};
pub use crate::cancel::Cancel;
pub use crate::collect::{
    CollectOptions, Collected, collect, fork_and_collect, inputs_from_template,
};
pub use crate::error::{Error, ErrorKind, NotAGoblinReason, Result};
pub use crate::freeze::{FreezeOptions, FreezeTarget, Frozen, OutputReader, Snapshot, freeze};
pub use crate::goblin::{Goblin, Killer};
pub use crate::pump::Stream;
pub use crate::spawn::{SpawnOptions, spawn};
pub use crate::stdio::{StdioKind, Streams};
pub use crate::thaw::{
    Loaded, Source, ThawOptions, Wire, Wiring, fork, load, load_auto, load_auto_once, load_lazy,
    load_streamed, thaw,
};
#[cfg(feature = "tokio")]
pub use crate::thaw_async::{AsyncGoblin, thaw_async};
pub use crate::warm::{
    Drain, PipeHolder, Ready, WarmFrom, WarmOptions, Warmed, criu_ready, warm_up,
};

/// The label a goblin's procs blob carries (`labels["goblin"]`), with this format's version.
pub const GOBLIN_LABEL: (&str, &str) = ("goblin", "v1");

/// The label `pf shell freeze` gives a terminal shell's procs blob: not a goblin, and thawed
/// only by `pf shell thaw`.
pub const SHELL_LABEL: (&str, &str) = ("shell", "v1");
