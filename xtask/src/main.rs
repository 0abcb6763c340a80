//! Project automation: `cargo xtask ci | live | install-criu | bench | demo`.

fn main() {}
