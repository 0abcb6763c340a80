//! Faults: read-only and full file systems, paths that cannot be directories, malformed digests.
//! Each is an error naming the path or the input, never a panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pf_core::{BlobStore, Digest256, Error, FsBlobStore};

use crate::support::{TestData, temp_files};

fn io_path(err: &Error) -> &Path {
    match err {
        Error::Io { path, .. } => path,
        other => panic!("expected an I/O error naming a path, got {other:?}"),
    }
}

fn io_kind(err: &Error) -> std::io::ErrorKind {
    match err {
        Error::Io { source, .. } => source.kind(),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn a_store_below_a_regular_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();
    let root = file.join("store");
    let err = FsBlobStore::open(&root).unwrap_err();
    assert!(io_path(&err).starts_with(&file), "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_blobs_dir_that_is_a_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsBlobStore::open(dir.path()).unwrap();
    fs::write(dir.path().join("blobs"), b"in the way").unwrap();
    let err = s.put(b"x").unwrap_err();
    assert!(io_path(&err).starts_with(dir.path().join("blobs")), "{err}");
    let err = s.put_reader(&mut &b"y"[..]).unwrap_err();
    assert!(io_path(&err).starts_with(dir.path().join("blobs")), "{err}");
    let err = s.list().unwrap_err();
    assert!(io_path(&err).starts_with(dir.path().join("blobs")), "{err}");
}

#[test]
fn malformed_digests_are_refused_by_parse_and_serde() {
    let good = Digest256::of(b"x").to_string();
    let cases = [
        String::new(),
        "sha256:".into(),
        good.to_uppercase(),
        good.replace("sha256:", "SHA256:"),
        good.replace("sha256:", "sha512:"),
        good[..good.len() - 1].into(),
        format!("{good}0"),
        "sha256:../../../../etc/passwd".into(),
        format!("sha256:../{}", &good[10..]),
        format!("{}/", &good[..good.len() - 1]),
        format!(" {good}"),
        format!("{good}\n"),
        good.replace("sha256:", ""),
    ];
    for bad in &cases {
        assert!(bad.parse::<Digest256>().is_err(), "parse accepted {bad:?}");
        let json = serde_json::to_string(bad).unwrap();
        assert!(
            serde_json::from_str::<Digest256>(&json).is_err(),
            "serde accepted {bad:?}"
        );
        // As a reference it is refused too: a bad digest, a bad name, or a name that does not
        // exist (`sha512:…` is a legal name), never a blob. Except two: 63 hex digits after
        // `sha256:` are a prefix of a digest (none of which this empty store holds), and the 64
        // hex digits alone are the digest.
        let s = pf_core::MemBlobStore::new();
        if *bad == good[..good.len() - 1] {
            let err = s.resolve(bad).expect_err(bad);
            assert!(matches!(err, Error::PrefixNotFound { .. }), "{err:?}");
            continue;
        }
        if *bad == good.replace("sha256:", "") {
            assert_eq!(s.resolve(bad).expect(bad).to_string(), good);
            continue;
        }
        let err = s.resolve(bad).expect_err(bad);
        if bad.starts_with("sha256:") {
            assert!(matches!(err, Error::InvalidDigest(_)), "{bad:?}: {err:?}");
        } else {
            assert!(
                matches!(err, Error::InvalidName { .. } | Error::NameNotFound { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }
    assert_eq!(good.parse::<Digest256>().unwrap().to_string(), good);
}

/// Set in the child started under `unshare --mount`: `<dir>`.
const CHILD_ENV: &str = "PF_CORE_IT_MOUNT_CHILD";
const TEST_NAME: &str = "faults::read_only_and_full_file_systems_are_errors_naming_the_path";

fn mount(args: &[&str]) {
    let status = Command::new("mount")
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("run mount");
    assert!(status.success(), "mount {args:?}: {status}");
}

/// Runs in a private mount namespace: mounts small tmpfs file systems and checks the store on
/// them.
fn child(dir: &Path) {
    // A read-only, empty file system as the store root.
    let ro = dir.join("ro");
    fs::create_dir(&ro).unwrap();
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "ro,size=1m,mode=700",
        "tmpfs",
        ro.to_str().unwrap(),
    ]);
    let s = FsBlobStore::open(&ro).unwrap();
    let err = s.put(b"x").unwrap_err();
    assert!(io_path(&err).starts_with(&ro), "{err}");
    assert_eq!(
        io_kind(&err),
        std::io::ErrorKind::ReadOnlyFilesystem,
        "{err}"
    );
    let err = s.put_reader(&mut &b"y"[..]).unwrap_err();
    assert!(io_path(&err).starts_with(&ro), "{err}");
    let err = FsBlobStore::open(&ro.join("sub")).unwrap_err();
    assert_eq!(io_path(&err), ro.join("sub"), "{err}");
    assert!(s.list().unwrap().is_empty());

    // A populated store made read-only: reads work, new writes fail naming the path.
    let frozen = dir.join("frozen");
    fs::create_dir(&frozen).unwrap();
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=4m,mode=700",
        "tmpfs",
        frozen.to_str().unwrap(),
    ]);
    let s = FsBlobStore::open(&frozen).unwrap();
    let d = s.put(b"kept").unwrap();
    s.set_name("kept", &d).unwrap();
    mount(&["-o", "remount,ro", frozen.to_str().unwrap()]);
    assert_eq!(s.get(&d).unwrap(), b"kept");
    assert_eq!(
        s.put(b"kept").unwrap(),
        d,
        "storing a blob already there succeeds"
    );
    let err = s.put(b"new").unwrap_err();
    assert!(io_path(&err).starts_with(&frozen), "{err}");
    // Naming takes the writer's lock, which says the store cannot be written, naming it.
    let err = s.set_name("other", &d).unwrap_err();
    assert!(
        matches!(&err, Error::StoreNotWritable { root, read_only_fs: true } if *root == frozen),
        "{err:?}"
    );
    assert!(err.to_string().contains("remount it read-write"), "{err}");
    // A reader may still wait on the lock there (for a gc run elsewhere on the same store).
    assert!(s.reader_lock_wait().is_ok());
    let err = s.remove(&d).unwrap_err();
    assert!(io_path(&err).starts_with(&frozen), "{err}");

    // A full file system: the put fails naming the temp file, leaves nothing behind, and the
    // store works again for what fits.
    let full = dir.join("full");
    fs::create_dir(&full).unwrap();
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=1m,mode=700",
        "tmpfs",
        full.to_str().unwrap(),
    ]);
    let s = FsBlobStore::open(&full).unwrap();
    let err = s.put_reader(&mut TestData::new(5, 8 << 20)).unwrap_err();
    assert!(io_path(&err).starts_with(&full), "{err}");
    assert_eq!(io_kind(&err), std::io::ErrorKind::StorageFull, "{err}");
    assert!(temp_files(&full).is_empty(), "{:?}", temp_files(&full));
    assert!(s.list().unwrap().is_empty());
    let d = s.put(b"small").unwrap();
    assert_eq!(s.get(&d).unwrap(), b"small");
}

#[test]
fn read_only_and_full_file_systems_are_errors_naming_the_path() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
        #[allow(clippy::print_stdout)]
        {
            println!("child checks passed");
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test as root with `unshare --mount` available"
        );
        #[allow(clippy::print_stderr)]
        {
            eprintln!(
                "{TEST_NAME}: cannot make a private mount namespace (not root?), so read-only \
                 and full file systems were not tried"
            );
        }
        return;
    }
    let exe: PathBuf = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child checks passed"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
