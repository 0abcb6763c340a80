//! pf-world-procs: runs CRIU to capture and restore process trees through a pf store.
//!
//! This is the only crate in the workspace that runs the `criu` binary or reads CRIU images.
//! [`criu::probe`] finds a usable criu (cached per process); [`capture`] dumps a tree into a
//! store as a deterministic images tar plus a [`ProcsBlob`]; [`restore`] brings it back as a
//! [`Restored`] tree that is our child. Everything criu does goes through one runner (log, work
//! dir, deadline, error lines). Which criu builds pf accepts and where it looks for criu is
//! [`criu::policy`], the one definition pf, `pf doctor` and `cargo xtask install-criu` share.
//!
//! Errors: [`Error::kind`] returns an [`ErrorKind`] (`CriuUnavailable`, `NeedsPrivilege`,
//! `SocketsUnsupported`, `ForeignTerminal`, `PidInUse`, `CriuFailed`, `NoSuchProcess`,
//! `InvalidSnapshot`, `NotFound`, `StoreCorrupt`, `InvalidInput`, `NoSpace`, `Io`; pf-goblins adds
//! `NotAGoblin`) so a caller acts on a failure without matching its text; a failed criu run
//! carries the [`criu_log::CriuFailure`] its log names, when pf recognises one.

mod capture;
mod capture_stream;
pub mod criu;
pub mod criu_log;
mod error;
mod ghosts;
pub mod images;
mod lazy;
pub mod memory_map;
mod nsenter;
mod nsinit;
mod restore;
mod runner;
mod splice;
mod streamer;
mod tarball;
#[doc(hidden)]
pub mod test_support;
mod uffd;
mod v2;
mod wire;

pub use crate::capture::{
    CaptureOptions, CaptureProgress, Captured, DumpReport, capture, capture_with_progress,
    dump_to_dir,
};
pub use crate::criu::probe;
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::nsenter::restored_by_pf;
pub use crate::restore::{
    ImagesDir, InheritFd, LAZY_MIN_BYTES, LazyImages, RestoreOptions, Restored, StreamedImages,
    extract_images, extract_images_lazy, extract_images_streamed, lazy_suits, load_procs, restore,
    restore_dir, restore_lazy, restore_streamed,
};
pub use crate::v2::FORMAT_ENV;
pub use crate::wire::{CriuProcs, DumpOptions, DumpStats, PagesImage, ProcsBlob};

/// How a process ended (pf-os's one exit type, re-exported for callers of [`Restored::wait`]).
pub use pf_os::Exit;
