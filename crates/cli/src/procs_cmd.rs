//! `pf procs`: capture whole process trees with CRIU into the store, restore them, show them.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pf_core::{BlobStore as _, FsBlobStore};
use pf_world_procs::{CaptureOptions, CaptureProgress, ProcsBlob, RestoreOptions};

use crate::common::{self, Global, progress_enabled};

/// Dumps at least this large show a progress bar while they stream into the store.
const PROGRESS_MIN: u64 = 64 << 20;

const PROCS_HELP: &str = "\
A capture is a CRIU dump of a process and all its descendants. Its memory is stored page by
page (each distinct 4 KiB page once per store, in compressed packs), the rest of CRIU's images
as a deterministic tar, and a small JSON `procs.criu.v2` blob names them (its digest is what
`capture` prints). PF_SNAPSHOT_FORMAT=v1 stores the whole images directory as one archive
instead, as pf did before; restore reads both. Needs root (or passwordless sudo for criu) and criu 4.x:
run `pf doctor` first. Without a usable criu, `capture` stores an honest `procs.unsupported.v1`
placeholder, says why, and exits 1. A pipe the tree shares with a process outside it (`prog |
less`) is restored with nothing at that end; `capture` names each such pipe.

Examples:
  pf procs capture --pid 4242 --tag web         freeze pid 4242's tree (it stops) and name it
  pf procs capture --pid 4242 --leave-running   snapshot it and let it run on
  pf procs restore web                          bring it back under its old pids
  pf procs restore web --new-pidns              a copy beside the still-running original
  pf procs show web                             the procs JSON (pids, criu version, kernel…)";

/// Capture and restore whole process trees with CRIU.
#[derive(Debug, clap::Subcommand)]
#[command(after_help = PROCS_HELP)]
pub(crate) enum Command {
    /// Dump a process and its descendants into the store; print the procs digest
    #[command(after_help = "\
Examples:
  pf procs capture --pid 4242                     the tree is dumped, then killed by criu
  pf procs capture --pid 4242 --leave-running     the tree keeps running
  pf procs capture --pid \"$(pgrep -o -x myrepl)\" --tag repl-warm --json

The process must lead its own session (started with `setsid`, as daemons are), or be a job of
your shell, then pass --shell-job (and --shell-job again when restoring). Its open files must
still exist at restore, with the same size. Established TCP connections need --tcp-established;
unix sockets to peers outside the tree need --ext-unix-sk.

Prints the digest of the procs blob; --json prints {\"procs\", \"criu_dump\", \"pids\", \"tag\",
\"dump_stats\"}, where dump_stats holds CRIU's own figures for the dump (microseconds and pages:
frozen_time_us is how long the tree stood still; null if criu wrote none).")]
    Capture(CaptureArgs),
    /// Restore a captured tree; print its pids (root first). It keeps running after pf exits
    #[command(after_help = "\
Examples:
  pf procs restore web                  the tree gets its original pids back
  pf procs restore web --new-pidns      restore in a new pid namespace (original may still run)
  pf procs restore sha256:… --json

Without --new-pidns the tree needs its original pids: if a live process holds one (say the
original, captured with --leave-running), the restore fails and says so; use --new-pidns. Then
the tree runs under a small init of pf's (PID 1 of the namespace, pid printed on stderr) that
exits with the root's status and takes the namespace down with it: kill that init to kill the
copy. The printed pids are host pids; inside, the tree has its original pids.

The restored tree is detached: pf exits, the tree runs on and is reparented to init (or the
nearest subreaper), which reaps it when it exits. Stop it with `kill <pid>`. Ctrl-C (SIGINT,
SIGTERM, SIGHUP) before that stops the restore: pf kills CRIU and what it restored so far,
removes the images it unpacked, and exits 128 + the signal's number (130 for Ctrl-C).

--json prints {\"pid\", \"ns_pid\", \"pids\", \"init\"} (init is null without --new-pidns).")]
    Restore(RestoreArgs),
    /// Print a procs blob as JSON
    #[command(after_help = "\
Examples:
  pf procs show web
  pf procs show web | jq .criu_dump        the images tar (see `pf store cat`)")]
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct CaptureArgs {
    /// The root of the tree to dump
    #[arg(long)]
    pid: i32,
    /// Leave the tree running after the dump (otherwise criu kills it once dumped)
    #[arg(long)]
    leave_running: bool,
    /// The tree is a job of a shell (its session or terminal lies outside it)
    #[arg(long)]
    shell_job: bool,
    /// Dump established TCP connections too
    #[arg(long)]
    tcp_established: bool,
    /// Allow unix sockets connected to peers outside the tree
    #[arg(long)]
    ext_unix_sk: bool,
    /// Dump file locks too
    #[arg(long)]
    file_locks: bool,
    /// A label KEY=VALUE recorded in the procs blob (repeatable)
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// An extra argument for `criu dump` (repeatable), e.g. --criu-arg=--link-remap
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    criu_arg: Vec<String>,
    /// Point NAME at the procs blob once the capture succeeded
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// The procs blob: a name pointing at it, its digest (sha256:…) or a unique prefix of that
    /// (sha256:3f2a9c, or 8 or more hex digits alone when no name is spelled so)
    #[arg(value_name = "DIGEST|NAME")]
    procs: String,
    /// Restore inside new pid and mount namespaces (works while the original pids are taken)
    #[arg(long)]
    new_pidns: bool,
    /// Restore it as a job of this shell, taking this terminal (implied when the capture used
    /// --shell-job, as it records)
    #[arg(long)]
    shell_job: bool,
    /// An extra argument for `criu restore` (repeatable)
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    criu_arg: Vec<String>,
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The procs blob: a name pointing at it, its digest (sha256:…) or a unique prefix of that
    /// (sha256:3f2a9c, or 8 or more hex digits alone when no name is spelled so)
    #[arg(value_name = "DIGEST|NAME")]
    procs: String,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

pub(crate) fn run(global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    let store = match command {
        Command::Capture(_) => common::open_store(global)?,
        _ => common::open_existing_store(global)?,
    };
    match command {
        Command::Capture(args) => capture(&store, &args),
        Command::Restore(args) => restore(&store, &args),
        Command::Show(args) => show(&store, &args),
    }
}

fn capture(store: &FsBlobStore, args: &CaptureArgs) -> anyhow::Result<ExitCode> {
    if let Some(name) = &args.tag {
        // Refuse a bad name before dumping (and, without --leave-running, killing) anything.
        pf_core::validate_name(name)?;
    }
    let opts = CaptureOptions {
        leave_running: args.leave_running,
        shell_job: args.shell_job,
        tcp_established: args.tcp_established,
        ext_unix_sk: args.ext_unix_sk,
        file_locks: args.file_locks,
        labels: args.label.iter().cloned().collect::<BTreeMap<_, _>>(),
        extra_args: args.criu_arg.clone(),
    };
    // CRIU dumps a tree only from the leader of its session, or as a shell job: said before it
    // runs (and keeps a log of its refusal). A session begun outside pf's pid namespace (0 here)
    // is CRIU's to explain (see `pf_world_procs`' session check).
    if !args.shell_job
        && let Some(st) = pf_os::proc::stat(args.pid)
        && st.session > 0
        && st.session != args.pid
        && !st.is_zombie()
    {
        bail!(
            "process {pid} does not lead its session (its session leader is pid {sid}): CRIU \
             dumps a tree from its session leader; capture that one (`--pid {sid}`, with \
             everything it started), start the program under `setsid`, or pass --shell-job to \
             dump it as a job of that session; nothing was dumped",
            pid = args.pid,
            sid = st.session,
        );
    }
    // Seen before the dump: once it is over the tree may be gone.
    let outside = pipes_leading_outside(&pf_os::proc::tree(args.pid));
    // Held from the first blob to the name (see agent_docs/formats.md).
    let _writing = store
        .writer_lock()
        .context("cannot lock the store for writing")?;
    let deferred = crate::common::Deferred::start("the capture");
    let bar = Progress::new(args.pid);
    let result = pf_world_procs::capture_with_progress(store, args.pid, &opts, &mut |p| {
        bar.update(p);
    });
    bar.finish();
    let captured = result.with_context(|| format!("cannot capture process {}", args.pid))?;
    let procs = match &captured.blob {
        ProcsBlob::Criu(procs) => procs,
        ProcsBlob::Unsupported { note, .. } => {
            bail!(
                "{note}; stored the placeholder {} (see `pf doctor`)",
                captured.procs
            );
        }
    };
    if let Some(name) = &args.tag {
        store
            .set_name(name, &captured.procs)
            .with_context(|| format!("captured {}, but cannot name it {name:?}", captured.procs))?;
    }
    deferred.report();
    for line in outside_pipe_notes(&outside) {
        note(&line);
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "procs": captured.procs,
            "criu_dump": procs.criu_dump,
            "pids": procs.pids,
            "tag": args.tag,
            "dump_stats": procs.dump_stats,
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(out, "{}", captured.procs)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A pipe end of the tree whose other end no process of the tree holds: restored, the pipe has
/// nothing at that other end.
#[derive(Debug, PartialEq, Eq)]
struct OutsidePipe {
    pid: i32,
    /// Its name, read before the dump (CRIU may end the process before the notes are said).
    comm: String,
    fd: i32,
    pipe: u64,
    reads: bool,
}

/// What to say of `ends` ([`pipes_leading_outside`]): a line per pipe, then what to do.
fn outside_pipe_notes(ends: &[OutsidePipe]) -> Vec<String> {
    let mut pipes: BTreeMap<u64, Vec<&OutsidePipe>> = BTreeMap::new();
    for end in ends {
        pipes.entry(end.pipe).or_default().push(end);
    }
    let mut notes: Vec<String> = pipes
        .iter()
        .map(|(pipe, ends)| {
            let holders = ends
                .iter()
                .map(|e| format!("pid {} ({}) fd {}", e.pid, e.comm, e.fd))
                .collect::<Vec<_>>()
                .join(", ");
            if ends[0].reads {
                format!(
                    "note: pipe:[{pipe}] is read by {holders}, and written outside the captured \
                     tree: restored, it gives end of input at once"
                )
            } else {
                format!(
                    "note: pipe:[{pipe}] is written by {holders}, and read outside the captured \
                     tree: restored, nothing reads it, so writes to it fail (most programs then \
                     die of SIGPIPE)"
                )
            }
        })
        .collect();
    if !notes.is_empty() {
        notes.push(
            "note: capture the processes at the other end with it (their common session leader), \
             or use `pf goblin` for a program that talks through stdin and stdout"
                .to_owned(),
        );
    }
    notes
}

/// The pipe ends `pids` hold whose other end none of them holds (a pipe seen only reading, or
/// only writing), in pid and fd order. A process gone meanwhile shows nothing.
fn pipes_leading_outside(pids: &[i32]) -> Vec<OutsidePipe> {
    let mut ends: Vec<OutsidePipe> = Vec::new();
    for &pid in pids {
        let comm = pf_os::proc::comm(pid).unwrap_or_default();
        for (fd, link) in pf_os::proc::open_fds(pid) {
            let (Some(pipe), Some(flags)) = (
                pf_os::proc::link_inode(&link, "pipe"),
                pf_os::proc::fd_flags(pid, fd),
            ) else {
                continue;
            };
            ends.push(OutsidePipe {
                pid,
                comm: comm.clone(),
                fd,
                pipe,
                reads: pf_os::proc::flags_read(flags),
            });
        }
    }
    half_pipes(ends)
}

/// Of `ends`, those of pipes seen only reading or only writing.
fn half_pipes(ends: Vec<OutsidePipe>) -> Vec<OutsidePipe> {
    let both: std::collections::BTreeSet<u64> = ends
        .iter()
        .filter(|e| e.reads)
        .map(|e| e.pipe)
        .filter(|p| ends.iter().any(|e| !e.reads && e.pipe == *p))
        .collect();
    ends.into_iter()
        .filter(|e| !both.contains(&e.pipe))
        .collect()
}

/// How long `pf procs restore` watches a restored goblin before it reports success.
const GOBLIN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn restore(store: &FsBlobStore, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    // Until the tree is detached, a signal stops the restore and leaves nothing behind.
    let signals = common::Signals::start(common::abandon("the restore"));
    let digest = common::resolve_as(store, &args.procs, "snapshot")?;
    let recorded = match pf_world_procs::load_procs(store, &digest) {
        Ok(ProcsBlob::Criu(procs)) => Some(procs),
        _ => None,
    };
    let labelled = |(key, value): (&str, &str)| {
        recorded
            .as_ref()
            .is_some_and(|p| p.labels.get(key).map(String::as_str) == Some(value))
    };
    if labelled(pf_goblins::SHELL_LABEL) {
        bail!(
            "{} is a terminal shell (captured by `pf shell freeze`): thaw it with \
             `pf shell thaw {}` in a terminal",
            args.procs,
            args.procs
        );
    }
    // A tree dumped as a shell job restores only as one: what the capture recorded decides.
    let shell_job = args.shell_job
        || recorded
            .as_ref()
            .is_some_and(|p| p.options.as_ref().is_some_and(|o| o.shell_job));
    let opts = RestoreOptions {
        new_pidns: args.new_pidns,
        shell_job,
        join_session: false,
        inherit: Vec::new(),
        extra_args: args.criu_arg.clone(),
    };
    // A goblin's stdin and stdout are pipes whose other ends were pf's: restored this way they
    // lead nowhere, so most goblins see end of input or a broken pipe and exit at once.
    let is_goblin = labelled(pf_goblins::GOBLIN_LABEL);
    let goblin_hint = || {
        format!(
            "{} is a goblin snapshot: restored by `pf procs restore` its stdin and stdout pipes \
             have nothing at the other end; thaw it with `pf goblin thaw {}`",
            args.procs, args.procs
        )
    };
    let restored = match pf_world_procs::restore(store, &digest, opts) {
        Ok(r) => r,
        Err(e) if is_goblin => {
            note(&format!("note: {}", goblin_hint()));
            return Err(e).with_context(|| format!("cannot restore {}", args.procs));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot restore {}", args.procs)),
    };
    let mut restored = restored;
    if is_goblin {
        // Give it a moment to show whether it survives without its pipes.
        let until = std::time::Instant::now() + GOBLIN_GRACE;
        loop {
            if let Some(exit) = restored
                .try_wait()
                .context("cannot check the restored goblin")?
            {
                bail!(
                    "the restored process {} exited at once ({exit}); {}",
                    restored.pid(),
                    goblin_hint()
                );
            }
            if std::time::Instant::now() >= until {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        note(&format!("note: {}", goblin_hint()));
    }
    let pids = restored.pids();
    let (pid, ns_pid, init) = (restored.pid(), restored.ns_pid(), restored.init_pid());
    // Leave it running after we exit.
    restored.detach();
    signals.set(common::default_action());
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "pid": pid,
            "ns_pid": ns_pid,
            "pids": pids,
            "init": init,
        });
        writeln!(out, "{json}")?;
    } else {
        for p in &pids {
            writeln!(out, "{p}")?;
        }
        if let Some(init) = init {
            tracing::info!(init, ns_pid, "restored in a new pid namespace");
            note(&format!(
                "restored in a new pid namespace: root is pid {ns_pid} inside, {pid} outside; \
                 its init is pid {init} (kill it to stop the copy)"
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(store: &FsBlobStore, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let digest = common::resolve_as(store, &args.procs, "snapshot")?;
    // Check it is a procs blob, then print it as stored (fields newer than this pf included).
    pf_world_procs::load_procs(store, &digest)?;
    let bytes = store.get(&digest)?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{digest} is not JSON"))?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &value)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stderr)]
fn note(text: &str) {
    eprintln!("{text}");
}

/// A spinner while criu dumps, then a bar while a large dump streams into the store; drawn only
/// when stderr is a terminal.
struct Progress {
    bar: ProgressBar,
    pid: i32,
}

impl Progress {
    fn new(pid: i32) -> Self {
        let bar = if progress_enabled() {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::hidden()
        };
        Self { bar, pid }
    }

    fn update(&self, p: CaptureProgress) {
        match p {
            CaptureProgress::Dumping => {
                self.bar
                    .set_message(format!("criu is dumping process {}", self.pid));
                self.bar
                    .enable_steady_tick(std::time::Duration::from_millis(100));
            }
            CaptureProgress::Storing { done, total } if total >= PROGRESS_MIN => {
                if self.bar.length() != Some(total) {
                    self.bar.disable_steady_tick();
                    // The rate counts from here, not from the start of the dump.
                    self.bar.reset();
                    self.bar.set_length(total);
                    self.bar.set_style(
                        ProgressStyle::with_template(
                            "storing images {bar:30} {binary_bytes}/{binary_total_bytes} \
                             {binary_bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                }
                self.bar.set_position(done);
            }
            _ => {}
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_is_outside_when_the_tree_holds_only_one_of_its_ends() {
        let end = |pid, fd, pipe, reads| OutsidePipe {
            pid,
            comm: String::new(),
            fd,
            pipe,
            reads,
        };
        // 10 writes into 7, which 11 reads (inside); 10's stdout 8 goes to `| cat` (outside);
        // 11's stdin 9 comes from outside; 12 holds both ends of 5 itself.
        let ends = vec![
            end(10, 1, 8, false),
            end(10, 4, 7, false),
            end(11, 0, 9, true),
            end(11, 3, 7, true),
            end(12, 3, 5, true),
            end(12, 4, 5, false),
        ];
        assert_eq!(
            half_pipes(ends),
            vec![end(10, 1, 8, false), end(11, 0, 9, true)]
        );
        let own = std::process::id() as i32;
        assert_eq!(pipes_leading_outside(&[]), vec![]);
        let (r, w) = std::io::pipe().expect("pipe");
        let mine = pipes_leading_outside(&[own]);
        assert!(
            !mine.iter().any(|e| e.pipe == inode(&r)),
            "both ends here: {mine:?}"
        );
        drop(r);
        let mine = pipes_leading_outside(&[own]);
        assert!(
            mine.iter().any(|e| e.pipe == inode(&w) && !e.reads),
            "{mine:?}"
        );
        let notes = outside_pipe_notes(&mine);
        assert!(
            notes.iter().any(|n| n
                .contains(&format!("pipe:[{}] is written by pid {own}", inode(&w)))
                && n.contains("SIGPIPE")),
            "{notes:?}"
        );
        assert!(notes.last().is_some_and(|n| n.contains("pf goblin")));
        // The name was read with the ends: it is said even once the process is gone.
        let me = pf_os::proc::comm(own).expect("our name");
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("pid {own} ({me}) fd"))),
            "{notes:?}"
        );
        let gone: Vec<OutsidePipe> = mine
            .into_iter()
            .map(|e| OutsidePipe {
                pid: 999_999_999,
                ..e
            })
            .collect();
        assert!(
            outside_pipe_notes(&gone)
                .iter()
                .any(|n| n.contains(&format!("pid 999999999 ({me}) fd"))),
            "the name comes from the ends, not from /proc now"
        );
    }

    fn inode(fd: &impl std::os::fd::AsFd) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::File::from(fd.as_fd().try_clone_to_owned().expect("dup"))
            .metadata()
            .expect("fstat")
            .ino()
    }
}
