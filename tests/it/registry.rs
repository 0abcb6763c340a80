//! `pf push` and `pf pull` against a real registry (Debian's `docker-registry`, started by each
//! test on a free loopback port and stopped by pid): the errors a user meets, each one line with
//! the fix, and (live) a goblin frozen here, pushed through a registry that dies midway, pulled
//! into another store and thawed in a new network namespace.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pf_core::BlobStore as _;
use pf_registry::test_support::{Registry, TestCerts, docker_config, htpasswd, non_loopback_ipv4};
use pf_world_procs::test_support::{Deadline, live};

use crate::support::{blob_files, pf, pf_bin, text};

/// Run a command to its end (stdin closed), at most 120 s.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start pf");
    wait(child, b"")
}

/// Feed `input`, collect the output, kill the child after 120 s.
fn wait(child: Child, input: &[u8]) -> Output {
    crate::support::finish(child, input, Duration::from_secs(120))
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Exit 1 with exactly one line on stderr, `error: …` holding every one of `words`.
fn one_line_error(out: &Output, what: &str, words: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: not one line: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    for word in words {
        assert!(err.contains(word), "{what}: no {word:?} in {err}");
    }
    assert!(out.stdout.is_empty(), "{what}: {}", text(&out.stdout));
    err
}

/// `pf` with its docker config in `conf` (a dir; none there means anonymous).
fn pf_with(store: &Path, conf: &Path) -> Command {
    let mut cmd = pf(store);
    cmd.env("DOCKER_CONFIG", conf).env_remove("HOME");
    cmd
}

/// A small synthetic snapshot in `store`: a record naming one blob. Its name is `snap`.
fn put_snapshot(store: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"\x00some images").unwrap();
    let digest = ok(
        &run({
            let mut c = pf(store);
            c.args(["store", "put"]).arg(&data);
            c
        }),
        "put",
    );
    let record = dir.path().join("record");
    std::fs::write(
        &record,
        format!(
            r#"{{"kind":"procs.criu.v1","criu_dump":"{}","pids":[1]}}"#,
            digest.trim()
        ),
    )
    .unwrap();
    let mut c = pf(store);
    c.args(["store", "put", "--tag", "snap"]).arg(&record);
    ok(&run(c), "put record");
}

#[test]
fn push_and_pull_errors_are_one_line_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let auth = htpasswd(dir.path(), "ann", "right-horse");
    let registry = Registry::start(&dir.path().join("registry"), Some(&auth));
    let addr = registry.addr();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    put_snapshot(&a);
    let none = dir.path().join("no-config");
    let wrong = dir.path().join("wrong");
    let right = dir.path().join("right");
    for d in [&none, &wrong, &right] {
        std::fs::create_dir(d).unwrap();
    }
    docker_config(&wrong, &addr, "ann", "wrong-horse");
    docker_config(&right, &addr, "ann", "right-horse");
    let push = |conf: &Path, target: &str| {
        let mut c = pf_with(&a, conf);
        c.args(["push", "snap", target]);
        run(c)
    };
    let pull = |conf: &Path, source: &str| {
        let mut c = pf_with(&b, conf);
        c.args(["pull", source, "--tag", "got"]);
        run(c)
    };
    let target = format!("{addr}/team/repl:v1");

    one_line_error(
        &push(&none, &target),
        "no credentials",
        &["needs credentials", "docker login"],
    );
    one_line_error(
        &push(&wrong, &target),
        "wrong password",
        &[
            "refused the credentials",
            "\"ann\"",
            "check the user and password",
        ],
    );
    one_line_error(
        &pull(&wrong, &target),
        "wrong password (pull)",
        &["refused the credentials"],
    );
    // The failed pull made no store at b: an empty one would pass for a store from then on.
    assert!(!b.exists(), "a failed pull left {}", b.display());
    let out = push(&right, &target);
    ok(&out, "push with the right password");
    assert!(
        text(&out.stderr).contains("2 of 2 blobs uploaded"),
        "{}",
        text(&out.stderr)
    );

    one_line_error(
        &pull(&right, &format!("{addr}/team/nothing:v1")),
        "unknown repository",
        &["has no repository team/nothing", "check the name"],
    );
    one_line_error(
        &pull(&right, &format!("{addr}/team/repl:v9")),
        "unknown tag",
        &["has no tag \"v9\"", "(it has v1)", "check the tag"],
    );
    one_line_error(
        &pull(&right, "team/repl:v1"),
        "no registry host",
        &["invalid reference", "localhost:5000/repl:warm"],
    );
    one_line_error(
        &push(&right, &format!("{addr}/team/repl")),
        "no tag",
        &["it has no tag"],
    );

    // A plain web server on loopback is not a registry.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _web = KillChild(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    one_line_error(
        &pull(&none, &format!("127.0.0.1:{port}/repl:v1")),
        "a web server",
        &[
            "is not an OCI registry",
            "404",
            "check the registry address",
        ],
    );

    // A blob damaged in the registry's storage: the pull names it and keeps nothing.
    let data = registry.blob_data_path(&put_snapshot_data_hex());
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[3] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    one_line_error(
        &pull(&right, &target),
        "a corrupt blob in the registry",
        &[
            &format!("blob sha256:{} from", put_snapshot_data_hex()),
            "is corrupt",
            "nothing of this pull was kept",
            "delete that blob from the registry's storage, then push the snapshot again",
        ],
    );

    // None of the failed pulls left anything in store B.
    let store_b = pf_core::FsBlobStore::open(&b).unwrap();
    assert!(store_b.list().unwrap().is_empty());
    assert!(store_b.names().unwrap().is_empty());

    // The fix the error gives works.
    std::fs::remove_dir_all(data.parent().unwrap()).unwrap();
    let out = push(&right, &target);
    ok(&out, "push after the damaged blob was deleted");
    ok(&pull(&right, &target), "pull after the push again");
    assert!(store_b.get_name("got").is_ok());
    drop(registry);
}

/// The hex digest of the data blob [`put_snapshot`] stores.
fn put_snapshot_data_hex() -> String {
    pf_core::Digest256::of(b"\x00some images").hex()
}

#[test]
fn credentials_from_a_docker_credential_helper() {
    let dir = tempfile::tempdir().unwrap();
    let auth = htpasswd(dir.path(), "ann", "right-horse");
    let registry = Registry::start(&dir.path().join("registry"), Some(&auth));
    let addr = registry.addr();
    let a = dir.path().join("a");
    put_snapshot(&a);
    // A helper as docker runs them: `get`, the registry on stdin, JSON on stdout. It notes what
    // it was asked.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = dir.path().join("asked");
    let helper = bin.join("docker-credential-pftest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nserver=$(cat)\necho \"$1 $server\" >> {}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"ann\",\"Secret\":\"right-horse\"}}' \"$server\"\n",
            asked.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let push = |config: serde_json::Value, tag: &str| {
        let conf = dir.path().join(format!("conf-{tag}"));
        std::fs::create_dir(&conf).unwrap();
        std::fs::write(conf.join("config.json"), config.to_string()).unwrap();
        let mut c = pf_with(&a, &conf);
        c.env("PATH", &path)
            .args(["push", "snap", &format!("{addr}/team/repl:{tag}")]);
        run(c)
    };
    ok(
        &push(serde_json::json!({"credHelpers": {&addr: "pftest"}}), "v1"),
        "push with credHelpers",
    );
    ok(
        &push(serde_json::json!({"credsStore": "pftest"}), "v2"),
        "push with credsStore",
    );
    let asked = std::fs::read_to_string(&asked).unwrap();
    assert!(
        asked.lines().all(|l| l == format!("get {addr}")) && asked.lines().count() >= 2,
        "{asked}"
    );
    one_line_error(
        &push(
            serde_json::json!({"credHelpers": {&addr: "pfmissing"}}),
            "v3",
        ),
        "a helper that is not installed",
        &["docker-credential-pfmissing", "install it on PATH"],
    );
}

#[test]
fn https_with_the_systems_roots_and_plain_http_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let ip = std::net::IpAddr::V4(non_loopback_ipv4());
    let certs = TestCerts::make(dir.path(), ip);
    let registry = Registry::start_at(
        &dir.path().join("tls-registry"),
        ip,
        Some((&certs.cert, &certs.key)),
    );
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    put_snapshot(&a);
    let target = format!("{}/team/repl:v1", registry.addr());
    // The system's roots, made to hold the test's authority the standard way (SSL_CERT_FILE),
    // or only another authority.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let other = TestCerts::make(&other, ip);
    let roots = |cmd: &mut Command, trusted: bool| {
        cmd.env_remove("SSL_CERT_DIR")
            .env("SSL_CERT_FILE", if trusted { &certs.ca } else { &other.ca });
    };
    let mut push = pf(&a);
    push.args(["push", "snap", &target, "--json"]);
    roots(&mut push, true);
    let pushed: serde_json::Value =
        serde_json::from_str(&ok(&run(push), "push over https")).unwrap();
    assert_eq!(pushed["uploaded"], 2, "{pushed}");
    let mut pull = pf(&b);
    pull.args(["pull", &target, "--tag", "got"]);
    roots(&mut pull, true);
    ok(&run(pull), "pull over https");
    let store_b = pf_core::FsBlobStore::open(&b).unwrap();
    assert_eq!(
        store_b.get_name("got").unwrap().to_string(),
        pushed["snapshot"].as_str().unwrap()
    );

    // A certificate the system does not trust: one line that says how to trust it.
    let mut pull = pf(&b);
    pull.args(["pull", &target, "--tag", "again"]);
    roots(&mut pull, false);
    one_line_error(
        &run(pull),
        "untrusted certificate",
        &["certificate of", "is not trusted", "SSL_CERT_FILE=CA.pem"],
    );

    // Plain http to an address that is not loopback: refused unless asked for.
    let plain = Registry::start_at(&dir.path().join("plain-registry"), ip, None);
    let target = format!("{}/team/repl:v1", plain.addr());
    let mut push = pf(&a);
    push.args(["push", "snap", &target]);
    roots(&mut push, true);
    one_line_error(
        &run(push),
        "plain http",
        &["does not speak https", "add --insecure"],
    );
    let mut push = pf(&a);
    push.args(["push", "snap", &target, "--insecure"]);
    ok(&run(push), "push over plain http with --insecure");
    assert!(
        pf_core::FsBlobStore::open(&b)
            .unwrap()
            .get_name("again")
            .is_err()
    );
}

/// Kills (by pid) and reaps a child when dropped.
struct KillChild(Child);

impl Drop for KillChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A goblin holding 96 MiB of random bytes; it prints `ready <hash>` once they are in memory,
/// and answers `check` with the hash of what it holds then.
const HOARD: &str = r#"
import hashlib, os, sys
data = os.urandom(96 << 20)
print("ready", hashlib.sha256(data).hexdigest()[:16], flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        print(hashlib.sha256(data).hexdigest()[:16], flush=True)
"#;

#[test]
fn live_goblin_pushed_through_a_registry_that_dies_midway_thaws_elsewhere() {
    const NAME: &str = "live_goblin_pushed_through_a_registry_that_dies_midway_thaws_elsewhere";
    if !live(NAME) {
        return;
    }
    // Build pf before the clock starts.
    pf_bin();
    let _deadline = Deadline::start(NAME, Duration::from_secs(170));
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let storage = dir.path().join("registry");
    let mut registry = Registry::start(&storage, None);
    let port = registry.port();
    let target = format!("{}/goblins/hoard:v1", registry.addr());

    let hash = spawn_hoard(&a, "v1");

    // Push, and kill the registry once a good part of the images is in its upload area.
    let mut push = pf(&a);
    push.args(["push", "hoard", &target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = push.spawn().expect("pf push");
    let uploads = storage.join("docker/registry/v2/repositories/goblins/hoard/_uploads");
    let started = Instant::now();
    while upload_bytes(&uploads) < 24 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the upload never reached 24 MiB"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    registry.stop();
    let out = wait(child, b"");
    let err = one_line_error(
        &out,
        "push to a dead registry",
        &["run the same command again"],
    );
    assert!(err.contains("cannot push hoard"), "{err}");
    // The images blob's upload session is kept for the rerun, private to the store's owner.
    let sessions = a.join("registry/uploads");
    let kept: Vec<_> = std::fs::read_dir(&sessions)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    {
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(&kept[0]).unwrap().mode() & 0o777, 0o600);
    }

    // Same storage, same address: the rerun completes, sending only what is missing.
    let registry = Registry::start_on(&storage, port, None);
    let mut push = pf(&a);
    push.args(["push", "hoard", &target, "--json"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&run(push), "push again")).unwrap();
    assert!(json["skipped"].as_u64().unwrap() >= 1, "{json}");
    assert!(json["uploaded"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 0);
    let mut push = pf(&a);
    push.args(["push", "hoard", &target, "--json"]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&run(push), "push a third time")).unwrap();
    assert_eq!(json["uploaded"], 0, "{json}");
    assert_eq!(json["bytes_uploaded"], 0, "{json}");

    // Pull into an empty store and thaw there, in a network namespace of its own (with its
    // loopback up: CRIU's kernel probes connect a socket before restoring anything).
    let mut pull = pf(&b);
    pull.args(["pull", &target, "--tag", "hoard", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&run(pull), "pull")).unwrap();
    assert_eq!(json["fetched"], json["blobs"], "{json}");
    assert_eq!(thaw_in_new_netns(&b, "hoard"), hash);
    drop(registry);
}

/// Freeze a [`HOARD`] goblin into `store` as `hoard` in snapshot format `format`; the hash of
/// its bytes.
fn spawn_hoard(store: &Path, format: &str) -> String {
    let mut spawn = pf(store);
    spawn
        .env("PF_SNAPSHOT_FORMAT", format)
        .args([
            "goblin", "spawn", "--tag", "hoard", "--until", "^ready ", "--",
        ])
        .args(["python3", "-u", "-c", HOARD]);
    let out = run(spawn);
    ok(&out, "goblin spawn");
    let stderr = text(&out.stderr);
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("ready "))
        .unwrap_or_else(|| panic!("no ready line in {stderr}"))
        .to_owned()
}

/// Thaw `name` from `store` in a new network namespace (loopback up: CRIU's kernel probes
/// connect a socket before restoring anything) and ask it for the hash of its bytes.
fn thaw_in_new_netns(store: &Path, name: &str) -> String {
    thaw_in_new_netns_with(store, name, &[]).0
}

/// [`thaw_in_new_netns`] with more `pf -v goblin thaw` arguments (`--lazy`): the goblin's answer
/// and pf's stderr.
fn thaw_in_new_netns_with(store: &Path, name: &str, args: &[&str]) -> (String, String) {
    let mut thaw = Command::new("unshare");
    thaw.args([
        "--net",
        "--",
        "sh",
        "-c",
        r#"ip link set lo up && exec "$0" "$@""#,
    ])
    .arg(pf_bin())
    .arg("--store")
    .arg(store)
    .args(["-v", "goblin", "thaw"])
    .args(args)
    .arg(name)
    .env_remove("PF_STORE")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = thaw.spawn().expect("unshare --net pf goblin thaw");
    let out = wait(child, b"check\n");
    let answer = ok(&out, "thaw from the pulled store").trim().to_owned();
    (answer, text(&out.stderr))
}

#[test]
fn live_v2_snapshot_travels_with_its_page_packs_and_thaws_elsewhere() {
    const NAME: &str = "live_v2_snapshot_travels_with_its_page_packs_and_thaws_elsewhere";
    if !live(NAME) {
        return;
    }
    pf_bin();
    let _deadline = Deadline::start(NAME, Duration::from_secs(170));
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let registry = Registry::start(&dir.path().join("registry"), None);
    let target = format!("{}/goblins/hoard:v2", registry.addr());
    let hash = spawn_hoard(&a, "v2");
    let store_a = pf_core::FsBlobStore::open(&a).unwrap();
    let record = store_a.get(&store_a.get_name("hoard").unwrap()).unwrap();
    assert!(text(&record).contains("procs.criu.v2"), "{}", text(&record));

    let push = |what: &str| {
        let mut c = pf(&a);
        c.args(["push", "hoard", &target, "--json"]);
        serde_json::from_str::<serde_json::Value>(&ok(&run(c), what)).unwrap()
    };
    let first = push("push");
    // The record, the images tar, a pages manifest and its list, and 12 or more 8 MiB packs.
    assert!(first["blobs"].as_u64().unwrap() >= 16, "{first}");
    assert_eq!(first["uploaded"], first["blobs"], "{first}");
    let again = push("push again");
    assert_eq!(again["uploaded"], 0, "{again}");

    let mut pull = pf(&b);
    pull.args(["pull", &target, "--tag", "hoard", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&run(pull), "pull")).unwrap();
    assert_eq!(json["fetched"], first["blobs"], "{json}");
    // The pulled packs' pages are in b's page index: a freeze there dedups against them.
    assert!(json["pages_indexed"].as_u64().unwrap() > 20_000, "{json}");
    // Its packs are stored as a local freeze stores them: seekable, one read per frame.
    let store_b = pf_core::FsBlobStore::open(&b).unwrap();
    let seekable = store_b
        .list()
        .unwrap()
        .iter()
        .filter(|d| store_b.seekable(d).unwrap())
        .count() as u64;
    assert!(
        seekable + 4 >= first["blobs"].as_u64().unwrap() && seekable >= 12,
        "{seekable} seekable blobs of {first}"
    );
    assert_eq!(thaw_in_new_netns(&b, "hoard"), hash);
    // And a lazy thaw serves its memory from those packs.
    let (answer, stderr) = thaw_in_new_netns_with(&b, "hoard", &["--lazy"]);
    assert_eq!(answer, hash, "{stderr}");
    assert!(stderr.contains("restored lazily"), "{stderr}");
    drop(registry);
}

/// The largest partial upload in the registry's upload area.
fn upload_bytes(uploads: &Path) -> u64 {
    std::fs::read_dir(uploads)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::metadata(e.path().join("data")).ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A goblin of `argv[1]` MiB of random bytes in one page-aligned anonymous mapping. `mutate`
/// overwrites every 20th page of it in place with new random bytes read straight into it (5%
/// of its pages, each a page no snapshot holds yet; no other page of the process changes) and
/// answers `mutated`.
const CHURN: &str = r#"
import mmap, sys
n = int(sys.argv[1]) << 20
buf = mmap.mmap(-1, n)
view = memoryview(buf)
rand = open("/dev/urandom", "rb", buffering=0)
for at in range(0, n, 1 << 20):
    rand.readinto(view[at : at + (1 << 20)])
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "mutate":
        # Read straight into the pages: no buffer of the interpreter's own changes.
        for p in range(0, n // 4096, 20):
            rand.readinto(view[p * 4096 : (p + 1) * 4096])
        print("mutated", flush=True)
"#;

/// Freeze the goblin `pid` into `store` as `tag` (v2, left running); its digest.
fn freeze_running(store: &Path, pid: u32, tag: &str) -> String {
    let mut cmd = pf(store);
    cmd.env(pf_world_procs::FORMAT_ENV, "v2").args([
        "goblin",
        "freeze",
        "--leave-running",
        "--pid",
        &pid.to_string(),
        "--tag",
        tag,
    ]);
    ok(&run(cmd), "goblin freeze").trim().to_owned()
}

/// The blobs of a v2 snapshot by role: `(packs, page lists, everything else)`, and its pages.
fn v2_roles(
    store: &pf_core::FsBlobStore,
    root: &pf_core::Digest256,
) -> (
    Vec<pf_core::Digest256>,
    Vec<pf_core::Digest256>,
    Vec<pf_core::Digest256>,
    u64,
) {
    let digest = |v: &serde_json::Value| v.as_str().unwrap().parse::<pf_core::Digest256>().unwrap();
    let record: serde_json::Value = serde_json::from_slice(&store.get(root).unwrap()).unwrap();
    let mut other = vec![*root, digest(&record["criu_dump"])];
    let (mut packs, mut lists, mut pages) = (Vec::new(), Vec::new(), 0);
    for memory in record["memory"].as_array().expect("a v2 record") {
        let manifest = digest(&memory["manifest"]);
        let m: serde_json::Value = serde_json::from_slice(&store.get(&manifest).unwrap()).unwrap();
        other.push(manifest);
        lists.push(digest(&m["list"]));
        // A pack the snapshot's files share (pages packed during the dump, for all of them)
        // once.
        for pack in m["packs"].as_array().unwrap().iter().map(digest) {
            if !packs.contains(&pack) {
                packs.push(pack);
            }
        }
        pages += m["pages"].as_u64().unwrap();
    }
    (packs, lists, other, pages)
}

#[test]
#[allow(clippy::print_stderr)]
fn live_next_snapshot_after_5_percent_changed_pushes_about_its_new_pages() {
    const NAME: &str = "live_next_snapshot_after_5_percent_changed_pushes_about_its_new_pages";
    if !live(NAME) {
        return;
    }
    pf_bin();
    let _deadline = Deadline::start(NAME, Duration::from_secs(170));
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let registry = Registry::start(&dir.path().join("registry"), None);

    let mut cmd = Command::new("setsid");
    cmd.args(["python3", "-u", "-c", CHURN, "64"])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = pf_world_procs::test_support::spawn_clean(&mut cmd).expect("start goblin");
    let pid = child.id();
    let guard = pf_world_procs::test_support::KillOnDrop(i32::try_from(pid).unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut line = || lines.next().expect("a line").expect("read a line");
    assert_eq!(line(), "ready");

    let push = |tag: &str| {
        let mut c = pf(&a);
        c.args([
            "push",
            tag,
            &format!("{}/goblins/churn:{tag}", registry.addr()),
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&ok(&run(c), "push")).unwrap()
    };
    let first = freeze_running(&a, pid, "s1");
    push("s1");
    std::io::Write::write_all(&mut stdin, b"mutate\n").unwrap();
    assert_eq!(line(), "mutated");
    let next = freeze_running(&a, pid, "s2");
    let sent = push("s2");

    let store = pf_core::FsBlobStore::open(&a).unwrap();
    let (old_packs, ..) = v2_roles(&store, &first.parse().unwrap());
    let (packs, lists, other, pages) = v2_roles(&store, &next.parse().unwrap());
    let new_packs: Vec<_> = packs.iter().filter(|p| !old_packs.contains(p)).collect();
    let new_pages: u64 = new_packs
        .iter()
        .map(|p| {
            pf_core::pack::Pack::parse(**p, &store.get(p).unwrap())
                .unwrap()
                .entries()
                .count() as u64
        })
        .sum();
    let stored: u64 = new_packs
        .iter()
        .map(|p| store.stored_size(p).unwrap())
        .sum();
    let raw =
        |ds: &[pf_core::Digest256]| ds.iter().map(|d| store.raw_size(d).unwrap()).sum::<u64>();
    let bytes = sent["bytes_uploaded"].as_u64().unwrap();
    let ratio = bytes as f64 / stored as f64;
    let (lists, other) = (raw(&lists), raw(&other));
    eprintln!(
        "{NAME}: {pages} pages, {new_pages} new ({:.2}%); sent {bytes} bytes = {ratio:.3}x the new packs' {stored} stored; page lists {lists}, record + images tar + pages manifests {other}",
        new_pages as f64 * 100.0 / pages as f64,
    );
    // The goblin changed what the issue says: 5% of its pages (the interpreter's own pages
    // and the buffer's 95% stay as they were).
    let share = new_pages as f64 / pages as f64;
    assert!(
        (0.045..=0.055).contains(&share),
        "{new_pages} of {pages} pages are new"
    );
    // Nothing travels but the new pages and the snapshot's own small blobs: its page list
    // (the changes from the first snapshot's: 48 bytes per changed page), images tar, record
    // and manifests.
    let (p1, l1, o1, _) = v2_roles(&store, &first.parse().unwrap());
    let before: std::collections::BTreeSet<_> = [p1, l1, o1].concat().into_iter().collect();
    let (p2, l2, o2, _) = v2_roles(&store, &next.parse().unwrap());
    let after: std::collections::BTreeSet<_> = [p2, l2, o2].concat().into_iter().collect();
    assert_eq!(
        sent["uploaded"],
        after.difference(&before).count(),
        "{sent}"
    );
    assert!(
        bytes <= stored + 48 * new_pages + 64 + (64 << 10),
        "{bytes} bytes sent: more than the new packs ({stored}), a delta page list ({} for \
         {new_pages} changed pages) and 64 KiB",
        48 * new_pages + 64,
    );
    // The issue's target: at most 1.2x the new pages' stored size. A whole page list (40
    // bytes for every page) alone would be 40 / (4096 x 5%) = 0.195x of them; the delta list
    // is 48 / 4096 = 0.012x (measured here: 1.02x in all).
    assert!(ratio <= 1.2, "sent {ratio:.3}x the new pages' stored size");
    drop(stdin);
    drop(guard);
    let _ = child.wait();
}

/// An incompressible page that is the same for the same `seed`.
fn seeded_page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = vec![0u8; pf_core::pack::PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// Store a file of the pages `seeds` page by page in `store`, and a record naming its manifest
/// tagged `name`; returns the manifest and the file's bytes.
fn put_pages_snapshot(
    store: &pf_core::FsBlobStore,
    dir: &Path,
    name: &str,
    seeds: std::ops::Range<u64>,
) -> (pf_core::Digest256, Vec<u8>) {
    let path = dir.join(name);
    let bytes: Vec<u8> = seeds.flat_map(seeded_page).collect();
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let mut w = pf_core::pages::PageWriter::new(store, store.page_index(), 2);
    let stored = w.write_file(&file, &path).unwrap();
    w.commit().unwrap();
    let record = format!(r#"{{"kind":"procs.test","pages":"{}"}}"#, stored.manifest);
    let root = store.put(record.as_bytes()).unwrap();
    store.set_name(name, &root).unwrap();
    (stored.manifest, bytes)
}

#[test]
fn a_repacked_snapshot_pushes_its_forward_records_and_pulls_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let store_a = pf_core::FsBlobStore::open(&a).unwrap();
    // `kept` uses 300 of `old`'s 3000 pages; once `old` goes, its second pack is mostly dead.
    put_pages_snapshot(&store_a, dir.path(), "old", 0..3000);
    let (manifest, bytes) = put_pages_snapshot(&store_a, dir.path(), "kept", 2700..3000);
    ok(
        &run({
            let mut c = pf(&a);
            c.args(["store", "untag", "old"]);
            c
        }),
        "untag",
    );
    let repack = ok(
        &run({
            let mut c = pf(&a);
            c.args(["store", "gc", "--grace", "0", "--repack", "--json"]);
            c
        }),
        "gc --repack",
    );
    let repack: serde_json::Value = serde_json::from_str(&repack).unwrap();
    assert!(
        repack["repack"]["forwards_written"].as_u64().unwrap() >= 1,
        "{repack}"
    );
    let forwards = store_a.forwards().unwrap();
    assert!(!forwards.is_empty());

    let registry = Registry::start(&dir.path().join("registry"), None);
    let target = format!("{}/team/kept:v1", registry.addr());
    let pushed: serde_json::Value = serde_json::from_str(&ok(
        &run({
            let mut c = pf(&a);
            c.args(["push", "kept", &target, "--json"]);
            c
        }),
        "push",
    ))
    .unwrap();
    // The record, the manifest, its list (and the lists it is a delta of), the new pack and
    // one forward record per old pack.
    let bases = pf_core::pages::load_manifest(&store_a, &manifest)
        .unwrap()
        .bases
        .len() as u64;
    assert_eq!(
        pushed["blobs"].as_u64().unwrap(),
        4 + bases + forwards.len() as u64,
        "{pushed}"
    );
    let pulled: serde_json::Value = serde_json::from_str(&ok(
        &run({
            let mut c = pf(&b);
            c.args(["pull", &target, "--tag", "kept", "--json"]);
            c
        }),
        "pull",
    ))
    .unwrap();
    assert_eq!(pulled["fetched"], pushed["blobs"], "{pulled}");
    let store_b = pf_core::FsBlobStore::open(&b).unwrap();
    assert_eq!(store_b.forwards().unwrap(), forwards);
    let reader = pf_core::pages::PagesReader::open(&store_b, &manifest).unwrap();
    let mut out = vec![0u8; bytes.len()];
    reader.read(0, &mut out).unwrap();
    assert!(out == bytes, "the pulled snapshot reads page for page");
    ok(
        &run({
            let mut c = pf(&b);
            c.args(["store", "verify"]);
            c
        }),
        "verify the pulled store",
    );
    // Pulled again, nothing moves: not even the forward records, which are no blobs.
    let again: serde_json::Value = serde_json::from_str(&ok(
        &run({
            let mut c = pf(&b);
            c.args(["pull", &target, "--json"]);
            c
        }),
        "pull again",
    ))
    .unwrap();
    assert_eq!(again["fetched"], 0, "{again}");
    assert_eq!(again["skipped"], pushed["blobs"], "{again}");
    drop(registry);
}

#[test]
fn pulling_again_mends_a_damaged_copy_of_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let store_a = pf_core::FsBlobStore::open(&a).unwrap();
    let (manifest, bytes) = put_pages_snapshot(&store_a, dir.path(), "snap", 0..300);
    let registry = Registry::start(&dir.path().join("registry"), None);
    let target = format!("{}/team/snap:v1", registry.addr());
    let pf_json = |store: &Path, args: &[&str], what: &str| -> serde_json::Value {
        let out = ok(
            &run({
                let mut c = pf(store);
                c.args(args);
                c
            }),
            what,
        );
        serde_json::from_str(&out).unwrap()
    };
    pf_json(&a, &["push", "snap", &target, "--json"], "push");
    pf_json(&b, &["pull", &target, "--tag", "snap", "--json"], "pull");

    // Damage b's copy: cut the record (kept compressed) short, and its first pack (kept raw).
    let store_b = pf_core::FsBlobStore::open(&b).unwrap();
    let root = store_b.get_name("snap").unwrap();
    let pack = pf_core::pages::load_manifest(&store_b, &manifest)
        .unwrap()
        .packs[0];
    for digest in [root, pack] {
        let path = store_b.blob_path(&digest);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
    }
    let verify = run({
        let mut c = pf(&b);
        c.args(["store", "verify"]);
        c
    });
    assert!(!verify.status.success(), "verify passed a damaged store");

    // Pulling again fetches the two damaged blobs (and only what it must) and mends them.
    let pulled = pf_json(&b, &["pull", &target, "--json"], "pull again");
    let fetched = pulled["fetched"].as_u64().unwrap();
    assert!((2..=3).contains(&fetched), "{pulled}");
    ok(
        &run({
            let mut c = pf(&b);
            c.args(["store", "verify"]);
            c
        }),
        "verify the mended store",
    );
    let reader = pf_core::pages::PagesReader::open(&store_b, &manifest).unwrap();
    let mut out = vec![0u8; bytes.len()];
    reader.read(0, &mut out).unwrap();
    assert!(out == bytes, "the mended snapshot reads page for page");
    drop(registry);
}

/// Send a started pf SIGINT, as Ctrl-C does, and wait for it.
fn ctrl_c(child: std::process::Child) -> std::process::Output {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    wait(child, b"")
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Ctrl-C during a push ends it saying that the same command goes on, and it does. Ctrl-C
/// during a pull, once it stores blobs: pf removes what the pull stored and exits 130, saying
/// so; no name, no blob, no temp file is left.
#[test]
fn a_pull_interrupted_by_ctrl_c_keeps_nothing_of_itself() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = dir.path().join("a");
    let store = pf_core::FsBlobStore::open(&a).unwrap();
    // 16 incompressible blobs of 8 MiB, pulled one at a time: long enough to be interrupted.
    let blobs: Vec<String> = (0..16u64)
        .map(|i| {
            let bytes: Vec<u8> = (i * 2048..(i + 1) * 2048).flat_map(seeded_page).collect();
            store.put(&bytes).unwrap().to_string()
        })
        .collect();
    let record = serde_json::json!({"kind": "procs.test", "blobs": blobs}).to_string();
    let root = store.put(record.as_bytes()).unwrap();
    store.set_name("big", &root).unwrap();
    let reference = format!("{}/cancel/big:v1", registry.addr());
    // Ctrl-C during a push: pf says how to go on, and the same command then does.
    let mut push = pf(&a);
    push.args(["push", "big", &reference, "--parallel", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = push.spawn().expect("start pf push");
    let end = Instant::now() + Duration::from_secs(60);
    let blob_data = |dir: &Path| -> usize {
        walk(dir)
            .iter()
            .filter(|p| p.ends_with("data") && p.to_string_lossy().contains("/blobs/sha256/"))
            .count()
    };
    while blob_data(&dir.path().join("registry")) == 0 {
        assert!(Instant::now() < end, "the push sent no blob in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = ctrl_c(child);
    let err = text(&out.stderr);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(2),
        "{}: {err}",
        out.status
    );
    assert!(
        err.contains("interrupted by signal 2: the push stopped; run the same `pf push` again"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let mut push = pf(&a);
    push.args(["push", "big", &reference]);
    let again = ok(&run(push), "push again");
    assert_eq!(again.trim(), root.to_string());

    let b = dir.path().join("b");
    let mut pull = pf(&b);
    pull.args(["pull", &reference, "--tag", "big", "--parallel", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = pull.spawn().expect("start pf pull");
    let end = Instant::now() + Duration::from_secs(60);
    let stored = |store: &Path| {
        blob_files(store)
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "zst" || e == "raw"))
    };
    while !stored(&b) {
        assert!(Instant::now() < end, "the pull stored no blob in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = ctrl_c(child);
    let err = text(&out.stderr);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(2),
        "killed by the signal, so that a shell loop around it stops: {err}"
    );
    assert!(err.contains("interrupted by signal 2"), "{err}");
    assert!(err.contains("nothing of it was kept"), "{err}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let left = blob_files(&b);
    assert!(left.is_empty(), "the interrupted pull left {left:?}");
    assert!(!b.join("refs/big").exists());
    // Nor the store it made: an empty one there would pass for a store from then on.
    assert!(!b.exists(), "the interrupted pull left {:?}", walk(&b));
    drop(registry);
}
