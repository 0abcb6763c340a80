//! pf-world-procs: runs CRIU to capture and restore process trees through a pf store.

pub mod images;
