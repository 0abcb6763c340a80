//! Packs: blobs holding many 4 KiB pages, compressed in independently decodable zstd frames,
//! with an index that names every page by its SHA-256 so one page can be read and checked on
//! its own.
//!
//! A pack is an ordinary blob (its digest is the SHA-256 of the bytes below, stored like any
//! other blob), laid out as:
//!
//! ```text
//! "PFPACK\0\x01"                                  8 bytes, the magic and format version 1
//! frame 0 … frame F-1                             each one zstd frame of up to FRAME_PAGES pages
//! index:  u32 F, u32 P                            frame and page counts (little endian)
//!         F × (u64 offset, u32 length, u32 first slot, u32 pages)
//!         P × 32-byte SHA-256 of each page, in slot order
//! trailer: u64 index offset, u64 index length, "PFPKEND1"
//! ```
//!
//! A page is addressed by its *slot* (its position in the pack). To read slot `s`, find the frame
//! whose slot range holds it, decode that frame alone and take the page; its hash must equal the
//! digest in the index (and the digest the caller expects). Zero pages never enter a pack: the
//! page lists that reference packs mark them as zero instead.

use sha2::{Digest as _, Sha256};

use crate::digest::Digest256;

/// The page size packs are made of.
pub const PAGE_SIZE: usize = 4096;
/// Pages per zstd frame: 32 pages = 128 KiB, small enough that reading one page decodes little,
/// large enough that zstd's per-frame cost is noise.
pub const FRAME_PAGES: usize = 32;
/// Most pages per pack: 2048 pages = 8 MiB raw, so a 1 GiB process needs at most 128 packs and
/// a writer or reader holds at most one pack in memory.
pub const PACK_PAGES: usize = 2048;
/// zstd level for frames (level 1: process memory is mostly incompressible or very compressible).
const LEVEL: i32 = 1;

const MAGIC: &[u8; 8] = b"PFPACK\0\x01";
/// What [`PackBuilder::finish_aligned`] aligns a pack's start to: what direct I/O wants of a
/// buffer (4 KiB covers disks of 512-byte and 4 KiB blocks).
const ALIGN: usize = 4096;
const END_MAGIC: &[u8; 8] = b"PFPKEND1";
/// Bytes of the trailer at the end of a pack.
pub(crate) const TRAILER_LEN: usize = 24;
/// Bytes of the index before its frame table (frame and page counts).
pub(crate) const INDEX_HEAD_LEN: usize = 8;
/// Bytes of one frame table entry.
pub(crate) const FRAME_ENTRY_LEN: usize = 20;

/// Why a pack cannot be written, parsed or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// The bytes are not a pack (bad magic, truncated, inconsistent index).
    #[error("pack {pack} is malformed: {reason}")]
    Malformed {
        /// The pack blob.
        pack: Digest256,
        /// What is wrong.
        reason: &'static str,
    },
    /// A frame does not decode.
    #[error("pack {pack} is corrupt: frame {frame} does not decode")]
    Frame {
        /// The pack blob.
        pack: Digest256,
        /// The frame's number.
        frame: usize,
        /// zstd's error.
        #[source]
        source: std::io::Error,
    },
    /// A page's bytes do not hash to the digest it is stored under.
    #[error(
        "pack {pack} is corrupt: page in slot {slot} should hash to {expected} but hashes to {actual}"
    )]
    BadPage {
        /// The pack blob.
        pack: Digest256,
        /// The page's slot in the pack.
        slot: u32,
        /// The digest the index (or the caller) expects.
        expected: Digest256,
        /// What the bytes hash to.
        actual: Digest256,
    },
    /// The slot is past the end of the pack.
    #[error("pack {pack} has {pages} pages, no slot {slot}")]
    NoSuchSlot {
        /// The pack blob.
        pack: Digest256,
        /// The slot asked for.
        slot: u32,
        /// Pages in the pack.
        pages: u32,
    },
    /// A pack was repacked (it is gone and has forward records), but no pack its records lead
    /// to holds a page it held.
    #[error(
        "pack {pack} was repacked, but the packs it is forwarded to ({}) do not hold page {digest}",
        .to.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    NotForwarded {
        /// The repacked pack.
        pack: Digest256,
        /// The packs its forward records lead to.
        to: Vec<Digest256>,
        /// The page looked for.
        digest: Digest256,
    },
    /// Compressing a frame failed.
    #[error("compressing a frame of a pack")]
    Compress {
        /// zstd's error.
        #[source]
        source: std::io::Error,
    },
}

/// The digest of one 4 KiB page (the SHA-256 of its bytes).
pub fn page_digest(page: &[u8]) -> Digest256 {
    Digest256::from_bytes(Sha256::digest(page).into())
}

/// The digests of `pages` (4 KiB each), in order, appended to `out`: what [`page_digest`] gives
/// for each, hashed many side by side where the CPU can (16 at once with AVX-512: about twice
/// as fast as one at a time).
pub fn page_digests(pages: &[&[u8]], out: &mut Vec<Digest256>) {
    crate::sha256_many::digest_many(pages, out);
}

/// Check each of `pages` (the pack and slot it was read from, its bytes, the digest it must
/// hash to), hashed many at once; the first that does not match is the error, with its index.
pub(crate) fn check_pages(
    pages: &[(Digest256, u32, &[u8], Digest256)],
) -> Result<(), (usize, PackError)> {
    let bytes: Vec<&[u8]> = pages.iter().map(|(_, _, page, _)| *page).collect();
    let mut actual = Vec::with_capacity(pages.len());
    page_digests(&bytes, &mut actual);
    for (i, ((pack, slot, _, expected), actual)) in pages.iter().zip(actual).enumerate() {
        if actual != *expected {
            return Err((
                i,
                PackError::BadPage {
                    pack: *pack,
                    slot: *slot,
                    expected: *expected,
                    actual,
                },
            ));
        }
    }
    Ok(())
}

/// Whether every byte of `page` is zero.
pub fn is_zero_page(page: &[u8]) -> bool {
    // Compare in u64 chunks: the compiler vectorises this.
    page.chunks_exact(8)
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
        && page.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

/// Builds one pack in memory (at most [`PACK_PAGES`] pages, so at most 8 MiB raw plus its
/// compressed form). Frames are compressed on up to `threads` threads when the pack is finished.
/// [`finish_into`](Self::finish_into) starts the next pack in the same buffers, so a writer of
/// many packs allocates (and the kernel zeroes) its buffers once.
#[derive(Debug)]
pub struct PackBuilder {
    raw: Vec<u8>,
    digests: Vec<Digest256>,
    threads: usize,
    /// One per thread: its compressor and the frames it compressed, kept from pack to pack.
    workers: Vec<FrameWorker>,
}

/// A thread's share of compressing a pack.
#[derive(Default)]
struct FrameWorker {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Its frames' compressed bytes, one after another (the first thread's go straight into
    /// the pack instead).
    out: Vec<u8>,
    /// Their lengths.
    lens: Vec<usize>,
}

impl std::fmt::Debug for FrameWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWorker")
            .field("out", &self.out.len())
            .field("lens", &self.lens)
            .finish_non_exhaustive()
    }
}

impl FrameWorker {
    /// Compress `inputs`, one frame each, appended to `out`; their lengths into `self.lens`.
    /// Each frame is compressed where it ends up (incompressible pages are copied there once,
    /// by zstd, as a raw block), not into a buffer of its own first.
    fn compress(&mut self, inputs: &[&[u8]], out: &mut Vec<u8>) -> Result<(), std::io::Error> {
        self.lens.clear();
        let compressor = match &mut self.compressor {
            Some(c) => c,
            None => self.compressor.insert(zstd::bulk::Compressor::new(LEVEL)?),
        };
        let bound: usize = inputs
            .iter()
            .map(|i| zstd::zstd_safe::compress_bound(i.len()))
            .sum();
        out.reserve(bound);
        for input in inputs {
            let at = out.len();
            out.reserve(zstd::zstd_safe::compress_bound(input.len()));
            let mut cursor = std::io::Cursor::new(&mut *out);
            cursor.set_position(at as u64);
            let n = compressor.compress_to_buffer(input, &mut cursor)?;
            debug_assert_eq!(out.len(), at + n);
            self.lens.push(n);
        }
        Ok(())
    }
}

impl PackBuilder {
    /// An empty pack that compresses on `threads` threads (at least one).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        Self {
            raw: Vec::with_capacity(PACK_PAGES * PAGE_SIZE),
            digests: Vec::with_capacity(PACK_PAGES),
            threads,
            workers: Vec::new(),
        }
    }

    /// Pages so far.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether no page was added.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether the pack holds [`PACK_PAGES`] pages.
    pub fn is_full(&self) -> bool {
        self.digests.len() >= PACK_PAGES
    }

    /// Add one page whose digest the caller computed; returns its slot. The caller must not add
    /// more than [`PACK_PAGES`] pages (check [`is_full`](Self::is_full)).
    pub fn push(&mut self, page: &[u8], digest: Digest256) -> u32 {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        debug_assert!(!self.is_full());
        self.raw.extend_from_slice(page);
        self.digests.push(digest);
        (self.digests.len() - 1) as u32
    }

    /// The pack's bytes: frames compressed in parallel, then the index and trailer.
    pub fn finish(mut self) -> Result<Vec<u8>, PackError> {
        let mut out = Vec::new();
        self.finish_into(&mut out)?;
        Ok(out)
    }

    /// Write the pack's bytes into `out` (cleared first, its allocation reused) and start an
    /// empty pack in the same buffers.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> Result<(), PackError> {
        self.finish_at(out, 1).map(|_| ())
    }

    /// Like [`finish_into`](Self::finish_into), but the pack starts at a 4 KiB-aligned address
    /// inside `out` (after a few zero bytes): returns where. A store can then write it to disk
    /// with direct I/O straight from `out`, without first copying it into an aligned buffer.
    pub fn finish_aligned(&mut self, out: &mut Vec<u8>) -> Result<usize, PackError> {
        self.finish_at(out, ALIGN)
    }

    /// The pack into `out`, starting at the first address inside it aligned to `align` (a
    /// power of two); returns that start.
    fn finish_at(&mut self, out: &mut Vec<u8>, align: usize) -> Result<usize, PackError> {
        let chunks: Vec<&[u8]> = self.raw.chunks(FRAME_PAGES * PAGE_SIZE).collect();
        // Room for all of it at once: `out` must not move once the start is chosen.
        let most = align
            + MAGIC.len()
            + chunks
                .iter()
                .map(|c| zstd::zstd_safe::compress_bound(c.len()))
                .sum::<usize>()
            + INDEX_HEAD_LEN
            + chunks.len() * FRAME_ENTRY_LEN
            + self.digests.len() * 32
            + TRAILER_LEN;
        out.clear();
        if align > 1 {
            out.reserve(most);
        }
        let start = out.as_ptr().align_offset(align).min(align - 1);
        out.resize(start, 0);
        let at = out.as_ptr();
        let per_thread = chunks.len().div_ceil(self.threads).max(1);
        let groups: Vec<&[&[u8]]> = chunks.chunks(per_thread).collect();
        while self.workers.len() < groups.len().max(1) {
            self.workers.push(FrameWorker::default());
        }
        out.extend_from_slice(MAGIC);
        // The first thread's frames go straight into `out`, the others' into their own buffers,
        // appended after.
        let (first, others) = self.workers.split_at_mut(1);
        let first = &mut first[0];
        let results: Vec<Result<(), std::io::Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = others
                .iter_mut()
                .zip(groups.iter().skip(1))
                .map(|(worker, inputs)| {
                    s.spawn(move || {
                        worker.out.clear();
                        let mut own = std::mem::take(&mut worker.out);
                        let r = worker.compress(inputs, &mut own);
                        worker.out = own;
                        r
                    })
                })
                .collect();
            let mut results = vec![first.compress(groups.first().map_or(&[], |g| *g), out)];
            results.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            results
        });
        for result in results {
            result.map_err(|source| PackError::Compress { source })?;
        }
        let workers = &self.workers[..groups.len().max(1)];
        let compressed: usize = workers[1..].iter().map(|w| w.out.len()).sum();
        let frame_count = chunks.len();
        let index_len = 8 + frame_count * FRAME_ENTRY_LEN + self.digests.len() * 32;
        out.reserve(compressed + index_len + TRAILER_LEN);
        let mut table = Vec::with_capacity(frame_count * FRAME_ENTRY_LEN);
        let mut n = 0usize;
        let mut offset = MAGIC.len();
        for (w, worker) in workers.iter().enumerate() {
            for len in &worker.lens {
                let first = n * FRAME_PAGES;
                let pages = (self.digests.len() - first).min(FRAME_PAGES);
                table.extend_from_slice(&(offset as u64).to_le_bytes());
                table.extend_from_slice(&(*len as u32).to_le_bytes());
                table.extend_from_slice(&(first as u32).to_le_bytes());
                table.extend_from_slice(&(pages as u32).to_le_bytes());
                offset += len;
                n += 1;
            }
            if w > 0 {
                out.extend_from_slice(&worker.out);
            }
        }
        debug_assert_eq!(start + offset, out.len());
        let index_at = (out.len() - start) as u64;
        out.extend_from_slice(&(frame_count as u32).to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u32).to_le_bytes());
        out.extend_from_slice(&table);
        for d in &self.digests {
            out.extend_from_slice(d.as_bytes());
        }
        let index_len = (out.len() - start) as u64 - index_at;
        out.extend_from_slice(&index_at.to_le_bytes());
        out.extend_from_slice(&index_len.to_le_bytes());
        out.extend_from_slice(END_MAGIC);
        debug_assert!(
            align == 1 || out.as_ptr() == at,
            "the pack's buffer moved after its aligned start was chosen"
        );
        self.raw.clear();
        self.digests.clear();
        Ok(start)
    }
}

/// What [`Pack::for_each_page`] hands each checked page to: `(slot, page bytes)`.
pub type PageSink<'f, E> = dyn FnMut(u32, &[u8]) -> Result<(), E> + 'f;

/// One frame of a pack, from its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Where its compressed bytes start in the pack.
    pub(crate) offset: usize,
    /// How many compressed bytes it has.
    pub(crate) len: usize,
    /// Its first page's slot.
    pub(crate) first: u32,
    /// Pages in it (1 to [`FRAME_PAGES`]).
    pub(crate) pages: u32,
}

/// Where a pack's index lies, from its trailer (the last [`TRAILER_LEN`] bytes of a pack of
/// `len` bytes): `(index offset, index length)`, checked to end at the trailer.
pub(crate) fn parse_trailer(
    pack: Digest256,
    len: u64,
    trailer: &[u8],
) -> Result<(usize, usize), PackError> {
    let bad = |reason| PackError::Malformed { pack, reason };
    if len < (MAGIC.len() + TRAILER_LEN) as u64 || trailer.len() != TRAILER_LEN {
        return Err(bad("it is too short to be a pack"));
    }
    if &trailer[16..] != END_MAGIC {
        return Err(bad("it does not end with the pack trailer"));
    }
    let index_at = u64_at(trailer, 0);
    let index_len = u64_at(trailer, 8);
    index_at
        .checked_add(index_len)
        .filter(|&e| e == len - TRAILER_LEN as u64 && index_at >= MAGIC.len() as u64)
        .ok_or(bad("its index does not end at the trailer"))?;
    let at = usize::try_from(index_at).map_err(|_| bad("its index lies out of reach"))?;
    let n = usize::try_from(index_len).map_err(|_| bad("its index lies out of reach"))?;
    if n < INDEX_HEAD_LEN {
        return Err(bad("its index is truncated"));
    }
    Ok((at, n))
}

/// The frame count an index head (its first [`INDEX_HEAD_LEN`] bytes) announces.
pub(crate) fn frame_count(head: &[u8]) -> usize {
    u32_at(head, 0) as usize
}

/// Parse and check a pack's frame table. `index` holds at least the index's head and frame
/// table (the page digests after them are not needed); `index_at` and `index_len` come from
/// [`parse_trailer`]. Returns the frames and the page count. Every frame must lie between the
/// magic and the index, hold 1 to [`FRAME_PAGES`] pages in slot order, and be no longer than
/// zstd's bound for that many pages, so a reader never decodes more than a frame's worth.
pub(crate) fn parse_frames(
    pack: Digest256,
    index: &[u8],
    index_at: usize,
    index_len: usize,
) -> Result<(Vec<Frame>, u32), PackError> {
    let bad = |reason| PackError::Malformed { pack, reason };
    if index.len() < INDEX_HEAD_LEN {
        return Err(bad("its index is truncated"));
    }
    let frame_count = frame_count(index);
    let page_count = u32_at(index, 4) as usize;
    let want = frame_count
        .checked_mul(FRAME_ENTRY_LEN)
        .and_then(|f| page_count.checked_mul(32).and_then(|p| p.checked_add(f)))
        .and_then(|n| n.checked_add(INDEX_HEAD_LEN));
    if want != Some(index_len) {
        return Err(bad("its index length does not match its counts"));
    }
    let table_end = INDEX_HEAD_LEN + frame_count * FRAME_ENTRY_LEN;
    if index.len() < table_end {
        return Err(bad("its index is truncated"));
    }
    let max_frame = zstd::zstd_safe::compress_bound(FRAME_PAGES * PAGE_SIZE);
    let mut frames = Vec::with_capacity(frame_count);
    let mut next_slot = 0u32;
    for e in index[INDEX_HEAD_LEN..table_end].chunks_exact(FRAME_ENTRY_LEN) {
        let frame = Frame {
            offset: u64_at(e, 0) as usize,
            len: u32_at(e, 8) as usize,
            first: u32_at(e, 12),
            pages: u32_at(e, 16),
        };
        let in_bounds = frame.offset >= MAGIC.len()
            && frame
                .offset
                .checked_add(frame.len)
                .is_some_and(|end| end <= index_at);
        if !in_bounds
            || frame.first != next_slot
            || frame.pages == 0
            || frame.pages as usize > FRAME_PAGES
            || frame.len > max_frame
        {
            return Err(bad("a frame lies outside the pack or out of order"));
        }
        next_slot += frame.pages;
        frames.push(frame);
    }
    if next_slot as usize != page_count {
        return Err(bad("its frames do not cover its pages"));
    }
    Ok((frames, page_count as u32))
}

/// The frame of `frames` (sorted, as [`parse_frames`] returns them) that holds `slot`.
pub(crate) fn frame_holding(frames: &[Frame], slot: u32) -> Option<usize> {
    let n = frames.partition_point(|f| f.first + f.pages <= slot);
    (n < frames.len()).then_some(n)
}

/// Most bytes a frame of raw pages has before them: the zstd frame header (magic 4, descriptor
/// 1, window 1, content size 8; no dictionary) and one block header (3).
pub(crate) const RAW_HEAD_MAX: usize = 17;

/// Whether `head`, the bytes of a frame before its last `content` bytes, says those bytes are
/// its pages as they are: a zstd frame header with no dictionary and no checksum (and, if it
/// gives one, a content size of `content`) and then one last raw block of `content` bytes.
/// zstd stores a frame that does not compress that way, so its pages can be read straight
/// from the pack where they are needed, not copied there by the decoder. (Only a saving: the
/// pages are checked against their digests all the same, and any other frame is decoded.)
pub(crate) fn is_raw_frame_head(head: &[u8], content: usize) -> bool {
    const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
    let (Some(magic), Some(&descriptor)) = (head.get(..4), head.get(4)) else {
        return false;
    };
    let single_segment = descriptor & 0x20 != 0;
    // Reserved bit, checksum, dictionary id.
    if magic != MAGIC || descriptor & 0x08 != 0 || descriptor & 0x04 != 0 || descriptor & 3 != 0 {
        return false;
    }
    let mut at = 5 + usize::from(!single_segment);
    let size_len = match descriptor >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let Some(size) = head.get(at..at + size_len) else {
        return false;
    };
    let mut le = [0u8; 8];
    le[..size_len].copy_from_slice(size);
    let size = u64::from_le_bytes(le) + if size_len == 2 { 256 } else { 0 };
    if size_len > 0 && size != content as u64 {
        return false;
    }
    at += size_len;
    let Some(&[b0, b1, b2]) = head.get(at..) else {
        return false;
    };
    let block = u32::from_le_bytes([b0, b1, b2, 0]);
    // Last block, raw, all of the content.
    block & 1 == 1 && (block >> 1) & 3 == 0 && (block >> 3) as usize == content
}

/// Decode one frame's compressed bytes `src` into `out` (cleared first, its allocation
/// reused), which must come to exactly `pages` pages.
pub(crate) fn decode_frame_bytes(
    decoder: &mut Option<zstd::bulk::Decompressor<'static>>,
    src: &[u8],
    pages: u32,
    out: &mut Vec<u8>,
) -> Result<(), std::io::Error> {
    let want = pages as usize * PAGE_SIZE;
    out.clear();
    out.reserve(want);
    let decoder = match decoder {
        Some(d) => d,
        None => decoder.insert(zstd::bulk::Decompressor::new()?),
    };
    decoder.decompress_to_buffer(src, out)?;
    if out.len() != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame holds fewer pages than its index says",
        ));
    }
    Ok(())
}

/// Decode one frame's compressed bytes `src` into `out`, which it must fill exactly.
pub(crate) fn decode_frame_into(
    decoder: &mut Option<zstd::bulk::Decompressor<'static>>,
    src: &[u8],
    out: &mut [u8],
) -> Result<(), std::io::Error> {
    let decoder = match decoder {
        Some(d) => d,
        None => decoder.insert(zstd::bulk::Decompressor::new()?),
    };
    let n = decoder.decompress_to_buffer(src, out)?;
    if n != out.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame holds fewer pages than its index says",
        ));
    }
    Ok(())
}

/// A pack's bytes with their index parsed; pages are decoded on demand.
#[derive(Debug)]
pub struct Pack<'a> {
    digest: Digest256,
    bytes: &'a [u8],
    frames: Vec<Frame>,
    digests: &'a [u8],
}

impl<'a> Pack<'a> {
    /// Parse the index of the pack `digest` whose bytes are `bytes` (the caller got them from
    /// the store, which verified them against `digest`).
    pub fn parse(digest: Digest256, bytes: &'a [u8]) -> Result<Self, PackError> {
        let bad = |reason| PackError::Malformed {
            pack: digest,
            reason,
        };
        if bytes.len() < MAGIC.len() + TRAILER_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("it does not start with the pack magic"));
        }
        let len = bytes.len() as u64;
        let (index_at, index_len) =
            parse_trailer(digest, len, &bytes[bytes.len() - TRAILER_LEN..])?;
        let index = &bytes[index_at..index_at + index_len];
        let (frames, _) = parse_frames(digest, index, index_at, index_len)?;
        let digests = &index[INDEX_HEAD_LEN + frames.len() * FRAME_ENTRY_LEN..];
        Ok(Self {
            digest,
            bytes,
            frames,
            digests,
        })
    }

    /// The pack's digest.
    pub fn digest(&self) -> &Digest256 {
        &self.digest
    }

    /// Pages in the pack.
    pub fn pages(&self) -> u32 {
        (self.digests.len() / 32) as u32
    }

    /// The digest the index records for `slot`.
    pub fn page_digest(&self, slot: u32) -> Result<Digest256, PackError> {
        let at = slot as usize * 32;
        let raw = self.digests.get(at..at + 32).ok_or(PackError::NoSuchSlot {
            pack: self.digest,
            slot,
            pages: self.pages(),
        })?;
        let mut out = [0u8; 32];
        out.copy_from_slice(raw);
        Ok(Digest256::from_bytes(out))
    }

    /// Every (digest, slot) the pack holds, in slot order.
    pub fn entries(&self) -> impl Iterator<Item = (Digest256, u32)> + '_ {
        self.digests.chunks_exact(32).enumerate().map(|(n, d)| {
            let mut out = [0u8; 32];
            out.copy_from_slice(d);
            (Digest256::from_bytes(out), n as u32)
        })
    }

    /// Decode frame `n` into `out` (cleared first, its allocation reused) with `decoder`;
    /// returns the frame's first slot.
    fn decode_frame(
        &self,
        decoder: &mut Option<zstd::bulk::Decompressor<'static>>,
        n: usize,
        out: &mut Vec<u8>,
    ) -> Result<u32, PackError> {
        let f = self.frames[n];
        let src = &self.bytes[f.offset..f.offset + f.len];
        decode_frame_bytes(decoder, src, f.pages, out).map_err(|source| PackError::Frame {
            pack: self.digest,
            frame: n,
            source,
        })?;
        Ok(f.first)
    }

    /// The frame holding `slot`.
    fn frame_of(&self, slot: u32) -> Result<usize, PackError> {
        frame_holding(&self.frames, slot).ok_or(PackError::NoSuchSlot {
            pack: self.digest,
            slot,
            pages: self.pages(),
        })
    }

    /// Read the page in `slot` into `out` (4 KiB), decoding only its frame, and check that it
    /// hashes to `expected`.
    pub fn read_page(
        &self,
        slot: u32,
        expected: &Digest256,
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<(), PackError> {
        let n = self.frame_of(slot)?;
        let mut buf = Vec::new();
        let first = self.decode_frame(&mut None, n, &mut buf)?;
        let at = (slot - first) as usize * PAGE_SIZE;
        let page = &buf[at..at + PAGE_SIZE];
        check_page(self.digest, slot, page, expected)?;
        out.copy_from_slice(page);
        Ok(())
    }

    /// Call `f(slot, page)` for every requested slot (sorted ascending), decoding each frame at
    /// most once and checking each page against its `expected` digest before `f` sees it.
    pub fn for_each_page<E: From<PackError>>(
        &self,
        wanted: &[(u32, Digest256)],
        f: &mut PageSink<'_, E>,
    ) -> Result<(), E> {
        let mut buf = Vec::new();
        let mut decoder = None;
        let mut k = 0;
        while k < wanted.len() {
            // The wanted slots of one frame: decoded once, hashed at once, then handed out.
            let n = self.frame_of(wanted[k].0)?;
            let first = self.decode_frame(&mut decoder, n, &mut buf)?;
            let end = first + self.frames[n].pages;
            let from = k;
            while k < wanted.len() && wanted[k].0 >= first && wanted[k].0 < end {
                k += 1;
            }
            let page_at = |slot: u32| {
                let at = (slot - first) as usize * PAGE_SIZE;
                &buf[at..at + PAGE_SIZE]
            };
            let checks: Vec<(Digest256, u32, &[u8], Digest256)> = wanted[from..k]
                .iter()
                .map(|(slot, expected)| (self.digest, *slot, page_at(*slot), *expected))
                .collect();
            check_pages(&checks).map_err(|(_, err)| err)?;
            for (slot, _) in &wanted[from..k] {
                f(*slot, page_at(*slot))?;
            }
        }
        Ok(())
    }

    /// Decode every frame and check every page against the index; returns the page count.
    pub fn verify(&self) -> Result<u32, PackError> {
        let mut buf = Vec::new();
        let mut decoder = None;
        for n in 0..self.frames.len() {
            let first = self.decode_frame(&mut decoder, n, &mut buf)?;
            let checks = buf
                .chunks_exact(PAGE_SIZE)
                .enumerate()
                .map(|(i, page)| {
                    let slot = first + i as u32;
                    Ok((self.digest, slot, page, self.page_digest(slot)?))
                })
                .collect::<Result<Vec<_>, PackError>>()?;
            check_pages(&checks).map_err(|(_, err)| err)?;
        }
        Ok(self.pages())
    }
}

/// Check that `page` (slot `slot` of pack `pack`) hashes to `expected`.
pub(crate) fn check_page(
    pack: Digest256,
    slot: u32,
    page: &[u8],
    expected: &Digest256,
) -> Result<(), PackError> {
    let actual = page_digest(page);
    if &actual != expected {
        return Err(PackError::BadPage {
            pack,
            slot,
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// An incompressible 4 KiB page that is the same for the same `seed` (tests of this crate).
#[cfg(test)]
pub(crate) fn test_page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = vec![0u8; PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page filled from `seed` (distinct seeds give distinct pages).
    pub(crate) fn page(seed: u32) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        for (i, c) in p.chunks_exact_mut(4).enumerate() {
            c.copy_from_slice(&(seed.wrapping_mul(2_654_435_761) ^ i as u32).to_le_bytes());
        }
        p
    }

    fn build(n: u32) -> (Vec<u8>, Vec<Digest256>) {
        let mut b = PackBuilder::new(2);
        let mut ds = Vec::new();
        for s in 0..n {
            let p = page(s);
            let d = page_digest(&p);
            assert_eq!(b.push(&p, d), s);
            ds.push(d);
        }
        (b.finish().expect("finish"), ds)
    }

    #[test]
    fn pages_round_trip_one_at_a_time() {
        let (bytes, ds) = build(100);
        let digest = Digest256::of(&bytes);
        let pack = Pack::parse(digest, &bytes).expect("parse");
        assert_eq!(pack.pages(), 100);
        assert_eq!(pack.frames.len(), 4);
        assert_eq!(pack.verify().expect("verify"), 100);
        let mut out = [0u8; PAGE_SIZE];
        for s in [0, 31, 32, 63, 99] {
            pack.read_page(s, &ds[s as usize], &mut out).expect("read");
            assert_eq!(&out[..], &page(s)[..]);
            assert_eq!(pack.page_digest(s).expect("digest"), ds[s as usize]);
        }
        assert!(matches!(
            pack.read_page(100, &ds[0], &mut out),
            Err(PackError::NoSuchSlot {
                slot: 100,
                pages: 100,
                ..
            })
        ));
        // A page asked for under another digest is refused.
        assert!(matches!(
            pack.read_page(1, &ds[2], &mut out),
            Err(PackError::BadPage { slot: 1, .. })
        ));
        let wanted: Vec<_> = [3u32, 40, 41, 98]
            .iter()
            .map(|&s| (s, ds[s as usize]))
            .collect();
        let mut seen = Vec::new();
        pack.for_each_page(&wanted, &mut |s, p| -> Result<(), PackError> {
            assert_eq!(p, &page(s)[..]);
            seen.push(s);
            Ok(())
        })
        .expect("each");
        assert_eq!(seen, vec![3, 40, 41, 98]);
    }

    #[test]
    fn an_aligned_pack_is_the_same_bytes_from_an_aligned_start_in_reused_buffers() {
        let (whole, _) = build(100);
        let mut b = PackBuilder::new(2);
        let mut out = Vec::new();
        // Twice in the same buffers, and with a pack of another size between.
        for n in [100u32, 3, 100] {
            for s in 0..n {
                let p = page(s);
                b.push(&p, page_digest(&p));
            }
            let start = b.finish_aligned(&mut out).expect("finish");
            assert_eq!(
                out.as_ptr().addr().wrapping_add(start) % ALIGN,
                0,
                "{n} pages"
            );
            assert!(start < ALIGN);
            assert!(out[..start].iter().all(|b| *b == 0));
            let pack = &out[start..];
            if n == 100 {
                assert_eq!(pack, &whole[..]);
            }
            let parsed = Pack::parse(Digest256::of(pack), pack).expect("parse");
            assert_eq!(parsed.verify().expect("verify"), n);
        }
    }

    #[test]
    fn a_corrupt_page_is_named_by_its_slot() {
        // Incompressible pages are stored nearly verbatim: flip a byte inside slot 5's bytes.
        let mut b = PackBuilder::new(1);
        let mut pages = Vec::new();
        let mut x = 0x1234_5678u64;
        for _ in 0..8 {
            let mut p = vec![0u8; PAGE_SIZE];
            for c in p.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            b.push(&p, page_digest(&p));
            pages.push(p);
        }
        let mut bytes = b.finish().expect("finish");
        let needle = &pages[5][100..132];
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("raw block");
        bytes[at] ^= 0xff;
        let pack = Pack::parse(Digest256::of(&bytes), &bytes).expect("parse");
        let err = pack.verify().expect_err("corrupt");
        assert!(matches!(err, PackError::BadPage { slot: 5, .. }), "{err}");
        assert!(err.to_string().contains("slot 5"), "{err}");
        let mut out = [0u8; PAGE_SIZE];
        pack.read_page(4, &page_digest(&pages[4]), &mut out)
            .expect("its neighbours still read");
    }

    #[test]
    fn malformed_packs_are_refused() {
        let (bytes, _) = build(3);
        let d = Digest256::of(&bytes);
        for bad in [
            &bytes[..10],
            &bytes[1..],
            &bytes[..bytes.len() - 1],
            b"PFPACK\0\x01 not a pack at all, just text ....".as_slice(),
        ] {
            assert!(
                matches!(Pack::parse(d, bad), Err(PackError::Malformed { .. })),
                "{}",
                bad.len()
            );
        }
    }

    /// `pages` incompressible pages (an xorshift stream from `seed`).
    fn noise(pages: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = vec![0u8; pages * PAGE_SIZE];
        for c in out.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        out
    }

    #[test]
    fn a_frame_of_incompressible_pages_is_told_by_its_head_and_holds_them_as_they_are() {
        let mut worker = FrameWorker::default();
        for pages in [1, 2, 31, FRAME_PAGES] {
            let input = noise(pages, pages as u64);
            let mut frame = Vec::new();
            worker.compress(&[&input], &mut frame).expect("compress");
            let head = frame.len() - input.len();
            assert!((1..=RAW_HEAD_MAX).contains(&head), "{pages} pages: {head}");
            assert!(is_raw_frame_head(&frame[..head], input.len()), "{pages}");
            assert_eq!(&frame[head..], &input[..], "{pages}");
            // Not for another length, nor with any one bit of the head flipped: the magic, a
            // checksum or a dictionary, the content size, the block's type, size or last bit.
            assert!(!is_raw_frame_head(&frame[..head], input.len() - PAGE_SIZE));
            assert!(!is_raw_frame_head(&frame[..head - 1], input.len()));
            for byte in 0..head {
                for bit in 0..8 {
                    let mut bad = frame[..head].to_vec();
                    bad[byte] ^= 1 << bit;
                    // The descriptor's unused bit (0x10) means nothing.
                    if byte == 4 && bit == 4 {
                        continue;
                    }
                    assert!(
                        !is_raw_frame_head(&bad, input.len()),
                        "{pages} pages: byte {byte} bit {bit}"
                    );
                }
            }
        }
        // A frame that compresses is not one.
        let text = b"a frame of text compresses well. ".repeat(FRAME_PAGES * PAGE_SIZE / 32);
        let mut frame = Vec::new();
        worker
            .compress(&[&text[..FRAME_PAGES * PAGE_SIZE]], &mut frame)
            .expect("compress");
        assert!(frame.len() < FRAME_PAGES * PAGE_SIZE);
        assert!(!is_raw_frame_head(
            &frame[..RAW_HEAD_MAX],
            FRAME_PAGES * PAGE_SIZE
        ));
    }

    #[test]
    fn zero_pages_are_recognised() {
        assert!(is_zero_page(&[0u8; PAGE_SIZE]));
        let mut p = [0u8; PAGE_SIZE];
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&p));
    }
}
