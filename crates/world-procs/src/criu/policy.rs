//! pf's one CRIU policy: which criu builds pf accepts, where it looks for criu and in what order,
//! and how `$PF_CRIU` is treated. Pure functions of their inputs, shared by pf-world-procs' probe
//! (and so by every pf command and `pf doctor`) and by `cargo xtask install-criu`, so that the
//! three can never disagree about a machine.
//!
//! The policy:
//! - **Accepted builds**: CRIU 4.2 and later as they are (4.2 carries upstream's fix for dumping
//!   TCP/UDP sockets on Linux ≥ 6.16, commit 4b7398595); a 4.1 only when its `criu --version`
//!   says `GitID: pf-…` (built by an older `cargo xtask install-criu` with pf's socket patch).
//!   Anything older, or an unmarked 4.1, is refused with the fix ([`INSTALL_HINT`]).
//! - **Where criu is looked for**: `$PF_CRIU` when it is set and not empty, and then nowhere
//!   else (a `$PF_CRIU` naming no file is an error, not a reason to search); otherwise each
//!   directory of `$PATH` in order, then [`SEARCH_DIRS`]. The first executable `criu` found is
//!   the one pf uses: a later one is never tried in its place.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::CriuVersion;

/// The oldest accepted release, and only with pf's mark ([`PATCH_MARK`]).
pub const OLDEST_PATCHED: CriuVersion = CriuVersion {
    major: 4,
    minor: 1,
    sublevel: 0,
};

/// From this release on every build is accepted as it is.
pub const UPSTREAM_FIXED: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    sublevel: 0,
};

/// How the `GitID:` of a criu built with pf's socket patch starts (`pf-4.1.1-1`).
pub const PATCH_MARK: &str = "pf-";

/// The release `cargo xtask install-criu` builds.
pub const INSTALLED_RELEASE: &str = "4.2.1";

/// Directories searched after `$PATH`, in order.
pub const SEARCH_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// [`SEARCH_DIRS`] as paths, for [`candidates`].
pub fn search_dirs() -> Vec<PathBuf> {
    SEARCH_DIRS.iter().map(PathBuf::from).collect()
}

/// The fix for a missing, refused or broken criu.
pub const INSTALL_HINT: &str = "`cargo xtask install-criu` (as root, in pf's source tree) builds \
    CRIU 4.2.1; or set $PF_CRIU to a criu 4.2 or newer";

/// What the policy says of one criu build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 4.2 or newer.
    Upstream,
    /// A 4.1 carrying pf's socket patch.
    Patched,
    /// Older than 4.1.
    TooOld,
    /// A 4.1 without pf's patch: it cannot dump TCP/UDP sockets on Linux ≥ 6.16.
    Unpatched,
}

impl Verdict {
    /// Whether pf uses such a criu.
    pub fn accepted(self) -> bool {
        matches!(self, Self::Upstream | Self::Patched)
    }
}

/// Judge a criu by its `criu --version`: its release and its `GitID:`, if it printed one.
pub fn judge(version: CriuVersion, gitid: Option<&str>) -> Verdict {
    if version >= UPSTREAM_FIXED {
        Verdict::Upstream
    } else if version < OLDEST_PATCHED {
        Verdict::TooOld
    } else if gitid.is_some_and(|g| g.starts_with(PATCH_MARK)) {
        Verdict::Patched
    } else {
        Verdict::Unpatched
    }
}

/// One line saying what the policy accepts, for messages.
pub const ACCEPTED: &str =
    "CRIU 4.2 or newer, or a 4.1 built by install-criu with pf's socket patch (`GitID: pf-…`)";

/// Where criu is looked for, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidates {
    /// `$PF_CRIU` is set: this file and nothing else.
    Env(PathBuf),
    /// `$PATH`'s directories then [`SEARCH_DIRS`], each joined with `criu`, duplicates removed.
    Search(Vec<PathBuf>),
}

/// The places to look for criu, given `$PF_CRIU` (an empty value counts as unset), `$PATH` and
/// the directories searched after it ([`SEARCH_DIRS`] but in tests).
pub fn candidates(
    pf_criu: Option<&OsStr>,
    path_var: Option<&OsStr>,
    search_dirs: &[PathBuf],
) -> Candidates {
    if let Some(p) = pf_criu.filter(|p| !p.is_empty()) {
        return Candidates::Env(PathBuf::from(p));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    let dirs = path_var
        .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
        .unwrap_or_default();
    // An empty `$PATH` entry means the working directory: never look for criu there.
    let dirs = dirs
        .into_iter()
        .filter(|d| d.is_absolute())
        .chain(search_dirs.iter().cloned());
    for dir in dirs {
        let path = dir.join("criu");
        if !out.contains(&path) {
            out.push(path);
        }
    }
    Candidates::Search(out)
}

/// Where criu is, as [`candidates`] orders it: `Ok` with the path (`$PF_CRIU`'s when set, whether
/// or not it exists, so the caller can say so), or `Err(searched)` when no candidate is an
/// executable file.
pub fn locate(
    pf_criu: Option<&OsStr>,
    path_var: Option<&OsStr>,
    search_dirs: &[PathBuf],
    is_executable: impl Fn(&Path) -> bool,
) -> Result<PathBuf, Vec<PathBuf>> {
    match candidates(pf_criu, path_var, search_dirs) {
        Candidates::Env(path) => Ok(path),
        Candidates::Search(paths) => match paths.iter().find(|p| is_executable(p)) {
            Some(found) => Ok(found.clone()),
            None => Err(paths),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, sublevel: u32) -> CriuVersion {
        CriuVersion {
            major,
            minor,
            sublevel,
        }
    }

    #[test]
    fn accepts_4_2_and_marked_4_1_only() {
        assert_eq!(judge(v(4, 2, 1), None), Verdict::Upstream);
        assert_eq!(judge(v(4, 2, 0), Some("v4.2")), Verdict::Upstream);
        assert_eq!(judge(v(5, 0, 0), None), Verdict::Upstream);
        assert_eq!(judge(v(4, 1, 1), Some("pf-4.1.1-1")), Verdict::Patched);
        assert_eq!(judge(v(4, 1, 1), None), Verdict::Unpatched);
        assert_eq!(judge(v(4, 1, 1), Some("v4.1.1")), Verdict::Unpatched);
        assert_eq!(judge(v(4, 0, 9), Some("pf-4.0.9")), Verdict::TooOld);
        assert_eq!(judge(v(3, 17, 1), None), Verdict::TooOld);
        assert!(Verdict::Upstream.accepted() && Verdict::Patched.accepted());
        assert!(!Verdict::TooOld.accepted() && !Verdict::Unpatched.accepted());
        assert!(INSTALL_HINT.contains(INSTALLED_RELEASE));
    }

    #[test]
    fn pf_criu_is_the_only_candidate_when_set() {
        let path = OsStr::new("/usr/bin:/bin");
        assert_eq!(
            candidates(Some(OsStr::new("/opt/criu")), Some(path), &search_dirs()),
            Candidates::Env(PathBuf::from("/opt/criu"))
        );
        // Even when it does not exist: the caller reports it, nothing else is tried.
        assert_eq!(
            locate(
                Some(OsStr::new("/nonexistent/criu")),
                Some(path),
                &search_dirs(),
                |_| true
            ),
            Ok(PathBuf::from("/nonexistent/criu"))
        );
    }

    #[test]
    fn searches_path_then_sbin_dirs_in_order() {
        let Candidates::Search(paths) = candidates(
            Some(OsStr::new("")),
            Some(OsStr::new("/usr/local/sbin:/opt/x/bin::rel/dir:/usr/bin")),
            &search_dirs(),
        ) else {
            panic!("an empty $PF_CRIU counts as unset");
        };
        let want: Vec<PathBuf> = [
            "/usr/local/sbin/criu",
            "/opt/x/bin/criu",
            "/usr/bin/criu",
            "/usr/sbin/criu",
            "/sbin/criu",
        ]
        .map(PathBuf::from)
        .into();
        assert_eq!(paths, want);
        let found = locate(None, Some(OsStr::new("/a:/b")), &search_dirs(), |p| {
            p == Path::new("/b/criu") || p == Path::new("/sbin/criu")
        });
        assert_eq!(found, Ok(PathBuf::from("/b/criu")));
        assert!(locate(None, None, &search_dirs(), |_| false).is_err());
        assert_eq!(
            locate(None, Some(OsStr::new("/a")), &[], |_| false),
            Err(vec![PathBuf::from("/a/criu")])
        );
    }
}
