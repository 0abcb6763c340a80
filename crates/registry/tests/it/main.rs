//! pf-registry against a real registry: Debian's `docker-registry` (the CNCF distribution
//! server) started by each test on a free loopback port with its own storage, stopped by pid.
//! No CRIU needed: the snapshots are synthetic blob graphs of the shape pf stores.

mod relay;

use std::io::Read as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pf_core::{BlobStore, Digest256, FsBlobStore};
use pf_registry::test_support::{Registry, docker_config, htpasswd};
use pf_registry::{ConnectOptions, Error, ErrorKind, PullOptions, PushOptions, Reference};

/// Pseudo-random, incompressible bytes (xorshift), `len` of them, from `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A snapshot shaped like pf's: a root record naming an images tar and a page manifest that
/// names packs. Returns the root's digest.
fn snapshot(store: &dyn BlobStore, seed: u64, packs: &[Vec<u8>]) -> Digest256 {
    let tar = store.put(&noise(seed, 300_000)).unwrap();
    let packs: Vec<String> = packs
        .iter()
        .map(|p| store.put(p).unwrap().to_string())
        .collect();
    let pages = store
        .put(
            serde_json::json!({"kind": "pages.v1", "packs": packs})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    store
        .put(
            serde_json::json!({"kind": "procs.criu.v2", "criu_dump": tar, "pages": pages, "pids": [seed]})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
}

fn connect() -> ConnectOptions {
    ConnectOptions {
        insecure: false,
        docker_config: None,
        parallel: 4,
        idle_timeout: pf_registry::DEFAULT_IDLE_TIMEOUT,
    }
}

fn push_opts() -> PushOptions {
    PushOptions {
        connect: connect(),
        sessions: None,
        cancel: None,
    }
}

fn pull_opts(name: Option<&str>) -> PullOptions {
    PullOptions {
        connect: connect(),
        name: name.map(str::to_owned),
        cancel: None,
    }
}

fn reference(registry: &Registry, path: &str) -> Reference {
    Reference::parse(&format!("{}/{path}", registry.addr())).unwrap()
}

fn quiet(_: pf_registry::Event<'_>) {}

fn store(dir: &Path, name: &str) -> FsBlobStore {
    FsBlobStore::open(&dir.join(name)).unwrap()
}

#[test]
fn push_then_pull_moves_only_missing_blobs_and_keeps_digests() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = store(dir.path(), "a");
    let base = noise(1, 3 << 20);
    let big = noise(2, 20 << 20); // larger than one upload chunk: PATCHed in pieces
    let root = snapshot(&a, 10, &[base.clone(), big.clone()]);
    let r1 = reference(&registry, "team/repl:one");

    let first = pf_registry::push(&a, &root, &r1, &push_opts(), &quiet).unwrap();
    assert_eq!((first.blobs, first.uploaded, first.skipped), (5, 5, 0));
    assert_eq!(first.bytes_uploaded, first.bytes_total);
    assert!(first.manifest_digest.is_some());

    let again = pf_registry::push(&a, &root, &r1, &push_opts(), &quiet).unwrap();
    assert_eq!(
        (again.uploaded, again.skipped, again.bytes_uploaded),
        (0, 5, 0)
    );

    // The next snapshot shares the big pack: only what changed goes up.
    let changed = noise(3, 1 << 20);
    let next = snapshot(&a, 11, &[changed.clone(), big.clone()]);
    let r2 = reference(&registry, "team/repl:two");
    let second = pf_registry::push(&a, &next, &r2, &push_opts(), &quiet).unwrap();
    assert_eq!((second.uploaded, second.skipped), (4, 1));
    assert!(
        second.bytes_uploaded < changed.len() as u64 + 400_000,
        "{second:?}"
    );

    // Pull into an empty store: every blob arrives under its own digest, then the name.
    let b = store(dir.path(), "b");
    let moved = AtomicUsize::new(0);
    let pulled = pf_registry::pull(&b, &r1, &pull_opts(Some("repl")), &|e| {
        if let pf_registry::Event::Moved { .. } = e {
            moved.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(pulled.snapshot, root);
    assert_eq!((pulled.fetched, pulled.skipped), (5, 0));
    assert_eq!(moved.load(Ordering::Relaxed), 5);
    assert_eq!(b.get_name("repl").unwrap(), root);
    assert_eq!(b.list().unwrap(), a_closure(&a, &root));
    assert_eq!(b.get(&Digest256::of(&big)).unwrap(), big);

    // Pulling the next snapshot fetches only what the store lacks.
    let pulled = pf_registry::pull(&b, &r2, &pull_opts(None), &quiet).unwrap();
    assert_eq!((pulled.fetched, pulled.skipped), (4, 1));
    assert_eq!(pulled.snapshot, next);
    assert!(pf_core::references(&b, &next).is_ok());
}

/// A push cancelled midway (from its progress, as a Ctrl-C watcher would) stops, writes no
/// manifest, and says so; the same push run again skips what the registry took and ends it.
#[test]
fn a_cancelled_push_writes_no_tag_and_a_rerun_finishes_it() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = store(dir.path(), "a");
    let root = snapshot(&a, 20, &[noise(21, 1 << 20), noise(22, 12 << 20)]);
    let r = reference(&registry, "team/cancel:one");
    let cancel = Arc::new(AtomicBool::new(false));
    let options = PushOptions {
        connect: ConnectOptions {
            parallel: 1,
            ..connect()
        },
        sessions: None,
        cancel: Some(Arc::clone(&cancel)),
    };
    let err = pf_registry::push(&a, &root, &r, &options, &|e| {
        if let pf_registry::Event::Transferred { .. } = e {
            cancel.store(true, Ordering::SeqCst);
        }
    })
    .unwrap_err();
    assert!(matches!(&err, Error::PushCancelled { .. }), "{err:?}");
    assert!(err.to_string().contains("run again skips them"), "{err}");
    // No tag: a pull finds nothing to pull.
    let b = store(dir.path(), "b");
    let err = pf_registry::pull(&b, &r, &pull_opts(None), &quiet).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let again = pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap();
    assert!(again.manifest_digest.is_some());
    // The cancel cut the first blob's upload: the registry lacked it, and more.
    assert!(again.uploaded >= 1, "{again:?}");
    let pulled = pf_registry::pull(&b, &r, &pull_opts(None), &quiet).unwrap();
    assert_eq!(pulled.snapshot, root);
}

/// Every blob `root` reaches in `store`, sorted.
fn a_closure(store: &dyn BlobStore, root: &Digest256) -> Vec<Digest256> {
    let mut seen = std::collections::BTreeSet::from([*root]);
    let mut todo = vec![*root];
    while let Some(d) = todo.pop() {
        for c in pf_core::references(store, &d).unwrap() {
            if seen.insert(c) {
                todo.push(c);
            }
        }
    }
    seen.into_iter().collect()
}

#[test]
fn a_tampered_blob_is_refused_and_nothing_of_the_pull_stays() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = store(dir.path(), "a");
    // A pack-sized blob (read whole, checked, then stored) and one too large to be a pack
    // (streamed into the store, checked before it commits).
    let pack = noise(5, 2 << 20);
    let large = noise(7, 17 << 20);
    let root = snapshot(&a, 20, &[pack.clone(), noise(6, 100), large.clone()]);
    let r = reference(&registry, "repl:t");
    pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap();

    let b = store(dir.path(), "b");
    for blob in [&pack, &large] {
        // Flip one byte of the blob in the registry's own storage (same length).
        let digest = Digest256::of(blob);
        let path = registry.blob_data_path(&digest.hex());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1000] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();

        let err = pf_registry::pull(&b, &r, &pull_opts(Some("repl")), &quiet).unwrap_err();
        assert!(
            matches!(&err, Error::Tampered { digest: d, .. } if *d == digest),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Integrity);
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        assert!(b.list().unwrap().is_empty(), "{:?}", b.list().unwrap());
        assert!(b.names().unwrap().is_empty());
        bytes[1000] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
    }
    pf_registry::pull(&b, &r, &pull_opts(Some("repl")), &quiet).unwrap();
    assert_eq!(b.get_name("repl").unwrap(), root);
}

#[test]
fn basic_auth_from_docker_config_and_its_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let auth = htpasswd(dir.path(), "ann", "right-horse");
    let registry = Registry::start(&dir.path().join("registry"), Some(&auth));
    let a = store(dir.path(), "a");
    let root = snapshot(&a, 30, &[noise(7, 1000)]);
    let r = reference(&registry, "private/repl:v1");
    let with = |password: &str| {
        let conf = tempfile::tempdir_in(dir.path()).unwrap().keep();
        PushOptions {
            connect: ConnectOptions {
                docker_config: Some(docker_config(&conf, &registry.addr(), "ann", password)),
                ..connect()
            },
            sessions: None,
            cancel: None,
        }
    };

    let err = pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap_err();
    assert!(matches!(err, Error::CredentialsNeeded { .. }), "{err:?}");
    assert!(err.to_string().contains("docker login"), "{err}");

    let err = pf_registry::push(&a, &root, &r, &with("wrong"), &quiet).unwrap_err();
    assert!(
        matches!(&err, Error::CredentialsRefused { user, .. } if user == "ann"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Auth);

    let ok = pf_registry::push(&a, &root, &r, &with("right-horse"), &quiet).unwrap();
    assert_eq!(ok.uploaded, 4);
    let b = store(dir.path(), "b");
    let pull = PullOptions {
        connect: with("right-horse").connect,
        name: Some("p".into()),
        cancel: None,
    };
    assert_eq!(
        pf_registry::pull(&b, &r, &pull, &quiet).unwrap().snapshot,
        root
    );
}

#[test]
fn unknown_repository_tag_and_host_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = store(dir.path(), "a");
    let root = snapshot(&a, 40, &[noise(8, 10)]);
    pf_registry::push(
        &a,
        &root,
        &reference(&registry, "here:v1"),
        &push_opts(),
        &quiet,
    )
    .unwrap();
    let b = store(dir.path(), "b");

    let err = pf_registry::pull(
        &b,
        &reference(&registry, "nowhere:v1"),
        &pull_opts(None),
        &quiet,
    )
    .unwrap_err();
    assert!(matches!(err, Error::RepositoryNotFound { .. }), "{err:?}");
    let err = pf_registry::pull(
        &b,
        &reference(&registry, "here:v2"),
        &pull_opts(None),
        &quiet,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::TagNotFound { tags, .. } if tags == &["v1".to_owned()]),
        "{err:?}"
    );
    assert!(err.to_string().contains("(it has v1)"), "{err}");

    let port = registry.port();
    drop(registry);
    let gone = Reference::parse(&format!("127.0.0.1:{port}/here:v1")).unwrap();
    let err = pf_registry::pull(&b, &gone, &pull_opts(None), &quiet).unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert!(b.list().unwrap().is_empty());
}

#[test]
fn a_web_server_is_not_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 (apt-get install -y python3)");
    let _kill = KillChild(&mut server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = store(dir.path(), "b");
    let r = Reference::parse(&format!("127.0.0.1:{port}/repl:v1")).unwrap();
    let err = pf_registry::pull(&b, &r, &pull_opts(None), &quiet).unwrap_err();
    assert!(
        matches!(err, Error::NotARegistry { status: 404, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("check the registry address"),
        "{err}"
    );
}

/// Kills (by pid) and reaps a child when dropped.
struct KillChild<'a>(&'a mut std::process::Child);

impl Drop for KillChild<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_push_cut_off_by_a_dead_registry_completes_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("registry");
    let mut registry = Registry::start(&storage, None);
    let a = store(dir.path(), "a");
    let big = noise(9, 160 << 20);
    let root = snapshot(&a, 50, &[noise(10, 4096), big.clone()]);
    let r = reference(&registry, "repl:big");
    let port = registry.port();

    let err = std::thread::scope(|scope| {
        let pushing = scope.spawn(|| pf_registry::push(&a, &root, &r, &push_opts(), &quiet));
        // Stop the registry once part of the big blob is in its upload area.
        let uploads = storage.join("docker/registry/v2/repositories/repl/_uploads");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if uploaded_bytes(&uploads) > 24 << 20 {
                break;
            }
            assert!(
                !pushing.is_finished(),
                "the push ended before it could be cut off"
            );
            assert!(Instant::now() < deadline, "the upload never reached 24 MiB");
            std::thread::sleep(Duration::from_millis(5));
        }
        registry.stop();
        pushing.join().unwrap().unwrap_err()
    });
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err:?}");
    assert!(
        err.to_string().contains("run the same command again"),
        "{err}"
    );

    let registry = Registry::start_on(&storage, port, None);
    let done = pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap();
    assert!(done.skipped >= 1, "{done:?}");
    assert!(done.uploaded >= 1, "{done:?}");
    assert_eq!(done.uploaded + done.skipped, 5);

    let b = store(dir.path(), "b");
    pf_registry::pull(&b, &r, &pull_opts(Some("big")), &quiet).unwrap();
    let mut got = Vec::new();
    b.open(&Digest256::of(&big))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == big);
    drop(registry);
}

/// Bytes in the registry's upload area (partial uploads).
fn uploaded_bytes(uploads: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(uploads) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::metadata(e.path().join("data")).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// The token server of [`bearer_token_flow_with_basic_credentials`].
const TOKEN_SERVER: &str = include_str!("token_server.py");

#[test]
fn bearer_token_flow_with_basic_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=pf-test-token",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (apt-get install -y openssl)");
    assert!(status.success());
    let script = dir.path().join("token_server.py");
    std::fs::write(&script, TOKEN_SERVER).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("python3")
        .arg(&script)
        .arg(&key)
        .arg(&cert)
        .args([&port.to_string(), "ann", "right-horse", "pf-test-issuer"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("python3 with python3-cryptography");
    let stdout = server.stdout.take().unwrap();
    // Guarded before anything can fail, so the server never outlives the test.
    let _server = KillChild(&mut server);
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready).unwrap();
    assert_eq!(ready.trim(), "listening");

    let auth = pf_registry::test_support::RegistryAuth::token(
        &format!("http://127.0.0.1:{port}/token"),
        "pf-test-registry",
        "pf-test-issuer",
        &cert,
    );
    let registry = Registry::start(&dir.path().join("registry"), Some(&auth));
    let a = store(dir.path(), "a");
    let root = snapshot(&a, 60, &[noise(11, 5000)]);
    let r = reference(&registry, "team/tokened:v1");
    let with = |password: &str| {
        let conf = tempfile::tempdir_in(dir.path()).unwrap().keep();
        ConnectOptions {
            docker_config: Some(docker_config(&conf, &registry.addr(), "ann", password)),
            ..connect()
        }
    };

    let err = pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap_err();
    assert!(matches!(err, Error::CredentialsNeeded { .. }), "{err:?}");
    let wrong = PushOptions {
        connect: with("wrong"),
        sessions: None,
        cancel: None,
    };
    let err = pf_registry::push(&a, &root, &r, &wrong, &quiet).unwrap_err();
    assert!(matches!(err, Error::CredentialsRefused { .. }), "{err:?}");

    let right = PushOptions {
        connect: with("right-horse"),
        sessions: None,
        cancel: None,
    };
    let pushed = pf_registry::push(&a, &root, &r, &right, &quiet).unwrap();
    assert_eq!(pushed.uploaded, 4);
    let b = store(dir.path(), "b");
    let pull = PullOptions {
        connect: with("right-horse"),
        name: Some("t".into()),
        cancel: None,
    };
    let pulled = pf_registry::pull(&b, &r, &pull, &quiet).unwrap();
    assert_eq!((pulled.snapshot, pulled.fetched), (root, 4));
}

/// Options whose idle timeout is `idle`, one blob at a time.
fn idle_opts(idle: Duration) -> ConnectOptions {
    ConnectOptions {
        parallel: 1,
        idle_timeout: idle,
        ..connect()
    }
}

#[test]
fn a_slow_transfer_that_keeps_moving_never_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    // 64 KiB every 100 ms both ways: each blob's body takes seconds, no gap reaches the 1 s
    // idle timeout.
    let slow = relay::Relay::start(
        registry.port(),
        relay::Wire::Slow {
            bytes: 64 << 10,
            every: Duration::from_millis(100),
        },
    );
    let a = store(dir.path(), "a");
    let pack = noise(12, 1536 << 10);
    let root = snapshot(&a, 70, std::slice::from_ref(&pack));
    let r = Reference::parse(&format!("{}/slow:v1", slow.addr())).unwrap();
    let idle = Duration::from_secs(1);

    let started = Instant::now();
    let pushed = pf_registry::push(
        &a,
        &root,
        &r,
        &PushOptions {
            connect: idle_opts(idle),
            sessions: None,
            cancel: None,
        },
        &quiet,
    )
    .unwrap();
    let took = started.elapsed();
    assert_eq!(pushed.uploaded, 4);
    assert!(took > 2 * idle, "the push was not slow: {took:?}");

    let b = store(dir.path(), "b");
    let started = Instant::now();
    let pulled = pf_registry::pull(
        &b,
        &r,
        &PullOptions {
            connect: idle_opts(idle),
            name: Some("slow".into()),
            cancel: None,
        },
        &quiet,
    )
    .unwrap();
    let took = started.elapsed();
    assert_eq!((pulled.snapshot, pulled.fetched), (root, 4));
    assert!(took > 2 * idle, "the pull was not slow: {took:?}");
    assert_eq!(b.get(&Digest256::of(&pack)).unwrap(), pack);
}

#[test]
fn a_registry_gone_silent_mid_blob_is_an_error_naming_it_and_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = store(dir.path(), "a");
    let pack = noise(13, 4 << 20);
    let root = snapshot(&a, 80, std::slice::from_ref(&pack));
    let direct = reference(&registry, "silent:v1");
    pf_registry::push(&a, &root, &direct, &push_opts(), &quiet).unwrap();
    let idle = Duration::from_secs(1);

    // Pull: the registry's answers stop after 1 MiB, inside the 4 MiB pack (the root, the
    // 300 kB images blob and the page list come first, one blob at a time).
    let silent = relay::Relay::start(
        registry.port(),
        relay::Wire::Stall {
            upstream: false,
            after: 1 << 20,
        },
    );
    let r = Reference::parse(&format!("{}/silent:v1", silent.addr())).unwrap();
    let b = store(dir.path(), "b");
    let started = Instant::now();
    let pulling = PullOptions {
        connect: idle_opts(idle),
        name: Some("s".into()),
        cancel: None,
    };
    let err = pf_registry::pull(&b, &r, &pulling, &quiet).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15), "{err:?}");
    let digest = Digest256::of(&pack);
    assert!(
        matches!(&err, Error::Stalled { digest: d, action: "downloading", .. } if *d == digest),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Unreachable);
    let text = err.to_string();
    assert!(text.contains(&silent.addr()), "{text}");
    assert!(text.contains(&digest.to_string()), "{text}");
    assert!(text.contains("run the same command again"), "{text}");
    assert!(text.contains("a pull starts over"), "{text}");
    assert!(b.list().unwrap().is_empty(), "{:?}", b.list().unwrap());
    drop(silent);

    // Push: the registry stops reading 512 KiB in (past the root, the 300 kB images blob and
    // the page list, early in the first 8 MiB chunk of a 20 MiB pack), so pf's writes block
    // once the socket buffers are full.
    let big = noise(14, 20 << 20);
    let next = snapshot(&a, 81, std::slice::from_ref(&big));
    let silent = relay::Relay::start(
        registry.port(),
        relay::Wire::Stall {
            upstream: true,
            after: 512 << 10,
        },
    );
    let r = Reference::parse(&format!("{}/silent:v2", silent.addr())).unwrap();
    let started = Instant::now();
    let err = pf_registry::push(
        &a,
        &next,
        &r,
        &PushOptions {
            connect: idle_opts(idle),
            sessions: None,
            cancel: None,
        },
        &quiet,
    )
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15), "{err:?}");
    let digest = Digest256::of(&big);
    assert!(
        matches!(&err, Error::Stalled { digest: d, action: "uploading", .. } if *d == digest),
        "{err:?}"
    );
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
}

/// A push of a 40 MiB pack cut off after its first 8 MiB chunk: the registry is killed while pf
/// is between that chunk and the next (the progress callback holds the upload there).
fn push_cut_after_one_chunk(
    registry: &mut Registry,
    store: &FsBlobStore,
    root: &Digest256,
    r: &Reference,
    options: &PushOptions,
) -> Error {
    use std::sync::mpsc;
    let (chunk_done, wait_chunk) = mpsc::channel::<()>();
    let (go_on, wait_go) = mpsc::channel::<()>();
    let chunk_done = std::sync::Mutex::new(Some(chunk_done));
    let wait_go = std::sync::Mutex::new(wait_go);
    std::thread::scope(|scope| {
        let pushing = scope.spawn(|| {
            pf_registry::push(store, root, r, options, &|e| {
                if let pf_registry::Event::Transferred { bytes } = e
                    && bytes == 8 << 20
                    && let Some(done) = chunk_done.lock().unwrap().take()
                {
                    done.send(()).unwrap();
                    wait_go.lock().unwrap().recv().unwrap();
                }
            })
        });
        wait_chunk
            .recv_timeout(Duration::from_secs(60))
            .expect("the first chunk never went up");
        registry.stop();
        go_on.send(()).unwrap();
        pushing.join().unwrap().unwrap_err()
    })
}

#[test]
fn a_push_cut_off_mid_blob_continues_from_where_the_registry_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("registry");
    let mut registry = Registry::start(&storage, None);
    let port = registry.port();
    let a = store(dir.path(), "a");
    let big = noise(15, 40 << 20);
    let root = snapshot(&a, 90, std::slice::from_ref(&big));
    let r = reference(&registry, "resume:v1");
    let sessions = dir.path().join("a/registry/uploads");
    let options = PushOptions {
        connect: ConnectOptions {
            parallel: 1,
            ..connect()
        },
        sessions: Some(sessions.clone()),
        cancel: None,
    };

    let err = push_cut_after_one_chunk(&mut registry, &a, &root, &r, &options);
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err:?}");
    let kept: Vec<_> = std::fs::read_dir(&sessions).unwrap().collect();
    assert_eq!(kept.len(), 1, "one upload session kept: {kept:?}");

    let registry = Registry::start_on(&storage, port, None);
    let done = pf_registry::push(&a, &root, &r, &options, &quiet).unwrap();
    assert_eq!(done.uploaded, 1, "{done:?}");
    assert_eq!(
        done.bytes_uploaded,
        big.len() as u64 - (8 << 20),
        "the rerun sends only what the registry lacks: {done:?}"
    );
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 0);

    let b = store(dir.path(), "b");
    pf_registry::pull(&b, &r, &pull_opts(Some("resumed")), &quiet).unwrap();
    let mut got = Vec::new();
    b.open(&Digest256::of(&big))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == big);
    drop(registry);
}

#[test]
fn an_upload_session_the_registry_lost_falls_back_to_a_fresh_upload() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("registry");
    let mut registry = Registry::start(&storage, None);
    let port = registry.port();
    let a = store(dir.path(), "a");
    let big = noise(16, 40 << 20);
    let root = snapshot(&a, 91, std::slice::from_ref(&big));
    let r = reference(&registry, "lost:v1");
    let sessions = dir.path().join("a/registry/uploads");
    let options = PushOptions {
        connect: ConnectOptions {
            parallel: 1,
            ..connect()
        },
        sessions: Some(sessions.clone()),
        cancel: None,
    };
    push_cut_after_one_chunk(&mut registry, &a, &root, &r, &options);
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 1);

    // The registry purged its half-done uploads (as its upload purging does after a week).
    std::fs::remove_dir_all(storage.join("docker/registry/v2/repositories/lost/_uploads")).unwrap();
    let registry = Registry::start_on(&storage, port, None);
    let done = pf_registry::push(&a, &root, &r, &options, &quiet).unwrap();
    assert_eq!(done.bytes_uploaded, big.len() as u64, "{done:?}");
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 0);
    let b = store(dir.path(), "b");
    pf_registry::pull(&b, &r, &pull_opts(Some("fresh")), &quiet).unwrap();
    assert_eq!(b.get(&Digest256::of(&big)).unwrap().len(), big.len());
    drop(registry);
}

#[test]
fn an_upload_session_of_a_blob_the_registry_has_by_now_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("registry");
    let mut registry = Registry::start(&storage, None);
    let port = registry.port();
    let a = store(dir.path(), "a");
    let big = noise(17, 40 << 20);
    let root = snapshot(&a, 92, std::slice::from_ref(&big));
    let r = reference(&registry, "forgotten:v1");
    let sessions = dir.path().join("a/registry/uploads");
    let options = PushOptions {
        connect: ConnectOptions {
            parallel: 1,
            ..connect()
        },
        sessions: Some(sessions.clone()),
        cancel: None,
    };
    push_cut_after_one_chunk(&mut registry, &a, &root, &r, &options);
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 1);

    // The blob reaches the registry another way (a push that keeps no sessions), so the next
    // push with sessions skips it: the session it kept has nothing left to continue.
    let registry = Registry::start_on(&storage, port, None);
    pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap();
    let done = pf_registry::push(&a, &root, &r, &options, &quiet).unwrap();
    assert_eq!(done.uploaded, 0, "{done:?}");
    let left: Vec<_> = std::fs::read_dir(&sessions).unwrap().collect();
    assert!(left.is_empty(), "upload sessions left behind: {left:?}");
    drop(registry);
}

/// A page pack of `pages` distinct pages from `seed`, as pf-core writes them; its bytes and the
/// pages' digests. With `lying`, the index names a digest its page does not hash to.
fn pack(seed: u64, pages: usize, lying: bool) -> (Vec<u8>, Vec<Digest256>) {
    use pf_core::pack::{PAGE_SIZE, PackBuilder, page_digest};
    let mut builder = PackBuilder::new(1);
    let mut digests = Vec::new();
    for n in 0..pages {
        let page = noise(seed * 10_000 + n as u64, PAGE_SIZE);
        let digest = if lying {
            Digest256::of(format!("not page {n}").as_bytes())
        } else {
            page_digest(&page)
        };
        builder.push(&page, digest);
        digests.push(digest);
    }
    (builder.finish().unwrap(), digests)
}

#[test]
fn pulled_packs_join_the_page_index_once_their_pages_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"), None);
    let a = store(dir.path(), "a");
    let (good, good_pages) = pack(17, 300, false);
    let (lying, lying_pages) = pack(18, 20, true);
    let root = snapshot(&a, 100, &[good.clone(), lying.clone()]);
    let r = reference(&registry, "indexed:v1");
    pf_registry::push(&a, &root, &r, &push_opts(), &quiet).unwrap();

    let b = store(dir.path(), "b");
    let mut sorted = good_pages.clone();
    sorted.sort();
    assert!(b.page_index().lookup(&sorted).unwrap().is_empty());
    let pulled = pf_registry::pull(&b, &r, &pull_opts(Some("p")), &quiet).unwrap();
    assert_eq!(pulled.pages_indexed, 300, "{pulled:?}");
    // Packs land as a local freeze stores them (raw, read frame by frame with one positional
    // read), every other blob compressed as an ordinary put.
    let lying_digest = Digest256::of(&lying);
    for digest in [Digest256::of(&good), lying_digest] {
        assert!(
            b.seekable(&digest).unwrap(),
            "pack {digest} is not seekable"
        );
        assert_eq!(b.get(&digest).unwrap(), a.get(&digest).unwrap());
    }
    for digest in b.list().unwrap() {
        if digest != Digest256::of(&good) && digest != lying_digest {
            assert!(!b.seekable(&digest).unwrap(), "{digest} is not a pack");
        }
    }

    // Every page of the good pack is found where it is, so a freeze into b stores none again.
    let found = b.page_index().lookup(&sorted).unwrap();
    assert_eq!(found.len(), 300);
    let good_digest = Digest256::of(&good);
    for (slot, page) in good_pages.iter().enumerate() {
        let loc = found[page];
        assert_eq!((loc.pack, loc.slot), (good_digest, slot as u32));
    }
    // A freeze into b (pf-core's page writer, as capture runs it) of a memory image holding
    // those 300 pages and 10 new ones stores only the 10.
    let image = dir.path().join("pages-1.img");
    let mut bytes = Vec::new();
    for n in 0..300u64 {
        bytes.extend_from_slice(&noise(17 * 10_000 + n, pf_core::pack::PAGE_SIZE));
    }
    for n in 0..10u64 {
        bytes.extend_from_slice(&noise(19 * 10_000 + n, pf_core::pack::PAGE_SIZE));
    }
    std::fs::write(&image, &bytes).unwrap();
    let mut writer = pf_core::pages::PageWriter::new(&b, b.page_index(), 1);
    let stored = writer
        .write_file(&std::fs::File::open(&image).unwrap(), &image)
        .unwrap();
    assert_eq!((stored.pages, stored.new_pages), (310, 10), "{stored:?}");

    // A pack whose index names pages it does not hold is stored (its bytes are what was
    // pushed) but never offered for dedup.
    let mut sorted = lying_pages.clone();
    sorted.sort();
    assert!(b.page_index().lookup(&sorted).unwrap().is_empty());
    assert!(b.contains(&Digest256::of(&lying)).unwrap());

    // Pulled again into the same store: nothing fetched, nothing indexed twice.
    let again = pf_registry::pull(&b, &r, &pull_opts(None), &quiet).unwrap();
    assert_eq!((again.fetched, again.pages_indexed), (0, 0));
}
