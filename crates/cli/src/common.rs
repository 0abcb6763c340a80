//! What every subcommand shares: global flags, the store root, logging and error printing.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::Context as _;

/// Flags accepted by every subcommand.
#[derive(Debug, clap::Args)]
pub(crate) struct Global {
    /// Store directory [default: $PF_STORE, else $XDG_DATA_HOME/pf, else ~/.local/share/pf]
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) store: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
}

/// Where the store lives: `--store`, else `$PF_STORE`, else `$XDG_DATA_HOME/pf`, else
/// `~/.local/share/pf`.
pub(crate) fn store_root(global: &Global) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &global.store {
        return Ok(dir.clone());
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = env("PF_STORE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env("XDG_DATA_HOME") {
        return Ok(PathBuf::from(dir).join("pf"));
    }
    let home = env("HOME").context("cannot find the store: set --store, $PF_STORE or $HOME")?;
    Ok(PathBuf::from(home).join(".local/share/pf"))
}

/// Open (creating if missing) the store at [`store_root`].
pub(crate) fn open_store(global: &Global) -> anyhow::Result<pf_core::FsBlobStore> {
    let root = store_root(global)?;
    pf_core::FsBlobStore::open(&root).map_err(|err| match err {
        // Says the path and what to do itself.
        err @ (pf_core::Error::NotAStore { .. } | pf_core::Error::EmptyStorePath) => {
            anyhow::Error::new(err)
        }
        err => anyhow::Error::new(err).context(format!(
            "cannot use the store at {} (--store DIR or $PF_STORE picks another)",
            root.display()
        )),
    })
}

/// Open the store at [`store_root`] to read it (or to change what it holds): a missing store is
/// an error, not a new empty one, so a mistyped `--store` does not pass for an empty store.
pub(crate) fn open_existing_store(global: &Global) -> anyhow::Result<pf_core::FsBlobStore> {
    let root = store_root(global)?;
    pf_core::FsBlobStore::open_existing(&root).map_err(|err| match err {
        pf_core::Error::NoStore { .. } => {
            anyhow::anyhow!("{err}; --store DIR or $PF_STORE picks another store")
        }
        err @ (pf_core::Error::NotAStore { .. } | pf_core::Error::EmptyStorePath) => {
            anyhow::Error::new(err)
        }
        err => anyhow::Error::new(err).context(format!(
            "cannot use the store at {} (--store DIR or $PF_STORE picks another)",
            root.display()
        )),
    })
}

/// The digest `reference` stands for in `store` (a digest, a unique prefix of one, or a name:
/// see [`pf_core::BlobStore::resolve`]), or an error that says where to look.
pub(crate) fn resolve(
    store: &dyn pf_core::BlobStore,
    reference: &str,
) -> anyhow::Result<pf_core::Digest256> {
    resolve_as(store, reference, "blob")
}

/// [`resolve`], for a caller that wants a `what` ("snapshot"): the word its errors use.
pub(crate) fn resolve_as(
    store: &dyn pf_core::BlobStore,
    reference: &str,
    what: &str,
) -> anyhow::Result<pf_core::Digest256> {
    use pf_core::Error as E;
    store.resolve(reference).map_err(|err| {
        let context = match &err {
            E::InvalidDigest(_) => format!(
                "{reference:?} is not a digest (expected `sha256:` and 64 lowercase hex digits, \
                 or a unique prefix of at least {} of them)",
                pf_core::PREFIX_MIN_HEX
            ),
            E::NameNotFound { .. } => format!(
                "no {what} {reference:?} in the store (see `pf store tags`{}{})",
                did_you_mean(store, reference),
                prefix_hint(reference)
            ),
            E::PrefixNotFound { bare: true, .. } => format!(
                "no {what} {reference:?} in the store (names: `pf store tags`, digests: \
                 `pf store ls`{})",
                did_you_mean(store, reference)
            ),
            E::PrefixNotFound { bare: false, .. } => {
                format!("no {what} {reference} in the store (see `pf store ls`)")
            }
            // Their own words say it all: which blobs a prefix matches, how long one must be.
            E::AmbiguousPrefix { .. } | E::PrefixTooShort { .. } => return anyhow::Error::new(err),
            _ => format!("cannot look up {reference:?} in the store"),
        };
        anyhow::Error::new(err).context(context)
    })
}

/// For a name that is not in the store but looks like the start of a digest too short to be
/// taken for one without `sha256:`: how to write it as a prefix.
fn prefix_hint(reference: &str) -> String {
    let hex = reference
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex && (pf_core::PREFIX_MIN_HEX..pf_core::BARE_PREFIX_MIN_HEX).contains(&reference.len()) {
        format!(
            "; a prefix of a digest is written sha256:{reference}, or with at least {} hex \
             digits alone",
            pf_core::BARE_PREFIX_MIN_HEX
        )
    } else {
        String::new()
    }
}

/// `; did you mean "NAME"?` when the store has a name close to `name` (a typo away), else
/// nothing: for the message of a name that is not in the store.
pub(crate) fn did_you_mean(store: &dyn pf_core::BlobStore, name: &str) -> String {
    if name.starts_with("sha256:") {
        return String::new();
    }
    let Ok(names) = store.names() else {
        return String::new();
    };
    closest(name, names.iter().map(|(n, _)| n.as_str()))
        .map(|n| format!("; did you mean {n:?}?"))
        .unwrap_or_default()
}

/// The candidate nearest to `name` in edits (insert, remove or change a character, or swap two
/// adjacent ones), if it is near enough to be a typo of it: at most 1 edit for names of up to 4
/// characters, 2 for longer ones. Ties go to the first.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = if name.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .filter(|c| *c != name)
        .map(|c| (edits(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edits from `a` to `b` (optimal string alignment distance), by characters.
fn edits(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: edits from a[..i] to b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Log to stderr; `RUST_LOG` wins over `-v`.
pub(crate) fn init_tracing(verbose: u8) {
    // rustls-platform-verifier logs a certificate it refuses as an error of its own; pf's own
    // error (pf-registry's `UntrustedCertificate`) says it once, with the fix.
    let default = match verbose {
        0 => "warn,rustls_platform_verifier=off",
        1 => "info,rustls_platform_verifier=off",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Quiet once an interrupt is ending pf (`pf_os::abandon`): what the other threads run into
    // then (a criu killed under them) is not worth a word.
    let writer =
        tracing_subscriber::fmt::writer::MakeWriterExt::with_filter(std::io::stderr, |_| {
            !pf_os::abandon::is_ending()
        });
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    if verbose >= 2 {
        // Debugging a slow step: each line says when, in seconds since pf started.
        fmt.with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else if verbose == 0 {
        // What a user sees unasked (warnings) reads as pf's other messages do: `pf: warning: …`,
        // not as a log line naming a module.
        fmt.event_format(Plain).init();
    } else {
        fmt.without_time().init();
    }
}

/// Events as `pf: warning: MESSAGE key=value …`: for pf's own warnings when no log was asked.
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        write!(writer, "pf: {level}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Print an error chain on stderr as `error: outer: inner: …`. What to do about a CRIU failure
/// pf recognises is part of the error itself (pf-world-procs classifies CRIU's log), not found
/// here by matching its text.
#[allow(clippy::print_stderr)]
pub(crate) fn print_error(err: &anyhow::Error) {
    eprintln!("error: {err:#}");
}

/// Whether progress may be drawn: only when stderr is a terminal.
pub(crate) fn progress_enabled() -> bool {
    std::io::stderr().is_terminal()
}

/// The signals pf handles itself while a goblin runs or a pull stores blobs: SIGINT, SIGTERM,
/// SIGHUP and SIGQUIT, less those pf was started ignoring. A shell starts a script's background
/// job with SIGINT and SIGQUIT ignored, and `nohup` its command with SIGHUP ignored: blocked and
/// waited for, they would reach pf all the same.
fn handled_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        if !pf_os::proc::ignores_signal(sig as i32) {
            set.add(sig);
        }
    }
    set
}

/// Block the handled signals in this thread (and so in every thread it starts from now on), so
/// that only the thread of [`forward_signals_to`] receives them. Children started by std get a
/// clean signal mask.
pub(crate) fn block_signals() -> nix::sys::signal::SigSet {
    let set = handled_signals();
    if let Err(e) = set.thread_block() {
        tracing::warn!(error = %e, "cannot block signals; Ctrl-C will not reach the goblin or cancel the pull");
    }
    set
}

/// On a thread, wait for the blocked signals forever and hand each to `on_signal`.
pub(crate) fn forward_signals_to(
    set: nix::sys::signal::SigSet,
    on_signal: impl Fn(i32) + Send + 'static,
) {
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            on_signal(sig as i32);
        }
    });
}

/// pf's signals (those of [`block_signals`]) for a command whose answer to them changes as its
/// work goes on: blocked from now on in this thread and every thread it starts, and handed by
/// one thread to the handler of the moment. Start it first thing, before any thread is started:
/// a thread started earlier keeps the default action, and a signal delivered to it ends pf.
pub(crate) struct Signals {
    handler: std::sync::Arc<std::sync::Mutex<Handler>>,
}

type Handler = Box<dyn FnMut(i32) + Send>;

impl Signals {
    /// Block the signals and hand each to `handler` until [`Signals::set`] changes it.
    pub(crate) fn start(handler: impl FnMut(i32) + Send + 'static) -> Self {
        let handler: std::sync::Arc<std::sync::Mutex<Handler>> =
            std::sync::Arc::new(std::sync::Mutex::new(Box::new(handler)));
        let current = std::sync::Arc::clone(&handler);
        let set = block_signals();
        std::thread::spawn(move || {
            while let Ok(sig) = set.wait() {
                let mut handler = current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                (*handler)(sig as i32);
            }
        });
        Self { handler }
    }

    /// Hand the signals to `handler` from now on. (While a handler that ends pf runs, this
    /// waits for the end.)
    pub(crate) fn set(&self, handler: impl FnMut(i32) + Send + 'static) {
        *self
            .handler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Box::new(handler);
    }
}

/// What a signal does before the work it would cut short has made anything that outlives pf:
/// say so, then end pf at once, killing every process it started (criu, a restore's namespace
/// init and the tree in it) and removing every scratch directory it holds (unpacked images), and
/// exit 128 + the signal's number, as a shell reports a command a signal ended. `what`: the work
/// stopped ("the thaw").
pub(crate) fn abandon(what: &'static str) -> impl FnMut(i32) + Send + 'static {
    move |sig| {
        say(&format!(
            "pf: interrupted by signal {sig}: {what} is stopped and leaves nothing behind"
        ));
        pf_os::abandon::exit(128 + sig)
    }
}

/// A signal's default action, as if pf had never handled it: unblocked in this thread and sent
/// again (SIGINT, SIGTERM and SIGHUP end pf, SIGQUIT dumps core).
pub(crate) fn default_action() -> impl FnMut(i32) + Send + 'static {
    |sig| die_of(sig)
}

/// End pf by signal `sig`'s default action (pf sets no handler; the signal is unblocked in this
/// thread and sent to it again), so
/// that pf's parent sees it killed by that signal: a shell stops a loop whose command Ctrl-C
/// killed, not one that merely exited 130. Exits 128 + `sig` should the signal not end it.
pub(crate) fn die_of(sig: i32) -> ! {
    if let Ok(signal) = nix::sys::signal::Signal::try_from(sig) {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(signal);
        let _ = set.thread_unblock();
        let _ = nix::sys::signal::raise(signal);
    }
    std::process::exit(128 + sig);
}

/// Ctrl-C (the signals of [`block_signals`]) held back while a dump runs: criu, in a process
/// group of its own, would finish it without pf and, without --leave-running, kill the process,
/// whose snapshot pf would then never store. The first signal is told on stderr; the caller
/// reports it once the snapshot is stored ([`Deferred::report`]).
pub(crate) struct Deferred(std::sync::Arc<std::sync::atomic::AtomicI32>);

impl Deferred {
    /// Hold back the signals from now on; `what` is the work they wait for ("the freeze").
    pub(crate) fn start(what: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        let signal = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let seen = std::sync::Arc::clone(&signal);
        forward_signals_to(block_signals(), move |sig| {
            if seen.swap(sig, Ordering::SeqCst) == 0 {
                say(&format!(
                    "pf: signal {sig}: {what} goes on to its end (stopped midway, criu would \
                     still finish the dump without pf, and without --leave-running stop the \
                     process, with no snapshot stored)"
                ));
            }
        });
        Self(signal)
    }

    /// Say that a signal came, if one did, now that the work is done.
    pub(crate) fn report(&self) {
        let sig = self.0.load(std::sync::atomic::Ordering::SeqCst);
        if sig != 0 {
            say(&format!(
                "pf: interrupted by signal {sig} after the snapshot was complete; it is kept"
            ));
        }
    }
}

/// A line on stderr.
#[allow(clippy::print_stderr)]
pub(crate) fn say(line: &str) {
    eprintln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_of_a_name_is_suggested_and_a_stranger_is_not() {
        let names = ["counter", "c2", "big", "warm-repl"];
        let near = |n: &str| closest(n, names.iter().copied());
        assert_eq!(near("countr"), Some("counter"));
        assert_eq!(near("conuter"), Some("counter"));
        assert_eq!(near("counter1"), Some("counter"));
        assert_eq!(near("bog"), Some("big"));
        assert_eq!(near("warm_repl"), Some("warm-repl"));
        assert_eq!(near("c3"), Some("c2"));
        assert_eq!(near("nosuchname"), None);
        assert_eq!(near("bgi2"), None);
        assert_eq!(near("counter"), None, "the name itself is no suggestion");
        assert_eq!(edits("", "abc"), 3);
        assert_eq!(edits("ab", "ba"), 1);
    }
}
