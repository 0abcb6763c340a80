//! Many writers of the same blob at once, in threads and in processes: one valid blob results.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;

use pf_core::{BlobStore, Digest256, FsBlobStore};

use crate::support::{TestData, drain, temp_files};

/// Set in the child processes this test starts: `<store dir>\n<input file>`.
const CHILD_ENV: &str = "PF_CORE_IT_CONCURRENT_PUT_CHILD";
const TEST_NAME: &str = "concurrency::same_blob_from_8_threads_and_4_processes";

fn put_file(store: &Path, input: &Path) -> pf_core::Put {
    let s = FsBlobStore::open(store).unwrap();
    let mut file = std::fs::File::open(input).unwrap();
    s.put_reader(&mut file).unwrap()
}

#[test]
fn same_blob_from_8_threads_and_4_processes() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        // Child mode: one more writer, started by the parent run of this test.
        let (store, input) = spec.split_once('\n').expect("child spec");
        let put = put_file(Path::new(store), Path::new(input));
        #[allow(clippy::print_stdout)]
        {
            println!("child put {}", put.digest);
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let input = dir.path().join("input");
    let data = TestData::new(42, 100 << 20);
    data.write_to(&input);
    let want = data.digest();
    let s = FsBlobStore::open(&store_dir).unwrap();

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
                .env(
                    CHILD_ENV,
                    format!("{}\n{}", store_dir.display(), input.display()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let barrier = Barrier::new(8);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                barrier.wait();
                let put = put_file(&store_dir, &input);
                assert_eq!(put.digest, want);
                assert_eq!(put.size, 100 << 20);
            });
        }
    });
    for child in children {
        // `wait_with_output` drains stdout and stderr together, so neither pipe can fill up and
        // block the child.
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("child put {want}")), "{stdout}");
    }
    assert_eq!(s.list().unwrap(), vec![want]);
    assert_eq!(
        drain(&mut *s.open(&want).unwrap()).unwrap(),
        (want, 100 << 20)
    );
    let leftovers: Vec<PathBuf> = temp_files(&store_dir);
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// A writer holding the store's lock between its blob and its name, and a `gc` with no grace
/// period started in that window: gc waits, the name is written, and its blob survives. Without
/// the lock gc removed the blob and the name could not be written (issue 15 item 2).
fn gc_waits_for_a_writer_between_blob_and_name(store: &dyn BlobStore) {
    let (put_tx, put_rx) = std::sync::mpsc::channel();
    let now = pf_core::GcOptions {
        dry_run: false,
        grace: std::time::Duration::ZERO,
    };
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let lock = store.writer_lock().unwrap();
            let digest = store.put(b"named soon").unwrap();
            put_tx.send(digest).unwrap();
            // gc starts meanwhile and must not sweep before the name is there.
            std::thread::sleep(std::time::Duration::from_millis(300));
            store.set_name("soon", &digest).unwrap();
            drop(lock);
            digest
        });
        let digest = put_rx.recv().unwrap();
        let loose = {
            // A blob nobody names, put outside any lock: gc removes it.
            store.put(b"loose").unwrap()
        };
        let report = pf_core::gc(store, &now).unwrap();
        assert_eq!(writer.join().unwrap(), digest);
        assert_eq!(report.reachable, vec![digest]);
        assert_eq!(report.removed.len(), 1);
        assert_eq!(report.removed[0].digest, loose);
    });
    assert_eq!(
        store.get_name("soon").unwrap(),
        Digest256::of(b"named soon")
    );
    assert_eq!(
        store.get(&Digest256::of(b"named soon")).unwrap(),
        b"named soon"
    );
}

#[test]
fn gc_waits_for_a_writer_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(&dir.path().join("store")).unwrap();
    gc_waits_for_a_writer_between_blob_and_name(&store);
    // The lock file is private like the rest of the store, and gc keeps it.
    let meta = std::fs::metadata(dir.path().join("store/lock")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
}

#[test]
fn gc_waits_for_a_writer_in_memory() {
    gc_waits_for_a_writer_between_blob_and_name(&pf_core::MemBlobStore::new());
}

/// A reader's share of the lock (a thaw, a lazily served tree): a `gc` with no grace period
/// started while it reads an unnamed blob waits, and the blob is there for the whole read; a
/// reader that comes while gc holds the lock is not kept waiting (it goes on without a share).
fn gc_waits_for_a_reader_and_a_reader_never_waits_for_gc(store: &dyn BlobStore) {
    let now = pf_core::GcOptions {
        dry_run: false,
        grace: std::time::Duration::ZERO,
    };
    let blob = store.put(b"read while gc runs").unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let share = store.reader_lock().expect("no gc holds the lock: a share");
            held_tx.send(()).unwrap();
            // gc starts meanwhile and must not sweep the blob before the read is over.
            std::thread::sleep(std::time::Duration::from_millis(300));
            let bytes = store.get(&blob);
            drop(share);
            bytes
        });
        held_rx.recv().unwrap();
        let report = pf_core::gc(store, &now).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), b"read while gc runs");
        // Once the reader let go, gc removed the blob nothing names.
        assert_eq!(report.removed.len(), 1);
        assert_eq!(report.removed[0].digest, blob);
    });
    assert!(!store.contains(&blob).unwrap());
    let gc = store.gc_lock().unwrap();
    let started = std::time::Instant::now();
    assert!(store.reader_lock().is_none(), "no share while gc holds it");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    drop(gc);
    assert!(store.reader_lock().is_some());
}

#[test]
fn gc_waits_for_a_reader_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(&dir.path().join("store")).unwrap();
    gc_waits_for_a_reader_and_a_reader_never_waits_for_gc(&store);
}

#[test]
fn gc_waits_for_a_reader_in_memory() {
    gc_waits_for_a_reader_and_a_reader_never_waits_for_gc(&pf_core::MemBlobStore::new());
}
