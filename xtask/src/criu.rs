//! Finding a working CRIU: the candidates `cargo xtask install-criu` and `cargo xtask ci` look at,
//! the version each reports, and whether `criu check` passes.
//!
//! This is build tooling: it runs `criu --version` and `criu check` only to decide whether CRIU has
//! to be built. The pf crates reach CRIU through pf-world-procs alone.

use std::path::{Path, PathBuf};

use crate::process::{self, Out};

/// The oldest CRIU that works on these kernels (3.17 fails `criu check` on the vvar_vclock vDSO).
pub(crate) const MIN_VERSION: (u32, u32) = (4, 1);

/// How long `criu --version` or `criu check` may take before the candidate counts as broken.
const PROBE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Where to look, in order: `$PF_CRIU`, each `criu` on `PATH`, then the usual sbin directories.
pub(crate) fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("PF_CRIU").filter(|v| !v.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
    }
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        out.push(Path::new(dir).join("criu"));
    }
    let mut seen = Vec::new();
    out.retain(|p| {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    out
}

/// What one candidate turned out to be.
#[derive(Debug)]
pub(crate) enum Probe {
    Missing,
    /// Present, but `--version` did not run or said nothing we understand.
    NoVersion(String),
    TooOld(String),
    /// Version is fine but `criu check` failed; the first `Error` line (or the last line) of its
    /// output.
    CheckFailed {
        version: String,
        reason: String,
    },
    Works {
        version: String,
        /// What `criu --version` says after `GitID:`, if anything.
        gitid: Option<String>,
    },
}

/// Look at one candidate path.
pub(crate) fn probe(path: &Path) -> Probe {
    if !path.is_file() {
        return Probe::Missing;
    }
    let mut cmd = process::command(path, Path::new("/"), Out::Pipe, Out::Pipe);
    cmd.arg("--version");
    let (version, gitid) = match process::output_within(&mut cmd, PROBE_DEADLINE) {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_version(&text) {
                Some(v) => (v, parse_gitid(&text)),
                None => return Probe::NoVersion("no `Version:` line in `criu --version`".into()),
            }
        }
        Ok(out) => return Probe::NoVersion(format!("`criu --version` failed ({})", out.status)),
        Err(err) => return Probe::NoVersion(format!("{err:#}")),
    };
    if !version_at_least(&version, MIN_VERSION) {
        return Probe::TooOld(version);
    }
    let mut cmd = process::command(path, Path::new("/"), Out::Pipe, Out::Pipe);
    cmd.arg("check");
    match process::output_within(&mut cmd, PROBE_DEADLINE) {
        Ok(out) if out.status.success() => Probe::Works { version, gitid },
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Probe::CheckFailed {
                version,
                reason: first_error_line(&text)
                    .unwrap_or_else(|| format!("`criu check` failed ({})", out.status)),
            }
        }
        Err(err) => Probe::CheckFailed {
            version,
            reason: format!("{err:#}"),
        },
    }
}

/// The first candidate that works, with its version; every other candidate that exists is listed
/// in `rejected` with why.
#[derive(Debug, Default)]
pub(crate) struct Search {
    pub(crate) found: Option<(PathBuf, String)>,
    pub(crate) rejected: Vec<(PathBuf, String)>,
}

pub(crate) fn find_working() -> Search {
    let mut search = Search::default();
    for path in candidates() {
        match probe(&path) {
            Probe::Missing => {}
            Probe::Works { version, gitid } => {
                if let Some(why) = lacks_patches(&version, gitid.as_deref()) {
                    search.rejected.push((path, why));
                    continue;
                }
                search.found = Some((path, version));
                break;
            }
            Probe::NoVersion(why) => search.rejected.push((path, why)),
            Probe::TooOld(v) => search.rejected.push((
                path,
                format!(
                    "version {v} is older than {}.{}",
                    MIN_VERSION.0, MIN_VERSION.1
                ),
            )),
            Probe::CheckFailed { version, reason } => search
                .rejected
                .push((path, format!("{version}: `criu check` fails: {reason}"))),
        }
    }
    search
}

/// Why a working criu still won't do: a 4.1 without pf's patches (built elsewhere, or by an older
/// install-criu) cannot dump TCP/UDP sockets on Linux ≥ 6.16. 4.2 and later are taken as they are.
pub(crate) fn lacks_patches(version: &str, gitid: Option<&str>) -> Option<String> {
    if version_at_least(version, (4, 2)) || gitid.is_some_and(|g| g.starts_with("pf-")) {
        return None;
    }
    Some(format!(
        "{version} lacks the fix for TCP/UDP sockets on Linux 6.16 and later (CRIU 4.2 has it, or \
         a 4.1 built with pf's patch, `GitID: pf-…`): building CRIU 4.2.1"
    ))
}

/// `GitID: pf-4.1.1-1` → `pf-4.1.1-1`.
pub(crate) fn parse_gitid(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("GitID:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `Version: 4.1.1` → `4.1.1`.
pub(crate) fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether a dotted version is at least `(major, minor)`; anything unparsable is too old.
pub(crate) fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten().or(Some(0))) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// CRIU's own diagnosis: the first line starting with `Error`, else the last non-empty line.
pub(crate) fn first_error_line(text: &str) -> Option<String> {
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.starts_with("Error"))
        .or_else(|| lines().next_back())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_criu_version_output() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
        assert_eq!(
            parse_version("Version: 3.17.1\nGitID: v3.17.1\n").as_deref(),
            Some("3.17.1")
        );
        assert_eq!(parse_version("criu, who knows\n"), None);
    }

    #[test]
    fn only_patched_or_newer_criu_is_taken() {
        let ours = "pf-4.1.1-1";
        assert_eq!(
            parse_gitid(&format!("Version: 4.1.1\nGitID: {ours}\n")).as_deref(),
            Some(ours)
        );
        assert_eq!(parse_gitid("Version: 4.1.1\n"), None);
        assert_eq!(lacks_patches("4.1.1", Some(ours)), None);
        assert_eq!(lacks_patches("4.2", None), None);
        assert!(lacks_patches("4.1.1", None).is_some());
        assert!(lacks_patches("4.1.1", Some("v4.1.1")).is_some());
    }

    #[test]
    fn compares_versions() {
        assert!(version_at_least("4.1.1", (4, 1)));
        assert!(version_at_least("4.1", (4, 1)));
        assert!(version_at_least("5", (4, 1)));
        assert!(version_at_least("4.2-rc1", (4, 1)));
        assert!(!version_at_least("4.0.9", (4, 1)));
        assert!(!version_at_least("3.17.1", (4, 1)));
        assert!(!version_at_least("x.y", (4, 1)));
    }

    #[test]
    fn picks_the_first_error_line() {
        let log = "Warn  (criu/kerndat.c:1637): no nftables\n\
                   Error (criu/vdso.c:95): vdso: Unexpected rt vDSO area bounds\n\
                   Error (criu/cr-check.c:1): other\n\
                   Looks bad.\n";
        assert_eq!(
            first_error_line(log).as_deref(),
            Some("Error (criu/vdso.c:95): vdso: Unexpected rt vDSO area bounds")
        );
        assert_eq!(
            first_error_line("Warn: x\nsomething failed\n\n").as_deref(),
            Some("something failed")
        );
        assert_eq!(first_error_line("\n"), None);
    }
}
