//! [`FsBlobStore`]: blobs as zstd files in a directory tree, names as small files beside them.
//!
//! The layout is the reference pf-core store's, so either reads what the other wrote:
//!
//! ```text
//! <root>/blobs/sha256/<first 2 hex>/<64 hex>.zst   one zstd frame of the blob's raw bytes
//! <root>/blobs/sha256/<first 2 hex>/<64 hex>.raw   or: the blob's raw bytes as they are
//! <root>/refs/<name>                                "sha256:<64 hex>\n"
//! <root>/lock                                       empty; `flock`ed (see below)
//! ```
//!
//! A blob has one of two encodings. `.zst` is the default ([`BlobStore::put`] and the streaming
//! puts). `.raw` is for bytes that are already compressed, [packs](crate::pack) above all
//! ([`BlobStore::put_raw`]): compressing them again gains nothing, and stored as they are,
//! [`BlobStore::read_at`] is one `pread` (a pack's frames are read one at a time). Either way
//! the digest is the SHA-256 of the raw bytes, and every verified read (`get`, `open`,
//! `copy_to`) checks it. Stores written before `.raw` existed hold only `.zst` files and read
//! as before.
//!
//! Normally a blob has one file. A put that writes a blob moves its file into place first and
//! then removes the other encoding's file, so for a moment both may exist; readers look for
//! `.raw`, then `.zst`, then `.raw` again, which finds the blob whichever way such a change
//! goes. A put over a corrupt copy writes the encoding the put asks for and removes the other.
//!
//! Writers stream into `.tmp-<pid>-<n>-<random>` files (in `blobs/sha256/` or `refs/`) on which
//! they hold an exclusive `flock`, fsync them, rename them into place and fsync the directory, so
//! a reader sees a whole blob or none. A writer killed midway leaves an unlocked temp file that
//! [`BlobStore::sweep_temp`] removes. Directories are 0700 and files 0600 whatever the umask:
//! blobs hold process memory, and process memory holds secrets.
//!
//! Writers hold a shared `flock` on `<root>/lock` from their first blob to the name that keeps it
//! ([`BlobStore::writer_lock`]), readers that must not lose their blobs midway (thaws) take a
//! share when they can at once ([`BlobStore::reader_lock`]); `gc` holds it exclusively
//! ([`BlobStore::gc_lock`]).
//!
//! A store is used only by its owner and only when nobody else can write to it: [`FsBlobStore::open`]
//! refuses a root, `refs/` or `blobs/` that another user owns or that group or others may write
//! (anyone who can write names decides what pf restores).

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions, Permissions};
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime};

use zstd::stream::raw::{CParameter, InBuffer, Operation as _, OutBuffer};

use crate::digest::{Digest256, DigestHasher};
use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::gc::GcOptions;
use crate::lock::StoreLock;
use crate::mem::VerifyingReader;
use crate::page_index::PageIndex;
use crate::store::{
    BlobBatch, BlobStore, ExactLen, Put, WRITE_SLICE, copy_reader, validate_name, write_out,
};

/// How a blob's bytes are kept in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// `<hex>.zst`: one zstd frame.
    Zstd,
    /// `<hex>.raw`: the raw bytes as they are (bytes already compressed, like packs).
    Raw,
}

impl Encoding {
    fn suffix(self) -> &'static str {
        match self {
            Self::Zstd => "zst",
            Self::Raw => "raw",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Zstd => Self::Raw,
            Self::Raw => Self::Zstd,
        }
    }
}

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
const TEMP_PREFIX: &str = ".tmp-";
/// zstd level 1: the fastest regular level; process memory is mostly zeros or incompressible.
const LEVEL: i32 = 1;
/// Unit of reading, compressing, writing and handing between threads.
const CHUNK: usize = 1 << 20;
/// Inputs at least this large (or of unknown size past the first chunk) compress on zstd's
/// worker threads.
const MULTITHREAD_MIN: u64 = 4 << 20;
/// A background thread starts the disk writing of a blob every this many compressed bytes, so
/// the final fsync waits for little.
const SYNC_EVERY: u64 = 32 << 20;
/// Blob files at least this large are decoded and hashed on two threads of their own.
const THREADED_READ_MIN: u64 = 4 << 20;
/// Chunks that may be in flight between the threads of one reader (memory bound).
const READ_QUEUE: usize = 4;
/// An unlocked temp file whose writer may still be alive is left alone until it is this old.
const TEMP_MIN_AGE: Duration = Duration::from_secs(60);
/// `ZSTD_FRAMEHEADERSIZE_MAX`: enough of a file to read the frame's content size.
const FRAME_HEADER_MAX: usize = 18;

/// A [`BlobStore`] on disk: zstd-compressed blobs under `<root>/blobs/sha256/`, names under
/// `<root>/refs/`.
///
/// Writes are atomic (temp file, fsync, rename, fsync of the directory) and stream with flat
/// memory whatever the blob size; reads verify the digest. Several processes may use one store at
/// once.
#[derive(Debug)]
pub struct FsBlobStore {
    root: PathBuf,
    blobs: PathBuf,
    refs: PathBuf,
    /// Whether raw blobs are still written with direct I/O (cleared the first time the
    /// filesystem refuses it).
    direct: std::sync::atomic::AtomicBool,
}

impl FsBlobStore {
    /// Open the store at `root`, creating the directory (mode 0700) when it is missing.
    ///
    /// Subdirectories are created on the first write, so a read-only store can be read. A store
    /// that is not private is refused: an [`Error::StoreNotOwned`] when the root, `refs/` or
    /// `blobs/` belongs to another user (root included: a name planted by its owner would make
    /// root restore images of their choosing), an [`Error::StoreWritableByOthers`] when group or
    /// others may write one of them, an [`Error::StoreUnreachable`] when a directory on the way
    /// does not let this user through.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_as(root, true)
    }

    /// Open the store at `root` to read it, or to change what is already there: like
    /// [`open`](Self::open), but a missing store is [`Error::NoStore`] and nothing is created,
    /// so a mistyped path is an error rather than a new empty store.
    pub fn open_existing(root: &Path) -> Result<Self> {
        Self::open_as(root, false)
    }

    fn open_as(root: &Path, create: bool) -> Result<Self> {
        if root.as_os_str().is_empty() {
            return Err(Error::EmptyStorePath);
        }
        match fs::metadata(root) {
            Ok(meta) if meta.is_dir() => {
                check_private(root)?;
                check_is_store(root)?;
            }
            Ok(_) => {
                return Err(Error::io(
                    "opening the store",
                    root,
                    io::Error::from(io::ErrorKind::NotADirectory),
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Err(Error::NoStore {
                        root: root.to_owned(),
                    });
                }
                ensure_dir(root)?;
            }
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                return Err(unreachable_store(root, err));
            }
            Err(err) => return Err(Error::io("opening the store", root, err)),
        }
        Ok(Self {
            root: root.to_owned(),
            blobs: root.join("blobs").join("sha256"),
            refs: root.join("refs"),
            direct: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Remove the store at `root` if nothing is in it: no blob and no name (a pull that made
    /// it and failed has taken back what it stored). Its lock file and the empty directories
    /// go; a file pf does not know, or a blob another process stored meanwhile, keeps it.
    ///
    /// Only while no one else uses the store: its lock is taken exclusively without waiting (a
    /// writer or reader holding it, another pull into the same new store say, keeps the store
    /// as it is), and held while the store is looked at and taken apart.
    pub fn forget_if_empty(root: &Path) {
        let Ok(store) = Self::open_existing(root) else {
            return;
        };
        let Ok(lock) = File::open(root.join("lock")) else {
            // No lock file: nothing ever locked it, so nothing was stored; only empty
            // directories go.
            remove_empty_dirs(root);
            return;
        };
        if lock.try_lock().is_err() {
            return;
        }
        let empty = store.list().is_ok_and(|blobs| blobs.is_empty())
            && store.names().is_ok_and(|names| names.is_empty());
        if empty {
            let _ = fs::remove_file(root.join("lock"));
        }
        remove_empty_dirs(root);
        drop(lock);
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives: its file when it is there (`<hex>.raw` for a blob
    /// stored with [`BlobStore::put_raw`], else `<hex>.zst`), else where [`BlobStore::put`]
    /// would write it (`<hex>.zst`).
    pub fn blob_path(&self, digest: &Digest256) -> PathBuf {
        match self.existing(digest) {
            Ok(Some((path, _))) => path,
            _ => self.path_of(digest, Encoding::Zstd),
        }
    }

    /// The file of `digest` in `encoding` (whether or not it is there).
    fn path_of(&self, digest: &Digest256, encoding: Encoding) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(&hex[..2])
            .join(format!("{hex}.{}", encoding.suffix()))
    }

    /// The blob's file and its encoding, if it is there. Looks for `.raw`, `.zst`, then `.raw`
    /// again: a put that changes a blob's encoding installs the new file before it removes the
    /// old one, so one of the three looks finds it whichever way the change goes.
    fn existing(&self, digest: &Digest256) -> Result<Option<(PathBuf, Encoding)>> {
        for encoding in [Encoding::Raw, Encoding::Zstd, Encoding::Raw] {
            let path = self.path_of(digest, encoding);
            if path_exists(&path)? {
                return Ok(Some((path, encoding)));
            }
        }
        Ok(None)
    }

    fn fanout_dir(&self, digest: &Digest256) -> PathBuf {
        self.blobs.join(&digest.hex()[..2])
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.refs.join(name)
    }

    /// The store's lock file, created (0600) when missing. `flock` needs no write access: on a
    /// store this user may not write, an existing lock file is opened read-only.
    fn lock_file(&self) -> Result<File> {
        let path = self.root.join("lock");
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .or_else(|err| File::open(&path).map_err(|_| err))
            .map_err(|err| Error::io("opening the store's lock", path, err))
    }

    /// Compress everything `input` yields into a temp file, then move it into place.
    ///
    /// `len` is pledged into the frame header when known; `known` skips hashing when the caller
    /// already hashed the bytes.
    fn write_blob(
        &self,
        input: &mut dyn Read,
        len: Option<u64>,
        known: Option<Digest256>,
    ) -> Result<Put> {
        let started = std::time::Instant::now();
        let (temp, put, stored) = self.compress_to_temp(input, len, known, true)?;
        self.install(temp, &put.digest, Encoding::Zstd)?;
        tracing::debug!(digest = %put.digest, size = put.size, stored, elapsed = ?started.elapsed(), "stored blob");
        Ok(put)
    }

    /// Compress everything `input` yields into a new temp file (fsynced when `sync`); returns
    /// it with what was stored and the compressed size.
    fn compress_to_temp(
        &self,
        input: &mut dyn Read,
        len: Option<u64>,
        known: Option<Digest256>,
        sync: bool,
    ) -> Result<(TempFile, Put, u64)> {
        ensure_dir(&self.blobs)?;
        let temp = TempFile::create(&self.blobs)?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = fill(input, &mut buf).map_err(input_error)?;
        let mut eof = n < CHUNK;
        let pledged = len.or(if eof { Some(n as u64) } else { None });
        let mut encoder = Compressor::new(&temp, pledged)?;
        let mut hasher = known.is_none().then(DigestHasher::new);
        let mut size = 0u64;
        while n > 0 {
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            size += n as u64;
            encoder.compress(&buf[..n])?;
            if eof {
                break;
            }
            n = fill(input, &mut buf).map_err(input_error)?;
            eof = n < CHUNK;
        }
        let stored = encoder.finish(sync)?;
        let digest = match known {
            Some(d) => d,
            None => hasher.unwrap_or_default().finish(),
        };
        Ok((temp, Put { digest, size }, stored))
    }

    /// Move a finished, synced temp file to the blob's path in `encoding`, then remove the
    /// blob's file in the other encoding if there is one, and fsync the directory.
    ///
    /// A blob already there is replaced: the new file holds the same bytes, just written and
    /// hashed, while the old one may have rotted since (a put of the same bytes repairs a corrupt
    /// blob). Readers that opened the old file read it to its end.
    fn install(&self, temp: TempFile, digest: &Digest256, encoding: Encoding) -> Result<()> {
        let dir = self.install_unsynced(temp, digest, encoding)?;
        sync_dir(&dir)
    }

    /// [`install`](Self::install) without the directory's fsync: returns the directory, which
    /// the caller must sync.
    fn install_unsynced(
        &self,
        temp: TempFile,
        digest: &Digest256,
        encoding: Encoding,
    ) -> Result<PathBuf> {
        let dir = self.fanout_dir(digest);
        ensure_dir(&dir)?;
        temp.persist(&self.path_of(digest, encoding))?;
        let other = self.path_of(digest, encoding.other());
        match fs::remove_file(&other) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io("removing the old copy of a blob", other, err)),
        }
        Ok(dir)
    }

    /// Whether the stored blob at `path` (in `encoding`) is exactly `bytes`. Cheaper than a put:
    /// one read (and decode), no compression, no write; any failure counts as no.
    fn holds(&self, digest: &Digest256, path: &Path, encoding: Encoding, bytes: &[u8]) -> bool {
        let Ok(file) = File::open(path) else {
            return false;
        };
        let mut reader: Box<dyn Read> = match encoding {
            Encoding::Raw => Box::new(file),
            Encoding::Zstd => match self.decoder(digest, file, path) {
                Ok(decoder) => Box::new(decoder),
                Err(_) => return false,
            },
        };
        let mut buf = vec![0u8; bytes.len().clamp(1, CHUNK)];
        let mut seen = 0usize;
        loop {
            match fill(&mut reader, &mut buf) {
                Ok(0) => return seen == bytes.len(),
                Ok(n) => {
                    if bytes.get(seen..seen + n) != Some(&buf[..n]) {
                        return false;
                    }
                    seen += n;
                }
                Err(_) => return false,
            }
        }
    }

    fn decoder(&self, digest: &Digest256, file: File, path: &Path) -> Result<DecodeReader> {
        let capacity = file
            .metadata()
            .map(|m| usize::try_from(m.len()).unwrap_or(CHUNK).clamp(4096, CHUNK))
            .unwrap_or(CHUNK);
        let inner =
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(capacity, file))
                .map_err(|source| Error::Decode {
                    digest: *digest,
                    path: path.to_owned(),
                    source,
                })?;
        Ok(DecodeReader {
            inner,
            digest: *digest,
            path: path.to_owned(),
            failed: false,
        })
    }

    /// Open the blob's file (see [`existing`](Self::existing) for the order of the looks).
    fn open_blob_file(&self, digest: &Digest256) -> Result<(File, PathBuf, Encoding)> {
        for encoding in [Encoding::Raw, Encoding::Zstd, Encoding::Raw] {
            let path = self.path_of(digest, encoding);
            match File::open(&path) {
                Ok(file) => return Ok((file, path, encoding)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(Error::io("opening blob", path, err)),
            }
        }
        Err(Error::NotFound { digest: *digest })
    }

    /// Write `bytes` as they are into a temp file, fsync it, and move it into place as the
    /// blob's `.raw` file.
    fn write_raw(&self, bytes: &[u8], digest: &Digest256) -> Result<()> {
        let temp = self.raw_to_temp(bytes)?;
        temp.file
            .sync_all()
            .map_err(|err| Error::io("syncing", &temp.path, err))?;
        self.install(temp, digest, Encoding::Raw)
    }

    /// Write `bytes` as they are into a new temp file (not synced): their whole 4 KiB blocks
    /// with direct I/O where the filesystem allows it, the rest through the page cache.
    fn raw_to_temp(&self, bytes: &[u8]) -> Result<TempFile> {
        use std::os::unix::fs::FileExt as _;
        ensure_dir(&self.blobs)?;
        let temp = TempFile::create(&self.blobs)?;
        let direct = if bytes.len() >= DIRECT_MIN && self.direct.load(Ordering::Relaxed) {
            match write_direct(
                &temp.path,
                &bytes[..bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN],
            ) {
                Ok(n) => n,
                // Written again from the start through the page cache, which reports a real
                // failure (no space, a disk error) itself.
                Err(err) => {
                    if err.raw_os_error() == Some(nix::libc::EINVAL) {
                        tracing::debug!(path = %temp.path.display(), %err, "no direct I/O here: raw blobs go through the page cache");
                        self.direct.store(false, Ordering::Relaxed);
                    } else {
                        tracing::debug!(path = %temp.path.display(), %err, "a direct write failed: writing through the page cache");
                    }
                    0
                }
            }
        } else {
            0
        };
        let mut at = direct;
        for slice in bytes[direct..].chunks(WRITE_SLICE) {
            temp.file
                .write_all_at(slice, at as u64)
                .map_err(|err| Error::io("writing", &temp.path, err))?;
            at += slice.len();
        }
        Ok(temp)
    }

    /// Whether the store holds exactly `bytes` under `digest` (in either encoding); if so, its
    /// mtime is refreshed, as for a put.
    fn already_holds(&self, digest: &Digest256, bytes: &[u8]) -> Result<bool> {
        if let Some((path, found)) = self.existing(digest)?
            && self.holds(digest, &path, found, bytes)
        {
            touch(&path);
            return Ok(true);
        }
        Ok(false)
    }

    /// A put of `bytes` whose digest is `digest`, in `encoding`: nothing to write when the
    /// store holds exactly these bytes already (in either encoding).
    fn put_bytes(&self, bytes: &[u8], digest: Digest256, encoding: Encoding) -> Result<()> {
        if self.already_holds(&digest, bytes)? {
            return Ok(());
        }
        // Missing, or corrupt: write it (again).
        match encoding {
            Encoding::Raw => self.write_raw(bytes, &digest),
            Encoding::Zstd => self
                .write_blob(&mut &bytes[..], Some(bytes.len() as u64), Some(digest))
                .map(drop),
        }
    }

    /// Temp files in `dir` (not recursive).
    fn temp_files_in(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(Error::io("listing", dir, err)),
        };
        for entry in entries {
            let entry = entry.map_err(|err| Error::io("listing", dir, err))?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TEMP_PREFIX))
            {
                out.push(entry.path());
            }
        }
        Ok(())
    }

    /// The fan-out directories (`blobs/sha256/<2 hex>`) that exist.
    /// Where forward records are kept: `index/forward/<old-hex>/<new-hex>`.
    fn forward_dir(&self) -> PathBuf {
        self.root.join("index").join("forward")
    }

    fn fanout_dirs(&self) -> Result<Vec<PathBuf>> {
        let entries = match fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(Error::io("listing", &self.blobs, err)),
        };
        let mut dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| Error::io("listing", &self.blobs, err))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                dirs.push(entry.path());
            }
        }
        dirs.sort();
        Ok(dirs)
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, bytes: &[u8]) -> Result<Digest256> {
        let digest = Digest256::of(bytes);
        self.put_bytes(bytes, digest, Encoding::Zstd)?;
        Ok(digest)
    }

    fn put_raw(&self, bytes: &[u8]) -> Result<Digest256> {
        let digest = Digest256::of(bytes);
        self.put_bytes(bytes, digest, Encoding::Raw)?;
        Ok(digest)
    }

    fn seekable(&self, digest: &Digest256) -> Result<bool> {
        match self.existing(digest)? {
            Some((_, encoding)) => Ok(encoding == Encoding::Raw),
            None => Err(Error::NotFound { digest: *digest }),
        }
    }

    fn prefetch(&self, digest: &Digest256) -> Result<u64> {
        let (file, path, _) = self.open_blob_file(digest)?;
        let len = file
            .metadata()
            .map_err(|err| Error::io("reading metadata of", &path, err))?
            .len();
        // Opened each time (once per pack): a failure is not kept for the process's lifetime.
        let null = File::options()
            .write(true)
            .open("/dev/null")
            .map_err(|err| Error::io("opening", "/dev/null", err))?;
        // `sendfile` to /dev/null reads the file through the page cache (with the kernel's
        // read-ahead, waiting for the disk as it goes) and copies nothing.
        let mut at: i64 = 0;
        while (at as u64) < len {
            let left = usize::try_from(len - at as u64).unwrap_or(usize::MAX);
            match nix::sys::sendfile::sendfile(&null, &file, Some(&mut at), left) {
                Ok(0) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(err) => return Err(Error::io("reading ahead", &path, io::Error::from(err))),
            }
        }
        Ok(at as u64)
    }

    fn read_at(&self, digest: &Digest256, offset: u64, buf: &mut [u8]) -> Result<usize> {
        use std::os::unix::fs::FileExt as _;
        let (file, path, encoding) = self.open_blob_file(digest)?;
        match encoding {
            Encoding::Raw => {
                // No file is that long (and `pread` refuses offsets past i64::MAX).
                if offset > i64::MAX as u64 {
                    return Ok(0);
                }
                let mut filled = 0usize;
                while filled < buf.len() {
                    let at = offset.saturating_add(filled as u64);
                    match file.read_at(&mut buf[filled..], at) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) => return Err(Error::io("reading", path, err)),
                    }
                }
                Ok(filled)
            }
            Encoding::Zstd => {
                let mut decoder = self.decoder(digest, file, &path)?;
                let decode_error = |err| {
                    Error::from_read(err, |source| Error::Decode {
                        digest: *digest,
                        path: path.clone(),
                        source,
                    })
                };
                let skipped = io::copy(&mut (&mut decoder).take(offset), &mut io::sink())
                    .map_err(decode_error)?;
                if skipped < offset {
                    return Ok(0);
                }
                fill(&mut decoder, buf).map_err(decode_error)
            }
        }
    }

    fn put_reader(&self, reader: &mut dyn Read) -> Result<Put> {
        self.write_blob(reader, None, None)
    }

    fn put_reader_with_len(&self, reader: &mut dyn Read, len: u64) -> Result<Put> {
        self.write_blob(&mut ExactLen::new(reader, len), Some(len), None)
    }

    fn get(&self, digest: &Digest256) -> Result<Vec<u8>> {
        let (file, path, encoding) = self.open_blob_file(digest)?;
        // A raw blob's length is its file's: one allocation instead of a doubling Vec's copies
        // and fresh pages (a 1 GiB goblin's 10 MiB page list: 24 of them).
        let len = match encoding {
            Encoding::Raw => file.metadata().map_or(0, |m| m.len()),
            Encoding::Zstd => 0,
        };
        let mut reader = self.reader(digest, file, &path, encoding)?;
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0).saturating_add(1));
        reader.read_to_end(&mut out).map_err(|err| {
            Error::from_read(err, |source| Error::Decode {
                digest: *digest,
                path: path.clone(),
                source,
            })
        })?;
        Ok(out)
    }

    fn open(&self, digest: &Digest256) -> Result<Box<dyn Read + Send>> {
        let (file, path, encoding) = self.open_blob_file(digest)?;
        self.reader(digest, file, &path, encoding)
    }

    fn read_unchecked(&self, digest: &Digest256) -> Result<Option<(Vec<u8>, Option<PathBuf>)>> {
        let (mut file, path, encoding) = self.open_blob_file(digest)?;
        if encoding != Encoding::Raw {
            return Ok(None);
        }
        let len = file.metadata().map_or(0, |m| m.len());
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0).saturating_add(1));
        file.read_to_end(&mut out).map_err(|source| Error::Read {
            digest: *digest,
            source,
        })?;
        Ok(Some((out, Some(path))))
    }

    fn copy_to(&self, digest: &Digest256, out: &mut dyn Write) -> Result<u64> {
        let (file, path, encoding) = self.open_blob_file(digest)?;
        if encoding == Encoding::Raw {
            let mut reader =
                VerifyingReader::new(BufReader::with_capacity(CHUNK, file), *digest, Some(path));
            return copy_reader(&mut reader, digest, out);
        }
        let stored = file
            .metadata()
            .map_err(|err| Error::io("reading metadata of", &path, err))?
            .len();
        let decoder = self.decoder(digest, file, &path)?;
        if stored < THREADED_READ_MIN {
            let mut reader = VerifyingReader::new(decoder, *digest, Some(path));
            return copy_reader(&mut reader, digest, out);
        }
        // Chunks go from the hashing thread straight to `out`, without a copy into a buffer.
        let pipeline = Pipeline::spawn(decoder, *digest)?;
        let mut written = 0u64;
        loop {
            match pipeline.chunks.recv() {
                Ok(Chunk::Data(buf)) => {
                    write_out(out, &buf, digest)?;
                    written += buf.len() as u64;
                    pipeline.recycle(buf);
                }
                Ok(Chunk::End(actual)) => {
                    let actual = actual.unwrap_or_else(|| DigestHasher::new().finish());
                    if actual != *digest {
                        return Err(Error::Integrity {
                            digest: *digest,
                            actual,
                            path: Some(path),
                        });
                    }
                    out.flush().map_err(|source| Error::Output {
                        digest: *digest,
                        source,
                    })?;
                    return Ok(written);
                }
                Ok(Chunk::Failed(err)) => {
                    return Err(Error::from_read(err, |source| Error::Decode {
                        digest: *digest,
                        path,
                        source,
                    }));
                }
                Err(mpsc::RecvError) => {
                    return Err(Error::Read {
                        digest: *digest,
                        source: io::Error::other("a blob reader thread stopped"),
                    });
                }
            }
        }
    }

    fn contains(&self, digest: &Digest256) -> Result<bool> {
        Ok(self.existing(digest)?.is_some())
    }

    fn remove(&self, digest: &Digest256) -> Result<bool> {
        let mut removed = false;
        for encoding in [Encoding::Zstd, Encoding::Raw] {
            let path = self.path_of(digest, encoding);
            match fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(Error::io("removing blob", path, err)),
            }
        }
        Ok(removed)
    }

    fn list(&self) -> Result<Vec<Digest256>> {
        let mut out = Vec::new();
        for dir in self.fanout_dirs()? {
            list_fanout_dir(&dir, "", &mut out)?;
        }
        out.sort();
        // A blob whose encoding is being changed has two files for a moment.
        out.dedup();
        Ok(out)
    }

    fn list_prefixed(&self, hex: &str) -> Result<Vec<Digest256>> {
        if hex.is_empty() || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        match hex.get(..2) {
            // The one directory the prefix's blobs can be in (`hex` is checked: no `/`, no `..`).
            Some(fan) => list_fanout_dir(&self.blobs.join(fan), hex, &mut out)?,
            None => {
                for dir in self.fanout_dirs()? {
                    if dir
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(hex))
                    {
                        list_fanout_dir(&dir, hex, &mut out)?;
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn stored_size(&self, digest: &Digest256) -> Result<u64> {
        let Some((path, _)) = self.existing(digest)? else {
            return Err(Error::NotFound { digest: *digest });
        };
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(Error::NotFound { digest: *digest })
            }
            Err(err) => Err(Error::io("reading metadata of", path, err)),
        }
    }

    fn raw_size(&self, digest: &Digest256) -> Result<u64> {
        let (mut file, path, encoding) = self.open_blob_file(digest)?;
        if encoding == Encoding::Raw {
            return Ok(file
                .metadata()
                .map_err(|err| Error::io("reading metadata of", &path, err))?
                .len());
        }
        let mut header = [0u8; FRAME_HEADER_MAX];
        let n = fill(&mut file, &mut header).map_err(|err| Error::io("reading", &path, err))?;
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(&header[..n]) {
            return Ok(size);
        }
        // No size in the header (a stream of unknown length): count by decoding.
        let (file, path, _) = self.open_blob_file(digest)?;
        let mut decoder = self.decoder(digest, file, &path)?;
        io::copy(&mut decoder, &mut io::sink()).map_err(|err| {
            Error::from_read(err, |source| Error::Decode {
                digest: *digest,
                path: path.clone(),
                source,
            })
        })
    }

    fn modified(&self, digest: &Digest256) -> Result<Option<SystemTime>> {
        let Some((path, _)) = self.existing(digest)? else {
            return Err(Error::NotFound { digest: *digest });
        };
        match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(time) => Ok(Some(time)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(Error::NotFound { digest: *digest })
            }
            Err(err) => Err(Error::io("reading metadata of", path, err)),
        }
    }

    fn set_name(&self, name: &str, digest: &Digest256) -> Result<()> {
        validate_name(name)?;
        // A gc must not remove the blob between this check and the name.
        let _writing = self.writer_lock()?;
        let Some((blob, _)) = self.existing(digest)? else {
            return Err(Error::NotFound { digest: *digest });
        };
        // A gc that listed the names before this one was written may still be deciding what to
        // remove: a fresh mtime puts the blob in its grace period.
        touch(&blob);
        ensure_dir(&self.refs)?;
        let mut temp = TempFile::create(&self.refs)?;
        temp.file
            .write_all(format!("{digest}\n").as_bytes())
            .and_then(|()| temp.file.sync_all())
            .map_err(|err| Error::io("writing", &temp.path, err))?;
        temp.persist(&self.ref_path(name))?;
        sync_dir(&self.refs)
    }

    fn get_name(&self, name: &str) -> Result<Digest256> {
        validate_name(name)?;
        let path = self.ref_path(name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NameNotFound {
                    name: name.to_owned(),
                });
            }
            Err(err) => return Err(Error::io("reading name", path, err)),
        };
        String::from_utf8_lossy(&bytes)
            .trim()
            .parse()
            .map_err(|source| Error::CorruptName {
                name: name.to_owned(),
                path,
                source,
            })
    }

    fn names(&self) -> Result<Vec<(String, Digest256)>> {
        self.names_or_errors()?
            .into_iter()
            .map(|(name, digest)| Ok((name, digest?)))
            .collect()
    }

    fn names_or_errors(&self) -> Result<Vec<(String, Result<Digest256>)>> {
        let entries = match fs::read_dir(&self.refs) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(Error::io("listing", &self.refs, err)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| Error::io("listing", &self.refs, err))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                tracing::warn!(path = %entry.path().display(), "skipping a ref whose name is not UTF-8");
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            if validate_name(name).is_err() {
                tracing::warn!(path = %entry.path().display(), "skipping a ref with an invalid name");
                continue;
            }
            match self.get_name(name) {
                // Removed since the directory was listed.
                Err(Error::NameNotFound { .. }) => {}
                digest => out.push((name.to_owned(), digest)),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn remove_name(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        let path = self.ref_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.refs)?;
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(Error::io("removing name", path, err)),
        }
    }

    fn writer_lock(&self) -> Result<StoreLock> {
        // A writer writes: a store it cannot write is said to be so before its work starts (a
        // freeze would otherwise dump the whole process, then fail on its first page).
        // As this process's effective ids, which `check_private` and the kernel go by.
        let read_only_fs = match nix::unistd::faccessat(
            None,
            &self.root,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            nix::fcntl::AtFlags::AT_EACCESS,
        ) {
            Err(nix::errno::Errno::EROFS) => Some(true),
            Err(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) => Some(false),
            _ => None,
        };
        if let Some(read_only_fs) = read_only_fs {
            return Err(Error::StoreNotWritable {
                root: self.root.clone(),
                read_only_fs,
            });
        }
        let file = self.lock_file()?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                // Said by default, as gc says it waits: a gc may take seconds (a repack).
                tracing::warn!(
                    store = %self.root.display(),
                    "waiting for a gc of the store to finish before writing to it"
                );
                file.lock_shared()
                    .map_err(|err| Error::io("locking (shared)", self.root.join("lock"), err))?;
            }
            Err(fs::TryLockError::Error(err)) => {
                return Err(Error::io("locking (shared)", self.root.join("lock"), err));
            }
        }
        Ok(StoreLock::file(file))
    }

    fn reader_lock_wait(&self) -> Result<StoreLock> {
        let file = self.lock_file()?;
        file.lock_shared()
            .map_err(|err| Error::io("locking (shared)", self.root.join("lock"), err))?;
        Ok(StoreLock::file(file))
    }

    fn reader_lock(&self) -> Option<StoreLock> {
        let file = match self.lock_file() {
            Ok(file) => file,
            Err(err) => {
                tracing::debug!(error = %err, "reading the store without its lock");
                return None;
            }
        };
        match file.try_lock_shared() {
            Ok(()) => Some(StoreLock::file(file)),
            Err(fs::TryLockError::WouldBlock) => {
                tracing::debug!(
                    store = %self.root.display(),
                    "a gc holds the store's lock: reading without it"
                );
                None
            }
            Err(fs::TryLockError::Error(err)) => {
                tracing::debug!(error = %err, "reading the store without its lock");
                None
            }
        }
    }

    fn gc_lock(&self) -> Result<StoreLock> {
        let file = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                // Said by default: gc may wait seconds (a freeze, a lazy thaw serving a GiB).
                tracing::warn!(
                    store = %self.root.display(),
                    "waiting for writers, and thaws reading from the store, to finish"
                );
                file.lock()
                    .map_err(|err| Error::io("locking", self.root.join("lock"), err))?;
            }
            Err(fs::TryLockError::Error(err)) => {
                return Err(Error::io("locking", self.root.join("lock"), err));
            }
        }
        Ok(StoreLock::file(file))
    }

    fn batch(&self) -> Result<Box<dyn BlobBatch + '_>> {
        Ok(Box::new(FsBatch {
            store: self,
            staged: std::sync::Mutex::new(Vec::new()),
        }))
    }

    fn page_index(&self) -> PageIndex {
        PageIndex::in_dir(&self.root.join("index").join("pages"))
    }

    fn forwards_of(&self, pack: &Digest256) -> Result<Vec<Digest256>> {
        let dir = self.forward_dir().join(pack.hex());
        let mut out = Vec::new();
        for (path, to) in hex_entries(&dir)? {
            let bytes = fs::read(&path).map_err(|err| Error::io("reading", &path, err))?;
            match Forward::parse(&bytes) {
                Some(f) if f.pack == *pack && f.to == to => out.push(to),
                _ => return Err(Error::CorruptForward { path }),
            }
        }
        out.sort();
        Ok(out)
    }

    fn add_forward(&self, forward: &Forward) -> Result<()> {
        let top = self.forward_dir();
        let dir = top.join(forward.pack.hex());
        ensure_dir(&dir)?;
        let mut temp = TempFile::create(&dir)?;
        temp.file
            .write_all(&forward.to_bytes())
            .and_then(|()| temp.file.sync_all())
            .map_err(|err| Error::io("writing", &temp.path, err))?;
        temp.persist(&dir.join(forward.to.hex()))?;
        sync_dir(&dir)
    }

    fn remove_forward(&self, forward: &Forward) -> Result<bool> {
        let dir = self.forward_dir().join(forward.pack.hex());
        let path = dir.join(forward.to.hex());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(Error::io("removing", &path, err)),
        }
        // The directory goes with its last record (a concurrent writer recreates it).
        match fs::remove_dir(&dir) {
            Ok(()) => sync_dir(&self.forward_dir())?,
            Err(_) => sync_dir(&dir)?,
        }
        Ok(true)
    }

    fn forwards(&self) -> Result<Vec<Forward>> {
        let mut out = Vec::new();
        for (_, pack) in hex_entries(&self.forward_dir())? {
            for to in self.forwards_of(&pack)? {
                out.push(Forward { pack, to });
            }
        }
        out.sort_by_key(|f| (f.pack, f.to));
        Ok(out)
    }

    fn hint_path(&self, kind: &str, key: &Digest256) -> Option<PathBuf> {
        Some(self.root.join("index").join(kind).join(key.hex()))
    }

    fn sweep_temp(&self, options: &GcOptions) -> Result<Vec<PathBuf>> {
        let mut candidates = Vec::new();
        Self::temp_files_in(&self.blobs, &mut candidates)?;
        for dir in self.fanout_dirs()? {
            Self::temp_files_in(&dir, &mut candidates)?;
        }
        Self::temp_files_in(&self.refs, &mut candidates)?;
        // A page index run whose writer died, or failed on a full disk before this pf removed
        // its own (they were named `.tmp-run-<pid>-<n>`, which no pid is read from: swept).
        Self::temp_files_in(&self.root.join("index").join("pages"), &mut candidates)?;
        for (dir, _) in hex_entries(&self.forward_dir())? {
            Self::temp_files_in(&dir, &mut candidates)?;
        }
        let mut swept = Vec::new();
        for path in candidates {
            if !temp_is_abandoned(&path)? {
                continue;
            }
            if !options.dry_run {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(Error::io("removing temp file", path, err)),
                }
            }
            swept.push(path);
        }
        swept.sort();
        Ok(swept)
    }
}

impl FsBlobStore {
    /// The verifying reader for an open blob file: threaded for large compressed files.
    fn reader(
        &self,
        digest: &Digest256,
        file: File,
        path: &Path,
        encoding: Encoding,
    ) -> Result<Box<dyn Read + Send>> {
        if encoding == Encoding::Raw {
            return Ok(Box::new(VerifyingReader::new(
                BufReader::with_capacity(CHUNK, file),
                *digest,
                Some(path.to_owned()),
            )));
        }
        let stored = file
            .metadata()
            .map_err(|err| Error::io("reading metadata of", path, err))?
            .len();
        let decoder = self.decoder(digest, file, path)?;
        if stored >= THREADED_READ_MIN {
            return Ok(Box::new(ThreadedReader::spawn(decoder, *digest, path)?));
        }
        Ok(Box::new(VerifyingReader::new(
            decoder,
            *digest,
            Some(path.to_owned()),
        )))
    }
}

/// A batch of puts into an [`FsBlobStore`]: each blob is written to a locked temp file and its
/// disk writing started, but neither synced nor renamed until [`commit`](BlobBatch::commit),
/// which syncs them all (on several threads, so the file system can fold their journal
/// commits), renames them into place and syncs each directory they went into once.
#[derive(Debug)]
struct FsBatch<'s> {
    store: &'s FsBlobStore,
    staged: std::sync::Mutex<Vec<(TempFile, Digest256, Encoding)>>,
}

impl FsBatch<'_> {
    fn staged(&self) -> std::sync::MutexGuard<'_, Vec<(TempFile, Digest256, Encoding)>> {
        self.staged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn put_as(&self, bytes: &[u8], encoding: Encoding) -> Result<Digest256> {
        if encoding == Encoding::Raw && bytes.len() >= DIRECT_MIN {
            return self.put_raw_named_while_written(bytes);
        }
        let digest = Digest256::of(bytes);
        if self.staged().iter().any(|(_, d, _)| *d == digest) {
            return Ok(digest);
        }
        if self.store.already_holds(&digest, bytes)? {
            return Ok(digest);
        }
        let temp = match encoding {
            Encoding::Raw => {
                let temp = self.store.raw_to_temp(bytes)?;
                start_writeback(&temp);
                temp
            }
            Encoding::Zstd => {
                let len = Some(bytes.len() as u64);
                self.store
                    .compress_to_temp(&mut &bytes[..], len, Some(digest), false)?
                    .0
            }
        };
        self.staged().push((temp, digest, encoding));
        Ok(digest)
    }
}

impl FsBatch<'_> {
    /// A large raw put (a pack): written into its temp file on a thread of its own while this
    /// one names it, instead of named first (SHA-256 of 3.4 MB, 2.3 ms here) and written after
    /// (3.5 ms with direct I/O): a re-freeze's one new pack is on its critical path. Should the
    /// store hold the bytes already (a pack's new pages are nearly never stored before), the
    /// temp file is removed.
    fn put_raw_named_while_written(&self, bytes: &[u8]) -> Result<Digest256> {
        let (digest, temp) = thread::scope(|s| {
            let writing = thread::Builder::new()
                .name("pf-put".to_owned())
                .spawn_scoped(s, || self.store.raw_to_temp(bytes));
            let digest = Digest256::of(bytes);
            let temp = match writing {
                Ok(writing) => writing
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                // No thread to spare: written after it was named.
                Err(_) => self.store.raw_to_temp(bytes),
            };
            (digest, temp)
        });
        let held = || -> Result<bool> {
            Ok(self.staged().iter().any(|(_, d, _)| *d == digest)
                || self.store.already_holds(&digest, bytes)?)
        };
        let temp = match temp {
            Ok(temp) => temp,
            // Bytes held already need no room: the write failing (a full disk) is no failure.
            Err(err) => return if held()? { Ok(digest) } else { Err(err) },
        };
        if held()? {
            return Ok(digest);
        }
        start_writeback(&temp);
        self.staged().push((temp, digest, Encoding::Raw));
        Ok(digest)
    }
}

impl BlobBatch for FsBatch<'_> {
    fn put(&self, bytes: &[u8]) -> Result<Digest256> {
        self.put_as(bytes, Encoding::Zstd)
    }

    fn put_raw(&self, bytes: &[u8]) -> Result<Digest256> {
        self.put_as(bytes, Encoding::Raw)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let staged = std::mem::take(&mut *self.staged());
        if staged.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        // Sync every file first: nothing is renamed into place before all of it is on disk.
        let per = staged.len().div_ceil(worker_count() as usize).max(1);
        thread::scope(|s| {
            let handles: Vec<_> = staged
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk.iter().try_for_each(|(temp, _, _)| {
                            temp.file
                                .sync_all()
                                .map_err(|err| Error::io("syncing", &temp.path, err))
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })?;
        let count = staged.len();
        let mut dirs = Vec::new();
        for (temp, digest, encoding) in staged {
            dirs.push(self.store.install_unsynced(temp, &digest, encoding)?);
        }
        dirs.sort();
        dirs.dedup();
        let per = dirs.len().div_ceil(worker_count() as usize).max(1);
        thread::scope(|s| {
            let handles: Vec<_> = dirs
                .chunks(per)
                .map(|chunk| s.spawn(move || chunk.iter().try_for_each(|dir| sync_dir(dir))))
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })?;
        tracing::debug!(blobs = count, dirs = dirs.len(), elapsed = ?started.elapsed(), "committed a batch of blobs");
        Ok(())
    }
}

/// Raw blobs this large or larger are written with direct I/O: 1 MiB.
const DIRECT_MIN: usize = 1 << 20;
/// What direct I/O wants its buffers, lengths and offsets aligned to (4 KiB covers disks of
/// 512-byte and 4 KiB blocks).
const DIRECT_ALIGN: usize = 4096;
/// Bytes per direct write: 1 MiB.
const DIRECT_CHUNK: usize = 1 << 20;

thread_local! {
    /// A thread's buffer for direct writes, aligned within (`DIRECT_CHUNK` + `DIRECT_ALIGN`).
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write `bytes` (a multiple of [`DIRECT_ALIGN`] long) from the start of the file at `path`
/// with direct I/O (`O_DIRECT`): the data goes from `bytes` if it is aligned in memory (a pack
/// from `PackBuilder::finish_aligned`), else from a buffer of this thread's, straight to the
/// disk, not copied into the page cache first (by hand, 512 MiB to ext4: 0.11–0.13 s of system
/// time against 0.25–1.39 s written and synced through the cache). Returns the bytes written;
/// `EINVAL` says the filesystem does not take direct I/O (or a short write left the next one
/// unaligned).
fn write_direct(path: &Path, bytes: &[u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt as _;
    debug_assert_eq!(bytes.len() % DIRECT_ALIGN, 0);
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    if bytes.as_ptr().addr().is_multiple_of(DIRECT_ALIGN) {
        // Aligned already (a pack from `PackBuilder::finish_aligned`): straight from `bytes`.
        let mut at = 0;
        for chunk in bytes.chunks(DIRECT_CHUNK) {
            file.write_all_at(chunk, at as u64)?;
            at += chunk.len();
        }
        return Ok(at);
    }
    DIRECT_BUF.with_borrow_mut(|buf| {
        if buf.len() < DIRECT_CHUNK + DIRECT_ALIGN {
            *buf = vec![0u8; DIRECT_CHUNK + DIRECT_ALIGN];
        }
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut buf[start..start + DIRECT_CHUNK];
        let mut at = 0;
        for chunk in bytes.chunks(DIRECT_CHUNK) {
            let out = &mut aligned[..chunk.len()];
            out.copy_from_slice(chunk);
            file.write_all_at(out, at as u64)?;
            at += chunk.len();
        }
        Ok(at)
    })
}

/// Ask the kernel to start writing a temp file's data to disk now (and drop its pages from
/// the cache once written), so the sync at commit waits for little. Best effort.
fn start_writeback(temp: &TempFile) {
    use std::os::fd::AsRawFd as _;
    let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
    if let Err(err) = nix::fcntl::posix_fadvise(temp.file.as_raw_fd(), 0, 0, advice) {
        tracing::debug!(path = %temp.path.display(), %err, "cannot start the writing of a temp file");
    }
}

/// zstd's streaming decoder over a blob file; every failure becomes an [`Error::Decode`] naming
/// the digest and the file, and later reads fail too.
struct DecodeReader {
    inner: zstd::stream::read::Decoder<'static, BufReader<File>>,
    digest: Digest256,
    path: PathBuf,
    failed: bool,
}

impl Read for DecodeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(Error::Decode {
                digest: self.digest,
                path: self.path.clone(),
                source: io::Error::other("an earlier read of this blob failed"),
            }
            .into_read_error());
        }
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Err(err),
            Err(source) => {
                self.failed = true;
                Err(Error::Decode {
                    digest: self.digest,
                    path: self.path.clone(),
                    source,
                }
                .into_read_error())
            }
        }
    }
}

enum Chunk {
    Data(Vec<u8>),
    /// The decoder reached the end of the frame; with the digest of everything once hashed.
    End(Option<Digest256>),
    Failed(io::Error),
}

/// A blob decoded on one thread and hashed on another, handed over in chunks: a reader of a
/// large blob goes at the speed of the slower of the two rather than of their sum.
struct Pipeline {
    chunks: mpsc::Receiver<Chunk>,
    recycle: mpsc::SyncSender<Vec<u8>>,
}

impl Pipeline {
    fn spawn(mut decoder: DecodeReader, digest: Digest256) -> Result<Self> {
        let (decoded_tx, decoded_rx) = mpsc::sync_channel::<Chunk>(READ_QUEUE);
        let (hashed_tx, hashed_rx) = mpsc::sync_channel::<Chunk>(READ_QUEUE);
        let (recycle_tx, recycle_rx) = mpsc::sync_channel::<Vec<u8>>(2 * READ_QUEUE + 2);
        let spawn_error = |source| Error::Read { digest, source };
        thread::Builder::new()
            .name("pf-blob-decode".into())
            .spawn(move || {
                loop {
                    let mut buf = recycle_rx.try_recv().unwrap_or_default();
                    buf.resize(CHUNK, 0);
                    let msg = match fill(&mut decoder, &mut buf) {
                        Ok(0) => Chunk::End(None),
                        Ok(n) => {
                            buf.truncate(n);
                            Chunk::Data(buf)
                        }
                        Err(err) => Chunk::Failed(err),
                    };
                    let last = !matches!(msg, Chunk::Data(_));
                    if decoded_tx.send(msg).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(spawn_error)?;
        thread::Builder::new()
            .name("pf-blob-hash".into())
            .spawn(move || {
                let mut hasher = DigestHasher::new();
                for msg in decoded_rx {
                    let msg = match msg {
                        Chunk::Data(buf) => {
                            hasher.update(&buf);
                            Chunk::Data(buf)
                        }
                        Chunk::End(_) => Chunk::End(Some(std::mem::take(&mut hasher).finish())),
                        Chunk::Failed(err) => Chunk::Failed(err),
                    };
                    let last = !matches!(msg, Chunk::Data(_));
                    if hashed_tx.send(msg).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(spawn_error)?;
        Ok(Self {
            chunks: hashed_rx,
            recycle: recycle_tx,
        })
    }

    /// Hand a used chunk back to the decoder thread. If it is gone (end of blob), the buffer is
    /// just freed.
    fn recycle(&self, buf: Vec<u8>) {
        if buf.capacity() > 0 {
            let _ = self.recycle.try_send(buf);
        }
    }
}

/// The verifying reader over a [`Pipeline`].
struct ThreadedReader {
    pipeline: Pipeline,
    current: Vec<u8>,
    pos: usize,
    digest: Digest256,
    path: PathBuf,
    state: ReadState,
}

#[derive(PartialEq, Eq)]
enum ReadState {
    Reading,
    Done,
    Failed,
}

impl ThreadedReader {
    fn spawn(decoder: DecodeReader, digest: Digest256, path: &Path) -> Result<Self> {
        Ok(Self {
            pipeline: Pipeline::spawn(decoder, digest)?,
            current: Vec::new(),
            pos: 0,
            digest,
            path: path.to_owned(),
            state: ReadState::Reading,
        })
    }

    fn failure(&self, source: io::Error) -> io::Error {
        Error::Read {
            digest: self.digest,
            source,
        }
        .into_read_error()
    }
}

impl Read for ThreadedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                ReadState::Done => return Ok(0),
                ReadState::Failed => {
                    return Err(
                        self.failure(io::Error::other("an earlier read of this blob failed"))
                    );
                }
                ReadState::Reading => {}
            }
            if self.pos < self.current.len() {
                let n = buf.len().min(self.current.len() - self.pos);
                buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            self.pipeline.recycle(std::mem::take(&mut self.current));
            self.pos = 0;
            match self.pipeline.chunks.recv() {
                Ok(Chunk::Data(data)) => self.current = data,
                Ok(Chunk::End(actual)) => {
                    let actual = actual.unwrap_or_else(|| DigestHasher::new().finish());
                    if actual == self.digest {
                        self.state = ReadState::Done;
                        return Ok(0);
                    }
                    self.state = ReadState::Failed;
                    return Err(Error::Integrity {
                        digest: self.digest,
                        actual,
                        path: Some(self.path.clone()),
                    }
                    .into_read_error());
                }
                Ok(Chunk::Failed(err)) => {
                    self.state = ReadState::Failed;
                    return Err(err);
                }
                Err(mpsc::RecvError) => {
                    self.state = ReadState::Failed;
                    return Err(self.failure(io::Error::other("a blob reader thread stopped")));
                }
            }
        }
    }
}

/// zstd compression of one blob into a temp file, with output buffered in large writes and the
/// disk writing started in the background as the file grows.
struct Compressor<'a> {
    encoder: zstd::stream::raw::Encoder<'static>,
    temp: &'a TempFile,
    out: Vec<u8>,
    written: u64,
    synced_at: u64,
    flusher: Option<Flusher>,
}

impl<'a> Compressor<'a> {
    fn new(temp: &'a TempFile, pledged: Option<u64>) -> Result<Self> {
        let zstd_error = |err| Error::io("starting zstd for", &temp.path, err);
        let mut encoder = zstd::stream::raw::Encoder::new(LEVEL).map_err(zstd_error)?;
        if pledged.is_none_or(|size| size >= MULTITHREAD_MIN) {
            encoder
                .set_parameter(CParameter::NbWorkers(worker_count()))
                .map_err(zstd_error)?;
        }
        encoder
            .set_parameter(CParameter::ContentSizeFlag(true))
            .map_err(zstd_error)?;
        encoder.set_pledged_src_size(pledged).map_err(zstd_error)?;
        Ok(Self {
            encoder,
            temp,
            out: Vec::with_capacity(CHUNK),
            written: 0,
            synced_at: 0,
            flusher: None,
        })
    }

    fn compress(&mut self, data: &[u8]) -> Result<()> {
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            let pos = self.out.len();
            let mut output = OutBuffer::around_pos(&mut self.out, pos);
            self.encoder
                .run(&mut input, &mut output)
                .map_err(|err| Error::io("compressing into", &self.temp.path, err))?;
            if self.out.len() == self.out.capacity() {
                self.write_out()?;
            }
        }
        Ok(())
    }

    /// End the frame, write everything out and fsync (or, unless `sync`, start the disk
    /// writing and return); returns the compressed size.
    fn finish(mut self, sync: bool) -> Result<u64> {
        loop {
            let pos = self.out.len();
            let mut output = OutBuffer::around_pos(&mut self.out, pos);
            let remaining = self
                .encoder
                .finish(&mut output, true)
                .map_err(|err| Error::io("compressing into", &self.temp.path, err))?;
            if self.out.len() == self.out.capacity() || remaining == 0 {
                self.write_out()?;
            }
            if remaining == 0 {
                break;
            }
        }
        if let Some(flusher) = self.flusher.take() {
            flusher.stop();
        }
        if sync {
            self.temp
                .file
                .sync_all()
                .map_err(|err| Error::io("syncing", &self.temp.path, err))?;
        } else {
            start_writeback(self.temp);
        }
        Ok(self.written)
    }

    fn write_out(&mut self) -> Result<()> {
        for slice in self.out.chunks(WRITE_SLICE) {
            (&self.temp.file)
                .write_all(slice)
                .map_err(|err| Error::io("writing", &self.temp.path, err))?;
        }
        self.written += self.out.len() as u64;
        self.out.clear();
        if self.written - self.synced_at >= SYNC_EVERY {
            self.synced_at = self.written;
            if self.flusher.is_none() {
                self.flusher = Flusher::start(&self.temp.file);
            }
            if let Some(flusher) = &self.flusher {
                flusher.poke();
            }
        }
        Ok(())
    }
}

/// A thread that fdatasyncs a file being written whenever poked, so its data goes to disk while
/// compression goes on instead of all at the final fsync.
struct Flusher {
    poke: mpsc::SyncSender<()>,
    thread: thread::JoinHandle<()>,
}

impl Flusher {
    fn start(file: &File) -> Option<Self> {
        let file = file.try_clone().ok()?;
        let (poke, pokes) = mpsc::sync_channel::<()>(1);
        let thread = thread::Builder::new()
            .name("pf-blob-sync".into())
            .spawn(move || {
                for () in pokes {
                    if let Err(err) = file.sync_data() {
                        // The final fsync on the writing thread reports it.
                        tracing::debug!(%err, "background sync of a blob being written failed");
                        return;
                    }
                }
            })
            .ok()?;
        Some(Self { poke, thread })
    }

    fn poke(&self) {
        // A full channel means a sync is pending anyway.
        let _ = self.poke.try_send(());
    }

    fn stop(self) {
        drop(self.poke);
        let _ = self.thread.join();
    }
}

/// A temp file being written, locked by its writer, removed on drop unless persisted.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    fn create(dir: &Path) -> Result<Self> {
        let mut attempts = 0;
        loop {
            let path = dir.join(temp_name());
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path)
            {
                Ok(file) => {
                    let temp = Self {
                        path,
                        file,
                        persisted: false,
                    };
                    temp.file
                        .set_permissions(Permissions::from_mode(FILE_MODE))
                        .map_err(|err| Error::io("setting the mode of", &temp.path, err))?;
                    // The lock tells `sweep_temp` that the writer is alive. A sweeper may hold it
                    // for a moment while it looks at the file: then this waits.
                    if let Err(err) = temp.file.lock() {
                        tracing::debug!(path = %temp.path.display(), %err, "cannot lock temp file");
                    }
                    return Ok(temp);
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                    attempts += 1;
                }
                Err(err) => return Err(Error::io("creating a temp file in", dir, err)),
            }
        }
    }

    fn persist(mut self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest)
            .map_err(|err| Error::io("renaming a temp file to", dest, err))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `.tmp-<pid>-<counter>-<random>`: unique across processes, threads and pid reuse.
fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(n);
    if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!(
        "{TEMP_PREFIX}{}-{n}-{:016x}",
        std::process::id(),
        hasher.finish()
    )
}

/// The writer's pid from a temp file name.
fn temp_pid(name: &str) -> Option<u32> {
    name.strip_prefix(TEMP_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Whether a temp file's writer is gone: nobody holds its lock, and its writer's pid is not
/// running or the file has not been written for a while.
fn temp_is_abandoned(path: &Path) -> Result<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(Error::io("opening temp file", path, err)),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
        Err(std::fs::TryLockError::Error(err)) => {
            tracing::debug!(path = %path.display(), %err, "cannot lock temp file; judging by pid and age");
        }
    }
    let pid = path.file_name().and_then(|n| n.to_str()).and_then(temp_pid);
    let proc_mounted = Path::new("/proc/self").exists();
    let writer_gone = match pid {
        Some(pid) => proc_mounted && !Path::new("/proc").join(pid.to_string()).exists(),
        None => true,
    };
    let age = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default();
    Ok(writer_gone || age >= TEMP_MIN_AGE)
}

fn worker_count() -> u32 {
    thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(1).min(8))
        .unwrap_or(1)
}

/// Read until `buf` is full or the input ends; returns how many bytes were read.
fn fill(reader: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn input_error(err: io::Error) -> Error {
    Error::from_read(err, |source| Error::Input { source })
}

fn path_exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(Error::io("reading metadata of", path, err)),
    }
}

/// Mark an existing blob as freshly stored, so `gc`'s grace period spares it. Best effort: a
/// read-only store still succeeds in storing a blob it already has.
fn touch(path: &Path) {
    if let Err(err) = File::open(path).and_then(|f| f.set_modified(SystemTime::now())) {
        tracing::debug!(path = %path.display(), %err, "cannot update the mtime of a blob");
    }
}

/// Push the blobs of the fan-out directory `dir` (`blobs/sha256/<2 hex>`, none when it is not
/// there) whose hex starts with `hex` onto `out`: files `<64 hex>.zst` or `.raw` whose first two
/// digits are the directory's. Temp files and strangers are skipped.
fn list_fanout_dir(dir: &Path, hex: &str, out: &mut Vec<Digest256>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Error::io("listing", dir, err)),
    };
    let fan = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    for entry in entries {
        let entry = entry.map_err(|err| Error::io("listing", dir, err))?;
        let name = entry.file_name();
        let Some(found) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".zst").or_else(|| n.strip_suffix(".raw")))
        else {
            continue;
        };
        if !found.starts_with(fan) || !found.starts_with(hex) {
            continue;
        }
        if let Ok(digest) = format!("sha256:{found}").parse::<Digest256>() {
            out.push(digest);
        }
    }
    Ok(())
}

/// The entries of `dir` named by 64 hex digits (a digest), with that digest; none when `dir`
/// does not exist. Temp files and anything else are skipped.
fn hex_entries(dir: &Path) -> Result<Vec<(PathBuf, Digest256)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::io("listing", dir, err)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|err| Error::io("listing", dir, err))?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.len() == 64) else {
            continue;
        };
        if let Ok(digest) = format!("sha256:{name}").parse::<Digest256>() {
            out.push((entry.path(), digest));
        }
    }
    Ok(out)
}

/// Create `path` (and missing parents) with mode 0700 whatever the umask, fsyncing the parent of
/// each directory created.
fn ensure_dir(path: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
                return Err(Error::io("creating directory", path, err));
            };
            ensure_dir(parent)?;
            match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(err) => return Err(Error::io("creating directory", path, err)),
            }
        }
        Err(err) => return Err(Error::io("creating directory", path, err)),
    }
    fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
        .map_err(|err| Error::io("setting the mode of", path, err))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Refuse a store that someone other than this user could change: see [`FsBlobStore::open`].
/// Remove `dir` and the directories under it, bottom up, as long as each is empty: anything
/// that holds a file stays, with the directories leading to it.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// What a store's root holds (the first writer creates them; a reader's lock creates `lock`;
/// a push keeps its upload sessions in `registry`).
const STORE_ENTRIES: [&str; 5] = ["blobs", "refs", "index", "lock", "registry"];

/// An existing directory is a store when it holds one of [`STORE_ENTRIES`], or nothing at all
/// (a store made and never written to, or a directory made for one): any other directory is a
/// mistyped path, which must not pass for an empty store nor get blobs written into it.
fn check_is_store(root: &Path) -> Result<()> {
    let entries = fs::read_dir(root).map_err(|err| Error::io("listing", root, err))?;
    let mut names = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(|err| Error::io("listing", root, err))?
            .file_name();
        if STORE_ENTRIES
            .iter()
            .any(|e| name == std::ffi::OsStr::new(e))
        {
            return Ok(());
        }
        // What mkfs leaves at the root of a file system made for the store.
        if name == std::ffi::OsStr::new("lost+found") {
            continue;
        }
        names.push(name.to_string_lossy().into_owned());
    }
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let mut found = names[..names.len().min(3)].join(", ");
    if names.len() > 3 {
        found.push_str(&format!(" and {} more", names.len() - 3));
    }
    Err(Error::NotAStore {
        root: root.to_owned(),
        found,
    })
}

fn check_private(root: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let me = nix::unistd::geteuid().as_raw();
    // `index/pages` holds the page index: derived data that restore never trusts (every page
    // is checked), but what decides which pages a freeze stores, so it is the owner's alone too.
    let dirs = [
        root.to_owned(),
        root.join("refs"),
        root.join("blobs"),
        root.join("index"),
        root.join("index/pages"),
        root.join("index/forward"),
    ];
    for path in dirs {
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound && path != root => continue,
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                return Err(unreachable_store(&path, err));
            }
            Err(err) => return Err(Error::io("reading metadata of", path, err)),
        };
        if meta.uid() != me {
            return Err(Error::StoreNotOwned {
                root: root.to_owned(),
                path,
                owner: meta.uid(),
                me,
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(Error::StoreWritableByOthers {
                root: root.to_owned(),
                path,
                mode,
            });
        }
    }
    Ok(())
}

/// The error for a store path this user may not reach: names the directory in the way.
fn unreachable_store(path: &Path, source: io::Error) -> Error {
    use std::os::unix::fs::MetadataExt as _;
    let me = nix::unistd::geteuid().as_raw();
    // The first directory on the way that does not let us search it.
    let blocked = path
        .ancestors()
        .skip(1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .filter(|dir| !dir.as_os_str().is_empty())
        .find(|dir| nix::unistd::access(*dir, nix::unistd::AccessFlags::X_OK).is_err())
        .unwrap_or(path);
    let (owner, mode) = match fs::metadata(blocked) {
        Ok(meta) => (meta.uid(), meta.mode() & 0o7777),
        Err(_) => (u32::MAX, 0),
    };
    Error::StoreUnreachable {
        path: path.to_owned(),
        blocked: blocked.to_owned(),
        owner,
        mode,
        me,
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| Error::io("syncing directory", dir, err))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn store() -> (tempfile::TempDir, FsBlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn an_empty_store_is_forgotten_unless_someone_holds_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new");
        let s = FsBlobStore::open(&root).unwrap();
        let held = s.writer_lock().unwrap();
        FsBlobStore::forget_if_empty(&root);
        assert!(root.join("lock").exists(), "a writer holds it: kept");
        drop(held);
        let d = s.put(b"kept").unwrap();
        FsBlobStore::forget_if_empty(&root);
        assert_eq!(s.get(&d).unwrap(), b"kept", "a blob keeps it");
        assert!(s.remove(&d).unwrap());
        FsBlobStore::forget_if_empty(&root);
        assert!(!root.exists(), "empty and unused: gone");
    }

    #[test]
    fn a_directory_that_holds_other_things_is_not_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        // Empty: a store made for the purpose (or never written to).
        FsBlobStore::open_existing(&root).unwrap();
        for name in ["src", "a.txt", "b.txt", "c.txt", "d.txt"] {
            fs::write(root.join(name), b"x").unwrap();
        }
        for open in [FsBlobStore::open, FsBlobStore::open_existing] {
            let err = open(&root).expect_err("not a store");
            assert!(
                matches!(&err, Error::NotAStore { root: r, .. } if *r == root),
                "{err}"
            );
            let said = err.to_string();
            assert!(
                said.contains("is not a pf store")
                    && said.contains("holds a.txt, b.txt, c.txt and 2 more but"),
                "{said}"
            );
        }
        assert!(!root.join("blobs").exists() && !root.join("lock").exists());
        // A file system made for the store holds lost+found: that alone is an empty store.
        let volume = dir.path().join("volume");
        fs::create_dir_all(volume.join("lost+found")).unwrap();
        fs::set_permissions(&volume, fs::Permissions::from_mode(0o700)).unwrap();
        FsBlobStore::open_existing(&volume).unwrap();
        // Any one of a store's own entries makes it one (a reader's lock file alone too, or a
        // push's upload sessions).
        let pushed = dir.path().join("pushed");
        fs::create_dir_all(pushed.join("registry/uploads")).unwrap();
        fs::set_permissions(&pushed, fs::Permissions::from_mode(0o700)).unwrap();
        FsBlobStore::open_existing(&pushed).unwrap();
        fs::write(root.join("lock"), b"").unwrap();
        fs::set_permissions(root.join("lock"), fs::Permissions::from_mode(0o600)).unwrap();
        FsBlobStore::open_existing(&root).unwrap();
        assert!(matches!(
            FsBlobStore::open(Path::new("")),
            Err(Error::EmptyStorePath)
        ));
    }

    #[test]
    fn opening_a_missing_store_to_read_it_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("typo").join("store");
        let err = FsBlobStore::open_existing(&root).expect_err("no store there");
        assert!(
            matches!(&err, Error::NoStore { root: r } if *r == root),
            "{err}"
        );
        assert!(
            err.to_string().contains("nothing was ever stored there"),
            "{err}"
        );
        assert!(!dir.path().join("typo").exists(), "a directory was created");
        // Once a writer made it, a reader opens it; a file where the store should be is refused.
        let s = FsBlobStore::open(&root).unwrap();
        let d = s.put(b"kept").unwrap();
        assert_eq!(
            FsBlobStore::open_existing(&root).unwrap().get(&d).unwrap(),
            b"kept"
        );
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(FsBlobStore::open_existing(&file).is_err());
    }

    #[test]
    fn small_blob_round_trip_and_layout() {
        let (_dir, s) = store();
        let d = s.put(b"hello").unwrap();
        assert_eq!(d, Digest256::of(b"hello"));
        let path = s.blob_path(&d);
        let hex = d.hex();
        assert!(path.ends_with(format!("blobs/sha256/{}/{hex}.zst", &hex[..2])));
        assert_eq!(
            zstd::decode_all(File::open(&path).unwrap()).unwrap(),
            b"hello"
        );
        assert_eq!(s.get(&d).unwrap(), b"hello");
        assert_eq!(s.raw_size(&d).unwrap(), 5);
        assert_eq!(
            s.stored_size(&d).unwrap(),
            fs::metadata(&path).unwrap().len()
        );
        assert_eq!(s.list().unwrap(), vec![d]);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(s.root()), 0o700);
    }

    #[test]
    fn large_raw_blobs_are_the_same_written_directly_or_through_the_cache() {
        for direct in [true, false] {
            let (_dir, s) = store();
            s.direct.store(direct, Ordering::Relaxed);
            for len in [
                DIRECT_MIN - 1,
                DIRECT_MIN,
                DIRECT_MIN + 1,
                2 * DIRECT_CHUNK + DIRECT_ALIGN - 1,
                3 * DIRECT_CHUNK + 17,
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
                // Unaligned in memory too: a slice one byte into a buffer.
                let mut shifted = vec![0u8; len + 1];
                shifted[1..].copy_from_slice(&data);
                let d = s.put_raw(&shifted[1..]).unwrap();
                assert_eq!(fs::read(s.blob_path(&d)).unwrap(), data, "{len} {direct}");
                // And aligned in memory: written straight from the caller's buffer. Where the
                // file system took the unaligned one directly, it takes this one directly too
                // (a failed direct write would turn direct I/O off for the store).
                let took_direct = s.direct.load(Ordering::Relaxed);
                let mut room = vec![0u8; len + DIRECT_ALIGN];
                let at = room.as_ptr().align_offset(DIRECT_ALIGN);
                let aligned = &mut room[at..at + len];
                aligned
                    .iter_mut()
                    .zip(&data)
                    .for_each(|(a, b)| *a = b ^ 0x33);
                let a = s.put_raw(aligned).unwrap();
                assert_eq!(
                    fs::read(s.blob_path(&a)).unwrap(),
                    aligned,
                    "{len} {direct}"
                );
                assert_eq!(
                    s.direct.load(Ordering::Relaxed),
                    took_direct,
                    "{len} {direct}"
                );
                let batch = s.batch().unwrap();
                let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
                let e = batch.put_raw(&other).unwrap();
                batch.commit().unwrap();
                assert_eq!(s.get(&e).unwrap(), other, "{len} {direct}");
            }
        }
    }

    #[test]
    fn raw_blobs_round_trip_and_read_at_any_offset() {
        let (_dir, s) = store();
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let d = s.put_raw(&data).unwrap();
        assert_eq!(d, Digest256::of(&data));
        let path = s.blob_path(&d);
        let hex = d.hex();
        assert!(path.ends_with(format!("blobs/sha256/{}/{hex}.raw", &hex[..2])));
        assert_eq!(fs::read(&path).unwrap(), data, "stored as it is");
        assert_eq!(mode(&path), 0o600);
        assert!(!s.path_of(&d, Encoding::Zstd).exists());
        assert_eq!(s.get(&d).unwrap(), data);
        let mut out = Vec::new();
        s.open(&d).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let mut out = Vec::new();
        assert_eq!(s.copy_to(&d, &mut out).unwrap(), data.len() as u64);
        assert_eq!(out, data);
        assert_eq!(s.raw_size(&d).unwrap(), data.len() as u64);
        assert_eq!(s.stored_size(&d).unwrap(), data.len() as u64);
        assert!(s.contains(&d).unwrap());
        assert!(s.modified(&d).unwrap().is_some());
        s.set_name("raw", &d).unwrap();
        // A compressed blob beside it: read_at reads both, short only at the end.
        let z = s.put(&data[..CHUNK + 5]).unwrap();
        assert!(s.blob_path(&z).to_string_lossy().ends_with(".zst"));
        assert_eq!(s.list().unwrap(), {
            let mut v = vec![d, z];
            v.sort();
            v
        });
        for (digest, len) in [(d, data.len()), (z, CHUNK + 5)] {
            for at in [0usize, CHUNK - 3, len - 4, len] {
                let mut buf = vec![0u8; 10];
                let n = s.read_at(&digest, at as u64, &mut buf).unwrap();
                assert_eq!(n, 10.min(len - at), "{digest} at {at}");
                assert_eq!(buf[..n], data[at..at + n], "{digest} at {at}");
            }
            let mut buf = [0u8; 4];
            assert_eq!(s.read_at(&digest, u64::MAX - 1, &mut buf).unwrap(), 0);
        }
        let missing = Digest256::of(b"missing");
        assert!(matches!(
            s.read_at(&missing, 0, &mut [0u8; 4]),
            Err(Error::NotFound { .. })
        ));
    }

    /// Item: reading a blob ahead reads its whole file, raw or compressed, changes nothing a
    /// read then sees, and names a blob the store does not have.
    #[test]
    fn blobs_are_read_ahead_whatever_their_encoding_and_a_missing_one_is_named() {
        let (_dir, s) = store();
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let raw = s.put_raw(&data).unwrap();
        let zst = s.put(b"compressed").unwrap();
        assert_eq!(s.prefetch(&raw).unwrap(), data.len() as u64);
        assert_eq!(s.prefetch(&zst).unwrap(), s.stored_size(&zst).unwrap());
        assert_eq!(s.get(&raw).unwrap(), data);
        assert_eq!(s.get(&zst).unwrap(), b"compressed");
        let missing = Digest256::of(b"never stored");
        assert!(matches!(
            s.prefetch(&missing),
            Err(Error::NotFound { digest }) if digest == missing
        ));
    }

    /// `get_parsed` hands out what the parse made only when the bytes match: a raw blob large
    /// enough to be hashed beside the parse, a small one, and a compressed one (read through
    /// `get`); a flipped byte is `Integrity`, though the parse saw nothing wrong.
    #[test]
    fn a_parse_while_hashing_is_kept_only_when_the_blob_matches() {
        let (_dir, s) = store();
        let parse = |bytes: &[u8]| {
            (
                bytes.len(),
                bytes.iter().map(|&b| u64::from(b)).sum::<u64>(),
            )
        };
        let large: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 253) as u8).collect();
        let small = vec![7u8; 10_000];
        for data in [&large, &small] {
            let d = s.put_raw(data).unwrap();
            assert_eq!(
                crate::get_parsed(&s, &d, parse).unwrap(),
                parse(data.as_slice())
            );
            let path = s.path_of(&d, Encoding::Raw);
            let mut bad = data.clone();
            bad[data.len() / 2] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            let mut parsed = false;
            let err = crate::get_parsed(&s, &d, |b| {
                parsed = true;
                parse(b)
            })
            .expect_err("a flipped byte");
            assert!(
                matches!(&err, Error::Integrity { digest, path: Some(p), .. } if *digest == d && *p == path),
                "{err:?}"
            );
            assert!(parsed || data.len() < crate::store::PARSE_WHILE_HASHING_MIN);
        }
        let zst = s.put(b"compressed, read through get").unwrap();
        assert_eq!(
            crate::get_parsed(&s, &zst, |b| b.to_vec()).unwrap(),
            b"compressed, read through get"
        );
        let missing = Digest256::of(b"never stored");
        assert!(matches!(
            crate::get_parsed(&s, &missing, |b| b.len()),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn raw_blobs_are_verified_repaired_and_removed_like_any_other() {
        let (_dir, s) = store();
        let data = vec![9u8; 10_000];
        let d = s.put_raw(&data).unwrap();
        let raw = s.path_of(&d, Encoding::Raw);
        let zst = s.path_of(&d, Encoding::Zstd);
        // A flipped byte: verified reads fail, read_at hands it out (its caller checks).
        let mut bad = data.clone();
        bad[5000] = 8;
        fs::write(&raw, &bad).unwrap();
        assert!(matches!(s.get(&d), Err(Error::Integrity { digest, .. }) if digest == d));
        assert!(matches!(
            s.copy_to(&d, &mut Vec::new()),
            Err(Error::Integrity { .. })
        ));
        let mut buf = [0u8; 1];
        s.read_at(&d, 5000, &mut buf).unwrap();
        assert_eq!(buf, [8]);
        // A compressed put of the same bytes repairs it, as a `.zst`, and the bad `.raw` goes.
        assert_eq!(s.put(&data).unwrap(), d);
        assert!(zst.exists() && !raw.exists());
        assert_eq!(s.get(&d).unwrap(), data);
        // A raw put of bytes already stored (either way) writes nothing.
        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&zst).unwrap());
        assert_eq!(s.put_raw(&data).unwrap(), d);
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&zst).unwrap()),
            ino
        );
        // A corrupt `.zst` is repaired by a raw put, which leaves only the `.raw`.
        fs::write(&zst, zstd::encode_all(&bad[..], 1).unwrap()).unwrap();
        assert_eq!(s.put_raw(&data).unwrap(), d);
        assert!(raw.exists() && !zst.exists());
        assert_eq!(s.get(&d).unwrap(), data);
        // Both files at once (a put was changing the encoding): listed once, read from `.raw`,
        // both removed.
        fs::write(&zst, zstd::encode_all(&data[..], 1).unwrap()).unwrap();
        assert_eq!(s.list().unwrap(), vec![d]);
        assert_eq!(s.blob_path(&d), raw);
        assert!(s.remove(&d).unwrap());
        assert!(!raw.exists() && !zst.exists());
        assert!(!s.contains(&d).unwrap());
        assert!(!s.remove(&d).unwrap());
        // gc removes an unnamed raw blob and keeps a named one.
        let kept = s.put_raw(b"kept").unwrap();
        let dropped = s.put_raw(b"dropped").unwrap();
        s.set_name("kept", &kept).unwrap();
        let report = crate::gc(
            &s,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .unwrap();
        assert_eq!(
            report.removed.iter().map(|b| b.digest).collect::<Vec<_>>(),
            vec![dropped]
        );
        assert_eq!(s.list().unwrap(), vec![kept]);
    }

    /// Temp files in the store's blob directory (none when it does not exist yet).
    fn temp_files(s: &FsBlobStore) -> usize {
        fs::read_dir(s.root().join("blobs/sha256")).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(TEMP_PREFIX)
            })
            .count()
        })
    }

    #[test]
    fn a_batch_is_invisible_until_committed_and_gone_if_dropped() {
        let (_dir, s) = store();
        let old = s.put(b"already here").unwrap();
        let batch = s.batch().unwrap();
        let raw = batch.put_raw(&[5u8; 100_000]).unwrap();
        let zst = batch.put(b"a manifest").unwrap();
        assert_eq!(batch.put(b"already here").unwrap(), old);
        assert_eq!(
            batch.put_raw(&[5u8; 100_000]).unwrap(),
            raw,
            "twice in one batch"
        );
        assert!(!s.contains(&raw).unwrap() && !s.contains(&zst).unwrap());
        assert_eq!(s.list().unwrap(), vec![old]);
        assert!(matches!(s.get(&raw), Err(Error::NotFound { .. })));
        // Its temp files belong to a live writer: a sweep leaves them.
        let temps = || temp_files(&s);
        assert_eq!(temps(), 2);
        assert!(s.sweep_temp(&GcOptions::dry_run_now()).unwrap().is_empty());
        batch.commit().unwrap();
        assert_eq!(temps(), 0);
        assert_eq!(s.get(&raw).unwrap(), vec![5u8; 100_000]);
        assert!(s.blob_path(&raw).to_string_lossy().ends_with(".raw"));
        assert_eq!(s.get(&zst).unwrap(), b"a manifest");
        assert!(s.blob_path(&zst).to_string_lossy().ends_with(".zst"));
        assert_eq!(mode(&s.blob_path(&raw)), 0o600);
        // Dropped uncommitted: nothing visible, nothing left.
        let batch = s.batch().unwrap();
        let lost = batch.put_raw(b"never named").unwrap();
        drop(batch);
        assert!(!s.contains(&lost).unwrap());
        assert_eq!(temps(), 0);
        assert_eq!(s.list().unwrap().len(), 3);
    }

    #[test]
    fn a_large_raw_put_written_while_named_leaves_one_blob_and_no_temp_file() {
        let (_dir, s) = store();
        let temps = || temp_files(&s);
        // Not a multiple of 4 KiB: a direct head and a buffered tail.
        let pack: Vec<u8> = (0..(DIRECT_MIN + 5000) as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let batch = s.batch().unwrap();
        let digest = batch.put_raw(&pack).unwrap();
        assert_eq!(digest, Digest256::of(&pack));
        assert_eq!(batch.put_raw(&pack).unwrap(), digest, "twice in one batch");
        assert_eq!(temps(), 1, "the second copy's temp file is removed");
        batch.commit().unwrap();
        assert_eq!(temps(), 0);
        assert_eq!(s.get(&digest).unwrap(), pack);
        // Put again by a later batch: the store holds it, nothing is staged or left.
        let batch = s.batch().unwrap();
        assert_eq!(batch.put_raw(&pack).unwrap(), digest);
        assert_eq!(temps(), 0);
        batch.commit().unwrap();
        assert_eq!(s.get(&digest).unwrap(), pack);
        assert_eq!(s.list().unwrap(), vec![digest]);
    }

    #[test]
    fn put_twice_is_one_blob() {
        let (_dir, s) = store();
        let a = s.put(b"same").unwrap();
        let b = s.put_reader(&mut &b"same"[..]).unwrap();
        assert_eq!(b, Put { digest: a, size: 4 });
        assert_eq!(s.list().unwrap(), vec![a]);
        assert!(s.sweep_temp(&GcOptions::dry_run_now()).unwrap().is_empty());
    }

    #[test]
    fn empty_blob() {
        let (_dir, s) = store();
        let p = s.put_reader(&mut io::empty()).unwrap();
        assert_eq!(p.digest, Digest256::of(b""));
        assert_eq!(p.size, 0);
        assert_eq!(s.get(&p.digest).unwrap(), b"");
        assert_eq!(s.raw_size(&p.digest).unwrap(), 0);
    }

    #[test]
    fn streamed_blob_of_unknown_length_round_trips() {
        let (_dir, s) = store();
        // Past the first chunk, so the frame has no content size and sizes come from decoding.
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let p = s.put_reader(&mut &data[..]).unwrap();
        assert_eq!(p.size, data.len() as u64);
        assert_eq!(s.raw_size(&p.digest).unwrap(), data.len() as u64);
        assert_eq!(s.get(&p.digest).unwrap(), data);
    }

    #[test]
    fn announced_length_is_checked() {
        let (_dir, s) = store();
        let err = s.put_reader_with_len(&mut &b"abc"[..], 4).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InputLength {
                    expected: 4,
                    actual: 3
                }
            ),
            "{err:?}"
        );
        let err = s.put_reader_with_len(&mut &b"abcde"[..], 4).unwrap_err();
        assert!(
            matches!(err, Error::InputLength { expected: 4, .. }),
            "{err:?}"
        );
        assert!(s.list().unwrap().is_empty());
        assert!(s.sweep_temp(&GcOptions::dry_run_now()).unwrap().is_empty());
        let p = s.put_reader_with_len(&mut &b"abcd"[..], 4).unwrap();
        assert_eq!(s.raw_size(&p.digest).unwrap(), 4);
    }

    #[test]
    fn flipped_byte_is_detected() {
        let (_dir, s) = store();
        let d = s.put(&[7u8; 1000]).unwrap();
        let path = s.blob_path(&d);
        // Rewrite the file as a valid frame of other bytes: only the digest check can tell.
        let mut other = vec![7u8; 1000];
        other[500] = 8;
        fs::write(&path, zstd::encode_all(&other[..], 1).unwrap()).unwrap();
        let err = s.get(&d).unwrap_err();
        assert!(
            matches!(err, Error::Integrity { digest, .. } if digest == d),
            "{err:?}"
        );
        let mut out = Vec::new();
        let err = s.open(&d).unwrap().read_to_end(&mut out).unwrap_err();
        assert!(
            matches!(Error::from_read_error(&err), Some(Error::Integrity { digest, .. }) if *digest == d),
            "{err:?}"
        );
    }

    #[test]
    fn names_round_trip_atomically() {
        let (_dir, s) = store();
        let d = s.put(b"x").unwrap();
        s.set_name("snap", &d).unwrap();
        assert_eq!(s.get_name("snap").unwrap(), d);
        assert_eq!(
            fs::read_to_string(s.root().join("refs/snap")).unwrap(),
            format!("{d}\n")
        );
        assert_eq!(mode(&s.root().join("refs/snap")), 0o600);
        assert_eq!(mode(&s.root().join("refs")), 0o700);
        let e = s.put(b"y").unwrap();
        s.set_name("snap", &e).unwrap();
        assert_eq!(s.names().unwrap(), vec![("snap".to_owned(), e)]);
        assert!(matches!(
            s.set_name("other", &Digest256::of(b"missing")),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            s.set_name("../x", &d),
            Err(Error::InvalidName { .. })
        ));
        assert!(s.remove_name("snap").unwrap());
        assert!(!s.remove_name("snap").unwrap());
        assert!(matches!(
            s.get_name("snap"),
            Err(Error::NameNotFound { .. })
        ));
    }

    #[test]
    fn corrupt_ref_is_reported() {
        let (_dir, s) = store();
        let d = s.put(b"x").unwrap();
        s.set_name("snap", &d).unwrap();
        fs::write(s.root().join("refs/snap"), "sha256:nothex\n").unwrap();
        assert!(matches!(s.get_name("snap"), Err(Error::CorruptName { .. })));
        assert!(matches!(s.names(), Err(Error::CorruptName { .. })));
    }

    #[test]
    fn a_corrupt_ref_hides_no_other_name_from_names_or_errors() {
        let (_dir, s) = store();
        let d = s.put(b"x").unwrap();
        s.set_name("a", &d).unwrap();
        s.set_name("z", &d).unwrap();
        fs::write(s.root().join("refs/junk"), "garbage\n").unwrap();
        let got = s.names_or_errors().unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "junk", "z"]);
        assert_eq!(*got[0].1.as_ref().unwrap(), d);
        assert!(
            matches!(&got[1].1, Err(Error::CorruptName { name, .. }) if name == "junk"),
            "{:?}",
            got[1].1
        );
        assert_eq!(*got[2].1.as_ref().unwrap(), d);
        // gc's strict listing still refuses: it must not mark without the bad name's blob.
        assert!(matches!(s.names(), Err(Error::CorruptName { .. })));
        let gc = crate::gc(
            &s,
            &crate::GcOptions {
                dry_run: false,
                grace: std::time::Duration::ZERO,
            },
        );
        assert!(matches!(gc, Err(Error::CorruptName { .. })), "{gc:?}");
        assert!(s.contains(&d).unwrap());
    }

    #[test]
    fn list_ignores_strangers() {
        let (_dir, s) = store();
        let d = s.put(b"x").unwrap();
        let fan = s.blob_path(&d).parent().unwrap().to_owned();
        fs::write(fan.join(".tmp-1-2-3"), b"").unwrap();
        fs::write(fan.join("README"), b"").unwrap();
        // A valid digest file in the wrong fan-out directory is not listed.
        let wrong = s.root().join("blobs/sha256/zz");
        fs::create_dir_all(&wrong).unwrap();
        fs::write(
            wrong.join(format!("{}.zst", Digest256::of(b"y").hex())),
            b"",
        )
        .unwrap();
        assert_eq!(s.list().unwrap(), vec![d]);
    }

    #[test]
    fn temp_files_of_dead_writers_are_swept_and_live_ones_kept() {
        let (_dir, s) = store();
        s.put(b"x").unwrap();
        let blobs = s.root().join("blobs/sha256");
        // pid 0 is never a process: its writer is gone.
        let dead = blobs.join(".tmp-0-1-00");
        fs::write(&dead, b"half a blob").unwrap();
        // A live writer: our own pid, and we hold the lock.
        let live = blobs.join(format!(".tmp-{}-999-00", std::process::id()));
        let held = File::create(&live).unwrap();
        held.lock().unwrap();
        assert_eq!(
            s.sweep_temp(&GcOptions::dry_run_now()).unwrap(),
            vec![dead.clone()]
        );
        assert!(dead.exists());
        let swept = s
            .sweep_temp(&GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            })
            .unwrap();
        assert_eq!(swept, vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(live.exists());
        // Unlocked but its writer (us) alive and the file fresh: still kept.
        drop(held);
        assert!(s.sweep_temp(&GcOptions::dry_run_now()).unwrap().is_empty());
        // Page index runs: a dead writer's and one named as before are swept, ours kept.
        let pages = s.root().join("index/pages");
        fs::create_dir_all(&pages).unwrap();
        let dead = pages.join(".tmp-0-run-0");
        let old = pages.join(".tmp-run-0-0");
        let live = pages.join(format!(".tmp-{}-run-0", std::process::id()));
        for path in [&dead, &old, &live] {
            fs::write(path, b"half a run").unwrap();
        }
        assert_eq!(
            s.sweep_temp(&GcOptions::dry_run_now()).unwrap(),
            vec![dead, old]
        );
    }

    #[test]
    fn temp_names_are_unique_and_carry_the_pid() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert_eq!(temp_pid(&a), Some(std::process::id()));
        assert_eq!(temp_pid(".tmp-x-1"), None);
    }

    #[test]
    fn store_root_that_is_a_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = FsBlobStore::open(&file).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, .. } if *path == file),
            "{err:?}"
        );
        let err = FsBlobStore::open(&file.join("store")).unwrap_err();
        assert!(
            err.to_string()
                .contains(&file.join("store").display().to_string()),
            "{err}"
        );
    }
}
