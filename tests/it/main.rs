//! Black-box tests of the `pf` binary.
