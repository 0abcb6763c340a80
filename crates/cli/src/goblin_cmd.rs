//! `pf goblin`: make warm snapshots of stdio-only processes, thaw them, fork them.
//!
//! Every subcommand is a thin layer over `pf_goblins`; what is specific to a terminal lives here:
//! pumping pf's own stdin/stdout/stderr to a thawed goblin, forwarding signals, the readiness
//! wait of `spawn`, and printing.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use pf_core::{BlobStore, Digest256};
use pf_goblins::{FreezeOptions, FreezeTarget, Goblin, Killer, Snapshot, Source, ThawOptions};

use crate::common::{self, Global};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Start a command as a goblin, wait until it is warm, freeze it into the store under a name
    #[command(after_help = SPAWN_HELP)]
    Spawn(SpawnArgs),
    /// Freeze a running goblin (a process whose stdin, stdout and stderr are pipes)
    #[command(after_help = FREEZE_HELP)]
    Freeze(FreezeArgs),
    /// Thaw a goblin: its stdin, stdout and stderr become pf's own; pf exits with its exit code
    #[command(after_help = THAW_HELP)]
    Thaw(ThawArgs),
    /// Thaw N copies of a goblin at once, give each the same input, print what each answered
    #[command(after_help = FORK_HELP)]
    Fork(ForkArgs),
}

const SPAWN_HELP: &str = "\
How it works:
  pf starts CMD in its own session with stdin, stdout and stderr on pipes, writes --input into
  its stdin (stdin stays open), and waits until it is warm: until its stdout matches --until, or,
  without --until, until it has printed nothing for --quiet-ms. Then it freezes CMD into the
  store, names the snapshot --tag, stops CMD and prints the snapshot's digest on stdout.

  Everything CMD printed while warming up is copied to pf's stderr as it arrives, so nothing it
  said is lost; thawed copies continue right after it. Input CMD had not read yet when it was
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
The process must be a goblin: stdin, stdout and stderr all pipes (pf says what each one is when
they are not), leading its own session (`setsid`), unless --shell-job.

By default the goblin keeps running after the freeze (--leave-running); --kill stops it once the
snapshot is complete. Bytes written to its stdin but not read yet are kept in the snapshot.

Examples:
  pf goblin freeze --pid 4242 --tag warm          # prints sha256:…; `pf goblin thaw warm`
  pf goblin freeze --pid 4242 --kill --images /tmp/g  # plain CRIU images + goblin.json
  pf goblin freeze --pid 4242 --json";

const THAW_HELP: &str = "\
The goblin is restored in its own pid and mount namespaces, so any number of thaws of one
snapshot run at once, and beside the original. Where pf's stdin, stdout or stderr is a pipe,
the goblin gets that pipe itself and pf copies nothing; a terminal or a file is pumped: pf copies
its stdin to the goblin (end of input closes the goblin's stdin), the goblin's stdout to pf's
stdout and its stderr to pf's stderr. (Input the goblin had not read when it was frozen goes in
first, so then stdin is pumped too.) pf forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to it and
exits with its exit code (128+N when signal N ended it). So `pf goblin thaw NAME` behaves like running the program.

Examples:
  echo 'print(2 + 2)' | pf goblin thaw py
  pf goblin thaw sha256:3a…e1 < questions.txt > answers.txt
  pf goblin thaw --images /tmp/g";

const FORK_HELP: &str = "\
Every copy starts from the same frozen state and runs in its own namespaces. Each gets the same
input — the --send lines, else all of pf's stdin — then end of input; pf waits for all of them
and prints what each wrote, in order: lines prefixed with `[K] ` (K = 1..N), or one JSON object
per copy with --json. In --send text, `{i}` becomes the copy's number, so copies can be asked
different things. Exits 0 when every copy exited 0, else 1.

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
    /// at the start and end of every line
    #[arg(long, value_name = "REGEX")]
    until: Option<String>,
    /// Without --until: warm once stdout and stderr have been silent this long
    #[arg(long, value_name = "MS", default_value_t = 500)]
    quiet_ms: u64,
    /// Give up (and stop the command) if it is not warm after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
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
pub(crate) struct FreezeArgs {
    /// The goblin's pid
    #[arg(long)]
    pid: i32,
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
    /// The snapshot: a digest (sha256:…) or a name in the store
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
}

#[derive(Debug, clap::Args)]
pub(crate) struct ForkArgs {
    #[command(flatten)]
    from: SnapshotArg,
    /// How many copies
    #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=512))]
    count: u16,
    /// A line to write to every copy's stdin (repeatable; `{i}` becomes the copy's number)
    #[arg(long, value_name = "TEXT")]
    send: Vec<String>,
    /// Print one JSON object per copy (clone, pid, exit_code, signal, stdout, stderr)
    #[arg(long)]
    json: bool,
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

/// What the threads watching a warming goblin report.
enum Warmup {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    StdoutClosed,
    StderrClosed,
    InputDone(std::io::Result<()>),
    Signal(i32),
}

fn spawn(global: &Global, args: &SpawnArgs) -> anyhow::Result<ExitCode> {
    pf_core::validate_name(&args.tag).context("--tag is not a usable name")?;
    let until = args
        .until
        .as_deref()
        .map(|re| regex::bytes::RegexBuilder::new(re).multi_line(true).build())
        .transpose()
        .context("--until is not a valid regular expression")?;
    let input = match &args.input {
        None => None,
        Some(p) if p == Path::new("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read pf's stdin for --input -")?;
            Some(buf)
        }
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("cannot read --input {}", p.display()))?)
        }
    };
    let store = common::open_store(global)?;
    let cwd = match &args.cwd {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("cannot find the current directory")?,
    };
    let started = Instant::now();
    let mut goblin = pf_goblins::spawn(&args.command, &pf_goblins::SpawnOptions::in_dir(cwd))
        .context("cannot start the goblin")?;
    let pid = goblin.pid();
    tracing::info!(pid, "goblin started; waiting until it is warm");

    let (tx, rx) = mpsc::channel();
    let signals = block_signals();
    forward_signals_to(signals, {
        let tx = tx.clone();
        move |sig| {
            let _ = tx.send(Warmup::Signal(sig));
        }
    });
    let stdin = goblin.stdin.take().context("goblin has no stdin")?;
    let stdin_holder = std::thread::spawn({
        let tx = tx.clone();
        move || {
            let mut stdin = stdin;
            if let Some(bytes) = input {
                let _ = tx.send(Warmup::InputDone(stdin.write_all(&bytes)));
            } else {
                let _ = tx.send(Warmup::InputDone(Ok(())));
            }
            // Keep stdin open until the goblin is frozen: a REPL exits on end of input.
            stdin
        }
    });
    let out = goblin.stdout.take().context("goblin has no stdout")?;
    let err = goblin.stderr.take().context("goblin has no stderr")?;
    let out_thread = read_into(out, tx.clone(), Warmup::Stdout, Warmup::StdoutClosed);
    let err_thread = read_into(err, tx, Warmup::Stderr, Warmup::StderrClosed);

    let deadline = started + Duration::from_secs(args.timeout);
    let quiet = Duration::from_millis(args.quiet_ms);
    let mut seen: Vec<u8> = Vec::new();
    let mut input_done = false;
    let mut last_output = Instant::now();
    let mut open_streams = 2;
    let mut stderr = std::io::stderr();
    let ready = loop {
        let now = Instant::now();
        if now >= deadline {
            goblin.kill().ok();
            bail!(
                "goblin {pid} was not warm after {} s{}; it has been stopped (raise --timeout?)",
                args.timeout,
                until_hint(args)
            );
        }
        let wake = if until.is_none() && input_done {
            deadline.min(last_output + quiet)
        } else {
            deadline
        };
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(Warmup::Stdout(bytes)) => {
                stderr.write_all(&bytes).ok();
                last_output = Instant::now();
                seen.extend_from_slice(&bytes);
                if let Some(re) = &until
                    && input_done
                    && re.is_match(&seen)
                {
                    break true;
                }
            }
            Ok(Warmup::Stderr(bytes)) => {
                stderr.write_all(&bytes).ok();
                last_output = Instant::now();
            }
            Ok(Warmup::InputDone(result)) => {
                result.context("cannot write --input into the goblin's stdin")?;
                input_done = true;
                if until.as_ref().is_some_and(|re| re.is_match(&seen)) {
                    break true;
                }
            }
            Ok(Warmup::StdoutClosed | Warmup::StderrClosed) => {
                open_streams -= 1;
                if open_streams == 0 {
                    break false;
                }
            }
            Ok(Warmup::Signal(sig)) => {
                goblin.kill().ok();
                bail!("interrupted by signal {sig}; goblin {pid} has been stopped");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if until.is_none() && input_done && last_output.elapsed() >= quiet {
                    break true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
        }
    };
    if !ready {
        let status = goblin.wait().context("cannot wait for the goblin")?;
        bail!(
            "goblin {pid} exited ({}) before it was warm; its output is above",
            describe_status(status)
        );
    }
    let warm = started.elapsed();
    tracing::info!(pid, ?warm, "goblin is warm; freezing");
    // Held from the first blob to the name (see agent_docs/formats.md).
    let writing = store.writer_lock();
    let frozen = pf_goblins::freeze(
        pid,
        FreezeTarget::Store(&store),
        &FreezeOptions {
            leave_running: false,
            shell_job: false,
        },
    );
    // The dump stopped the goblin (or failed): reap it, then let the readers drain what it said
    // between being warm and being frozen.
    let status = goblin.kill();
    drop(stdin_holder.join());
    let _ = out_thread.join();
    let _ = err_thread.join();
    for event in rx.try_iter() {
        if let Warmup::Stdout(bytes) | Warmup::Stderr(bytes) = event {
            stderr.write_all(&bytes).ok();
        }
    }
    let _writing = writing.context("cannot lock the store for writing")?;
    let frozen = frozen.with_context(|| format!("cannot freeze goblin {pid}"))?;
    status.context("cannot reap the frozen goblin")?;
    let digest = frozen
        .digest()
        .context("freeze into the store gave no digest")?;
    store
        .set_name(&args.tag, digest)
        .with_context(|| format!("cannot name the snapshot {}", args.tag))?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "digest": digest,
            "tag": args.tag,
            "pid": pid,
            "stdio": stdio_json(&frozen.streams),
            "warmup_ms": u64::try_from(warm.as_millis()).unwrap_or(u64::MAX),
        });
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout, "{digest}")?;
    }
    tracing::info!(tag = %args.tag, %digest, "stored warm goblin");
    Ok(ExitCode::SUCCESS)
}

fn until_hint(args: &SpawnArgs) -> &'static str {
    if args.until.is_some() {
        " (its stdout never matched --until; is it buffering its output? try `python3 -u` or \
         `stdbuf -oL`)"
    } else {
        " (it never stopped printing for --quiet-ms)"
    }
}

/// Read `from` on a thread, sending each chunk as `chunk(bytes)` and `closed` at the end.
fn read_into(
    mut from: std::io::PipeReader,
    tx: mpsc::Sender<Warmup>,
    chunk: fn(Vec<u8>) -> Warmup,
    closed: Warmup,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(chunk(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(closed);
    })
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
    let frozen = pf_goblins::freeze(args.pid, target, &options)?;
    if let (Some(tag), FreezeTarget::Store(store), Some(digest)) =
        (&args.tag, target, frozen.digest())
    {
        store
            .set_name(tag, digest)
            .with_context(|| format!("cannot name the snapshot {tag}"))?;
    }
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut json = serde_json::json!({
            "pid": frozen.pid,
            "left_running": options.leave_running,
            "stdio": stdio_json(&frozen.streams),
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
        let store = common::open_store(global)?;
        let digest = store
            .resolve(name)
            .with_context(|| format!("no snapshot {name:?} in the store (see `pf store ls`)"))?;
        Ok(Resolved::Store(store, digest))
    }

    fn source(&self) -> Source<'_> {
        match self {
            Resolved::Store(store, digest) => Source::Store { store, digest },
            Resolved::Images(dir) => Source::Images(dir),
        }
    }
}

fn thaw(global: &Global, args: &ThawArgs) -> anyhow::Result<ExitCode> {
    let resolved = Resolved::new(global, &args.from)?;
    let loaded = pf_goblins::load(&resolved.source())?;
    // A pipe of ours goes to the goblin as it is; anything else (a terminal, a file) is pumped.
    // The unread input saved in the snapshot must go first, through a pipe of pf's.
    let stdin_through = loaded.stdin_backlog().is_empty();
    let wiring = pf_goblins::Wiring {
        stdin: pass_pipe(std::io::stdin().as_fd(), stdin_through)?,
        stdout: pass_pipe(std::io::stdout().as_fd(), true)?,
        stderr: pass_pipe(std::io::stderr().as_fd(), true)?,
    };
    let mut goblin = loaded.thaw_wired(
        &ThawOptions {
            new_pid_namespace: true,
        },
        wiring,
    )?;
    drop(loaded);
    tracing::info!(
        pid = goblin.pid(),
        stdin_pumped = goblin.stdin.is_some(),
        stdout_pumped = goblin.stdout.is_some(),
        stderr_pumped = goblin.stderr.is_some(),
        "goblin thawed"
    );
    let killer = goblin.killer();
    forward_signals_to(block_signals(), move |sig| {
        tracing::info!(sig, "forwarding signal to the goblin");
        let _ = killer.signal(sig);
    });
    if let Some(stdin) = goblin.stdin.take() {
        // Not joined: it may sit in a read of pf's stdin after the goblin is gone.
        std::thread::spawn(move || {
            let mut stdin = stdin;
            let _ = pump(&mut std::io::stdin().lock(), &mut stdin);
            // Dropping our end is the goblin's end of input.
        });
    }
    let out = goblin
        .stdout
        .take()
        .map(|r| std::thread::spawn(move || pump(&mut { r }, &mut std::io::stdout().lock())));
    let err = goblin
        .stderr
        .take()
        .map(|r| std::thread::spawn(move || pump(&mut { r }, &mut std::io::stderr().lock())));
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    let status = goblin.wait().context("cannot wait for the goblin")?;
    tracing::info!(status = %describe_status(status), "goblin exited");
    Ok(exit_code(status))
}

/// `fd` itself for the goblin when it is a pipe and `allowed`, else a new pipe pf pumps.
fn pass_pipe(fd: std::os::fd::BorrowedFd<'_>, allowed: bool) -> anyhow::Result<pf_goblins::Wire> {
    let is_pipe = nix::sys::stat::fstat(fd.as_raw_fd())
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    if !(allowed && is_pipe) {
        return Ok(pf_goblins::Wire::NewPipe);
    }
    let own = fd
        .try_clone_to_owned()
        .context("cannot duplicate a standard stream for the goblin")?;
    Ok(pf_goblins::Wire::Fd(own))
}

/// Copy `from` to `to` chunk by chunk, flushing each one (a prompt without a newline must show
/// up at once). Ends at end of input, or when either side fails (a closed reader on our stdout
/// is the goblin's SIGPIPE, as in a shell pipeline).
fn pump(from: &mut dyn Read, to: &mut dyn Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// The goblin's stdio as CRIU names it: `["pipe:[N]", …]`.
fn stdio_json(streams: &pf_goblins::Streams) -> serde_json::Value {
    match streams.pipes() {
        Some(pipes) => serde_json::json!(pipes.map(|ino| format!("pipe:[{ino}]"))),
        None => serde_json::json!(
            streams
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        ),
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
    let input_template: Option<Vec<String>> = (!args.send.is_empty()).then(|| args.send.clone());
    let stdin_input = if input_template.is_none() {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read pf's stdin")?;
        buf
    } else {
        Vec::new()
    };
    let resolved = Resolved::new(global, &args.from)?;
    let n = usize::from(args.count);
    let started = Instant::now();
    let goblins = pf_goblins::fork(&resolved.source(), n)?;
    let thawed = started.elapsed();
    tracing::info!(n, ?thawed, "copies thawed");
    let killers: Vec<Killer> = goblins.iter().map(Goblin::killer).collect();
    forward_signals_to(block_signals(), move |sig| {
        for k in &killers {
            let _ = k.signal(sig);
        }
    });
    let handles: Vec<_> = goblins
        .into_iter()
        .enumerate()
        .map(|(k, goblin)| {
            let input = match &input_template {
                Some(lines) => lines
                    .iter()
                    .map(|l| format!("{}\n", l.replace("{i}", &(k + 1).to_string())))
                    .collect::<String>()
                    .into_bytes(),
                None => stdin_input.clone(),
            };
            std::thread::spawn(move || run_copy(goblin, &input))
        })
        .collect();
    let mut all_ok = true;
    let mut stdout = std::io::stdout().lock();
    for (k, handle) in handles.into_iter().enumerate() {
        let copy = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the thread talking to copy {} panicked", k + 1))??;
        all_ok &= copy.status.success();
        if args.json {
            let json = serde_json::json!({
                "clone": k + 1,
                "pid": copy.pid,
                "exit_code": copy.status.code(),
                "signal": copy.status.signal(),
                "stdout": String::from_utf8_lossy(&copy.stdout),
                "stderr": String::from_utf8_lossy(&copy.stderr),
            });
            writeln!(stdout, "{json}")?;
        } else {
            for line in copy.stdout.split_inclusive(|&b| b == b'\n') {
                write!(stdout, "[{}] ", k + 1)?;
                stdout.write_all(line)?;
                if !line.ends_with(b"\n") {
                    writeln!(stdout)?;
                }
            }
            let mut stderr = std::io::stderr().lock();
            for line in copy.stderr.split_inclusive(|&b| b == b'\n') {
                write!(stderr, "[{}] ", k + 1)?;
                stderr.write_all(line)?;
                if !line.ends_with(b"\n") {
                    writeln!(stderr)?;
                }
            }
            if !copy.status.success() {
                writeln!(stderr, "[{}] {}", k + 1, describe_status(copy.status))?;
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What one forked copy did.
struct Copy {
    pid: i32,
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Give a copy its input and end of input, collect all it writes, wait for it. Stdout and stderr
/// are read on separate threads, so a copy filling one pipe cannot stall the other.
fn run_copy(mut goblin: Goblin, input: &[u8]) -> anyhow::Result<Copy> {
    let pid = goblin.pid();
    let read_all = |r: Option<std::io::PipeReader>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read_all(goblin.stdout.take());
    let err = read_all(goblin.stderr.take());
    if let Some(mut stdin) = goblin.stdin.take() {
        // A copy that exits without reading all of it is not an error.
        let _ = stdin.write_all(input);
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let status = goblin
        .wait()
        .with_context(|| format!("cannot wait for copy {pid}"))?;
    Ok(Copy {
        pid,
        status,
        stdout,
        stderr,
    })
}

// ---------------------------------------------------------------------------------------------
// signals

/// The signals pf handles itself while a goblin runs.
fn handled_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(sig);
    }
    set
}

/// Block the handled signals in this thread (and so in every thread it starts from now on), so
/// that only the thread of [`forward_signals_to`] receives them. Children started by std get a
/// clean signal mask.
fn block_signals() -> nix::sys::signal::SigSet {
    let set = handled_signals();
    if let Err(e) = set.thread_block() {
        tracing::warn!(error = %e, "cannot block signals; Ctrl-C will not reach the goblin");
    }
    set
}

/// On a thread, wait for the blocked signals forever and hand each to `on_signal`.
fn forward_signals_to(set: nix::sys::signal::SigSet, on_signal: impl Fn(i32) + Send + 'static) {
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            on_signal(sig as i32);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn pump_copies_everything_and_flushes() {
        let mut from: &[u8] = b"hello\nworld";
        let mut to = Vec::new();
        pump(&mut from, &mut to).expect("pump");
        assert_eq!(to, b"hello\nworld");
    }
}
