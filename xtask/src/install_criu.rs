//! `cargo xtask install-criu`: make sure a CRIU that pf accepts and that passes `criu check` is
//! installed. "Accepts" is pf's own policy (`pf_world_procs::criu::policy`), applied by pf's own
//! probe, so install-criu, pf and `pf doctor` decide alike on every machine.
//!
//! Debian 12's criu 3.17 fails on these kernels, and Debian's newer binary packages would drag in a
//! newer libc, so CRIU 4.2.1 is built from Debian's source tarball with Debian 12's build
//! dependencies and installed as `/usr/local/sbin/criu`. Nothing from testing/trixie is installed.
//! 4.2 carries upstream's fix for dumping TCP/UDP sockets on Linux ≥ 6.16 (commit 4b7398595), so
//! the build takes no patch of pf's; it is marked `GitID: pf-4.2.1` in `criu --version` so that
//! a later run can tell a criu it built.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::criu;
use crate::process::{self, Out};

const VERSION: &str = pf_world_procs::criu::policy::INSTALLED_RELEASE;
const TARBALL: &str = "criu_4.2.1.orig.tar.xz";
const SHA256: &str = "29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9";
const POOL_PATH: &str = "pool/main/c/criu";
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
pub(crate) const DEFAULT_DEST: &str = "/usr/local/sbin/criu";

/// What a criu built here says after `GitID:` in `criu --version`.
pub(crate) const BUILD_ID: &str = "pf-4.2.1";

/// Build dependencies, all from Debian 12 (each one proven necessary, plus libbsd for
/// `setproctitle` and xz-utils to unpack the tarball; 4.2 also runs protoc).
const BUILD_DEPS: &[&str] = &[
    "build-essential",
    "pkg-config",
    "libprotobuf-dev",
    "libprotobuf-c-dev",
    "protobuf-c-compiler",
    "protobuf-compiler",
    "libnl-3-dev",
    "libnet1-dev",
    "libcap-dev",
    "uuid-dev",
    "libbsd-dev",
    "xz-utils",
];

pub(crate) const USAGE: &str = "\
cargo xtask install-criu [--force] [--dest PATH]

Make sure the criu pf uses passes `criu check` and is one pf accepts: 4.2 or newer, or a 4.1 built
by an older install-criu with pf's patch (its `criu --version` says `GitID: pf-4.1.1-1`). pf looks
at $PF_CRIU alone when it is set, else the first criu on PATH, then in /usr/local/sbin, /usr/sbin,
/sbin. If that criu will do, this prints one line and does nothing. Otherwise it installs the
Debian 12 build dependencies, downloads Debian's criu_4.2.1.orig.tar.xz from the apt mirror,
verifies its sha256, builds it and installs it as /usr/local/sbin/criu, and fails if pf would still
use another criu ($PF_CRIU, or one earlier on PATH). Needs root.

  --force       build and install even if a working criu is already there
  --dest PATH   install the built binary at PATH instead of /usr/local/sbin/criu";

/// What to do.
#[derive(Debug)]
pub(crate) struct Options {
    /// Build even when a working criu is found.
    pub(crate) force: bool,
    /// Where the built binary goes.
    pub(crate) dest: PathBuf,
}

pub(crate) fn parse_args(args: &[String]) -> anyhow::Result<Options> {
    let mut opts = Options {
        force: false,
        dest: PathBuf::from(DEFAULT_DEST),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--force" => opts.force = true,
            "--dest" => {
                opts.dest = args
                    .next()
                    .map(PathBuf::from)
                    .context("--dest needs a path")?;
            }
            other => bail!("unknown argument `{other}`\n\nusage: {USAGE}"),
        }
    }
    Ok(opts)
}

/// Return the path of a working criu, building and installing one if needed.
#[allow(clippy::print_stdout, clippy::print_stderr)]
pub(crate) fn ensure(root: &Path, opts: &Options) -> anyhow::Result<PathBuf> {
    if !opts.force {
        let search = criu::find_working();
        if let Some((path, version)) = search.found {
            println!(
                "criu {version} at {} passes `criu check`: nothing to do",
                path.display()
            );
            return Ok(path);
        }
        for (path, why) in &search.rejected {
            eprintln!("install-criu: not using {}: {why}", path.display());
        }
    }
    if !is_root() {
        bail!(
            "install-criu needs root: it installs build dependencies with apt-get and writes {}\n\
             run it as root, e.g. `sudo \"$(command -v cargo)\" xtask install-criu`",
            opts.dest.display()
        );
    }
    eprintln!("install-criu: building CRIU {VERSION} from Debian's source tarball");
    let build_dir = process::target_dir(root).join("criu-build");
    step("1/5 build dependencies", ensure_debian_packages(BUILD_DEPS))?;
    let tarball = step("2/5 download", download(&build_dir))?;
    let src = step("3/5 unpack", unpack(&build_dir, &tarball))?;
    let built = step("4/5 build", build(&src))?;
    step("5/5 install and check", install(&built, &opts.dest))?;
    uses_installed(&opts.dest)?;
    Ok(opts.dest.clone())
}

/// After an install: the criu pf now uses must work, or the install did not help (pf looks at
/// `$PF_CRIU` alone when set, and takes the first criu on `PATH`).
#[allow(clippy::print_stdout)]
fn uses_installed(dest: &Path) -> anyhow::Result<PathBuf> {
    let search = criu::find_working();
    match search.found {
        Some((path, _)) => {
            if path != dest {
                println!(
                    "note: pf uses {} ($PF_CRIU or earlier on PATH), which pf also accepts",
                    path.display()
                );
            }
            Ok(path)
        }
        None => {
            let (path, why) = search
                .rejected
                .first()
                .cloned()
                .unwrap_or_else(|| (dest.to_owned(), "not found".to_owned()));
            bail!(
                "installed {} but pf uses {}, which will not do: {why}
                 unset $PF_CRIU or point it at {}, or remove {} from PATH",
                dest.display(),
                path.display(),
                dest.display(),
                path.display()
            )
        }
    }
}

/// Label a step's error so the user knows which one failed.
fn step<T>(name: &str, result: anyhow::Result<T>) -> anyhow::Result<T> {
    result.with_context(|| format!("install-criu step {name} failed"))
}

/// Effective uid 0, read from `/proc/self/status`.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_uid(&s))
        == Some(0)
}

/// The effective uid from `/proc/<pid>/status` text (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

/// Install those of Debian's `packages` that are missing (apt-get; needs root). Quiet when all
/// are there.
#[allow(clippy::print_stderr)]
pub(crate) fn ensure_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let mut query = process::command("dpkg-query", Path::new("/"), Out::Pipe, Out::Pipe);
    query
        .args(["-W", "-f=${db:Status-Abbrev} ${Package}\\n"])
        .args(packages);
    // dpkg-query exits 1 when a package is unknown; its stdout still lists the known ones.
    let out = process::output(&mut query)?;
    let missing = missing_packages(&String::from_utf8_lossy(&out.stdout), packages);
    if missing.is_empty() {
        return Ok(());
    }
    let fix = format!(
        "run `apt-get update && apt-get install -y {}` by hand to see why",
        missing.join(" ")
    );
    eprintln!("apt-get install {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = process::command("apt-get", Path::new("/"), Out::Null, Out::Inherit);
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    process::run(&mut apt(&["update", "-q"])).with_context(|| fix.clone())?;
    let mut install = apt(&["install", "-y", "-q"]);
    install.args(&missing);
    process::run(&mut install).with_context(|| fix.clone())?;
    Ok(())
}

/// The packages of `wanted` that `dpkg-query -f '${db:Status-Abbrev} ${Package}\n'` does not
/// report as installed (`ii`).
fn missing_packages(dpkg_out: &str, wanted: &[&str]) -> Vec<String> {
    let installed: Vec<&str> = dpkg_out
        .lines()
        .filter_map(|l| l.strip_prefix("ii "))
        .map(str::trim)
        .collect();
    wanted
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| (*p).to_owned())
        .collect()
}

/// The Debian archive mirror from apt's sources (deb822 `.sources` and one-line `.list` files),
/// skipping the security archive, else deb.debian.org.
fn mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        files.extend(paths);
    }
    let texts: Vec<String> = files
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    mirror_from_sources(texts.iter().map(String::as_str))
        .unwrap_or_else(|| FALLBACK_MIRROR.to_owned())
}

/// The first Debian archive URI in apt source texts that is not the security archive.
fn mirror_from_sources<'a>(texts: impl Iterator<Item = &'a str>) -> Option<String> {
    for text in texts {
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if let Some(rest) = line.strip_prefix("deb ").or(line.strip_prefix("deb\t")) {
                // `deb [options] uri suite components`
                let rest = rest.trim_start();
                let rest = match rest.strip_prefix('[') {
                    Some(opts) => opts.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                rest.split_whitespace().take(1).collect()
            } else {
                continue;
            };
            if let Some(uri) = uris
                .into_iter()
                .find(|u| u.starts_with("http") && !u.contains("security"))
            {
                return Some(uri.trim_end_matches('/').to_owned());
            }
        }
    }
    None
}

/// Download the tarball into `build_dir` (or reuse a cached copy) and verify its sha256.
#[allow(clippy::print_stderr)]
fn download(build_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(build_dir)
        .with_context(|| format!("cannot create {}", build_dir.display()))?;
    let tarball = build_dir.join(TARBALL);
    if tarball.is_file() && sha256_of(&tarball).ok().as_deref() == Some(SHA256) {
        return Ok(tarball);
    }
    let _ = std::fs::remove_file(&tarball);
    let url = format!("{}/{POOL_PATH}/{TARBALL}", mirror());
    eprintln!("install-criu: downloading {url}");
    let mut cmd = process::command(
        "/usr/lib/apt/apt-helper",
        build_dir,
        Out::Null,
        Out::Inherit,
    );
    cmd.args(["download-file", &url, TARBALL, &format!("SHA256:{SHA256}")]);
    process::run(&mut cmd).with_context(|| {
        format!(
            "run `/usr/lib/apt/apt-helper download-file {url} {} SHA256:{SHA256}` to see why",
            tarball.display()
        )
    })?;
    let got = sha256_of(&tarball)?;
    if got != SHA256 {
        let _ = std::fs::remove_file(&tarball);
        bail!(
            "{} has sha256 {got}, expected {SHA256}; removed it",
            tarball.display()
        );
    }
    Ok(tarball)
}

/// `sha256sum FILE` → the hex digest.
fn sha256_of(file: &Path) -> anyhow::Result<String> {
    let mut cmd = process::command("sha256sum", Path::new("/"), Out::Pipe, Out::Pipe);
    cmd.arg("--").arg(file);
    let out = process::output(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`sha256sum {}` failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("no digest in `sha256sum {}` output", file.display()))
}

/// Unpack a fresh source tree (any previous one is removed first).
fn unpack(build_dir: &Path, tarball: &Path) -> anyhow::Result<PathBuf> {
    let src = build_dir.join(format!("criu-{VERSION}"));
    if src.exists() {
        std::fs::remove_dir_all(&src)
            .with_context(|| format!("cannot remove the old source tree {}", src.display()))?;
    }
    let mut cmd = process::command("tar", build_dir, Out::Null, Out::Inherit);
    cmd.args(["--no-same-owner", "-xJf"]).arg(tarball);
    process::run(&mut cmd).context("is xz-utils installed? `apt-get install -y xz-utils`")?;
    if !src.join("Makefile").is_file() {
        bail!("{} has no Makefile after unpacking", src.display());
    }
    Ok(src)
}

/// `make -jN criu`, with its output in `make.log` beside the sources.
#[allow(clippy::print_stderr)]
fn build(src: &Path) -> anyhow::Result<PathBuf> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log_path = src.join("make.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log_path.display()))?;
    eprintln!(
        "install-criu: make -j{jobs} criu (log: {})",
        log_path.display()
    );
    let mut cmd = process::command("make", src, Out::Null, Out::Null);
    cmd.arg(format!("-j{jobs}"))
        .arg("criu")
        .arg(format!("GITID={BUILD_ID}"))
        .stdout(log)
        .stderr(log_err);
    if let Err(err) = process::run(&mut cmd) {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(err).with_context(|| {
            format!(
                "last lines of {}:\n{}\nfix the cause, then run `cargo xtask install-criu` again",
                log_path.display(),
                tail.join("\n")
            )
        });
    }
    let built = src.join("criu/criu");
    if !built.is_file() {
        bail!("make succeeded but {} is missing", built.display());
    }
    Ok(built)
}

/// Copy the binary to `dest` (0755, atomically by rename) and run `criu check` on it.
#[allow(clippy::print_stdout)]
fn install(built: &Path, dest: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(".criu.pf-install.tmp");
    std::fs::copy(built, &tmp)
        .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod 0755 {}", tmp.display()))?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
    // pf's own probe of exactly this binary, as root.
    let mut inputs = pf_world_procs::criu::ProbeInputs::from_process();
    inputs.pf_criu = Some(dest.as_os_str().to_owned());
    let search = criu::find_working_with(&inputs);
    match (search.found, search.gitid) {
        (Some((_, version)), Some(gitid)) if gitid == BUILD_ID => {
            println!(
                "criu {version} ({BUILD_ID}) installed at {}; `criu check` passes",
                dest.display()
            );
            Ok(())
        }
        (Some(_), gitid) => bail!(
            "the installed {} says GitID {gitid:?}, not {BUILD_ID}: it is not the binary this run \
             built; run `cargo xtask install-criu --force`",
            dest.display()
        ),
        (None, _) => bail!(
            "the installed {} does not work: {}\nrun `{} check` to see why",
            dest.display(),
            search
                .rejected
                .first()
                .map_or("no answer", |(_, why)| why.as_str()),
            dest.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t5\t7\t7\t7\n"), Some(7));
        assert_eq!(effective_uid("Name: x\n"), None);
    }

    #[test]
    fn lists_missing_packages() {
        let out = "ii  build-essential\nun  libbsd-dev\nii  xz-utils\n";
        assert_eq!(
            missing_packages(
                out,
                &["build-essential", "libbsd-dev", "xz-utils", "uuid-dev"]
            ),
            ["libbsd-dev", "uuid-dev"]
        );
    }

    #[test]
    fn finds_the_mirror_in_deb822_sources() {
        let sources = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                       URIs: http://deb.debian.org/debian\nSuites: bookworm\n\n\
                       Types: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(
            mirror_from_sources([sources].into_iter()).as_deref(),
            Some("http://deb.debian.org/debian")
        );
    }

    #[test]
    fn finds_the_mirror_in_one_line_sources() {
        let list = "# deb http://old.example/debian bookworm main\n\
                    deb http://security.debian.org/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://ftp.example.org/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_sources([list].into_iter()).as_deref(),
            Some("http://ftp.example.org/debian")
        );
        assert_eq!(mirror_from_sources(["Types: deb\n"].into_iter()), None);
    }

    #[test]
    fn parses_arguments() {
        let opts = parse_args(&["--force".into(), "--dest".into(), "/tmp/x/criu".into()]).unwrap();
        assert!(opts.force);
        assert_eq!(opts.dest, Path::new("/tmp/x/criu"));
        let opts = parse_args(&[]).unwrap();
        assert!(!opts.force);
        assert_eq!(opts.dest, Path::new(DEFAULT_DEST));
        assert!(parse_args(&["--dest".into()]).is_err());
        assert!(parse_args(&["--bogus".into()]).is_err());
    }
}
