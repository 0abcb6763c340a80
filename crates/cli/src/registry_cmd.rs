//! `pf push` and `pf pull`: snapshots to and from OCI registries (pf-registry does the work).

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use pf_registry::{ConnectOptions, Event, PullOptions, PushOptions, Reference};

use crate::common::{self, Global, progress_enabled};

const PUSH_HELP: &str = "\
Examples:
  pf push repl localhost:5000/team/repl:warm        the snapshot named `repl`
  pf push sha256:6f1e… ghcr.io/me/repl:v1            by digest
  pf push repl registry.example.com/repl:v1 --json   one JSON line for programs

What travels is the snapshot's blob graph: the snapshot's record and every blob it reaches (its
images, page packs …), exactly what `pf store gc` keeps for it. It becomes one OCI image manifest
(artifactType application/vnd.pf.snapshot.v1+json) under the tag; each blob is uploaded as its raw
bytes, so the registry names it by the same sha256 as the store. Blobs the registry already has
(a HEAD per blob) are skipped: pushing the same snapshot again uploads nothing, and a push that
was interrupted completes when run again. Large blobs go up in 8 MiB chunks, 4 blobs at a time;
a large blob cut off midway continues from the registry's last acknowledged chunk when the same
push runs again (its upload session is kept in STORE/registry/uploads until it completes; a
registry that lost or refuses the session gets the blob whole). A connection that moves no byte
for --idle-timeout seconds fails the push; a slow transfer that keeps moving does not.

Registries: REGISTRY/REPOSITORY:TAG, the host first (pf has no default registry; Docker Hub is
docker.io/USER/REPO:TAG). https with the system's root certificates (a private authority: add
it with update-ca-certificates, or SSL_CERT_FILE=CA.pem for one command), except loopback hosts
(localhost, 127.0.0.0/8, [::1]), which are plain http; --insecure allows plain http to others.
Credentials from $DOCKER_CONFIG/config.json, else ~/.docker/config.json (what `docker login`
writes), found as docker finds them: the helper `credHelpers.<host>` names, else the one
`credsStore` names (run as `docker-credential-NAME get`), else `auths.<host>.auth`; none there
means anonymous. Basic and bearer-token registries both work.

Progress goes to stderr (a bar on a terminal), the snapshot's digest to stdout.";

const PULL_HELP: &str = "\
Examples:
  pf pull localhost:5000/team/repl:warm --tag repl   fetch it and name it `repl`
  pf goblin thaw repl                                 then thaw it as any snapshot
  pf pull ghcr.io/me/repl:v1 --json

Only the blobs this store lacks are fetched, and those whose copy here is damaged: cut short,
or (all but page packs, which are large and checked page by page as they are read) bytes that
fail their hash. So pulling again mends a damaged record, images archive or page list, and a
truncated pack. Every byte is checked against its sha256 before it
enters the store, and a blob that does not match is refused, naming its digest. The name is
written last, once every blob of the snapshot is in: a pull that fails leaves nothing of itself
behind (no name, no blob), and so does one stopped with Ctrl-C (pf removes what it stored, then
ends by the signal, so a shell reports 130 and a loop around it stops; Ctrl-C again stops it at
once and leaves that to `pf store gc`). Without --tag the snapshot is stored unnamed: its digest is printed,
and `pf store gc` removes it after the grace period unless you name it (`pf store tag`).

Registries and credentials as for `pf push` (see `pf push --help`).";

/// Arguments shared by push and pull.
#[derive(Debug, clap::Args)]
pub(crate) struct Connect {
    /// Plain http to a registry that is not on loopback (loopback is always plain http)
    #[arg(long)]
    insecure: bool,
    /// Use no credentials, even if the docker config has some for this registry
    #[arg(long)]
    anonymous: bool,
    /// How many blobs move at once
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Give up a blob when its connection moves no byte for SECONDS (a slow transfer that keeps
    /// moving never times out)
    #[arg(long, value_name = "SECONDS", default_value_t = pf_registry::DEFAULT_IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout: u64,
    /// Print one JSON object on stdout instead of the digest
    #[arg(long)]
    json: bool,
}

impl Connect {
    fn options(&self) -> ConnectOptions {
        ConnectOptions {
            insecure: self.insecure,
            docker_config: if self.anonymous {
                None
            } else {
                pf_registry::default_docker_config()
            },
            parallel: usize::from(self.parallel),
            idle_timeout: Duration::from_secs(self.idle_timeout),
        }
    }
}

/// Upload a snapshot to an OCI registry, sending only the blobs it lacks
#[derive(Debug, clap::Args)]
#[command(after_help = PUSH_HELP)]
pub(crate) struct PushArgs {
    /// The snapshot: a name in the store, a digest (sha256:…) or a unique prefix of one
    /// (sha256:3f2a9c, or 8 or more hex digits alone when no name is spelled so)
    #[arg(value_name = "NAME|DIGEST")]
    snapshot: String,
    /// Where to: REGISTRY/REPOSITORY:TAG, e.g. localhost:5000/repl:warm
    #[arg(value_name = "REGISTRY/REPO:TAG")]
    reference: String,
    #[command(flatten)]
    connect: Connect,
}

/// Fetch a snapshot from an OCI registry into the store, fetching only the blobs it lacks
#[derive(Debug, clap::Args)]
#[command(after_help = PULL_HELP)]
pub(crate) struct PullArgs {
    /// What to fetch: REGISTRY/REPOSITORY:TAG, e.g. localhost:5000/repl:warm
    #[arg(value_name = "REGISTRY/REPO:TAG")]
    reference: String,
    /// Name the pulled snapshot NAME in the store (written once every blob is in)
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
    #[command(flatten)]
    connect: Connect,
}

pub(crate) fn push(global: &Global, args: &PushArgs) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.reference)?;
    let store = common::open_existing_store(global)?;
    let root = common::resolve_as(&store, &args.snapshot, "snapshot")?;
    // Ctrl-C ends pf at once, saying how to go on: nothing of the store changes, the registry
    // keeps what it took, and the same command skips those blobs and resumes a cut upload.
    let signals = common::Signals::start(|sig| {
        say(&format!(
            "\npf: interrupted by signal {sig}: the push stopped; run the same `pf push` again to \
             go on where it stopped (the blobs the registry has are skipped, an upload cut midway \
             resumes)"
        ));
        common::die_of(sig);
    });
    let meter = Meter::new("pushed", "uploaded");
    let started = Instant::now();
    let options = PushOptions {
        connect: args.connect.options(),
        sessions: Some(store.root().join("registry").join("uploads")),
        cancel: None,
    };
    let report = pf_registry::push(&store, &root, &reference, &options, &|e| meter.event(e))
        .with_context(|| format!("cannot push {} to {reference}", args.snapshot));
    meter.finish();
    let report = report?;
    // Pushed: a signal from now on ends pf as if it had none of its own (nothing stopped).
    signals.set(common::default_action());
    let seconds = started.elapsed().as_secs_f64();
    if args.connect.json {
        let json = serde_json::json!({
            "reference": reference.to_string(),
            "snapshot": report.snapshot,
            "manifest_digest": report.manifest_digest,
            "blobs": report.blobs,
            "uploaded": report.uploaded,
            "skipped": report.skipped,
            "bytes_total": report.bytes_total,
            "bytes_uploaded": report.bytes_uploaded,
            "seconds": seconds,
        });
        writeln!(std::io::stdout().lock(), "{json}")?;
    } else {
        say(&format!(
            "pushed {reference}: {} of {} blobs uploaded ({}), {} skipped, in {:.1} s ({}/s)",
            report.uploaded,
            report.blobs,
            HumanBytes(report.bytes_uploaded),
            report.skipped,
            seconds,
            HumanBytes(rate(report.bytes_uploaded, seconds)),
        ));
        writeln!(std::io::stdout().lock(), "{}", report.snapshot)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn pull(global: &Global, args: &PullArgs) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.reference)?;
    // A pull that fails leaves nothing of itself, not even the store it would have made: an
    // empty directory there would pass for a store from then on, mistyped --store or not.
    let root = common::store_root(global)?;
    let made = !root.exists();
    let result = pull_into(global, args, &reference, made.then(|| root.clone()));
    if made && !matches!(result, Ok(None)) {
        pf_core::FsBlobStore::forget_if_empty(&root);
    }
    match result? {
        None => Ok(ExitCode::SUCCESS),
        // Ended by the signal, as if pf had none of its own: a shell loop around it stops.
        Some(sig) => common::die_of(sig),
    }
}

/// `made`: the store's root when this pull creates it (a signal that ends the pull before it
/// stores anything removes it too). `Some(signal)` when a signal stopped the pull, which then
/// took back what it had stored.
fn pull_into(
    global: &Global,
    args: &PullArgs,
    reference: &Reference,
    made: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<i32>> {
    let reference = reference.clone();
    let store = common::open_store(global)?;
    let meter = Meter::new("pulled", "fetched");
    let started = Instant::now();
    let interrupt = Interrupt::watch(made);
    let options = PullOptions {
        connect: args.connect.options(),
        name: args.tag.clone(),
        cancel: Some(Arc::clone(&interrupt.cancel)),
    };
    let report = pf_registry::pull(&store, &reference, &options, &|e| {
        interrupt.event(&e);
        meter.event(e);
    });
    meter.finish();
    let report = match (report, interrupt.signal()) {
        (Err(err @ pf_registry::Error::Cancelled { .. }), Some(sig)) => {
            common::print_error(&anyhow::Error::new(err).context(format!(
                "cannot pull {reference}, interrupted by signal {sig}"
            )));
            return Ok(Some(i32::from(sig)));
        }
        (report, _) => report.with_context(|| format!("cannot pull {reference}"))?,
    };
    let seconds = started.elapsed().as_secs_f64();
    if args.connect.json {
        let json = serde_json::json!({
            "reference": reference.to_string(),
            "snapshot": report.snapshot,
            "name": report.name,
            "blobs": report.blobs,
            "fetched": report.fetched,
            "skipped": report.skipped,
            "bytes_total": report.bytes_total,
            "bytes_fetched": report.bytes_fetched,
            "pages_indexed": report.pages_indexed,
            "seconds": seconds,
        });
        writeln!(std::io::stdout().lock(), "{json}")?;
    } else {
        say(&format!(
            "pulled {reference}: {} of {} blobs fetched ({}), {} already here, in {:.1} s ({}/s){}",
            report.fetched,
            report.blobs,
            HumanBytes(report.bytes_fetched),
            report.skipped,
            seconds,
            HumanBytes(rate(report.bytes_fetched, seconds)),
            report
                .name
                .as_deref()
                .map(|n| format!(", named {n}"))
                .unwrap_or_default(),
        ));
        writeln!(std::io::stdout().lock(), "{}", report.snapshot)?;
    }
    Ok(None)
}

/// Ctrl-C (SIGINT, SIGTERM, SIGHUP, SIGQUIT) during a pull. Until the pull stores its first
/// blob (it is still asking the registry what to fetch) a signal ends pf at once, since nothing
/// of the pull is in the store. After that it cancels the pull, which removes what it stored
/// before it fails; a second signal ends pf at once (a read the registry leaves waiting ends
/// only at the idle timeout), leaving what was stored to `pf store gc`.
struct Interrupt {
    /// Whether the pull may have stored something; held while a signal ends pf at once, so
    /// that the pull cannot start storing meanwhile.
    storing: Arc<Mutex<bool>>,
    cancel: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl Interrupt {
    /// `made`: a store directory to remove (if nothing is in it) when a signal ends pf at once.
    fn watch(made: Option<std::path::PathBuf>) -> Self {
        let interrupt = Self {
            storing: Arc::new(Mutex::new(false)),
            cancel: Arc::new(AtomicBool::new(false)),
            signal: Arc::new(AtomicI32::new(0)),
        };
        let storing = Arc::clone(&interrupt.storing);
        let cancel = Arc::clone(&interrupt.cancel);
        let signal = Arc::clone(&interrupt.signal);
        common::forward_signals_to(common::block_signals(), move |sig| {
            let storing = storing.lock().unwrap_or_else(|p| p.into_inner());
            if !*storing || cancel.load(Ordering::SeqCst) {
                if let Some(root) = &made {
                    pf_core::FsBlobStore::forget_if_empty(root);
                }
                common::die_of(sig);
            }
            signal.store(sig, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
            say(&format!(
                "pf: interrupted by signal {sig}: removing what this pull stored (signal again to \
                 stop at once and leave it to `pf store gc`)"
            ));
        });
        interrupt
    }

    /// Follow the pull: once it knows what to fetch, it may store blobs.
    fn event(&self, event: &Event<'_>) {
        if let Event::Planned { .. } = event {
            *self.storing.lock().unwrap_or_else(|p| p.into_inner()) = true;
        }
    }

    /// The signal that cancelled the pull, if one did.
    fn signal(&self) -> Option<u8> {
        u8::try_from(self.signal.load(Ordering::SeqCst))
            .ok()
            .filter(|&s| s != 0 && s < 128)
    }
}

fn rate(bytes: u64, seconds: f64) -> u64 {
    if seconds <= 0.0 {
        return 0;
    }
    (bytes as f64 / seconds) as u64
}

/// Progress of a transfer on stderr: a bar on a terminal, else a line every few seconds.
struct Meter {
    verb: &'static str,
    moved_word: &'static str,
    bar: ProgressBar,
    started: Instant,
    last_line: Mutex<Instant>,
    total_bytes: AtomicU64,
    bytes: AtomicU64,
    skipped: AtomicUsize,
    moved: AtomicUsize,
}

/// How often a transfer without a terminal reports.
const LINE_EVERY: Duration = Duration::from_secs(5);

impl Meter {
    fn new(verb: &'static str, moved_word: &'static str) -> Self {
        let bar = if progress_enabled() {
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        } else {
            ProgressBar::hidden()
        };
        Self {
            verb,
            moved_word,
            bar,
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
            total_bytes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            skipped: AtomicUsize::new(0),
            moved: AtomicUsize::new(0),
        }
    }

    fn event(&self, event: Event<'_>) {
        match event {
            Event::Planned { bytes, .. } => {
                self.total_bytes.store(bytes, Ordering::Relaxed);
                self.bar.set_length(bytes);
            }
            Event::Skipped { size, .. } => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                // Skipped bytes count as done, so the bar ends full.
                self.bar.inc(size);
            }
            Event::Transferred { bytes } => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
                self.bar.inc(bytes);
            }
            Event::Moved { .. } => {
                self.moved.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (moved, skipped) = (
            self.moved.load(Ordering::Relaxed),
            self.skipped.load(Ordering::Relaxed),
        );
        self.bar.set_message(format!(
            "{moved} blobs {}, {skipped} skipped",
            self.moved_word
        ));
        if self.bar.is_hidden() {
            let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= LINE_EVERY {
                *last = Instant::now();
                let bytes = self.bytes.load(Ordering::Relaxed);
                say(&format!(
                    "{} {} of {} so far ({}/s), {moved} blobs {}, {skipped} skipped",
                    self.verb,
                    HumanBytes(bytes),
                    HumanBytes(self.total_bytes.load(Ordering::Relaxed)),
                    HumanBytes(rate(bytes, self.started.elapsed().as_secs_f64())),
                    self.moved_word,
                ));
            }
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[allow(clippy::print_stderr)]
fn say(line: &str) {
    eprintln!("{line}");
}
