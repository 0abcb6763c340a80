//! Corrupt and malicious images blobs: a clear error, nothing written outside the private
//! extraction directory, nothing restored.

use std::path::PathBuf;
use std::time::Duration;

use pf_core::{BlobStore as _, Digest256, FsBlobStore};
use pf_world_procs::test_support::{Deadline, KillOnDrop, live};
use pf_world_procs::{CriuProcs, Error, ProcsBlob, capture, extract_images, restore};

use crate::support::*;

/// One tar entry with a hand-written header (tar's builder refuses bad paths): the header block
/// and the body padded to whole blocks, without the end-of-archive blocks.
fn raw_entry(name: &str, kind: tar::EntryType, body: &[u8], link: &str) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_size(body.len() as u64);
    h.set_mode(0o600);
    h.set_entry_type(kind);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A one-entry tar made by [`raw_entry`].
fn raw_tar(name: &str, kind: tar::EntryType, body: &[u8], link: &str) -> Vec<u8> {
    let mut out = raw_entry(name, kind, body, link);
    out.resize(out.len() + 1024, 0);
    out
}

/// The entries of a tar as raw bytes (header block and padded body), in order, by name.
fn raw_entries(tar_bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            let start = e.raw_header_position() as usize;
            let end = e.raw_file_position() as usize + (e.size() as usize).div_ceil(512) * 512;
            let name = String::from_utf8(e.path_bytes().into_owned()).expect("utf-8 name");
            (name, tar_bytes[start..end].to_vec())
        })
        .collect()
}

/// A tar of these raw entries, with the end-of-archive blocks.
fn tar_of<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out: Vec<u8> = entries.into_iter().flatten().copied().collect();
    out.resize(out.len() + 1024, 0);
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

/// Scratch directories of restores (`pf-restore-*`) still holding an extracted image of `pid`.
fn leftover_extractions(pid: i32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let core = entry.path().join(format!("core-{pid}.img"));
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("pf-restore-")
                && core.exists()
            {
                out.push(core);
            }
        }
    }
    out
}

/// Rewrite a stored blob's raw bytes in place (decompress, change, recompress), as disk
/// corruption that keeps the zstd frame valid would.
fn flip_a_byte(store: &FsBlobStore, digest: &Digest256) {
    flip_byte(store, digest, None);
}

/// Flip a byte of the blob `digest` in place: at `at`, or inside the largest entry's data when
/// the blob is a tar (else in its middle).
fn flip_byte(store: &FsBlobStore, digest: &Digest256, at: Option<usize>) {
    let path = store.blob_path(digest);
    let packed = std::fs::read(&path).expect("read blob file");
    let mut raw = zstd::decode_all(&packed[..]).expect("decode");
    if let Some(at) = at {
        raw[at] ^= 0x01;
        let packed = zstd::encode_all(&raw[..], 1).expect("encode");
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, packed).expect("write");
        return;
    }
    let mut at = raw.len() / 2;
    if let Ok(entries) = tar::Archive::new(&raw[..]).entries() {
        let largest = entries
            .filter_map(Result::ok)
            .map(|e| (e.size(), e.raw_file_position()))
            .max();
        if let Some((size, start)) = largest
            && size > 0
        {
            at = usize::try_from(start + size / 2).expect("offset");
        }
    }
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

    // The real dump's images, all of them, plus one hostile entry: were the hostile entry
    // skipped instead of refused, these tars would restore the tree.
    let real_tar = store.get(&good.criu_dump).expect("get the images tar");
    let real = raw_entries(&real_tar);
    let names: Vec<&str> = real.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"pstree.img") && names.contains(&format!("core-{pid}.img").as_str()),
        "{names:?}"
    );
    assert_eq!(
        tar_of(real.iter().map(|(_, raw)| raw.as_slice())),
        real_tar,
        "the real entries alone make the very tar that was stored"
    );
    let evil = format!("pf-evil-{}", std::process::id());
    let link_target = escape_targets(&format!("{evil}-link"))[0].clone();
    // `../pf-evil-…` after every real image: they are extracted first, then it is refused.
    let escaping = raw_entry(&format!("../{evil}"), tar::EntryType::Regular, b"pwned", "");
    let mut with_escape: Vec<&[u8]> = real.iter().map(|(_, raw)| raw.as_slice()).collect();
    with_escape.push(&escaping);
    // A symlink `pstree.img` pointing out of the directory, just before the real pstree.img
    // (which a careless extractor would then write through it).
    let link = raw_entry(
        "pstree.img",
        tar::EntryType::Symlink,
        b"",
        link_target.to_str().expect("utf-8 path"),
    );
    let mut with_link: Vec<&[u8]> = Vec::new();
    for (name, raw) in &real {
        if name == "pstree.img" {
            with_link.push(&link);
        }
        with_link.push(raw);
    }
    for (tar, entry, why) in [
        (tar_of(with_escape), format!("../{evil}"), "has a `/`"),
        (
            tar_of(with_link),
            "pstree.img".to_owned(),
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
            matches!(&err, Error::UnsafeTar { digest, entry: e, reason }
                if *digest == criu_dump && *e == entry && reason.starts_with(why)),
            "{err:?}"
        );
        for p in &good.pids {
            assert!(!alive(*p), "pid {p} was restored");
        }
        for path in escape_targets(&evil).iter().chain([&link_target]) {
            assert!(!path.exists(), "{} was written", path.display());
        }
        assert_eq!(counts(&out), frozen, "nobody counts");
        assert_eq!(leftover_extractions(pid), Vec::<PathBuf>::new());
    }

    // A flip in the first entry's header (its checksum field): the tar does not parse, and the
    // blob's digest says why. Then back, and a flip in the data, which parses.
    for at in [Some(148), None] {
        flip_byte(&store, &good.criu_dump, at);
        let err = restore(&store, &captured.procs, restore_opts(false)).expect_err("corrupt");
        assert!(
            matches!(
                &err,
                Error::Store {
                    source: pf_core::Error::Integrity { .. },
                    ..
                }
            ),
            "flipped at {at:?}: {err:?}"
        );
        assert_eq!(leftover_extractions(pid), Vec::<PathBuf>::new());
        if at.is_some() {
            flip_byte(&store, &good.criu_dump, at);
        }
    }
    assert!(!alive(pid), "nothing was restored");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counts(&out), frozen, "nobody counts");
}
