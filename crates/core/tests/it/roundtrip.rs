//! Blobs go in and come out the same, small or large, sized or streamed.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;

use pf_core::{BlobStore, Digest256, Error, Put};

use crate::support::{TestData, drain, store, temp_files};

#[test]
fn large_streamed_blob_round_trips() {
    let (_dir, s) = store();
    let len = 64 << 20;
    let data = TestData::new(1, len);
    let want = data.digest();
    let put = s.put_reader(&mut data.clone()).unwrap();
    assert_eq!(
        put,
        Put {
            digest: want,
            size: len
        }
    );
    // Half the data is random: the file is smaller than the input, but not by much.
    let stored = s.stored_size(&want).unwrap();
    assert!(stored < len && stored > len / 3, "stored {stored} of {len}");
    assert_eq!(s.raw_size(&want).unwrap(), len);
    let (got, got_len) = drain(&mut *s.open(&want).unwrap()).unwrap();
    assert_eq!((got, got_len), (want, len));
    let bytes = s.get(&want).unwrap();
    assert_eq!(Digest256::of(&bytes), want);
    let mut copied = HashingWriter::default();
    assert_eq!(s.copy_to(&want, &mut copied).unwrap(), len);
    assert_eq!(copied.0.finish(), want);
    assert!(temp_files(s.root()).is_empty());
}

#[derive(Default)]
struct HashingWriter(pf_core::DigestHasher);

impl std::io::Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that fails after `left` bytes.
struct FailingWriter {
    left: usize,
}

impl std::io::Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "reader gone",
            ));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn copy_to_reports_a_failing_output_as_such() {
    let (_dir, s) = store();
    let small = s.put(b"small blob").unwrap();
    let large = s
        .put_reader(&mut TestData::new(4, 16 << 20))
        .unwrap()
        .digest;
    for d in [small, large] {
        let err = s.copy_to(&d, &mut FailingWriter { left: 5 }).unwrap_err();
        assert!(
            matches!(&err, Error::Output { digest, source } if *digest == d && source.kind() == std::io::ErrorKind::BrokenPipe),
            "{err:?}"
        );
    }
    let mut out = Vec::new();
    assert_eq!(s.copy_to(&small, &mut out).unwrap(), 10);
    assert_eq!(out, b"small blob");
    assert!(matches!(
        s.copy_to(&Digest256::of(b"absent"), &mut out),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn large_blob_with_announced_length_records_its_size_in_the_frame() {
    let (_dir, s) = store();
    let len = 20 << 20;
    let data = TestData::new(2, len);
    let put = s.put_reader_with_len(&mut data.clone(), len).unwrap();
    assert_eq!(put.digest, data.digest());
    let file = std::fs::read(s.blob_path(&put.digest)).unwrap();
    // The frame header carries the content size: `raw_size` needs no decoding.
    let decoder_size = zstd::zstd_safe::get_frame_content_size(&file[..18]).unwrap();
    assert_eq!(decoder_size, Some(len));
    assert_eq!(s.raw_size(&put.digest).unwrap(), len);
}

#[test]
fn small_blobs_round_trip_through_every_entry_point() {
    let (_dir, s) = store();
    for bytes in [&b""[..], b"a", b"{\"kind\":\"x\"}", &[0u8; 4096][..]] {
        let d = s.put(bytes).unwrap();
        assert_eq!(d, Digest256::of(bytes));
        assert_eq!(s.get(&d).unwrap(), bytes);
        let mut out = Vec::new();
        s.open(&d).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, bytes);
        assert_eq!(s.put_reader(&mut &bytes[..]).unwrap().digest, d);
        assert_eq!(
            s.put_reader_with_len(&mut &bytes[..], bytes.len() as u64)
                .unwrap()
                .digest,
            d
        );
        assert_eq!(s.raw_size(&d).unwrap(), bytes.len() as u64);
        assert!(s.contains(&d).unwrap());
    }
    assert_eq!(s.list().unwrap().len(), 4);
}

#[test]
fn remove_and_not_found() {
    let (_dir, s) = store();
    let d = s.put(b"bye").unwrap();
    assert!(s.remove(&d).unwrap());
    assert!(!s.remove(&d).unwrap());
    assert!(!s.contains(&d).unwrap());
    assert!(matches!(s.get(&d), Err(Error::NotFound { digest }) if digest == d));
    assert!(matches!(s.open(&d), Err(Error::NotFound { digest }) if digest == d));
    assert!(matches!(s.stored_size(&d), Err(Error::NotFound { .. })));
    assert!(matches!(s.raw_size(&d), Err(Error::NotFound { .. })));
}

#[test]
fn modes_are_private() {
    let (_dir, s) = store();
    let d = s.put(b"secret").unwrap();
    s.set_name("n", &d).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    let blob = s.blob_path(&d);
    assert_eq!(mode(&blob), 0o600);
    assert_eq!(mode(&s.root().join("refs/n")), 0o600);
    for dir in [
        s.root().to_owned(),
        s.root().join("blobs"),
        s.root().join("blobs/sha256"),
        blob.parent().unwrap().to_owned(),
        s.root().join("refs"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
}

#[test]
fn a_reader_dropped_early_leaves_nothing_running_wrong() {
    let (_dir, s) = store();
    let data = TestData::new(3, 16 << 20);
    let d = s.put_reader(&mut data.clone()).unwrap().digest;
    for _ in 0..20 {
        let mut r = s.open(&d).unwrap();
        let mut buf = [0u8; 1000];
        r.read_exact(&mut buf).unwrap();
        drop(r);
    }
    assert_eq!(drain(&mut *s.open(&d).unwrap()).unwrap().0, d);
}
