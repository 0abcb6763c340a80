//! `cargo xtask bench [--quick] [--json]`: pf's freeze, pause, thaw, fork and bytes stored, each
//! beside raw CRIU on the same process in the same run, so the ratios hold on a noisy machine.
//!
//! For each goblin size (64 MiB, 256 MiB, 1 GiB: half random, half compressible pages) it
//! starts one goblin (`bench_proc`) and, after one run that is not counted (this VM's host gives
//! a fresh goblin's memory slowly the first time; none with `--quick`), `--runs` times (median
//! reported; peak RSS the largest of every run, the uncounted one too):
//! - raw `criu dump --leave-running` into an empty tmpfs directory, against
//!   `pf goblin freeze --leave-running` into an empty store (to the digest). Both leave the
//!   goblin running: the only way to dump one process several times, and what an agent does;
//! - the pause: CRIU's `frozen_time` from its `stats-dump`, for both (pf keeps it in the procs
//!   blob, read back with `pf procs show`), and for pf's v2 freeze below (which hashes pages
//!   beside the dump);
//! - raw `criu restore` from that tmpfs directory, against `pf goblin thaw` from the store, each
//!   timed from starting the command to the goblin's first answer. Both restore into fresh pid +
//!   mount namespaces on fresh pipes (`unshare --pid --fork --mount-proc criu restore
//!   --inherit-fd …` for raw; pf does the same through its own init), because the original
//!   still runs and holds the pid; both answers are checked against the original's;
//! - `pf goblin fork -n 8` from the store until all eight have answered (and exited). These
//!   thaws and forks, v1 and v2, pass `--eager` (pf's default is lazy for large v2 snapshots);
//! - lazy thaw (issue 12), on the v2 snapshot of the same run in its own fresh store: `pf goblin
//!   thaw --lazy` to the first answer twice (the first finds no hint of the pages thaws touch
//!   first, the second finds the one the first left under the store's `index/hot/`); then
//!   `pf -v goblin thaw --lazy` until pf logs `lazy restore done` (every page is in), against
//!   the eager v2 thaw of the same run; then `pf goblin fork --lazy -n 8` until all answered;
//! - pf's own peak resident memory in each command (sampled `VmHWM`).
//!
//! pf's default format (v2) is measured right beside raw CRIU, in turn: the v2 freeze just
//! before or just after the raw dump, the eager v2 thaw just before or after the raw restore
//! (raw first in odd runs, pf first in even ones). The v1 freeze, thaw and fork come after them.
//!
//! Then bytes in the store: one snapshot, and 10 successive snapshots of the goblin with 5% of
//! its pages rewritten between them. Last, `bench store`'s put/cat against zstd. The results go
//! to stdout as a markdown table (and, for a full run, to `docs/benchmarks.md`), or as JSON with
//! `--json` (progress goes to stderr). Nothing here asserts a timing: it reports.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::bench_criu;
use crate::bench_proc::{Collected, Goblin, Guard, Lines, PeakRss, ScratchDir, dir_bytes};
use crate::bench_report::Report;
use crate::process::{self, Out};

pub(crate) const USAGE: &str = "\
usage: cargo xtask bench [--quick] [--json] [--runs N] [--sizes MIB,MIB,…] [--no-store]
       cargo xtask bench store [--size MIB] [--runs N]

Freezes, thaws and forks goblins of 64, 256 and 1024 MiB with pf and with raw criu in the same
run and prints a markdown table of the medians (7 runs at 64 MiB, 5 at 256, 3 at 1024, after a
run to warm up), the ratios pf/raw and the targets;
a full run also writes it to docs/benchmarks.md. Needs root, criu (cargo xtask install-criu),
python3, unshare and zstd.

  --quick      64 MiB only, one run, the store section on 64 MiB, the debug build of pf:
               proves the harness works in a few minutes; figures are not representative
               and docs/benchmarks.md is left alone (as by any run with fewer sizes,
               runs or sections than the default)
  --json       print the results as JSON on stdout (progress goes to stderr)
  --runs N     runs per size (default 7 up to 64 MiB, 5 up to 256 MiB, 3 above: a small
               goblin's runs are short and the noisiest; 1 with --quick)
  --sizes LIST goblin sizes in MiB (default 64,256,1024)
  --no-store   skip the store put/cat section";

/// The design targets (DESIGN.md): ratios to raw CRIU, or seconds.
pub(crate) const FREEZE_TARGET: f64 = 1.3;
pub(crate) const PAUSE_TARGET: f64 = 1.05;
pub(crate) const THAW_TARGET: f64 = 1.3;
pub(crate) const FORK_TARGET_SECS: f64 = 0.5;
/// The goblin size the fork target is set for.
pub(crate) const FORK_TARGET_MIB: u64 = 64;
pub(crate) const FORK_CLONES: usize = 8;
/// Snapshots in the series that measures bytes stored over time.
pub(crate) const SERIES: usize = 10;
/// Copies thawed from the series' last snapshot, changed and frozen again (median reported).
const THAWED_REFREEZES: usize = 3;
/// The snapshot of the series (from 0) whose page list is a delta `MAX_DELTA_DEPTH` deep.
pub(crate) const DEEPEST: usize = pf_core::pages::MAX_DELTA_DEPTH;
/// Issue 11's targets for `procs.criu.v2`: first freeze and re-freeze after 5% changed against
/// raw dump, thaw against raw restore, 10 snapshots against one.
pub(crate) const V2_FREEZE_TARGET: f64 = 1.6;
pub(crate) const V2_REFREEZE_TARGET: f64 = 1.3;
pub(crate) const V2_THAW_TARGET: f64 = 1.3;
pub(crate) const V2_SERIES_TARGET: f64 = 1.75;
/// … and pf's peak RSS freezing, re-freezing and thawing a 1 GiB goblin, in MiB.
pub(crate) const V2_RSS_TARGET_MIB: f64 = 128.0;
/// Issue 12's targets: the second lazy thaw (with the first one's hint) to the first answer, in
/// seconds, at [`LAZY_THAW_TARGET_MIB`] …
pub(crate) const LAZY_THAW_TARGET_SECS: f64 = 0.1;
pub(crate) const LAZY_THAW_TARGET_MIB: u64 = 1024;
/// … a lazy thaw until every page is in against the eager v2 thaw …
pub(crate) const LAZY_DONE_TARGET: f64 = 1.3;
/// … `pf goblin fork --lazy -n 8` until all answered, in seconds at a goblin size in MiB …
pub(crate) const LAZY_FORK_TARGETS: [(u64, f64); 2] = [(64, 0.3), (1024, 1.0)];
/// … and pf's peak RSS while it serves those 8 clones, in MiB.
pub(crate) const LAZY_FORK_RSS_TARGET_MIB: f64 = 256.0;
/// Issue 13's target: bytes a push of the 10th snapshot sends against its new pages' stored size.
pub(crate) const SENT_TARGET: f64 = 1.2;

#[derive(Debug)]
struct Options {
    quick: bool,
    json: bool,
    /// Runs per size, if given (else [`default_runs`]).
    runs: Option<usize>,
    sizes: Vec<u64>,
    store: bool,
    /// Every size, every section, at least 3 runs: the only kind of run written to the docs.
    full: bool,
}

fn parse_args(args: &[String]) -> anyhow::Result<Options> {
    let mut opts = Options {
        quick: false,
        json: false,
        runs: None,
        sizes: Vec::new(),
        store: true,
        full: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = true,
            "--no-store" => opts.store = false,
            "--runs" => {
                let n: usize = value("--runs")?.parse().context("--runs N")?;
                if n == 0 {
                    bail!("--runs needs at least 1");
                }
                opts.runs = Some(n);
            }
            "--sizes" => {
                opts.sizes = value("--sizes")?
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .context("--sizes MIB,MIB,…")?;
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if opts.quick && opts.runs.is_none() {
        opts.runs = Some(1);
    }
    if opts.sizes.is_empty() {
        opts.sizes = if opts.quick {
            vec![64]
        } else {
            vec![64, 256, 1024]
        };
    }
    opts.full = !opts.quick
        && opts.store
        && opts.runs.is_none_or(|n| n >= 3)
        && opts.sizes == [64, 256, 1024];
    if opts.sizes.iter().any(|&s| s < 2 || s % 2 != 0) {
        bail!("goblin sizes must be even numbers of MiB, at least 2");
    }
    Ok(opts)
}

/// Runs per goblin size unless `--runs` says: more where a run is short. A 64 MiB goblin's
/// freeze or thaw takes about 0.1 s, and this 2-core VM moves one run by 10–30%: three runs
/// left its ratios to raw CRIU reading met in one bench and missed in the next. Seven cost
/// about as much as one run at 1 GiB.
fn default_runs(mib: u64) -> usize {
    match mib {
        0..=64 => 7,
        65..=256 => 5,
        _ => 3,
    }
}

impl Options {
    fn runs_at(&self, mib: u64) -> usize {
        self.runs.unwrap_or_else(|| default_runs(mib))
    }
}

/// What one run measured on one goblin.
#[derive(Debug, Clone, Copy)]
struct Run {
    raw_dump_s: f64,
    raw_pause_us: u64,
    pf_freeze_s: f64,
    pf_pause_us: u64,
    raw_restore_s: f64,
    pf_thaw_s: f64,
    fork_s: f64,
    freeze_rss_kib: u64,
    thaw_rss_kib: u64,
    fork_rss_kib: u64,
    /// The same freeze and thaw with `PF_SNAPSHOT_FORMAT=v2`, into an empty store, and that
    /// freeze's pause (CRIU's frozen time, with pf hashing pages beside the dump).
    v2_freeze_s: f64,
    v2_pause_us: u64,
    v2_thaw_s: f64,
    v2_freeze_rss_kib: u64,
    v2_thaw_rss_kib: u64,
    /// Lazy thaws of that v2 snapshot to the first answer: the first (no hint yet), the second
    /// (with the hint the first left).
    lazy_first_s: f64,
    lazy_second_s: f64,
    /// Bytes of hints under the store's `index/hot/` after the first lazy thaw (0: none written,
    /// so the second had nothing to go by).
    lazy_hint_bytes: u64,
    /// A third lazy thaw, until pf logs that every page is in, and pf's peak RSS meanwhile.
    lazy_done_s: f64,
    lazy_done_rss_kib: u64,
    /// `pf goblin fork --lazy -n 8` until all answered, and pf's peak RSS.
    lazy_fork_s: f64,
    lazy_fork_rss_kib: u64,
}

/// Everything measured on one goblin size.
#[derive(Debug)]
struct SizeResult {
    mib: u64,
    runs: Vec<Run>,
    /// The run to warm up: not in the medians, but in the peak RSS (the largest of all runs).
    warm_up: Option<Run>,
    /// The raw images directory (without criu's log).
    images_bytes: u64,
    /// The store after one snapshot.
    store_one_bytes: u64,
    /// The store after each of the successive snapshots.
    series_bytes: Vec<u64>,
    /// Seconds of each freeze of the series after the first (5% of pages changed before each).
    refreeze_s: Vec<f64>,
    /// The same series in v2.
    v2_store_one_bytes: u64,
    v2_series_bytes: Vec<u64>,
    v2_refreeze_s: Vec<f64>,
    /// pf's peak RSS over the v2 re-freezes (KiB), those of thawed copies included.
    v2_refreeze_rss_kib: u64,
    /// Seconds of each freeze of a copy thawed from the series' last snapshot after it
    /// rewrote 5% of its pages (the copy runs in a pid namespace of its own).
    v2_thawed_refreeze_s: Vec<f64>,
    /// The snapshot of the v2 series whose page list is the deepest delta: seconds to the first
    /// answer of an eager and of a lazy thaw.
    v2_last_thaw_s: Option<(f64, f64)>,
    /// The v1 snapshot of the last run pushed and pulled through a local registry.
    transfer: Option<crate::bench_registry::Transfer>,
    /// What pushing each v2 snapshot of the series sent (none without a registry).
    v2_sent: Vec<crate::bench_registry::Sent>,
}

/// Where things run: the pf binary, criu, python, the scratch parents.
#[derive(Debug)]
struct Env {
    root: PathBuf,
    pf: PathBuf,
    criu: PathBuf,
    python: PathBuf,
    /// Parent of the stores (on the disk the project lives on, like a user's store).
    stores: PathBuf,
    /// Parent of the raw images directories (tmpfs).
    tmpfs: PathBuf,
}

pub(crate) fn run(root: &Path, args: &[String]) -> anyhow::Result<ExitCode> {
    let opts = parse_args(args)?;
    let started = Instant::now();
    let criu = match crate::criu::find_working().found {
        Some((path, _)) => path,
        None => bail!(
            "no criu pf accepts ({}): run `cargo xtask install-criu` (as root)",
            pf_world_procs::criu::policy::ACCEPTED
        ),
    };
    for tool in ["unshare", "zstd"] {
        let mut probe = process::command(tool, root, Out::Null, Out::Null);
        probe.arg("--version");
        process::run(&mut probe)
            .with_context(|| format!("{tool} is needed: apt-get install -y util-linux zstd"))?;
    }
    let python = ["/usr/bin/python3", "/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"));
    let profile = if opts.quick { "debug" } else { "release" };
    progress(&format!("building pf ({profile})"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = process::command(&cargo, root, Out::Null, Out::Inherit);
    build.args(["build", "--quiet", "--package", "pf-cli", "--bin", "pf"]);
    if !opts.quick {
        build.arg("--release");
    }
    process::run(&mut build)?;
    let env = Env {
        root: root.to_owned(),
        pf: process::target_dir(root).join(profile).join("pf"),
        criu,
        python,
        stores: process::target_dir(root).join("bench"),
        tmpfs: PathBuf::from("/dev/shm"),
    };
    std::fs::create_dir_all(&env.stores)
        .with_context(|| format!("cannot create {}", env.stores.display()))?;
    let machine = crate::bench_report::machine(&env.criu, &env.stores, &env.tmpfs);

    let mut sizes = Vec::new();
    for &mib in &opts.sizes {
        sizes.push(measure_size(&env, mib, opts.runs_at(mib), !opts.quick)?);
    }
    let store = if opts.store {
        let size = if opts.quick { 64 } else { 1024 };
        progress(&format!("store put/cat against zstd, {size} MiB"));
        let (_, summary) =
            crate::bench_store::measure(root, &env.pf, size, opts.runs.unwrap_or(3), &|l| {
                progress(l)
            })?;
        Some(summary)
    } else {
        None
    };
    let report = Report {
        quick: opts.quick,
        profile,
        machine,
        sizes: sizes.iter().map(summarize).collect(),
        store,
        took: started.elapsed(),
    };
    let markdown = report.markdown();
    if opts.json {
        say(&report.json().to_string());
    } else {
        say(&markdown);
    }
    if opts.quick || !opts.full {
        progress("not a full run: docs/benchmarks.md left as it is");
    } else {
        let path = root.join("docs/benchmarks.md");
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(&path, Report::document(&existing, &markdown))
            .with_context(|| format!("cannot write {}", path.display()))?;
        progress(&format!("wrote {}", path.display()));
    }
    progress(&format!(
        "bench took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(ExitCode::SUCCESS)
}

/// Spawn one goblin of `mib` MiB and measure it `runs` times (after one run that is not
/// counted, with `warm_up`), then the snapshot series.
///
/// The first run after a goblin starts meets memory this VM's host has not given it yet: in
/// three benches at 1 GiB its raw dump took 1.43 s against 0.61–0.72 s in the runs after it,
/// pf's v2 pause 3.04 s against 0.71 s, a fork of 8 16.1 s against 10.1–10.9 s.
fn measure_size(env: &Env, mib: u64, runs: usize, warm_up: bool) -> anyhow::Result<SizeResult> {
    progress(&format!("{mib} MiB goblin: starting"));
    let mut goblin = Goblin::spawn(&env.python, mib, &env.root)?;
    let pid = goblin.pid();
    let expected = goblin.ask("sum")?;
    let mut result = SizeResult {
        mib,
        runs: Vec::new(),
        warm_up: None,
        images_bytes: 0,
        store_one_bytes: 0,
        series_bytes: Vec::new(),
        refreeze_s: Vec::new(),
        v2_store_one_bytes: 0,
        v2_series_bytes: Vec::new(),
        v2_refreeze_s: Vec::new(),
        v2_refreeze_rss_kib: 0,
        v2_thawed_refreeze_s: Vec::new(),
        v2_last_thaw_s: None,
        transfer: None,
        v2_sent: Vec::new(),
    };
    let mut last_store = None;
    for i in usize::from(!warm_up)..=runs {
        progress(&if i == 0 {
            format!("{mib} MiB goblin (pid {pid}): a run to warm up, not counted")
        } else {
            format!("{mib} MiB goblin (pid {pid}): run {i} of {runs}")
        });
        let images = ScratchDir::new(&env.tmpfs, "pf-bench-images")?;
        let v2_store = ScratchDir::new(&env.stores, "store-v2")?;
        // pf's default format (v2) is taken right beside raw criu, first in odd runs and
        // second in even ones, so neither gains from the order (the machine's state after
        // earlier steps: page cache, memory freed by clones that just exited).
        let raw_first = i % 2 == 1;
        let v2_freeze = || pf_freeze(env, v2_store.path(), pid, Format::V2);
        let (raw, (v2_freeze_s, v2_digest, v2_freeze_rss)) = if raw_first {
            let raw = bench_criu::dump(&env.criu, pid, images.path())?;
            (raw, v2_freeze()?)
        } else {
            let v2 = v2_freeze()?;
            (bench_criu::dump(&env.criu, pid, images.path())?, v2)
        };
        result.images_bytes = dir_bytes(images.path())
            - std::fs::metadata(images.path().join("dump.log")).map_or(0, |m| m.len());
        result.v2_store_one_bytes = dir_bytes(&v2_store.path().join("blobs"));
        let v2_pause_us = pf_pause(env, v2_store.path(), &v2_digest)?;
        let store = ScratchDir::new(&env.stores, "store")?;
        let (freeze_s, digest, freeze_rss) = pf_freeze(env, store.path(), pid, Format::V1)?;
        result.store_one_bytes = dir_bytes(&store.path().join("blobs"));
        let pf_pause_us = pf_pause(env, store.path(), &digest)?;
        let still = goblin.ask("sum")?;
        if still != expected {
            bail!("after the dumps the goblin answers {still:?}, not {expected:?}");
        }
        let raw_restore = || bench_criu::restore(&env.criu, images.path(), goblin.pipes, "sum");
        let v2_thaw = || pf_thaw(env, v2_store.path(), &v2_digest, "sum", Thaw::Eager);
        let ((raw_restore_s, answer), v2_thaw) = if raw_first {
            let raw = raw_restore()?;
            (raw, v2_thaw()?)
        } else {
            let v2 = v2_thaw()?;
            (raw_restore()?, v2)
        };
        check_answer("raw criu restore", &answer, &expected)?;
        check_answer("pf goblin thaw --eager (v2)", &v2_thaw.answer, &expected)?;
        let thaw = pf_thaw(env, store.path(), &digest, "sum", Thaw::Eager)?;
        check_answer("pf goblin thaw", &thaw.answer, &expected)?;
        let (fork_s, fork_rss) = pf_fork(env, store.path(), &digest, &expected, Thaw::Eager)?;
        let hints = v2_store.path().join("index").join("hot");
        if dir_bytes(&hints) > 0 {
            bail!(
                "{} holds a hint before the first lazy thaw: the first would not be a first",
                hints.display()
            );
        }
        let first = pf_thaw(env, v2_store.path(), &v2_digest, "sum", Thaw::Lazy)?;
        check_answer("pf goblin thaw --lazy (first)", &first.answer, &expected)?;
        let lazy_hint_bytes = dir_bytes(&hints);
        if lazy_hint_bytes == 0 {
            progress("  the first lazy thaw left no hint: the second has nothing to go by");
        }
        let second = pf_thaw(env, v2_store.path(), &v2_digest, "sum", Thaw::Lazy)?;
        check_answer("pf goblin thaw --lazy (second)", &second.answer, &expected)?;
        let done = pf_thaw(env, v2_store.path(), &v2_digest, "sum", Thaw::LazyUntilDone)?;
        check_answer("pf -v goblin thaw --lazy", &done.answer, &expected)?;
        let (lazy_fork_s, lazy_fork_rss) =
            pf_fork(env, v2_store.path(), &v2_digest, &expected, Thaw::Lazy)?;
        drop(v2_store);
        let run = Run {
            raw_dump_s: raw.secs,
            raw_pause_us: raw.frozen_us,
            pf_freeze_s: freeze_s,
            pf_pause_us,
            raw_restore_s,
            pf_thaw_s: thaw.answer_s,
            fork_s,
            freeze_rss_kib: freeze_rss,
            thaw_rss_kib: thaw.rss_kib,
            fork_rss_kib: fork_rss,
            v2_freeze_s,
            v2_pause_us,
            v2_thaw_s: v2_thaw.answer_s,
            v2_freeze_rss_kib: v2_freeze_rss,
            v2_thaw_rss_kib: v2_thaw.rss_kib,
            lazy_first_s: first.answer_s,
            lazy_second_s: second.answer_s,
            lazy_hint_bytes,
            lazy_done_s: done
                .done_s
                .context("a lazy thaw until done has its done time")?,
            lazy_done_rss_kib: done.rss_kib,
            lazy_fork_s,
            lazy_fork_rss_kib: lazy_fork_rss,
        };
        progress(&format!(
            "  dump {:.3} s / freeze {:.3} s; pause {:.1} / {:.1} ms; restore {:.3} s / thaw \
             {:.3} s; fork {FORK_CLONES} {:.3} s; v2 freeze {:.3} s (pause {:.1} ms), thaw {:.3} s; lazy thaw \
             {:.3} s, again {:.3} s, all pages in {:.3} s; lazy fork {FORK_CLONES} {:.3} s",
            run.raw_dump_s,
            run.pf_freeze_s,
            run.raw_pause_us as f64 / 1e3,
            run.pf_pause_us as f64 / 1e3,
            run.raw_restore_s,
            run.pf_thaw_s,
            run.fork_s,
            run.v2_freeze_s,
            run.v2_pause_us as f64 / 1e3,
            run.v2_thaw_s,
            run.lazy_first_s,
            run.lazy_second_s,
            run.lazy_done_s,
            run.lazy_fork_s,
        ));
        if i > 0 {
            result.runs.push(run);
        } else {
            result.warm_up = Some(run);
        }
        last_store = Some((store, digest));
    }
    let registry = crate::bench_registry::Local::start(&env.stores)?;
    if let (Some(local), Some((store, digest))) = (&registry, &last_store) {
        progress(&format!(
            "{mib} MiB goblin: pf push / pull through a local registry, and curl"
        ));
        let pf = |store: &Path, args: &[&str]| run_pf(env, store, args);
        let t = crate::bench_registry::transfer(
            local,
            &pf,
            store.path(),
            digest,
            &env.stores,
            &format!("g{mib}"),
        )?;
        progress(&format!(
            "  {:.1} MiB in {} blobs: push {:.3} s, curl PUT {:.3} s; pull {:.3} s, curl GET {:.3} s",
            t.bytes as f64 / 1_048_576.0,
            t.blobs,
            t.push_s,
            t.curl_put_s,
            t.pull_s,
            t.curl_get_s
        ));
        result.transfer = Some(t);
    }
    drop(last_store);
    progress(&format!(
        "{mib} MiB goblin: {SERIES} snapshots, 5% of its pages rewritten between them"
    ));
    let store = ScratchDir::new(&env.stores, "series")?;
    for i in 0..SERIES {
        if i > 0 {
            mutate(&mut goblin, i)?;
        }
        let (secs, _, _) = pf_freeze(env, store.path(), pid, Format::V1)?;
        if i > 0 {
            result.refreeze_s.push(secs);
        }
        result
            .series_bytes
            .push(dir_bytes(&store.path().join("blobs")));
    }
    drop(store);
    progress(&format!(
        "{mib} MiB goblin: the same in v2{}",
        if registry.is_some() {
            ", each snapshot pushed to the registry"
        } else {
            ""
        }
    ));
    let store = ScratchDir::new(&env.stores, "series-v2")?;
    let mut previous: Option<String> = None;
    let mut deepest: Option<(String, usize)> = None;
    for i in 0..SERIES {
        // The v1 series mutated it SERIES - 1 times already.
        mutate(&mut goblin, SERIES - 1 + i + 1)?;
        let (secs, digest, rss) = pf_freeze(env, store.path(), pid, Format::V2)?;
        if i > 0 {
            result.v2_refreeze_s.push(secs);
            result.v2_refreeze_rss_kib = result.v2_refreeze_rss_kib.max(rss);
        }
        if i == DEEPEST {
            deepest = Some((digest.clone(), SERIES - 1 + i + 1));
        }
        result
            .v2_series_bytes
            .push(dir_bytes(&store.path().join("blobs")));
        if let Some(local) = &registry {
            let pf = |store: &Path, args: &[&str]| run_pf(env, store, args);
            let sent = crate::bench_registry::push_next(
                local,
                &pf,
                store.path(),
                &digest,
                previous.as_deref(),
                &format!("bench/series{mib}"),
                &format!("s{}", i + 1),
            )?;
            result.v2_sent.push(sent);
        }
        previous = Some(digest);
    }
    // Copies thawed from the last snapshot, each rewriting 5% of its pages and frozen again
    // while it runs: the re-freeze an agent makes of a branch it thawed.
    if let Some(last) = &previous {
        let generation = 2 * SERIES - 1;
        for _ in 0..THAWED_REFREEZES {
            let (secs, rss) = refreeze_thawed(env, store.path(), last, generation)?;
            result.v2_thawed_refreeze_s.push(secs);
            result.v2_refreeze_rss_kib = result.v2_refreeze_rss_kib.max(rss);
        }
        progress(&format!(
            "  copies of snapshot {SERIES} thawed, changed and frozen again: {}",
            result
                .v2_thawed_refreeze_s
                .iter()
                .map(|s| format!("{s:.3} s"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // The snapshot of the series whose page list is the deepest delta (MAX_DELTA_DEPTH: the
    // one after it starts the chain again), as an agent forking from its newest snapshot may
    // find it. Its answer must carry its generation; the lazy thaw must answer as the eager
    // one, which checks every page.
    if let Some((deepest, generation)) = &deepest {
        let eager = pf_thaw(env, store.path(), deepest, "sum", Thaw::Eager)?;
        if !eager.answer.starts_with(&format!("sum {generation} ")) {
            bail!(
                "pf goblin thaw --eager of snapshot {} of the series answered {:?}, not from \
                 generation {generation}",
                DEEPEST + 1,
                eager.answer
            );
        }
        let lazy = pf_thaw(env, store.path(), deepest, "sum", Thaw::Lazy)?;
        check_answer(
            "pf goblin thaw --lazy (the deepest delta of the series)",
            &lazy.answer,
            &eager.answer,
        )?;
        progress(&format!(
            "  snapshot {} thawed: eager {:.3} s, lazy {:.3} s to the first answer",
            DEEPEST + 1,
            eager.answer_s,
            lazy.answer_s
        ));
        result.v2_last_thaw_s = Some((eager.answer_s, lazy.answer_s));
    }
    if let Some(last) = result.v2_sent.last() {
        progress(&format!(
            "  snapshot {SERIES}: sent {:.2} MiB, its new packs store {:.2} MiB; by role (raw MiB): {}",
            last.bytes as f64 / 1_048_576.0,
            last.new_packs_stored as f64 / 1_048_576.0,
            last.by_role
                .iter()
                .map(|(k, v)| format!("{k} {:.2}", *v as f64 / 1_048_576.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(result)
}

/// Thaw `digest` (eagerly; its goblin has rewritten its pages `generation` times), have the copy
/// rewrite 5% of its pages once more, and freeze the copy into `store` while it runs: seconds of
/// the freeze and pf's peak RSS in it.
fn refreeze_thawed(
    env: &Env,
    store: &Path,
    digest: &str,
    generation: usize,
) -> anyhow::Result<(f64, u64)> {
    use std::io::Write as _;
    let mut cmd = process::command(&env.pf, &env.root, Out::Pipe, Out::Pipe);
    cmd.arg("--store").arg(store);
    cmd.args(["goblin", "thaw", "--eager"])
        .arg(digest)
        .stdin(Stdio::piped());
    let what = process::display(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let thaw = child.id();
    let mut stdin = child.stdin.take().context("stdin")?;
    let out = Lines::new(child.stdout.take().context("stdout")?);
    let err = Lines::new(child.stderr.take().context("stderr")?);
    let mut guard = Guard::new(child, what.clone());
    writeln!(stdin, "mutate").with_context(|| format!("write to `{what}`"))?;
    let said = out
        .next(Duration::from_secs(120))
        .with_context(|| format!("`{what}` did not answer `mutate`"))?;
    if said != format!("mutated {}", generation + 1) {
        bail!("the thawed copy said {said:?} to `mutate`");
    }
    let pid = thawed_goblin(thaw)?;
    let (secs, _, rss) = pf_freeze(env, store, pid, Format::V2)?;
    drop(stdin);
    let status = guard.wait(Duration::from_secs(60))?;
    if !status.success() {
        let mut log = Vec::new();
        while let Ok(line) = err.next(Duration::from_millis(200)) {
            log.push(line);
        }
        bail!("`{what}` ended with {status}: {}", log.join("\n"));
    }
    Ok((secs, rss))
}

/// The goblin that `pf goblin thaw` (pid `thaw`) runs: the child of its namespace init that is
/// not the init's watcher.
fn thawed_goblin(thaw: u32) -> anyhow::Result<u32> {
    let thaw = i32::try_from(thaw)?;
    let goblin = pf_os::proc::children(thaw)
        .into_iter()
        .flat_map(pf_os::proc::children)
        .find(|&p| pf_os::proc::comm(p).is_some_and(|c| c != "pf-ns-watch"))
        .with_context(|| format!("no goblin under the namespace init of pf (pid {thaw})"))?;
    Ok(u32::try_from(goblin)?)
}

/// Ask the goblin to rewrite 5% of its pages, the `n`th time.
fn mutate(goblin: &mut Goblin, n: usize) -> anyhow::Result<()> {
    let said = goblin.ask("mutate")?;
    if said != format!("mutated {n}") {
        bail!("the goblin said {said:?} to `mutate`");
    }
    Ok(())
}

fn check_answer(what: &str, answer: &str, expected: &str) -> anyhow::Result<()> {
    if answer != expected {
        bail!("{what}: the goblin answered {answer:?}, the original {expected:?}");
    }
    Ok(())
}

/// A pf command run to completion: wall seconds, stdout, pf's peak RSS in KiB.
fn run_pf(env: &Env, store: &Path, args: &[&str]) -> anyhow::Result<(f64, String, u64)> {
    run_pf_in(env, store, args, Format::V1)
}

/// [`run_pf`] with `$PF_SNAPSHOT_FORMAT` set to `format`.
fn run_pf_in(
    env: &Env,
    store: &Path,
    args: &[&str],
    format: Format,
) -> anyhow::Result<(f64, String, u64)> {
    let mut cmd = process::command(&env.pf, &env.root, Out::Pipe, Out::Pipe);
    cmd.arg("--store")
        .arg(store)
        .args(args)
        .env("PF_SNAPSHOT_FORMAT", format.env());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    let rss = PeakRss::watch(child.id());
    let out = Collected::from(child.stdout.take().context("stdout")?);
    let err = Collected::from(child.stderr.take().context("stderr")?);
    let mut guard = Guard::new(child, process::display(&cmd));
    let status = guard.wait(Duration::from_secs(600))?;
    let secs = start.elapsed().as_secs_f64();
    let rss = rss.finish();
    let stdout = out.finish(Duration::from_secs(10));
    let stderr = err.finish(Duration::from_secs(10));
    if !status.success() {
        bail!("`{}` failed ({status}): {stderr}", process::display(&cmd));
    }
    Ok((secs, stdout, rss))
}

/// A snapshot format pf writes (`$PF_SNAPSHOT_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    V1,
    V2,
}

impl Format {
    fn env(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// `pf goblin freeze --pid PID --leave-running --json` into `store` in `format`: seconds,
/// digest, peak RSS.
fn pf_freeze(
    env: &Env,
    store: &Path,
    pid: u32,
    format: Format,
) -> anyhow::Result<(f64, String, u64)> {
    let pid = pid.to_string();
    crate::bench_store::sync(store)?;
    let (secs, stdout, rss) = run_pf_in(
        env,
        store,
        &[
            "goblin",
            "freeze",
            "--pid",
            &pid,
            "--leave-running",
            "--json",
        ],
        format,
    )?;
    let value: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("pf goblin freeze --json printed {stdout:?}"))?;
    let digest = value["digest"]
        .as_str()
        .with_context(|| format!("no digest in {value}"))?
        .to_owned();
    Ok((secs, digest, rss))
}

/// The frozen time CRIU recorded for the dump behind `digest` (from `pf procs show`).
fn pf_pause(env: &Env, store: &Path, digest: &str) -> anyhow::Result<u64> {
    let (_, stdout, _) = run_pf(env, store, &["procs", "show", digest])?;
    let value: Value = serde_json::from_str(&stdout).context("pf procs show printed no JSON")?;
    value["dump_stats"]["frozen_time_us"]
        .as_u64()
        .with_context(|| format!("the procs blob {digest} records no dump_stats.frozen_time_us"))
}

/// How a bench thaw or fork restores memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thaw {
    /// All of it before the goblin runs.
    Eager,
    /// On demand from the store (`--lazy`).
    Lazy,
    /// `-v … --lazy`, waiting after the answer until pf logs that every page is in.
    LazyUntilDone,
}

impl Thaw {
    /// Always explicit: pf's own default is lazy for large v2 snapshots.
    fn flag(self) -> &'static str {
        match self {
            Self::Eager => "--eager",
            Self::Lazy | Self::LazyUntilDone => "--lazy",
        }
    }
}

/// What the line pf logs (with `-v`) when a lazy restore needs no more pages contains.
const LAZY_DONE_LOG: &str = "lazy restore done";

/// What one bench thaw measured.
#[derive(Debug)]
struct Thawed {
    /// Seconds from starting pf to the goblin's answer.
    answer_s: f64,
    answer: String,
    /// [`Thaw::LazyUntilDone`]: seconds from starting pf to its log line that every page is in.
    done_s: Option<f64>,
    /// pf's peak RSS up to the answer (to the last page, for [`Thaw::LazyUntilDone`]).
    rss_kib: u64,
}

/// `pf goblin thaw --eager|--lazy DIGEST`, timed from its start to the goblin's answer to `question`
/// (and, for [`Thaw::LazyUntilDone`], on to pf's `lazy restore done` log line, its stdin still
/// open); then its stdin is closed, the goblin ends and pf exits with its status.
fn pf_thaw(
    env: &Env,
    store: &Path,
    digest: &str,
    question: &str,
    how: Thaw,
) -> anyhow::Result<Thawed> {
    use std::io::Write as _;
    crate::bench_store::sync(store)?;
    let mut cmd = process::command(&env.pf, &env.root, Out::Pipe, Out::Pipe);
    cmd.arg("--store").arg(store);
    if how == Thaw::LazyUntilDone {
        cmd.arg("-v");
    }
    cmd.args(["goblin", "thaw", how.flag()]);
    cmd.arg(digest).stdin(Stdio::piped());
    let what = process::display(&cmd);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let rss = PeakRss::watch(child.id());
    let mut stdin = child.stdin.take().context("stdin")?;
    let out = Lines::new(child.stdout.take().context("stdout")?);
    // Both pipes are read on threads, so neither can fill up and stall pf.
    let err = Lines::new(child.stderr.take().context("stderr")?);
    let mut guard = Guard::new(child, what.clone());
    let mut log = Vec::new();
    // What pf said last, for an error: what it wrote within a moment more.
    let tail = |log: &mut Vec<String>| {
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = err.next(until.saturating_duration_since(Instant::now())) {
            log.push(line);
        }
        log[log.len().saturating_sub(20)..].join("\n")
    };
    writeln!(stdin, "{question}").with_context(|| format!("write to `{what}`"))?;
    let answer = match out.next(Duration::from_secs(120)) {
        Ok(answer) => answer,
        Err(e) => bail!("`{what}`: {e:#}: {}", tail(&mut log)),
    };
    let answer_s = start.elapsed().as_secs_f64();
    let mut done_s = None;
    if how == Thaw::LazyUntilDone {
        let limit = Duration::from_secs(600);
        loop {
            let left = limit.saturating_sub(start.elapsed());
            match err.next(left) {
                Ok(line) if line.contains(LAZY_DONE_LOG) => {
                    done_s = Some(start.elapsed().as_secs_f64());
                    break;
                }
                Ok(line) => log.push(line),
                Err(e) => bail!(
                    "`{what}` never logged {LAZY_DONE_LOG:?}: {e:#}: {}",
                    tail(&mut log)
                ),
            }
        }
    }
    // pf's own peak is behind it by now: it has read the blob and run criu (and, lazily, served
    // every page once it is done; to the answer only, otherwise).
    let rss_kib = rss.finish();
    drop(stdin);
    let status = guard.wait(Duration::from_secs(60))?;
    if !status.success() {
        bail!("`{what}` ended with {status}: {}", tail(&mut log));
    }
    Ok(Thawed {
        answer_s,
        answer,
        done_s,
        rss_kib,
    })
}

/// `pf goblin fork --eager|--lazy DIGEST -n 8 --send sum --json`: seconds until all copies answered
/// and exited, and pf's peak RSS; every copy's answer is checked.
fn pf_fork(
    env: &Env,
    store: &Path,
    digest: &str,
    expected: &str,
    how: Thaw,
) -> anyhow::Result<(f64, u64)> {
    let n = FORK_CLONES.to_string();
    crate::bench_store::sync(store)?;
    let args = [
        "goblin",
        "fork",
        how.flag(),
        digest,
        "-n",
        &n,
        "--send",
        "sum",
        "--json",
    ];
    let (secs, stdout, rss) = run_pf(env, store, &args)?;
    let copies: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("pf goblin fork --json printed {stdout:?}"))?;
    if copies.len() != FORK_CLONES {
        bail!("pf goblin fork printed {} copies: {stdout}", copies.len());
    }
    for copy in &copies {
        let answer = copy["stdout"].as_str().unwrap_or_default().trim();
        check_answer(&format!("`pf {}`", args.join(" ")), answer, expected)?;
    }
    Ok((secs, rss))
}

fn summarize(size: &SizeResult) -> crate::bench_report::SizeSummary {
    let m = |f: fn(&Run) -> f64| median(size.runs.iter().map(f).collect());
    let max = |f: fn(&Run) -> u64| {
        size.runs
            .iter()
            .chain(&size.warm_up)
            .map(f)
            .max()
            .unwrap_or(0)
    };
    crate::bench_report::SizeSummary {
        mib: size.mib,
        runs: size.runs.len(),
        raw_dump_s: m(|r| r.raw_dump_s),
        pf_freeze_s: m(|r| r.pf_freeze_s),
        raw_pause_ms: m(|r| r.raw_pause_us as f64 / 1e3),
        pf_pause_ms: m(|r| r.pf_pause_us as f64 / 1e3),
        raw_restore_s: m(|r| r.raw_restore_s),
        pf_thaw_s: m(|r| r.pf_thaw_s),
        fork_s: m(|r| r.fork_s),
        freeze_rss_kib: max(|r| r.freeze_rss_kib),
        thaw_rss_kib: max(|r| r.thaw_rss_kib),
        fork_rss_kib: max(|r| r.fork_rss_kib),
        images_bytes: size.images_bytes,
        store_one_bytes: size.store_one_bytes,
        series_bytes: size.series_bytes.clone(),
        v2_freeze_s: m(|r| r.v2_freeze_s),
        v2_pause_ms: m(|r| r.v2_pause_us as f64 / 1e3),
        v2_thaw_s: m(|r| r.v2_thaw_s),
        v2_freeze_rss_kib: max(|r| r.v2_freeze_rss_kib),
        v2_thaw_rss_kib: max(|r| r.v2_thaw_rss_kib),
        lazy_first_s: m(|r| r.lazy_first_s),
        lazy_second_s: m(|r| r.lazy_second_s),
        lazy_hint_bytes: max(|r| r.lazy_hint_bytes),
        lazy_done_s: m(|r| r.lazy_done_s),
        lazy_done_rss_kib: max(|r| r.lazy_done_rss_kib),
        lazy_fork_s: m(|r| r.lazy_fork_s),
        lazy_fork_rss_kib: max(|r| r.lazy_fork_rss_kib),
        refreeze_s: median(size.refreeze_s.clone()),
        v2_refreeze_s: median(size.v2_refreeze_s.clone()),
        v2_refreeze_rss_kib: size.v2_refreeze_rss_kib,
        v2_thawed_refreeze_s: median(size.v2_thawed_refreeze_s.clone()),
        v2_last_thaw_s: size.v2_last_thaw_s,
        v2_store_one_bytes: size.v2_store_one_bytes,
        v2_series_bytes: size.v2_series_bytes.clone(),
        transfer: size.transfer,
        v2_sent: size.v2_sent.clone(),
        samples: size
            .runs
            .iter()
            .map(|r| {
                json!({
                    "raw_dump_s": r.raw_dump_s,
                    "pf_freeze_s": r.pf_freeze_s,
                    "raw_pause_us": r.raw_pause_us,
                    "pf_pause_us": r.pf_pause_us,
                    "raw_restore_s": r.raw_restore_s,
                    "pf_thaw_s": r.pf_thaw_s,
                    "fork_s": r.fork_s,
                    "freeze_rss_kib": r.freeze_rss_kib,
                    "thaw_rss_kib": r.thaw_rss_kib,
                    "fork_rss_kib": r.fork_rss_kib,
                    "v2_freeze_s": r.v2_freeze_s,
                    "v2_pause_us": r.v2_pause_us,
                    "v2_thaw_s": r.v2_thaw_s,
                    "v2_freeze_rss_kib": r.v2_freeze_rss_kib,
                    "v2_thaw_rss_kib": r.v2_thaw_rss_kib,
                    "lazy_first_s": r.lazy_first_s,
                    "lazy_second_s": r.lazy_second_s,
                    "lazy_hint_bytes": r.lazy_hint_bytes,
                    "lazy_done_s": r.lazy_done_s,
                    "lazy_done_rss_kib": r.lazy_done_rss_kib,
                    "lazy_fork_s": r.lazy_fork_s,
                    "lazy_fork_rss_kib": r.lazy_fork_rss_kib,
                })
            })
            .collect(),
    }
}

/// The median (the upper one of an even count); NaN for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Progress and notes go to stderr; stdout carries the results.
#[allow(clippy::print_stderr)]
pub(crate) fn progress(line: &str) {
    eprintln!("bench: {line}");
}

#[allow(clippy::print_stdout)]
fn say(text: &str) {
    println!("{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_default_and_quick() {
        let o = parse_args(&[]).expect("defaults");
        assert_eq!(
            (o.quick, o.json, o.runs, o.store),
            (false, false, None, true)
        );
        assert!(o.full);
        assert_eq!(o.sizes, vec![64, 256, 1024]);
        assert_eq!(
            o.sizes.iter().map(|&m| o.runs_at(m)).collect::<Vec<_>>(),
            vec![7, 5, 3]
        );
        let o = parse_args(&args(&["--quick", "--json"])).expect("quick");
        assert_eq!((o.quick, o.json, o.runs), (true, true, Some(1)));
        assert_eq!(o.runs_at(64), 1);
        assert_eq!(o.sizes, vec![64]);
        let o = parse_args(&args(&["--sizes", "8, 16", "--runs", "5", "--no-store"]))
            .expect("explicit");
        assert_eq!(
            (o.sizes, o.runs, o.store, o.full),
            (vec![8, 16], Some(5), false, false)
        );
        let o = parse_args(&args(&["--runs", "1"])).expect("one run");
        assert!(!o.full, "one run a size is not the benchmark");
        assert!(parse_args(&args(&["--runs", "0"])).is_err());
        assert!(parse_args(&args(&["--sizes", "3"])).is_err());
        assert!(parse_args(&args(&["--sizes", "x"])).is_err());
        assert!(parse_args(&args(&["--runs"])).is_err());
        assert!(parse_args(&args(&["--fast"])).is_err());
    }

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
        assert!(median(Vec::new()).is_nan());
    }
}
