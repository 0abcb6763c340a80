//! Integration tests of pf-world-procs. Tests named `live_*` need root and a working CRIU and
//! run only with `PF_HAS_CRIU=1` (`cargo xtask live`), serially, each under a deadline.

mod bad_input;
mod live;
mod support;
