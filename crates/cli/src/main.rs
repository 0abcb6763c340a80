//! The `pf` command line: freeze, store, thaw and fork live Linux processes with CRIU.
//!
//! This is the only crate that prints, picks exit codes, or knows clap and colours. Each
//! subcommand lives in its own module with an `Args` type and a `run` function.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod common;
mod doctor;
mod goblin_cmd;
mod procs_cmd;
mod shell_cmd;
mod shell_inspect;
mod store_cmd;
mod terminal;

/// Freeze, store, thaw and fork live Linux processes with CRIU.
///
/// Snapshots live in a content-addressed store (see `pf store --help`). Start with `pf doctor` to
/// see whether this machine can checkpoint at all and what to fix.
#[derive(Debug, Parser)]
#[command(name = "pf", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: common::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check whether this machine can checkpoint and restore, and say what to fix
    Doctor(doctor::Args),
    /// Manage the content-addressed snapshot store: put, cat, ls, verify, tag, gc
    #[command(subcommand)]
    Store(store_cmd::Command),
    /// Capture and restore whole process trees with CRIU
    #[command(subcommand)]
    Procs(procs_cmd::Command),
    /// Freeze, thaw and fork goblins: processes that speak only through stdin/stdout/stderr
    #[command(subcommand)]
    Goblin(goblin_cmd::Command),
    /// Move a terminal shell session: freeze it, thaw it here, or beam a copy of it here
    #[command(subcommand)]
    Shell(shell_cmd::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init_tracing(cli.global.verbose);
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(&cli.global, &args),
        Command::Store(cmd) => store_cmd::run(&cli.global, cmd),
        Command::Procs(cmd) => procs_cmd::run(&cli.global, cmd),
        Command::Goblin(cmd) => goblin_cmd::run(&cli.global, cmd),
        Command::Shell(cmd) => shell_cmd::run(&cli.global, cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            common::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
