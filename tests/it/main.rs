//! Black-box tests of the `pf` binary: one module per subcommand.

mod docs;
mod doctor;
mod goblin;
mod lazy;
mod pages_v2;
mod procs;
mod procs_net;
mod registry;
mod shell;
mod store;
mod support;
