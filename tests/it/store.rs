//! Black-box tests of `pf store`: put, cat, ls, verify, tag, untag, tags, gc and rm, plus
//! corruption, a writer killed midway, the umask, and read-only and full file systems.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pf_core::Digest256;

use crate::support::{pf, pf_bin};

/// Run `pf --store <store> store <args…>` and return its output.
fn store_cmd(store: &Path, args: &[&str]) -> Output {
    pf(store)
        .arg("store")
        .args(args)
        .output()
        .expect("run pf store")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run and require success; returns stdout.
fn ok(store: &Path, args: &[&str]) -> String {
    let out = store_cmd(store, args);
    assert!(
        out.status.success(),
        "pf store {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Run and require exit status 1; returns stderr.
fn fails(store: &Path, args: &[&str]) -> String {
    let out = store_cmd(store, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "pf store {args:?} should fail\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

/// `len` pseudo-random bytes (incompressible), from `seed`.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn blob_path(store: &Path, digest: &Digest256) -> PathBuf {
    let hex = digest.hex();
    store
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(format!("{hex}.zst"))
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(temp_files(&path));
        } else if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(path);
        }
    }
    out
}

fn ls_json(store: &Path) -> Vec<serde_json::Value> {
    let text = ok(store, &["ls", "--json"]);
    match serde_json::from_str(&text).expect("ls --json is JSON") {
        serde_json::Value::Array(rows) => rows,
        other => panic!("ls --json is not an array: {other}"),
    }
}

#[test]
fn put_cat_ls_and_tags_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    let mut data = random_bytes(1, 300_000);
    data.extend(std::iter::repeat_n(b'z', 300_000));
    fs::write(&input, &data).unwrap();
    let want = Digest256::of(&data);

    let printed = ok(&store, &["put", input.to_str().unwrap(), "--tag", "snap"]);
    assert_eq!(printed, format!("{want}\n"));

    // The same bytes through stdin: the same digest, still one blob.
    let mut child = pf(&store)
        .args(["store", "put", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{want}\n"));

    for arg in ["snap".to_owned(), want.to_string()] {
        let out = store_cmd(&store, &["cat", &arg]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(out.stdout == data, "cat {arg} gave other bytes");
    }

    let rows = ls_json(&store);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["digest"], want.to_string());
    assert_eq!(rows[0]["size"], data.len() as u64);
    let stored = fs::metadata(blob_path(&store, &want)).unwrap().len();
    assert_eq!(rows[0]["stored_size"], stored);
    assert!(stored < data.len() as u64);
    assert_eq!(rows[0]["names"], serde_json::json!(["snap"]));
    assert!(ok(&store, &["ls"]).contains(&want.to_string()));

    ok(&store, &["tag", "copy", "snap"]);
    let tags: serde_json::Value = serde_json::from_str(&ok(&store, &["tags", "--json"])).unwrap();
    assert_eq!(
        tags,
        serde_json::json!([
            {"name": "copy", "digest": want.to_string()},
            {"name": "snap", "digest": want.to_string()},
        ])
    );
    assert_eq!(
        ok(&store, &["tags"]),
        format!("copy  {want}\nsnap  {want}\n")
    );
    ok(&store, &["untag", "copy"]);
    let err = fails(&store, &["untag", "copy"]);
    assert!(err.contains("no name \"copy\""), "{err}");
    let err = fails(&store, &["tag", "a/b", "snap"]);
    assert!(err.contains("invalid name"), "{err}");
    let err = fails(&store, &["tag", "x", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    // A bad --tag is refused before anything is stored.
    let err = fails(&store, &["put", input.to_str().unwrap(), "--tag", "../x"]);
    assert!(err.contains("invalid name"), "{err}");
}

#[test]
fn a_corrupt_blob_fails_cat_and_verify_naming_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    let good_input = dir.path().join("good");
    fs::write(&input, random_bytes(2, 100_000)).unwrap();
    fs::write(&good_input, b"fine").unwrap();
    let digest: Digest256 = ok(&store, &["put", input.to_str().unwrap(), "--tag", "bad"])
        .trim()
        .parse()
        .unwrap();
    let good: Digest256 = ok(&store, &["put", good_input.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        ok(&store, &["verify"]),
        format!("{} ok\n{} ok\n", digest.min(good), digest.max(good))
    );

    let path = blob_path(&store, &digest);
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    for arg in ["bad".to_owned(), digest.to_string()] {
        let err = fails(&store, &["cat", &arg]);
        assert!(err.contains(&digest.to_string()), "{err}");
        assert!(err.contains("discard"), "{err}");
    }
    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.contains(&format!("{digest} BAD")), "{report}");
    assert!(report.contains(&format!("{good} ok")), "{report}");
    let out = store_cmd(&store, &["verify", "bad"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains(&format!("{digest} BAD")));
    assert!(ok(&store, &["verify", &good.to_string()]).contains("ok"));

    // A truncated file too.
    fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(&store, &["cat", "bad"]);
    assert!(err.contains(&digest.to_string()), "{err}");
    assert_eq!(store_cmd(&store, &["verify"]).status.code(), Some(1));

    // And a name whose blob is gone.
    fs::remove_file(&path).unwrap();
    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(&format!(
            "{digest} BAD: name \"bad\" points at it but it is missing"
        )),
        "{}",
        stdout(&out)
    );
    let err = fails(&store, &["cat", "bad"]);
    assert!(
        err.contains(&format!("blob {digest} is not in the store")),
        "{err}"
    );
}

#[test]
fn malformed_digests_are_refused_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let good = Digest256::of(b"x").to_string();
    let cases = [
        "sha256:".to_owned(),
        good.to_uppercase(),
        good.replace("sha256:", "SHA256:"),
        good[..good.len() - 1].to_owned(),
        format!("{good}0"),
        "sha256:../../../../etc/passwd".to_owned(),
        format!("sha256:../{}", &good[10..]),
    ];
    for bad in &cases {
        for cmd in [
            &["cat", bad.as_str()][..],
            &["verify", bad],
            &["rm", bad],
            &["tag", "n", bad],
        ] {
            let err = fails(&store, cmd);
            assert!(err.starts_with("error: "), "{cmd:?}: {err}");
        }
    }
    // Nothing was created outside the store.
    assert!(!dir.path().join("etc").exists());
    assert!(ls_json(&store).is_empty());
}

#[test]
fn gc_removes_only_what_names_do_not_reach() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    };
    let dump = write("dump", &random_bytes(3, 50_000));
    let dump_digest = ok(&store, &["put", dump.to_str().unwrap()])
        .trim()
        .to_owned();
    let procs = write(
        "procs",
        format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{dump_digest}"}}"#).as_bytes(),
    );
    let procs_digest = ok(&store, &["put", procs.to_str().unwrap(), "--tag", "snap"])
        .trim()
        .to_owned();
    let loose = write("loose", b"nobody names me");
    let loose_digest = ok(&store, &["put", loose.to_str().unwrap()])
        .trim()
        .to_owned();

    // Everything is new: the default grace period keeps the loose blob.
    ok(&store, &["gc"]);
    assert_eq!(ls_json(&store).len(), 3);

    let dry = ok(&store, &["gc", "--dry-run", "--grace", "0"]);
    assert_eq!(dry, format!("would remove {loose_digest} (24 B)\n"));
    assert_eq!(ls_json(&store).len(), 3);

    let report: serde_json::Value =
        serde_json::from_str(&ok(&store, &["gc", "--grace", "0", "--json"])).unwrap();
    assert_eq!(report["removed"][0]["digest"], loose_digest);
    assert_eq!(report["removed"].as_array().unwrap().len(), 1);
    let mut kept = vec![dump_digest.clone(), procs_digest.clone()];
    kept.sort();
    assert_eq!(report["reachable"], serde_json::json!(kept));
    let left: Vec<_> = ls_json(&store)
        .iter()
        .map(|r| r["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, kept);

    ok(&store, &["untag", "snap"]);
    ok(&store, &["gc", "--grace", "0"]);
    assert!(ls_json(&store).is_empty());
    // A bad duration is a usage error (clap's exit status 2).
    let out = store_cmd(&store, &["gc", "--grace", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"soon\" is not a duration"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn rm_removes_a_blob_and_its_given_name_and_guards_other_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    fs::write(&input, b"to be removed").unwrap();
    let digest = ok(&store, &["put", input.to_str().unwrap(), "--tag", "a"])
        .trim()
        .to_owned();
    ok(&store, &["tag", "b", "a"]);
    let err = fails(&store, &["rm", &digest]);
    assert!(
        err.contains("--force") && err.contains('a') && err.contains('b'),
        "{err}"
    );
    let err = fails(&store, &["rm", "a"]);
    assert!(err.contains("b"), "{err}");
    ok(&store, &["rm", "a", "--force"]);
    assert!(ls_json(&store).is_empty());
    assert_eq!(ok(&store, &["tags"]), "");
    let err = fails(&store, &["rm", &digest]);
    assert!(err.contains("not in the store"), "{err}");
}

#[test]
fn a_put_killed_halfway_leaves_no_blob_and_gc_sweeps_its_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let data = random_bytes(4, 100 << 20);
    let want = Digest256::of(&data);

    let mut child = pf(&store)
        .args(["store", "put", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data[..50 << 20]).unwrap();
    // The writer has taken in (nearly) half the input: its temp file is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while temp_files(&store).is_empty() {
        assert!(Instant::now() < deadline, "no temp file appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    drop(stdin);

    let leftovers = temp_files(&store);
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    assert!(ls_json(&store).is_empty(), "no blob is visible");
    assert!(!blob_path(&store, &want).exists());

    let input = dir.path().join("input");
    fs::write(&input, &data).unwrap();
    let printed = ok(&store, &["put", input.to_str().unwrap(), "--tag", "whole"]);
    assert_eq!(printed.trim(), want.to_string());
    assert_eq!(ok(&store, &["verify", "whole"]), format!("{want} ok\n"));

    let dry = ok(&store, &["gc", "--dry-run", "--grace", "0"]);
    assert!(dry.contains(&leftovers[0].display().to_string()), "{dry}");
    assert!(leftovers[0].exists());
    ok(&store, &["gc", "--grace", "0"]);
    assert!(temp_files(&store).is_empty());
    assert_eq!(ls_json(&store).len(), 1);
}

#[test]
fn modes_are_private_whatever_the_umask() {
    for umask in ["000", "077", "777"] {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("deep/store");
        let input = dir.path().join("input");
        fs::write(&input, b"secret").unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(pf_bin())
            .arg("--store")
            .arg(&store)
            .args(["store", "put", "--tag", "n"])
            .arg(&input)
            .stdin(Stdio::null())
            .env_remove("PF_STORE")
            .output()
            .unwrap();
        assert!(out.status.success(), "umask {umask}: {}", stderr(&out));
        let digest: Digest256 = stdout(&out).trim().parse().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        let blob = blob_path(&store, &digest);
        assert_eq!(mode(&blob), 0o600, "umask {umask}");
        assert_eq!(mode(&store.join("refs/n")), 0o600, "umask {umask}");
        for d in [
            dir.path().join("deep"),
            store.clone(),
            store.join("blobs"),
            store.join("blobs/sha256"),
            blob.parent().unwrap().to_owned(),
            store.join("refs"),
        ] {
            assert_eq!(mode(&d), 0o700, "umask {umask}: {}", d.display());
        }
    }
}

/// Run `pf --store <mountpoint> store put <file>` in a private mount namespace with a tmpfs
/// mounted with `options` on the store; `None` when namespaces are not available here.
fn put_on_tmpfs(dir: &Path, options: &str, file: &Path) -> Option<Output> {
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the store tests as root with `unshare --mount` available"
        );
        #[allow(clippy::print_stderr)]
        {
            eprintln!("skipping the tmpfs part: cannot make a private mount namespace (not root?)");
        }
        return None;
    }
    let mountpoint = dir.join("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs -o \"$1\" tmpfs \"$2\" && exec \"$3\" --store \"$2\" store put \"$4\"")
        .arg("sh")
        .arg(options)
        .arg(&mountpoint)
        .arg(pf_bin())
        .arg(file)
        .stdin(Stdio::null())
        .env_remove("PF_STORE")
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn read_only_and_full_stores_fail_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    fs::write(&input, random_bytes(5, 8 << 20)).unwrap();

    let Some(out) = put_on_tmpfs(dir.path(), "ro,size=1m", &input) else {
        return;
    };
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&dir.path().join("mnt").display().to_string()),
        "{err}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let Some(out) = put_on_tmpfs(dir.path(), "size=1m", &input) else {
        return;
    };
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&dir.path().join("mnt").display().to_string()),
        "{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_store_path_below_a_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = fails(&file.join("store"), &["ls"]);
    assert!(err.contains(&file.display().to_string()), "{err}");
}

#[test]
fn help_teaches_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let out = store_cmd(dir.path(), &["--help"]);
    assert!(out.status.success());
    let help = stdout(&out);
    for word in [
        "put", "cat", "ls", "verify", "tag", "untag", "tags", "gc", "rm", "Examples",
    ] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
    let help = stdout(&store_cmd(dir.path(), &["gc", "--help"]));
    assert!(
        help.contains("--dry-run") && help.contains("--grace"),
        "{help}"
    );
}
