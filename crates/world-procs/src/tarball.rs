//! The images directory as a deterministic tar, produced lazily, and the safe way back.
//!
//! Writing: [`ImagesTar`] is a `Read` that yields a ustar archive of a directory's regular files
//! in byte order of their names, each with mtime 0, uid/gid 0, mode 0600 and no user or group
//! names, so the same dump always gives the same bytes (and digest). It reads the files as the
//! consumer pulls, so a multi-GiB dump streams into the store without ever being in memory.
//!
//! Reading: [`extract`] accepts only regular files with plain names (no `/`, no `..`, no NUL),
//! at most [`MAX_ENTRIES`] of them and [`MAX_TOTAL`] bytes in all, creates each file fresh
//! (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0600) inside the destination, and reads the source to its end so
//! that a verifying reader gets to check the digest.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use pf_core::Digest256;

use crate::error::{Error, Result};

/// Most entries an images tar may hold. CRIU writes a handful of files per process.
pub(crate) const MAX_ENTRIES: usize = 100_000;
/// Most bytes (file contents) an images tar may hold: 1 TiB.
pub(crate) const MAX_TOTAL: u64 = 1 << 40;
/// Tar block size.
const BLOCK: u64 = 512;

/// Why an entry name is not acceptable, or `None` when it is a plain file name.
pub(crate) fn bad_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("has an empty name")
    } else if name == b"." || name == b".." {
        Some("is a dot entry")
    } else if name.contains(&b'/') {
        Some("has a `/` in its name (only plain file names are allowed)")
    } else if name.contains(&0) {
        Some("has a NUL byte in its name")
    } else if name.len() > 100 {
        Some("has a name longer than 100 bytes")
    } else {
        None
    }
}

/// A lazily produced deterministic tar of a directory's regular files.
#[derive(Debug)]
pub(crate) struct ImagesTar {
    dir: PathBuf,
    files: Vec<(String, u64)>,
    next: usize,
    state: State,
    len: u64,
}

#[derive(Debug)]
enum State {
    Header {
        block: Box<[u8; 512]>,
        pos: usize,
    },
    Body {
        file: File,
        left: u64,
        path: PathBuf,
    },
    Zeros {
        left: u64,
        then_trailer_done: bool,
    },
    Done,
}

impl ImagesTar {
    /// List `dir`: only regular files with plain names are allowed (CRIU writes nothing else).
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        let read = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
        let mut files = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| Error::io("list", dir, e))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("stat", &path, e))?;
            let name = entry.file_name().into_string().map_err(|_| {
                Error::io(
                    "tar",
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "name is not UTF-8"),
                )
            })?;
            if !meta.is_file() || bad_name(name.as_bytes()).is_some() {
                return Err(Error::io(
                    "tar",
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the images directory holds something other than a plainly named regular file",
                    ),
                ));
            }
            files.push((name, meta.len()));
        }
        files.sort();
        let len = files
            .iter()
            .map(|(_, size)| BLOCK + size.div_ceil(BLOCK) * BLOCK)
            .sum::<u64>()
            + 2 * BLOCK;
        let mut tar = Self {
            dir: dir.to_owned(),
            files,
            next: 0,
            state: State::Done,
            len,
        };
        tar.state = tar.next_state()?;
        Ok(tar)
    }

    /// The exact number of bytes the archive will have.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The state after the current file: the next header, or the trailer.
    fn next_state(&mut self) -> Result<State> {
        let Some((name, size)) = self.files.get(self.next) else {
            return Ok(State::Zeros {
                left: 2 * BLOCK,
                then_trailer_done: true,
            });
        };
        let mut header = tar::Header::new_ustar();
        header
            .set_path(name)
            .map_err(|e| Error::io("tar", self.dir.join(name), e))?;
        header.set_size(*size);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut block = Box::new([0u8; 512]);
        block.copy_from_slice(header.as_bytes());
        Ok(State::Header { block, pos: 0 })
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match &mut self.state {
                State::Done => return Ok(0),
                State::Header { block, pos } => {
                    if *pos < block.len() {
                        let n = (block.len() - *pos).min(buf.len());
                        buf[..n].copy_from_slice(&block[*pos..*pos + n]);
                        *pos += n;
                        return Ok(n);
                    }
                    let (name, size) = &self.files[self.next];
                    let path = self.dir.join(name);
                    let file = File::open(&path).map_err(|e| with_path(e, &path))?;
                    self.state = State::Body {
                        file,
                        left: *size,
                        path,
                    };
                }
                State::Body { file, left, path } => {
                    if *left > 0 {
                        let want = (*left).min(buf.len() as u64) as usize;
                        let n = file
                            .read(&mut buf[..want])
                            .map_err(|e| with_path(e, path))?;
                        if n == 0 {
                            return Err(with_path(
                                std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "file shrank while being archived",
                                ),
                                path,
                            ));
                        }
                        *left -= n as u64;
                        return Ok(n);
                    }
                    let size = self.files[self.next].1;
                    self.next += 1;
                    self.state = State::Zeros {
                        left: size.div_ceil(BLOCK) * BLOCK - size,
                        then_trailer_done: false,
                    };
                }
                State::Zeros {
                    left,
                    then_trailer_done,
                } => {
                    if *left > 0 {
                        let n = (*left).min(buf.len() as u64) as usize;
                        buf[..n].fill(0);
                        *left -= n as u64;
                        return Ok(n);
                    }
                    if *then_trailer_done {
                        self.state = State::Done;
                    } else {
                        self.state = self.next_state().map_err(std::io::Error::other)?;
                    }
                }
            }
        }
    }
}

/// A failure reading one file into the archive: which file, with the cause as its source.
#[derive(Debug, thiserror::Error)]
#[error("archiving {}", .path.display())]
struct ArchiveError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// `e` with the file it happened on, keeping its kind and itself as the source (not as text).
fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        ArchiveError {
            path: path.to_owned(),
            source: e,
        },
    )
}

impl Read for ImagesTar {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_inner(buf)
    }
}

/// Extract the images tar `source` (the blob `digest`) into the existing empty directory `dest`.
///
/// `source` is read to its end, also after a bad entry: a blob that fails its digest explains
/// a tar that does not parse (a flipped byte in a header), and is the error then.
pub(crate) fn extract(source: Box<dyn Read + Send>, digest: &Digest256, dest: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(source);
    let unpacked = unpack(&mut archive, digest, dest);
    // Read to the end so the store's verifying reader checks the digest.
    let mut rest = archive.into_inner();
    let drained = std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| tar_error(digest, e));
    match (unpacked, drained) {
        (Ok(()), drained) => drained.map(drop),
        (Err(bad @ (Error::Tar { .. } | Error::UnsafeTar { .. })), Err(corrupt))
            if !matches!(corrupt, Error::Tar { .. }) =>
        {
            tracing::debug!(error = %bad, "the images tar does not parse: its blob is corrupt");
            Err(corrupt)
        }
        (Err(e), _) => Err(e),
    }
}

/// An error reading the images tar `digest`: the store's (a blob that fails its digest), or the
/// tar's.
fn tar_error(digest: &Digest256, source: std::io::Error) -> Error {
    match store_error(source) {
        Ok(store) => Error::store(format!("reading the images {digest}"), store),
        Err(source) => Error::Tar {
            digest: *digest,
            source: printable(source),
        },
    }
}

/// Write the entries of `archive` into `dest`, each checked first.
fn unpack(
    archive: &mut tar::Archive<Box<dyn Read + Send>>,
    digest: &Digest256,
    dest: &Path,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let unsafe_entry = |entry: &[u8], reason| Error::UnsafeTar {
        digest: *digest,
        entry: entry.escape_ascii().to_string(),
        reason,
    };
    let tar_err = |source: std::io::Error| tar_error(digest, source);
    // Checked before each entry is written: a small blob can declare a huge file, and tmpfs
    // fills memory.
    let available = room_in(dest)?;
    let (mut count, mut total) = (0usize, 0u64);
    // Large copies: 8 KiB ones cost one write syscall each, 130 000 for a 1 GiB dump.
    let mut buf = vec![0u8; COPY_BUF];
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let name = entry.path_bytes().into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(unsafe_entry(&name, "is not a regular file"));
        }
        if let Some(reason) = bad_name(&name) {
            return Err(unsafe_entry(&name, reason));
        }
        count += 1;
        if count > MAX_ENTRIES {
            return Err(unsafe_entry(&name, "is past the limit of 100000 entries"));
        }
        total = total.saturating_add(entry.size());
        if total > MAX_TOTAL {
            return Err(unsafe_entry(&name, "takes the archive past 1 TiB"));
        }
        if total > available {
            return Err(Error::NoRoom {
                dir: dest.to_owned(),
                needed: total,
                available,
            });
        }
        let name = std::str::from_utf8(&name)
            .map_err(|_| unsafe_entry(&name, "has a name that is not UTF-8"))?;
        let path = dest.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        let size = entry.size();
        let copied = copy(&mut entry, &mut file, &mut buf)
            .map_err(|e| e.map_err(tar_err, |e| Error::io("write", &path, e)))?;
        if copied != size {
            return Err(unsafe_entry(name.as_bytes(), "is truncated"));
        }
    }
    Ok(())
}

/// The bytes free for us in the file system holding `dir` (`statvfs`: available blocks times
/// the fragment size).
pub(crate) fn room_in(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| Error::io("statvfs", dir, e.into()))?;
    // The field types differ between libc targets (u32 on some).
    #[allow(clippy::useless_conversion)]
    let room = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    Ok(room)
}

/// `e` with its message made printable: tar's parse errors quote the bytes they met, and a
/// garbage blob's bytes would reach the terminal raw.
fn printable(e: std::io::Error) -> std::io::Error {
    let text = e.to_string();
    if text.chars().all(|c| !c.is_control()) {
        return e;
    }
    let escaped: String = text.chars().flat_map(char::escape_debug).collect();
    std::io::Error::new(e.kind(), escaped)
}

/// Buffer size for extraction copies.
const COPY_BUF: usize = 1 << 20;

/// Which side of a copy failed.
enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

impl CopyError {
    fn map_err(
        self,
        read: impl FnOnce(std::io::Error) -> Error,
        write: impl FnOnce(std::io::Error) -> Error,
    ) -> Error {
        match self {
            Self::Read(e) => read(e),
            Self::Write(e) => write(e),
        }
    }
}

/// Copy `from` to `to` through `buf`; the number of bytes copied.
fn copy(from: &mut dyn Read, to: &mut File, buf: &mut [u8]) -> std::result::Result<u64, CopyError> {
    use std::io::Write as _;
    let mut n = 0u64;
    loop {
        let got = match from.read(buf) {
            Ok(0) => return Ok(n),
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..got]).map_err(CopyError::Write)?;
        n += got as u64;
    }
}

/// The store error inside an `io::Error` from a verifying reader, if that is what it is.
fn store_error(e: std::io::Error) -> std::result::Result<pf_core::Error, std::io::Error> {
    if !e
        .get_ref()
        .is_some_and(|inner| inner.is::<pf_core::Error>())
    {
        return Err(e);
    }
    let kind = e.kind();
    match e
        .into_inner()
        .map(|inner| inner.downcast::<pf_core::Error>())
    {
        Some(Ok(store)) => Ok(*store),
        Some(Err(other)) => Err(std::io::Error::new(kind, other)),
        None => Err(std::io::Error::from(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_error_keeps_its_kind_path_and_cause() {
        let cause = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = with_path(cause, Path::new("/imgs/pages-1.img"));
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(e.to_string(), "archiving /imgs/pages-1.img");
        let source = std::error::Error::source(&e).expect("the cause is the source");
        let source = source
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
    }
    use pf_core::{BlobStore as _, MemBlobStore};

    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
        dir
    }

    fn tar_bytes(dir: &Path) -> Vec<u8> {
        let mut tar = ImagesTar::new(dir).expect("tar");
        let len = tar.len();
        let mut out = Vec::new();
        tar.read_to_end(&mut out).expect("read");
        assert_eq!(out.len() as u64, len);
        out
    }

    #[test]
    fn deterministic_and_readable_by_tar() {
        let big = vec![7u8; 70_000];
        let files: [(&str, &[u8]); 4] = [
            ("pstree.img", b"tree"),
            ("core-1.img", b"core"),
            ("pages-1.img", &big),
            ("empty.img", b""),
        ];
        let a = dir_with(&files);
        let b = dir_with(&files[..]);
        // Different mtimes and modes on disk do not matter.
        std::fs::set_permissions(
            b.path().join("core-1.img"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
        let (ta, tb) = (tar_bytes(a.path()), tar_bytes(b.path()));
        assert_eq!(ta, tb);
        let mut archive = tar::Archive::new(&ta[..]);
        let mut seen = Vec::new();
        for e in archive.entries().expect("entries") {
            let mut e = e.expect("entry");
            let h = e.header();
            assert_eq!(
                (
                    h.mode().expect("mode"),
                    h.mtime().expect("mtime"),
                    h.uid().expect("uid")
                ),
                (0o600, 0, 0)
            );
            let name = e.path().expect("path").display().to_string();
            let mut body = Vec::new();
            e.read_to_end(&mut body).expect("body");
            seen.push((name, body.len()));
        }
        assert_eq!(
            seen,
            vec![
                ("core-1.img".to_owned(), 4),
                ("empty.img".to_owned(), 0),
                ("pages-1.img".to_owned(), 70_000),
                ("pstree.img".to_owned(), 4),
            ]
        );
    }

    #[test]
    fn refuses_to_tar_links_and_dirs() {
        let d = dir_with(&[("a.img", b"x")]);
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).expect("symlink");
        assert!(matches!(
            ImagesTar::new(d.path()),
            Err(Error::Io { op: "tar", .. })
        ));
        let d = dir_with(&[("a.img", b"x")]);
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        assert!(matches!(
            ImagesTar::new(d.path()),
            Err(Error::Io { op: "tar", .. })
        ));
    }

    #[test]
    fn round_trip_through_a_store() {
        let src = dir_with(&[("x.img", b"hello"), ("y.img", &[1u8; 1000])]);
        let store = MemBlobStore::new();
        let put = store
            .put_reader(&mut ImagesTar::new(src.path()).expect("tar"))
            .expect("put");
        let dest = tempfile::tempdir().expect("tempdir");
        extract(
            store.open(&put.digest).expect("open"),
            &put.digest,
            dest.path(),
        )
        .expect("extract");
        assert_eq!(
            std::fs::read(dest.path().join("x.img")).expect("x"),
            b"hello"
        );
        assert_eq!(
            std::fs::read(dest.path().join("y.img")).expect("y"),
            vec![1u8; 1000]
        );
    }

    /// A one-entry tar whose header is written by hand (tar's builder refuses bad paths).
    pub(crate) fn raw_tar(name: &[u8], kind: tar::EntryType, body: &[u8], link: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_entry_type(kind);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(body);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    fn try_extract(bytes: Vec<u8>) -> (Result<()>, tempfile::TempDir) {
        let parent = tempfile::tempdir().expect("tempdir");
        let dest = parent.path().join("images");
        std::fs::create_dir(&dest).expect("mkdir");
        let digest = Digest256::of(&bytes);
        let r = extract(Box::new(std::io::Cursor::new(bytes)), &digest, &dest);
        (r, parent)
    }

    #[test]
    fn rejects_escapes_links_and_devices() {
        let cases: [(&[u8], tar::EntryType, &[u8], &str); 5] = [
            (
                b"../evil",
                tar::EntryType::Regular,
                b"",
                "has a `/` in its name (only plain file names are allowed)",
            ),
            (
                b"/etc/evil",
                tar::EntryType::Regular,
                b"",
                "has a `/` in its name (only plain file names are allowed)",
            ),
            (b"..", tar::EntryType::Regular, b"", "is a dot entry"),
            (
                b"link",
                tar::EntryType::Symlink,
                b"/etc/passwd",
                "is not a regular file",
            ),
            (b"dev", tar::EntryType::Char, b"", "is not a regular file"),
        ];
        for (name, kind, link, why) in cases {
            let (r, parent) = try_extract(raw_tar(name, kind, b"pwned", link));
            assert!(
                matches!(&r, Err(Error::UnsafeTar { reason, .. }) if *reason == why),
                "{}: {r:?}",
                String::from_utf8_lossy(name)
            );
            // Nothing was written: not in the destination, not beside it.
            let images: Vec<_> = std::fs::read_dir(parent.path().join("images"))
                .expect("ls")
                .collect();
            assert!(images.is_empty());
            assert_eq!(std::fs::read_dir(parent.path()).expect("ls").count(), 1);
        }
    }

    #[test]
    fn rejects_duplicates_and_garbage() {
        let mut twice = raw_tar(b"a.img", tar::EntryType::Regular, b"1", b"");
        twice.truncate(1024);
        twice.extend(raw_tar(b"a.img", tar::EntryType::Regular, b"2", b""));
        let (r, _p) = try_extract(twice);
        assert!(matches!(r, Err(Error::Io { op: "create", .. })), "{r:?}");
        let mut garbage = raw_tar(b"a.img", tar::EntryType::Regular, b"1", b"");
        garbage[0] ^= 0xff;
        let (r, _p) = try_extract(garbage);
        assert!(matches!(r, Err(Error::Tar { .. })), "{r:?}");
    }

    /// The error chain as `pf` prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            text.push_str(": ");
            text.push_str(&s.to_string());
            cur = s.source();
        }
        text
    }

    #[test]
    fn garbage_bytes_are_escaped_in_errors() {
        // A header of binary bytes, as a random blob's first 512 are: tar quotes the name
        // field in its checksum error.
        let mut garbage = raw_tar(b"a\x1b[2J\x07\x01b", tar::EntryType::Regular, b"1", b"");
        garbage[148..156].copy_from_slice(b"\xff\x1b[2J\x07\x01z");
        let (r, _p) = try_extract(garbage);
        let err = r.expect_err("garbage");
        let text = chain(&err);
        assert!(
            text.chars().all(|c| !c.is_control()),
            "no raw control bytes: {text:?}"
        );
        let name = raw_tar(b"a\x1b[2Jb\xff.img", tar::EntryType::Regular, b"1", b"");
        let (r, _p) = try_extract(name);
        let text = chain(&r.expect_err("bad name"));
        assert!(text.chars().all(|c| !c.is_control()), "{text:?}");
    }

    #[test]
    fn refuses_images_larger_than_the_room_left() {
        let parent = tempfile::tempdir().expect("tempdir");
        let free = room_in(parent.path()).expect("statvfs");
        // A header declaring far more than the free space (twice it, plus 1 GiB: other work on
        // the machine may free or fill some meanwhile), and no body: the refusal must come
        // before anything is written.
        let declared = free.saturating_mul(2) + (1 << 30);
        let mut h = tar::Header::new_ustar();
        h.set_path("pages-1.img").expect("path");
        h.set_size(declared);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.resize(4096, 0);
        let (r, p) = try_extract(bytes);
        match r {
            Err(Error::NoRoom {
                needed, available, ..
            }) => {
                assert_eq!(needed, declared);
                assert!(available < declared, "{available} vs {declared}");
            }
            other => panic!("expected NoRoom, got {other:?}"),
        }
        assert_eq!(
            std::fs::read_dir(p.path().join("images"))
                .expect("ls")
                .count(),
            0,
            "nothing written"
        );
    }
}
