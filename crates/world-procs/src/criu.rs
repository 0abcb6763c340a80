//! Finding a usable `criu`: where it is, its version, whether pf's policy accepts it
//! ([`policy`]), whether `criu check` passes, and how we get the privileges it needs. Probed once
//! per process ([`probe`]) and cached.
//!
//! The probe is a pure function of its inputs ([`ProbeInputs`]: the OS, `$PF_CRIU`, `$PATH`,
//! whether we are root) plus what the programs it runs answer, so tests can probe with any
//! environment without touching the process's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::runner::{self, Invocation};

pub mod policy;

pub use policy::{INSTALL_HINT, Verdict};

/// A criu release number, as printed by `criu --version` (`Version: 4.1.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CriuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Sublevel (0 when not printed).
    pub sublevel: u32,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// Parse the output of `criu --version`: the first `Version: X.Y[.Z]` line.
pub fn parse_version(output: &str) -> Option<CriuVersion> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split('.');
    let mut num = |required: bool| -> Option<u32> {
        match parts.next() {
            Some(p) => {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            }
            None if required => None,
            None => Some(0),
        }
    };
    Some(CriuVersion {
        major: num(true)?,
        minor: num(true)?,
        sublevel: num(false)?,
    })
}

/// How criu gets the privileges it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// We are root: run criu directly.
    Root,
    /// Through `sudo -n` (passwordless sudo for criu).
    Sudo,
    /// criu carries CAP_CHECKPOINT_RESTORE: run it with `--unprivileged`.
    Unprivileged,
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Root => "root",
            Self::Sudo => "sudo -n",
            Self::Unprivileged => "--unprivileged (CAP_CHECKPOINT_RESTORE)",
        })
    }
}

/// A criu that passed `criu check` with the privileges we have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criu {
    /// The binary.
    pub path: PathBuf,
    /// Its version.
    pub version: CriuVersion,
    /// How it is run.
    pub privilege: Privilege,
}

/// Why there is no usable criu, with what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// Not Linux: CRIU exists only there.
    #[error("process capture needs Linux with CRIU; this is {os}")]
    NotLinux {
        /// `std::env::consts::OS`.
        os: String,
    },
    /// `$PF_CRIU` names a file that does not exist (no fallback search then).
    #[error("$PF_CRIU is {} but there is no such file: fix $PF_CRIU or unset it", .path.display())]
    EnvPathMissing {
        /// The value of `$PF_CRIU`.
        path: PathBuf,
    },
    /// No criu anywhere we looked ([`policy::candidates`]).
    #[error("criu not found in $PATH, /usr/local/sbin, /usr/sbin or /sbin: {INSTALL_HINT}")]
    NotFound,
    /// `criu --version` could not be run.
    #[error("cannot run {} --version: {INSTALL_HINT}", .path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// `criu --version` printed no version.
    #[error("{} --version printed no `Version: X.Y` line (got {output:?}): {INSTALL_HINT}", .path.display())]
    NoVersion {
        /// The binary.
        path: PathBuf,
        /// What it printed (trimmed).
        output: String,
    },
    /// pf's policy refuses this criu ([`Verdict::TooOld`] or [`Verdict::Unpatched`]).
    #[error(
        "criu {version} at {} is not one pf accepts ({}): pf needs {}; {INSTALL_HINT}",
        .path.display(),
        refusal(*.verdict, .gitid.as_deref()),
        policy::ACCEPTED
    )]
    Refused {
        /// The binary.
        path: PathBuf,
        /// Its version.
        version: CriuVersion,
        /// Its `GitID:`, if it printed one.
        gitid: Option<String>,
        /// What the policy says of it.
        verdict: Verdict,
    },
    /// `criu check` failed.
    #[error(
        "`criu check` fails with criu {version} at {}{}: this kernel or criu is not fit for \
         checkpointing; {INSTALL_HINT}",
        .path.display(),
        first_line(.errors)
    )]
    CheckFailed {
        /// The binary.
        path: PathBuf,
        /// Its version.
        version: CriuVersion,
        /// criu's `Error (…)` lines (or its stderr when it wrote no log).
        errors: Vec<String>,
        /// The kept log, when there is one.
        log: Option<PathBuf>,
    },
    /// Not root, and neither sudo nor capabilities work.
    #[error(
        "not root, and criu cannot get privileges: `sudo -n` {sudo} and criu with \
         --unprivileged {unprivileged}; run pf as root, allow passwordless sudo for {}, \
         or give it the capability: sudo setcap cap_checkpoint_restore+eip {}",
        .path.display(),
        .path.display()
    )]
    NoPrivilege {
        /// The binary.
        path: PathBuf,
        /// Why sudo did not work.
        sudo: Refusal,
        /// Why --unprivileged did not work.
        unprivileged: Refusal,
    },
}

/// Why one way of giving criu its privileges (`sudo -n`, `--unprivileged`) did not work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The program to run (sudo) is not installed.
    NotInstalled,
    /// The program could not be started for another reason (its `io::Error`, rendered).
    CannotStart(String),
    /// It refused for lack of privileges: sudo wants a password, or criu has not the
    /// CAP_CHECKPOINT_RESTORE capability. CRIU's or sudo's own line.
    NoPrivilege(String),
    /// `criu check` failed for another reason: its most telling line.
    CheckFailed(String),
    /// No answer within this long.
    Timeout(Duration),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotInstalled => f.write_str("is not installed"),
            Self::CannotStart(why) => write!(f, "cannot start ({why})"),
            Self::NoPrivilege(said) => write!(f, "is refused ({said})"),
            Self::CheckFailed(said) => write!(f, "fails `criu check` ({said})"),
            Self::Timeout(after) => write!(f, "gave no answer within {after:?}"),
        }
    }
}

fn first_line(errors: &[String]) -> String {
    crate::criu_log::telling_line(errors)
        .map(|l| format!(": {l}"))
        .unwrap_or_default()
}

fn refusal(verdict: Verdict, gitid: Option<&str>) -> String {
    match verdict {
        Verdict::TooOld => "too old".to_owned(),
        Verdict::Unpatched => format!(
            "a 4.1 without pf's socket patch{}: it cannot dump TCP/UDP sockets on Linux 6.16 and \
             later",
            gitid.map(|g| format!(", GitID {g}")).unwrap_or_default()
        ),
        Verdict::Upstream | Verdict::Patched => "accepted".to_owned(),
    }
}

/// What the probe looks at, taken from the process by [`ProbeInputs::from_process`] or built
/// by hand in tests.
#[derive(Debug, Clone)]
pub struct ProbeInputs {
    /// `std::env::consts::OS`.
    pub os: String,
    /// `$PF_CRIU` (an empty value counts as unset).
    pub pf_criu: Option<OsString>,
    /// `$PATH`.
    pub path_var: Option<OsString>,
    /// Whether the effective uid is 0.
    pub is_root: bool,
    /// The directories searched after `$PATH` ([`policy::SEARCH_DIRS`]; others only in tests).
    pub search_dirs: Vec<PathBuf>,
}

impl ProbeInputs {
    /// This process's OS, environment and effective uid.
    pub fn from_process() -> Self {
        Self {
            os: std::env::consts::OS.to_owned(),
            pf_criu: std::env::var_os("PF_CRIU").filter(|v| !v.is_empty()),
            path_var: std::env::var_os("PATH"),
            is_root: nix::unistd::geteuid().is_root(),
            search_dirs: policy::search_dirs(),
        }
    }
}

/// What the probe found: the binary and version when there is one, and whether it is usable.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The criu binary found (usable or not).
    pub path: Option<PathBuf>,
    /// Its version, when `criu --version` answered.
    pub version: Option<CriuVersion>,
    /// Its `GitID:`, when `criu --version` printed one.
    pub gitid: Option<String>,
    /// What pf's policy says of it, when its version is known.
    pub verdict: Option<Verdict>,
    /// A usable criu, or why there is none.
    pub result: Result<Criu, Unavailable>,
}

impl Probe {
    /// The usable criu, or why there is none.
    pub fn criu(&self) -> Result<&Criu, Unavailable> {
        self.result.as_ref().map_err(Clone::clone)
    }
}

static PROBE: OnceLock<Probe> = OnceLock::new();

/// The probe for this process, run on first use and cached.
pub fn probe() -> &'static Probe {
    PROBE.get_or_init(|| probe_with(&ProbeInputs::from_process()))
}

/// A criu for a restore, found without the 40-odd ms of `criu check` when running as root.
///
/// A restore that criu cannot do fails with criu's own error lines, so the check adds nothing
/// there but latency on every thaw. Captures and `pf doctor` keep the full [`probe`]: its verdict
/// is what an honest `procs.unsupported.v1` note says. Not root, the privilege mode can only be
/// chosen by checking, so this is the full probe.
pub(crate) fn for_restore() -> Result<&'static Criu, Unavailable> {
    static FAST: OnceLock<Result<Criu, Unavailable>> = OnceLock::new();
    if let Some(probe) = PROBE.get() {
        return probe.criu();
    }
    FAST.get_or_init(|| {
        let inputs = ProbeInputs::from_process();
        if inputs.os != "linux" || !inputs.is_root {
            return probe().result.clone();
        }
        let path = locate(
            inputs.pf_criu.as_deref(),
            inputs.path_var.as_deref(),
            &inputs.search_dirs,
        )?;
        // A binary that passed `criu check` this boot: its version is known, no exec needed.
        let remembered =
            binary_identity(&path).and_then(|key| read_checked(Path::new(CHECKED_DIR), &key));
        let (version, gitid) = match remembered {
            Some(known) => known,
            None => read_version(&path)?,
        };
        let verdict = policy::judge(version, gitid.as_deref());
        if !verdict.accepted() {
            return Err(Unavailable::Refused {
                path,
                version,
                gitid,
                verdict,
            });
        }
        Ok(Criu {
            path,
            version,
            privilege: Privilege::Root,
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Whether a criu can dump a process holding a TCP or UDP socket on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InetSockets {
    /// It can; the reason.
    Yes(String),
    /// It cannot; the reason.
    No(String),
}

/// Whether a criu of `version` that says `gitid` can dump TCP/UDP sockets on this kernel. Linux
/// 6.16 refuses SO_PASSCRED/SO_PASSSEC on such sockets, which CRIU before 4.2 treats as fatal
/// unless built with pf's patch (`GitID: pf-…`); every criu pf's policy accepts can.
pub fn inet_sockets(version: CriuVersion, gitid: Option<&str>) -> InetSockets {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    inet_sockets_verdict(kernel.trim(), version, gitid)
}

/// `GitID: pf-4.1.1-1` in `criu --version` output → `pf-4.1.1-1`.
pub fn parse_gitid(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("GitID:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// [`inet_sockets`] on its inputs: the kernel release, criu's version and GitID.
pub fn inet_sockets_verdict(
    kernel: &str,
    version: CriuVersion,
    gitid: Option<&str>,
) -> InetSockets {
    let mut parts = kernel.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().flatten(), parts.next().flatten());
    let fixed_kernel = matches!((major, minor), (Some(a), Some(b)) if (a, b) >= (6, 16));
    if !fixed_kernel {
        return InetSockets::Yes(format!(
            "Linux {kernel} still allows what criu {version} asks"
        ));
    }
    match policy::judge(version, gitid) {
        Verdict::Upstream => {
            return InetSockets::Yes(format!("criu {version} knows Linux 6.16's socket options"));
        }
        Verdict::Patched => {
            return InetSockets::Yes(format!(
                "criu {version} built with pf's patch ({})",
                gitid.unwrap_or_default()
            ));
        }
        Verdict::TooOld | Verdict::Unpatched => {}
    }
    InetSockets::No(format!(
        "criu {version} cannot dump a process with a TCP/UDP socket on Linux {kernel} \
         (`sockets: Can't get 1:16 opt: Operation not supported`)"
    ))
}

/// Where a passed `criu check` is remembered between pf processes, as root: `/run` is emptied
/// by a reboot, and only root writes there.
pub(crate) const CHECKED_DIR: &str = "/run/pf";
/// The file in [`CHECKED_DIR`]: one line, the criu binary's identity, its version and its
/// `GitID:` (`-` when none), tab-separated.
const CHECKED_FILE: &str = "criu-checked.v2";

/// A criu for a capture: the full [`probe`], except that as root a criu that passed
/// `criu check` since this boot is taken without checking again (~30 ms a `pf goblin freeze`)
/// as long as it is the very same file (device, inode, size, change time). `pf doctor`
/// always probes in full; a criu that stopped working since fails the dump with its own errors.
pub fn for_capture() -> Result<Criu, Unavailable> {
    static CAPTURE: OnceLock<Result<Criu, Unavailable>> = OnceLock::new();
    if let Some(probe) = PROBE.get() {
        return probe.result.clone();
    }
    CAPTURE
        .get_or_init(|| {
            let inputs = ProbeInputs::from_process();
            if inputs.os != "linux" || !inputs.is_root {
                return probe().result.clone();
            }
            let (pf_criu, path_var) = (inputs.pf_criu.as_deref(), inputs.path_var.as_deref());
            let Ok(path) = locate(pf_criu, path_var, &inputs.search_dirs) else {
                return probe().result.clone();
            };
            let dir = Path::new(CHECKED_DIR);
            let key = binary_identity(&path);
            if let Some((version, _)) = key
                .as_deref()
                .and_then(|k| read_checked(dir, k))
                .filter(|(v, gitid)| policy::judge(*v, gitid.as_deref()).accepted())
            {
                tracing::debug!(path = %path.display(), %version, "criu passed `criu check` earlier this boot");
                return Ok(Criu {
                    path,
                    version,
                    privilege: Privilege::Root,
                });
            }
            let result = probe().result.clone();
            if let (Ok(criu), Some(key)) = (&result, key)
                && criu.path == path
                && criu.privilege == Privilege::Root
                && let Err(err) = write_checked(dir, &key, criu.version, probe().gitid.as_deref())
            {
                tracing::debug!(error = %err, "cannot remember the passed `criu check`");
            }
            result
        })
        .clone()
}

/// Who `path` is this boot: its path, device, inode, size, change time and the boot id.
fn binary_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    // ctime, unlike mtime, cannot be set back by hand after the file is rewritten.
    Some(format!(
        "{}\t{}:{}\t{}\t{}.{}\t{}",
        path.display(),
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.ctime(),
        meta.ctime_nsec(),
        boot.trim()
    ))
}

/// The version and `GitID:` remembered for `key` in `dir`, if that is what the file holds.
fn read_checked(dir: &Path, key: &str) -> Option<(CriuVersion, Option<String>)> {
    let text = std::fs::read_to_string(dir.join(CHECKED_FILE)).ok()?;
    let (rest, gitid) = text.trim_end_matches('\n').rsplit_once('\t')?;
    let (held, version) = rest.rsplit_once('\t')?;
    let version = (held == key).then(|| parse_version(&format!("Version: {version}")))??;
    Some((
        version,
        Some(gitid).filter(|g| *g != "-").map(str::to_owned),
    ))
}

/// Remember that the criu `key` names, of `version` and `gitid`, passed `criu check` (0700 dir,
/// 0600 file, written to a temp file and renamed).
fn write_checked(
    dir: &Path,
    key: &str,
    version: CriuVersion,
    gitid: Option<&str>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".criu-checked-")
        .tempfile_in(dir)?;
    writeln!(tmp, "{key}\t{version}\t{}", gitid.unwrap_or("-"))?;
    tmp.persist(dir.join(CHECKED_FILE)).map_err(|e| e.error)?;
    Ok(())
}

/// Probe with explicit inputs (runs `criu --version` and `criu check`).
pub fn probe_with(inputs: &ProbeInputs) -> Probe {
    let mut probe = Probe {
        path: None,
        version: None,
        gitid: None,
        verdict: None,
        result: Err(Unavailable::NotFound),
    };
    if inputs.os != "linux" {
        probe.result = Err(Unavailable::NotLinux {
            os: inputs.os.clone(),
        });
        return probe;
    }
    let path = match locate(
        inputs.pf_criu.as_deref(),
        inputs.path_var.as_deref(),
        &inputs.search_dirs,
    ) {
        Ok(path) => path,
        Err(e) => {
            probe.result = Err(e);
            return probe;
        }
    };
    probe.path = Some(path.clone());
    let (version, gitid) = match read_version(&path) {
        Ok(v) => v,
        Err(e) => {
            probe.result = Err(e);
            return probe;
        }
    };
    let verdict = policy::judge(version, gitid.as_deref());
    probe.version = Some(version);
    probe.gitid.clone_from(&gitid);
    probe.verdict = Some(verdict);
    if !verdict.accepted() {
        probe.result = Err(Unavailable::Refused {
            path,
            version,
            gitid,
            verdict,
        });
        return probe;
    }
    probe.result = choose_privilege(&path, version, inputs.is_root);
    tracing::debug!(?probe, "criu probed");
    probe
}

/// Find criu as [`policy::locate`] says: `$PF_CRIU` when set (and then nowhere else), else
/// `$PATH`, then the sbin dirs.
pub(crate) fn locate(
    pf_criu: Option<&std::ffi::OsStr>,
    path_var: Option<&std::ffi::OsStr>,
    search_dirs: &[PathBuf],
) -> Result<PathBuf, Unavailable> {
    match policy::locate(pf_criu, path_var, search_dirs, is_executable) {
        Ok(path) if path.is_file() => Ok(path),
        Ok(path) => Err(Unavailable::EnvPathMissing { path }),
        Err(_) => Err(Unavailable::NotFound),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `criu --version`: the version and the `GitID:`, if any.
fn read_version(path: &Path) -> Result<(CriuVersion, Option<String>), Unavailable> {
    let out = runner::output(path, &["--version"], Duration::from_secs(20)).map_err(|source| {
        Unavailable::Spawn {
            path: path.to_owned(),
            source: Arc::new(source),
        }
    })?;
    let version = parse_version(&out).ok_or_else(|| Unavailable::NoVersion {
        path: path.to_owned(),
        // Its first line says what it is (`true (GNU coreutils) 9.1`); the rest is noise.
        output: {
            let first = out.trim().lines().next().unwrap_or_default();
            let mut shown: String = first.chars().take(80).collect();
            if shown.len() < first.len() || out.trim().lines().nth(1).is_some() {
                shown.push('…');
            }
            shown
        },
    })?;
    Ok((version, parse_gitid(&out)))
}

/// Root → direct; else `sudo -n`; else `--unprivileged`; each must pass `criu check`.
fn choose_privilege(path: &Path, version: CriuVersion, is_root: bool) -> Result<Criu, Unavailable> {
    let candidate = |privilege| Criu {
        path: path.to_owned(),
        version,
        privilege,
    };
    if is_root {
        let criu = candidate(Privilege::Root);
        return match check(&criu) {
            Ok(()) => Ok(criu),
            Err(e) => Err(check_failed(&criu, e)),
        };
    }
    let sudo = candidate(Privilege::Sudo);
    let sudo_reason = match check(&sudo) {
        Ok(()) => return Ok(sudo),
        Err(e) => reason(&e),
    };
    // Every criu the policy accepts knows --unprivileged (3.18 and later).
    let unpriv = candidate(Privilege::Unprivileged);
    let unprivileged_reason = match check(&unpriv) {
        Ok(()) => return Ok(unpriv),
        Err(e) => reason(&e),
    };
    Err(Unavailable::NoPrivilege {
        path: path.to_owned(),
        sudo: sudo_reason,
        unprivileged: unprivileged_reason,
    })
}

/// Why a check with one privilege mode failed, for [`Unavailable::NoPrivilege`].
fn reason(e: &crate::Error) -> Refusal {
    match e {
        crate::Error::Criu {
            errors,
            exit,
            failure,
            ..
        } => {
            // CRIU's refusal ends with a colon before the next line's setcap command, which
            // the message says in full anyway.
            let said = crate::criu_log::telling_line(errors).map_or_else(
                || exit.to_string(),
                |l| {
                    l.trim_end_matches(|c: char| c == ':' || c.is_whitespace())
                        .to_owned()
                },
            );
            match failure {
                Some(crate::criu_log::CriuFailure::NoPrivilege) => Refusal::NoPrivilege(said),
                _ => Refusal::CheckFailed(said),
            }
        }
        crate::Error::Timeout { after, .. } => Refusal::Timeout(*after),
        crate::Error::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Refusal::NotInstalled
        }
        crate::Error::Spawn { source, .. } => Refusal::CannotStart(source.to_string()),
        other => Refusal::CannotStart(other.to_string()),
    }
}

fn check_failed(criu: &Criu, e: crate::Error) -> Unavailable {
    let (errors, log) = match e {
        crate::Error::Criu { errors, log, .. } => (errors, Some(log)),
        crate::Error::Timeout { after, log, .. } => {
            (vec![format!("no answer within {after:?}")], Some(log))
        }
        other => (vec![format!("{other}")], None),
    };
    Unavailable::CheckFailed {
        path: criu.path.clone(),
        version: criu.version,
        errors,
        log,
    }
}

/// `criu check`, trusting its exit status.
fn check(criu: &Criu) -> crate::Result<()> {
    Invocation::new(criu, "check", Vec::new(), &[], Duration::from_secs(60))?
        .run()
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn inputs(pf_criu: Option<&Path>) -> ProbeInputs {
        ProbeInputs {
            os: "linux".into(),
            pf_criu: pf_criu.map(|p| p.as_os_str().to_owned()),
            path_var: Some(OsString::from("/nonexistent-dir")),
            is_root: true,
            search_dirs: Vec::new(),
        }
    }

    fn fake_criu(dir: &Path, script: &str) -> PathBuf {
        let path = dir.join("criu");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write fake criu");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn versions_parse() {
        let v = |a, b, c| CriuVersion {
            major: a,
            minor: b,
            sublevel: c,
        };
        assert_eq!(parse_version("Version: 4.1.1\n"), Some(v(4, 1, 1)));
        assert_eq!(
            parse_version("Version: 3.17\nGitID: v3.17-1-g0\n"),
            Some(v(3, 17, 0))
        );
        assert_eq!(parse_version("  Version: 4.0.1-rc2\n"), Some(v(4, 0, 1)));
        assert_eq!(parse_version("criu 4.1"), None);
        assert_eq!(parse_version("Version: x"), None);
        assert!(v(3, 17, 1) < v(4, 1, 1) && v(4, 0, 9) < policy::OLDEST_PATCHED);
        assert_eq!(v(4, 1, 1).to_string(), "4.1.1");
    }

    #[test]
    fn pf_criu_pointing_nowhere_is_the_answer() {
        let p = probe_with(&inputs(Some(Path::new("/nonexistent/criu"))));
        assert!(matches!(
            &p.result,
            Err(Unavailable::EnvPathMissing { path }) if path == Path::new("/nonexistent/criu")
        ));
        assert_eq!(p.path, None);
        let msg = p.result.expect_err("unavailable").to_string();
        assert!(msg.contains("$PF_CRIU"), "{msg}");
    }

    #[test]
    fn off_linux_is_unsupported() {
        let mut i = inputs(None);
        i.os = "macos".into();
        assert!(matches!(
            probe_with(&i).result,
            Err(Unavailable::NotLinux { os }) if os == "macos"
        ));
    }

    #[test]
    fn a_passed_check_is_remembered_only_for_the_same_binary() {
        let v = |major, minor, sublevel| CriuVersion {
            major,
            minor,
            sublevel,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = fake_criu(dir.path(), "echo 'Version: 4.1.1'");
        let key = binary_identity(&bin).expect("identity");
        assert_eq!(read_checked(dir.path(), &key), None);
        write_checked(
            &dir.path().join("run"),
            &key,
            v(4, 1, 1),
            Some("pf-4.1.1-1"),
        )
        .expect("write");
        assert_eq!(
            read_checked(&dir.path().join("run"), &key),
            Some((v(4, 1, 1), Some("pf-4.1.1-1".to_owned())))
        );
        write_checked(&dir.path().join("run"), &key, v(4, 2, 1), None).expect("write");
        assert_eq!(
            read_checked(&dir.path().join("run"), &key),
            Some((v(4, 2, 1), None))
        );
        // Another binary (here: the same path rewritten) is not the one that passed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let rewritten = fake_criu(dir.path(), "echo 'Version: 4.1.1'; echo changed");
        let other = binary_identity(&rewritten).expect("identity");
        assert_ne!(other, key);
        assert_eq!(read_checked(&dir.path().join("run"), &other), None);
    }

    #[test]
    fn inet_sockets_need_a_new_or_patched_criu_on_6_16() {
        let v = |major, minor, sublevel| CriuVersion {
            major,
            minor,
            sublevel,
        };
        let yes = |k, ver, id| matches!(inet_sockets_verdict(k, ver, id), InetSockets::Yes(_));
        assert!(yes("6.1.0-18-amd64", v(4, 1, 1), None));
        assert!(yes("6.15.9", v(4, 1, 1), None));
        assert!(!yes("6.16.0", v(4, 1, 1), None));
        assert!(!yes("6.18.44-fc-v857", v(4, 1, 1), Some("v4.1.1")));
        assert!(yes("6.18.44-fc-v857", v(4, 1, 1), Some("pf-4.1.1-1")));
        assert!(yes("7.0.1", v(4, 2, 0), None));
        assert_eq!(
            parse_gitid("Version: 4.1.1\nGitID: pf-4.1.1-1\n").as_deref(),
            Some("pf-4.1.1-1")
        );
        assert_eq!(parse_gitid("Version: 4.1.1\n"), None);
    }

    #[test]
    fn too_old_and_no_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = fake_criu(dir.path(), "echo 'Version: 3.15'");
        let p = probe_with(&inputs(Some(&old)));
        assert!(matches!(
            &p.result,
            Err(Unavailable::Refused { version, verdict: Verdict::TooOld, .. })
                if version.to_string() == "3.15.0"
        ));
        assert!(p.result.unwrap_err().to_string().contains("install-criu"));
        let dir = tempfile::tempdir().expect("tempdir");
        let garbled = fake_criu(dir.path(), "echo hello");
        assert!(matches!(
            probe_with(&inputs(Some(&garbled))).result,
            Err(Unavailable::NoVersion { output, .. }) if output == "hello"
        ));
        // Of a long answer, its first line, cut at 80 characters.
        let chatty = fake_criu(
            dir.path(),
            &format!(
                "echo '{}'; echo 'Copyright'; echo 'License'",
                "x".repeat(100)
            ),
        );
        let shown = format!("{}…", "x".repeat(80));
        assert!(matches!(
            probe_with(&inputs(Some(&chatty))).result,
            Err(Unavailable::NoVersion { output, .. }) if output == shown
        ));
    }

    #[test]
    fn failing_check_reports_criu_error_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A criu whose `check` writes a log like the real one and fails.
        let script = r#"
case "$1" in
  --version) echo 'Version: 4.2.1' ;;
  check)
    log=""
    while [ $# -gt 0 ]; do [ "$1" = "--log-file" ] && log="$2"; shift; done
    echo '(00.000100) Error (criu/util.c:1): rlimit: Can'"'"'t setup RLIMIT_NOFILE for self' > "$log"
    echo '(00.000200) Error (criu/vdso.c:2): vdso: Unexpected rt vDSO area bounds' >> "$log"
    exit 1 ;;
esac"#;
        let criu = fake_criu(dir.path(), script);
        let p = probe_with(&inputs(Some(&criu)));
        let Err(Unavailable::CheckFailed { errors, log, .. }) = &p.result else {
            panic!("expected CheckFailed, got {:?}", p.result);
        };
        assert_eq!(
            errors,
            &vec!["Error (criu/vdso.c:2): vdso: Unexpected rt vDSO area bounds".to_owned()]
        );
        let log = log.clone().expect("log kept");
        assert!(log.is_file());
        let msg = p.result.unwrap_err().to_string();
        assert!(msg.contains("Unexpected rt vDSO"), "{msg}");
        std::fs::remove_dir_all(log.parent().expect("log dir")).expect("cleanup");
    }

    #[test]
    fn fake_working_criu_is_usable_as_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let criu = fake_criu(
            dir.path(),
            "[ \"$1\" = --version ] && echo 'Version: 4.2.1'; [ \"$1\" = check ] && echo 'Looks good.'; exit 0",
        );
        let p = probe_with(&inputs(Some(&criu)));
        assert_eq!(
            p.criu().expect("usable"),
            &Criu {
                path: criu,
                version: parse_version("Version: 4.2.1").expect("v"),
                privilege: Privilege::Root,
            }
        );
    }

    /// The machine states of pf's CRIU policy, as `criu --version` prints them, and whether pf
    /// (and so `pf doctor` and `cargo xtask install-criu`) takes each.
    #[test]
    fn the_policy_decides_every_machine_state() {
        let states = [
            ("Version: 3.17.1\nGitID: v3.17.1\n", Some(Verdict::TooOld)),
            ("Version: 4.1.1\n", Some(Verdict::Unpatched)),
            (
                "Version: 4.1.1\nGitID: pf-4.1.1-1\n",
                Some(Verdict::Patched),
            ),
            ("Version: 4.2.1\nGitID: pf-4.2.1\n", Some(Verdict::Upstream)),
            ("Version: 4.2.1\n", Some(Verdict::Upstream)),
        ];
        for (version, verdict) in states {
            let dir = tempfile::tempdir().expect("tempdir");
            let criu = fake_criu(
                dir.path(),
                &format!(
                    "[ \"$1\" = --version ] && printf '{}'; [ \"$1\" = check ] && echo 'Looks good.'; exit 0",
                    version.replace('\n', "\\n")
                ),
            );
            let p = probe_with(&inputs(Some(&criu)));
            assert_eq!(p.verdict, verdict, "{version}");
            let accepted = verdict.is_some_and(Verdict::accepted);
            assert_eq!(p.result.is_ok(), accepted, "{version}: {:?}", p.result);
            if !accepted {
                let msg = p.result.expect_err("refused").to_string();
                assert!(
                    msg.contains("install-criu") && msg.contains("4.2.1"),
                    "{msg}"
                );
            }
        }
        // No criu at all: neither $PATH nor the directories after it hold one.
        let p = probe_with(&inputs(None));
        assert!(matches!(p.result, Err(Unavailable::NotFound)), "{p:?}");
        assert_eq!((p.path, p.verdict), (None, None));
    }

    #[test]
    fn no_privilege_says_why_once_and_cleanly() {
        // A criu run as `nobody` without the capability: sudo is missing, criu refuses with
        // its two-line message on stdout.
        let dir = tempfile::tempdir().expect("tempdir");
        let criu = fake_criu(
            dir.path(),
            "case \"$1\" in --version) echo 'Version: 4.2.1';; *) \
             echo 'CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: '; \
             echo \"setcap cap_checkpoint_restore+eip $0\"; exit 1;; esac",
        );
        let mut i = inputs(Some(&criu));
        i.is_root = false;
        let p = probe_with(&i);
        let Err(Unavailable::NoPrivilege {
            unprivileged, sudo, ..
        }) = &p.result
        else {
            panic!("expected NoPrivilege, got {:?}", p.result);
        };
        assert_eq!(
            unprivileged,
            &Refusal::NoPrivilege(
                "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability"
                    .to_owned()
            )
        );
        assert!(!matches!(sudo, Refusal::CheckFailed(_)), "{sudo:?}");
        let err = crate::Error::from(p.result.clone().expect_err("no privilege"));
        assert_eq!(err.kind(), crate::ErrorKind::NeedsPrivilege);
        // The chain as anyhow's `{:#}` prints it: the explanation once, no stray `capability:)`.
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        assert_eq!(chain.matches("cannot get privileges").count(), 1, "{chain}");
        assert!(!chain.contains("capability:)"), "{chain}");
        // The failed checks kept their work dirs: remove those of this fake criu.
        for entry in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let said = std::fs::read_to_string(entry.path().join("criu.stdout"));
            if said.is_ok_and(|s| s.contains(&*criu.to_string_lossy())) {
                std::fs::remove_dir_all(entry.path()).expect("remove kept work dir");
            }
        }
    }
}
