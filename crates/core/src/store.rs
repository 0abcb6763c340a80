//! The [`BlobStore`] trait: blobs by digest, and names (refs) that point at them.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use crate::digest::{Digest256, DigestHasher};
use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::gc::GcOptions;
use crate::lock::StoreLock;
use crate::page_index::PageIndex;

/// What a streaming put stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// The digest of the raw bytes.
    pub digest: Digest256,
    /// How many raw bytes were read.
    pub size: u64,
}

/// A content-addressed store of immutable blobs, plus names (refs) that point at blobs.
///
/// Every read is verified: bytes that do not hash to their digest are an [`Error::Integrity`],
/// distinct from [`Error::NotFound`].
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Store `bytes`; storing a blob that is already there succeeds.
    fn put(&self, bytes: &[u8]) -> Result<Digest256>;

    /// Store everything `reader` yields, streaming: memory stays flat whatever the size.
    fn put_reader(&self, reader: &mut dyn Read) -> Result<Put>;

    /// The whole blob, verified.
    fn get(&self, digest: &Digest256) -> Result<Vec<u8>>;

    /// A reader over the blob's raw bytes that hashes while it reads and fails with
    /// [`Error::Integrity`] (as an `io::Error` of kind `InvalidData` wrapping it) at EOF when the
    /// bytes do not match.
    fn open(&self, digest: &Digest256) -> Result<Box<dyn Read + Send>>;

    /// Whether the blob is present (not verified).
    fn contains(&self, digest: &Digest256) -> Result<bool>;

    /// Remove the blob; `Ok(false)` when it was not there.
    fn remove(&self, digest: &Digest256) -> Result<bool>;

    /// Every digest in the store, sorted.
    fn list(&self) -> Result<Vec<Digest256>>;

    /// Bytes the blob takes in the store (compressed size on disk for `FsBlobStore`).
    fn stored_size(&self, digest: &Digest256) -> Result<u64>;

    /// Point `name` at `digest` (atomically replacing an old target). The blob must exist.
    fn set_name(&self, name: &str, digest: &Digest256) -> Result<()>;

    /// The digest `name` points at.
    fn get_name(&self, name: &str) -> Result<Digest256>;

    /// Every name with its digest, sorted by name. One name whose ref cannot be read fails the
    /// whole call: this is what [`gc`](crate::gc()) marks from, and gc must not run while a name
    /// it cannot read may be keeping a blob alive.
    fn names(&self) -> Result<Vec<(String, Digest256)>>;

    /// Every name with its digest or why its ref cannot be read, sorted by name: what a listing
    /// or a check shows, so that one bad ref file hides no other name and can itself be named
    /// with its fix. Fails only when the names cannot be listed at all.
    fn names_or_errors(&self) -> Result<Vec<(String, Result<Digest256>)>> {
        Ok(self
            .names()?
            .into_iter()
            .map(|(name, digest)| (name, Ok(digest)))
            .collect())
    }

    /// Remove `name`; `Ok(false)` when it did not exist.
    fn remove_name(&self, name: &str) -> Result<bool>;

    /// Take the store's lock shared, as a writer: hold it from before the first blob you store
    /// until the name that keeps them is written (or you give up). [`gc`](crate::gc()) takes it
    /// exclusively ([`gc_lock`](Self::gc_lock)) for its mark and sweep, so it never removes a
    /// blob between its put and its name, whatever its grace period. Writers do not exclude each
    /// other, and a writer may take it again while it holds it. Blocks while a gc holds it.
    /// A store that cannot be written (a read-only mount) is [`Error::StoreNotWritable`] here,
    /// before the writer's work begins.
    fn writer_lock(&self) -> Result<StoreLock>;

    /// Take a share of the store's lock as a reader whose blobs must not go while it reads them
    /// (a thaw, a lazily thawed tree whose pages are still served), without waiting: while it
    /// is held, [`gc`](crate::gc()) waits for it as for a writer. `None` while a gc holds the
    /// lock (the reader goes on without it: gc chose what stays from the names it read before
    /// the reader began) or where the lock cannot be taken at all (a store on a read-only
    /// filesystem): a reader is never kept waiting, nor refused, for the sake of the lock.
    fn reader_lock(&self) -> Option<StoreLock>;

    /// Take a share of the store's lock as a reader that will wait for it (a restore that found
    /// a gc running, a lazily thawed tree that must keep its packs): blocks while a gc holds the
    /// lock, like [`writer_lock`](Self::writer_lock), but asks nothing of the store a reader
    /// does not need (a store on a read-only mount can be waited on, unlike written to). Fails
    /// where the lock cannot be taken at all.
    fn reader_lock_wait(&self) -> Result<StoreLock> {
        self.writer_lock()
    }

    /// Take the store's lock exclusively, as [`gc`](crate::gc()) does: wait until no writer
    /// holds it, and keep new writers out until the returned lock is dropped.
    fn gc_lock(&self) -> Result<StoreLock>;

    /// The digest `reference` stands for, read the way a user types it:
    ///
    /// - a digest, `sha256:` and 64 lowercase hex digits (or the 64 digits alone): taken as it
    ///   is, without looking at the store (reading the blob says whether it is there);
    /// - a prefix of one, `sha256:` and at least [`PREFIX_MIN_HEX`] hex digits: the one blob in
    ///   the store whose digest starts so, else [`Error::PrefixNotFound`] or
    ///   [`Error::AmbiguousPrefix`] (naming a few of the blobs, those names point at first);
    ///   fewer digits are [`Error::PrefixTooShort`];
    /// - a name; when no name is spelled so and it is at least [`BARE_PREFIX_MIN_HEX`] lowercase
    ///   hex digits, a prefix of a digest as above. A name that exists always wins over a bare
    ///   prefix: a user who tagged a snapshot `20240601` gets that snapshot.
    ///
    /// A prefix lists only the blobs that may match ([`list_prefixed`](Self::list_prefixed)).
    fn resolve(&self, reference: &str) -> Result<Digest256> {
        match Reference::parse(reference)? {
            Reference::Digest(digest) => Ok(digest),
            Reference::Prefix(hex) => resolve_prefix(self, reference, hex, false),
            Reference::Name { name, prefix } => match (self.get_name(name), prefix) {
                (Err(Error::NameNotFound { .. }), Some(hex)) => {
                    resolve_prefix(self, reference, hex, true)
                }
                (named, _) => named,
            },
        }
    }

    /// The blobs whose digest's hex starts with `hex`, sorted: none when `hex` is not all
    /// lowercase hex digits. The default filters [`list`](Self::list); `FsBlobStore` lists the
    /// one fan-out directory of the first two digits.
    fn list_prefixed(&self, hex: &str) -> Result<Vec<Digest256>> {
        if !is_lower_hex(hex) {
            return Ok(Vec::new());
        }
        let mut found = self.list()?;
        found.retain(|d| d.hex().starts_with(hex));
        Ok(found)
    }

    /// Like [`put_reader`](Self::put_reader), for a caller that knows how many bytes `reader`
    /// will yield: a store may record the size up front (`FsBlobStore` writes it into the zstd
    /// frame header, so `raw_size` needs no decoding). A reader that yields another count is an
    /// [`Error::InputLength`], and nothing is stored.
    fn put_reader_with_len(&self, reader: &mut dyn Read, len: u64) -> Result<Put> {
        let mut checked = ExactLen::new(reader, len);
        self.put_reader(&mut checked).map_err(|err| match err {
            Error::Input { source } => Error::from_read(source, |source| Error::Input { source }),
            other => other,
        })
    }

    /// Like [`put_reader_with_len`](Self::put_reader_with_len), for bytes that must hash to
    /// `expected` (a blob fetched from elsewhere under that digest): bytes that hash to anything
    /// else are an [`Error::Integrity`] naming `expected`, and nothing is stored. The check runs
    /// when the reader reaches its end, before the store commits the blob.
    fn put_reader_expecting(
        &self,
        reader: &mut dyn Read,
        len: u64,
        expected: &Digest256,
    ) -> Result<Put> {
        let mut checked = Expecting {
            inner: reader,
            hasher: Some(DigestHasher::new()),
            expected: *expected,
        };
        self.put_reader_with_len(&mut checked, len)
            .map_err(|err| match err {
                Error::Input { source } => {
                    Error::from_read(source, |source| Error::Input { source })
                }
                other => other,
            })
    }

    /// Write the blob's raw bytes to `out`, verifying them, and return how many were written.
    ///
    /// The bytes stream: a failed check ([`Error::Integrity`], [`Error::Decode`]) comes after
    /// they were written, so the caller must then discard its output. A failure of `out` itself
    /// is an [`Error::Output`]. Stores may override this to skip the copy through a `Read` buffer.
    fn copy_to(&self, digest: &Digest256, out: &mut dyn Write) -> Result<u64> {
        copy_reader(&mut *self.open(digest)?, digest, out)
    }

    /// The blob's raw (uncompressed) size. The default reads the whole blob, verifying it.
    fn raw_size(&self, digest: &Digest256) -> Result<u64> {
        let mut reader = self.open(digest)?;
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|err| {
            Error::from_read(err, |source| Error::Read {
                digest: *digest,
                source,
            })
        })
    }

    /// Store `bytes`, which are already compressed (a [pack](crate::pack) of zstd frames), so
    /// that [`read_at`](Self::read_at) is a plain positional read: `FsBlobStore` keeps them
    /// uncompressed on disk (`<hex>.raw`) instead of in a zstd frame. Everything else about the
    /// blob is as [`put`](Self::put): same digest, verified reads, a put over a corrupt copy
    /// repairs it. Stores with one encoding just [`put`](Self::put).
    fn put_raw(&self, bytes: &[u8]) -> Result<Digest256> {
        self.put(bytes)
    }

    /// Read up to `buf.len()` of the blob's raw bytes from `offset` into `buf`; returns how many
    /// were read, fewer only at the end of the blob (0 at or past it).
    ///
    /// **The bytes are NOT verified.** Nothing here hashes the blob: a corrupted file yields
    /// wrong bytes without an error. Only callers that check what they read against digests of
    /// their own may use this, as [`pages::PagesReader`](crate::pages::PagesReader) does (every
    /// page carries its own SHA-256 in a page list that is itself verified whole). Anything
    /// else reads with [`get`](Self::get), [`open`](Self::open) or [`copy_to`](Self::copy_to).
    ///
    /// Cheap on a blob stored with [`put_raw`](Self::put_raw) (`FsBlobStore`: one `pread`); on
    /// a compressed blob it decodes from the start and skips to `offset` (correct, slower).
    fn read_at(&self, digest: &Digest256, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut reader = self.open(digest)?;
        let read_error = |err| {
            Error::from_read(err, |source| Error::Read {
                digest: *digest,
                source,
            })
        };
        // `open` verifies only at the end of the blob: skipping and reading part of it never
        // reaches that check (and must not: the caller verifies what it reads).
        let skipped = std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
            .map_err(read_error)?;
        if skipped < offset {
            return Ok(0);
        }
        read_full(&mut reader, buf).map_err(read_error)
    }

    /// The whole blob's bytes as stored, with the file they came from, where this store keeps
    /// them as they are (`FsBlobStore`: a blob stored with [`put_raw`](Self::put_raw));
    /// `None` otherwise.
    ///
    /// **The bytes are NOT verified.** Only [`get_parsed`] calls this, and it hashes them while
    /// its caller parses them, returning what the caller made of them only once they match.
    fn read_unchecked(&self, _digest: &Digest256) -> Result<Option<(Vec<u8>, Option<PathBuf>)>> {
        Ok(None)
    }

    /// Start a batch of puts that are made durable and visible together, with one sync round
    /// instead of one per blob ([`BlobBatch::commit`]). Until then the blobs are in no
    /// listing, no `contains` and no read; dropping the batch uncommitted removes them. Stores
    /// with nothing to sync write through (each put is visible at once).
    fn batch(&self) -> Result<Box<dyn BlobBatch + '_>> {
        Ok(Box::new(WriteThrough { store: self }))
    }

    /// Whether [`read_at`](Self::read_at) of this blob is a cheap positional read (`true`) or
    /// decodes the blob from its start (`false`, the default). Readers of many small parts of
    /// a blob that is not seekable read it whole instead.
    fn seekable(&self, digest: &Digest256) -> Result<bool> {
        let _ = digest;
        Ok(false)
    }

    /// Bring the blob's stored bytes into memory ahead of the reads that will want them (for
    /// `FsBlobStore`, into the page cache, without copying them anywhere). A hint: nothing is
    /// read or verified for the caller, and a store that has no such cache does nothing (the
    /// default). Readers that know the order they will need many blobs in call this a little
    /// ahead of themselves, so that reading from a cold disk overlaps their work.
    /// Returns how many bytes were read ahead (0 for a store that does nothing).
    fn prefetch(&self, digest: &Digest256) -> Result<u64> {
        let _ = digest;
        Ok(0)
    }

    /// When the blob was last stored (written, or put again while already present), if the
    /// store keeps such times. `gc` spares unreachable blobs younger than its grace period.
    fn modified(&self, digest: &Digest256) -> Result<Option<SystemTime>> {
        let _ = digest;
        Ok(None)
    }

    /// Where this store keeps a hint of kind `kind` about the blob `key` (for example which
    /// pages of a snapshot a thawed process touched first), or `None` when it keeps none. Hints
    /// are derived data, private to the store's owner, and never trusted: they may steer how
    /// work is done (which pages to load first), never which bytes are used.
    fn hint_path(&self, kind: &str, key: &Digest256) -> Option<PathBuf> {
        let _ = (kind, key);
        None
    }

    /// The store's page index (which pages its packs hold; see [`crate::page_index`]). Stores
    /// that keep none answer [`PageIndex::none`]: page writers then deduplicate only within
    /// their own session.
    fn page_index(&self) -> PageIndex {
        PageIndex::none()
    }

    /// The packs `pack` is forwarded to (its [forward records](crate::forward)), sorted.
    fn forwards_of(&self, pack: &Digest256) -> Result<Vec<Digest256>>;

    /// Record durably that the live pages of `forward.pack` are in `forward.to` (kept besides
    /// any other record of the same pack). Done before the old pack is removed.
    fn add_forward(&self, forward: &Forward) -> Result<()>;

    /// Remove one forward record; false when there was none.
    fn remove_forward(&self, forward: &Forward) -> Result<bool>;

    /// Every forward record, sorted.
    fn forwards(&self) -> Result<Vec<Forward>>;

    /// Remove (or with `dry_run`, only list) temp files left behind by writers that died
    /// mid-put. Stores without temp files have nothing to do.
    fn sweep_temp(&self, options: &GcOptions) -> Result<Vec<PathBuf>> {
        let _ = options;
        Ok(Vec::new())
    }
}

/// Puts that become durable and visible together: see [`BlobStore::batch`].
///
/// A writer that must not name a blob before it is safely stored puts its blobs here, commits,
/// and only then puts what names them. A crash before the commit leaves none of the batch
/// visible (only temp files, which [`BlobStore::sweep_temp`] removes).
pub trait BlobBatch: Send + Sync + std::fmt::Debug {
    /// Like [`BlobStore::put`], visible when the batch is committed.
    fn put(&self, bytes: &[u8]) -> Result<Digest256>;

    /// Like [`BlobStore::put_raw`], visible when the batch is committed.
    fn put_raw(&self, bytes: &[u8]) -> Result<Digest256>;

    /// Make every blob of the batch durable, then visible. On an error, none of the blobs not
    /// yet visible becomes so.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// The batch of a store that has nothing to sync: every put goes straight to the store.
#[derive(Debug)]
struct WriteThrough<'s, S: ?Sized> {
    store: &'s S,
}

impl<S: BlobStore + ?Sized> BlobBatch for WriteThrough<'_, S> {
    fn put(&self, bytes: &[u8]) -> Result<Digest256> {
        self.store.put(bytes)
    }

    fn put_raw(&self, bytes: &[u8]) -> Result<Digest256> {
        self.store.put_raw(bytes)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Copy a blob reader from [`BlobStore::open`] to `out`, for [`BlobStore::copy_to`].
pub(crate) fn copy_reader(
    reader: &mut dyn Read,
    digest: &Digest256,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(Error::from_read(err, |source| Error::Read {
                    digest: *digest,
                    source,
                }));
            }
        };
        write_out(out, &buf[..n], digest)?;
        written += n as u64;
    }
    out.flush().map_err(|source| Error::Output {
        digest: *digest,
        source,
    })?;
    Ok(written)
}

/// Read until `buf` is full or the reader ends; returns how many bytes were read.
pub(crate) fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// Largest single `write` to a file. Measured on the 6.18 kernel here (ext4, 2 cores with 1 MiB
/// of L2 each): writing 1 GiB in 1 MiB writes took 1-2.5 s of system time, in 128 KiB writes
/// 0.4 s; 256 KiB was as good, 512 KiB already slow.
pub(crate) const WRITE_SLICE: usize = 128 * 1024;

/// Write `bytes` to the caller's output in slices of at most [`WRITE_SLICE`].
pub(crate) fn write_out(out: &mut dyn Write, bytes: &[u8], digest: &Digest256) -> Result<()> {
    for slice in bytes.chunks(WRITE_SLICE) {
        out.write_all(slice).map_err(|source| Error::Output {
            digest: *digest,
            source,
        })?;
    }
    Ok(())
}

/// A reader that hashes what it yields and, at its end, fails with [`Error::Integrity`] (wrapped
/// in an `io::Error`) when that is not `expected`.
struct Expecting<'a> {
    inner: &'a mut dyn Read,
    hasher: Option<DigestHasher>,
    expected: Digest256,
}

impl Read for Expecting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(hasher) = self.hasher.as_mut() {
                hasher.update(&buf[..n]);
            }
            return Ok(n);
        }
        if let Some(hasher) = self.hasher.take() {
            let actual = hasher.finish();
            if actual != self.expected {
                return Err(Error::Integrity {
                    digest: self.expected,
                    actual,
                    path: None,
                }
                .into_read_error());
            }
        }
        Ok(0)
    }
}

/// A reader that fails with [`Error::InputLength`] (wrapped in an `io::Error`) when its inner
/// reader yields more or fewer than `expected` bytes. The bytes past `expected` are never
/// returned.
pub(crate) struct ExactLen<R> {
    inner: R,
    expected: u64,
    seen: u64,
}

impl<R: Read> ExactLen<R> {
    pub(crate) fn new(inner: R, expected: u64) -> Self {
        Self {
            inner,
            expected,
            seen: 0,
        }
    }
}

impl<R: Read> Read for ExactLen<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > self.expected || (n == 0 && self.seen < self.expected) {
            return Err(Error::InputLength {
                expected: self.expected,
                actual: self.seen,
            }
            .into_read_error());
        }
        Ok(n)
    }
}

/// Blobs from this many bytes are hashed on a thread of their own while [`get_parsed`]'s caller
/// parses them (a 1 GiB goblin's page list is 10 MiB: about 6 ms of SHA-256).
pub(crate) const PARSE_WHILE_HASHING_MIN: usize = 1 << 20;

/// What `parse` makes of the blob's bytes, returned only once the bytes hash to `digest`; when
/// they do not, the error is [`Error::Integrity`], whatever `parse` said. Where the store keeps
/// the blob as it is ([`BlobStore::read_unchecked`]), a large one is hashed on another thread
/// while `parse` runs, instead of before; elsewhere this is [`BlobStore::get`] then `parse`.
pub fn get_parsed<T>(
    store: &dyn BlobStore,
    digest: &Digest256,
    parse: impl FnOnce(&[u8]) -> T,
) -> Result<T> {
    let Some((bytes, path)) = store.read_unchecked(digest)? else {
        let bytes = store.get(digest)?;
        return Ok(parse(&bytes));
    };
    let (actual, parsed) = if bytes.len() >= PARSE_WHILE_HASHING_MIN {
        std::thread::scope(|s| {
            let hashing = std::thread::Builder::new()
                .name("pf-hash".to_owned())
                .spawn_scoped(s, || Digest256::of(&bytes));
            let parsed = parse(&bytes);
            let actual = match hashing {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(_) => Digest256::of(&bytes),
            };
            (actual, parsed)
        })
    } else {
        let actual = Digest256::of(&bytes);
        if actual != *digest {
            return Err(Error::Integrity {
                digest: *digest,
                actual,
                path,
            });
        }
        (actual, parse(&bytes))
    };
    if actual != *digest {
        return Err(Error::Integrity {
            digest: *digest,
            actual,
            path,
        });
    }
    Ok(parsed)
}

/// Fewest hex digits a digest prefix written with `sha256:` may have (`sha256:3f2a`), as git
/// asks of an abbreviated object name.
pub const PREFIX_MIN_HEX: usize = 4;

/// Fewest hex digits a digest prefix written without `sha256:` may have (`3f2a9c01`). Such a
/// string is also a legal name, which wins when it exists; when it does not, a short string of
/// hex digits is likelier a mistyped name (`2024`, `cafe`) than a digest: with 10 000 blobs, 4
/// digits would match some blob 15% of the time, 8 digits once in 400 000.
pub const BARE_PREFIX_MIN_HEX: usize = 8;

/// Candidates an [`Error::AmbiguousPrefix`] names.
const AMBIGUOUS_SHOWN: usize = 5;

/// Hex digits an [`Error::AmbiguousPrefix`] shows of each candidate, at least.
const AMBIGUOUS_DIGITS: usize = 12;

/// How [`BlobStore::resolve`] reads a reference, before it looks at the store.
#[derive(Debug, PartialEq, Eq)]
enum Reference<'a> {
    /// A whole digest.
    Digest(Digest256),
    /// `sha256:` and fewer than 64 hex digits (these, without `sha256:`).
    Prefix(&'a str),
    /// Anything else: a name, and when it is long enough and all hex, a bare digest prefix too.
    Name {
        name: &'a str,
        prefix: Option<&'a str>,
    },
}

impl<'a> Reference<'a> {
    fn parse(text: &'a str) -> Result<Self> {
        if let Some(hex) = text.strip_prefix("sha256:") {
            if !hex.is_empty() && hex.len() < 64 && is_lower_hex(hex) {
                if hex.len() < PREFIX_MIN_HEX {
                    return Err(Error::PrefixTooShort {
                        prefix: text.to_owned(),
                        min: PREFIX_MIN_HEX,
                    });
                }
                return Ok(Self::Prefix(hex));
            }
            return Ok(Self::Digest(text.parse()?));
        }
        if text.len() == 64 && is_lower_hex(text) {
            return Ok(Self::Digest(format!("sha256:{text}").parse()?));
        }
        let prefix = (text.len() >= BARE_PREFIX_MIN_HEX && is_lower_hex(text)).then_some(text);
        Ok(Self::Name { name: text, prefix })
    }
}

/// Whether `text` is all lowercase hex digits (and not empty).
fn is_lower_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The one blob whose digest starts with `hex` (what the user typed: `typed`).
fn resolve_prefix<S: BlobStore + ?Sized>(
    store: &S,
    typed: &str,
    hex: &str,
    bare: bool,
) -> Result<Digest256> {
    let found = store.list_prefixed(hex)?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::PrefixNotFound {
            prefix: typed.to_owned(),
            bare,
        }),
        _ => Err(ambiguous(store, typed, &found)),
    }
}

/// The error for a prefix `typed` that `found` (sorted, two or more) start with: the blobs names
/// point at first (what `pf store ls` shows with a name is what a user copies a prefix from),
/// each shown with enough digits to tell it from every other match.
fn ambiguous<S: BlobStore + ?Sized>(store: &S, typed: &str, found: &[Digest256]) -> Error {
    let hexes: Vec<String> = found.iter().map(Digest256::hex).collect();
    let common =
        |a: &String, b: &String| a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let digits = hexes
        .windows(2)
        .map(|w| common(&w[0], &w[1]) + 1)
        .max()
        .unwrap_or(0)
        .clamp(AMBIGUOUS_DIGITS, 64);
    // Names are a help here, not a need: a store whose names cannot be read still says which
    // blobs match.
    let names = store.names_or_errors().unwrap_or_default();
    let mut candidates: Vec<(Digest256, Vec<String>)> = found
        .iter()
        .map(|digest| {
            let of = names
                .iter()
                .filter(|(_, d)| d.as_ref().is_ok_and(|d| d == digest))
                .map(|(name, _)| name.clone())
                .collect();
            (*digest, of)
        })
        .collect();
    // Stable: named ones first, each group in digest order.
    candidates.sort_by_key(|(_, of)| of.is_empty());
    candidates.truncate(AMBIGUOUS_SHOWN);
    Error::AmbiguousPrefix {
        prefix: typed.to_owned(),
        count: found.len(),
        candidates,
        digits,
    }
}

/// Check that `name` is acceptable as a ref: 1–200 bytes, no `/`, no `\0` or other control
/// characters or white space, not `.` or `..`, not starting with `.` (temp files), and not like a
/// digest (`sha256:` in any case, or 64 hex digits).
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| Error::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 200 {
        return Err(invalid("it is longer than 200 bytes"));
    }
    if name.starts_with('.') {
        return Err(invalid("it starts with '.'"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(invalid("it contains a slash"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("it contains a control character"));
    }
    let looks_like_digest = name
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("sha256:"))
        || (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()));
    if looks_like_digest {
        return Err(invalid(
            "it looks like a digest (a digest is `sha256:` and 64 lowercase hex digits)",
        ));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(invalid("it contains white space"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_len_refuses_short_and_long_input() {
        let mut out = Vec::new();
        let err = ExactLen::new(&b"abc"[..], 4)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(matches!(
            Error::from_read_error(&err),
            Some(Error::InputLength {
                expected: 4,
                actual: 3
            })
        ));
        let err = ExactLen::new(&b"abcde"[..], 4)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(matches!(
            Error::from_read_error(&err),
            Some(Error::InputLength { expected: 4, .. })
        ));
        out.clear();
        ExactLen::new(&b"abcd"[..], 4)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abcd");
    }

    #[test]
    fn put_expecting_stores_only_the_expected_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let fs = crate::FsBlobStore::open(dir.path()).unwrap();
        let mem = crate::MemBlobStore::new();
        let stores: [&dyn BlobStore; 2] = [&fs, &mem];
        for store in stores {
            let good = Digest256::of(b"good bytes");
            let put = store
                .put_reader_expecting(&mut &b"good bytes"[..], 10, &good)
                .unwrap();
            assert_eq!(put.digest, good);
            assert!(store.contains(&good).unwrap());

            let want = Digest256::of(b"other byte");
            let err = store
                .put_reader_expecting(&mut &b"tampered!!"[..], 10, &want)
                .unwrap_err();
            assert!(
                matches!(err, Error::Integrity { digest, actual, .. }
                    if digest == want && actual == Digest256::of(b"tampered!!")),
                "{err:?}"
            );
            assert_eq!(store.list().unwrap(), vec![good], "{store:?}");
        }
        // The refused bytes left no temp file behind either.
        let temps: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(temps.is_empty(), "{temps:?}");
    }

    /// Two byte strings whose digests share their first `digits` hex digits (found by trying).
    fn colliding(digits: usize) -> (Vec<u8>, Vec<u8>) {
        let mut seen = std::collections::HashMap::new();
        for i in 0u64.. {
            let bytes = format!("blob {i}").into_bytes();
            let hex = Digest256::of(&bytes).hex();
            if let Some(other) = seen.insert(hex[..digits].to_owned(), bytes.clone()) {
                return (other, bytes);
            }
        }
        unreachable!()
    }

    #[test]
    fn references_are_read_before_the_store_is_asked() {
        let d = Digest256::of(b"x");
        let hex = d.hex();
        let full = d.to_string();
        assert_eq!(Reference::parse(&full).unwrap(), Reference::Digest(d));
        assert_eq!(Reference::parse(&hex).unwrap(), Reference::Digest(d));
        let short = format!("sha256:{}", &hex[..4]);
        assert_eq!(
            Reference::parse(&short).unwrap(),
            Reference::Prefix(&hex[..4])
        );
        let long = format!("sha256:{}", &hex[..63]);
        assert_eq!(
            Reference::parse(&long).unwrap(),
            Reference::Prefix(&hex[..63])
        );
        for few in 1..PREFIX_MIN_HEX {
            let typed = format!("sha256:{}", &hex[..few]);
            assert!(
                matches!(
                    Reference::parse(&typed),
                    Err(Error::PrefixTooShort { min: 4, .. })
                ),
                "{typed}"
            );
        }
        for bad in [
            "sha256:".to_owned(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex.to_uppercase()[..8]),
            format!("{full}0"),
            "sha256:../../etc/passwd".to_owned(),
        ] {
            assert!(
                matches!(Reference::parse(&bad), Err(Error::InvalidDigest(_))),
                "{bad}"
            );
        }
        // Bare hex is a name, and from 8 digits also a prefix.
        let seven = &hex[..7];
        assert_eq!(
            Reference::parse(seven).unwrap(),
            Reference::Name {
                name: seven,
                prefix: None
            }
        );
        let eight = &hex[..BARE_PREFIX_MIN_HEX];
        assert_eq!(
            Reference::parse(eight).unwrap(),
            Reference::Name {
                name: eight,
                prefix: Some(eight)
            }
        );
        let upper = hex[..12].to_uppercase();
        assert_eq!(
            Reference::parse(&upper).unwrap(),
            Reference::Name {
                name: &upper,
                prefix: None
            }
        );
        assert_eq!(
            Reference::parse("repl").unwrap(),
            Reference::Name {
                name: "repl",
                prefix: None
            }
        );
    }

    #[test]
    fn a_unique_prefix_resolves_and_others_say_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let fs = crate::FsBlobStore::open(dir.path()).unwrap();
        let mem = crate::MemBlobStore::new();
        let stores: [&dyn BlobStore; 2] = [&fs, &mem];
        // a and b share 5 digits; c is elsewhere.
        let (a_bytes, b_bytes) = colliding(5);
        for store in stores {
            let a = store.put(&a_bytes).unwrap();
            let b = store.put(&b_bytes).unwrap();
            let c = store.put(b"c").unwrap();
            store.set_name("b-snap", &b).unwrap();
            store.set_name("b-again", &b).unwrap();
            let (ah, bh, ch) = (a.hex(), b.hex(), c.hex());
            let common = ah
                .bytes()
                .zip(bh.bytes())
                .take_while(|(x, y)| x == y)
                .count();
            assert!(common >= 5, "{ah} {bh}");

            // Unique: with `sha256:` from 4 digits, bare from 8, and the whole digest.
            assert_eq!(store.resolve(&format!("sha256:{}", &ch[..4])).unwrap(), c);
            assert_eq!(store.resolve(&ch[..8]).unwrap(), c);
            let a_unique = &ah[..=common];
            assert_eq!(store.resolve(&format!("sha256:{a_unique}")).unwrap(), a);
            assert_eq!(store.resolve(&ah).unwrap(), a);
            assert_eq!(store.resolve(&a.to_string()).unwrap(), a);
            // A whole digest is taken as it is: not looked up, so not even listed.
            let absent = Digest256::of(b"never stored");
            assert_eq!(store.resolve(&absent.to_string()).unwrap(), absent);

            // Ambiguous: both named, the named one first, each with digits that tell them
            // apart, and nothing resolved.
            let err = store.resolve(&format!("sha256:{}", &ah[..5])).unwrap_err();
            let Error::AmbiguousPrefix {
                count,
                candidates,
                digits,
                ..
            } = &err
            else {
                panic!("{err:?}");
            };
            assert_eq!(*count, 2);
            assert_eq!(
                candidates[0],
                (b, vec!["b-again".to_owned(), "b-snap".to_owned()])
            );
            assert_eq!(candidates[1], (a, vec![]));
            assert!(*digits >= 12 && *digits > common, "{digits}");
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "sha256:{} (\"b-again\", \"b-snap\")",
                    &bh[..*digits]
                )) && text.contains(&format!("sha256:{}", &ah[..*digits]))
                    && text.contains("give more of the digest"),
                "{text}"
            );

            // None: said differently with `sha256:` and bare.
            let missing = if ch.starts_with("ffff") {
                "0000"
            } else {
                "ffff"
            };
            let err = store.resolve(&format!("sha256:{missing}")).unwrap_err();
            assert!(
                matches!(&err, Error::PrefixNotFound { bare: false, prefix } if prefix == &format!("sha256:{missing}")),
                "{err:?}"
            );
            let bare_missing = format!("{missing}{missing}");
            let err = store.resolve(&bare_missing).unwrap_err();
            assert!(
                matches!(err, Error::PrefixNotFound { bare: true, .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("no name"), "{err}");

            // Too short: with `sha256:` an error of its own; bare, only a name.
            assert!(matches!(
                store.resolve(&format!("sha256:{}", &ch[..3])),
                Err(Error::PrefixTooShort { .. })
            ));
            assert!(matches!(
                store.resolve(&ch[..7]),
                Err(Error::NameNotFound { .. })
            ));

            // A name spelled like a prefix of another blob is that name.
            store.set_name(&ch[..8], &a).unwrap();
            assert_eq!(store.resolve(&ch[..8]).unwrap(), a);
            assert_eq!(store.resolve(&ch[..9]).unwrap(), c);
            assert_eq!(store.resolve(&format!("sha256:{}", &ch[..8])).unwrap(), c);
        }
    }

    #[test]
    fn an_fs_store_lists_a_prefix_from_its_fan_out_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::FsBlobStore::open(dir.path()).unwrap();
        let digests: Vec<Digest256> = (0..64u32)
            .map(|i| store.put(&i.to_le_bytes()).unwrap())
            .collect();
        let mut all = digests.clone();
        all.sort();
        let d = digests[7];
        let hex = d.hex();
        for len in 1..=64 {
            let want: Vec<Digest256> = all
                .iter()
                .copied()
                .filter(|x| x.hex().starts_with(&hex[..len]))
                .collect();
            assert_eq!(store.list_prefixed(&hex[..len]).unwrap(), want, "{len}");
        }
        // Nothing that is not lowercase hex matches, and no path is made of it.
        for odd in ["", "..", "../", "0/", "AB", "zz", "0g"] {
            assert_eq!(store.list_prefixed(odd).unwrap(), vec![], "{odd:?}");
        }
        // A raw blob and a stranger file in the directory.
        let raw = store.put_raw(b"raw bytes").unwrap();
        let fan = store.blob_path(&raw).parent().unwrap().to_owned();
        std::fs::write(fan.join(format!("{}.tmp", raw.hex())), b"").unwrap();
        assert_eq!(store.list_prefixed(&raw.hex()[..6]).unwrap(), vec![raw]);
        // Other fan-out directories are not read: one made unreadable does not matter.
        let other = all.iter().find(|x| x.hex()[..2] != raw.hex()[..2]).unwrap();
        let other_fan = store.blob_path(other).parent().unwrap().to_owned();
        std::fs::rename(&other_fan, dir.path().join("moved")).unwrap();
        std::fs::write(&other_fan, b"not a directory").unwrap();
        assert_eq!(store.list_prefixed(&raw.hex()[..6]).unwrap(), vec![raw]);
    }

    #[test]
    fn names_are_validated() {
        for ok in ["repl", "python-3.11_warm", "a.b", "x@1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(201);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            "sha256:00",
            "SHA256:00",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "a b",
            &long,
        ] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
