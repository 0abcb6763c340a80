//! Black-box tests of `pf store`: put, cat, ls, verify, tag, untag, tags, gc and rm, plus
//! corruption, a writer killed midway, the umask, and read-only and full file systems.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
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

/// An empty store at `path` (a private directory: what pf makes on its first put), for the
/// commands that need a store to be there.
fn make_store(path: &Path) {
    std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
        .create(path)
        .unwrap();
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
    let listing = ok(&store, &["ls"]);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "a header and the blob:\n{listing}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["DIGEST", "RAW", "STORED", "NAMES"], "{listing}");
    assert!(lines[1].starts_with(&want.to_string()), "{listing}");
    assert!(lines[1].contains("  snap  (keeps "), "{listing}");

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
    let clean = store_cmd(&store, &["verify"]);
    assert_eq!(stderr(&clean), "ok: 2 blobs match their digests\n");

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

    // A snapshot whose images archive is the bad blob: verifying the snapshot by its name
    // checks every blob it needs, not only its own record.
    let procs = pf_world_procs::ProcsBlob::Criu(pf_world_procs::CriuProcs {
        criu_dump: digest,
        pids: vec![4242],
        root_pid: Some(4242),
        criu_version: None,
        kernel: None,
        arch: None,
        captured_at: None,
        options: None,
        stdio: Vec::new(),
        labels: std::collections::BTreeMap::new(),
        dump_stats: None,
        memory: None,
    });
    let record = dir.path().join("procs.json");
    fs::write(&record, procs.to_json()).unwrap();
    let snapshot = ok(&store, &["put", record.to_str().unwrap(), "--tag", "snap"]);
    let out = store_cmd(&store, &["verify", "snap"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let report = stdout(&out);
    assert!(
        report.contains(&format!("{} ok", snapshot.trim())),
        "{report}"
    );
    assert!(
        report.contains(&format!("{digest} BAD")) && report.contains("needed by \"snap\""),
        "{report}"
    );
    // `show` of the corrupt blob fails, in text and JSON, rather than showing made-up sizes.
    for args in [&["show", "bad"][..], &["show", "bad", "--json"]] {
        let out = store_cmd(&store, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        assert_eq!(stdout(&out), "", "{args:?}");
        assert!(
            stderr(&out).contains(&format!("cannot show {digest}: blob {digest} is corrupt")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    ok(&store, &["untag", "snap"]);

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
    make_store(&store);
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

/// Two byte strings whose digests share their first `digits` hex digits (found by trying).
fn colliding(digits: usize) -> (Vec<u8>, Vec<u8>) {
    let mut seen = std::collections::HashMap::new();
    for i in 0u64.. {
        let bytes = format!("blob {i}\n").into_bytes();
        let hex = Digest256::of(&bytes).hex();
        if let Some(other) = seen.insert(hex[..digits].to_owned(), bytes.clone()) {
            return (other, bytes);
        }
    }
    unreachable!()
}

#[test]
fn a_unique_prefix_of_a_digest_names_its_blob_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let put = |bytes: &[u8], tag: Option<&str>| {
        let path = dir.path().join("input");
        fs::write(&path, bytes).unwrap();
        let mut args = vec!["put", path.to_str().unwrap()];
        args.extend(tag.map(|t| ["--tag", t]).into_iter().flatten());
        ok(&store, &args).trim().parse::<Digest256>().unwrap()
    };
    // a and b share their first 5 hex digits; c is another blob.
    let (a_bytes, b_bytes) = colliding(5);
    let a = put(&a_bytes, None);
    let b = put(&b_bytes, Some("b-snap"));
    let c = put(b"c bytes\n", None);
    let (ah, ch) = (a.hex(), c.hex());
    let common = a
        .hex()
        .bytes()
        .zip(b.hex().bytes())
        .take_while(|(x, y)| x == y)
        .count();
    let a_unique = format!("sha256:{}", &ah[..(common + 1).max(4)]);

    // Unique: `sha256:` and 4 digits or more, or 8 digits or more alone.
    assert_eq!(ok(&store, &["cat", &a_unique]).as_bytes(), a_bytes);
    assert_eq!(
        ok(&store, &["cat", &format!("sha256:{}", &ch[..4])]),
        "c bytes\n"
    );
    assert_eq!(ok(&store, &["cat", &ch[..8]]), "c bytes\n");
    assert_eq!(ok(&store, &["cat", &ch]), "c bytes\n");
    ok(&store, &["tag", "c-too", &ch[..10]]);
    assert!(ok(&store, &["tags"]).contains(&format!("c-too  {c}")));
    assert!(ok(&store, &["show", &ch[..8]]).contains(&c.to_string()));
    assert!(ok(&store, &["verify", &a_unique]).contains(&format!("{a} ok")));

    // A name spelled like a prefix of another blob is that name.
    ok(&store, &["tag", &ch[..8], &a_unique]);
    assert_eq!(ok(&store, &["cat", &ch[..8]]).as_bytes(), a_bytes);
    assert_eq!(ok(&store, &["cat", &ch[..9]]), "c bytes\n");
    ok(&store, &["untag", &ch[..8]]);

    // Ambiguous: refused, naming both (the named one first) with digits that tell them apart.
    let shared = format!("sha256:{}", &ah[..5]);
    let err = fails(&store, &["cat", &shared]);
    assert!(
        err.contains(&format!("{shared} is the start of 2 digests in the store"))
            && err.contains("give more of the digest"),
        "{err}"
    );
    let named = err.find("(\"b-snap\")").expect("b's name");
    let unnamed = err
        .find(&format!("sha256:{}", &ah[..12]))
        .expect("a's digits");
    assert!(
        err.find(&format!("sha256:{}", &b.hex()[..12])).unwrap() < unnamed && named < unnamed,
        "{err}"
    );
    assert!(ok(&store, &["cat", &a_unique]).as_bytes() == a_bytes);

    // Too short, unknown, and a bare string too short to be taken for a prefix.
    let err = fails(&store, &["cat", &format!("sha256:{}", &ch[..3])]);
    assert!(err.contains("give at least 4 hex digits"), "{err}");
    let absent = if ch.starts_with("ffff") {
        "0000"
    } else {
        "ffff"
    };
    let err = fails(&store, &["cat", &format!("sha256:{absent}")]);
    assert!(
        err.contains(&format!(
            "no digest in the store starts with sha256:{absent}"
        )),
        "{err}"
    );
    let err = fails(&store, &["cat", &format!("{absent}{absent}")]);
    assert!(
        err.contains("no name") && err.contains("no digest there starts with"),
        "{err}"
    );
    let err = fails(&store, &["cat", &ch[..6]]);
    assert!(
        err.contains(&format!(
            "a prefix of a digest is written sha256:{}",
            &ch[..6]
        )),
        "{err}"
    );

    // rm by a prefix removes the blob, and no name of that spelling.
    ok(&store, &["rm", &format!("sha256:{}", &ch[..6]), "--force"]);
    assert!(!ok(&store, &["tags"]).contains("c-too"));
    fails(&store, &["cat", &ch[..8]]);

    // Every command that takes a snapshot resolves prefixes the same way.
    for args in [
        &["goblin", "thaw", shared.as_str()][..],
        &["goblin", "fork", &shared, "--send", "x"],
        &["procs", "show", &shared],
        &["procs", "restore", &shared],
        &["push", &shared, "127.0.0.1:1/r:t"],
    ] {
        let out = pf(&store).args(args).output().expect("run pf");
        let err = stderr(&out);
        assert!(
            !out.status.success() && err.contains("is the start of 2 digests"),
            "{args:?}: {err}"
        );
    }
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
    let out = store_cmd(&store, &["rm", "a", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "nothing on stdout");
    assert!(
        stderr(&out).contains(&format!("removed {digest} and its names a, b;"))
            && stderr(&out).contains("pf store gc"),
        "it says what went and what frees the rest: {}",
        stderr(&out)
    );
    assert!(ls_json(&store).is_empty());
    assert_eq!(ok(&store, &["tags"]), "");
    let err = fails(&store, &["rm", &digest]);
    assert!(err.contains("not in the store"), "{err}");
}

/// A blob a named snapshot is made of (a pack, a page list, an image), reached through the
/// snapshot's manifest rather than named itself, is not removed without --force: it would leave
/// the snapshot unable to thaw.
#[test]
fn rm_refuses_a_blob_named_snapshots_are_made_of() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let put = |name: &str, bytes: &[u8]| {
        let file = dir.path().join(name);
        fs::write(&file, bytes).unwrap();
        ok(&store, &["put", file.to_str().unwrap()])
            .trim()
            .to_owned()
    };
    let pack = put("pack", b"\x00 pages of memory");
    let first = put("first", format!(r#"{{"packs":["{pack}"]}}"#).as_bytes());
    let own = put("own", b"\x00 pages of the second alone");
    let second = put(
        "second",
        format!(r#"{{"pages":{{"p":"{pack}","q":"{own}"}}}}"#).as_bytes(),
    );
    ok(&store, &["tag", "snap-b", &second]);
    ok(&store, &["tag", "snap-a", &first]);
    let err = fails(&store, &["rm", &pack]);
    assert!(
        err.contains("is part of named snapshots (snap-a, snap-b)")
            && err.contains("no longer thaw")
            && err.contains("--force"),
        "{err}"
    );
    assert!(
        ls_json(&store).len() == 4,
        "nothing removed: {:?}",
        ls_json(&store)
    );
    // Untagged, the second snapshot no longer needs anything: what only it used goes without
    // --force, and the pack is refused for the first alone.
    ok(&store, &["untag", "snap-b"]);
    ok(&store, &["rm", &own]);
    let err = fails(&store, &["rm", &pack]);
    assert!(err.contains("a named snapshot (snap-a)"), "{err}");
    let out = store_cmd(&store, &["rm", &pack, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("snap-a no longer thaws") && stderr(&out).contains("pf store verify"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ok(&store, &["tags"]).lines().count(), 1, "the name stays");
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

    let Some(out) = put_on_tmpfs(dir.path(), "ro,size=1m,mode=700", &input) else {
        return;
    };
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&dir.path().join("mnt").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("is on a read-only file system") && err.contains("remount it read-write"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let Some(out) = put_on_tmpfs(dir.path(), "size=1m,mode=700", &input) else {
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
fn a_mistyped_store_is_an_error_for_readers_and_only_a_put_creates_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("typo").join("store");
    let digest = format!("sha256:{}", "ab".repeat(32));
    for args in [
        &["ls"][..],
        &["tags"],
        &["verify"],
        &["gc"],
        &["cat", &digest],
        &["show", "mine"],
        &["tag", "mine", &digest],
    ] {
        let err = fails(&store, args);
        assert!(err.contains("there is no store at"), "{args:?}: {err}");
        assert!(
            err.contains(&store.display().to_string()),
            "{args:?}: {err}"
        );
    }
    for args in [&["procs", "show", "x"][..], &["goblin", "thaw", "x"]] {
        let out = pf(&store).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("there is no store at"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(
        !dir.path().join("typo").exists(),
        "a reader created the store"
    );
    let file = dir.path().join("file");
    fs::write(&file, b"kept").unwrap();
    let digest = ok(&store, &["put", file.to_str().unwrap()]);
    assert_eq!(ok(&store, &["cat", digest.trim()]), "kept");
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

/// Issue 15 item 2: `pf store put - --tag` racing `pf store gc --grace 0` in a loop. gc reads the
/// names once; without the store's lock it removed blobs named after that (21 of 60 names
/// dangled). Every put must succeed, and every name must point at a blob that exists.
#[test]
fn puts_with_tags_racing_gc_grace_0_leave_no_dangling_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    make_store(&store);
    let done = std::sync::atomic::AtomicBool::new(false);
    // gc runs finished so far: writers go on past PUTS until gc has run a few times beside
    // them (a gc on a slow machine took longer than all the puts), up to MAX_PUTS each.
    let gc_runs = std::sync::atomic::AtomicUsize::new(0);
    const WRITERS: usize = 6;
    const PUTS: usize = 8;
    const MAX_PUTS: usize = 4 * PUTS;
    let (gcs, puts) = std::thread::scope(|scope| {
        let gc = scope.spawn(|| {
            let mut runs = 0usize;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                ok(&store, &["gc", "--grace", "0"]);
                runs += 1;
                gc_runs.store(runs, std::sync::atomic::Ordering::Relaxed);
            }
            runs
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, gc_runs) = (&store, &gc_runs);
                scope.spawn(move || -> Result<usize, String> {
                    let mut i = 0;
                    while i < PUTS
                        || (gc_runs.load(std::sync::atomic::Ordering::Relaxed) < 3 && i < MAX_PUTS)
                    {
                        let name = format!("p{w}-{i}");
                        // Large enough that storing takes a while: the window gc used to hit.
                        let data = random_bytes((w * PUTS + i) as u64 + 1000, 3 << 20);
                        let mut child = pf(store)
                            .args(["store", "put", "-", "--tag", &name])
                            .stdin(Stdio::piped())
                            .stdout(Stdio::piped())
                            .stderr(Stdio::piped())
                            .spawn()
                            .map_err(|e| e.to_string())?;
                        let mut stdin = child.stdin.take().ok_or("no stdin")?;
                        stdin.write_all(&data).map_err(|e| e.to_string())?;
                        drop(stdin);
                        let out = child.wait_with_output().map_err(|e| e.to_string())?;
                        if !out.status.success() {
                            return Err(format!("put --tag {name} failed: {}", stderr(&out)));
                        }
                        if stdout(&out).trim() != Digest256::of(&data).to_string() {
                            return Err(format!("put --tag {name} printed {}", stdout(&out)));
                        }
                        i += 1;
                    }
                    Ok(i)
                })
            })
            .collect();
        // Every writer is joined (and gc stopped) before anything is asserted.
        let results: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let puts: usize = results
            .into_iter()
            .map(|result| result.expect("writer thread").unwrap())
            .sum();
        (gc.join().unwrap(), puts)
    });
    assert!(
        gcs > 1,
        "gc ran only {gcs} times beside {puts} puts (at most {MAX_PUTS} a writer)"
    );
    // Every name, checked after the last gc finished: its blob is there and whole.
    let tags = ok(&store, &["tags"]);
    assert_eq!(tags.lines().count(), puts, "{tags}");
    for line in tags.lines() {
        let (name, digest) = line.split_once("  ").unwrap();
        let digest: Digest256 = digest.parse().unwrap();
        assert!(
            blob_path(&store, &digest).exists(),
            "name {name} points at {digest}, which gc removed"
        );
    }
    ok(&store, &["verify"]);
}

/// Run `pf --store <store> store <args…>` as `nobody` (the tests run as root), with a copy of the
/// binary `nobody` may execute in `bin_dir`.
fn store_cmd_as_nobody(bin_dir: &Path, store: &Path, args: &[&str]) -> Output {
    let bin = bin_dir.join("pf");
    if !bin.exists() {
        fs::copy(pf_bin(), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .arg("--store")
        .arg(store)
        .arg("store")
        .args(args)
        .env_remove("PF_STORE")
        .stdin(Stdio::null())
        .output()
        .expect("run pf as nobody")
}

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Issue 15 item 5: a store anyone can write to was used without a word (a name planted by
/// `nobody` was followed by root). The root, `refs/` and `blobs/` must not be writable by group
/// or others; the refusal names the directory and the fix.
#[test]
fn a_store_others_can_write_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    fs::write(&input, b"mine").unwrap();
    ok(&store, &["put", input.to_str().unwrap(), "--tag", "mine"]);
    for (sub, mode, who) in [
        ("", 0o777, "group and others"),
        ("", 0o1703, "others"),
        ("refs", 0o770, "its group"),
        ("blobs", 0o707, "others"),
        ("index/pages", 0o777, "group and others"),
    ] {
        if sub == "index/pages" {
            // Made by the first page-level freeze; made here by hand.
            fs::create_dir_all(store.join(sub)).unwrap();
            fs::set_permissions(store.join("index"), fs::Permissions::from_mode(0o700)).unwrap();
        }
        let path = if sub.is_empty() {
            store.clone()
        } else {
            store.join(sub)
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        for args in [&["cat", "mine"][..], &["tags"], &["gc"]] {
            let err = fails(&store, args);
            assert!(
                err.contains(&format!(
                    "{} is writable by {who} (mode {mode:04o})",
                    path.display()
                )),
                "{err}"
            );
            assert!(
                err.contains(&format!("chmod go-w {}", path.display())),
                "{err}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(ok(&store, &["cat", "mine"]), "mine");
    }
    // Readable by others is not refused here (`pf doctor` flags it): nobody can plant anything.
    fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(ok(&store, &["cat", "mine"]), "mine");
}

/// Issue 15 items 5 and 7: a store owned by another user is refused (root included: its owner
/// decides what root would restore), and `nobody` using root's store is told whose it is and what
/// to do, not "Permission denied".
#[test]
fn a_store_of_another_user_is_refused_saying_whose_it_is() {
    if !is_root() {
        // chown and running as `nobody` need root; CI runs these tests as root.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    fs::write(&input, b"root's").unwrap();
    ok(&store, &["put", input.to_str().unwrap(), "--tag", "snap"]);

    // `nobody` and root's store (0700): says whose it is, not just "Permission denied".
    let out = store_cmd_as_nobody(dir.path(), &store, &["cat", "snap"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} belongs to root (uid 0) and you are nobody (uid 65534)",
            store.display()
        )),
        "{err}"
    );
    assert!(err.contains("--store DIR or $PF_STORE"), "{err}");
    assert!(err.contains("run pf as its owner"), "{err}");

    // A store inside a directory `nobody` may not enter: names that directory.
    let private = dir.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = private.join("store");
    make_store(&hidden);
    let out = store_cmd_as_nobody(dir.path(), &hidden, &["tags"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "you, nobody (uid 65534), may not use the store at {}: {} (owner root (uid 0), mode 0700)",
            hidden.display(),
            private.display()
        )),
        "{err}"
    );

    // Root and a store `nobody` owns (and could fill with names): refused, with the way to take it
    // over when trusted.
    let theirs = dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let out = store_cmd_as_nobody(dir.path(), &theirs, &["put", input.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = fails(&theirs, &["ls"]);
    assert!(
        err.contains(&format!(
            "{} belongs to nobody (uid 65534) and you are root (uid 0)",
            theirs.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("chown -R root: {}", theirs.display())),
        "{err}"
    );
    // `refs/` alone swapped for another user's directory is caught too.
    fs::rename(store.join("refs"), store.join("refs.old")).unwrap();
    fs::create_dir(store.join("refs")).unwrap();
    std::os::unix::fs::chown(store.join("refs"), Some(65534), Some(65534)).unwrap();
    let err = fails(&store, &["cat", "snap"]);
    assert!(
        err.contains(&format!(
            "{} belongs to nobody",
            store.join("refs").display()
        )),
        "{err}"
    );
}

/// Issue 15 item 6: a put of the same bytes left a corrupt blob corrupt (exit 0, `verify` still
/// BAD). Now the put writes the blob again over the bad copy, whichever way the bytes come.
#[test]
fn a_put_of_the_same_bytes_repairs_a_corrupt_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    let data = random_bytes(15, 200_000);
    fs::write(&input, &data).unwrap();
    let digest: Digest256 = ok(&store, &["put", input.to_str().unwrap(), "--tag", "x"])
        .trim()
        .parse()
        .unwrap();
    let path = blob_path(&store, &digest);
    let good = fs::read(&path).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    for (how, corrupt) in [
        ("a flipped byte", flipped),
        ("a truncated file", good[..good.len() / 2].to_vec()),
    ] {
        for from_stdin in [false, true] {
            fs::write(&path, &corrupt).unwrap();
            let out = store_cmd(&store, &["verify", "x"]);
            assert_eq!(out.status.code(), Some(1), "{how}: {}", stdout(&out));
            let err = stderr(&out);
            assert!(err.contains("`pf store put FILE` repairs"), "{err}");
            let printed = if from_stdin {
                let mut child = pf(&store)
                    .args(["store", "put", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                child.stdin.take().unwrap().write_all(&data).unwrap();
                let out = child.wait_with_output().unwrap();
                assert!(out.status.success());
                stdout(&out)
            } else {
                ok(&store, &["put", input.to_str().unwrap()])
            };
            assert_eq!(printed.trim(), digest.to_string());
            assert_eq!(
                ok(&store, &["verify"]),
                format!("{digest} ok\n"),
                "{how}, stdin {from_stdin}"
            );
            let out = store_cmd(&store, &["cat", "x"]);
            assert!(out.status.success() && out.stdout == data, "{how}");
        }
    }
    assert!(temp_files(&store).is_empty());
}

/// Issue 15 item 7: `pf store ls | head -1` printed `error: Broken pipe` and exited 1. A reader
/// that goes away ends every command quietly, with success.
#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    fs::write(&input, random_bytes(7, 1 << 20)).unwrap();
    ok(&store, &["put", input.to_str().unwrap(), "--tag", "big"]);
    for i in 0..20 {
        let small = dir.path().join(format!("small{i}"));
        fs::write(&small, format!("{i}")).unwrap();
        ok(
            &store,
            &["put", small.to_str().unwrap(), "--tag", &format!("t{i}")],
        );
    }
    let input = input.to_str().unwrap();
    for args in [
        &["store", "ls"][..],
        &["store", "ls", "--json"],
        &["store", "tags"],
        &["store", "tags", "--json"],
        &["store", "verify"],
        &["store", "cat", "big"],
        &["store", "put", input],
        &["store", "gc", "--dry-run"],
        &["store", "gc", "--json"],
        &["goblin", "--help"],
        &["--version"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = pf(&store)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "pf {args:?}: {}", stderr(&out));
        // gc's summary goes to stderr, as ever; nothing else may.
        let err = stderr(&out);
        assert!(
            !err.contains("error") && !err.contains("Broken pipe") && !err.contains("panicked"),
            "pf {args:?}: {err}"
        );
        if args.get(1) != Some(&"gc") {
            assert_eq!(err, "", "pf {args:?}");
        }
    }
    // A failure is still one, and still said, when stdout is closed.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = pf(&store)
        .args(["store", "cat", "nosuch"])
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
}

/// Issue 15 item 7: `--tag -x` got clap's tip `-- -x`, which does not work (it makes `-x` the
/// FILE). The tip now says `--tag=-x`, and that works.
#[test]
fn a_tag_starting_with_a_dash_gets_a_tip_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("input");
    fs::write(&input, b"dash").unwrap();
    let file = input.to_str().unwrap();
    let out = store_cmd(&store, &["put", file, "--tag", "-x"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("tip: to pass '-x' as the value of '--tag', write '--tag=-x'"),
        "{err}"
    );
    assert!(!err.contains("'-- -x'"), "{err}");
    assert!(err.contains("Usage: pf store put"), "{err}");
    // What clap's tip said does not work; what ours says does.
    assert_eq!(
        store_cmd(&store, &["put", file, "--tag", "--", "-x"])
            .status
            .code(),
        Some(2)
    );
    let digest = ok(&store, &["put", file, "--tag=-x"]);
    assert_eq!(ok(&store, &["tags"]), format!("-x  {}", digest));
    // A flag that takes no value keeps clap's own message.
    let err = stderr(&store_cmd(&store, &["ls", "--json", "-x"]));
    assert!(!err.contains("--json="), "{err}");
}

/// Issue 15 item 7: `pf store put /proc/self/status` failed with "1421 bytes where 0 were
/// announced". A file whose size lies (procfs, sysfs) is read to its end.
#[test]
fn files_whose_size_lies_are_stored_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    for file in [
        "/proc/self/status",
        "/proc/cpuinfo",
        "/sys/devices/system/cpu/online",
    ] {
        if !Path::new(file).exists() {
            continue;
        }
        let digest = ok(&store, &["put", file, "--tag", "p"]);
        let stored = ok(&store, &["cat", digest.trim()]);
        assert!(!stored.is_empty(), "{file}");
        if file == "/proc/self/status" {
            // pf's own status, read by pf.
            assert!(stored.starts_with("Name:\tpf\n"), "{stored}");
        } else {
            assert_eq!(stored, fs::read_to_string(file).unwrap(), "{file}");
        }
    }
}

/// A file of `pages` incompressible 4 KiB pages from `seed` (page `i` is the same for the same
/// seed and `i`, whatever `pages` is).
fn pages_file(dir: &Path, name: &str, seeds: impl Iterator<Item = u64>) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = seeds.flat_map(page_bytes).collect();
    fs::write(&path, bytes).unwrap();
    path
}

/// The 4 KiB page of seed `s` (distinct seeds, distinct pages).
fn page_bytes(s: u64) -> Vec<u8> {
    random_bytes(
        (s.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03) << 1,
        4096,
    )
}

/// Store the file at `path` page by page (as a `procs.criu.v2` snapshot stores its memory),
/// deduplicated against the store's page index, under a small JSON root named `name`; returns
/// (root, manifest). pf writes such roots only from CRIU dumps: the test plants them.
fn plant_pages(store: &Path, path: &Path, name: &str) -> (Digest256, Digest256) {
    use pf_core::BlobStore as _;
    let fs_store = pf_core::FsBlobStore::open(store).unwrap();
    let mut writer =
        pf_core::pages::PageWriter::new(&fs_store, pf_core::BlobStore::page_index(&fs_store), 2);
    let stored = writer
        .write_file(&fs::File::open(path).unwrap(), path)
        .unwrap();
    writer.commit().unwrap();
    let root = fs_store
        .put(format!(r#"{{"kind":"test.v1","memory":"{}"}}"#, stored.manifest).as_bytes())
        .unwrap();
    fs_store.set_name(name, &root).unwrap();
    (root, stored.manifest)
}

/// The on-disk file of a blob, found through the layout whatever its suffix.
fn blob_file(store: &Path, digest: &Digest256) -> PathBuf {
    let hex = digest.hex();
    let dir = store.join("blobs/sha256").join(&hex[..2]);
    fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&hex))
        .unwrap_or_else(|| panic!("no file for {digest} in {}", dir.display()))
}

#[test]
fn verify_names_a_corrupt_page_by_snapshot_and_page_and_a_clean_store_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // 600 pages; page 450 repeats page 100, so one bad stored page is used twice.
    let seeds = (0..600u64).map(|i| if i == 450 { 100 } else { i });
    let path = pages_file(dir.path(), "mem", seeds);
    let (root, manifest) = plant_pages(&store, &path, "snap");

    let clean = ok(&store, &["verify"]);
    assert!(!clean.contains("BAD"), "{clean}");
    let json: serde_json::Value = serde_json::from_str(&ok(&store, &["verify", "--json"])).unwrap();
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["pages"]["manifests"], 1, "{json}");
    assert_eq!(
        json["pages"]["pages"], 599,
        "every distinct page hashed: {json}"
    );
    assert_eq!(json["pages"]["list_entries"], 600, "{json}");
    assert_eq!(json["pages"]["problems"], serde_json::json!([]), "{json}");

    // Flip one byte of page 100 where it lies in its pack's file on disk (the pages are
    // incompressible, so their bytes are there as they are).
    let fs_store = pf_core::FsBlobStore::open(&store).unwrap();
    let m = pf_core::pages::load_manifest(&fs_store, &manifest).unwrap();
    let needle = &page_bytes(100)[1000..1032];
    let (pack, file, at) = m
        .packs
        .iter()
        .find_map(|p| {
            let file = blob_file(&store, p);
            let bytes = fs::read(&file).unwrap();
            let at = bytes.windows(needle.len()).position(|w| w == needle)?;
            Some((*p, file, at))
        })
        .expect("page 100's bytes in a pack file");
    let mut bytes = fs::read(&file).unwrap();
    bytes[at] ^= 0x40;
    fs::write(&file, &bytes).unwrap();

    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = stdout(&out);
    let line = report
        .lines()
        .find(|l| l.starts_with(&format!("{pack} BAD:")) && l.contains("slot"))
        .unwrap_or_else(|| panic!("no page line for {pack}:\n{report}"));
    assert!(
        line.contains(&format!("\"snap\" ({root})"))
            && line.contains(" page 100")
            && line.contains(" page 450"),
        "{line}"
    );
    assert!(
        stderr(&out).contains("cannot be thawed"),
        "{}",
        stderr(&out)
    );
    let out = store_cmd(&store, &["verify", "--json", "snap"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["ok"], false);
    let problems = json["pages"]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{json}");
    let p = &problems[0];
    assert_eq!(p["kind"], "bad_page", "{p}");
    assert_eq!(p["pack"], pack.to_string(), "{p}");
    assert_eq!(p["use_count"], 2, "{p}");
    assert_eq!(p["uses"][0]["manifest"], manifest.to_string(), "{p}");
    assert_eq!(p["uses"][0]["page"], 100, "{p}");
    assert_eq!(p["uses"][1]["page"], 450, "{p}");
    assert_eq!(
        p["uses"][0]["snapshots"][0]["names"],
        serde_json::json!(["snap"])
    );
    assert_eq!(p["uses"][0]["snapshots"][0]["snapshot"], root.to_string());
}

#[test]
fn ls_show_and_gc_tell_logical_stored_shared_and_dead_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // a: pages 0..1000; b: 900 of them and 100 new ones (written after a, so it shares a's pack
    // through the page index).
    let a_path = pages_file(dir.path(), "a", 0..1000);
    let b_path = pages_file(dir.path(), "b", 100..1100);
    let (a, a_manifest) = plant_pages(&store, &a_path, "a");
    let (b, _) = plant_pages(&store, &b_path, "b");

    let show: serde_json::Value =
        serde_json::from_str(&ok(&store, &["show", "b", "--json"])).unwrap();
    assert_eq!(show["digest"], b.to_string(), "{show}");
    assert_eq!(show["names"], serde_json::json!(["b"]));
    assert_eq!(show["record_kind"], "test.v1");
    assert!(show["what"].is_null(), "{show}");
    // A pack and a page list are not snapshots: show says what each is instead.
    let manifest: serde_json::Value = {
        use pf_core::BlobStore as _;
        let bytes = pf_core::FsBlobStore::open_existing(&store)
            .unwrap()
            .get(&a_manifest)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let pack = manifest["packs"][0].as_str().unwrap();
    let text = ok(&store, &["show", pack]);
    assert!(
        text.contains("what          a pack of 1000 pages of a snapshot's memory"),
        "{text}"
    );
    let list = manifest["list"].as_str().unwrap();
    let list_json: serde_json::Value =
        serde_json::from_str(&ok(&store, &["show", list, "--json"])).unwrap();
    assert!(
        list_json["what"]
            .as_str()
            .is_some_and(|w| w.starts_with("the page list")),
        "{list_json}"
    );
    assert_eq!(show["pages"], 1000);
    assert_eq!(show["zero_pages"], 0);
    // The pages, and the root's own JSON (its page list and packs count nothing logical).
    let root_len = r#"{"kind":"test.v1","memory":""}"#.len() + b.to_string().len();
    assert_eq!(
        show["logical_size"],
        1000 * 4096 + root_len as u64,
        "{show}"
    );
    let stored = show["stored_size"].as_u64().unwrap();
    let shared = show["shared_size"].as_u64().unwrap();
    assert!(stored > 1000 * 4096, "b's packs are whole packs: {show}");
    assert!(
        shared > 0 && shared < stored,
        "b shares a's pack, not its own: {show}"
    );
    assert_eq!(show["shared_with"], serde_json::json!(["a"]), "{show}");
    let text = ok(&store, &["show", "b"]);
    for want in ["logical size", "stored size", "shared", "with a", "own"] {
        assert!(text.contains(want), "{want}: {text}");
    }

    // ls: the named rows say what they keep; the others have `keeps: null`.
    let rows = ls_json(&store);
    let row_a = rows
        .iter()
        .find(|r| r["digest"] == a.to_string())
        .expect("a's row");
    assert_eq!(row_a["keeps"]["pages"], 1000, "{row_a}");
    let row_b = rows
        .iter()
        .find(|r| r["digest"] == b.to_string())
        .expect("b's row");
    assert_eq!(row_b["keeps"]["logical_size"], show["logical_size"]);
    assert_eq!(row_b["keeps"]["stored_size"], show["stored_size"]);
    assert_eq!(row_b["keeps"]["shared_size"], show["shared_size"]);
    assert!(
        rows.iter()
            .filter(|r| r["names"] == serde_json::json!([]))
            .all(|r| r["keeps"].is_null()),
        "{rows:?}"
    );
    assert!(ok(&store, &["ls"]).contains("logical"));

    // Nothing is dead while both are named; without a, its first 100 pages are.
    let gc: serde_json::Value =
        serde_json::from_str(&ok(&store, &["gc", "--grace", "0", "--json"])).unwrap();
    assert_eq!(gc["packs"]["pages"], 1100, "{gc}");
    assert_eq!(gc["packs"]["dead_pages"], 0, "{gc}");
    ok(&store, &["untag", "a"]);
    let out = store_cmd(&store, &["gc", "--grace", "0"]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("100 of their 1100 pages"),
        "{}",
        stderr(&out)
    );
    let gc: serde_json::Value =
        serde_json::from_str(&ok(&store, &["gc", "--grace", "0", "--json"])).unwrap();
    assert_eq!(gc["packs"]["live_pages"], 1000, "{gc}");
    assert_eq!(gc["packs"]["dead_pages"], 100, "{gc}");
    let dead = gc["packs"]["dead_stored_size"].as_u64().unwrap();
    assert!(dead > 90 * 4096 && dead < 110 * 4096, "{gc}");
    // b alone now shares nothing.
    let show: serde_json::Value =
        serde_json::from_str(&ok(&store, &["show", &b.to_string(), "--json"])).unwrap();
    assert_eq!(show["shared_size"], 0, "{show}");
}

#[test]
fn ls_still_lists_when_a_named_json_blob_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let child = Digest256::of(b"child");
    let input = dir.path().join("record.json");
    fs::write(&input, format!(r#"{{"kind":"test.v1","child":"{child}"}}"#)).unwrap();
    let record: Digest256 = ok(&store, &["put", input.to_str().unwrap(), "--tag", "rec"])
        .trim()
        .parse()
        .unwrap();
    assert!(ok(&store, &["ls"]).contains("keeps"));
    // Damage the stored record so that it no longer hashes to its digest.
    let path = blob_file(&store, &record);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let out = store_cmd(&store, &["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&record.to_string()),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains(&format!(
            "cannot tell what the names \"rec\" keep: blob {record}"
        )),
        "{}",
        stderr(&out)
    );
}

/// Plant a `procs.criu.v2` record named `name` as a freeze writes one: an images tar (here 64
/// KiB of random bytes) and the memory of `pages-1.img` stored page by page. Returns (root,
/// images, manifest).
fn plant_v2(store: &Path, dir: &Path, name: &str, pages: u64) -> (Digest256, Digest256, Digest256) {
    use pf_core::BlobStore as _;
    let path = pages_file(dir, &format!("{name}.mem"), 0..pages);
    let fs_store = pf_core::FsBlobStore::open(store).unwrap();
    let mut writer =
        pf_core::pages::PageWriter::new(&fs_store, pf_core::BlobStore::page_index(&fs_store), 2);
    let stored = writer
        .write_file(&fs::File::open(&path).unwrap(), &path)
        .unwrap();
    writer.commit().unwrap();
    let images = fs_store.put(&random_bytes(7, 64 << 10)).unwrap();
    let root = fs_store
        .put(
            format!(
                r#"{{"kind":"procs.criu.v2","criu_dump":"{images}","pids":[4242],"memory":[{{"file":"pages-1.img","manifest":"{}","pages":{pages}}}]}}"#,
                stored.manifest
            )
            .as_bytes(),
        )
        .unwrap();
    fs_store.set_name(name, &root).unwrap();
    (root, images, stored.manifest)
}

#[test]
fn verify_fails_naming_the_snapshot_when_its_images_or_pages_manifest_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (root, images, manifest) = plant_v2(&store, dir.path(), "ex", 40);
    assert!(!ok(&store, &["verify"]).contains("BAD"));
    for (gone, role) in [
        (images, "its images tar (criu_dump)"),
        (manifest, "the pages manifest of its pages-1.img"),
    ] {
        let file = blob_file(&store, &gone);
        let kept = fs::read(&file).unwrap();
        fs::remove_file(&file).unwrap();
        let out = store_cmd(&store, &["verify"]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        let want = format!("{gone} BAD: not in the store; \"ex\" ({root}) needs it as {role}");
        assert!(
            stdout(&out).lines().any(|l| l == want),
            "want {want:?} in\n{}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains("cannot be thawed"),
            "{}",
            stderr(&out)
        );
        // The same for the snapshot alone, and as JSON.
        let out = store_cmd(&store, &["verify", "ex", "--json"]);
        assert_eq!(out.status.code(), Some(1));
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(json["ok"], false, "{json}");
        let rows = json["missing_blobs"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{json}");
        assert_eq!(rows[0]["digest"], gone.to_string());
        assert_eq!(rows[0]["snapshot"], root.to_string());
        assert_eq!(rows[0]["names"], serde_json::json!(["ex"]));
        assert_eq!(rows[0]["role"], role);
        fs::write(&file, kept).unwrap();
    }
    assert!(!ok(&store, &["verify"]).contains("BAD"));
}

#[test]
fn a_bad_ref_is_named_with_its_fix_and_hides_no_other_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("a");
    fs::write(&input, b"kept by a").unwrap();
    let a = ok(&store, &["put", input.to_str().unwrap(), "--tag", "a"]);
    let a = a.trim();
    fs::write(&input, b"named by nobody").unwrap();
    let loose: Digest256 = ok(&store, &["put", input.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    fs::write(store.join("refs/junk"), "garbage\n").unwrap();
    let fix = "`pf store untag junk`";

    let out = store_cmd(&store, &["tags"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("a  {a}\n"));
    assert!(stderr(&out).contains(fix), "{}", stderr(&out));
    let tags: serde_json::Value = serde_json::from_str(&ok(&store, &["tags", "--json"])).unwrap();
    assert_eq!(tags, serde_json::json!([{"name": "a", "digest": a}]));
    let out = store_cmd(&store, &["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(a) && stdout(&out).contains(" a "));
    assert!(stderr(&out).contains(fix), "{}", stderr(&out));

    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("name \"junk\" BAD: ") && l.contains(fix)),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains(&format!("{a} ok")));
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&store_cmd(&store, &["verify", "--json"]))).unwrap();
    assert_eq!(json["ok"], false);
    assert_eq!(json["bad_names"][0]["name"], "junk", "{json}");
    assert!(json["bad_names"][0]["fix"].as_str().unwrap().contains(fix));

    // gc refuses, dry or not, naming the ref and the fix, and removes nothing.
    for args in [
        &["gc", "--grace", "0", "--dry-run"][..],
        &["gc", "--grace", "0"],
        &["gc", "--grace", "0", "--repack"],
    ] {
        let err = fails(&store, args);
        assert!(err.contains("\"junk\"") && err.contains(fix), "{err}");
    }
    assert!(blob_file(&store, &loose).exists());

    // The fix works.
    ok(&store, &["untag", "junk"]);
    assert!(!ok(&store, &["verify"]).contains("BAD"));
    ok(&store, &["gc", "--grace", "0"]);
    assert!(!blob_path(&store, &loose).exists());
}

#[test]
fn verify_says_untag_for_a_name_whose_blob_is_gone_and_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let input = dir.path().join("a");
    fs::write(&input, b"soon gone").unwrap();
    let d: Digest256 = ok(&store, &["put", input.to_str().unwrap(), "--tag", "snap"])
        .trim()
        .parse()
        .unwrap();
    fs::remove_file(blob_file(&store, &d)).unwrap();
    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("`pf store untag snap`"), "{all}");
    assert!(!all.contains("rm --force"), "{all}");
    ok(&store, &["untag", "snap"]);
    assert!(!ok(&store, &["verify"]).contains("BAD"));
}

#[test]
fn a_missing_pack_is_one_short_line_naming_its_snapshot_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let path = pages_file(dir.path(), "mem", 0..600);
    let (root, manifest) = plant_pages(&store, &path, "snap");
    let fs_store = pf_core::FsBlobStore::open(&store).unwrap();
    let m = pf_core::pages::load_manifest(&fs_store, &manifest).unwrap();
    let pack = m.packs[0];
    fs::remove_file(blob_file(&store, &pack)).unwrap();
    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let report = stdout(&out);
    let line = report
        .lines()
        .find(|l| l.starts_with(&format!("{pack} BAD:")))
        .unwrap_or_else(|| panic!("no line for {pack}:\n{report}"));
    assert_eq!(line.matches("\"snap\"").count(), 1, "{line}");
    assert_eq!(line.matches(&root.to_string()).count(), 1, "{line}");
    assert!(line.contains(" more of its pages"), "{line}");
    assert!(line.len() < 600, "{} bytes: {line}", line.len());
}

#[test]
fn one_unreadable_named_blob_hides_no_other_snapshot_from_verify_and_ls() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // snap: page-level memory with one bad page; rec: a named record, truncated on disk.
    let path = pages_file(dir.path(), "mem", 0..300);
    let (snap, manifest) = plant_pages(&store, &path, "snap");
    let input = dir.path().join("record.json");
    let child = Digest256::of(b"child");
    fs::write(
        &input,
        format!(
            r#"{{"kind":"test.v1","child":"{child}","pad":"{}"}}"#,
            "x".repeat(4000)
        ),
    )
    .unwrap();
    let rec: Digest256 = ok(&store, &["put", input.to_str().unwrap(), "--tag", "rec"])
        .trim()
        .parse()
        .unwrap();
    let file = blob_file(&store, &rec);
    let len = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let fs_store = pf_core::FsBlobStore::open(&store).unwrap();
    let pack = pf_core::pages::load_manifest(&fs_store, &manifest)
        .unwrap()
        .packs[0];
    let pack_file = blob_file(&store, &pack);
    let mut bytes = fs::read(&pack_file).unwrap();
    let needle = &page_bytes(100)[1000..1032];
    let at = bytes.windows(32).position(|w| w == needle).unwrap();
    bytes[at] ^= 0x40;
    fs::write(&pack_file, &bytes).unwrap();

    let out = store_cmd(&store, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let report = stdout(&out);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with(&format!("{rec} BAD: "))),
        "{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.starts_with(&format!("{pack} BAD: ")) && l.contains(" page 100")),
        "snap's pages were checked: {report}"
    );
    assert!(!report.contains("cannot walk"), "{report}");

    let rows = ls_json(&store);
    let row = |d: &Digest256| rows.iter().find(|r| r["digest"] == d.to_string()).unwrap();
    assert_eq!(row(&snap)["keeps"]["pages"], 300, "{rows:?}");
    assert!(row(&rec)["keeps"].is_null(), "{rows:?}");

    // gc still refuses, naming the blob and the fix.
    let err = fails(&store, &["gc", "--grace", "0"]);
    assert!(
        err.contains(&rec.to_string()) && err.contains("pf store put FILE"),
        "{err}"
    );
}
