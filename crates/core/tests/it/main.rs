//! Integration tests of pf-core's on-disk store: round trips, corruption, concurrency, crashes,
//! permissions, faults and interoperability with the `zstd` tool.

mod concurrency;
mod corruption;
mod faults;
mod gc;
mod interop;
mod roundtrip;
mod support;
