//! Reading bits of CRIU images that callers need after a dump: the bytes CRIU saved from pipes,
//! and CRIU's own statistics of the dump (how long the tree was frozen).
//!
//! CRIU (4.x, image format v1.1) writes every image file as two little-endian `u32` magics
//! (`IMG_COMMON_MAGIC` 0x54564319, then the per-type magic) followed by entries, each a
//! little-endian `u32` length and that many bytes of a protobuf message. `pipes-data.img`
//! (magic `PIPES_DATA_MAGIC` 0x56453709) holds one entry per pipe whose *read end* the tree had
//! open:
//!
//! ```text
//! message pipe_data_entry { required uint32 pipe_id = 1; required uint32 bytes = 2; optional uint32 size = 3; }
//! ```
//!
//! immediately followed by `bytes` raw bytes, the data that was waiting unread in the pipe (CRIU
//! `tee`s it out without consuming it; there is no padding or page alignment). `pipe_id` is the
//! pipe's inode number, the `N` of `pipe:[N]`, so no lookup through `pipes.img` is needed.
//! Verified against dumps made by CRIU 4.1.1 on this project's machines.
//!
//! CRIU writes this data back only into pipes it creates itself: a pipe handed to `criu restore`
//! with `--inherit-fd` comes back empty, so a caller that inherits a pipe refills it from here.
//!
//! `pagemap-<id>.img` (magic `PAGEMAP_MAGIC` 0x56084025; shared memory's
//! `pagemap-shmem-<id>.img` too) says where the raw bytes of `pages-<pages_id>.img` belong: one
//! `pagemap_head { required uint32 pages_id = 1; }` entry, then one entry per run of pages
//! (see [`pagemap`]). The pages file itself has no header: it is the present runs' pages, 4 KiB
//! each, in entry order.
//!
//! `stats-dump` is a *service* file, written into criu's work directory at the end of a
//! successful dump: `IMG_SERVICE_MAGIC` 0x55105940, `STATS_MAGIC` 0x57093306, then one entry, a
//! `stats_entry` whose field 1 is a `dump_stats_entry` (see [`dump_stats`]).

use std::path::{Path, PathBuf};

use crate::wire::DumpStats;

/// `IMG_COMMON_MAGIC`: the first `u32` of every (non-inventory) CRIU image file.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `PIPES_DATA_MAGIC`: the second `u32` of `pipes-data.img`.
const PIPES_DATA_MAGIC: u32 = 0x5645_3709;
/// The file, inside an images directory, that holds unread pipe bytes.
const PIPES_DATA_FILE: &str = "pipes-data.img";
/// `PSTREE_MAGIC`: the second `u32` of `pstree.img`.
const PSTREE_MAGIC: u32 = 0x5027_3030;
/// `FILES_MAGIC`: the second `u32` of `files.img`, the tree's open files (all kinds).
const FILES_MAGIC: u32 = 0x5630_3138;
/// `REMAP_FPATH_MAGIC`: the second `u32` of `remap-fpath.img`, the files CRIU does not reopen
/// by their path (deleted files kept as ghosts, links to them, `/proc` files of dead pids).
const REMAP_FPATH_MAGIC: u32 = 0x5913_3954;
/// `FD_TYPES__REG` in a `file_entry`: a file opened by its path (regular files and devices).
const FD_TYPE_REG: u64 = 1;
/// `PAGEMAP_MAGIC`: the second `u32` of `pagemap-*.img`.
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// `MM_MAGIC`: the second `u32` of `mm-<pid>.img`.
const MM_MAGIC: u32 = 0x5749_2820;
/// `PE_PARENT`: the run's pages are in the parent images (pre-dump chains; pf makes none).
pub const PE_PARENT: u32 = 1 << 0;
/// `PE_LAZY`: the run's pages may be restored lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// `PE_PRESENT`: the run's pages are in this dump's pages file.
pub const PE_PRESENT: u32 = 1 << 2;
/// `IMG_SERVICE_MAGIC`: the first `u32` of CRIU's service files (stats, irmap cache).
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `STATS_MAGIC`: the second `u32` of `stats-dump` and `stats-restore`.
const STATS_MAGIC: u32 = 0x5709_3306;
/// The file, in criu's work directory, where a successful dump leaves its statistics.
const STATS_DUMP_FILE: &str = "stats-dump";

/// Why pipe data could not be read from an images directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image file could not be read.
    #[error("cannot read criu image {path}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image file is not in the format CRIU 4.x writes.
    #[error("criu image {path} is malformed at byte {offset}: {reason}")]
    Malformed {
        /// The image file.
        path: PathBuf,
        /// Where parsing stopped.
        offset: usize,
        /// What was wrong there.
        reason: &'static str,
    },
}

/// The bytes that were waiting unread in the pipe with inode `pipe_ino` when CRIU dumped into
/// `images_dir` (empty when the pipe held nothing or the tree had only its write end open).
pub fn pipe_data(images_dir: &Path, pipe_ino: u64) -> Result<Vec<u8>, ImageError> {
    let path = images_dir.join(PIPES_DATA_FILE);
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Io {
        path: path.clone(),
        source,
    })?;
    let entries = parse_pipes_data(&bytes).map_err(|(offset, reason)| ImageError::Malformed {
        path: path.clone(),
        offset,
        reason,
    })?;
    Ok(entries
        .into_iter()
        .find(|e| u64::from(e.pipe_id) == pipe_ino)
        .map(|e| e.data.to_vec())
        .unwrap_or_default())
}

/// One `pipe_data_entry` with the raw bytes that follow it.
#[derive(Debug, PartialEq, Eq)]
struct PipeDataEntry<'a> {
    pipe_id: u32,
    data: &'a [u8],
}

/// A parse failure: the byte offset and what was wrong there.
type ParseError = (usize, &'static str);

/// Parse a whole `pipes-data.img`.
fn parse_pipes_data(img: &[u8]) -> Result<Vec<PipeDataEntry<'_>>, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != PIPES_DATA_MAGIC {
        return Err((4, "not a pipes-data image (bad magic)"));
    }
    let mut entries = Vec::new();
    while r.pos < img.len() {
        let len = r.u32_le()? as usize;
        let msg_at = r.pos;
        let msg = r.take(len, "entry runs past the end of the file")?;
        let (pipe_id, bytes) =
            parse_pipe_data_entry(msg).map_err(|(off, why)| (msg_at + off, why))?;
        let data = r.take(bytes as usize, "pipe data runs past the end of the file")?;
        entries.push(PipeDataEntry { pipe_id, data });
    }
    Ok(entries)
}

/// Decode the protobuf message `pipe_data_entry` into `(pipe_id, bytes)`; `size` (the pipe's
/// capacity at dump time) is not needed and skipped like any unknown field.
fn parse_pipe_data_entry(msg: &[u8]) -> Result<(u32, u32), ParseError> {
    let (mut pipe_id, mut bytes) = (None, None);
    for_each_field(msg, &mut |field, at, value| {
        if let (1 | 2, Field::Varint(v)) = (field, value) {
            let v = u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?;
            if field == 1 {
                pipe_id = Some(v);
            } else {
                bytes = Some(v);
            }
        }
        Ok(())
    })?;
    match (pipe_id, bytes) {
        (Some(pipe_id), Some(bytes)) => Ok((pipe_id, bytes)),
        _ => Err((0, "pipe_data_entry lacks pipe_id or bytes")),
    }
}

/// How many ghost files `images_dir` holds: files the tree had open after they were deleted,
/// whose contents CRIU keeps in `ghost-file-<id hex>.img` (`CR_FD_GHOST_FILE`, criu/image-desc.c)
/// and recreates at a fixed path on every restore (see `ghosts.rs`).
pub(crate) fn ghost_files(images_dir: &Path) -> Result<usize, ImageError> {
    let io = |source| ImageError::Io {
        path: images_dir.to_owned(),
        source,
    };
    let mut n = 0;
    for entry in std::fs::read_dir(images_dir).map_err(io)? {
        if entry
            .map_err(io)?
            .file_name()
            .to_str()
            .is_some_and(is_ghost_file_image)
        {
            n += 1;
        }
    }
    Ok(n)
}

/// Whether `name` is CRIU's name for a ghost file's image: `ghost-file-<id in hex>.img`.
fn is_ghost_file_image(name: &str) -> bool {
    name.strip_prefix("ghost-file-")
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A file the tree had open by its path (a regular file or a device), as `files.img` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathFile {
    /// Its path in the tree's mount namespace, as `/proc/PID/fd/N` showed it (`/tmp/log`).
    pub name: String,
    /// The `open` flags (`O_WRONLY`, `O_APPEND`, …).
    pub flags: u32,
    /// Its size at the dump, when CRIU recorded one: then a restore refuses the file unless it
    /// still has that size (criu/files-reg.c `validate_file`; CRIU records none for a device,
    /// nor for a file opened write-only for appending, such as a log).
    pub size: Option<u64>,
    /// Its `st_mode` (type and permissions) at the dump, when CRIU recorded one: then a restore
    /// refuses the file unless it still has that mode (criu/files-reg.c, "has bad mode").
    pub mode: Option<u32>,
}

/// The files `images_dir`'s tree had open (or mapped, or as its working directory) by their
/// path (`files.img`: `file_entry { type = 1; id = 2; reg = 3 }` records, `reg_file_entry { id
/// = 1; flags = 2; name = 6; size = 8 }`), less those `remap-fpath.img` remaps (a deleted file
/// CRIU recreates from the images whatever is at its path now); empty when the images have no
/// `files.img` (a CRIU that keeps them per type, in `reg-files.img`).
pub fn path_files(images_dir: &Path) -> Result<Vec<PathFile>, ImageError> {
    Ok(path_files_by_id(images_dir)?
        .into_iter()
        .map(|(_, file)| file)
        .collect())
}

/// [`path_files`] with the id of each record.
fn path_files_by_id(images_dir: &Path) -> Result<Vec<(u32, PathFile)>, ImageError> {
    let read = |name: &str| -> Result<Option<(PathBuf, Vec<u8>)>, ImageError> {
        let path = images_dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some((path, bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImageError::Io { path, source }),
        }
    };
    let malformed = |path: PathBuf| {
        move |(offset, reason)| ImageError::Malformed {
            path,
            offset,
            reason,
        }
    };
    let Some((path, bytes)) = read("files.img")? else {
        return Ok(Vec::new());
    };
    let files = parse_files(&bytes).map_err(malformed(path))?;
    let remapped = match read("remap-fpath.img")? {
        Some((path, bytes)) => parse_remaps(&bytes).map_err(malformed(path))?,
        None => Vec::new(),
    };
    Ok(files
        .into_iter()
        .filter(|(id, _)| !remapped.contains(id))
        .collect())
}

/// Parse `remap-fpath.img`: the magics, then `u32` length + `remap_file_path_entry { orig_id =
/// 1; remap_id = 2; remap_type = 3 }` records; the `orig_id` of each.
fn parse_remaps(img: &[u8]) -> Result<Vec<u32>, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != REMAP_FPATH_MAGIC {
        return Err((4, "not a remap-fpath image (bad magic)"));
    }
    let mut out = Vec::new();
    while r.pos < img.len() {
        let len = r.u32_le()? as usize;
        let msg_at = r.pos;
        let msg = r.take(len, "entry runs past the end of the file")?;
        let mut orig = None;
        for_each_field(msg, &mut |field, at, value| {
            if let (1, Field::Varint(v)) = (field, value) {
                orig = Some(u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?);
            }
            Ok(())
        })
        .map_err(|(off, why)| (msg_at + off, why))?;
        out.push(orig.ok_or((msg_at, "remap_file_path_entry lacks orig_id"))?);
    }
    Ok(out)
}

/// The entries of `files.img` (the magics, then `u32` length + `file_entry { type = 1; … }`
/// records) of type `kind`: each one's message in field `field` (`reg = 3`, `isk = 4`, `usk =
/// 16`), with its offset in the file.
fn file_entries(img: &[u8], kind: u64, field: u64) -> Result<Vec<(usize, &[u8])>, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != FILES_MAGIC {
        return Err((4, "not a files image (bad magic)"));
    }
    let mut out = Vec::new();
    while r.pos < img.len() {
        let len = r.u32_le()? as usize;
        let msg_at = r.pos;
        let msg = r.take(len, "entry runs past the end of the file")?;
        let (mut this, mut inner) = (None, None);
        for_each_field(msg, &mut |f, _, value| {
            match (f, value) {
                (1, Field::Varint(v)) => this = Some(v),
                (f, Field::Bytes(b)) if f == field => {
                    inner = Some((b.as_ptr() as usize - msg.as_ptr() as usize, b));
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|(off, why)| (msg_at + off, why))?;
        if let (Some(this), Some((at, inner))) = (this, inner)
            && this == kind
        {
            out.push((msg_at + at, inner));
        }
    }
    Ok(out)
}

/// Parse `files.img`: the magics, then `u32` length + `file_entry` records; the `reg` of each
/// of type `REG`, with its id.
fn parse_files(img: &[u8]) -> Result<Vec<(u32, PathFile)>, ParseError> {
    let mut out = Vec::new();
    for (reg_at, reg) in file_entries(img, FD_TYPE_REG, 3)? {
        let (mut id, mut flags, mut name, mut size, mut mode) = (None, None, None, None, None);
        for_each_field(reg, &mut |field, at, value| {
            match (field, value) {
                (1, Field::Varint(v)) => {
                    id = Some(u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?);
                }
                (2, Field::Varint(v)) => {
                    flags = Some(u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?);
                }
                // Compared with paths `/proc` shows: a name that is not UTF-8 matches none.
                (6, Field::Bytes(b)) => name = Some(String::from_utf8_lossy(b).into_owned()),
                (8, Field::Varint(v)) => size = Some(v),
                (10, Field::Varint(v)) => {
                    mode = Some(u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?);
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|(off, why)| (reg_at + off, why))?;
        match (id, flags, name) {
            (Some(id), Some(flags), Some(name)) => out.push((
                id,
                PathFile {
                    name,
                    flags,
                    size,
                    mode,
                },
            )),
            _ => return Err((reg_at, "reg_file_entry lacks id, flags or name")),
        }
    }
    Ok(out)
}

/// `FD_TYPES__INETSK` in a `file_entry`: an IPv4 or IPv6 socket.
const FD_TYPE_INETSK: u64 = 4;
/// `TCP_LISTEN` in an `inet_sk_entry`'s `state`.
const TCP_LISTEN: u64 = 10;

/// The TCP addresses `images_dir`'s tree listens on (`files.img`: `file_entry { type = 1; isk =
/// 4 }` records, `inet_sk_entry { family = 3; proto = 5; state = 6; src_port = 7; src_addr = 11
/// }` with state `TCP_LISTEN`), in the order recorded; empty without a `files.img`. CRIU
/// restores a listening socket bound to its address even while another socket listens there.
pub fn listening_tcp(images_dir: &Path) -> Result<Vec<std::net::SocketAddr>, ImageError> {
    parse_files_img(images_dir, parse_listening_tcp)
}

/// `images_dir`'s `files.img` parsed by `parse`; empty when there is none.
fn parse_files_img<T>(
    images_dir: &Path,
    parse: fn(&[u8]) -> Result<Vec<T>, ParseError>,
) -> Result<Vec<T>, ImageError> {
    let path = images_dir.join("files.img");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ImageError::Io { path, source }),
    };
    parse(&bytes).map_err(|(offset, reason)| ImageError::Malformed {
        path,
        offset,
        reason,
    })
}

/// `FD_TYPES__PIPE` in a `file_entry`.
const FD_TYPE_PIPE: u64 = 2;

/// One end of an anonymous pipe the tree had open, as `files.img` records it: one per open
/// file description, so a pipe both of whose ends were in the tree has at least two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeEnd {
    /// The pipe's inode, as `/proc/PID/fd/N` showed it (`pipe:[N]`).
    pub pipe: u64,
    /// The `open` flags of this end (`O_WRONLY` for the writing end).
    pub flags: u32,
}

impl PipeEnd {
    /// Whether this is a reading end.
    pub fn reads(&self) -> bool {
        self.flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32
    }
}

/// The pipe ends `images_dir`'s tree had open (`files.img`: `file_entry { type = 1; pipe = 18
/// }` records, `pipe_entry { id = 1; pipe_id = 2; flags = 3 }`), in the order recorded; empty
/// without a `files.img`.
pub fn pipe_ends(images_dir: &Path) -> Result<Vec<PipeEnd>, ImageError> {
    parse_files_img(images_dir, parse_pipe_ends)
}

/// Parse `files.img` for [`pipe_ends`].
fn parse_pipe_ends(img: &[u8]) -> Result<Vec<PipeEnd>, ParseError> {
    let mut out = Vec::new();
    for (at, entry) in file_entries(img, FD_TYPE_PIPE, 18)? {
        let (mut pipe, mut flags) = (None, None);
        for_each_field(entry, &mut |field, off, value| {
            match (field, value) {
                (2, Field::Varint(v)) => pipe = Some(v),
                (3, Field::Varint(v)) => {
                    flags = Some(u32::try_from(v).map_err(|_| (off, "uint32 out of range"))?);
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|(off, why)| (at + off, why))?;
        match (pipe, flags) {
            (Some(pipe), Some(flags)) => out.push(PipeEnd { pipe, flags }),
            _ => return Err((at, "pipe_entry lacks pipe_id or flags")),
        }
    }
    Ok(out)
}

/// Parse `files.img` for [`listening_tcp`].
fn parse_listening_tcp(img: &[u8]) -> Result<Vec<std::net::SocketAddr>, ParseError> {
    let mut out = Vec::new();
    for (isk_at, isk) in file_entries(img, FD_TYPE_INETSK, 4)? {
        let (mut proto, mut state, mut port, mut addr) = (None, None, None, Vec::new());
        for_each_field(isk, &mut |field, at, value| {
            match (field, value) {
                (5, Field::Varint(v)) => proto = Some(v),
                (6, Field::Varint(v)) => state = Some(v),
                (7, Field::Varint(v)) => {
                    port = Some(u16::try_from(v).map_err(|_| (at, "port out of range"))?);
                }
                // Each word is 4 bytes of the address in network order, read as a host u32.
                (11, Field::Varint(v)) => {
                    let word = u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?;
                    addr.extend_from_slice(&word.to_le_bytes());
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|(off, why)| (isk_at + off, why))?;
        if proto != Some(u64::from(libc::IPPROTO_TCP as u32)) || state != Some(TCP_LISTEN) {
            continue;
        }
        let port = port.ok_or((isk_at, "inet_sk_entry lacks src_port"))?;
        let ip: std::net::IpAddr = match <[u8; 4]>::try_from(addr.as_slice()) {
            Ok(v4) => v4.into(),
            Err(_) => <[u8; 16]>::try_from(addr.as_slice())
                .map_err(|_| (isk_at, "inet_sk_entry src_addr is neither IPv4 nor IPv6"))?
                .into(),
        };
        out.push(std::net::SocketAddr::new(ip, port));
    }
    Ok(out)
}

/// `FD_TYPES__UNIXSK` in a `file_entry`: a unix socket.
const FD_TYPE_UNIXSK: u64 = 5;

/// The paths `images_dir`'s tree listens on with unix sockets (`files.img`: `file_entry { type =
/// 1; usk = 16 }` records, `unix_sk_entry { state = 4; name = 11 }` with state `TCP_LISTEN` and a
/// name that is a path, not an abstract address); empty without a `files.img`. CRIU binds each
/// again at its path, which fails when its directory is gone.
pub fn listening_unix(images_dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    parse_files_img(images_dir, parse_listening_unix)
}

/// Parse `files.img` for [`listening_unix`].
fn parse_listening_unix(img: &[u8]) -> Result<Vec<PathBuf>, ParseError> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut out = Vec::new();
    for (usk_at, usk) in file_entries(img, FD_TYPE_UNIXSK, 16)? {
        let (mut state, mut name) = (None, None);
        for_each_field(usk, &mut |field, _, value| {
            match (field, value) {
                (4, Field::Varint(v)) => state = Some(v),
                (11, Field::Bytes(b)) => name = Some(b),
                _ => {}
            }
            Ok(())
        })
        .map_err(|(off, why)| (usk_at + off, why))?;
        if let (Some(TCP_LISTEN), Some(name)) = (state, name)
            && name.first() == Some(&b'/')
        {
            // A `sun_path`: the NUL that ends it may be recorded too.
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            out.push(PathBuf::from(std::ffi::OsStr::from_bytes(&name[..end])));
        }
    }
    Ok(out)
}

/// Every pid and thread id recorded in `images_dir`'s `pstree.img`, root first, deduplicated
/// (these must be free for a restore in our pid namespace).
pub(crate) fn pstree_pids(images_dir: &Path) -> Result<Vec<i32>, ImageError> {
    let path = images_dir.join("pstree.img");
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Io {
        path: path.clone(),
        source,
    })?;
    parse_pstree(&bytes).map_err(|(offset, reason)| ImageError::Malformed {
        path,
        offset,
        reason,
    })
}

/// Parse `pstree.img`: the magics, then `u32` length + `pstree_entry { pid = 1; ppid = 2;
/// pgid = 3; sid = 4; repeated threads = 5 }` records (threads plain or packed).
fn parse_pstree(img: &[u8]) -> Result<Vec<i32>, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != PSTREE_MAGIC {
        return Err((4, "not a pstree image (bad magic)"));
    }
    let mut out: Vec<i32> = Vec::new();
    // A zombie's entry carries a meaningless thread id (CRIU 4.2.1 wrote 3280913872 for a
    // `sleep` that had just exited): numbers no pid can be are skipped, not errors.
    let mut push = |_at: usize, v: u64| -> Result<(), ParseError> {
        if let Ok(v) = i32::try_from(v)
            && v > 0
            && !out.contains(&v)
        {
            out.push(v);
        }
        Ok(())
    };
    while r.pos < img.len() {
        let len = r.u32_le()? as usize;
        let msg_at = r.pos;
        let msg = r.take(len, "entry runs past the end of the file")?;
        for_each_field(msg, &mut |field, at, value| match (field, value) {
            (1 | 5, Field::Varint(v)) => push(msg_at + at, v),
            (5, Field::Bytes(packed)) => {
                let mut p = Reader {
                    buf: packed,
                    pos: 0,
                };
                while p.pos < packed.len() {
                    push(msg_at + at + p.pos, p.varint()?)?;
                }
                Ok(())
            }
            _ => Ok(()),
        })
        .map_err(|(off, why)| (msg_at + off, why))?;
    }
    Ok(out)
}

/// Make a tree whose root leads its own session, dumped as a shell job (a shell in a terminal
/// emulator or tmux), join the session of whoever restores it, by giving every process of the
/// root's session a session id that is no pid of the tree (`pstree.img` rewritten in place,
/// through a temporary file and a rename). `criu restore --shell-job` then moves that session to
/// its own (criu/pstree.c, `prepare_pstree_for_shell_job`) and makes the root's group the
/// foreground group of the terminal it inherits (criu/tty.c). Left a session leader, the root
/// gets a session of its own that no terminal can be given to: no job control, and Ctrl-C or
/// Ctrl-Z typed at it went to the process that restored it. Returns whether anything changed
/// (not for a root that was already a job of another session, nor for a root that is pid 1).
pub fn join_restorers_session(images_dir: &Path) -> Result<bool, ImageError> {
    let path = images_dir.join("pstree.img");
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Io {
        path: path.clone(),
        source,
    })?;
    let malformed = |(offset, reason)| ImageError::Malformed {
        path: path.clone(),
        offset,
        reason,
    };
    let Some(rewritten) = sessions_joined(&bytes).map_err(malformed)? else {
        return Ok(false);
    };
    // Our own name: two restores of one images dir may rewrite it at once (the same bytes).
    let tmp = images_dir.join(format!(
        "pstree.img.pf-tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, &rewritten)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            ImageError::Io {
                path: path.clone(),
                source,
            }
        })?;
    Ok(true)
}

/// [`join_restorers_session`] on the bytes of a `pstree.img`: the rewritten image, or `None`
/// when its root does not lead its session. Every field but `sid` (4) is kept as it was.
fn sessions_joined(img: &[u8]) -> Result<Option<Vec<u8>>, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != PSTREE_MAGIC {
        return Err((4, "not a pstree image (bad magic)"));
    }
    let mut entries: Vec<&[u8]> = Vec::new();
    while r.pos < img.len() {
        let len = r.u32_le()? as usize;
        entries.push(r.take(len, "entry runs past the end of the file")?);
    }
    // Every number the tree uses as a pid, group or session, and each entry's pid and sid.
    let mut used: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    let mut ids: Vec<(Option<u64>, Option<u64>)> = Vec::with_capacity(entries.len());
    for msg in &entries {
        let (mut pid, mut sid) = (None, None);
        for_each_field(msg, &mut |field, _, value| {
            match (field, value) {
                (1..=5, Field::Varint(v)) => {
                    used.insert(v);
                    match field {
                        1 => pid = Some(v),
                        4 => sid = Some(v),
                        _ => {}
                    }
                }
                (5, Field::Bytes(packed)) => {
                    let mut p = Reader {
                        buf: packed,
                        pos: 0,
                    };
                    while p.pos < packed.len() {
                        used.insert(p.varint()?);
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        ids.push((pid, sid));
    }
    let Some(&(Some(root), Some(root_sid))) = ids.first() else {
        return Err((8, "the root's entry has no pid or no sid"));
    };
    // A root that is pid 1 is a whole pid namespace's init, which must lead its session.
    if root_sid != root || root == 1 {
        return Ok(None);
    }
    // A number no process of the tree has or leads: criu replaces it with its own session. Small,
    // because criu raises the kernel's pid_max to the largest number it reads.
    let outside = (2u64..).find(|n| !used.contains(n)).unwrap_or(2);
    let mut out = Vec::with_capacity(img.len() + entries.len() * 4);
    out.extend_from_slice(&img[..8]);
    for (msg, &(_, sid)) in entries.iter().zip(&ids) {
        if sid != Some(root) {
            push_entry(&mut out, msg);
            continue;
        }
        let mut entry = Vec::with_capacity(msg.len() + 4);
        let mut r = Reader { buf: msg, pos: 0 };
        while r.pos < msg.len() {
            let start = r.pos;
            let key = r.varint()?;
            match key & 7 {
                0 if key >> 3 == 4 => {
                    r.varint()?;
                    put_varint_field(&mut entry, 4, outside);
                    continue;
                }
                0 => {
                    r.varint()?;
                }
                1 => {
                    r.take(8, "truncated 64-bit field")?;
                }
                2 => {
                    let len = r.varint()? as usize;
                    r.take(len, "truncated length-delimited field")?;
                }
                5 => {
                    r.take(4, "truncated 32-bit field")?;
                }
                _ => return Err((r.pos, "unsupported protobuf wire type")),
            }
            entry.extend_from_slice(&msg[start..r.pos]);
        }
        push_entry(&mut out, &entry);
    }
    Ok(Some(out))
}

/// CRIU's own figures for the dump that wrote `stats-dump` into `work_dir` (criu's work
/// directory, which is the images directory unless `--work-dir` says otherwise).
pub fn dump_stats(work_dir: &Path) -> Result<DumpStats, ImageError> {
    let path = work_dir.join(STATS_DUMP_FILE);
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Io {
        path: path.clone(),
        source,
    })?;
    parse_dump_stats(&bytes).map_err(|(offset, reason)| ImageError::Malformed {
        path,
        offset,
        reason,
    })
}

/// Parse a whole `stats-dump`: the service magics, then one entry holding `stats_entry`, whose
/// field 1 is `dump_stats_entry`:
///
/// ```text
/// message dump_stats_entry {
///     required uint32 freezing_time = 1;  required uint32 frozen_time = 2;
///     required uint32 memdump_time = 3;   required uint32 memwrite_time = 4;
///     required uint64 pages_scanned = 5;  required uint64 pages_skipped_parent = 6;
///     required uint64 pages_written = 7;  optional uint32 irmap_resolve = 8;
///     required uint64 pages_lazy = 9;     (10 and up: page pipe and shmem counters)
/// }
/// ```
///
/// The times are microseconds (CRIU's `encode_time`).
fn parse_dump_stats(img: &[u8]) -> Result<DumpStats, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_SERVICE_MAGIC {
        return Err((0, "not a criu service image (bad service magic)"));
    }
    if r.u32_le()? != STATS_MAGIC {
        return Err((4, "not a stats image (bad magic)"));
    }
    let len = r.u32_le()? as usize;
    let entry_at = r.pos;
    let entry = r.take(len, "entry runs past the end of the file")?;
    let mut dump = None;
    for_each_field(entry, &mut |field, at, value| {
        if let (1, Field::Bytes(msg)) = (field, value) {
            dump = Some((at, msg));
        }
        Ok(())
    })
    .map_err(|(off, why)| (entry_at + off, why))?;
    let (at, msg) = dump.ok_or((entry_at, "stats entry has no dump statistics"))?;
    let at = entry_at + at;
    let mut got = [None::<u64>; 10];
    for_each_field(msg, &mut |field, _, value| {
        if let (Some(slot), Field::Varint(v)) = (got.get_mut(field as usize), value) {
            *slot = Some(v);
        }
        Ok(())
    })
    .map_err(|(off, why)| (at + off, why))?;
    let required = |field: usize| got[field].ok_or((at, "dump_stats_entry lacks a required field"));
    Ok(DumpStats {
        freezing_time_us: required(1)?,
        frozen_time_us: required(2)?,
        memdump_time_us: required(3)?,
        memwrite_time_us: required(4)?,
        pages_scanned: required(5)?,
        pages_skipped_parent: required(6)?,
        pages_written: required(7)?,
        pages_lazy: got[9].unwrap_or(0),
    })
}

/// A parsed `pagemap-*.img`: which pages file it describes and its runs of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// The `N` of the `pages-N.img` that holds the present runs' bytes.
    pub pages_id: u32,
    /// The runs, in file order.
    pub entries: Vec<PagemapEntry>,
}

/// One `pagemap_entry`: `nr_pages` pages from `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// The first page's address.
    pub vaddr: u64,
    /// How many pages.
    pub nr_pages: u64,
    /// `PE_PARENT`, `PE_LAZY`, `PE_PRESENT`.
    pub flags: u32,
}

impl Pagemap {
    /// Pages the pages file holds: the sum over runs with `PE_PRESENT`.
    pub fn present_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.flags & PE_PRESENT != 0)
            .map(|e| e.nr_pages)
            .sum()
    }

    /// The address of page number `n` of the pages file (the `n`-th present page).
    pub fn address_of(&self, mut n: u64) -> Option<u64> {
        for e in self.entries.iter().filter(|e| e.flags & PE_PRESENT != 0) {
            if n < e.nr_pages {
                return e.vaddr.checked_add(n.checked_mul(4096)?);
            }
            n -= e.nr_pages;
        }
        None
    }
}

/// The image files `<prefix>*.img` in `images_dir` (one per process: `mm-`, `pagemap-`).
fn image_files(images_dir: &Path, prefix: &str) -> Result<Vec<PathBuf>, ImageError> {
    let failed = |source| ImageError::Io {
        path: images_dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(images_dir).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(".img") {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Check that every pages file in `images_dir` holds the pages its `pagemap-*.img` lists
/// (`PE_PRESENT` runs, 4 KiB each). CRIU's restorer reads a short one forever (`preadv`
/// returning 0, logged at every turn: gigabytes of log until its deadline), so a truncated or
/// mismatched file is refused before CRIU runs.
pub fn check_pages_files(images_dir: &Path) -> Result<(), ImageError> {
    for path in image_files(images_dir, "pagemap-")? {
        let map = pagemap(&path)?;
        let want = map.present_pages().saturating_mul(4096);
        if want == 0 {
            continue;
        }
        let pages = images_dir.join(format!("pages-{}.img", map.pages_id));
        let len = std::fs::metadata(&pages)
            .map_err(|source| ImageError::Io {
                path: pages.clone(),
                source,
            })?
            .len();
        if len < want {
            return Err(ImageError::Malformed {
                path: pages,
                offset: usize::try_from(len).unwrap_or(usize::MAX),
                reason: "it ends before the pages its pagemap lists do: truncated, or not of \
                         these images",
            });
        }
    }
    Ok(())
}

/// Parse the pagemap image at `path`.
pub fn pagemap(path: &Path) -> Result<Pagemap, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_pagemap(&bytes).map_err(|(offset, reason)| ImageError::Malformed {
        path: path.to_owned(),
        offset,
        reason,
    })
}

/// Parse a whole `pagemap-*.img`:
///
/// ```text
/// message pagemap_head  { required uint32 pages_id = 1; }
/// message pagemap_entry {
///     required uint64 vaddr = 1;
///     optional uint32 compat_nr_pages = 2;   (CRIU < 4.2: `required uint32 nr_pages = 2`)
///     optional bool   in_parent = 3;         (before flags existed)
///     optional uint32 flags = 4;             (PE_PARENT 1, PE_LAZY 2, PE_PRESENT 4)
///     optional uint64 nr_pages = 5;          (CRIU >= 4.2)
/// }
/// ```
///
/// `nr_pages` is field 5 when present, else field 2; an entry without flags is `PE_PARENT` when
/// `in_parent` is set, else `PE_PRESENT` (what CRIU itself assumes for old images).
fn parse_pagemap(img: &[u8]) -> Result<Pagemap, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != PAGEMAP_MAGIC {
        return Err((4, "not a pagemap image (bad magic)"));
    }
    let head_at = r.pos;
    let len = r.u32_le()? as usize;
    let head = r.take(len, "entry runs past the end of the file")?;
    let mut pages_id = None;
    for_each_field(head, &mut |field, at, value| {
        if let (1, Field::Varint(v)) = (field, value) {
            pages_id = Some(u32::try_from(v).map_err(|_| (at, "uint32 out of range"))?);
        }
        Ok(())
    })
    .map_err(|(off, why)| (head_at + 4 + off, why))?;
    let pages_id = pages_id.ok_or((head_at, "pagemap_head lacks pages_id"))?;
    let mut entries = Vec::new();
    while r.pos < img.len() {
        let entry_at = r.pos;
        let len = r.u32_le()? as usize;
        let msg = r.take(len, "entry runs past the end of the file")?;
        let mut got = [None::<u64>; 6];
        for_each_field(msg, &mut |field, _, value| {
            if let (Some(slot), Field::Varint(v)) = (got.get_mut(field as usize), value) {
                *slot = Some(v);
            }
            Ok(())
        })
        .map_err(|(off, why)| (entry_at + 4 + off, why))?;
        let vaddr = got[1].ok_or((entry_at, "pagemap_entry lacks vaddr"))?;
        let nr_pages = got[5]
            .or(got[2])
            .ok_or((entry_at, "pagemap_entry lacks nr_pages"))?;
        let flags = match got[4] {
            Some(f) => u32::try_from(f).map_err(|_| (entry_at, "flags out of range"))?,
            None if got[3].unwrap_or(0) != 0 => PE_PARENT,
            None => PE_PRESENT,
        };
        entries.push(PagemapEntry {
            vaddr,
            nr_pages,
            flags,
        });
    }
    Ok(Pagemap { pages_id, entries })
}

/// One memory area of a process, from `mm-<pid>.img` (the fields lazy restore needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `mmap` flags (`MAP_PRIVATE`, `MAP_ANONYMOUS`, …).
    pub flags: u32,
    /// CRIU's `VMA_AREA_*` status bits.
    pub status: u32,
    /// The `madvise` advice in force, as a bitmap (`1 << MADV_*`; 0 when the image has none).
    pub madv: u64,
    /// `mmap` protection (`PROT_READ`, `PROT_WRITE`, …).
    pub prot: u32,
    /// What the area maps: for a file, the id of its `files.img` record.
    pub shmid: u64,
}

/// CRIU's `VMA_FILE_SHARED` status bit: a file mapped `MAP_SHARED`.
const VMA_FILE_SHARED: u32 = 1 << 7;
/// CRIU's `VMA_AREA_MEMFD` status bit: a memfd (its `shmid` names no `files.img` record).
const VMA_AREA_MEMFD: u32 = 1 << 14;

/// CRIU's `VMA_AREA_VSYSCALL`, `VMA_AREA_VDSO` and `VMA_AREA_VVAR` status bits: areas the kernel
/// provides, never served lazily.
const VMA_AREA_KERNEL: u32 = (1 << 2) | (1 << 3) | (1 << 12);

impl Vma {
    /// Whether CRIU restores this area's pages through userfaultfd when asked to restore lazily
    /// (CRIU's `vma_entry_can_be_lazy`: private anonymous memory, not locked, not huge pages,
    /// not an area the kernel provides).
    pub fn can_be_lazy(&self) -> bool {
        let flags = self.flags as i32;
        flags & libc::MAP_ANONYMOUS != 0
            && flags & libc::MAP_PRIVATE != 0
            && flags & libc::MAP_LOCKED == 0
            && flags & libc::MAP_HUGETLB == 0
            && self.status & VMA_AREA_KERNEL == 0
    }
}

impl Vma {
    /// Whether this area maps a file by its path, shared and writable (`MAP_SHARED`,
    /// `PROT_WRITE`): a restore maps that same file again, so what one copy of the tree writes
    /// there every other copy (and the original) sees.
    pub fn writes_a_shared_file(&self) -> bool {
        self.status & VMA_FILE_SHARED != 0
            && self.status & VMA_AREA_MEMFD == 0
            && self.prot & libc::PROT_WRITE as u32 != 0
    }
}

/// The files `images_dir`'s tree maps shared and writable ([`Vma::writes_a_shared_file`], in
/// any `mm-*.img`) by a path CRIU maps again at a restore (not a deleted file it recreates),
/// sorted, each once.
pub fn shared_writable_files(images_dir: &Path) -> Result<Vec<String>, ImageError> {
    let mut ids = Vec::new();
    for path in image_files(images_dir, "mm-")? {
        ids.extend(
            mm_vmas(&path)?
                .iter()
                .filter(|v| v.writes_a_shared_file())
                .map(|v| v.shmid),
        );
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // A deleted file (`shm_open` then `shm_unlink`) CRIU makes anew for each restore
    // (remap-fpath.img): the copies do not share it.
    let mut paths: Vec<String> = path_files_by_id(images_dir)?
        .into_iter()
        .filter(|(id, _)| ids.contains(&u64::from(*id)))
        .map(|(_, file)| file.name)
        .collect();
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// The memory areas recorded in the `mm-<pid>.img` at `path`, in address order.
pub fn mm_vmas(path: &Path) -> Result<Vec<Vma>, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_mm_vmas(&bytes).map_err(|(offset, reason)| ImageError::Malformed {
        path: path.to_owned(),
        offset,
        reason,
    })
}

/// Parse the VMAs of a whole `mm-*.img`: one `mm_entry` whose field 14 is
/// `repeated vma_entry { required uint64 start = 1; required uint64 end = 2; …
/// required uint32 flags = 6; required uint32 status = 7; …; optional uint64 madv = 9 … }`.
fn parse_mm_vmas(img: &[u8]) -> Result<Vec<Vma>, ParseError> {
    let mut r = Reader { buf: img, pos: 0 };
    if r.u32_le()? != IMG_COMMON_MAGIC {
        return Err((0, "not a criu image (bad common magic)"));
    }
    if r.u32_le()? != MM_MAGIC {
        return Err((4, "not an mm image (bad magic)"));
    }
    let entry_at = r.pos;
    let len = r.u32_le()? as usize;
    let msg = r.take(len, "entry runs past the end of the file")?;
    let mut vmas = Vec::new();
    for_each_field(msg, &mut |field, at, value| {
        let (14, Field::Bytes(vma)) = (field, value) else {
            return Ok(());
        };
        let mut got = [None::<u64>; 10];
        for_each_field(vma, &mut |field, _, value| {
            if let (Some(slot), Field::Varint(v)) = (got.get_mut(field as usize), value) {
                *slot = Some(v);
            }
            Ok(())
        })
        .map_err(|(off, why)| (at + off, why))?;
        let need = |i: usize, why| got[i].ok_or((at, why));
        let small = |v: u64| u32::try_from(v).map_err(|_| (at, "uint32 out of range"));
        let vma = Vma {
            start: need(1, "vma_entry lacks start")?,
            end: need(2, "vma_entry lacks end")?,
            flags: small(need(6, "vma_entry lacks flags")?)?,
            status: small(need(7, "vma_entry lacks status")?)?,
            madv: got[9].unwrap_or(0),
            prot: small(need(5, "vma_entry lacks prot")?)?,
            shmid: need(4, "vma_entry lacks shmid")?,
        };
        if vma.end < vma.start {
            return Err((at, "vma_entry ends before it starts"));
        }
        vmas.push(vma);
        Ok(())
    })
    .map_err(|(off, why)| (entry_at + 4 + off, why))?;
    vmas.sort_by_key(|v| v.start);
    Ok(vmas)
}

/// Write `map` as a `pagemap-*.img` at `path` (replacing it), as CRIU 4.2 writes one: every
/// entry with its `flags` and a 64-bit `nr_pages` (and the legacy 32-bit field at 0, which
/// CRIU ignores when the 64-bit one is there).
pub fn write_pagemap(path: &Path, map: &Pagemap) -> Result<(), ImageError> {
    let mut out = Vec::with_capacity(16 + map.entries.len() * 24);
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let mut msg = Vec::new();
    put_varint_field(&mut msg, 1, u64::from(map.pages_id));
    push_entry(&mut out, &msg);
    for e in &map.entries {
        msg.clear();
        put_varint_field(&mut msg, 1, e.vaddr);
        put_varint_field(&mut msg, 2, 0);
        put_varint_field(&mut msg, 4, u64::from(e.flags));
        put_varint_field(&mut msg, 5, e.nr_pages);
        push_entry(&mut out, &msg);
    }
    std::fs::write(path, &out).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })
}

fn push_entry(out: &mut Vec<u8>, msg: &[u8]) {
    // Entries are a few bytes: far below u32::MAX.
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One protobuf field's value: a varint, or the bytes of a length-delimited field (fixed-size
/// fields are skipped; no CRIU message read here has one).
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Call `f(field number, offset of the value, value)` for each varint and length-delimited
/// field of the protobuf message `msg`; fixed-size fields are skipped, as protobuf readers skip
/// unknown fields.
fn for_each_field<'a>(
    msg: &'a [u8],
    f: &mut dyn FnMut(u64, usize, Field<'a>) -> Result<(), ParseError>,
) -> Result<(), ParseError> {
    let mut r = Reader { buf: msg, pos: 0 };
    while r.pos < msg.len() {
        let key = r.varint()?;
        let (field, wire_type) = (key >> 3, key & 7);
        let at = r.pos;
        match wire_type {
            0 => f(field, at, Field::Varint(r.varint()?))?,
            1 => {
                r.take(8, "truncated 64-bit field")?;
            }
            2 => {
                let len = r.varint()? as usize;
                let at = r.pos;
                f(
                    field,
                    at,
                    Field::Bytes(r.take(len, "truncated length-delimited field")?),
                )?;
            }
            5 => {
                r.take(4, "truncated 32-bit field")?;
            }
            _ => return Err((r.pos, "unsupported protobuf wire type")),
        }
    }
    Ok(())
}

/// A cursor over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, why: &'static str) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or((self.pos, why))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32_le(&mut self) -> Result<u32, ParseError> {
        let b = self.take(4, "truncated u32")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u64, ParseError> {
        let start = self.pos;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or((start, "truncated varint"))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err((start, "varint longer than 10 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghost_file_images_are_counted_by_criu_name() {
        for name in ["ghost-file-1.img", "ghost-file-1a.img", "ghost-file-FF.img"] {
            assert!(is_ghost_file_image(name), "{name}");
        }
        for name in [
            "ghost-file-.img",
            "ghost-file-1.img.tmp",
            "ghost-file-xyz.img",
            "remap-fpath.img",
            "files.img",
            "pages-1.img",
        ] {
            assert!(!is_ghost_file_image(name), "{name}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["pstree.img", "remap-fpath.img", "ghost-file-1.img"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        assert_eq!(ghost_files(dir.path()).expect("list"), 1);
        std::fs::write(dir.path().join("ghost-file-2.img"), b"").expect("write");
        assert_eq!(ghost_files(dir.path()).expect("list"), 2);
        let gone = dir.path().join("gone");
        assert!(matches!(ghost_files(&gone), Err(ImageError::Io { path, .. }) if path == gone));
    }

    /// A `files.img` of three entries: `/tmp/log` opened write-only at 6 bytes, a pipe, and
    /// `/dev/null` read-write (no size: a device).
    fn files_img() -> Vec<u8> {
        let mut img = b"\x19\x43\x56\x54\x38\x31\x30\x56".to_vec();
        let mut log_reg = vec![0x08, 5, 0x10, 0x01, 0x18, 0, 0x2a, 0, 0x32, 8];
        log_reg.extend_from_slice(b"/tmp/log");
        log_reg.extend_from_slice(&[0x40, 6]);
        let mut null_reg = vec![0x08, 7, 0x10, 0x82, 0x80, 0x02, 0x18, 0, 0x2a, 0, 0x32, 9];
        null_reg.extend_from_slice(b"/dev/null");
        let mut entries = Vec::new();
        for (kind, id, reg) in [(1, 5, Some(log_reg)), (2, 6, None), (1, 7, Some(null_reg))] {
            let mut e = vec![0x08, kind, 0x10, id];
            if let Some(reg) = reg {
                e.push(0x1a);
                e.push(u8::try_from(reg.len()).expect("short"));
                e.extend_from_slice(&reg);
            }
            entries.push(e);
        }
        for e in entries {
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(&e);
        }
        img
    }

    /// `files.img` written by CRIU 4.2.1 dumping `setsid sleep 1000 < /dev/null >
    /// /work/scratch-rf/fimg-out.log 2>> /work/scratch-rf/fimg-err.log`.
    const REAL_FILES: &[u8] = include_bytes!("testdata/files-criu-4.2.1.img");

    #[test]
    fn a_real_files_image_gives_sizes_and_modes_as_criu_checks_them() {
        let files = parse_files(REAL_FILES).expect("parse");
        let find = |name: &str| {
            files
                .iter()
                .map(|(_, f)| f)
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name} in {files:?}"))
        };
        // `>`: write-only, not appending: its size is checked (it was empty), and its mode.
        let out = find("/work/scratch-rf/fimg-out.log");
        assert_eq!(out.flags & libc::O_ACCMODE as u32, libc::O_WRONLY as u32);
        assert_eq!(out.size, Some(0));
        assert_eq!(out.mode.map(|m| m & libc::S_IFMT), Some(libc::S_IFREG));
        // `>>`: write-only and appending, a log: no size.
        let err = find("/work/scratch-rf/fimg-err.log");
        assert_ne!(err.flags & libc::O_APPEND as u32, 0);
        assert_eq!(err.size, None);
        // A device: no size; the program, mapped: its size.
        assert_eq!(find("/dev/null").size, None);
        assert!(find("/usr/bin/sleep").size.is_some_and(|s| s > 0));
    }

    #[test]
    fn files_image_gives_the_files_opened_by_path_with_their_recorded_size() {
        let img = files_img();
        assert_eq!(
            parse_files(&img),
            Ok(vec![
                (
                    5,
                    PathFile {
                        name: "/tmp/log".into(),
                        flags: 1,
                        size: Some(6),
                        mode: None,
                    }
                ),
                (
                    7,
                    PathFile {
                        name: "/dev/null".into(),
                        flags: 0x8002,
                        size: None,
                        mode: None,
                    }
                ),
            ])
        );
        assert!(parse_files(&img[..img.len() - 3]).is_err(), "truncated");
        assert_eq!(
            parse_files(b"\x19\x43\x56\x54\x30\x30\x27\x50"),
            Err((4, "not a files image (bad magic)"))
        );
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(path_files(dir.path()).expect("no files.img"), vec![]);
        std::fs::write(dir.path().join("files.img"), &img).expect("write");
        assert_eq!(path_files(dir.path()).expect("read").len(), 2);
    }

    #[test]
    fn files_image_gives_the_tcp_addresses_listened_on() {
        // files.img from CRIU 4.2.1 of a Python goblin listening on 127.0.0.1:36385: its
        // executable (a REG entry, cut short here: skipped), then the socket.
        let mut img = b"\x19\x43\x56\x54\x38\x31\x30\x56".to_vec();
        let reg = b"\x08\x01\x10\x01\x1a\x0e\x08\x01\x10\x00\x18\x00\x2a\x00\x32\x04/bin";
        let isk = b"\x08\x04\x10\x1f\x22\x6a\x08\x1f\x10\xc1\xba\xbb\x01\x18\x02\x20\x01\x28\
\x06\x30\x0a\x38\xa1\x9c\x02\x40\x00\x48\x02\x50\x80\x01\x58\xff\x80\x80\x08\x60\x00\x6a\x0a\x08\
\x00\x10\x00\x18\x00\x20\x00\x28\x00\x72\x29\x08\x80\x80\x01\x10\x80\x80\x08\x18\x00\x20\x00\x28\
\x00\x30\x00\x38\x01\x40\x00\x48\x01\x68\x00\x70\x00\x88\x01\x00\x90\x01\x00\x98\x01\x00\xb8\x01\
\x00\xc8\x01\x00\x82\x01\x02\x38\x40\x90\x01\x02\xa2\x01\x07\x18\x09\x20\xa0\x38\x28\x4b";
        for e in [&reg[..], &isk[..]] {
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(e);
        }
        assert_eq!(
            parse_listening_tcp(&img),
            Ok(vec!["127.0.0.1:36385".parse().expect("addr")])
        );
        // The same socket connected, not listening (state 1, TCP_ESTABLISHED): none.
        let at = img.len() - isk.len() + 19;
        assert_eq!(img[at..at + 2], [0x30, 0x0a]);
        img[at + 1] = 1;
        assert_eq!(parse_listening_tcp(&img), Ok(vec![]));
        assert!(
            parse_listening_tcp(&img[..img.len() - 3]).is_err(),
            "truncated"
        );
        assert_eq!(parse_listening_tcp(&files_img()), Ok(vec![]));
    }

    #[test]
    fn files_image_gives_the_unix_socket_paths_listened_on() {
        // files.img entries from CRIU 4.2.1 of `multiprocessing.Manager()`'s server: the
        // listening socket bound to its path, and an accepted connection (no name).
        let mut img = b"\x19\x43\x56\x54\x38\x31\x30\x56".to_vec();
        let hex = [
            "0805103382018201083310bc91bc011801200a28023000381040004a0a080010001800200028005\
             22d0880800d1080800d18002000280030003800400048015800600068007000880100900100980100\
             b80100c801005a252f746d702f70796d702d33336f686972696d2f6c697374656e65722d386f7370\
             6f663735006a0808ed830310001800800102",
            "08051034820156083410be91bc011801200128023000380040bd91bc014a0a0800100018002000280\
             0522d0880800d1080800d1800200028003000380040004801580060006800700088010090010098010\
             0b80100c801005a00800102",
        ];
        for e in hex {
            let e: Vec<u8> = (0..e.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&e[i..i + 2], 16).expect("hex"))
                .collect();
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(&e);
        }
        assert_eq!(
            parse_listening_unix(&img),
            Ok(vec![PathBuf::from("/tmp/pymp-33ohirim/listener-8ospof75")])
        );
        assert_eq!(parse_listening_tcp(&img), Ok(vec![]));
        assert!(
            parse_listening_unix(&img[..img.len() - 3]).is_err(),
            "truncated"
        );
        assert_eq!(parse_listening_unix(&files_img()), Ok(vec![]));
    }

    #[test]
    fn files_image_gives_every_pipe_end_with_its_direction() {
        // The pipe entries of files.img from CRIU 4.2.1 dumping `python3 -u r8.py < <(sleep
        // 600) > >(cat > r8.out) 2>&1`: python's stdin (525948, read) and stdout (525952,
        // written), the descriptors bash left it with, a pipe of the shell that started it
        // (525943), sleep writing python's stdin and cat reading its stdout.
        let hex = [
            "08021015920116081510fc8c2018808002220a08001000180020002800",
            "08021016920116081610808d2018818002220a08001000180020002800",
            "08021018920114081810808d201801220a08001000180020002800",
            "08021019920114081910fc8c201800220a08001000180020002800",
            "0802101a920114081a10f78c201801220a08001000180020002800",
            "0802102a920114082a10fc8c201801220a08001000180020002800",
            "0802102f920114082f10808d201800220a08001000180020002800",
        ];
        let mut img = files_img();
        for e in hex {
            let e: Vec<u8> = (0..e.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&e[i..i + 2], 16).expect("hex"))
                .collect();
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(&e);
        }
        let ends = parse_pipe_ends(&img).expect("parse");
        let got: Vec<(u64, bool)> = ends.iter().map(|e| (e.pipe, e.reads())).collect();
        assert_eq!(
            got,
            vec![
                (525_948, true),
                (525_952, false),
                (525_952, false),
                (525_948, true),
                (525_943, false),
                (525_948, false),
                (525_952, true),
            ]
        );
        assert_eq!(ends[1].flags, 0x8001, "O_WRONLY | O_LARGEFILE");
        assert!(parse_pipe_ends(&img[..img.len() - 3]).is_err(), "truncated");
        // files_img()'s pipe record carries no pipe_entry: nothing to go by.
        assert_eq!(parse_pipe_ends(&files_img()), Ok(vec![]));
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(pipe_ends(dir.path()).expect("no files.img"), vec![]);
    }

    #[test]
    fn a_file_remapped_to_a_ghost_is_not_one_opened_by_path() {
        // remap-fpath.img from CRIU 4.2.1: two deleted files (ids 0x1c, 0x1e) kept as ghosts.
        let remaps = b"\x19\x43\x56\x54\x54\x39\x13\x59\x06\x00\x00\x00\x08\x1c\x10\x01\
\x18\x01\x06\x00\x00\x00\x08\x1e\x10\x02\x18\x01";
        assert_eq!(parse_remaps(remaps), Ok(vec![0x1c, 0x1e]));
        assert!(parse_remaps(&remaps[..20]).is_err(), "truncated");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("files.img"), files_img()).expect("write");
        // The log (id 5) was deleted: only /dev/null is opened by its path.
        let mut remap_log = remaps[..8].to_vec();
        remap_log.extend_from_slice(b"\x06\x00\x00\x00\x08\x05\x10\x01\x18\x01");
        std::fs::write(dir.path().join("remap-fpath.img"), &remap_log).expect("write");
        let names: Vec<String> = path_files(dir.path())
            .expect("read")
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, vec!["/dev/null".to_owned()]);
    }

    #[test]
    fn pstree_parses_a_real_image() {
        // pstree.img from CRIU 4.1.1: one process 23655 (pid, ppid 0, pgid, sid, one thread).
        let img = b"\x19\x43\x56\x54\x30\x30\x27\x50\x12\x00\x00\x00\x08\xe7\xb8\x01\
\x10\x00\x18\xe7\xb8\x01\x20\xe7\xb8\x01\x28\xe7\xb8\x01";
        assert_eq!(parse_pstree(img), Ok(vec![23655]));
        assert!(parse_pstree(&img[..20]).is_err());
        assert_eq!(
            parse_pstree(b"\0\0\0\0\x30\x30\x27\x50"),
            Err((0, "not a criu image (bad common magic)"))
        );
    }

    /// A `pstree.img` of `entries` (each its fields as (number, varint value)).
    fn pstree_of(entries: &[&[(u64, u64)]]) -> Vec<u8> {
        let mut img = b"\x19\x43\x56\x54\x30\x30\x27\x50".to_vec();
        for fields in entries {
            let mut msg = Vec::new();
            for &(field, value) in *fields {
                put_varint_field(&mut msg, field, value);
            }
            push_entry(&mut img, &msg);
        }
        img
    }

    #[test]
    fn a_session_leading_shell_joins_the_restorers_session() {
        // bash 3206 leads its session and group; its job `sleep 1000 &` (3210, group 3210);
        // a `setsid` daemon it started (3220) leads a session of its own and stays so.
        let img = pstree_of(&[
            &[(1, 3206), (2, 0), (3, 3206), (4, 3206), (5, 3206)],
            &[(1, 3210), (2, 3206), (3, 3210), (4, 3206), (5, 3210)],
            &[(1, 3220), (2, 3206), (3, 3220), (4, 3220), (5, 3220)],
        ]);
        let out = sessions_joined(&img).expect("parse").expect("rewritten");
        assert_eq!(
            out,
            pstree_of(&[
                &[(1, 3206), (2, 0), (3, 3206), (4, 2), (5, 3206)],
                &[(1, 3210), (2, 3206), (3, 3210), (4, 2), (5, 3210)],
                &[(1, 3220), (2, 3206), (3, 3220), (4, 3220), (5, 3220)],
            ])
        );
        assert_eq!(parse_pstree(&out), parse_pstree(&img), "the same pids");
        // Already a job of another session (a goblin frozen with --shell-job): left alone, and
        // so is a rewritten image.
        assert_eq!(sessions_joined(&out), Ok(None));
        let job = pstree_of(&[&[(1, 500), (2, 0), (3, 500), (4, 400), (5, 500)]]);
        assert_eq!(sessions_joined(&job), Ok(None));
        let init = pstree_of(&[&[(1, 1), (2, 0), (3, 1), (4, 1), (5, 1)]]);
        assert_eq!(sessions_joined(&init), Ok(None), "a pid namespace's init");
        // The number chosen is none the tree uses (here 2 and 3 are pids of it).
        let low = pstree_of(&[
            &[(1, 2), (2, 0), (3, 2), (4, 2), (5, 2)],
            &[(1, 3), (2, 2), (3, 3), (4, 2), (5, 3)],
        ]);
        let out = sessions_joined(&low).expect("parse").expect("rewritten");
        assert_eq!(
            out,
            pstree_of(&[
                &[(1, 2), (2, 0), (3, 2), (4, 4), (5, 2)],
                &[(1, 3), (2, 2), (3, 3), (4, 4), (5, 3)],
            ])
        );
        assert!(sessions_joined(&img[..20]).is_err());
        assert!(sessions_joined(&img[..8]).is_err(), "no root");
    }

    #[test]
    fn join_restorers_session_rewrites_the_file_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pstree.img");
        let img = pstree_of(&[&[(1, 77), (2, 0), (3, 77), (4, 77), (5, 77)]]);
        std::fs::write(&path, &img).expect("write");
        assert!(join_restorers_session(dir.path()).expect("rewrite"));
        assert_eq!(
            std::fs::read(&path).expect("read"),
            pstree_of(&[&[(1, 77), (2, 0), (3, 77), (4, 2), (5, 77)]])
        );
        assert!(!join_restorers_session(dir.path()).expect("again"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["pstree.img"]);
    }

    #[test]
    fn pstree_reads_packed_threads_and_many_entries() {
        let mut img = b"\x19\x43\x56\x54\x30\x30\x27\x50".to_vec();
        // pid 10, threads packed [10, 11]
        let e1 = [0x08, 10, 0x10, 0, 0x2a, 2, 10, 11];
        // pid 12, ppid 10, thread 12
        let e2 = [0x08, 12, 0x10, 10, 0x28, 12];
        for e in [&e1[..], &e2[..]] {
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(e);
        }
        assert_eq!(parse_pstree(&img), Ok(vec![10, 11, 12]));
    }

    #[test]
    fn pstree_skips_a_zombies_meaningless_thread_id() {
        // Written by CRIU 4.2.1 for `sh` (15877) whose `sleep` child (7966) had just exited.
        let img = b"\x19\x43\x56\x54\x30\x30\x27\x50\x0e\x00\x00\x00\x08\x85\x3e\x10\
\x00\x18\x85\x3e\x20\x85\x3e\x28\x85\x3e\x12\x00\x00\x00\x08\x9e\x3e\x10\x85\x3e\x18\x85\
\x3e\x20\x85\x3e\x28\xd0\x8b\xbb\x9c\x0c";
        assert_eq!(parse_pstree(img), Ok(vec![7941, 7966]));
    }

    /// The bytes of a real `pipes-data.img` written by CRIU 4.1.1 for a process whose stdin
    /// pipe (inode 21989) held "hello line one\nsecond\n" unread.
    const REAL: &[u8] = b"\x19\x43\x56\x54\x09\x37\x45\x56\x0a\x00\x00\x00\x08\xe5\xab\x01\
\x10\x16\x18\x80\x80\x04hello line one\nsecond\n";

    #[test]
    fn parses_a_real_criu_image() {
        let entries = parse_pipes_data(REAL).expect("parse");
        assert_eq!(
            entries,
            vec![PipeDataEntry {
                pipe_id: 21989,
                data: b"hello line one\nsecond\n",
            }]
        );
    }

    #[test]
    fn several_entries_and_unknown_fields() {
        let mut img = REAL.to_vec();
        // pipe_id 7, bytes 0, an unknown length-delimited field 9 = "xy"; no data follows.
        let msg = [0x08, 0x07, 0x10, 0x00, 0x4a, 0x02, b'x', b'y'];
        img.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        img.extend_from_slice(&msg);
        // pipe_id 8, bytes 3, then "abc".
        let msg = [0x08, 0x08, 0x10, 0x03];
        img.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        img.extend_from_slice(&msg);
        img.extend_from_slice(b"abc");
        let entries = parse_pipes_data(&img).expect("parse");
        let got: Vec<_> = entries.iter().map(|e| (e.pipe_id, e.data)).collect();
        assert_eq!(
            got,
            vec![
                (21989, &b"hello line one\nsecond\n"[..]),
                (7, &b""[..]),
                (8, &b"abc"[..]),
            ]
        );
    }

    #[test]
    fn header_only_is_empty() {
        assert_eq!(parse_pipes_data(&REAL[..8]), Ok(vec![]));
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        assert_eq!(
            parse_pipes_data(b"\0\0\0\0\x09\x37\x45\x56"),
            Err((0, "not a criu image (bad common magic)"))
        );
        assert_eq!(
            parse_pipes_data(b"\x19\x43\x56\x54\x55\x35\x51\x56"),
            Err((4, "not a pipes-data image (bad magic)"))
        );
        assert_eq!(
            parse_pipes_data(&REAL[..REAL.len() - 1]),
            Err((22, "pipe data runs past the end of the file"))
        );
        assert_eq!(
            parse_pipes_data(&REAL[..15]),
            Err((12, "entry runs past the end of the file"))
        );
        let mut no_bytes = REAL[..8].to_vec();
        no_bytes.extend_from_slice(&[2, 0, 0, 0, 0x08, 0x01]);
        assert_eq!(
            parse_pipes_data(&no_bytes),
            Err((12, "pipe_data_entry lacks pipe_id or bytes"))
        );
    }

    #[test]
    fn reads_from_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(PIPES_DATA_FILE), REAL).expect("write");
        assert_eq!(
            pipe_data(dir.path(), 21989).expect("read"),
            b"hello line one\nsecond\n"
        );
        assert_eq!(pipe_data(dir.path(), 1).expect("read"), b"");
        let missing = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            pipe_data(missing.path(), 1),
            Err(ImageError::Io { path, .. }) if path == missing.path().join(PIPES_DATA_FILE)
        ));
    }

    /// The bytes of a real `stats-dump` written by CRIU 4.1.1 after `criu dump --leave-running`
    /// of `sleep`: frozen 16732 µs, 58 pages scanned, 30 written.
    const REAL_STATS: &[u8] = b"\x40\x59\x10\x55\x06\x33\x09\x57\x21\x00\x00\x00\x0a\x1f\
\x08\x68\x10\xdc\x82\x01\x18\xba\x02\x20\x5a\x28\x3a\x30\x00\x38\x1e\x40\x00\x48\x00\x50\x06\
\x58\x06\x60\x00\x68\x00\x70\x00";

    #[test]
    fn parses_real_dump_stats() {
        assert_eq!(
            parse_dump_stats(REAL_STATS),
            Ok(DumpStats {
                freezing_time_us: 104,
                frozen_time_us: 16732,
                memdump_time_us: 314,
                memwrite_time_us: 90,
                pages_scanned: 58,
                pages_skipped_parent: 0,
                pages_written: 30,
                pages_lazy: 0,
            })
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STATS_DUMP_FILE), REAL_STATS).expect("write");
        assert_eq!(
            dump_stats(dir.path())
                .map(|s| s.frozen_time_us)
                .expect("read"),
            16732
        );
        assert!(matches!(
            dump_stats(&dir.path().join("missing")),
            Err(ImageError::Io { .. })
        ));
    }

    #[test]
    fn rejects_malformed_dump_stats() {
        assert_eq!(
            parse_dump_stats(REAL),
            Err((0, "not a criu service image (bad service magic)"))
        );
        assert_eq!(
            parse_dump_stats(b"\x40\x59\x10\x55\x09\x37\x45\x56"),
            Err((4, "not a stats image (bad magic)"))
        );
        assert_eq!(
            parse_dump_stats(&REAL_STATS[..20]),
            Err((12, "entry runs past the end of the file"))
        );
        // A stats_entry with only a restore part (field 2).
        let mut restore_only = REAL_STATS[..8].to_vec();
        restore_only.extend_from_slice(&[2, 0, 0, 0, 0x12, 0x00]);
        assert_eq!(
            parse_dump_stats(&restore_only),
            Err((12, "stats entry has no dump statistics"))
        );
        // A dump_stats_entry with frozen_time only.
        let mut partial = REAL_STATS[..8].to_vec();
        partial.extend_from_slice(&[4, 0, 0, 0, 0x0a, 0x02, 0x10, 0x05]);
        assert_eq!(
            parse_dump_stats(&partial),
            Err((14, "dump_stats_entry lacks a required field"))
        );
    }

    /// The first 50 bytes of a real `pagemap-<pid>.img` written by CRIU 4.2.1: the head
    /// (pages_id 1) and two runs, written with 4.2's field 5 `nr_pages` and `compat_nr_pages` 0.
    const REAL_PAGEMAP: &[u8] = b"\x19\x43\x56\x54\x25\x40\x08\x56\x02\x00\x00\x00\x08\x01\x0e\x00\x00\x00\x08\x80\xa0\x95\x8e\x98\xbe\x15\x10\x00\x20\x04\x28\x01\x0e\x00\x00\x00\x08\x80\xe0\x95\x8e\x98\xbe\x15\x10\x00\x20\x04\x28\x02";

    #[test]
    fn parses_a_real_criu_4_2_pagemap() {
        let map = parse_pagemap(REAL_PAGEMAP).expect("parse");
        assert_eq!(map.pages_id, 1);
        assert_eq!(
            map.entries,
            vec![
                PagemapEntry {
                    vaddr: 94_495_752_671_232,
                    nr_pages: 1,
                    flags: PE_PRESENT
                },
                PagemapEntry {
                    vaddr: 94_495_752_679_424,
                    nr_pages: 2,
                    flags: PE_PRESENT
                },
            ]
        );
        assert_eq!(map.present_pages(), 3);
        assert_eq!(map.address_of(0), Some(94_495_752_671_232));
        assert_eq!(map.address_of(2), Some(94_495_752_679_424 + 4096));
        assert_eq!(map.address_of(3), None);
    }

    #[test]
    fn a_pages_file_shorter_than_its_pagemap_is_refused() {
        let map = parse_pagemap(REAL_PAGEMAP).expect("parse");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pagemap-7.img"), REAL_PAGEMAP).expect("write");
        let pages = dir.path().join(format!("pages-{}.img", map.pages_id));
        let err = check_pages_files(dir.path()).expect_err("no pages file");
        assert!(matches!(err, ImageError::Io { .. }), "{err}");
        let want = usize::try_from(map.present_pages()).expect("small") * 4096;
        std::fs::write(&pages, vec![0u8; want]).expect("write");
        check_pages_files(dir.path()).expect("whole");
        std::fs::write(&pages, vec![0u8; want - 1]).expect("write");
        let err = check_pages_files(dir.path()).expect_err("one byte short");
        assert!(
            err.to_string()
                .contains("it ends before the pages its pagemap lists do"),
            "{err}"
        );
    }

    #[test]
    fn a_written_pagemap_is_byte_for_byte_what_criu_writes() {
        let map = parse_pagemap(REAL_PAGEMAP).expect("parse");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pagemap-1.img");
        write_pagemap(&path, &map).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), REAL_PAGEMAP);
        let lazy = Pagemap {
            pages_id: 3,
            entries: vec![PagemapEntry {
                vaddr: 1 << 40,
                nr_pages: 5 << 32,
                flags: PE_LAZY,
            }],
        };
        write_pagemap(&path, &lazy).expect("write");
        assert_eq!(pagemap(&path).expect("read back"), lazy);
    }

    /// An `mm-*.img` holding `vmas` as (start, end, flags, status), plus fields lazy restore
    /// does not read.
    fn mm_image(vmas: &[(u64, u64, u32, u32)]) -> Vec<u8> {
        let full: Vec<_> = vmas
            .iter()
            .map(|&(start, end, flags, status)| (start, end, flags, status, 3, 0))
            .collect();
        mm_image_of(&full)
    }

    /// An `mm-*.img` holding `vmas` as (start, end, flags, status, prot, shmid).
    fn mm_image_of(vmas: &[(u64, u64, u32, u32, u32, u64)]) -> Vec<u8> {
        let mut mm = Vec::new();
        put_varint_field(&mut mm, 1, 0x400000); // mm_start_code
        for &(start, end, flags, status, prot, shmid) in vmas {
            let mut vma = Vec::new();
            for (field, value) in [
                (1, start),
                (2, end),
                (3, 0),
                (4, shmid),
                (5, u64::from(prot)),
                (6, u64::from(flags)),
                (7, u64::from(status)),
            ] {
                put_varint_field(&mut vma, field, value);
            }
            put_varint(&mut mm, (14 << 3) | 2);
            put_varint(&mut mm, vma.len() as u64);
            mm.extend_from_slice(&vma);
        }
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        img.extend_from_slice(&MM_MAGIC.to_le_bytes());
        push_entry(&mut img, &mm);
        img
    }

    #[test]
    fn files_mapped_shared_and_writable_are_found_by_their_files_img_id() {
        let shared = libc::MAP_SHARED as u32;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
        let regular = 1;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            shared_writable_files(dir.path()).expect("none"),
            Vec::<String>::new()
        );
        std::fs::write(dir.path().join("files.img"), files_img()).expect("write");
        // files_img(): id 5 is /tmp/log, id 7 /dev/null.
        let mm = mm_image_of(&[
            // Shared and writable: /tmp/log, twice (two areas of it).
            (0x1000, 0x2000, shared, regular | VMA_FILE_SHARED, rw, 5),
            (0x3000, 0x4000, shared, regular | VMA_FILE_SHARED, rw, 5),
            // Shared, read only.
            (0x5000, 0x6000, shared, regular | VMA_FILE_SHARED, 1, 7),
            // A memfd's id is no files.img record's.
            (
                0x7000,
                0x8000,
                shared,
                regular | VMA_FILE_SHARED | VMA_AREA_MEMFD,
                rw,
                7,
            ),
            // Private: each copy its own.
            (
                0x9000,
                0xa000,
                libc::MAP_PRIVATE as u32,
                regular | (1 << 6),
                rw,
                7,
            ),
        ]);
        std::fs::write(dir.path().join("mm-1.img"), &mm).expect("write");
        assert_eq!(
            shared_writable_files(dir.path()).expect("read"),
            vec!["/tmp/log".to_owned()]
        );
        std::fs::write(dir.path().join("mm-2.img"), &mm[..mm.len() - 2]).expect("write");
        assert!(shared_writable_files(dir.path()).is_err(), "a truncated mm");
    }

    #[test]
    fn mm_vmas_say_which_areas_can_be_lazy() {
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;
        let img = mm_image(&[
            (0x7000, 0x9000, anon, 1),
            (0x1000, 0x3000, libc::MAP_PRIVATE as u32, 1),
            (0xa000, 0xb000, anon, 1 | (1 << 3)),
            (0xc000, 0xd000, anon | libc::MAP_LOCKED as u32, 1),
            (
                0xe000,
                0xf000,
                libc::MAP_SHARED as u32 | libc::MAP_ANONYMOUS as u32,
                1,
            ),
        ]);
        let vmas = parse_mm_vmas(&img).expect("parse");
        assert_eq!(vmas.len(), 5);
        assert_eq!(vmas[0].start, 0x1000, "sorted by address");
        let lazy: Vec<bool> = vmas.iter().map(Vma::can_be_lazy).collect();
        assert_eq!(lazy, [false, true, false, false, false]);
        let mut bad = img.clone();
        bad[4] ^= 1;
        assert!(parse_mm_vmas(&bad).is_err(), "wrong magic");
        assert!(parse_mm_vmas(&img[..img.len() - 3]).is_err(), "truncated");
        let backwards = mm_image(&[(0x9000, 0x7000, anon, 1)]);
        assert!(parse_mm_vmas(&backwards).is_err(), "ends before it starts");
    }

    #[test]
    fn pagemap_reads_old_fields_and_refuses_garbage() {
        let mut img = REAL_PAGEMAP[..14].to_vec();
        // CRIU < 4.2: nr_pages in field 2, no flags: present.
        let old = [0x08, 0x80, 0x20, 0x10, 0x03];
        // in_parent without flags: a parent run, not in the pages file.
        let parent = [0x08, 0x80, 0x40, 0x10, 0x05, 0x18, 0x01];
        // flags PE_LAZY|PE_PRESENT and both counts: field 5 wins.
        let both = [0x08, 0x80, 0x60, 0x10, 0x09, 0x20, 0x06, 0x28, 0x02];
        for e in [&old[..], &parent[..], &both[..]] {
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(e);
        }
        let map = parse_pagemap(&img).expect("parse");
        let got: Vec<_> = map
            .entries
            .iter()
            .map(|e| (e.vaddr, e.nr_pages, e.flags))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 3, PE_PRESENT),
                (0x2000, 5, PE_PARENT),
                (0x3000, 2, PE_LAZY | PE_PRESENT),
            ]
        );
        assert_eq!(map.present_pages(), 5);
        assert_eq!(map.address_of(3), Some(0x3000));
        assert_eq!(
            parse_pagemap(REAL),
            Err((4, "not a pagemap image (bad magic)"))
        );
        assert_eq!(
            parse_pagemap(&REAL_PAGEMAP[..40]),
            Err((36, "entry runs past the end of the file"))
        );
        let mut no_count = REAL_PAGEMAP[..14].to_vec();
        no_count.extend_from_slice(&[2, 0, 0, 0, 0x08, 0x01]);
        assert_eq!(
            parse_pagemap(&no_count),
            Err((14, "pagemap_entry lacks nr_pages"))
        );
    }
}
