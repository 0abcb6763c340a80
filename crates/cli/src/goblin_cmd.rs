//! `pf goblin`: make warm snapshots of stdio-only processes, thaw them, fork them.
//!
//! Every subcommand is a thin layer over `pf_goblins` (`warm_up`, `freeze`, `attach`,
//! `fork_and_collect`): here are only the arguments, the printing, and the glue that turns pf's
//! own signals into a goblin's signal or a `Cancel`.

use std::ffi::OsString;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use pf_core::{BlobStore as _, Digest256};
use pf_goblins::{
    Attach, Cancel, CollectOptions, Drain, FreezeOptions, FreezeTarget, Ready, Snapshot, Source,
    ThawOptions, WarmFrom, WarmOptions, Wire,
};

use crate::common::{self, Global, Signals, block_signals, forward_signals_to};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Start a command as a goblin, wait until it is warm, freeze it into the store under a name
    #[command(after_help = SPAWN_HELP)]
    Spawn(SpawnArgs),
    /// Freeze a running goblin (a process whose stdout is a pipe, stdin and stderr pipes or files)
    #[command(after_help = FREEZE_HELP)]
    Freeze(FreezeArgs),
    /// Thaw a goblin: its stdin, stdout and stderr become pf's own; pf exits with its exit code
    #[command(after_help = THAW_HELP)]
    Thaw(ThawArgs),
    /// Thaw N copies of a goblin at once, give each the same input, print what each answered
    #[command(after_help = FORK_HELP)]
    Fork(ForkArgs),
}

/// `pf goblin --help`: the whole job in four lines.
pub(crate) const HELP: &str = "\
Examples:
  pf goblin spawn --tag kb --until '^ready' -- python3 -u kb.py   start it, wait for its ready
                                                                  line, freeze it as `kb`
  echo 'question' | pf goblin thaw kb              one copy, answering on this terminal
  pf goblin fork kb -n 4 --send 'question {i}'     four copies at once, each answers
  pf goblin freeze --pid 4242 --tag warm           a goblin you started yourself
  pf goblin thaw kb --pidfile kb.pid               a copy that says its pid; from elsewhere,
  pf goblin freeze --pidfile kb.pid --tag kb2      freeze it as it runs (shares kb's pages)

`pf goblin <command> --help` says more about each.";

const SPAWN_HELP: &str = "\
How it works:
  pf starts CMD in its own session with stdin, stdout and stderr on pipes, writes --input into
  its stdin (stdin stays open), and waits until it is warm: until its stdout matches --until, or,
  without --until, until it has printed nothing for --quiet-ms. Then it freezes CMD into the
  store, names the snapshot --tag, stops CMD and prints the snapshot's digest on stdout.
  pf checks that CRIU can freeze here before it starts CMD.

  Everything CMD printed while warming up is copied to pf's stderr as it arrives, so nothing it
  said is lost; thawed copies continue right after it. After the freeze pf reads what is left
  for at most --drain-ms; a process CMD started in a session of its own (setsid) may hold the
  output open longer: pf names it and finishes. Ctrl-C (SIGINT, SIGTERM, SIGHUP) stops CMD
  before the freeze (pf then exits 128 + the signal's number: 130 for Ctrl-C), and ends the
  drain after it. Input CMD had not read yet when it was
  frozen is kept in the snapshot and reaches every thawed copy first.

  Line-oriented programs must not buffer their output when it is a pipe: use `python3 -u`,
  `stdbuf -oL CMD`, or the program's own flag, or --until never sees the ready line.

Examples:
  printf 'import json\\nprint(\"ready\")\\n' > warm.py
  pf goblin spawn --tag py --input warm.py --until '^ready$' -- python3 -u -i -q
  echo 'print(json.dumps([6 * 7]))' | pf goblin thaw py     # prints [42]
  pf goblin spawn --tag kb --until '^ready' -- python3 -u kb.py  # kb.py prints ready when loaded
  pf goblin spawn --tag sh --quiet-ms 200 -- sh              # no ready line: wait for silence";

const FREEZE_HELP: &str = "\
The process must be a goblin: its stdout a pipe, its stdin and stderr pipes, files or /dev/null
(a thaw gives it fresh pipes for its pipes; CRIU reopens the files by path), none of them a
terminal, a socket or a named pipe (pf says what each one is when it refuses), leading its own
session (`setsid`), unless --shell-job.

By default the goblin keeps running after the freeze (--leave-running); --kill stops it once the
snapshot is complete. Bytes written to its stdin but not read yet are kept in the snapshot.
Ctrl-C does not cut a freeze short (criu would finish the dump without pf, and with --kill stop
the goblin with no snapshot stored): pf says so, finishes, and prints the digest.

Examples:
  pf goblin freeze --pid 4242 --tag warm          # prints sha256:…; `pf goblin thaw warm`
  pf goblin freeze --pid 4242 --kill --images /tmp/g  # plain CRIU images + goblin.json
  pf goblin freeze --pid 4242 --json";

const THAW_HELP: &str = "\
The goblin is restored in its own pid and mount namespaces, so any number of thaws of one
snapshot run at once, and beside the original. Where pf's stdin, stdout or stderr is a pipe,
the goblin gets that pipe itself and pf copies nothing; a terminal, a file or a named pipe is
pumped: pf copies its stdin to the goblin (end of input closes the goblin's stdin), the goblin's stdout to pf's
stdout and its stderr to pf's stderr. (Input the goblin had not read when it was frozen goes in
first, so then stdin is pumped too.) pf forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to it and
exits with its exit code (128+N when signal N ended it). So `pf goblin thaw NAME` behaves like running the program.

Such a signal that comes before the goblin runs (while pf loads the snapshot and CRIU restores
it) stops the thaw instead: pf kills CRIU and the half-restored copy, removes the images it
unpacked, and exits 128 + the signal's number (130 for Ctrl-C).

Examples:
  echo 'print(2 + 2)' | pf goblin thaw py
  pf goblin thaw sha256:3a…e1 < questions.txt > answers.txt
  pf goblin thaw --images /tmp/g";

const FORK_HELP: &str = "\
Every copy starts from the same frozen state and runs in its own namespaces. Each gets the same
input — the --send lines, else all of pf's stdin — then end of input; pf waits for all of them
and prints what each wrote, in order: lines prefixed with `[K] ` (K = 1..N), or one JSON object
per copy with --json. In --send text, `{i}` becomes the copy's number, so copies can be asked
different things (`{{i}}` sends a literal `{i}`). With --timeout, a copy still running that long after its thaw is killed.
Signals pf receives (Ctrl-C) once the copies run are passed on to every copy; one that comes
before (while pf reads the input, loads the snapshot and CRIU restores the copies) stops the
fork: pf kills CRIU and every copy it started, removes the images it unpacked, and exits 128 +
the signal's number (130 for Ctrl-C). Exits 0 when every copy exited 0; else, when signal N
reached pf while the copies ran, ends killed by it as they were (a shell says 128 + N, and a
loop around it stops), else 1.

Examples:
  pf goblin fork kb -n 4 --send 'nth {i}000'
  printf 'x = 1\\nprint(x)\\n' | pf goblin fork py -n 8 --json";

#[derive(Debug, clap::Args)]
pub(crate) struct SpawnArgs {
    /// Name the snapshot in the store (a ref, like `pf store tag`)
    #[arg(long, value_name = "NAME")]
    tag: String,
    /// Write this file into the goblin's stdin first (`-`: pf's own stdin, read to its end)
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Warm when stdout (all of it so far) matches this regular expression; `^` and `$` match
    /// at the start and end of every line (ended by `\n` or `\r\n`)
    #[arg(long, value_name = "REGEX")]
    until: Option<String>,
    /// Without --until: warm once stdout and stderr have been silent this long
    #[arg(long, value_name = "MS", default_value_t = 500)]
    quiet_ms: u64,
    /// Give up (and stop the command) if it is not warm after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// After the freeze, read what the goblin printed for at most this long (processes it
    /// started with setsid may hold its output open; pf names them and moves on)
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    drain_ms: u64,
    /// Working directory of the goblin [default: pf's]
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Print a JSON object instead of the digest
    #[arg(long)]
    json: bool,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["pid", "pidfile"])))]
pub(crate) struct FreezeArgs {
    /// The goblin's pid
    #[arg(long)]
    pid: Option<i32>,
    /// The pid in FILE, written by `pf goblin thaw --pidfile FILE`; refused if FILE is stale
    /// (its copy ended and the pid now names a process started since)
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Keep the goblin running after the freeze [default]
    #[arg(long, conflicts_with = "kill")]
    leave_running: bool,
    /// Stop the goblin once the snapshot is complete
    #[arg(long)]
    kill: bool,
    /// Name the snapshot in the store
    #[arg(long, value_name = "NAME", conflicts_with = "images")]
    tag: Option<String>,
    /// Write plain CRIU images and goblin.json into DIR (created; must be empty) instead of the store
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Freeze a goblin that does not lead its own session (criu --shell-job)
    #[arg(long)]
    shell_job: bool,
    /// Print a JSON object instead of the digest or directory
    #[arg(long)]
    json: bool,
}

/// Which snapshot: a digest or name in the store, or an images directory.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct SnapshotArg {
    /// The snapshot: a name in the store, a digest (sha256:…) or a unique prefix of one
    /// (sha256:3f2a9c, or 8 or more hex digits alone when no name is spelled so)
    #[arg(value_name = "DIGEST|NAME")]
    snapshot: Option<String>,
    /// Thaw from an images directory made by `pf goblin freeze --images`
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ThawArgs {
    #[command(flatten)]
    from: SnapshotArg,
    #[command(flatten)]
    mode: ModeArgs,
    /// Write the goblin's pid (as seen here) to FILE once it runs, and remove FILE when it has
    /// exited: to freeze this copy while it runs, `pf goblin freeze --pidfile FILE`. One FILE
    /// per copy: refused before the thaw if FILE names a copy that still runs, or holds no pid
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
}

/// Lazy or eager; by default lazy for snapshots of 32 MiB of memory or more stored page by
/// page (the default format; not with PF_SNAPSHOT_FORMAT=v1), eager otherwise.
#[derive(Debug, clap::Args)]
pub(crate) struct ModeArgs {
    /// Serve the goblin's memory from the store on demand: it answers as soon as CRIU has
    /// rebuilt it, pages it touches come first (each checked against its digest), the rest
    /// follows in the background (needs a page-level snapshot: pf's default format, not one made
    /// with PF_SNAPSHOT_FORMAT=v1) [default for such snapshots of 32 MiB or more]
    #[arg(long, conflicts_with = "eager")]
    lazy: bool,
    /// Put all of the goblin's memory in before it runs (from a page-level snapshot, streamed
    /// from the store into CRIU as it restores, each page checked on the way)
    #[arg(long)]
    eager: bool,
}

impl ModeArgs {
    /// `Some(true)` lazy, `Some(false)` eager, `None` pf's choice.
    fn lazy(&self) -> Option<bool> {
        match (self.lazy, self.eager) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct ForkArgs {
    #[command(flatten)]
    from: SnapshotArg,
    /// How many copies
    #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=512))]
    count: u16,
    /// A line to write to every copy's stdin (repeatable; `{i}` becomes the copy's number,
    /// `{{i}}` a literal `{i}`)
    #[arg(long, value_name = "TEXT")]
    send: Vec<String>,
    /// Kill a copy still running this many seconds after it was thawed [default: no limit]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Print one JSON object per copy (clone, pid, exit_code, signal, timed_out, stdout, stderr)
    #[arg(long)]
    json: bool,
    /// Lazy (copies share one page cache) or eager, as for `pf goblin thaw`
    #[command(flatten)]
    mode: ModeArgs,
}

pub(crate) fn run(global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Spawn(args) => spawn(global, &args),
        Command::Freeze(args) => freeze(global, &args),
        Command::Thaw(args) => thaw(global, &args),
        Command::Fork(args) => fork(global, &args),
    }
}

// ---------------------------------------------------------------------------------------------
// spawn

fn spawn(global: &Global, args: &SpawnArgs) -> anyhow::Result<ExitCode> {
    pf_core::validate_name(&args.tag).context("--tag is not a usable name")?;
    let input = match &args.input {
        None => Vec::new(),
        Some(p) if p == Path::new("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read pf's stdin for --input -")?;
            buf
        }
        Some(p) => {
            std::fs::read(p).with_context(|| format!("cannot read --input {}", p.display()))?
        }
    };
    let store = common::open_store(global)?;
    let was = store.get_name(&args.tag).ok();
    let cwd = match &args.cwd {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("cannot find the current directory")?,
    };
    let cancel = Cancel::new()?;
    forward_signals_to(block_signals(), {
        let cancel = cancel.clone();
        move |sig| cancel.cancel_with_signal(sig)
    });
    let options = WarmOptions {
        input,
        ready: match &args.until {
            Some(re) => Ready::Matches(re.clone()),
            None => Ready::Quiet(Duration::from_millis(args.quiet_ms)),
        },
        timeout: Duration::from_secs(args.timeout),
        freeze: FreezeOptions {
            leave_running: false,
            shell_job: false,
        },
        tag: Some(args.tag.clone()),
        drain: Duration::from_millis(args.drain_ms),
    };
    let from = WarmFrom::Command {
        command: args.command.clone(),
        spawn: pf_goblins::SpawnOptions::in_dir(cwd),
    };
    // What the goblin prints while it warms up goes to pf's stderr as it arrives.
    let mut stderr = std::io::stderr();
    let mut printed = false;
    let warmed = pf_goblins::warm_up(
        from,
        FreezeTarget::Store(&store),
        &options,
        &cancel,
        &mut |_, bytes| {
            printed |= !bytes.is_empty();
            stderr.write_all(bytes).ok();
        },
    );
    let warmed = match warmed {
        Ok(w) => w,
        Err(
            e @ pf_goblins::Error::NotWarm {
                on_stderr: false,
                input_taken: None,
                ..
            },
        ) => bail!("{e} (raise --timeout?)"),
        Err(e @ pf_goblins::Error::NotWarm { .. }) => bail!("{e}"),
        Err(e @ pf_goblins::Error::ExitedWarming { .. }) if printed => {
            bail!("{e}; its output is above")
        }
        Err(e @ pf_goblins::Error::ExitedWarming { .. }) => {
            bail!("{e}, printing nothing (a goblin must keep running, waiting for its input)")
        }
        Err(e @ pf_goblins::Error::Pattern { .. }) => {
            return Err(anyhow::Error::new(e).context("--until is not usable"));
        }
        Err(e) => return Err(e.into()),
    };
    match &warmed.drain {
        Drain::HeldOpen(holders) if holders.is_empty() => note(&format!(
            "the goblin's output was still open {} ms after the freeze; pf stopped reading",
            args.drain_ms
        )),
        Drain::HeldOpen(holders) => note(&format!(
            "the goblin's output was still held open {} ms after the freeze by {}: processes it \
             started outside its process group; pf stopped reading and left them running",
            args.drain_ms,
            holders
                .iter()
                .map(|h| format!("pid {} ({})", h.pid, h.command))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Drain::Cancelled => note(&format!(
            "interrupted{} after the snapshot was complete; what the goblin printed after that \
             may be missing above",
            cancel
                .signal()
                .map_or_else(String::new, |s| format!(" by signal {s}"))
        )),
        Drain::Complete | Drain::LeftRunning => {}
    }
    let digest = warmed
        .frozen
        .digest()
        .context("freeze into the store gave no digest")?;
    moved(&args.tag, was, digest);
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "digest": digest,
            "tag": args.tag,
            "pid": warmed.pid,
            "stdio": warmed.frozen.streams.links(),
            "warmup_ms": u64::try_from(warmed.warmup.as_millis()).unwrap_or(u64::MAX),
        });
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout, "{digest}")?;
    }
    tracing::info!(tag = %args.tag, %digest, "stored warm goblin");
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stderr)]
fn note(text: &str) {
    eprintln!("pf: {text}");
}

/// Say so when `--tag` moved a name that pointed at another snapshot: that one may now be
/// named by nothing, and the next gc removes it.
fn moved(tag: &str, was: Option<Digest256>, now: &Digest256) {
    if let Some(was) = was.filter(|was| was != now) {
        note(&format!(
            "the name {tag:?} now points at this snapshot; it pointed at {was}, which a gc \
             removes unless another name points at it (`pf store tag NAME {was}` keeps it)"
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// freeze

fn freeze(global: &Global, args: &FreezeArgs) -> anyhow::Result<ExitCode> {
    let options = FreezeOptions {
        leave_running: !args.kill,
        shell_job: args.shell_job,
    };
    let store;
    let target = match &args.images {
        Some(dir) => FreezeTarget::Images(dir),
        None => {
            if let Some(tag) = &args.tag {
                pf_core::validate_name(tag).context("--tag is not a usable name")?;
            }
            store = common::open_store(global)?;
            FreezeTarget::Store(&store)
        }
    };
    // Held from the first blob to the name (see agent_docs/formats.md).
    let _writing = match target {
        FreezeTarget::Store(store) => Some(
            store
                .writer_lock()
                .context("cannot lock the store for writing")?,
        ),
        FreezeTarget::Images(_) => None,
    };
    let pid = match (args.pid, &args.pidfile) {
        (Some(pid), _) => pid,
        (None, Some(file)) => pid_from_pidfile(file)?,
        (None, None) => anyhow::bail!("say which goblin: --pid PID or --pidfile FILE"),
    };
    let deferred = common::Deferred::start("the freeze");
    let was = match (&args.tag, target) {
        (Some(tag), FreezeTarget::Store(store)) => store.get_name(tag).ok(),
        _ => None,
    };
    let frozen = pf_goblins::freeze(pid, target, &options)?;
    if let (Some(tag), FreezeTarget::Store(store), Some(digest)) =
        (&args.tag, target, frozen.digest())
    {
        store
            .set_name(tag, digest)
            .with_context(|| format!("cannot name the snapshot {tag}"))?;
        moved(tag, was, digest);
    }
    deferred.report();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut json = serde_json::json!({
            "pid": frozen.pid,
            "left_running": options.leave_running,
            "stdio": frozen.streams.links(),
        });
        match &frozen.snapshot {
            Snapshot::Stored(digest) => {
                json["digest"] = serde_json::json!(digest);
                json["tag"] = serde_json::json!(args.tag);
            }
            Snapshot::Images(dir) => json["images"] = serde_json::json!(dir),
        }
        writeln!(stdout, "{json}")?;
    } else {
        match &frozen.snapshot {
            Snapshot::Stored(digest) => writeln!(stdout, "{digest}")?,
            Snapshot::Images(dir) => writeln!(stdout, "{}", dir.display())?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// thaw

/// The store (kept open) and digest, or the images directory, a snapshot argument names.
enum Resolved {
    Store(pf_core::FsBlobStore, Digest256),
    Images(PathBuf),
}

impl Resolved {
    fn new(global: &Global, arg: &SnapshotArg) -> anyhow::Result<Resolved> {
        if let Some(dir) = &arg.images {
            return Ok(Resolved::Images(dir.clone()));
        }
        let name = arg
            .snapshot
            .as_deref()
            .context("name a snapshot or give --images")?;
        let store = common::open_existing_store(global)?;
        let digest = common::resolve_as(&store, name, "snapshot")?;
        // A name whose snapshot is gone: said with the name and the fix, not as a blob
        // missing deep in the load.
        if !store.contains(&digest).unwrap_or(true)
            && store.get_name(name).is_ok_and(|target| target == digest)
        {
            anyhow::bail!(
                "the name {name:?} points at {digest}, which is not in the store (removed by \
                 hand, or lost): nothing was thawed; `pf store untag {name}` removes the name, \
                 and `pf store verify` lists anything else that is missing"
            );
        }
        Ok(Resolved::Store(store, digest))
    }

    fn source(&self) -> Source<'_> {
        match self {
            Resolved::Store(store, digest) => Source::Store { store, digest },
            Resolved::Images(dir) => Source::Images(dir),
        }
    }

    /// Load the snapshot for thaws: lazy ones (memory served from the store), eager ones, or
    /// (`None`) whichever suits it. `once`: for a single thaw, whose eager restore streams the
    /// memory from the store into CRIU rather than extracting it first.
    fn load(self, lazy: Option<bool>, once: bool) -> anyhow::Result<pf_goblins::Loaded> {
        match (self, lazy) {
            (Resolved::Store(store, digest), Some(true)) => {
                Ok(pf_goblins::load_lazy(std::sync::Arc::new(store), &digest)?)
            }
            (Resolved::Store(store, digest), None) if once => Ok(pf_goblins::load_auto_once(
                std::sync::Arc::new(store),
                &digest,
            )?),
            (Resolved::Store(store, digest), Some(false)) if once => Ok(pf_goblins::load_streamed(
                std::sync::Arc::new(store),
                &digest,
            )?),
            (Resolved::Store(store, digest), None) => {
                Ok(pf_goblins::load_auto(std::sync::Arc::new(store), &digest)?)
            }
            (Resolved::Images(_), Some(true)) => anyhow::bail!(
                "--lazy serves memory from the store: name a snapshot in the store, not --images"
            ),
            (resolved, _) => Ok(pf_goblins::load(&resolved.source())?),
        }
    }
}

fn thaw(global: &Global, args: &ThawArgs) -> anyhow::Result<ExitCode> {
    // Until the goblin runs, a signal stops the thaw and leaves nothing behind (first thing:
    // the loading starts threads, which must not take the signals' default action).
    let signals = Signals::start(common::abandon("the thaw"));
    if let Some(path) = &args.pidfile {
        Pidfile::check(path)?;
    }
    let loaded = Resolved::new(global, &args.from)?.load(args.mode.lazy(), true)?;
    // A pipe of ours goes to the goblin as it is; anything else (a terminal, a file) is pumped.
    // The unread input saved in the snapshot must go first, through a pipe of pf's.
    let wiring = pf_goblins::Wiring {
        stdin: if loaded.stdin_backlog().is_empty() {
            Wire::pipe_or_new(std::io::stdin().as_fd())?
        } else {
            Wire::NewPipe
        },
        stdout: Wire::pipe_or_new(std::io::stdout().as_fd())?,
        stderr: Wire::pipe_or_new(std::io::stderr().as_fd())?,
    };
    let mut goblin = loaded.thaw_wired(
        &ThawOptions {
            new_pid_namespace: true,
        },
        wiring,
    )?;
    // From now on the signals are the goblin's.
    let killer = goblin.killer();
    signals.set(move |sig| {
        tracing::info!(sig, "forwarding signal to the goblin");
        let _ = killer.forward(sig);
    });
    drop(loaded);
    tracing::info!(
        pid = goblin.pid(),
        stdin_pumped = goblin.stdin.is_some(),
        stdout_pumped = goblin.stdout.is_some(),
        stderr_pumped = goblin.stderr.is_some(),
        "goblin thawed"
    );
    let pidfile = match &args.pidfile {
        Some(path) => Some(Pidfile::write(path, goblin.pid())?),
        None => None,
    };
    let status = pf_goblins::attach(
        &mut goblin,
        Attach {
            stdin: Box::new(std::io::stdin()),
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
        },
    )
    .map_err(|e| match e {
        // Says itself what went wrong, and the goblin is not what failed.
        e @ pf_goblins::Error::Output { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context("the thawed goblin failed"),
    })?;
    drop(pidfile);
    tracing::info!(status = %describe_status(status), "goblin exited");
    Ok(exit_code(status))
}

/// The pid a `pf goblin thaw --pidfile` wrote to `file`, if it still names that copy: a thaw
/// that was killed leaves its pidfile behind, and once its copy is gone the pid can be another
/// process's. Such a process started after the file was written.
fn pid_from_pidfile(file: &std::path::Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read the pidfile {}{}",
            file.display(),
            if file.exists() {
                ""
            } else {
                " (a pf goblin thaw --pidfile removes it when its copy ends: has it ended?)"
            }
        )
    })?;
    let pid: i32 = text.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "the pidfile {} does not hold a pid (it holds {:?})",
            file.display(),
            text.chars().take(40).collect::<String>()
        )
    })?;
    let written = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .with_context(|| format!("cannot read the pidfile {}", file.display()))?;
    let Some(started) = pf_os::proc::started_at(pid) else {
        anyhow::bail!(
            "the pidfile {} names process {pid}, which has ended: the copy it was written for \
             is gone (a pf goblin thaw that was killed leaves its pidfile behind)",
            file.display()
        );
    };
    // A start time is known to within a second (the boot time is kept in whole seconds).
    if started > written + std::time::Duration::from_secs(1) {
        anyhow::bail!(
            "the pidfile {} is stale: process {pid} started after it was written, so it is not \
             the copy it was written for (that copy ended and its pid was reused); nothing was \
             frozen",
            file.display()
        );
    }
    Ok(pid)
}

/// A pidfile of a thawed goblin: written whole (to a temporary name, then renamed), removed
/// when dropped unless it names another pid by then (a second thaw given the same FILE wrote
/// its own copy's pid there, and that copy still runs).
struct Pidfile {
    path: PathBuf,
    pid: i32,
}

impl Pidfile {
    /// Before a thaw, so that nothing is restored for a pidfile that cannot be had: FILE can be
    /// written, and is not the pidfile of a copy that still runs (another thaw's: two copies
    /// cannot share one, the first to end would remove it) nor a file that holds no pid. A
    /// stale one (its copy ended, or its pid names a process started since) is overwritten.
    fn check(path: &std::path::Path) -> anyhow::Result<()> {
        match std::fs::read_to_string(path) {
            // Empty (`--pidfile "$(mktemp)"`): made for it.
            Ok(text) if !text.trim().is_empty() && text.trim().parse::<i32>().is_err() => {
                anyhow::bail!(
                    "--pidfile {} is a file that does not hold a pid: not overwritten; nothing was \
                 thawed (name a new file, or remove it first)",
                    path.display()
                )
            }
            Ok(text) if text.trim().is_empty() => {}
            Ok(_) => {
                if let Ok(pid) = pid_from_pidfile(path) {
                    anyhow::bail!(
                        "the pidfile {} names process {pid}, which still runs (the copy of \
                         another `pf goblin thaw --pidfile {}`?): give each thaw a pidfile of \
                         its own; nothing was thawed",
                        path.display(),
                        path.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot read the pidfile {}: {e}", path.display()),
        }
        let tmp = Self::tmp(path);
        std::fs::write(&tmp, b"")
            .and_then(|()| std::fs::remove_file(&tmp))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                anyhow::anyhow!(
                    "cannot write the pidfile {}: {e}; nothing was thawed",
                    path.display()
                )
            })
    }

    /// Where the pidfile is written before it is renamed into place.
    fn tmp(path: &std::path::Path) -> PathBuf {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        PathBuf::from(tmp)
    }

    fn write(path: &std::path::Path, pid: i32) -> anyhow::Result<Self> {
        let tmp = Self::tmp(path);
        std::fs::write(&tmp, format!("{pid}\n"))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                anyhow::anyhow!("cannot write the pidfile {}: {e}", path.display())
            })?;
        Ok(Self {
            path: path.to_owned(),
            pid,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim().parse::<i32>().ok() == Some(self.pid));
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// pf's exit code for a goblin's status: its code, or 128+N for signal N (as shells do).
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    ExitCode::from(pf_os::Exit::from(status).exit_code())
}

fn describe_status(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// fork

fn fork(global: &Global, args: &ForkArgs) -> anyhow::Result<ExitCode> {
    // Until the copies run, a signal stops the fork and leaves nothing behind.
    let signals = Signals::start(common::abandon("the fork"));
    let n = usize::from(args.count);
    // The snapshot first: a mistyped name fails at once, not after pf's stdin has ended (at a
    // terminal, only at Ctrl-D).
    let resolved = Resolved::new(global, &args.from)?;
    let inputs = if args.send.is_empty() {
        if std::io::stdin().is_terminal() {
            note(&format!(
                "reading the input of the {n} copies from this terminal until Ctrl-D (--send \
                 LINE gives it on the command line instead)"
            ));
        }
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read pf's stdin")?;
        vec![buf; n]
    } else {
        let template: String = args.send.iter().map(|l| format!("{l}\n")).collect();
        pf_goblins::inputs_from_template(template.as_bytes(), n)
    };
    let cancel = Cancel::new()?;
    let started = Instant::now();
    let options = CollectOptions {
        inputs,
        deadline: args.timeout.map(Duration::from_secs),
    };
    // The loaded images go once the copies run (lazy copies keep what they need themselves).
    let goblins = resolved.load(args.mode.lazy(), false)?.fork(n)?;
    // From now on a signal is passed on to every copy.
    signals.set({
        let cancel = cancel.clone();
        move |sig| cancel.cancel_with_signal(sig)
    });
    let copies = pf_goblins::collect(goblins, &options, &cancel)?;
    tracing::info!(n, elapsed = ?started.elapsed(), "copies collected");
    let mut all_ok = true;
    let mut stdout = std::io::stdout().lock();
    let mut print = || -> std::io::Result<()> {
        for copy in &copies {
            let k = copy.clone;
            all_ok &= copy.status.success();
            if args.json {
                let json = serde_json::json!({
                    "clone": k,
                    "pid": copy.pid,
                    "exit_code": copy.status.code(),
                    "signal": copy.status.signal(),
                    "timed_out": copy.timed_out,
                    "stdout": String::from_utf8_lossy(&copy.stdout),
                    "stderr": String::from_utf8_lossy(&copy.stderr),
                });
                writeln!(stdout, "{json}")?;
            } else {
                for line in copy.stdout.split_inclusive(|&b| b == b'\n') {
                    write!(stdout, "[{k}] ")?;
                    stdout.write_all(line)?;
                    if !line.ends_with(b"\n") {
                        writeln!(stdout)?;
                    }
                }
                let mut stderr = std::io::stderr().lock();
                for line in copy.stderr.split_inclusive(|&b| b == b'\n') {
                    write!(stderr, "[{k}] ")?;
                    stderr.write_all(line)?;
                    if !line.ends_with(b"\n") {
                        writeln!(stderr)?;
                    }
                }
                if copy.timed_out {
                    writeln!(
                        stderr,
                        "[{k}] still running after --timeout {} s: killed",
                        args.timeout.unwrap_or(0)
                    )?;
                } else if !copy.status.success() {
                    writeln!(stderr, "[{k}] {}", describe_status(copy.status))?;
                }
            }
        }
        stdout.flush()
    };
    print().context("cannot write what the copies printed")?;
    let code = fork_exit_code(all_ok, cancel.signal());
    if let (false, Some(sig)) = (all_ok, cancel.signal()) {
        // Killed by it, as the copies were: a shell loop around `pf goblin fork` stops.
        common::die_of(sig);
    }
    Ok(code)
}

/// A fork's exit code: 0 when every copy exited 0; else 128 + N when signal N reached pf and was
/// passed on to the copies (pf then ends by that signal instead, when it can, so that Ctrl-C
/// stops a shell loop around `pf goblin fork`, as it would stop any program the loop ran), else
/// 1.
fn fork_exit_code(all_ok: bool, passed_on: Option<i32>) -> ExitCode {
    match (all_ok, passed_on) {
        (true, _) => ExitCode::SUCCESS,
        (false, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(u8::MAX)),
        (false, None) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfile_another_thaw_took_over_is_left_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.pid");
        let first = Pidfile::write(&path, 1111).unwrap();
        let second = Pidfile::write(&path, 2222).unwrap();
        drop(first);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2222\n");
        drop(second);
        assert!(!path.exists());
        let alone = Pidfile::write(&path, 3333).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3333\n");
        drop(alone);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_pidfile_is_checked_before_a_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.pid");
        // None yet, or a stale one (its process gone): fine, and nothing is left behind.
        Pidfile::check(&path).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        std::fs::write(&path, format!("{gone}\n")).unwrap();
        Pidfile::check(&path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // The pidfile of a copy that runs (this process, started before it was written).
        let me = std::process::id();
        std::fs::write(&path, format!("{me}\n")).unwrap();
        let err = Pidfile::check(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("names process {me}, which still runs")),
            "{err}"
        );
        assert!(err.contains("nothing was thawed"), "{err}");
        // An empty one (made with mktemp) is there to be written.
        std::fs::write(&path, "").unwrap();
        Pidfile::check(&path).unwrap();
        // A file that is not a pidfile is not overwritten.
        std::fs::write(&path, "fn main() {}\n").unwrap();
        let err = Pidfile::check(&path).unwrap_err().to_string();
        assert!(
            err.contains("does not hold a pid: not overwritten"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "fn main() {}\n");
        // A directory that is not there.
        let err = Pidfile::check(&dir.path().join("no/such/dir/g.pid"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot write the pidfile"), "{err}");
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let code = |raw| format!("{:?}", exit_code(std::process::ExitStatus::from_raw(raw)));
        assert_eq!(code(7 << 8), format!("{:?}", ExitCode::from(7)));
        assert_eq!(code(0), format!("{:?}", ExitCode::from(0)));
        assert_eq!(code(libc::SIGKILL), format!("{:?}", ExitCode::from(137)));
        assert_eq!(
            describe_status(std::process::ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9"
        );
    }

    #[test]
    fn a_fork_a_signal_ended_exits_as_the_shell_expects() {
        let code = |ok, sig| format!("{:?}", fork_exit_code(ok, sig));
        assert_eq!(code(true, None), format!("{:?}", ExitCode::SUCCESS));
        // Copies that caught the signal and ended well: the fork went well.
        assert_eq!(code(true, Some(2)), format!("{:?}", ExitCode::SUCCESS));
        assert_eq!(code(false, Some(2)), format!("{:?}", ExitCode::from(130)));
        assert_eq!(code(false, Some(15)), format!("{:?}", ExitCode::from(143)));
        assert_eq!(code(false, None), format!("{:?}", ExitCode::FAILURE));
    }
}
