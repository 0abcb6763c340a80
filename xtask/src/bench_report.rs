//! How `cargo xtask bench` reports: the machine it ran on, a markdown table with the targets,
//! JSON for programs, and `docs/benchmarks.md`, whose generated part sits between two markers so
//! that the analysis written around it survives the next run.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::bench::{
    DEEPEST, FORK_CLONES, FORK_TARGET_MIB, FORK_TARGET_SECS, FREEZE_TARGET, LAZY_DONE_TARGET,
    LAZY_FORK_RSS_TARGET_MIB, LAZY_FORK_TARGETS, LAZY_THAW_TARGET_MIB, LAZY_THAW_TARGET_SECS,
    PAUSE_TARGET, SENT_TARGET, SERIES, THAW_TARGET, V2_FREEZE_TARGET, V2_REFREEZE_TARGET,
    V2_RSS_TARGET_MIB, V2_SERIES_TARGET, V2_THAW_TARGET,
};
use crate::bench_registry::{Sent, Transfer};
use crate::process::{self, Out};

/// The generated part of docs/benchmarks.md starts after this line …
pub(crate) const BEGIN: &str = "<!-- cargo xtask bench: generated from here -->";
/// … and ends before this one.
pub(crate) const END: &str = "<!-- cargo xtask bench: generated up to here -->";

/// The medians for one goblin size.
#[derive(Debug)]
pub(crate) struct SizeSummary {
    pub(crate) mib: u64,
    /// Runs the medians are of.
    pub(crate) runs: usize,
    pub(crate) raw_dump_s: f64,
    pub(crate) pf_freeze_s: f64,
    pub(crate) raw_pause_ms: f64,
    pub(crate) pf_pause_ms: f64,
    pub(crate) raw_restore_s: f64,
    pub(crate) pf_thaw_s: f64,
    pub(crate) fork_s: f64,
    pub(crate) freeze_rss_kib: u64,
    pub(crate) thaw_rss_kib: u64,
    pub(crate) fork_rss_kib: u64,
    pub(crate) images_bytes: u64,
    pub(crate) store_one_bytes: u64,
    pub(crate) series_bytes: Vec<u64>,
    pub(crate) v2_freeze_s: f64,
    /// CRIU's frozen time in the v2 freeze (pf hashes pages beside the dump).
    pub(crate) v2_pause_ms: f64,
    pub(crate) v2_thaw_s: f64,
    pub(crate) v2_freeze_rss_kib: u64,
    pub(crate) v2_thaw_rss_kib: u64,
    /// Lazy thaws of the v2 snapshot (issue 12): to the first answer without and with the hint,
    /// until every page is in, and `fork --lazy -n 8`; peak RSS of the last two.
    pub(crate) lazy_first_s: f64,
    pub(crate) lazy_second_s: f64,
    pub(crate) lazy_hint_bytes: u64,
    pub(crate) lazy_done_s: f64,
    pub(crate) lazy_done_rss_kib: u64,
    pub(crate) lazy_fork_s: f64,
    pub(crate) lazy_fork_rss_kib: u64,
    /// Medians of the series' freezes after the first.
    pub(crate) refreeze_s: f64,
    pub(crate) v2_refreeze_s: f64,
    /// pf's peak RSS over the v2 re-freezes (KiB).
    pub(crate) v2_refreeze_rss_kib: u64,
    /// Median freeze of a copy thawed from the series' last snapshot after 5% changed.
    pub(crate) v2_thawed_refreeze_s: f64,
    /// The snapshot of the v2 series whose page list is the deepest delta: seconds to the first
    /// answer, eager and lazy.
    pub(crate) v2_last_thaw_s: Option<(f64, f64)>,
    pub(crate) v2_store_one_bytes: u64,
    pub(crate) v2_series_bytes: Vec<u64>,
    pub(crate) transfer: Option<Transfer>,
    pub(crate) v2_sent: Vec<Sent>,
    /// Every run's figures, for the JSON.
    pub(crate) samples: Vec<Value>,
}

/// One line of the store comparison: a pf command against its zstd baseline.
#[derive(Debug)]
pub(crate) struct StoreRow {
    pub(crate) what: String,
    pub(crate) pf_s: f64,
    pub(crate) baseline: String,
    pub(crate) baseline_s: f64,
    /// pf may take at most this times the baseline.
    pub(crate) target: f64,
    pub(crate) rss_kib: u64,
}

/// `bench store`'s figures.
#[derive(Debug)]
pub(crate) struct StoreSummary {
    pub(crate) size_mib: u64,
    pub(crate) runs: usize,
    pub(crate) pf_bytes: u64,
    pub(crate) zstd_bytes: u64,
    pub(crate) rows: Vec<StoreRow>,
}

/// Where the bench ran.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    pub(crate) os: String,
    pub(crate) kernel: String,
    pub(crate) criu: String,
    pub(crate) store_fs: String,
    pub(crate) tmpfs_fs: String,
    pub(crate) commit: String,
}

/// A whole bench run.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) quick: bool,
    pub(crate) profile: &'static str,
    pub(crate) machine: Machine,
    pub(crate) sizes: Vec<SizeSummary>,
    pub(crate) store: Option<StoreSummary>,
    pub(crate) took: Duration,
}

/// How many runs the medians are of, for `(MiB, runs)` per size: "3 runs", or per size when
/// they differ, "7, 5 and 3 runs (64, 256 and 1024 MiB)".
fn runs_text(sizes: &[(u64, usize)]) -> String {
    let and = |items: Vec<String>| match items.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, init)) => format!("{} and {last}", init.join(", ")),
        None => String::new(),
    };
    match sizes {
        [] => "no runs".to_owned(),
        [(_, first), rest @ ..] if rest.iter().all(|(_, n)| n == first) => {
            format!("{first} run{}", if *first == 1 { "" } else { "s" })
        }
        _ => format!(
            "{} runs ({} MiB)",
            and(sizes.iter().map(|(_, n)| n.to_string()).collect()),
            and(sizes.iter().map(|(mib, _)| mib.to_string()).collect())
        ),
    }
}

/// Describe this machine; what cannot be read says "unknown".
pub(crate) fn machine(criu: &Path, store_parent: &Path, tmpfs: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or_else(|| "unknown".to_owned(), |v| v.trim_matches('"').to_owned());
    let mounts = read("/proc/self/mounts");
    let criu_version = output(criu, &["--version"])
        .and_then(|t| pf_world_procs::criu::parse_version(&t))
        .map(|v| v.to_string())
        .unwrap_or_else(|| "unknown".to_owned());
    let commit = output(Path::new("git"), &["rev-parse", "--short", "HEAD"])
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned());
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        memory_gib,
        os,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        criu: criu_version,
        store_fs: fs_type(&mounts, store_parent),
        tmpfs_fs: fs_type(&mounts, tmpfs),
        commit,
    }
}

/// A command's stdout, if it ran and exited 0.
fn output(program: &Path, args: &[&str]) -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = process::command(program, dir, Out::Pipe, Out::Null);
    cmd.args(args);
    let out = process::output(&mut cmd).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The file system type of the mount that holds `path`, from `/proc/self/mounts` text: the
/// longest mount point that is a prefix of it (`ext4 (/dev/vda on /)`).
fn fs_type(mounts: &str, path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, at, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at).then_some((at, dev, kind))
        })
        .max_by_key(|(at, _, _)| at.len())
        .map_or_else(
            || "unknown".to_owned(),
            |(at, dev, kind)| format!("{kind} ({dev} on {at})"),
        )
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn v2_json(s: &SizeSummary) -> Value {
    json!({
        "freeze_s": s.v2_freeze_s,
        "freeze_ratio": s.v2_freeze_s / s.raw_dump_s,
        "pause_ms": s.v2_pause_ms,
        "pause_ratio": s.v2_pause_ms / s.raw_pause_ms,
        "refreeze_s": s.v2_refreeze_s,
        "refreeze_ratio": s.v2_refreeze_s / s.raw_dump_s,
        "thawed_refreeze_s": s.v2_thawed_refreeze_s,
        "thawed_refreeze_ratio": s.v2_thawed_refreeze_s / s.raw_dump_s,
        "thaw_s": s.v2_thaw_s,
        "thaw_ratio": s.v2_thaw_s / s.raw_restore_s,
        "store_one_bytes": s.v2_store_one_bytes,
        "series_bytes": s.v2_series_bytes,
        "freeze_rss_kib": s.v2_freeze_rss_kib,
        "thaw_rss_kib": s.v2_thaw_rss_kib,
        "refreeze_rss_kib": s.v2_refreeze_rss_kib,
        "deepest_delta_thaw_s": s.v2_last_thaw_s.map(|(eager, lazy)| json!({"eager": eager, "lazy": lazy})),
    })
}

fn lazy_json(s: &SizeSummary) -> Value {
    json!({
        "thaw_first_s": s.lazy_first_s,
        "thaw_second_s": s.lazy_second_s,
        "hint_bytes": s.lazy_hint_bytes,
        "done_s": s.lazy_done_s,
        "done_ratio": s.lazy_done_s / s.v2_thaw_s,
        "done_rss_kib": s.lazy_done_rss_kib,
        "fork_s": s.lazy_fork_s,
        "fork_rss_kib": s.lazy_fork_rss_kib,
    })
}

/// The seconds `pf goblin fork --lazy -n 8` may take at a goblin of `mib` MiB, if set.
fn lazy_fork_target(mib: u64) -> Option<f64> {
    LAZY_FORK_TARGETS
        .iter()
        .find(|(at, _)| *at == mib)
        .map(|(_, secs)| *secs)
}

/// `0.084 met` where `mib` is the size the target is set for, else just the seconds.
fn secs_cell(secs: f64, mib: u64, target: Option<(u64, f64)>) -> String {
    match target {
        Some((at, limit)) if at == mib => format!("{secs:.3} {}", verdict(secs <= limit)),
        _ => format!("{secs:.3}"),
    }
}

fn registry_json(s: &SizeSummary) -> Value {
    let Some(t) = s.transfer else {
        return Value::Null;
    };
    let sent: Vec<Value> = s
        .v2_sent
        .iter()
        .map(|x| {
            json!({
                "bytes": x.bytes, "new_packs_stored": x.new_packs_stored,
                "pages": x.pages, "by_role": x.by_role,
            })
        })
        .collect();
    json!({
        "bytes": t.bytes, "blobs": t.blobs, "push_s": t.push_s,
        "curl_put_s": t.curl_put_s, "pull_s": t.pull_s, "curl_get_s": t.curl_get_s,
        "push_rss_kib": t.push_rss_kib, "pull_rss_kib": t.pull_rss_kib,
        "series_sent": sent,
    })
}

/// The store after the last snapshot of a series against the store after its first.
fn series_ratio(series: &[u64]) -> f64 {
    series.last().copied().unwrap_or(0) as f64 / series.first().copied().unwrap_or(0) as f64
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `1.12× met` or `2.20× **missed**`.
fn ratio_cell(ours: f64, theirs: f64, target: f64) -> String {
    let ratio = ours / theirs;
    if !ratio.is_finite() {
        return "n/a".to_owned();
    }
    format!("{ratio:.2}× {}", verdict(ratio <= target))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

impl Report {
    /// The tables and the machine, as markdown.
    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let line = |md: &mut String, s: &str| {
            md.push_str(s);
            md.push('\n');
        };
        if self.quick {
            line(
                &mut md,
                &format!(
                    "**--quick: one run, {} build of pf. These figures prove the harness \
                     works; they are not the benchmark.**\n",
                    self.profile
                ),
            );
        }
        if !self.sizes.is_empty() {
            line(
                &mut md,
                &format!(
                    "### Goblins: pf against raw CRIU (median of {}{}, {} build)\n",
                    runs_text(
                        &self
                            .sizes
                            .iter()
                            .map(|s| (s.mib, s.runs))
                            .collect::<Vec<_>>()
                    ),
                    if self.quick {
                        ""
                    } else {
                        " after a run to warm up"
                    },
                    self.profile
                ),
            );
            let mut header = "| |".to_owned();
            let mut rule = "|---|".to_owned();
            for s in &self.sizes {
                header.push_str(&format!(" {} MiB |", s.mib));
                rule.push_str("---:|");
            }
            line(&mut md, &format!("{header} target |"));
            line(&mut md, &format!("{rule}---|"));
            let row =
                |md: &mut String, name: &str, cell: &dyn Fn(&SizeSummary) -> String, t: &str| {
                    let cells: String = self
                        .sizes
                        .iter()
                        .map(|s| format!(" {} |", cell(s)))
                        .collect();
                    line(md, &format!("| {name} |{cells} {t} |"));
                };
            row(
                &mut md,
                "raw `criu dump` to tmpfs (s)",
                &|s| format!("{:.3}", s.raw_dump_s),
                "",
            );
            row(
                &mut md,
                "`pf goblin freeze` to the digest in the store (s)",
                &|s| format!("{:.3}", s.pf_freeze_s),
                "",
            );
            row(
                &mut md,
                "freeze: pf / raw",
                &|s| ratio_cell(s.pf_freeze_s, s.raw_dump_s, FREEZE_TARGET),
                &format!("≤ {FREEZE_TARGET}×"),
            );
            row(
                &mut md,
                "pause, raw criu (ms, CRIU's frozen time)",
                &|s| format!("{:.1}", s.raw_pause_ms),
                "",
            );
            row(
                &mut md,
                "pause, pf (ms, CRIU's frozen time)",
                &|s| format!("{:.1}", s.pf_pause_ms),
                "",
            );
            row(
                &mut md,
                "pause: pf / raw",
                &|s| ratio_cell(s.pf_pause_ms, s.raw_pause_ms, PAUSE_TARGET),
                &format!("≤ {PAUSE_TARGET}×"),
            );
            row(
                &mut md,
                "raw `criu restore` from tmpfs to the first answer (s)",
                &|s| format!("{:.3}", s.raw_restore_s),
                "",
            );
            row(
                &mut md,
                "`pf goblin thaw` from the store to the first answer (s)",
                &|s| format!("{:.3}", s.pf_thaw_s),
                "",
            );
            row(
                &mut md,
                "thaw: pf / raw",
                &|s| ratio_cell(s.pf_thaw_s, s.raw_restore_s, THAW_TARGET),
                &format!("≤ {THAW_TARGET}×"),
            );
            row(
                &mut md,
                &format!("`pf goblin fork -n {FORK_CLONES}`, until all answered (s)"),
                &|s| {
                    if s.mib == FORK_TARGET_MIB {
                        format!("{:.3} {}", s.fork_s, verdict(s.fork_s <= FORK_TARGET_SECS))
                    } else {
                        format!("{:.3}", s.fork_s)
                    }
                },
                &format!("≤ {FORK_TARGET_SECS} s at {FORK_TARGET_MIB} MiB"),
            );
            row(
                &mut md,
                "raw images on tmpfs (MiB)",
                &|s| format!("{:.1}", mib(s.images_bytes)),
                "",
            );
            row(
                &mut md,
                "store, one snapshot (MiB)",
                &|s| format!("{:.1}", mib(s.store_one_bytes)),
                "",
            );
            row(
                &mut md,
                &format!("store, {SERIES} snapshots, 5% of pages rewritten between (MiB)"),
                &|s| format!("{:.1}", mib(s.series_bytes.last().copied().unwrap_or(0))),
                "",
            );
            row(
                &mut md,
                &format!("store, {SERIES} snapshots / the first of them"),
                &|s| format!("{:.2}×", series_ratio(&s.series_bytes)),
                "",
            );
            row(
                &mut md,
                "re-freeze after 5% of pages changed (s)",
                &|s| format!("{:.3}", s.refreeze_s),
                "",
            );
            row(
                &mut md,
                "v2: `pf goblin freeze`, fresh store (s)",
                &|s| format!("{:.3}", s.v2_freeze_s),
                "",
            );
            row(
                &mut md,
                "v2 freeze: pf / raw",
                &|s| ratio_cell(s.v2_freeze_s, s.raw_dump_s, V2_FREEZE_TARGET),
                &format!("≤ {V2_FREEZE_TARGET}×"),
            );
            row(
                &mut md,
                "v2: pause, pf (ms, CRIU's frozen time)",
                &|s| format!("{:.1}", s.v2_pause_ms),
                "",
            );
            row(
                &mut md,
                "v2 pause: pf / raw",
                &|s| ratio_cell(s.v2_pause_ms, s.raw_pause_ms, PAUSE_TARGET),
                &format!("≤ {PAUSE_TARGET}×"),
            );
            row(
                &mut md,
                "v2: re-freeze after 5% of pages changed (s)",
                &|s| format!("{:.3}", s.v2_refreeze_s),
                "",
            );
            row(
                &mut md,
                "v2 re-freeze: pf / raw dump",
                &|s| ratio_cell(s.v2_refreeze_s, s.raw_dump_s, V2_REFREEZE_TARGET),
                &format!("≤ {V2_REFREEZE_TARGET}×"),
            );
            row(
                &mut md,
                "v2: re-freeze of a thawed copy after 5% of its pages changed (s)",
                &|s| format!("{:.3}", s.v2_thawed_refreeze_s),
                "",
            );
            row(
                &mut md,
                "v2 re-freeze of a thawed copy: pf / raw dump",
                &|s| ratio_cell(s.v2_thawed_refreeze_s, s.raw_dump_s, V2_REFREEZE_TARGET),
                &format!("≤ {V2_REFREEZE_TARGET}×"),
            );
            row(
                &mut md,
                "v2: `pf goblin thaw --eager` to the first answer (s)",
                &|s| format!("{:.3}", s.v2_thaw_s),
                "",
            );
            row(
                &mut md,
                "v2 thaw: pf / raw",
                &|s| ratio_cell(s.v2_thaw_s, s.raw_restore_s, V2_THAW_TARGET),
                &format!("≤ {V2_THAW_TARGET}×"),
            );
            row(
                &mut md,
                &format!(
                    "v2: snapshot {} of the series (its page list a delta {} deep), thaw \
                     --eager / --lazy to the first answer (s)",
                    DEEPEST + 1,
                    pf_core::pages::MAX_DELTA_DEPTH
                ),
                &|s| match s.v2_last_thaw_s {
                    Some((eager, lazy)) => format!("{eager:.3} / {lazy:.3}"),
                    None => "–".to_owned(),
                },
                "",
            );
            row(
                &mut md,
                "v2: store, one snapshot (MiB)",
                &|s| format!("{:.1}", mib(s.v2_store_one_bytes)),
                "",
            );
            row(
                &mut md,
                &format!("v2: store, {SERIES} snapshots, 5% of pages rewritten between (MiB)"),
                &|s| format!("{:.1}", mib(s.v2_series_bytes.last().copied().unwrap_or(0))),
                "",
            );
            row(
                &mut md,
                &format!("v2: store, {SERIES} snapshots / the first of them"),
                &|s| {
                    let r = series_ratio(&s.v2_series_bytes);
                    format!("{r:.2}× {}", verdict(r <= V2_SERIES_TARGET))
                },
                &format!("≤ {V2_SERIES_TARGET}×"),
            );
            row(
                &mut md,
                "v2: pf peak RSS, freeze / re-freeze / thaw (MiB)",
                &|s| {
                    let all = [
                        s.v2_freeze_rss_kib,
                        s.v2_refreeze_rss_kib,
                        s.v2_thaw_rss_kib,
                    ];
                    let worst = all.iter().copied().max().unwrap_or(0);
                    format!(
                        "{:.0} / {:.0} / {:.0} {}",
                        kib_to_mib(s.v2_freeze_rss_kib),
                        kib_to_mib(s.v2_refreeze_rss_kib),
                        kib_to_mib(s.v2_thaw_rss_kib),
                        verdict(kib_to_mib(worst) < V2_RSS_TARGET_MIB)
                    )
                },
                &format!("< {V2_RSS_TARGET_MIB}"),
            );
            row(
                &mut md,
                "lazy: `pf goblin thaw --lazy` to the first answer, first time (s)",
                &|s| format!("{:.3}", s.lazy_first_s),
                "",
            );
            row(
                &mut md,
                "lazy: the same again, with the first one's hint (s)",
                &|s| {
                    secs_cell(
                        s.lazy_second_s,
                        s.mib,
                        Some((LAZY_THAW_TARGET_MIB, LAZY_THAW_TARGET_SECS)),
                    )
                },
                &format!("≤ {LAZY_THAW_TARGET_SECS} s at {LAZY_THAW_TARGET_MIB} MiB"),
            );
            row(
                &mut md,
                "lazy: `pf goblin thaw --lazy` until every page is in (s)",
                &|s| format!("{:.3}", s.lazy_done_s),
                "",
            );
            row(
                &mut md,
                "lazy until every page is in / v2 thaw",
                &|s| ratio_cell(s.lazy_done_s, s.v2_thaw_s, LAZY_DONE_TARGET),
                &format!("≤ {LAZY_DONE_TARGET}×"),
            );
            row(
                &mut md,
                &format!("lazy: `pf goblin fork --lazy -n {FORK_CLONES}`, until all answered (s)"),
                &|s| {
                    let target = lazy_fork_target(s.mib).map(|secs| (s.mib, secs));
                    secs_cell(s.lazy_fork_s, s.mib, target)
                },
                &LAZY_FORK_TARGETS
                    .iter()
                    .map(|(mib, secs)| format!("≤ {secs} s at {mib} MiB"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            row(
                &mut md,
                &format!(
                    "lazy: pf peak RSS, thaw until every page is in / fork of {FORK_CLONES} (MiB)"
                ),
                &|s| {
                    let fork = kib_to_mib(s.lazy_fork_rss_kib);
                    format!(
                        "{:.0} / {fork:.0} {}",
                        kib_to_mib(s.lazy_done_rss_kib),
                        verdict(fork < LAZY_FORK_RSS_TARGET_MIB)
                    )
                },
                &format!("fork < {LAZY_FORK_RSS_TARGET_MIB}"),
            );
            row(
                &mut md,
                "pf peak RSS: freeze / thaw / fork (MiB)",
                &|s| {
                    format!(
                        "{:.0} / {:.0} / {:.0}",
                        kib_to_mib(s.freeze_rss_kib),
                        kib_to_mib(s.thaw_rss_kib),
                        kib_to_mib(s.fork_rss_kib)
                    )
                },
                "",
            );
            line(&mut md, "");
        }
        if self.sizes.iter().any(|s| s.transfer.is_some()) {
            self.registry_markdown(&mut md);
        }
        if let Some(store) = &self.store {
            line(
                &mut md,
                &format!(
                    "### Store: `pf store put`/`cat` against zstd ({} MiB, half random, half \
                     text; median of {} run{})\n",
                    store.size_mib,
                    store.runs,
                    if store.runs == 1 { "" } else { "s" }
                ),
            );
            line(
                &mut md,
                "| pf | s | baseline | s | pf / baseline | target | pf peak RSS (MiB) |",
            );
            line(&mut md, "|---|---:|---|---:|---:|---|---:|");
            for r in &store.rows {
                line(
                    &mut md,
                    &format!(
                        "| `pf store {}` | {:.2} | `{}` | {:.2} | {} | ≤ {}× | {:.1} {} |",
                        r.what,
                        r.pf_s,
                        r.baseline,
                        r.baseline_s,
                        ratio_cell(r.pf_s, r.baseline_s, r.target),
                        r.target,
                        kib_to_mib(r.rss_kib),
                        verdict(kib_to_mib(r.rss_kib) < 64.0)
                    ),
                );
            }
            line(
                &mut md,
                &format!(
                    "\nStored: {:.1} MiB by pf, {:.1} MiB by `zstd -1`. Peak RSS target: < 64 MiB.\n",
                    mib(store.pf_bytes),
                    mib(store.zstd_bytes)
                ),
            );
        }
        let m = &self.machine;
        line(&mut md, "### Machine\n");
        line(
            &mut md,
            &format!(
                "- CPU: {}, {} cores; memory {:.1} GiB\n- {}, kernel {}, criu {}\n- store on \
                 {}; raw images and pf's scratch on {}\n- pf at commit {}; the bench took {:.0} s",
                m.cpu,
                m.cores,
                m.memory_gib,
                m.os,
                m.kernel,
                m.criu,
                m.store_fs,
                m.tmpfs_fs,
                m.commit,
                self.took.as_secs_f64()
            ),
        );
        md
    }

    /// The registry table: push and pull beside curl, and what the series' pushes sent.
    fn registry_markdown(&self, md: &mut String) {
        let sizes: Vec<&SizeSummary> = self.sizes.iter().filter(|s| s.transfer.is_some()).collect();
        md.push_str(
            "### Registry: `pf push` / `pf pull` through a local registry (Debian's \
             docker-registry on loopback, storage on the store's disk), beside `curl` moving the \
             same bytes as one blob\n\n",
        );
        let mut header = "| |".to_owned();
        let mut rule = "|---|".to_owned();
        for s in &sizes {
            header.push_str(&format!(" {} MiB |", s.mib));
            rule.push_str("---:|");
        }
        md.push_str(&format!("{header} target |\n{rule}---|\n"));
        let row = |md: &mut String, name: &str, cell: &dyn Fn(&SizeSummary) -> String, t: &str| {
            let cells: String = sizes.iter().map(|s| format!(" {} |", cell(s))).collect();
            md.push_str(&format!("| {name} |{cells} {t} |\n"));
        };
        let t = |s: &SizeSummary| s.transfer.expect("filtered");
        let rate = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
        row(
            md,
            "the v1 snapshot: raw MiB (blobs)",
            &|s| format!("{:.1} ({})", mib(t(s).bytes), t(s).blobs),
            "",
        );
        row(
            md,
            "`pf push` to an empty repository (s, MB/s)",
            &|s| format!("{:.3}, {:.0}", t(s).push_s, rate(t(s).bytes, t(s).push_s)),
            "",
        );
        row(
            md,
            "`curl -T`, the same bytes in one PUT (s, MB/s)",
            &|s| {
                format!(
                    "{:.3}, {:.0}",
                    t(s).curl_put_s,
                    rate(t(s).bytes, t(s).curl_put_s)
                )
            },
            "",
        );
        row(
            md,
            "push: pf / curl",
            &|s| format!("{:.2}×", t(s).push_s / t(s).curl_put_s),
            "",
        );
        row(
            md,
            "`pf pull` into an empty store (s, MB/s)",
            &|s| format!("{:.3}, {:.0}", t(s).pull_s, rate(t(s).bytes, t(s).pull_s)),
            "",
        );
        row(
            md,
            "`curl` GET of that one blob (s, MB/s)",
            &|s| {
                format!(
                    "{:.3}, {:.0}",
                    t(s).curl_get_s,
                    rate(t(s).bytes, t(s).curl_get_s)
                )
            },
            "",
        );
        row(
            md,
            "pull: pf / curl",
            &|s| format!("{:.2}×", t(s).pull_s / t(s).curl_get_s),
            "",
        );
        row(
            md,
            "pf peak RSS: push / pull (MiB)",
            &|s| {
                format!(
                    "{:.0} / {:.0}",
                    kib_to_mib(t(s).push_rss_kib),
                    kib_to_mib(t(s).pull_rss_kib)
                )
            },
            "",
        );
        let last = |s: &SizeSummary| s.v2_sent.last().cloned().unwrap_or_default();
        row(
            md,
            &format!("v2 snapshot {SERIES} of the series: bytes `pf push` sent (MiB)"),
            &|s| format!("{:.2}", mib(last(s).bytes)),
            "",
        );
        row(
            md,
            &format!("v2 snapshot {SERIES}: its new packs as stored (MiB)"),
            &|s| format!("{:.2}", mib(last(s).new_packs_stored)),
            "",
        );
        row(
            md,
            "sent / new packs stored",
            &|s| {
                let l = last(s);
                ratio_cell(l.bytes as f64, l.new_packs_stored as f64, SENT_TARGET)
            },
            &format!("≤ {SENT_TARGET}×"),
        );
        row(
            md,
            "where the sent bytes go (raw MiB)",
            &|s| {
                last(s)
                    .by_role
                    .iter()
                    .map(|(k, v)| format!("{k} {:.2}", mib(*v)))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
            "",
        );
        md.push('\n');
    }

    /// The same as JSON (`pf.bench.v2`: v1 had one run count for every size, at the top).
    pub(crate) fn json(&self) -> Value {
        let m = &self.machine;
        json!({
            "kind": "pf.bench.v2",
            "quick": self.quick,
            "profile": self.profile,
            "took_s": self.took.as_secs_f64(),
            "machine": {
                "cpu": m.cpu, "cores": m.cores, "memory_gib": m.memory_gib, "os": m.os,
                "kernel": m.kernel, "criu": m.criu, "store_fs": m.store_fs,
                "tmpfs_fs": m.tmpfs_fs, "commit": m.commit,
            },
            "targets": {
                "freeze_ratio": FREEZE_TARGET, "pause_ratio": PAUSE_TARGET,
                "thaw_ratio": THAW_TARGET, "fork_secs": FORK_TARGET_SECS,
                "fork_clones": FORK_CLONES, "fork_mib": FORK_TARGET_MIB,
                "lazy_thaw_secs": LAZY_THAW_TARGET_SECS, "lazy_thaw_mib": LAZY_THAW_TARGET_MIB,
                "lazy_done_ratio": LAZY_DONE_TARGET,
                "lazy_fork_secs": LAZY_FORK_TARGETS
                    .iter()
                    .map(|(mib, secs)| json!({"mib": mib, "secs": secs}))
                    .collect::<Vec<_>>(),
                "lazy_fork_rss_mib": LAZY_FORK_RSS_TARGET_MIB,
            },
            "sizes": self.sizes.iter().map(|s| json!({
                "mib": s.mib,
                "run_count": s.runs,
                "raw_dump_s": s.raw_dump_s,
                "pf_freeze_s": s.pf_freeze_s,
                "freeze_ratio": s.pf_freeze_s / s.raw_dump_s,
                "raw_pause_ms": s.raw_pause_ms,
                "pf_pause_ms": s.pf_pause_ms,
                "pause_ratio": s.pf_pause_ms / s.raw_pause_ms,
                "raw_restore_s": s.raw_restore_s,
                "pf_thaw_s": s.pf_thaw_s,
                "thaw_ratio": s.pf_thaw_s / s.raw_restore_s,
                "fork_s": s.fork_s,
                "images_bytes": s.images_bytes,
                "store_one_bytes": s.store_one_bytes,
                "series_bytes": s.series_bytes,
                "freeze_rss_kib": s.freeze_rss_kib,
                "thaw_rss_kib": s.thaw_rss_kib,
                "fork_rss_kib": s.fork_rss_kib,
                "refreeze_s": s.refreeze_s,
                "v2": v2_json(s),
                "lazy": lazy_json(s),
                "registry": registry_json(s),
                "runs": s.samples,
            })).collect::<Vec<_>>(),
            "store": self.store.as_ref().map(|st| json!({
                "size_mib": st.size_mib,
                "runs": st.runs,
                "pf_bytes": st.pf_bytes,
                "zstd_bytes": st.zstd_bytes,
                "rows": st.rows.iter().map(|r| json!({
                    "what": r.what, "pf_s": r.pf_s, "baseline": r.baseline,
                    "baseline_s": r.baseline_s, "ratio": r.pf_s / r.baseline_s,
                    "target": r.target, "rss_kib": r.rss_kib,
                })).collect::<Vec<_>>(),
            })),
        })
    }

    /// docs/benchmarks.md: `existing` with the part between the markers replaced by
    /// `generated`, or, without markers, a short page around it.
    pub(crate) fn document(existing: &str, generated: &str) -> String {
        if let (Some(b), Some(e)) = (existing.find(BEGIN), existing.find(END))
            && b < e
        {
            return format!(
                "{}{BEGIN}\n\n{generated}\n{}",
                &existing[..b],
                &existing[e..]
            );
        }
        format!(
            "# Benchmarks\n\n`cargo xtask bench` wrote the figures below; run it again to \
             refresh them.\n\n{BEGIN}\n\n{generated}\n{END}\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mount_of_a_path() {
        let mounts = "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\n\
tmpfs /dev/shm tmpfs rw 0 0\n/dev/vdb /work ext4 rw 0 0\n";
        assert_eq!(
            fs_type(mounts, Path::new("/dev/shm/x")),
            "tmpfs (tmpfs on /dev/shm)"
        );
        assert_eq!(
            fs_type(mounts, Path::new("/work/main/target/bench")),
            "ext4 (/dev/vdb on /work)"
        );
        assert_eq!(fs_type(mounts, Path::new("/usr")), "ext4 (/dev/vda on /)");
        assert_eq!(fs_type("", Path::new("/usr")), "unknown");
    }

    #[test]
    fn says_how_many_runs_each_size_had() {
        assert_eq!(runs_text(&[(64, 1)]), "1 run");
        assert_eq!(runs_text(&[(64, 3), (256, 3)]), "3 runs");
        assert_eq!(
            runs_text(&[(64, 7), (256, 5), (1024, 3)]),
            "7, 5 and 3 runs (64, 256 and 1024 MiB)"
        );
        assert_eq!(runs_text(&[(8, 7), (16, 5)]), "7 and 5 runs (8 and 16 MiB)");
        assert_eq!(runs_text(&[]), "no runs");
    }

    #[test]
    fn ratios_and_verdicts() {
        assert_eq!(ratio_cell(1.2, 1.0, 1.3), "1.20× met");
        assert_eq!(ratio_cell(2.2, 1.0, 1.3), "2.20× **missed**");
        assert_eq!(ratio_cell(1.0, 0.0, 1.3), "n/a");
    }

    #[test]
    fn lazy_targets_apply_at_their_sizes_only() {
        assert_eq!(lazy_fork_target(64), Some(0.3));
        assert_eq!(lazy_fork_target(1024), Some(1.0));
        assert_eq!(lazy_fork_target(256), None);
        let thaw = Some((LAZY_THAW_TARGET_MIB, LAZY_THAW_TARGET_SECS));
        assert_eq!(secs_cell(0.05, 1024, thaw), "0.050 met");
        assert_eq!(secs_cell(0.25, 1024, thaw), "0.250 **missed**");
        assert_eq!(secs_cell(0.25, 64, thaw), "0.250");
        assert_eq!(secs_cell(0.25, 64, None), "0.250");
    }

    #[test]
    fn document_keeps_what_is_around_the_markers() {
        let fresh = Report::document("", "TABLE");
        assert!(fresh.starts_with("# Benchmarks"));
        assert!(fresh.contains(&format!("{BEGIN}\n\nTABLE\n{END}")));
        let edited = format!("# B\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Analysis\nkept\n");
        let again = Report::document(&edited, "NEW");
        assert_eq!(
            again,
            format!("# B\n\nintro\n\n{BEGIN}\n\nNEW\n{END}\n\n## Analysis\nkept\n")
        );
    }
}
