//! Live tests of pf-goblins against a real CRIU (root, `PF_HAS_CRIU=1`): freeze, thaw, fork,
//! unread stdin, exit codes, and the refusals. Each kills what it starts, by pid (dropping a
//! `Goblin` kills and reaps it).

mod live;
mod support;
#[cfg(feature = "tokio")]
mod thaw_async;
mod workflow;
