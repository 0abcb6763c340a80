//! `cargo xtask bench store`: `pf store put` and `pf store cat` of a large file against
//! `zstd -1 -T0` and `zstd -d` on the same file, in the same run, with peak memory.
//!
//! Targets (docs: DESIGN.md): put ≤ 1.5× `zstd -1 -T0`, cat ≤ 1.0× `zstd -d` of zstd's own
//! output, peak RSS of put and cat < 64 MiB. The input is half pseudo-random bytes and half
//! repetitive text, made once under `target/bench-store/` and reused. This is a benchmark, not a
//! test: it prints figures and verdicts and exits 0 unless a command fails.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use crate::process::{self, Out};

pub(crate) const USAGE: &str = "\
usage: cargo xtask bench store [--size MIB] [--runs N]

Times `pf store put` against `zstd -1 -T0`, and `pf store cat` against `zstd -d`, on one input
(half random, half text; default 1024 MiB), N times each (default 3), and reports the median,
the ratio and the peak RSS. Needs `zstd` and GNU time (`apt-get install -y zstd time`).";

const TIME: &str = "/usr/bin/time";

#[derive(Debug)]
struct Options {
    size_mib: u64,
    runs: usize,
}

fn parse_args(args: &[String]) -> anyhow::Result<Options> {
    let mut opts = Options {
        size_mib: 1024,
        runs: 3,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--size" => opts.size_mib = value("--size")?.parse().context("--size MIB")?,
            "--runs" => opts.runs = value("--runs")?.parse().context("--runs N")?,
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if opts.size_mib == 0 || opts.runs == 0 {
        bail!("--size and --runs must be positive");
    }
    Ok(opts)
}

/// One timed run: wall seconds and peak RSS in KiB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kib: u64,
}

pub(crate) fn run(root: &Path, args: &[String]) -> anyhow::Result<ExitCode> {
    let opts = parse_args(args)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = process::command(&cargo, root, Out::Inherit, Out::Inherit);
    build.args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "pf-cli",
        "--bin",
        "pf",
    ]);
    process::run(&mut build)?;
    let pf = process::target_dir(root).join("release/pf");
    let (lines, _) = measure(root, &pf, opts.size_mib, opts.runs, &say)?;
    for line in lines {
        say(&line);
    }
    Ok(ExitCode::SUCCESS)
}

/// Measure `pf` (already built) on `size_mib` MiB, `runs` times; progress goes to `say`.
/// Returns the report lines and the figures (for `cargo xtask bench`).
pub(crate) fn measure(
    root: &Path,
    pf: &Path,
    size_mib: u64,
    runs: usize,
    say: &dyn Fn(&str),
) -> anyhow::Result<(Vec<String>, crate::bench_report::StoreSummary)> {
    let opts = Options { size_mib, runs };
    for tool in ["zstd", TIME] {
        let mut probe = process::command(tool, root, Out::Null, Out::Null);
        probe.arg("--version");
        process::run(&mut probe).with_context(|| {
            format!("{tool} is needed for the store benchmark: apt-get install -y zstd time")
        })?;
    }
    let pf = pf.to_owned();

    let dir = process::target_dir(root).join("bench-store");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let input = dir.join(format!("input-{}mib.bin", opts.size_mib));
    make_input(&input, opts.size_mib << 20, say)?;
    let store = dir.join("store");
    let zst = dir.join("input.zst");
    let out = dir.join("out.bin");

    let mut put = Vec::new();
    let mut zstd_c = Vec::new();
    let mut cat_file = Vec::new();
    let mut zstd_d_file = Vec::new();
    let mut cat_null = Vec::new();
    let mut zstd_d_null = Vec::new();
    let mut digest = String::new();
    for run in 1..=opts.runs {
        say(&format!("run {run} of {}", opts.runs));
        remove(&store)?;
        remove(&zst)?;
        sync(root)?;
        let put_argv = argv(
            &pf,
            &[
                "--store".as_ref(),
                store.as_os_str(),
                "store".as_ref(),
                "put".as_ref(),
                input.as_os_str(),
            ],
        );
        let (sample, stdout) = timed(&dir, &put_argv, None)?;
        digest = stdout.trim().to_owned();
        put.push(sample);
        let zstd = argv(
            Path::new("zstd"),
            &[
                "-1".as_ref(),
                "-T0".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                input.as_os_str(),
                "-o".as_ref(),
                zst.as_os_str(),
            ],
        );
        sync(root)?;
        zstd_c.push(timed(&dir, &zstd, None)?.0);

        let cat = argv(
            &pf,
            &[
                "--store".as_ref(),
                store.as_os_str(),
                "store".as_ref(),
                "cat".as_ref(),
                digest.as_ref(),
            ],
        );
        let unzstd = argv(
            Path::new("zstd"),
            &["-d".as_ref(), "-q".as_ref(), "-c".as_ref(), zst.as_os_str()],
        );
        remove(&out)?;
        sync(root)?;
        cat_file.push(timed(&dir, &cat, Some(&out))?.0);
        check_size(&out, opts.size_mib << 20)?;
        remove(&out)?;
        sync(root)?;
        zstd_d_file.push(timed(&dir, &unzstd, Some(&out))?.0);
        remove(&out)?;
        cat_null.push(timed(&dir, &cat, Some(Path::new("/dev/null")))?.0);
        zstd_d_null.push(timed(&dir, &unzstd, Some(Path::new("/dev/null")))?.0);
    }
    remove(&out)?;
    let stored = dir_size(&store.join("blobs"));
    let zst_size = fs::metadata(&zst).map(|m| m.len()).unwrap_or(0);
    // Keep the input for the next run; the outputs are as large and not needed.
    remove(&store)?;
    remove(&zst)?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let report = [
        ("put", &put, "zstd -1 -T0", &zstd_c, 1.5),
        ("cat > file", &cat_file, "zstd -d > file", &zstd_d_file, 1.0),
        (
            "cat > /dev/null",
            &cat_null,
            "zstd -d > /dev/null",
            &zstd_d_null,
            1.0,
        ),
    ];
    let summary = crate::bench_report::StoreSummary {
        size_mib: opts.size_mib,
        runs: opts.runs,
        pf_bytes: stored,
        zstd_bytes: zst_size,
        rows: report
            .iter()
            .map(
                |(name, ours, theirs_name, theirs, target)| crate::bench_report::StoreRow {
                    what: (*name).to_owned(),
                    pf_s: median(ours, |s| s.secs),
                    baseline: (*theirs_name).to_owned(),
                    baseline_s: median(theirs, |s| s.secs),
                    target: *target,
                    rss_kib: ours.iter().map(|s| s.rss_kib).max().unwrap_or(0),
                },
            )
            .collect(),
    };
    let mut lines = vec![format!(
        "input {} MiB (half random, half text), {} runs, medians; {digest}",
        opts.size_mib, opts.runs
    )];
    lines.push(format!(
        "stored {:.1} MiB by pf, {:.1} MiB by zstd",
        stored as f64 / 1048576.0,
        zst_size as f64 / 1048576.0
    ));
    for (name, ours, theirs_name, theirs, target) in report {
        let (a, b) = (median(ours, |s| s.secs), median(theirs, |s| s.secs));
        let rss = ours.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let ratio = a / b;
        lines.push(format!(
            "pf store {name:<16} {a:6.2} s  vs {theirs_name:<20} {b:6.2} s  ratio {ratio:4.2} \
             (target ≤ {target:.1}: {})  peak RSS {:5.1} MiB (target < 64: {})",
            verdict(ratio <= target),
            mib(rss),
            verdict(mib(rss) < 64.0),
        ));
    }
    Ok((lines, summary))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// A command line: the program, then its arguments.
fn argv(program: &Path, args: &[&std::ffi::OsStr]) -> Vec<OsString> {
    std::iter::once(program.as_os_str().to_owned())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect()
}

/// Run the command line `argv` under GNU time in `dir`, stdout to `stdout_to` (or captured), and
/// return the sample and the captured stdout.
fn timed(
    dir: &Path,
    argv: &[OsString],
    stdout_to: Option<&Path>,
) -> anyhow::Result<(Sample, String)> {
    let stats = dir.join("time.txt");
    let out = match stdout_to {
        Some(_) => Out::Null,
        None => Out::Pipe,
    };
    let mut wrapped = process::command(TIME, dir, out, Out::Inherit);
    wrapped.args(["-f", "%e %M", "-o"]).arg(&stats).args(argv);
    if let Some(path) = stdout_to {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        wrapped.stdout(file);
    }
    let stdout = if stdout_to.is_some() {
        process::run(&mut wrapped)?;
        String::new()
    } else {
        // stderr is inherited, so only stdout is piped: no deadlock.
        let output = wrapped
            .output()
            .with_context(|| format!("cannot start `{}`", process::display(&wrapped)))?;
        if !output.status.success() {
            bail!(
                "`{}` failed ({})",
                process::display(&wrapped),
                output.status
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let text =
        fs::read_to_string(&stats).with_context(|| format!("cannot read {}", stats.display()))?;
    Ok((parse_time(&text)?, stdout))
}

/// GNU time's `%e %M` line (the last line: earlier ones may be notes such as the exit status).
fn parse_time(text: &str) -> anyhow::Result<Sample> {
    let line = text.lines().last().context("GNU time wrote nothing")?;
    let mut parts = line.split_whitespace();
    let secs = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no seconds in GNU time's {line:?}"))?;
    let rss_kib = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no peak RSS in GNU time's {line:?}"))?;
    Ok(Sample { secs, rss_kib })
}

fn median(samples: &[Sample], key: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(key).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Half pseudo-random bytes, then half text that zstd compresses about 3:1.
fn make_input(path: &Path, len: u64, say: &dyn Fn(&str)) -> anyhow::Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == len) {
        return Ok(());
    }
    say(&format!("making {} ({} MiB)", path.display(), len >> 20));
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut block = vec![0u8; 1 << 20];
    let half = len / 2;
    let mut written = 0u64;
    while written < half {
        for word in block.chunks_exact_mut(8) {
            word.copy_from_slice(&next().to_le_bytes());
        }
        let n = (half - written).min(block.len() as u64) as usize;
        w.write_all(&block[..n])?;
        written += n as u64;
    }
    let words: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let len = 2 + (next() % 8) as usize;
            (0..len).map(|_| b'a' + (next() % 26) as u8).collect()
        })
        .collect();
    let mut text = Vec::with_capacity((1 << 20) + 16);
    while text.len() < 1 << 20 {
        text.extend_from_slice(&words[(next() % 4096) as usize]);
        text.push(b' ');
    }
    text.truncate(1 << 20);
    let mut index = 0u64;
    while written < len {
        text[..8].copy_from_slice(&index.to_le_bytes());
        index += 1;
        let n = (len - written).min(text.len() as u64) as usize;
        w.write_all(&text[..n])?;
        written += n as u64;
    }
    w.flush()?;
    Ok(())
}

fn check_size(path: &Path, want: u64) -> anyhow::Result<()> {
    let got = fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    if got != want {
        bail!("{} has {got} bytes, expected {want}", path.display());
    }
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path: PathBuf = e.path();
            if path.is_dir() {
                dir_size(&path)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Write dirty pages back, so one run's writeback does not slow the next.
pub(crate) fn sync(root: &Path) -> anyhow::Result<()> {
    process::run(&mut process::command("sync", root, Out::Null, Out::Inherit))
}

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_output_and_args_parse() {
        let s = parse_time("Command exited with non-zero status 1\n1.25 30720\n").unwrap();
        assert_eq!(s.secs, 1.25);
        assert_eq!(s.rss_kib, 30720);
        assert!(parse_time("").is_err());
        assert!(parse_time("x y").is_err());
        let o = parse_args(&["--size".into(), "64".into(), "--runs".into(), "1".into()]).unwrap();
        assert_eq!((o.size_mib, o.runs), (64, 1));
        assert!(parse_args(&["--size".into()]).is_err());
        assert!(parse_args(&["--runs".into(), "0".into()]).is_err());
        assert!(parse_args(&["--what".into()]).is_err());
        let m = median(
            &[
                Sample {
                    secs: 3.0,
                    rss_kib: 0,
                },
                Sample {
                    secs: 1.0,
                    rss_kib: 0,
                },
                Sample {
                    secs: 2.0,
                    rss_kib: 0,
                },
            ],
            |s| s.secs,
        );
        assert_eq!(m, 2.0);
    }
}
