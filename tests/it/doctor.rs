//! `pf doctor`: a failed check is ✗ with its fix and exit status 1; on a machine with a working
//! CRIU everything is ✓ and the exit status is 0.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;

use crate::support::pf;

/// Every check, in the order pf prints them.
const CHECK_IDS: [&str; 12] = [
    "kernel",
    "criu-found",
    "criu-version",
    "criu-version-ok",
    "criu-check",
    "criu-sockets",
    "privileges",
    "namespaces",
    "session",
    "userfaultfd",
    "criu-cache",
    "store",
];

/// `pf doctor` with `PF_CRIU` set to `criu`, a PATH without criu, and temp files under `tmp`.
fn doctor(store: &Path, tmp: &Path, criu: &Path, json: bool) -> Output {
    let mut cmd = pf(store);
    cmd.arg("doctor")
        .env("PF_CRIU", criu)
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", tmp);
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run pf doctor")
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pf doctor --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn check<'a>(doc: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    doc["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {doc:#}"))
}

#[test]
fn doctor_without_criu_fails_and_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = doctor(
        &dir.path().join("store"),
        dir.path(),
        Path::new("/nonexistent/criu"),
        false,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("✗ criu found"), "{stdout}");
    assert!(stdout.contains("$PF_CRIU is /nonexistent/criu"), "{stdout}");
    assert!(stdout.contains("cargo xtask install-criu"), "{stdout}");
    assert!(stdout.contains("required check(s) failed"), "{stdout}");
}

#[test]
fn doctor_json_lists_every_check_with_fixes_for_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = doctor(
        &dir.path().join("store"),
        dir.path(),
        Path::new("/nonexistent/criu"),
        true,
    );
    assert_eq!(out.status.code(), Some(1));
    let doc = json_of(&out);
    assert_eq!(doc["kind"], "pf.doctor.v1");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["criu"]["path"], serde_json::Value::Null);
    assert_eq!(doc["criu"]["usable"], false);
    let ids: Vec<&str> = doc["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| c["id"].as_str().expect("id is a string"))
        .collect();
    assert_eq!(ids, CHECK_IDS);
    for c in doc["checks"].as_array().expect("checks") {
        assert!(c["ok"].is_boolean() && c["required"].is_boolean(), "{c}");
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
        if c["ok"] == false {
            assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{c}");
        } else {
            assert_eq!(c["fix"], serde_json::Value::Null, "{c}");
        }
    }
    let found = check(&doc, "criu-found");
    assert_eq!(found["ok"], false);
    assert!(
        found["fix"]
            .as_str()
            .is_some_and(|f| f.contains("cargo xtask install-criu"))
    );
    // The store does not exist yet but can be created: that passes.
    assert_eq!(check(&doc, "store")["ok"], true, "{doc:#}");
}

/// A fake criu at `dir/criu` whose `--version` prints `version` and whose every other command
/// fails like Debian 12's 3.17.1 on this kernel: a helper's exit first, then the cause.
fn failing_criu(dir: &Path, version: &str) -> std::path::PathBuf {
    let criu = dir.join("criu");
    std::fs::write(
        &criu,
        format!(
            r#"#!/bin/sh
case "$1" in
  --version) echo 'Version: {version}'; exit 0 ;;
esac
log=/dev/null
while [ $# -gt 0 ]; do [ "$1" = "--log-file" ] && log="$2"; shift; done
echo '(00.001) Error (criu/util.c:642): exited, status=1' >> "$log"
echo '(00.001) Error (criu/vdso.c:95): vdso: Unexpected rt vDSO area bounds' >> "$log"
echo 'Error (criu/vdso.c:95): vdso: Unexpected rt vDSO area bounds' >&2
exit 1
"#
        ),
    )
    .expect("write fake criu");
    std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    criu
}

#[test]
fn doctor_rejects_a_criu_that_is_too_old_and_fails_its_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Debian 12's criu 3.17.1: pf's policy refuses it before running `criu check`.
    let criu = failing_criu(dir.path(), "3.17.1");
    let out = doctor(&dir.path().join("store"), dir.path(), &criu, true);
    assert_eq!(out.status.code(), Some(1));
    let doc = json_of(&out);
    assert_eq!(doc["criu"]["version"], "3.17.1");
    assert_eq!(check(&doc, "criu-found")["ok"], true);
    assert_eq!(check(&doc, "criu-version")["ok"], true);
    let too_old = check(&doc, "criu-version-ok");
    assert_eq!(too_old["ok"], false);
    assert!(
        too_old["detail"]
            .as_str()
            .is_some_and(|d| d.contains("3.17.1 is too old")),
        "{too_old}"
    );
    assert!(
        too_old["fix"]
            .as_str()
            .is_some_and(|d| d.contains("builds CRIU 4.2.1")),
        "{too_old}"
    );
    // A criu pf accepts whose `criu check` fails: criu's own Error line that names the cause
    // (not the helper's `exited, status=1` before it) is what the check shows, in JSON and to
    // people.
    let criu = failing_criu(dir.path(), "4.2.1");
    let out = doctor(&dir.path().join("store"), dir.path(), &criu, true);
    assert_eq!(out.status.code(), Some(1));
    let doc = json_of(&out);
    assert_eq!(check(&doc, "criu-version-ok")["ok"], true);
    let error = "Error (criu/vdso.c:95): vdso: Unexpected rt vDSO area bounds";
    let failed = check(&doc, "criu-check");
    assert_eq!(failed["ok"], false);
    assert!(
        failed["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("fails: {error}"))),
        "{failed}"
    );
    let out = doctor(&dir.path().join("store"), dir.path(), &criu, false);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("✗ criu check"))
        .unwrap_or_else(|| panic!("no ✗ criu check line in:\n{stdout}"));
    assert!(line.contains(&format!("fails: {error}")), "{stdout}");
}

#[test]
fn doctor_flags_a_store_others_can_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("mkdir store");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = doctor(&store, dir.path(), Path::new("/nonexistent/criu"), true);
    assert_eq!(out.status.code(), Some(1));
    let doc = json_of(&out);
    let c = check(&doc, "store");
    assert_eq!(c["ok"], false, "{c}");
    assert_eq!(c["fix"], format!("chmod 700 {}", store.display()));

    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let doc = json_of(&doctor(
        &store,
        dir.path(),
        Path::new("/nonexistent/criu"),
        true,
    ));
    assert_eq!(check(&doc, "store")["ok"], true);
}

/// A directory of other things is no store to doctor either, as to every command: doctor
/// says so (and stores nothing there), `pf store ls` refuses it and leaves it as it was.
#[test]
fn a_directory_of_other_things_is_no_store_to_doctor_nor_to_any_command() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("project");
    std::fs::create_dir(&project).expect("mkdir");
    std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::write(project.join("notes.txt"), "mine").expect("write");
    let doc = json_of(&doctor(
        &project,
        dir.path(),
        Path::new("/nonexistent/criu"),
        true,
    ));
    let c = check(&doc, "store");
    assert_eq!(c["ok"], false, "{c}");
    assert!(
        c["detail"]
            .as_str()
            .is_some_and(|d| d.contains("is not a pf store: the directory holds notes.txt")),
        "{c}"
    );
    let out = crate::support::pf(&project)
        .args(["store", "ls"])
        .output()
        .expect("pf store ls");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a pf store"),
        "{out:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&project)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["notes.txt"], "nothing was added");
}

#[test]
fn doctor_says_a_store_on_a_read_only_mount_is_read_only() {
    // A read-only tmpfs on the store, in a mount namespace of its own (CI runs as root).
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("mkdir store");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs -o ro,mode=700 tmpfs \"$1\" && exec \"$2\" --store \"$1\" doctor --json")
        .arg("sh")
        .arg(&store)
        .arg(crate::support::pf_bin())
        .env("PF_CRIU", "/nonexistent/criu")
        .env("PATH", "/usr/bin:/bin")
        .env_remove("PF_STORE")
        .output()
        .expect("run pf doctor in a mount namespace");
    let doc = json_of(&out);
    let c = check(&doc, "store");
    assert_eq!(c["ok"], false, "{c}");
    assert!(
        c["detail"]
            .as_str()
            .is_some_and(|d| d.contains("read-only file system")),
        "{c}"
    );
    assert!(
        c["fix"]
            .as_str()
            .is_some_and(|f| f.contains("remount it read-write")),
        "{c}"
    );
}

#[test]
fn live_doctor_passes_on_a_machine_with_criu() {
    if !pf_world_procs::test_support::live("pf doctor all ✓") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = pf(&dir.path().join("store"));
    cmd.arg("doctor");
    let out = cmd.output().expect("run pf doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // Only an optional check may be ✗ (criu's kernel cache needs a tmpfs /run, which CI
    // machines may not have; see the session check below), and then with its fix.
    for line in stdout.lines().filter(|l| l.starts_with('✗')) {
        assert!(line.ends_with("(optional)"), "{stdout}");
    }
    assert!(stdout.contains("✓ criu check"), "{stdout}");

    let out = cmd.arg("--json").output().expect("run pf doctor --json");
    let doc = json_of(&out);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["criu"]["usable"], true);
    for c in doc["checks"].as_array().expect("checks") {
        // The session check fails where the tests run in a session led from outside this pid
        // namespace (a CI container's), which is no fault of the machine's.
        assert!(
            c["ok"] == true || c["id"] == "criu-cache" || c["id"] == "session",
            "{c}"
        );
        assert_eq!(c["fix"].is_string(), c["ok"] == false, "{c}");
    }
}

/// Not root (as `nobody` when the tests run as root): every check still runs, nothing panics, and
/// what needs root says so with its fix.
#[test]
fn doctor_without_root_says_what_needs_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Where pf (and criu) keep their work files: writable by `nobody`, inside `dir`.
    let scratch = dir.path().join("tmp");
    std::fs::create_dir(&scratch).expect("mkdir");
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let mut cmd;
    if nix_is_root() {
        // `nobody` must be able to run the binary: a world-readable copy in a 0755 directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let bin = dir.path().join("pf");
        std::fs::copy(crate::support::pf_bin(), &bin).expect("copy pf");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod pf");
        cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin);
    } else {
        cmd = std::process::Command::new(crate::support::pf_bin());
    }
    cmd.stdin(std::process::Stdio::null())
        .env_remove("PF_STORE")
        .env("HOME", dir.path())
        .env("PATH", "/usr/local/sbin:/usr/bin:/bin")
        .env("TMPDIR", &scratch)
        .args(["--store"])
        .arg(dir.path().join("store"))
        .args(["doctor", "--json"]);
    let out = cmd.output().expect("run pf doctor without root");
    // criu's kept logs of its failed checks stay in `scratch`, removed with `dir`.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let doc = json_of(&out);
    let ids: Vec<&str> = doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, CHECK_IDS);
    let ns = check(&doc, "namespaces");
    assert_eq!(ns["ok"], false, "{ns}");
    assert!(
        ns["detail"]
            .as_str()
            .expect("detail")
            .contains("needs root"),
        "{ns}"
    );
    assert!(ns["fix"].as_str().expect("fix").contains("root"), "{ns}");
    let privileges = check(&doc, "privileges");
    if privileges["ok"] == false {
        let detail = privileges["detail"].as_str().expect("detail");
        assert!(
            !detail.contains("CRIU run id"),
            "a reason, not criu's chatter: {detail}"
        );
    }
    assert_eq!(check(&doc, "userfaultfd")["required"], false);
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// pf's one CRIU policy: on every machine state `pf doctor` says ✓ exactly where pf uses the criu
/// and where `cargo xtask install-criu` leaves it alone (xtask's
/// `install_criu_decides_as_pf_on_every_machine_state` asserts the same table).
#[test]
fn doctor_agrees_with_install_criu_on_every_machine_state() {
    let states = [
        // (criu --version, pf uses it and install-criu does nothing)
        (None, false),
        (Some("Version: 3.17.1\nGitID: v3.17.1\n"), false),
        (Some("Version: 4.1.1\n"), false),
        (Some("Version: 4.1.1\nGitID: pf-4.1.1-1\n"), true),
        (Some("Version: 4.2.1\nGitID: pf-4.2.1\n"), true),
        (Some("Version: 4.2.1\n"), true),
    ];
    for (version, works) in states {
        let dir = tempfile::tempdir().expect("tempdir");
        let criu = dir.path().join("criu");
        if let Some(version) = version {
            std::fs::write(
                &criu,
                format!(
                    "#!/bin/sh\n[ \"$1\" = --version ] && printf '{}'\n\
                     [ \"$1\" = check ] && echo 'Looks good.'\nexit 0\n",
                    version.replace('\n', "\\n")
                ),
            )
            .expect("write fake criu");
            std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let out = doctor(&dir.path().join("store"), dir.path(), &criu, true);
        let doc = json_of(&out);
        let state = format!("{version:?}: {doc:#}");
        assert_eq!(doc["criu"]["usable"], works, "{state}");
        for id in [
            "criu-found",
            "criu-version",
            "criu-version-ok",
            "criu-check",
        ] {
            let c = check(&doc, id);
            let expect =
                works || (version.is_some() && matches!(id, "criu-found" | "criu-version"));
            assert_eq!(c["ok"], expect, "{id} in {state}");
            if c["ok"] == false {
                assert!(
                    c["fix"].as_str().is_some_and(|f| f.contains("install-criu")
                        || f.contains("fix `criu found`")
                        || f.contains("see the")),
                    "{id} in {state}"
                );
            }
        }
        if !works {
            assert_eq!(out.status.code(), Some(1), "{state}");
        }
        if version.is_some() && !works {
            let refused = check(&doc, "criu-version-ok");
            assert!(
                refused["fix"]
                    .as_str()
                    .is_some_and(|f| f.contains("builds CRIU 4.2.1")),
                "{refused}"
            );
        }
    }
}

/// Issue 15 item 7a: as a user without root, why criu cannot be used is said once, without
/// CRIU's dangling `capability:)`.
#[test]
fn without_root_the_privilege_explanation_is_printed_once() {
    if !nix_is_root() {
        // Only root can become `nobody`; as another user, criu may well work through sudo.
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let scratch = dir.path().join("tmp");
    std::fs::create_dir(&scratch).expect("mkdir");
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("mkdir");
    std::os::unix::fs::chown(&store, Some(65534), Some(65534)).expect("chown store to nobody");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let bin = dir.path().join("pf");
    std::fs::copy(crate::support::pf_bin(), &bin).expect("copy pf");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod pf");
    // What criu 4.2.1 prints without the capability, run by `nobody` (criu/cr-check.c:1961).
    let criu = dir.path().join("criu");
    std::fs::write(
        &criu,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Version: 4.2.1'; exit 0; }\n\
         echo 'CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: '\n\
         echo \"setcap cap_checkpoint_restore+eip $0\"\nexit 1\n",
    )
    .expect("write fake criu");
    std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .stdin(std::process::Stdio::null())
        .env_remove("PF_STORE")
        .env("HOME", dir.path())
        .env("PATH", "/usr/bin:/bin")
        .env("PF_CRIU", &criu)
        .env("TMPDIR", &scratch)
        .arg("--store")
        .arg(&store)
        .args(["goblin", "spawn", "--tag", "t", "--", "cat"])
        .output()
        .expect("run pf as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("criu cannot get privileges").count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("criu is not usable here").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("capability:)"), "{stderr}");
    assert!(
        stderr.contains(
            "--unprivileged is refused (CRIU needs to have the CAP_SYS_ADMIN or the \
             CAP_CHECKPOINT_RESTORE capability)"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "sudo setcap cap_checkpoint_restore+eip {}",
            criu.display()
        )),
        "{stderr}"
    );
}

/// The session check: pf run in a pid namespace whose init kept its parent's (outer) session
/// warns that a process started there without setsid cannot be captured, an optional failure;
/// pf run under setsid leads a session of its own inside the namespace, which passes.
#[test]
fn a_session_begun_outside_the_pid_namespace_is_warned_of() {
    let can = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nix_is_root() || !can {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the doctor tests as root with `unshare --pid` available"
        );
        // Creating a pid namespace needs root (CAP_SYS_ADMIN) and unshare.
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let session_of = |wrapper: &[&str]| {
        let mut cmd = std::process::Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(crate::support::pf_bin())
            .stdin(std::process::Stdio::null())
            .env_remove("PF_STORE")
            .env("TMPDIR", dir.path())
            .arg("--store")
            .arg(dir.path().join("store"))
            .args(["doctor", "--json"]);
        let out = cmd.output().expect("run pf doctor");
        check(&json_of(&out), "session").clone()
    };
    let outside = session_of(&["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]);
    assert_eq!(outside["ok"], false, "{outside}");
    assert_eq!(outside["required"], false, "{outside}");
    assert!(
        outside["fix"].as_str().expect("fix").contains("setsid"),
        "{outside}"
    );
    let inside = session_of(&[
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "setsid",
        "--wait",
    ]);
    assert_eq!(inside["ok"], true, "{inside}");
}
