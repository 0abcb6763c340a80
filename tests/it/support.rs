//! Helpers for running the `pf` binary in tests.

use std::io::{Read, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pf_world_procs::test_support::KillOnDrop;

/// The path of a freshly built `pf` binary (built once per test run, in the test's profile).
///
/// `CARGO_BIN_EXE_pf` exists only for tests of the package that owns the binary, so this builds it
/// with the same cargo that runs the tests and finds it beside the test executable.
pub(crate) fn pf_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/it-<hash> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--package", "pf-cli", "--bin", "pf"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .stdin(Stdio::null())
            .status()
            .expect("run cargo build for the pf binary");
        assert!(status.success(), "cargo build of pf failed: {status}");
        let bin = profile_dir.join("pf");
        assert!(bin.is_file(), "pf binary not found at {}", bin.display());
        bin
    })
    .clone()
}

/// A `pf` command with stdin closed, a private store in `store`, and no inherited `PF_*` settings.
pub(crate) fn pf(store: &std::path::Path) -> Command {
    let mut cmd = Command::new(pf_bin());
    cmd.stdin(Stdio::null())
        .env_remove("PF_STORE")
        .env_remove("RUST_LOG")
        .arg("--store")
        .arg(store);
    cmd
}

/// Feed `input` to a started `pf` (its stdin, stdout and stderr piped), collect what it prints
/// on both outputs, and wait for it; past `deadline` the test fails and pf is killed by pid.
pub(crate) fn finish(mut child: Child, input: &[u8], deadline: Duration) -> Output {
    let guard = KillOnDrop(i32::try_from(child.id()).expect("pid"));
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        })
    });
    // Both outputs are read at once, each on its own thread: pf blocked on a full stderr pipe
    // would never finish writing stdout.
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(child.stdout.take().map(|r| Box::new(r) as Box<_>));
    let err = read(child.stderr.take().map(|r| Box::new(r) as Box<_>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            started.elapsed() < deadline,
            "pf did not finish within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Reaped: its pid may already be someone else's, so the guard must not kill it.
    std::mem::forget(guard);
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    Output {
        status,
        stdout: out.join().expect("stdout"),
        stderr: err.join().expect("stderr"),
    }
}

/// Output bytes as text, for assertions and messages.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file under the store's `blobs/` (blobs and temp files), by path.
pub(crate) fn blob_files(
    store: &std::path::Path,
) -> std::collections::BTreeSet<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut std::collections::BTreeSet<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path);
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&store.join("blobs"), &mut out);
    out
}

/// A tmpfs mounted for a test, unmounted when dropped.
pub(crate) struct Tmpfs(pub(crate) std::path::PathBuf);

impl Tmpfs {
    pub(crate) fn mount(dir: &std::path::Path, options: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.0)
            .stdin(std::process::Stdio::null())
            .status();
    }
}
