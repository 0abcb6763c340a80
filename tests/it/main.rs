//! Black-box tests of the `pf` binary: one module per subcommand.

mod support;
