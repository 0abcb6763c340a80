//! Corrupt and malicious images blobs: a clear error, nothing written outside the private
//! extraction directory, nothing restored.

use std::path::PathBuf;
use std::time::Duration;

use pf_core::{BlobStore as _, Digest256, FsBlobStore};
use pf_world_procs::test_support::{Deadline, KillOnDrop, live};
use pf_world_procs::{CriuProcs, Error, ProcsBlob, capture, extract_images, restore};

use crate::support::*;

/// A one-entry tar with a hand-written header (tar's builder refuses bad paths).
fn raw_tar(name: &str, kind: tar::EntryType, body: &[u8], link: &str) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_size(body.len() as u64);
    h.set_mode(0o600);
    h.set_entry_type(kind);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

fn procs_for(criu_dump: Digest256) -> CriuProcs {
    let json = format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{criu_dump}","pids":[1]}}"#);
    match serde_json::from_str(&json).expect("procs json") {
        ProcsBlob::Criu(c) => c,
        other => panic!("expected criu, got {other:?}"),
    }
}

/// Where an escaping `../name` could land: beside any scratch directory we use.
fn escape_targets(name: &str) -> Vec<PathBuf> {
    vec![
        PathBuf::from("/dev/shm").join(name),
        std::env::temp_dir().join(name),
    ]
}

/// Rewrite a stored blob's raw bytes in place (decompress, change, recompress), as disk
/// corruption that keeps the zstd frame valid would.
fn flip_a_byte(store: &FsBlobStore, digest: &Digest256) {
    let path = store.blob_path(digest);
    let packed = std::fs::read(&path).expect("read blob file");
    let mut raw = zstd::decode_all(&packed[..]).expect("decode");
    let at = raw.len() / 2;
    raw[at] ^= 0x01;
    let packed = zstd::encode_all(&raw[..], 1).expect("encode");
    std::fs::remove_file(&path).expect("remove");
    std::fs::write(&path, packed).expect("write");
}

#[test]
fn escaping_and_linking_tars_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let evil = format!("pf-evil-{}", std::process::id());
    let cases = [
        (
            raw_tar(&format!("../{evil}"), tar::EntryType::Regular, b"pwned", ""),
            "has a `/`",
        ),
        (
            raw_tar("pstree.img", tar::EntryType::Symlink, b"", "/etc/passwd"),
            "is not a regular file",
        ),
        (
            raw_tar("pstree.img", tar::EntryType::Link, b"", "/etc/passwd"),
            "is not a regular file",
        ),
        (
            raw_tar("null", tar::EntryType::Char, b"", ""),
            "is not a regular file",
        ),
    ];
    for (tar, why) in cases {
        let digest = store.put(&tar).expect("put");
        let err = extract_images(&store, &procs_for(digest)).expect_err("refused");
        assert!(
            matches!(&err, Error::UnsafeTar { digest: d, reason, .. } if *d == digest && reason.starts_with(why)),
            "{err:?}"
        );
        assert!(err.to_string().contains("refusing to extract"), "{err}");
    }
    for path in escape_targets(&evil) {
        assert!(!path.exists(), "{} was written", path.display());
    }
}

#[test]
fn flipped_byte_is_an_integrity_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let body = vec![0x5au8; 100_000];
    let digest = store
        .put(&raw_tar("pages-1.img", tar::EntryType::Regular, &body, ""))
        .expect("put");
    assert!(extract_images(&store, &procs_for(digest)).is_ok());
    flip_a_byte(&store, &digest);
    let err = extract_images(&store, &procs_for(digest)).expect_err("corrupt");
    assert!(
        matches!(
            &err,
            Error::Store {
                source: pf_core::Error::Integrity { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn live_bad_blobs_restore_nothing() {
    if !live("live_bad_blobs_restore_nothing") {
        return;
    }
    let deadline = Deadline::start("live_bad_blobs_restore_nothing", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let (mut child, out) = spawn_counter(dir.path(), Mode::Lines);
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(wait_until(Duration::from_secs(20), || max_count(&out, "c") > 5));
    let _kill_kid = KillOnDrop(children(pid)[0]);
    let captured = capture(&store, pid, &capture_opts(false)).expect("capture");
    child.wait().expect("reap");
    let ProcsBlob::Criu(good) = captured.blob else {
        panic!("expected a dump");
    };
    let frozen = counts(&out);

    // The real pstree.img and core images, plus a hostile entry.
    let evil = format!("pf-evil-{}", std::process::id());
    for (tar, why) in [
        (
            raw_tar(&format!("../{evil}"), tar::EntryType::Regular, b"pwned", ""),
            "has a `/`",
        ),
        (
            raw_tar("pstree.img", tar::EntryType::Symlink, b"", "/etc/passwd"),
            "is not a regular file",
        ),
    ] {
        let criu_dump = store.put(&tar).expect("put tar");
        let procs = store
            .put(
                &ProcsBlob::Criu(CriuProcs {
                    criu_dump,
                    ..good.clone()
                })
                .to_json(),
            )
            .expect("put procs");
        let err = restore(&store, &procs, restore_opts(false)).expect_err("refused");
        assert!(
            matches!(&err, Error::UnsafeTar { reason, .. } if reason.starts_with(why)),
            "{err:?}"
        );
        assert!(!alive(pid), "nothing was restored");
    }
    for path in escape_targets(&evil) {
        assert!(!path.exists(), "{} was written", path.display());
    }

    flip_a_byte(&store, &good.criu_dump);
    let err = restore(&store, &captured.procs, restore_opts(false)).expect_err("corrupt");
    assert!(
        matches!(
            &err,
            Error::Store {
                source: pf_core::Error::Integrity { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!alive(pid), "nothing was restored");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counts(&out), frozen, "nobody counts");
}
