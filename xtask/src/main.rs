//! Project automation: `cargo xtask ci | live | install-criu | demo | bench`.
//!
//! No dependencies beyond anyhow and serde_json; every process goes through [`process`], and cargo
//! is `$CARGO`, the one that runs us.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;
mod bench_criu;
mod bench_proc;
mod bench_registry;
mod bench_report;
mod bench_store;
mod ci;
mod criu;
mod demo;
mod install_criu;
mod process;
mod python;
mod testrun;
#[cfg(test)]
mod tidy;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  ci             fmt, clippy, cargo-deny, unit + integration + doc tests, then the live tests
                 against a real CRIU (installed first if missing; needs root)
  live           only the live tests (PF_HAS_CRIU=1, one at a time, each with a deadline)
  install-criu   make sure a CRIU pf accepts (4.2+) that passes `criu check` is installed (see --help)
  demo           the main job end to end on this machine
  bench          freeze, pause, thaw, fork and bytes stored beside raw criu; writes
                 docs/benchmarks.md (--quick: a one-minute check of the harness; see --help)
  bench store    pf store put/cat of 1 GiB against zstd, with peak memory (see --help)";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    let result = match args.first().map(String::as_str) {
        Some("ci") if args.len() == 1 => ci::ci(&root),
        Some("live") if args.len() == 1 => ci::live(&root),
        Some("install-criu") => {
            if args[1..].iter().any(|a| a == "--help" || a == "-h") {
                println!("{}", install_criu::USAGE);
                return ExitCode::SUCCESS;
            }
            install_criu::parse_args(&args[1..])
                .and_then(|opts| install_criu::ensure(&root, &opts))
                .map(|_| ExitCode::SUCCESS)
        }
        Some("demo") if args.len() == 1 => demo::demo(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "store") => {
            if args[2..].iter().any(|a| a == "--help" || a == "-h") {
                println!("{}", bench_store::USAGE);
                return ExitCode::SUCCESS;
            }
            bench_store::run(&root, &args[2..])
        }
        Some("bench") => {
            if args[1..].iter().any(|a| a == "--help" || a == "-h") {
                println!("{}", bench::USAGE);
                return ExitCode::SUCCESS;
            }
            bench::run(&root, &args[1..])
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
