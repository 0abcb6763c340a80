//! `pf shell freeze|thaw|beam`: move a terminal shell session (CRIU's shell-job mode).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::SeqCst;

use anyhow::{Context as _, bail};
use pf_core::BlobStore as _;

use crate::common::{self, Global};
use crate::shell_inspect;

const FREEZE_HELP: &str = "\
Examples:
  pf shell freeze --pid 4242 --tag work        # dump the shell in tmux pane 4242, stop it
  pf shell freeze --pgrep 'bash --login' --leave-running --tag copy
  pf shell freeze --pid 4242 --images ./shell.img

The shell must own a /dev/pts terminal (tmux, screen, a terminal emulator). Shells in VS Code's
integrated terminal, or with no controlling terminal, are refused with the reason; --force tries
anyway and reports what CRIU says.";

const THAW_HELP: &str = "\
Examples:
  pf shell thaw work                 # the frozen shell takes over this terminal
  pf shell thaw --images ./shell.img

The shell joins this terminal's session as its foreground job, with job control: Ctrl-C, Ctrl-Z,
fg and bg act in it as in the original. pf waits until the shell exits and exits with its
status (its jobs still running then keep running). The shell gets its original pid back,
so thaw a snapshot whose shell still runs with `pf shell beam` instead, or stop the original.
A signal to pf (SIGINT, SIGTERM, SIGHUP) before the shell runs stops the thaw: pf kills CRIU
and what it restored so far, removes the images it unpacked, and exits 128 + the signal's
number.";

const BEAM_HELP: &str = "\
Examples:
  pf shell beam --pgrep 'bash.*project'   # a copy of that shell session, here, now

The original keeps running; the copy runs in fresh PID and mount namespaces beside it, in this
terminal (its foreground job, with job control), until it exits; its jobs end with it. The copy,
in this terminal's session whose leader is outside its namespace, cannot itself be frozen or
beamed again: freeze the original. A signal to pf (SIGINT, SIGTERM, SIGHUP) while the original
is dumped waits for the dump to end, and from then until the copy runs it stops the beam: pf
kills CRIU and what it restored so far, removes the images, and exits 128 + the signal's number.";

/// Which shell: by pid or by a pattern over command lines.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Target {
    /// The shell's pid
    #[arg(long)]
    pid: Option<i32>,
    /// A regex matched against full command lines; exactly one process must match (pf itself
    /// and its ancestors never do)
    #[arg(long, value_name = "PATTERN")]
    pgrep: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Dump a shell and its jobs into the store (or an images directory)
    #[command(after_help = FREEZE_HELP)]
    Freeze {
        #[command(flatten)]
        target: Target,
        /// Name the snapshot in the store
        #[arg(long, value_name = "NAME", conflicts_with = "images")]
        tag: Option<String>,
        /// Write plain CRIU images into this (new or empty) directory instead of the store
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
        /// Keep the shell running after the dump
        #[arg(long)]
        leave_running: bool,
        /// Dump even when the terminal checks refuse it (no or a foreign terminal, VS Code, another session)
        #[arg(long)]
        force: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Restore a frozen shell in the foreground of this terminal
    #[command(after_help = THAW_HELP)]
    Thaw {
        /// The snapshot: a name, a digest (sha256:…) or a unique prefix of one (sha256:3f2a9c,
        /// or 8 or more hex digits alone when no name is spelled so)
        #[arg(
            value_name = "DIGEST|NAME",
            required_unless_present = "images",
            conflicts_with = "images"
        )]
        snapshot: Option<String>,
        /// Restore from a directory of CRIU images written by `pf shell freeze --images`
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
    },
    /// Copy a running shell session into this terminal: freeze with --leave-running, thaw here
    #[command(after_help = BEAM_HELP)]
    Beam {
        #[command(flatten)]
        target: Target,
        /// Dump even when the terminal checks refuse it (no or a foreign terminal, VS Code, another session)
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn run(global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Freeze {
            target,
            tag,
            images,
            leave_running,
            force,
            json,
        } => {
            let pid = resolve_target(&target)?;
            check_terminal(pid, force)?;
            let opts = capture_options(leave_running);
            let deferred = common::Deferred::start("the freeze");
            if let Some(dir) = images {
                pf_world_procs::dump_to_dir(pid, &dir, &opts)
                    .map_err(with_tty_hint)
                    .with_context(|| format!("freezing shell {pid} into {}", dir.display()))?;
                deferred.report();
                print_result(
                    json,
                    &serde_json::json!({ "images": dir, "pid": pid }),
                    &dir.display().to_string(),
                );
                return Ok(ExitCode::SUCCESS);
            }
            let store = common::open_store(global)?;
            // Held from the first blob to the name (see agent_docs/formats.md).
            let _writing = store.writer_lock()?;
            let captured = pf_world_procs::capture(&store, pid, &opts)
                .map_err(with_tty_hint)
                .with_context(|| format!("freezing shell {pid}"))?;
            if let Some(name) = &tag {
                store
                    .set_name(name, &captured.procs)
                    .with_context(|| format!("naming the snapshot {name:?}"))?;
            }
            deferred.report();
            print_result(
                json,
                &serde_json::json!({ "digest": captured.procs, "pid": pid, "tag": tag }),
                &captured.procs.to_string(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Thaw { snapshot, images } => {
            // Until the shell runs, a signal stops the thaw and leaves nothing behind; then
            // pf's signals act as they would without this.
            let signals = common::Signals::start(common::abandon("the thaw"));
            require_terminal()?;
            let terminal = crate::terminal::Foreground::keep();
            let opts = restore_options(false);
            let restored = match (snapshot, images) {
                (_, Some(dir)) => pf_world_procs::restore_dir(&dir, opts),
                (Some(s), None) => {
                    let store = common::open_existing_store(global)?;
                    let digest = common::resolve_as(&store, &s, "snapshot")?;
                    pf_world_procs::restore(&store, &digest, opts)
                }
                (None, None) => bail!("name a snapshot or pass --images DIR"),
            }
            .map_err(with_tty_hint)
            .context("thawing the shell")?;
            signals.set(common::default_action());
            foreground(restored, &terminal)
        }
        Command::Beam { target, force } => {
            require_terminal()?;
            let pid = resolve_target(&target)?;
            check_terminal(pid, force)?;
            // A signal during the dump waits for its end (stopped midway, criu could leave the
            // shell with its parasite in it); from then until the copy runs, it stops the beam
            // and leaves nothing behind.
            let deferred = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
            let signals = common::Signals::start({
                let deferred = std::sync::Arc::clone(&deferred);
                move |sig| {
                    if deferred.compare_exchange(0, sig, SeqCst, SeqCst).is_ok() {
                        common::say(&format!(
                            "pf: signal {sig}: the beam stops once its dump is done (stopped \
                             midway, criu would still finish it without pf)"
                        ));
                    }
                }
            });
            let dir = tempdir_for_images()?;
            pf_world_procs::dump_to_dir(pid, dir.path(), &capture_options(true))
                .map_err(with_tty_hint)
                .with_context(|| format!("freezing shell {pid}"))?;
            signals.set(common::abandon("the beam"));
            let sig = deferred.load(SeqCst);
            if sig != 0 {
                common::abandon("the beam")(sig);
            }
            let terminal = crate::terminal::Foreground::keep();
            let restored = pf_world_procs::restore_dir(dir.path(), restore_options(true))
                .map_err(with_tty_hint)
                .context("thawing the copy of the shell")?;
            signals.set(common::default_action());
            drop(dir);
            foreground(restored, &terminal)
        }
    }
}

fn resolve_target(target: &Target) -> anyhow::Result<i32> {
    match (target.pid, &target.pgrep) {
        (Some(pid), _) => {
            shell_inspect::read_stat(pid)?;
            Ok(pid)
        }
        (None, Some(pattern)) => {
            let re = regex::Regex::new(pattern)
                .with_context(|| format!("--pgrep {pattern:?} is not a valid regex"))?;
            let found = shell_inspect::pgrep(&re)?;
            shell_inspect::pick_one(pattern, &found)
        }
        (None, None) => bail!("pass --pid PID or --pgrep PATTERN"),
    }
}

fn check_terminal(pid: i32, force: bool) -> anyhow::Result<()> {
    match shell_inspect::terminal_problem(pid)? {
        None => Ok(()),
        Some(problem) if force => {
            tracing::warn!("{problem}; trying anyway (--force)");
            Ok(())
        }
        Some(problem) => bail!("{problem} (--force tries anyway)"),
    }
}

fn require_terminal() -> anyhow::Result<()> {
    if std::io::stdin().is_terminal() {
        Ok(())
    } else {
        bail!(
            "a shell is thawed onto this terminal, but stdin is not a terminal: run pf in a terminal (tmux, screen, a terminal emulator)"
        )
    }
}

fn capture_options(leave_running: bool) -> pf_world_procs::CaptureOptions {
    pf_world_procs::CaptureOptions {
        leave_running,
        shell_job: true,
        tcp_established: false,
        ext_unix_sk: false,
        file_locks: false,
        labels: [(
            pf_goblins::SHELL_LABEL.0.to_owned(),
            pf_goblins::SHELL_LABEL.1.to_owned(),
        )]
        .into(),
        extra_args: Vec::new(),
    }
}

fn restore_options(new_pidns: bool) -> pf_world_procs::RestoreOptions {
    pf_world_procs::RestoreOptions {
        new_pidns,
        shell_job: true,
        join_session: true,
        inherit: Vec::new(),
        extra_args: Vec::new(),
    }
}

/// A private (0700) directory for the images of a beam (`pf-beam-<pid>-…` on /dev/shm unless
/// `$TMPDIR` says otherwise), locked while in use and removed when dropped; making it sweeps the
/// ones a killed beam left (`pf_os::scratch`).
fn tempdir_for_images() -> anyhow::Result<pf_os::scratch::Scratch> {
    pf_os::scratch::images_dir("pf-beam-").context("creating a private directory for the images")
}

#[allow(clippy::print_stdout)]
fn print_result(json: bool, value: &serde_json::Value, plain: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{plain}");
    }
}

/// Add the shell's terminal hint to CRIU's failure on a terminal of another session.
fn with_tty_hint(err: pf_world_procs::Error) -> anyhow::Error {
    // A shell comes back under its own pids (its jobs and terminal need them): `--new-pidns`,
    // the fix the library names, is not a `shell thaw` flag; a copy beside the original is
    // `pf shell beam`.
    if let pf_world_procs::Error::PidInUse { pid, holder } = &err {
        return anyhow::anyhow!(
            "pid {pid} is in use by a running process ({holder}), so the shell cannot get its \
             pid back; if that is the shell itself, still running, end it first, or take a live \
             copy of it here with `pf shell beam --pid {pid}`"
        );
    }
    let foreign = err.kind() == pf_world_procs::ErrorKind::ForeignTerminal;
    let beamed = matches!(
        err.criu_failure(),
        Some(pf_world_procs::criu_log::CriuFailure::SessionOutsideNamespace { .. })
    );
    let err = anyhow::Error::new(err);
    if foreign {
        err.context(shell_inspect::NO_SID_HINT)
    } else if beamed {
        // `pf shell beam` restores a copy in a pid namespace of its own, joined to the session
        // of the terminal it was beamed to, whose leader is outside that namespace.
        err.context(
            "this shell's session leader is outside its pid namespace, as for a copy made by \
             `pf shell beam` (in a pid namespace of its own, in the session of the terminal it \
             was beamed to): such a copy cannot be frozen or beamed again; freeze the original \
             shell instead",
        )
    } else {
        err
    }
}

/// Hand the terminal to the restored shell, wait for it, and exit with its status.
/// Give the terminal to the restored shell and wait for it; `terminal` gives it back when the
/// caller drops it.
fn foreground(
    mut restored: pf_world_procs::Restored,
    terminal: &crate::terminal::Foreground,
) -> anyhow::Result<ExitCode> {
    terminal.give(restored.pid());
    let exit = restored.wait().context("waiting for the shell")?;
    Ok(ExitCode::from(exit.exit_code()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_in_use_points_at_beam_not_at_a_flag_shell_thaw_lacks() {
        let err = with_tty_hint(pf_world_procs::Error::PidInUse {
            pid: 4242,
            holder: "bash".into(),
        })
        .to_string();
        assert!(err.contains("pf shell beam --pid 4242"), "{err}");
        assert!(!err.contains("--new-pidns"), "{err}");
    }

    #[test]
    fn a_killed_beams_images_are_swept_by_the_next_beam() {
        // What a SIGKILLed beam leaves: `pf-beam-<its pid>-…` holding a dump, no lock.
        let dead_pid = pf_world_procs::test_support::dead_pid();
        let base = pf_os::scratch::images_base();
        let left = base.join(format!("pf-beam-{dead_pid}-killed"));
        std::fs::create_dir(&left).expect("mkdir");
        std::fs::write(left.join("pages-1.img"), vec![0u8; 4096]).expect("write");
        let dir = tempdir_for_images().expect("beam dir");
        assert!(!left.exists(), "the killed beam's dump is swept");
        let name = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        assert!(
            name.starts_with(&format!("pf-beam-{}-", std::process::id())),
            "{name}"
        );
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
    }
}
