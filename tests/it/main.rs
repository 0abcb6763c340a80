//! Black-box tests of the `pf` binary: one module per subcommand.

mod store;
mod support;
