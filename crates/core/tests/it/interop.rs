//! The on-disk format is plain zstd: files the `zstd` tool writes read back, and ours decode with
//! it. That is what makes a store shared with the reference pf-core readable both ways.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::process::{Command, Stdio};

use pf_core::{BlobStore, Digest256};

use crate::support::{TestData, store};

fn zstd_tool() -> bool {
    let found = Command::new("zstd")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "CI needs the zstd tool");
        #[allow(clippy::print_stderr)]
        {
            eprintln!("zstd tool not found: writing its frame format with the library instead");
        }
    }
    found
}

/// Compress `input` as `zstd -q -3` does (content size and checksum in the frame), with the tool
/// when there is one.
fn zstd_compress(dir: &std::path::Path, input: &[u8]) -> Vec<u8> {
    if zstd_tool() {
        let src = dir.join("src");
        fs::write(&src, input).unwrap();
        let out = Command::new("zstd")
            .args(["-q", "-3", "-c"])
            .arg(&src)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return out.stdout;
    }
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_checksum(true).unwrap();
    encoder
        .set_pledged_src_size(Some(input.len() as u64))
        .unwrap();
    encoder.write_all(input).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn a_blob_written_by_the_zstd_tool_reads_back() {
    let (dir, s) = store();
    for input in [
        b"written by someone else".to_vec(),
        std::io::Read::bytes(TestData::new(11, 6 << 20))
            .map(Result::unwrap)
            .collect::<Vec<u8>>(),
    ] {
        let digest = Digest256::of(&input);
        let path = s.blob_path(&digest);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path.parent().unwrap())
            .unwrap();
        fs::write(&path, zstd_compress(dir.path(), &input)).unwrap();
        assert!(s.list().unwrap().contains(&digest));
        assert_eq!(s.get(&digest).unwrap(), input);
        assert_eq!(s.raw_size(&digest).unwrap(), input.len() as u64);
        let (got, len) = crate::support::drain(&mut *s.open(&digest).unwrap()).unwrap();
        assert_eq!((got, len), (digest, input.len() as u64));
    }
}

#[test]
fn our_blobs_decode_with_plain_zstd() {
    let (_dir, s) = store();
    let data = TestData::new(12, 10 << 20);
    let digest = s.put_reader(&mut data.clone()).unwrap().digest;
    let path = s.blob_path(&digest);
    // One frame: the library's single-frame decoder reads the whole file.
    let bytes = fs::read(&path).unwrap();
    let frame_len = zstd::zstd_safe::find_frame_compressed_size(&bytes).unwrap();
    assert_eq!(frame_len, bytes.len(), "the file is exactly one zstd frame");
    let decoded = zstd::decode_all(&bytes[..]).unwrap();
    assert_eq!(Digest256::of(&decoded), digest);
    if zstd_tool() {
        let out = Command::new("zstd")
            .args(["-q", "-d", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(Digest256::of(&out.stdout), digest);
    }
}
