//! Damaged blob files are errors naming the digest, never silently short or wrong data.

use std::fs::{self, OpenOptions};
use std::io::Read as _;

use pf_core::{BlobStore, Digest256, Error, FsBlobStore};

use crate::support::{TestData, store};

/// What `copy_to` gives: the error, and how many bytes reached the output before it.
fn copy_error(s: &FsBlobStore, digest: &Digest256) -> (Error, usize) {
    let mut out = Vec::new();
    let err = s
        .copy_to(digest, &mut out)
        .expect_err("copying a damaged blob must fail");
    (err, out.len())
}

/// What reading `digest` fully through `get` and through `open` gives.
fn read_both_ways(s: &FsBlobStore, digest: &Digest256) -> (Error, Error) {
    let get = s.get(digest).expect_err("get of a damaged blob must fail");
    let mut out = Vec::new();
    let io = s
        .open(digest)
        .expect("the file is there")
        .read_to_end(&mut out)
        .expect_err("reading a damaged blob to EOF must fail");
    let open = match pf_core::Error::from_read_error(&io) {
        Some(Error::Integrity {
            digest,
            actual,
            path,
        }) => Error::Integrity {
            digest: *digest,
            actual: *actual,
            path: path.clone(),
        },
        Some(Error::Decode { digest, path, .. }) => Error::Decode {
            digest: *digest,
            path: path.clone(),
            source: std::io::Error::other("copied"),
        },
        other => panic!("open/read error is not integrity or decode: {other:?} ({io})"),
    };
    (get, open)
}

fn assert_names_digest(err: &Error, want: &Digest256) {
    match err {
        Error::Integrity { digest, .. } | Error::Decode { digest, .. } => {
            assert_eq!(digest, want, "{err}");
        }
        other => panic!("expected an integrity or decode error, got {other:?}"),
    }
    assert!(err.to_string().contains(&want.to_string()), "{err}");
}

fn damage(s: &FsBlobStore, digest: &Digest256, how: &dyn Fn(&mut Vec<u8>)) {
    let path = s.blob_path(digest);
    let mut bytes = fs::read(&path).unwrap();
    how(&mut bytes);
    fs::write(&path, bytes).unwrap();
}

/// Sizes that take the inline reader and the threaded one.
const SIZES: [u64; 2] = [200_000, 24 << 20];

#[test]
fn a_flipped_byte_is_an_error_naming_the_digest() {
    for len in SIZES {
        let (_dir, s) = store();
        let d = s.put_reader(&mut TestData::new(7, len)).unwrap().digest;
        // Flip a byte in the middle of the compressed data, then one in the header's area.
        damage(&s, &d, &|b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
        });
        let (get, open) = read_both_ways(&s, &d);
        assert_names_digest(&get, &d);
        assert_names_digest(&open, &d);
        assert_names_digest(&copy_error(&s, &d).0, &d);
    }
}

#[test]
fn a_flipped_byte_in_a_stored_random_block_is_an_integrity_error() {
    // Random data is stored raw: a flipped byte decodes fine and only the digest catches it.
    let (_dir, s) = store();
    let d = s.put_reader(&mut TestData::new(8, 60_000)).unwrap().digest;
    damage(&s, &d, &|b| {
        let at = b.len() / 2;
        b[at] ^= 1;
    });
    let (get, open) = read_both_ways(&s, &d);
    assert!(
        matches!(get, Error::Integrity { digest, .. } if digest == d),
        "{get:?}"
    );
    assert!(
        matches!(open, Error::Integrity { digest, .. } if digest == d),
        "{open:?}"
    );
    // The bytes streamed out in full before the check at the end failed.
    let (copy, copied) = copy_error(&s, &d);
    assert!(
        matches!(copy, Error::Integrity { digest, .. } if digest == d),
        "{copy:?}"
    );
    assert_eq!(copied, 60_000);
}

#[test]
fn a_large_blob_of_other_bytes_fails_copy_to_after_streaming() {
    let (_dir, s) = store();
    let d = s
        .put_reader(&mut TestData::new(13, 12 << 20))
        .unwrap()
        .digest;
    let other = s
        .put_reader(&mut TestData::new(14, 12 << 20))
        .unwrap()
        .digest;
    fs::copy(s.blob_path(&other), s.blob_path(&d)).unwrap();
    let (copy, copied) = copy_error(&s, &d);
    assert!(
        matches!(copy, Error::Integrity { digest, actual, .. } if digest == d && actual == other),
        "{copy:?}"
    );
    assert_eq!(copied, 12 << 20);
}

#[test]
fn a_truncated_file_is_an_error_not_short_data() {
    for len in SIZES {
        for keep in [0.0, 0.01, 0.5, 0.99] {
            let (_dir, s) = store();
            let d = s.put_reader(&mut TestData::new(9, len)).unwrap().digest;
            let path = s.blob_path(&d);
            let full = fs::metadata(&path).unwrap().len();
            let keep_bytes = (full as f64 * keep) as u64;
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(keep_bytes)
                .unwrap();
            let (get, open) = read_both_ways(&s, &d);
            assert_names_digest(&get, &d);
            assert_names_digest(&open, &d);
            let (copy, copied) = copy_error(&s, &d);
            assert_names_digest(&copy, &d);
            assert!((copied as u64) < len, "a truncated blob copied in full");
        }
    }
}

#[test]
fn the_last_byte_missing_is_an_error() {
    let (_dir, s) = store();
    let d = s.put(b"hello, hello, hello, hello").unwrap();
    damage(&s, &d, &|b| {
        b.pop();
    });
    let (get, open) = read_both_ways(&s, &d);
    assert_names_digest(&get, &d);
    assert_names_digest(&open, &d);
}

#[test]
fn another_valid_frame_under_the_name_is_an_integrity_error() {
    let (_dir, s) = store();
    let d = s.put(b"the real bytes").unwrap();
    fs::write(
        s.blob_path(&d),
        zstd::encode_all(&b"other bytes"[..], 3).unwrap(),
    )
    .unwrap();
    let (get, open) = read_both_ways(&s, &d);
    assert!(
        matches!(get, Error::Integrity { digest, actual, .. } if digest == d && actual == Digest256::of(b"other bytes"))
    );
    assert!(matches!(open, Error::Integrity { digest, .. } if digest == d));
}

#[test]
fn garbage_after_the_frame_is_an_error() {
    let (_dir, s) = store();
    let d = s.put(b"the real bytes").unwrap();
    damage(&s, &d, &|b| b.extend_from_slice(b"trailing garbage"));
    let (get, open) = read_both_ways(&s, &d);
    assert_names_digest(&get, &d);
    assert_names_digest(&open, &d);
}

#[test]
fn reads_after_a_failure_keep_failing() {
    for len in SIZES {
        let (_dir, s) = store();
        let d = s.put_reader(&mut TestData::new(10, len)).unwrap().digest;
        damage(&s, &d, &|b| {
            let n = b.len() / 2;
            b.truncate(n);
        });
        let mut r = s.open(&d).unwrap();
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        let mut buf = [0u8; 16];
        assert!(
            r.read(&mut buf).is_err(),
            "a read after the failure returned Ok"
        );
    }
}

/// Issue 15 item 6: a put of the same bytes over a corrupt blob repaired nothing. Every put path
/// (`put` of bytes in memory, `put_reader`, `put_reader_with_len`) now leaves a blob that reads
/// back whole; `put` of bytes checks the stored copy by decoding it and rewrites it only when bad.
#[test]
fn a_put_of_the_same_bytes_repairs_a_corrupt_blob() {
    let (_dir, s) = store();
    let mut data = Vec::new();
    TestData::new(6, 300_000).read_to_end(&mut data).unwrap();
    let digest = s.put(&data).unwrap();
    type Put<'a> = &'a dyn Fn(&FsBlobStore) -> Digest256;
    let puts: [(&str, Put<'_>); 3] = [
        ("put", &|s| s.put(&data).unwrap()),
        ("put_reader", &|s| {
            s.put_reader(&mut &data[..]).unwrap().digest
        }),
        ("put_reader_with_len", &|s| {
            s.put_reader_with_len(&mut &data[..], data.len() as u64)
                .unwrap()
                .digest
        }),
    ];
    for (how, put) in puts {
        damage(&s, &digest, &|b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x10;
        });
        assert!(s.get(&digest).is_err(), "{how}: damage not seen");
        assert_eq!(put(&s), digest, "{how}");
        assert_eq!(s.get(&digest).unwrap(), data, "{how} did not repair");
        damage(&s, &digest, &|b| b.truncate(b.len() / 3));
        assert_eq!(put(&s), digest, "{how}");
        assert_eq!(s.get(&digest).unwrap(), data, "{how} did not repair");
    }
    // A good blob is left as it is by `put` of bytes: same file, not rewritten.
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(s.blob_path(&digest)).unwrap());
    s.put(&data).unwrap();
    let after = std::os::unix::fs::MetadataExt::ino(&fs::metadata(s.blob_path(&digest)).unwrap());
    assert_eq!(ino, after);
}
