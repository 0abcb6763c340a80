//! pf-world-procs: runs CRIU to capture and restore process trees through a pf store.

pub mod images;
mod proc;
mod sys;
#[doc(hidden)]
pub mod test_support;
