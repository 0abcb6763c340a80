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
mod registry_cmd;
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
    #[command(subcommand, after_help = goblin_cmd::HELP)]
    Goblin(goblin_cmd::Command),
    /// Move a terminal shell session: freeze it, thaw it here, or beam a copy of it here
    #[command(subcommand)]
    Shell(shell_cmd::Command),
    /// Upload a snapshot to an OCI registry (only the blobs it lacks)
    Push(registry_cmd::PushArgs),
    /// Fetch a snapshot from an OCI registry into the store (only the blobs it lacks)
    Pull(registry_cmd::PullArgs),
}

fn main() -> ExitCode {
    let large_blocks_returned = pf_os::memory::return_large_blocks_at_once();
    quiet_on_closed_stdout_panics();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return parse_error(&err),
    };
    common::init_tracing(cli.global.verbose);
    if !large_blocks_returned {
        tracing::debug!("the heap keeps glibc's own mmap threshold");
    }
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(&cli.global, &args),
        Command::Store(cmd) => store_cmd::run(&cli.global, cmd),
        Command::Procs(cmd) => procs_cmd::run(&cli.global, cmd),
        Command::Goblin(cmd) => goblin_cmd::run(&cli.global, cmd),
        Command::Shell(cmd) => shell_cmd::run(&cli.global, cmd),
        Command::Push(args) => registry_cmd::push(&cli.global, &args),
        Command::Pull(args) => registry_cmd::pull(&cli.global, &args),
    };
    // A signal that stopped the work is ending pf on its own thread (`common::abandon`), which
    // says so: an error the interrupt caused here (a criu killed under a restore) is no news,
    // and the exit status is the signal's.
    pf_os::abandon::wait_if_ending();
    match result {
        Ok(code) => code,
        // The reader of our output went away (`pf store ls | head -1`): as in every Unix tool,
        // that ends pf quietly, and it is not a failure.
        Err(err) if is_broken_pipe(&err) && stdout_is_closed() => ExitCode::SUCCESS,
        Err(err) => {
            common::print_error(&err);
            interrupted_by(&err).map_or(ExitCode::FAILURE, |sig| ExitCode::from(128 + sig))
        }
    }
}

/// The signal that cut the work short, if a signal did (Ctrl-C while a goblin warms up): pf
/// then exits 128 + its number, as a shell reports a command a signal ended, and as `pf pull`
/// and an interrupted `pf goblin thaw` or `fork` do (`common::abandon`).
fn interrupted_by(err: &anyhow::Error) -> Option<u8> {
    err.chain().find_map(|cause| match cause.downcast_ref() {
        Some(pf_goblins::Error::Cancelled {
            signal: Some(sig), ..
        }) => u8::try_from(*sig).ok().filter(|s| *s < 128),
        _ => None,
    })
}

/// Whether an error comes from a write into a pipe whose reader is gone.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .is_some_and(|e| e.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

/// Whether nobody reads our stdout any more (a pipe or socket whose other end is closed). Only
/// then is a broken pipe ours to ignore: one to a child process is a real failure.
fn stdout_is_closed() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(&stdout),
        PollFlags::POLLOUT,
    )];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// `println!` panics when stdout is a closed pipe: end quietly with success then too, and leave
/// every other panic to the default hook.
fn quiet_on_closed_stdout_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && stdout_is_closed() {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Print clap's error, with a tip that works for an option value that starts with `-`: clap
/// suggests `-- -x`, which makes `-x` a positional argument, while `--tag=-x` is what it accepts.
fn parse_error(err: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let args: Vec<String> = std::env::args().collect();
    let option = match (err.kind(), err.get(ContextKind::InvalidArg)) {
        (ErrorKind::UnknownArgument, Some(ContextValue::String(value))) => {
            option_before(&args, value)
        }
        _ => None,
    };
    let Some((option, value)) = option else {
        err.exit();
    };
    let rendered = err.render().to_string();
    let mut text = String::new();
    for (i, line) in rendered.lines().enumerate() {
        if line.trim_start().starts_with("tip:") {
            continue;
        }
        text.push_str(line);
        text.push('\n');
        if i == 0 {
            text.push_str(&format!(
                "\n  tip: to pass '{value}' as the value of '{option}', write '{option}={value}'\n"
            ));
        }
    }
    #[allow(clippy::print_stderr)]
    {
        eprint!("{}", text.replace("\n\n\n", "\n\n"));
    }
    ExitCode::from(2)
}

/// The long option right before `value` on the command line, when it is one that takes a value:
/// `value` was meant as its value.
fn option_before(args: &[String], value: &str) -> Option<(String, String)> {
    let at = args.iter().skip(1).position(|a| a == value)? + 1;
    let option = args.get(at - 1)?;
    let name = option.strip_prefix("--").filter(|n| !n.contains('='))?;
    takes_value(&<Cli as clap::CommandFactory>::command(), name)
        .then(|| (option.clone(), value.to_owned()))
}

/// Whether any (sub)command has a long option `name` that takes a value.
fn takes_value(command: &clap::Command, name: &str) -> bool {
    command
        .get_arguments()
        .any(|a| a.get_long() == Some(name) && a.get_action().takes_values())
        || command.get_subcommands().any(|c| takes_value(c, name))
}
