//! The `pf` command line.

fn main() {}
