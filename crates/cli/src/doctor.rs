//! `pf doctor`: can this machine checkpoint and restore, and what to fix.
//!
//! Each check is ✓ or ✗ with a one-line fix. The criu checks read pf-world-procs' probe (the only
//! crate that runs criu), which applies pf's one CRIU policy (`pf_world_procs::criu::policy`, the
//! same that `cargo xtask install-criu` follows): doctor says ✓ exactly where pf works. The others look at the kernel, sudo, namespaces, userfaultfd and the
//! store directory directly. Nothing here panics or stops early: a missing file or program is a
//! failed check. Exit status 0 only when every required check passes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};

use anyhow::Context as _;
use pf_world_procs::criu::{Privilege, Probe, Unavailable, Verdict, policy};

use crate::common::{self, Global};

/// Check kernel, criu, privileges, namespaces, userfaultfd and the store directory.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each line is one check, ✓ or ✗; a ✗ line is followed by the fix. Checks marked optional do not
change the exit status.

Exit status: 0 when every required check passes, 1 otherwise.

Examples:
  pf doctor
  pf doctor --json | jq '.checks[] | select(.ok | not)'
  PF_CRIU=/opt/criu/sbin/criu pf doctor     # try a particular criu")]
pub(crate) struct Args {
    /// Print the checks as JSON on stdout (`{"kind":"pf.doctor.v1","ok":…,"checks":[…]}`)
    #[arg(long)]
    json: bool,
}

/// The fix for a missing, refused or broken criu.
const INSTALL_CRIU: &str = policy::INSTALL_HINT;

/// The label of the policy check.
const POLICY_LABEL: &str = "criu accepted";

/// The fix of a check that could not run because an earlier one failed.
const FIX_CRIU_FOUND: &str = "fix `criu found` first";

/// One check's outcome.
#[derive(Debug)]
struct Check {
    /// Stable identifier for programs (`criu-check`).
    id: &'static str,
    /// Short label for people (`criu check`).
    label: &'static str,
    ok: bool,
    /// Whether a failure makes doctor exit 1.
    required: bool,
    /// What was found.
    detail: String,
    /// What to do when `ok` is false.
    fix: Option<String>,
}

impl Check {
    fn pass(id: &'static str, label: &'static str, detail: impl Into<String>) -> Self {
        Self {
            id,
            label,
            ok: true,
            required: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(
        id: &'static str,
        label: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            id,
            label,
            ok: false,
            required: true,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn optional(mut self) -> Self {
        self.required = false;
        self
    }
}

pub(crate) fn run(global: &Global, args: &Args) -> anyhow::Result<ExitCode> {
    let is_root = nix::unistd::geteuid().is_root();
    let probe = pf_world_procs::criu::probe();
    let sudo = if is_root { None } else { Some(sudo_works()) };

    let mut checks = vec![kernel_check()];
    checks.extend(criu_checks(probe));
    checks.push(socket_check(probe));
    checks.push(privilege_check(is_root, probe, sudo.as_ref()));
    checks.push(namespace_check(is_root));
    checks.push(session_check(nix::unistd::getsid(None).map(|p| p.as_raw())));
    checks.push(userfaultfd_check(is_root, probe));
    checks.push(kernel_cache_check(&KernelCache::read(Path::new(KDAT_DIR))));
    checks.push(store_check(global));

    let all_required_ok = checks.iter().all(|c| c.ok || !c.required);
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = to_json(&checks, probe, all_required_ok);
        writeln!(out, "{doc:#}").context("write to stdout")?;
    } else {
        write_human(&mut out, &checks, all_required_ok).context("write to stdout")?;
    }
    Ok(if all_required_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_human(out: &mut dyn std::io::Write, checks: &[Check], ok: bool) -> std::io::Result<()> {
    let width = checks
        .iter()
        .map(|c| c.label.chars().count())
        .max()
        .unwrap_or(0);
    for c in checks {
        let mark = if c.ok { "✓" } else { "✗" };
        let optional = if c.ok || c.required {
            ""
        } else {
            " (optional)"
        };
        let pad = width - c.label.chars().count();
        writeln!(out, "{mark} {}{:pad$}  {}{optional}", c.label, "", c.detail)?;
        if let Some(fix) = c.fix.as_deref().filter(|_| !c.ok) {
            writeln!(out, "  {:width$}  fix: {fix}", "")?;
        }
    }
    let failed = checks.iter().filter(|c| !c.ok && c.required).count();
    if ok {
        writeln!(out, "\nthis machine can checkpoint and restore")
    } else {
        writeln!(
            out,
            "\n{failed} required check(s) failed: apply the fixes above and run `pf doctor` again"
        )
    }
}

fn to_json(checks: &[Check], probe: &Probe, ok: bool) -> serde_json::Value {
    let criu = probe.criu().ok();
    serde_json::json!({
        "kind": "pf.doctor.v1",
        "ok": ok,
        "criu": {
            "path": probe.path.as_ref().map(|p| p.display().to_string()),
            "version": probe.version.map(|v| v.to_string()),
            "usable": criu.is_some(),
            "privilege": criu.map(|c| privilege_name(c.privilege)),
        },
        "checks": checks.iter().map(|c| serde_json::json!({
            "id": c.id,
            "label": c.label,
            "ok": c.ok,
            "required": c.required,
            "detail": c.detail,
            "fix": c.fix,
        })).collect::<Vec<_>>(),
    })
}

fn privilege_name(p: Privilege) -> &'static str {
    match p {
        Privilege::Root => "root",
        Privilege::Sudo => "sudo",
        Privilege::Unprivileged => "unprivileged",
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel

/// What a kernel config says about one option.
#[derive(Debug, PartialEq, Eq)]
enum ConfigValue {
    Yes,
    Module,
    NotSet,
    Absent,
}

/// Look up `option` (`CONFIG_X`) in kernel config text.
fn config_value(text: &str, option: &str) -> ConfigValue {
    for line in text.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix(option).and_then(|r| r.strip_prefix('=')) {
            return match value {
                "y" => ConfigValue::Yes,
                "m" => ConfigValue::Module,
                _ => ConfigValue::NotSet,
            };
        }
        if line == format!("# {option} is not set") {
            return ConfigValue::NotSet;
        }
    }
    ConfigValue::Absent
}

/// `/proc/config.gz` (through `gzip -dc`), else `/boot/config-<release>`: the text and where it
/// came from.
fn kernel_config() -> Option<(String, String)> {
    let gz = Path::new("/proc/config.gz");
    if gz.exists() {
        let mut cmd = spawn("gzip");
        cmd.arg("-dc").arg(gz);
        if let Ok(out) = cmd.output().filter_ok() {
            return Some((
                String::from_utf8_lossy(&out.stdout).into_owned(),
                gz.display().to_string(),
            ));
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let boot = PathBuf::from(format!("/boot/config-{}", release.trim()));
    let text = std::fs::read_to_string(&boot).ok()?;
    Some((text, boot.display().to_string()))
}

fn kernel_check() -> Check {
    const ID: &str = "kernel";
    const LABEL: &str = "kernel";
    const OPTION: &str = "CONFIG_CHECKPOINT_RESTORE";
    if std::env::consts::OS != "linux" {
        return Check::fail(
            ID,
            LABEL,
            format!("{} is not Linux", std::env::consts::OS),
            "CRIU runs only on Linux",
        );
    }
    let fix =
        "boot a kernel built with CONFIG_CHECKPOINT_RESTORE=y (most distribution kernels are)";
    if let Some((text, source)) = kernel_config() {
        match config_value(&text, OPTION) {
            ConfigValue::Yes => return Check::pass(ID, LABEL, format!("{OPTION}=y ({source})")),
            ConfigValue::Module | ConfigValue::NotSet => {
                return Check::fail(ID, LABEL, format!("{OPTION} is not set ({source})"), fix);
            }
            ConfigValue::Absent => {}
        }
    }
    // No readable config: these files exist only with CONFIG_CHECKPOINT_RESTORE.
    let probes = ["/proc/self/map_files", "/proc/sys/kernel/ns_last_pid"];
    let missing: Vec<&str> = probes
        .iter()
        .copied()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        Check::pass(
            ID,
            LABEL,
            "checkpoint/restore support (no kernel config to read; /proc/self/map_files and \
             /proc/sys/kernel/ns_last_pid exist)",
        )
    } else {
        Check::fail(
            ID,
            LABEL,
            format!(
                "no checkpoint/restore support: {} missing",
                missing.join(" and ")
            ),
            fix,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// criu

fn criu_source(path: &Path) -> &'static str {
    if std::env::var_os("PF_CRIU").is_some_and(|v| !v.is_empty()) {
        return "from $PF_CRIU";
    }
    let in_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| Some(dir.as_path()) == path.parent()));
    if in_path {
        "on PATH"
    } else {
        "in a standard sbin directory"
    }
}

/// criu found, its version, whether pf's CRIU policy accepts it, `criu check`.
fn criu_checks(probe: &Probe) -> Vec<Check> {
    let found = match (&probe.path, &probe.result) {
        (Some(path), _) => Check::pass(
            "criu-found",
            "criu found",
            format!("{} ({})", path.display(), criu_source(path)),
        ),
        (None, Err(Unavailable::EnvPathMissing { path })) => Check::fail(
            "criu-found",
            "criu found",
            format!("$PF_CRIU is {} but there is no such file", path.display()),
            "unset $PF_CRIU or point it at a criu 4.2 or newer; `cargo xtask install-criu` builds \
             CRIU 4.2.1",
        ),
        (None, Err(Unavailable::NotLinux { os })) => Check::fail(
            "criu-found",
            "criu found",
            format!("CRIU needs Linux; this is {os}"),
            "run pf on Linux",
        ),
        (None, _) => Check::fail(
            "criu-found",
            "criu found",
            "no criu in $PATH, /usr/local/sbin, /usr/sbin or /sbin",
            INSTALL_CRIU,
        ),
    };
    let Some(path) = &probe.path else {
        let detail = "no criu to ask";
        return vec![
            found,
            Check::fail("criu-version", "criu version", detail, FIX_CRIU_FOUND),
            Check::fail("criu-version-ok", POLICY_LABEL, detail, FIX_CRIU_FOUND),
            Check::fail("criu-check", "criu check", detail, FIX_CRIU_FOUND),
        ];
    };
    let (version, new_enough) = match (probe.version, probe.verdict) {
        (Some(v), Some(verdict)) => {
            let gitid = probe
                .gitid
                .as_deref()
                .map(|g| format!(" (GitID {g})"))
                .unwrap_or_default();
            let version = Check::pass("criu-version", "criu version", format!("{v}{gitid}"));
            let ok = |detail: String| Check::pass("criu-version-ok", POLICY_LABEL, detail);
            let refused =
                |detail: String| Check::fail("criu-version-ok", POLICY_LABEL, detail, INSTALL_CRIU);
            let new_enough = match verdict {
                Verdict::Upstream => ok(format!("{v} ≥ {}", policy::UPSTREAM_FIXED)),
                Verdict::Patched => ok(format!("{v} with pf's socket patch{gitid}")),
                Verdict::TooOld => refused(format!(
                    "{v} is too old: pf needs {} (criu before 4.x fails on kernels with a \
                     [vvar_vclock] mapping)",
                    policy::ACCEPTED
                )),
                Verdict::Unpatched => refused(format!(
                    "{v} without pf's socket patch cannot dump TCP/UDP sockets on Linux 6.16 and \
                     later: pf needs {}",
                    policy::ACCEPTED
                )),
            };
            (version, new_enough)
        }
        _ => {
            let why = match &probe.result {
                Err(e) => e.to_string(),
                Ok(_) => "no version reported".to_owned(),
            };
            let version = Check::fail("criu-version", "criu version", why, INSTALL_CRIU);
            let new_enough = Check::fail(
                "criu-version-ok",
                POLICY_LABEL,
                "unknown version",
                INSTALL_CRIU,
            );
            (version, new_enough)
        }
    };
    let check = match &probe.result {
        Ok(criu) => Check::pass(
            "criu-check",
            "criu check",
            format!("passes (run {})", privilege_phrase(criu.privilege)),
        ),
        Err(Unavailable::CheckFailed { errors, log, .. }) => {
            let first = pf_world_procs::criu_log::telling_line(errors)
                .unwrap_or("no Error line in its log");
            let log = log
                .as_ref()
                .map(|l| format!(" (log: {})", l.display()))
                .unwrap_or_default();
            Check::fail(
                "criu-check",
                "criu check",
                format!("fails: {first}{log}"),
                INSTALL_CRIU,
            )
        }
        Err(Unavailable::NoPrivilege { .. }) => Check::fail(
            "criu-check",
            "criu check",
            "could not be run: no privileges (see privileges)",
            "see the privileges fix",
        ),
        Err(Unavailable::Refused { .. }) => Check::fail(
            "criu-check",
            "criu check",
            format!(
                "not run: pf does not use {} (see {POLICY_LABEL})",
                path.display()
            ),
            INSTALL_CRIU,
        ),
        Err(e) => Check::fail(
            "criu-check",
            "criu check",
            format!("not run: {e}"),
            INSTALL_CRIU,
        ),
    };
    vec![found, version, new_enough, check]
}

fn privilege_phrase(p: Privilege) -> &'static str {
    match p {
        Privilege::Root => "as root",
        Privilege::Sudo => "through `sudo -n`",
        Privilege::Unprivileged => "with --unprivileged (criu carries CAP_CHECKPOINT_RESTORE)",
    }
}

// ---------------------------------------------------------------------------------------------
// Privileges, namespaces, userfaultfd

/// Whether `sudo -n true` works; `Err` says why not (no sudo binary, needs a password, …).
fn sudo_works() -> Result<(), String> {
    let mut cmd = spawn("sudo");
    cmd.args(["-n", "true"]);
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(first_line_or(
            &out.stderr,
            &format!("sudo -n true: {}", out.status),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("sudo is not installed".into()),
        Err(e) => Err(format!("cannot run sudo: {e}")),
    }
}

fn privilege_check(is_root: bool, probe: &Probe, sudo: Option<&Result<(), String>>) -> Check {
    const ID: &str = "privileges";
    const LABEL: &str = "privileges";
    if is_root {
        return Check::pass(ID, LABEL, "root: pf runs criu directly");
    }
    if let Ok(criu) = probe.criu() {
        return Check::pass(
            ID,
            LABEL,
            format!(
                "not root: pf runs criu {}{}",
                privilege_phrase(criu.privilege),
                if criu.privilege == Privilege::Sudo {
                    " (a restore hands criu descriptors with `sudo -C`, which sudoers must allow: \
                     `Defaults closefrom_override`)"
                } else {
                    ""
                }
            ),
        );
    }
    let criu_path = probe.path.as_ref().map_or_else(
        || "/usr/local/sbin/criu".to_owned(),
        |p| p.display().to_string(),
    );
    let fix = format!(
        "run pf as root, allow passwordless sudo, or `sudo setcap cap_checkpoint_restore+eip {criu_path}`"
    );
    match (&probe.result, sudo) {
        (
            Err(Unavailable::NoPrivilege {
                sudo, unprivileged, ..
            }),
            _,
        ) => Check::fail(
            ID,
            LABEL,
            format!("not root; `sudo -n` {sudo}; criu with --unprivileged {unprivileged}"),
            fix,
        ),
        (_, Some(Ok(()))) => Check::pass(
            ID,
            LABEL,
            "not root: pf runs criu through `sudo -n` (a thaw hands criu descriptors with \
             `sudo -C`, which sudoers must allow: `Defaults closefrom_override`)",
        ),
        (_, Some(Err(why))) => Check::fail(
            ID,
            LABEL,
            format!(
                "not root and `sudo -n` does not work ({why}); criu capabilities unknown without a criu"
            ),
            fix,
        ),
        (_, None) => Check::fail(ID, LABEL, "not root", fix),
    }
}

fn namespace_check(is_root: bool) -> Check {
    const ID: &str = "namespaces";
    const LABEL: &str = "namespaces";
    const ARGS: [&str; 5] = ["--pid", "--fork", "--mount-proc", "--", "true"];
    if !is_root {
        // pf makes the namespaces itself (its own init as PID 1), not through sudo: creating a
        // PID namespace needs CAP_SYS_ADMIN in pf's own process.
        return Check::fail(
            ID,
            LABEL,
            "not root: pf creates the new PID + mount namespaces that goblin thaw and fork, shell \
             beam and procs restore --new-pidns use in its own process, which needs root",
            "run pf as root (e.g. `sudo pf …`)",
        );
    }
    let mut cmd = spawn("unshare");
    cmd.args(ARGS);
    match cmd.output() {
        Ok(out) if out.status.success() => Check::pass(
            ID,
            LABEL,
            "a new PID + mount namespace with its own /proc can be created (fork)",
        ),
        Ok(out) => Check::fail(
            ID,
            LABEL,
            format!(
                "`unshare --pid --fork --mount-proc true` failed: {}",
                first_line_or(&out.stderr, &out.status.to_string())
            ),
            "fork needs PID and mount namespaces: allow them (e.g. outside a restrictive container, \
             or with `--privileged` for a container)",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::fail(
            ID,
            LABEL,
            "cannot probe: `unshare` is not installed",
            "apt-get install util-linux",
        ),
        Err(e) => Check::fail(
            ID,
            LABEL,
            format!("cannot run unshare: {e}"),
            "apt-get install util-linux",
        ),
    }
}

/// Whether the session pf runs in is led from inside this pid namespace (optional). `getsid` says
/// 0 when its leader is in an outer namespace, as in a container or `unshare --pid` whose first
/// process kept its parent's session; criu refuses to dump a process of such a session, so
/// `pf procs capture` of a program started from here without setsid fails (goblins and shells
/// pf starts lead sessions of their own).
fn session_check(sid: nix::Result<i32>) -> Check {
    const ID: &str = "session";
    const LABEL: &str = "session";
    match sid {
        Ok(0) => Check::fail(
            ID,
            LABEL,
            "this session was begun outside this pid namespace: criu cannot capture a process \
             started from here without setsid (`pf procs capture --pid`)",
            "start the programs you will capture with `setsid PROGRAM`",
        )
        .optional(),
        Ok(sid) => Check::pass(
            ID,
            LABEL,
            format!("this session (led by pid {sid}) is inside this pid namespace"),
        ),
        Err(err) => Check::fail(
            ID,
            LABEL,
            format!("cannot read this process's session: {err}"),
            "nothing to do for goblins and shells; `pf procs capture` may fail",
        )
        .optional(),
    }
}

/// Whether the criu found can dump TCP/UDP sockets on this kernel (optional: goblins on pipes
/// need none).
fn socket_check(probe: &Probe) -> Check {
    const ID: &str = "criu-sockets";
    const LABEL: &str = "criu sockets";
    let Some(version) = probe.version else {
        // No version: either no criu at all or one the version checks above refused.
        let fix = if probe.path.is_some() {
            "fix `criu version` first"
        } else {
            FIX_CRIU_FOUND
        };
        return Check::fail(ID, LABEL, "no criu to ask", fix).optional();
    };
    match pf_world_procs::criu::inet_sockets(version, probe.gitid.as_deref()) {
        pf_world_procs::criu::InetSockets::Yes(why) => Check::pass(ID, LABEL, why).optional(),
        pf_world_procs::criu::InetSockets::No(why) => Check::fail(
            ID,
            LABEL,
            why,
            "`cargo xtask install-criu` (in pf's source tree) builds CRIU 4.2.1, which can",
        )
        .optional(),
    }
}

fn userfaultfd_check(is_root: bool, probe: &Probe) -> Check {
    const ID: &str = "userfaultfd";
    const LABEL: &str = "userfaultfd";
    let dev = Path::new("/dev/userfaultfd");
    let sysctl = Path::new("/proc/sys/vm/unprivileged_userfaultfd");
    if !dev.exists() && !sysctl.exists() {
        return Check::fail(
            ID,
            LABEL,
            "kernel without userfaultfd (neither /dev/userfaultfd nor vm.unprivileged_userfaultfd)",
            "lazy thaw (`pf goblin thaw|fork --lazy`) needs a kernel built with \
             CONFIG_USERFAULTFD=y; without it pf thaws eagerly (`--eager`), which works",
        )
        .optional();
    }
    let privileged = is_root || probe.criu().is_ok_and(|c| c.privilege == Privilege::Sudo);
    if privileged {
        return Check::pass(
            ID,
            LABEL,
            "available to criu (required for lazy thaw: `pf goblin thaw|fork --lazy`)",
        )
        .optional();
    }
    let unprivileged = std::fs::read_to_string(sysctl).is_ok_and(|v| v.trim() == "1");
    let dev_ok = nix::unistd::access(
        dev,
        nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
    )
    .is_ok();
    if unprivileged || dev_ok {
        Check::pass(
            ID,
            LABEL,
            "available without root (required for lazy thaw: `pf goblin thaw|fork --lazy`)",
        )
        .optional()
    } else {
        Check::fail(
            ID,
            LABEL,
            "the kernel has it, but not for unprivileged users: lazy thaw (`--lazy`) cannot work",
            "sysctl vm.unprivileged_userfaultfd=1, or give your user access to /dev/userfaultfd",
        )
        .optional()
    }
}

// ---------------------------------------------------------------------------------------------
// CRIU's cache of its kernel probe

/// Where criu keeps its probe of the kernel (`KDAT_RUNDIR` in criu's build; `/run` in Debian's
/// and in `cargo xtask install-criu`'s).
const KDAT_DIR: &str = "/run";

/// What `/run` says about criu's kernel cache (criu/kerndat.c: `criu.kdat`, written through
/// `criu.kdat.tmp`, kept only on a tmpfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelCache {
    /// Whether the directory is a tmpfs, if it could be told.
    tmpfs: Option<bool>,
    /// `criu.kdat` is there.
    cached: bool,
    /// `criu.kdat.tmp` is there.
    leftover: bool,
}

impl KernelCache {
    fn read(dir: &Path) -> Self {
        let tmpfs = nix::sys::statfs::statfs(dir)
            .ok()
            .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        Self {
            tmpfs,
            cached: dir.join("criu.kdat").exists(),
            leftover: dir.join("criu.kdat.tmp").symlink_metadata().is_ok(),
        }
    }
}

/// Whether criu can keep what it learns about the kernel between runs. Without it, every criu
/// run probes the kernel again (forks `iptables`, reads the vDSO, tries every huge page size …):
/// 11–15 ms of each restore of a 64 MiB goblin here, against under 1 ms with the cache. Never
/// required: nothing fails without it.
fn kernel_cache_check(cache: &KernelCache) -> Check {
    const ID: &str = "criu-cache";
    const LABEL: &str = "criu cache";
    const COST: &str =
        "criu probes the kernel again on every run (10–15 ms of each freeze and thaw)";
    let check = if cache.cached {
        Check::pass(
            ID,
            LABEL,
            format!("criu keeps its probe of the kernel in {KDAT_DIR}/criu.kdat"),
        )
    } else if cache.tmpfs == Some(false) {
        Check::fail(
            ID,
            LABEL,
            format!("{KDAT_DIR} is not a tmpfs: {COST}"),
            format!(
                "nothing breaks; criu keeps its probe of the kernel only on a tmpfs {KDAT_DIR} \
                 (systemd mounts one at boot)"
            ),
        )
    } else if cache.leftover {
        Check::fail(
            ID,
            LABEL,
            format!(
                "{KDAT_DIR}/criu.kdat.tmp, left by a criu stopped while writing it, keeps criu \
                 from saving its probe of the kernel: {COST}"
            ),
            format!("rm {KDAT_DIR}/criu.kdat.tmp"),
        )
    } else {
        Check::pass(
            ID,
            LABEL,
            format!("criu keeps its probe of the kernel in {KDAT_DIR}/criu.kdat from its next run"),
        )
    };
    check.optional()
}

// ---------------------------------------------------------------------------------------------
// The store

fn store_check(global: &Global) -> Check {
    const ID: &str = "store";
    const LABEL: &str = "store";
    use std::os::unix::fs::PermissionsExt as _;
    let root = match common::store_root(global) {
        Ok(root) => root,
        Err(e) => {
            return Check::fail(
                ID,
                LABEL,
                format!("{e:#}"),
                "pass --store DIR or set $PF_STORE",
            );
        }
    };
    let shown = root.display();
    match std::fs::metadata(&root) {
        Ok(meta) if !meta.is_dir() => Check::fail(
            ID,
            LABEL,
            format!("{shown} exists but is not a directory"),
            "move it away, or pass --store DIR",
        ),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            let access = nix::unistd::access(
                &root,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            );
            let writable = access.is_ok();
            if mode & 0o077 != 0 {
                Check::fail(
                    ID,
                    LABEL,
                    format!("{shown} is mode {mode:04o}: others can read process images"),
                    format!("chmod 700 {shown}"),
                )
            } else if access == Err(nix::errno::Errno::EROFS) {
                // No owner or mode change helps a read-only mount.
                Check::fail(
                    ID,
                    LABEL,
                    format!("{shown} is on a read-only file system"),
                    "remount it read-write, or pass --store DIR on a writable one",
                )
            } else if !writable {
                Check::fail(
                    ID,
                    LABEL,
                    format!("{shown} is not writable by this user"),
                    format!("chown to your user and chmod 700 {shown}, or pass --store DIR"),
                )
            } else {
                match pf_core::FsBlobStore::open_existing(&root) {
                    // The rule every command goes by: a directory of other things is no store.
                    Err(e @ pf_core::Error::NotAStore { .. }) => Check::fail(
                        ID,
                        LABEL,
                        e.to_string(),
                        "pass --store DIR (or set $PF_STORE) naming the store's own directory, or \
                         a new or empty one",
                    ),
                    _ => Check::pass(ID, LABEL, format!("{shown} (mode {mode:04o})")),
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ancestor = root.ancestors().skip(1).find(|a| a.exists());
            match ancestor {
                Some(a)
                    if nix::unistd::access(
                        a,
                        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
                    )
                    .is_ok() =>
                {
                    Check::pass(
                        ID,
                        LABEL,
                        format!("{shown} does not exist yet; pf creates it with mode 0700"),
                    )
                }
                Some(a) => Check::fail(
                    ID,
                    LABEL,
                    format!("{shown} does not exist and {} is not writable", a.display()),
                    format!("mkdir -m 700 -p {shown} as a user who may, or pass --store DIR"),
                ),
                None => Check::fail(
                    ID,
                    LABEL,
                    format!("{shown} has no existing parent directory"),
                    "pass --store DIR with an absolute path",
                ),
            }
        }
        Err(e) => Check::fail(
            ID,
            LABEL,
            format!("cannot stat {shown}: {e}"),
            "fix the permissions of its parent directories, or pass --store DIR",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The one way doctor starts a probe process: stdin closed, working directory `/`, stdout and
/// stderr piped. Callers use `Command::output`, which reads both pipes at once, so a chatty child
/// cannot deadlock on a full pipe. The probes (`gzip -dc`, `sudo -n true`, `unshare … true`) do
/// not wait for input, so they need no deadline.
fn spawn(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

trait OutputExt {
    fn filter_ok(self) -> Result<Output, ()>;
}

impl OutputExt for std::io::Result<Output> {
    /// Only a run that exited 0.
    fn filter_ok(self) -> Result<Output, ()> {
        match self {
            Ok(out) if out.status.success() => Ok(out),
            _ => Err(()),
        }
    }
}

/// The first non-empty line of a child's stderr, else `fallback`.
fn first_line_or(bytes: &[u8], fallback: &str) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map_or_else(|| fallback.to_owned(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_led_from_outside_the_pid_namespace_is_an_optional_failure() {
        let outside = session_check(Ok(0));
        assert!(!outside.ok && !outside.required);
        assert!(outside.detail.contains("outside this pid namespace"));
        assert!(outside.fix.as_deref().is_some_and(|f| f.contains("setsid")));
        let inside = session_check(Ok(4242));
        assert!(
            inside.ok && inside.detail.contains("4242"),
            "{}",
            inside.detail
        );
        let unknown = session_check(Err(nix::errno::Errno::EPERM));
        assert!(!unknown.ok && !unknown.required);
    }

    #[test]
    fn reads_kernel_config_values() {
        let text = "#\n# General setup\nCONFIG_CHECKPOINT_RESTORE=y\nCONFIG_USERFAULTFD=m\n\
                    # CONFIG_FOO is not set\nCONFIG_FOOBAR=y\n";
        assert_eq!(
            config_value(text, "CONFIG_CHECKPOINT_RESTORE"),
            ConfigValue::Yes
        );
        assert_eq!(
            config_value(text, "CONFIG_USERFAULTFD"),
            ConfigValue::Module
        );
        assert_eq!(config_value(text, "CONFIG_FOO"), ConfigValue::NotSet);
        assert_eq!(config_value(text, "CONFIG_BAR"), ConfigValue::Absent);
        assert_eq!(
            config_value("", "CONFIG_CHECKPOINT_RESTORE"),
            ConfigValue::Absent
        );
    }

    #[test]
    fn human_output_shows_fixes_for_failures_only() {
        let checks = [
            Check::pass("a", "first", "fine"),
            Check::fail("b", "second one", "broken", "do this"),
            Check::fail("c", "third", "missing", "maybe that").optional(),
        ];
        let mut out = Vec::new();
        write_human(&mut out, &checks, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "✓ first       fine\n\
             ✗ second one  broken\n\
             \x20             fix: do this\n\
             ✗ third       missing (optional)\n\
             \x20             fix: maybe that\n\
             \n1 required check(s) failed: apply the fixes above and run `pf doctor` again\n"
        );
    }

    #[test]
    fn first_line_of_stderr() {
        assert_eq!(
            first_line_or(b"\n  unshare: nope \nmore", "x"),
            "unshare: nope"
        );
        assert_eq!(first_line_or(b"", "exit status: 1"), "exit status: 1");
    }
    #[test]
    fn criu_cache_is_optional_and_says_why_it_is_missing() {
        let cache = |tmpfs, cached, leftover| {
            kernel_cache_check(&KernelCache {
                tmpfs,
                cached,
                leftover,
            })
        };
        for check in [
            cache(Some(true), true, false),
            cache(Some(false), true, true),
        ] {
            assert!(check.ok && !check.required, "{check:?}");
            assert!(check.detail.contains("/run/criu.kdat"), "{check:?}");
        }
        let ext4 = cache(Some(false), false, true);
        assert!(!ext4.ok && !ext4.required);
        assert!(ext4.detail.contains("not a tmpfs"), "{ext4:?}");
        assert!(ext4.fix.as_deref().is_some_and(|f| f.contains("tmpfs")));
        let stuck = cache(Some(true), false, true);
        assert!(!stuck.ok && !stuck.required);
        assert_eq!(stuck.fix.as_deref(), Some("rm /run/criu.kdat.tmp"));
        let unknown = cache(None, false, true);
        assert_eq!(unknown.fix.as_deref(), Some("rm /run/criu.kdat.tmp"));
        let fresh = cache(Some(true), false, false);
        assert!(fresh.ok && fresh.detail.contains("next run"), "{fresh:?}");
    }

    #[test]
    fn criu_cache_reads_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let read = KernelCache::read(dir.path());
        assert!(!read.cached && !read.leftover);
        std::fs::write(dir.path().join("criu.kdat.tmp"), b"").unwrap();
        std::fs::write(dir.path().join("criu.kdat"), b"x").unwrap();
        let read = KernelCache::read(dir.path());
        assert!(read.cached && read.leftover);
        assert_eq!(
            KernelCache::read(Path::new("/proc")).tmpfs,
            Some(false),
            "/proc is a procfs"
        );
    }
}
