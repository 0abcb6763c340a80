//! Streamed restore: `criu restore --stream` reads every image through pf, and the pages files
//! of a `procs.criu.v2` snapshot are rebuilt from their packs while CRIU reads them, instead of
//! being written whole to tmpfs first.
//!
//! The protocol is CRIU's image streamer (criu/img-streamer.c, images/img-streamer.proto). CRIU
//! connects to `streamer-serve.sock` in the images directory and, for each image it opens, sends
//! a request (a native-endian `u32` length, then `img_streamer_request_entry {required string
//! filename = 1}`), reads the reply (`img_streamer_reply_entry {required bool exists = 1}`, the
//! same framing) and, when the file exists, sends the read end's partner of a fresh pipe (one
//! `SCM_RIGHTS` message with one dummy byte); it then reads the image from that pipe. Requests
//! come one at a time; each file is written on a thread of its own, since CRIU reads several at
//! once (a pagemap and its pages file).
//!
//! - The small images were extracted from the snapshot's verified tar into the images directory:
//!   they are copied from there (any number of times: CRIU opens some twice).
//! - A pages file is produced in file order (CRIU cannot seek in a stream), in 1 MiB chunks read
//!   with [`PagesReader::read`] on every core (each page checked against its digest), and
//!   written to the pipe in order. Nothing reaches CRIU that has not been checked: a page that
//!   fails is recorded ([`Error::CorruptPage`]) and the pipe closed before it, so CRIU reads a
//!   short file and the restore fails before the tree ever runs; pf then reports the page.
//! - When the restore is over, whatever CRIU did not read is abandoned: pf's pipe ends are
//!   non-blocking and every writer checks a stop flag, so nothing waits on a reader that went.

use std::collections::{BTreeMap, HashMap};
use std::io::{IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use pf_core::BlobStore;
use pf_core::pack::PAGE_SIZE;
use pf_core::pages::{PagesError, PagesReader};

use crate::error::{Error, Result};
use crate::images::Pagemap;
use crate::splice::{PageBuf, Sealed};
use crate::wire::PagesImage;

/// The socket CRIU's restore connects to, in the images directory.
pub(crate) const SOCKET: &str = "streamer-serve.sock";
/// Pages read (and written to the pipe) at a time.
const CHUNK_PAGES: usize = 256;
/// The longest request accepted: a length and a file name.
pub(crate) const MAX_REQUEST: u32 = 4096;
/// How often waiting threads look at the stop flag.
pub(crate) const TICK: Duration = Duration::from_millis(50);
/// Chunks handed to one `vmsplice` at most.
const SPLICE_CHUNKS: usize = 8;
/// How far ahead of the pipe the packs of a pages file are read into memory, so that reading a
/// cold disk overlaps checking and sending what came before: a pack once the pipe is within
/// 256 chunks (256 MiB of the file) of its first use, and at most 256 MiB of packs read and not
/// reached yet.
const READ_AHEAD: (usize, u64) = (256, 256 << 20);
/// Packs holding fewer places of the file than this (2 MiB) are not read ahead: reading such a
/// pack whole would mostly read pages nobody wants (the kernel's own read-ahead serves them).
const READ_AHEAD_MIN_PAGES: u64 = 512;
/// The pipe size asked for (the kernel's default cap, `/proc/sys/fs/pipe-max-size`).
const PIPE_SIZE: usize = 1 << 20;

/// What a streamed restore serves: the extracted images in `dir` and the pages files `pages`
/// from `store`, with their pagemaps (`maps`, by pages file) to name a bad page's address.
pub(crate) struct Images<'a> {
    pub(crate) store: &'a dyn BlobStore,
    pub(crate) dir: &'a Path,
    pub(crate) pages: &'a [PagesImage],
    pub(crate) maps: &'a HashMap<String, Pagemap>,
}

/// What the threads of one serving share.
struct Shared {
    stop: AtomicBool,
    /// Hangs up (its write end is closed) when the restore is over, waking every poll at once.
    woken: OwnedFd,
    /// The first failure to produce a pages file (a bad page, a missing pack).
    error: Mutex<Option<Error>>,
    /// Every connection accepted, to be shut down at the end.
    conns: Mutex<Vec<UnixStream>>,
    /// Chunks read ahead and not yet written, over every pages file: a tree of many processes
    /// has as many pages files open at once, and their read-ahead shares `budget` (the chunk
    /// a pipe waits for is always read, so every file moves).
    buffered: std::sync::atomic::AtomicUsize,
    /// The most chunks read ahead over all pages files (1 MiB each).
    budget: usize,
    /// Reader threads per pages file (the cores).
    threads: usize,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn fail(&self, error: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            // The restore's error is this one: said once, by whoever reports it.
            tracing::debug!(error = %error, "a streamed pages file failed; the restore will too");
            *slot = Some(error);
        }
    }
}

/// Page lists opened ahead, by pages file. CRIU asks for a pages file only once it has
/// started (probed the kernel, read the small images: 15–30 ms), and opening one reads its
/// page list first (a 1 GiB goblin's: 10 MiB, 20-odd ms): opened from the start, the list is
/// mostly read by then instead of after.
struct Opened<'a> {
    slots: Mutex<HashMap<String, Slot<'a>>>,
    ready: Condvar,
    /// Packs read ahead (or being read) so far, by the head start or a file's own read-ahead,
    /// with the bytes read (0 until read): each is read once, and counted as read by both.
    fetched: Mutex<HashMap<pf_core::Digest256, u64>>,
}

enum Slot<'a> {
    Opening,
    Ready(Box<std::result::Result<PagesReader<'a>, PagesError>>),
}

impl<'a> Opened<'a> {
    /// Every pages file of `images` marked as being opened.
    fn new(images: &Images<'a>) -> Self {
        let slots = images
            .pages
            .iter()
            .map(|p| (p.file.clone(), Slot::Opening))
            .collect();
        Self {
            slots: Mutex::new(slots),
            ready: Condvar::new(),
            fetched: Mutex::new(HashMap::new()),
        }
    }

    /// Read `pack` ahead with `read` (which returns the bytes it read) unless it was already,
    /// or is being read: the bytes read ahead, by this call or the one before (0 while that
    /// one is still reading). A claim lasts as long as the serving: a file asked for again
    /// finds its packs read (a hint only: what was evicted since is read when wanted).
    fn read_once(&self, pack: &pf_core::Digest256, read: impl FnOnce() -> u64) -> u64 {
        let lock = || self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut fetched = lock();
            if let Some(&bytes) = fetched.get(pack) {
                return bytes;
            }
            fetched.insert(*pack, 0);
        }
        let bytes = read();
        lock().insert(*pack, bytes);
        bytes
    }

    /// Open them one after the other, until the serving stops; the packs each file needs
    /// first go to `head` (see [`head_start`]) as soon as its list is open.
    fn open_all(
        &self,
        images: &Images<'a>,
        shared: &Shared,
        head: Option<std::sync::mpsc::Sender<Vec<pf_core::Digest256>>>,
    ) {
        for image in images.pages {
            if shared.stopped() {
                break;
            }
            let reader = PagesReader::open(images.store, &image.manifest);
            if let (Some(head), Ok(reader)) = (&head, &reader) {
                let _ = head.send(first_packs(reader, READ_AHEAD.0));
            }
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = slots.get_mut(&image.file) {
                *slot = Slot::Ready(Box::new(reader));
            }
            self.ready.notify_all();
        }
        // What was not opened is opened by whoever asks for it.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| matches!(slot, Slot::Ready(_)));
        self.ready.notify_all();
    }

    /// The reader opened ahead for `file` (once: a second request opens its own), waiting while
    /// it is being opened; `None` when there is none.
    fn take(&self, file: &str) -> Option<std::result::Result<PagesReader<'a>, PagesError>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match slots.remove(file) {
                Some(Slot::Ready(reader)) => return Some(*reader),
                Some(Slot::Opening) => {
                    slots.insert(file.to_owned(), Slot::Opening);
                    slots = self.ready.wait(slots).unwrap_or_else(|p| p.into_inner());
                }
                None => return None,
            }
        }
    }
}

/// Stops a serving when dropped: the flag, the wake-up pipe, every connection.
struct Stop<'a> {
    shared: &'a Shared,
    wake: Option<std::io::PipeWriter>,
}

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        drop(self.wake.take());
        let conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        for conn in conns.iter() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Serve `images` on `streamer-serve.sock` in their directory while `restore` runs (it runs
/// `criu restore --stream` on that directory, once or more). A pages file that could not be
/// produced wins over whatever `restore` says: its error is returned, and a tree restored
/// anyway (CRIU did not need the rest) is dropped, which kills it.
pub(crate) fn serve_while<T>(
    images: &Images<'_>,
    restore: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let path = images.dir.join(SOCKET);
    let listener = UnixListener::bind(&path).map_err(|e| Error::io("listen on", &path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set up", &path, e))?;
    let (woken, wake) = std::io::pipe().map_err(|source| Error::Sys {
        op: "creating the image streamer's wake-up pipe",
        source,
    })?;
    let cores = crate::v2::threads();
    let shared = Shared {
        stop: AtomicBool::new(false),
        woken: woken.into(),
        error: Mutex::new(None),
        conns: Mutex::new(Vec::new()),
        buffered: std::sync::atomic::AtomicUsize::new(0),
        budget: 4 * cores + 4,
        threads: cores,
    };
    let opened = Opened::new(images);
    let result = std::thread::scope(|s| {
        // Ends the serving when the restore is over, or if it panics (the scope would wait
        // for the acceptor otherwise).
        let _stop = Stop {
            shared: &shared,
            wake: Some(wake),
        };
        let (head, firsts) = std::sync::mpsc::channel();
        let head = std::thread::Builder::new()
            .name("pf-head-start".into())
            .spawn_scoped(s, {
                let (opened, shared) = (&opened, &shared);
                move || head_start(images.store, &firsts, opened, shared, READ_AHEAD.1)
            })
            .inspect_err(|e| tracing::debug!(error = %e, "no thread to read packs ahead early"))
            .ok()
            .map(|_| head);
        let opener = std::thread::Builder::new()
            .name("pf-open-lists".into())
            .spawn_scoped(s, || opened.open_all(images, &shared, head));
        if let Err(e) = opener {
            tracing::debug!(error = %e, "no thread to open page lists ahead");
            opened.open_all(
                &Images {
                    pages: &[],
                    ..*images
                },
                &shared,
                None,
            );
        }
        let acceptor = std::thread::Builder::new()
            .name("pf-streamer".into())
            .spawn_scoped(s, || accept(s, &listener, images, &opened, &shared))
            .map_err(|source| Error::Sys {
                op: "starting the image streamer",
                source,
            });
        match acceptor {
            Ok(_) => restore(),
            Err(e) => Err(e),
        }
    });
    let _ = std::fs::remove_file(&path);
    let failed = shared.error.into_inner().unwrap_or_else(|p| p.into_inner());
    match (failed, result) {
        (Some(e), result) => {
            if let Err(criu) = &result {
                crate::runner::discard_kept_log(criu);
            }
            Err(e)
        }
        (None, result) => result,
    }
}

/// Accept CRIU's connections until told to stop; each is served on a thread of its own.
fn accept<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    listener: &UnixListener,
    images: &'scope Images<'env>,
    opened: &'scope Opened<'env>,
    shared: &'scope Shared,
) {
    while !shared.stopped() {
        if !poll_either(listener, PollFlags::POLLIN, &shared.woken) {
            continue;
        }
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the image streamer could not accept");
                continue;
            }
        };
        if conn.set_nonblocking(false).is_err() {
            continue;
        }
        match conn.try_clone() {
            Ok(copy) => {
                let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
                if shared.stopped() {
                    // Accepted as the restore ended: nothing will shut it down later.
                    let _ = copy.shutdown(std::net::Shutdown::Both);
                }
                conns.push(copy);
            }
            Err(_) => continue,
        }
        // Shut down by `serve_while` once the restore is over.
        let _ = std::thread::Builder::new()
            .name("pf-streamer-conn".into())
            .spawn_scoped(s, move || {
                if let Err(e) = requests(s, conn, images, opened, shared)
                    && !shared.stopped()
                {
                    tracing::debug!(error = %e, "an image streamer session ended");
                }
            });
    }
}

/// What a requested image is.
enum Source<'a> {
    /// A file extracted into the images directory.
    File(std::path::PathBuf),
    /// A pages file, rebuilt from the store.
    Pages(&'a PagesImage),
}

/// Answer one connection's requests until CRIU hangs up.
fn requests<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    mut conn: UnixStream,
    images: &'scope Images<'env>,
    opened: &'scope Opened<'env>,
    shared: &'scope Shared,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        match conn.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_ne_bytes(len);
        if len > MAX_REQUEST {
            return Err(std::io::Error::other(format!(
                "an image request of {len} bytes"
            )));
        }
        let mut msg = vec![0u8; len as usize];
        conn.read_exact(&mut msg)?;
        let name = parse_request(&msg)
            .ok_or_else(|| std::io::Error::other("a malformed image request"))?;
        let source = find(images, &name);
        tracing::trace!(file = %name, exists = source.is_some(), "image requested");
        // The length (native-endian u32), then img_streamer_reply_entry { exists = 1 (varint) }.
        let mut reply = 2u32.to_ne_bytes().to_vec();
        reply.extend_from_slice(&[0x08, u8::from(source.is_some())]);
        conn.write_all(&reply)?;
        let Some(source) = source else {
            continue;
        };
        let pipe = recv_fd(&conn)?;
        let _ = std::thread::Builder::new()
            .name("pf-streamer-file".into())
            .spawn_scoped(s, move || {
                let mut out = PipeOut::new(pipe, shared);
                match source {
                    Source::File(path) => {
                        if let Err(e) = copy_file(&path, &mut out) {
                            tracing::debug!(file = %path.display(), error = %e, "image not sent");
                        }
                    }
                    Source::Pages(image) => {
                        if let Err(e) = pages_file(images, image, opened, &mut out, shared) {
                            shared.fail(e);
                        }
                    }
                }
            });
    }
}

/// The file name of an `img_streamer_request_entry`, if `msg` is one.
pub(crate) fn parse_request(msg: &[u8]) -> Option<String> {
    // Field 1, wire type 2 (length-delimited), a varint length, the bytes.
    let (&tag, rest) = msg.split_first()?;
    if tag != 0x0a {
        return None;
    }
    let mut len = 0usize;
    let mut used = 0usize;
    for (i, &b) in rest.iter().enumerate().take(3) {
        len |= usize::from(b & 0x7f) << (7 * i);
        used = i + 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let name = rest.get(used..used.checked_add(len)?)?;
    if used + len != rest.len() {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// What `name` is among `images`: only plain file names are served.
fn find<'a>(images: &Images<'a>, name: &str) -> Option<Source<'a>> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    if let Some(image) = images.pages.iter().find(|p| p.file == name) {
        return Some(Source::Pages(image));
    }
    let path = images.dir.join(name);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    (meta.is_file() && name != SOCKET).then_some(Source::File(path))
}

/// Receive the pipe CRIU sends after a positive reply.
pub(crate) fn recv_fd(conn: &UnixStream) -> std::io::Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got = recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    match fd {
        Some(fd) => Ok(fd),
        None if got.bytes == 0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        None => Err(std::io::Error::other("criu sent no pipe")),
    }
}

/// pf's end of an image pipe: non-blocking, so a writer notices the stop flag.
///
/// A full pipe is waited on edge-triggered: the kernel wakes a pipe's writers once a read that
/// began on a full pipe is over, while a level-triggered poll returns as soon as the reader
/// has freed one buffer, mid-read. A write then would wait for the pipe's lock all through
/// CRIU's read (which copies into memory it faults in, under that lock), spinning on a core the
/// page checks need: measured on a 1 GiB thaw, a quarter of pf's CPU time.
struct PipeOut<'a> {
    pipe: std::fs::File,
    shared: &'a Shared,
    /// The pipe (edge-triggered, for writing) and the wake-up pipe; `None` if epoll failed,
    /// and a plain poll is used.
    epoll: Option<nix::sys::epoll::Epoll>,
    /// The last write was short: the pipe was full then.
    full: bool,
}

impl<'a> PipeOut<'a> {
    fn new(pipe: OwnedFd, shared: &'a Shared) -> Self {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        let _ = rustix::pipe::fcntl_setpipe_size(&pipe, PIPE_SIZE);
        if let Ok(flags) = rustix::fs::fcntl_getfl(&pipe) {
            let _ = rustix::fs::fcntl_setfl(&pipe, flags | rustix::fs::OFlags::NONBLOCK);
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .and_then(|epoll| {
                epoll.add(
                    &pipe,
                    EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, 0),
                )?;
                epoll.add(&shared.woken, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
                Ok(epoll)
            })
            .inspect_err(|e| tracing::debug!(error = %e, "no epoll for an image pipe"))
            .ok();
        Self {
            pipe: pipe.into(),
            shared,
            epoll,
            full: false,
        }
    }

    /// Drop the edges the pipe has had so far.
    fn forget_edges(&self) {
        if let Some(epoll) = &self.epoll {
            let mut events = [nix::sys::epoll::EpollEvent::empty(); 2];
            let _ = epoll.wait(&mut events, 0u16);
        }
    }

    /// Wait (at most [`TICK`]) until a reader has finished with the full pipe, or the restore
    /// is over.
    fn wait_writable(&self) {
        match &self.epoll {
            Some(epoll) => {
                let mut events = [nix::sys::epoll::EpollEvent::empty(); 2];
                let ms = u16::try_from(TICK.as_millis()).unwrap_or(u16::MAX);
                let _ = epoll.wait(&mut events, ms);
            }
            None => {
                poll_either(&self.pipe, PollFlags::POLLOUT, &self.shared.woken);
            }
        }
    }

    /// Write all of `buf`, waiting while the pipe is full; an error once the restore is over
    /// or CRIU closed its end.
    fn send(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = self.write_some(&[std::io::IoSlice::new(buf)])?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Write as much of `bufs` as the pipe takes (at least a byte), waiting first if the last
    /// write found it full; an error once the restore is over or CRIU closed its end.
    fn write_some(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let total = bufs.iter().map(|b| b.len()).sum();
        self.push(total, |mut pipe| pipe.write_vectored(bufs))
    }

    /// [`write_some`](Self::write_some) by reference: the pipe takes the pages themselves.
    fn splice_some(&mut self, bufs: &[(&Sealed, usize)]) -> std::io::Result<usize> {
        let total = bufs.iter().map(|(b, from)| b.len() - from).sum();
        self.push(total, |pipe| crate::splice::splice(pipe, bufs))
    }

    /// Put `total` bytes into the pipe with `put` (which returns how many it took, or
    /// `WouldBlock`), as many as it takes (at least one).
    ///
    /// A short put means the pipe is full: the next one waits for the reader to be done with
    /// it rather than trying again at once. So a writer that is ahead of CRIU hands it the
    /// pipe's worth each time, and CRIU's every read starts on a full pipe, whose end is the
    /// edge waited for.
    fn push(
        &mut self,
        total: usize,
        mut put: impl FnMut(&std::fs::File) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        if total == 0 {
            return Ok(0);
        }
        loop {
            if self.full {
                if self.shared.stopped() {
                    return Err(std::io::Error::other("the restore is over"));
                }
                self.wait_writable();
                self.full = false;
            }
            // Edges from before this put (a read that ended on the old contents, this
            // writer's own wake-up of writers) would end the next wait at once.
            self.forget_edges();
            match put(&self.pipe) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.full = n < total;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.full = true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Wait (at most [`TICK`]) until `fd` is ready for `events` or `woken` hangs up; whether `fd`
/// is ready.
pub(crate) fn poll_either(fd: &impl AsFd, events: PollFlags, woken: &OwnedFd) -> bool {
    let ms = u16::try_from(TICK.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [
        PollFd::new(fd.as_fd(), events),
        PollFd::new(woken.as_fd(), PollFlags::POLLIN),
    ];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| !r.is_empty())
}

/// Copy an extracted image into its pipe.
fn copy_file(path: &Path, out: &mut PipeOut<'_>) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.send(&buf[..n])?;
    }
}

/// The chunks of a pages file read so far and not yet written, and the read side's state.
struct Chunks {
    ready: BTreeMap<usize, Sealed>,
    /// Chunks written to the pipe.
    written: usize,
    /// Whole-chunk buffers whose pages have left the pipe, to fill again.
    spare: Vec<PageBuf>,
    /// A reader failed (its error is in `Shared`), or the writer gave up.
    over: bool,
}

/// Produce the pages file `image` into `out` in file order: chunks read and checked on every
/// core, a bounded window ahead of the pipe, written in order. A chunk that fails is never
/// written; the first failure is returned.
fn pages_file<'a>(
    images: &Images<'a>,
    image: &PagesImage,
    opened: &Opened<'a>,
    out: &mut PipeOut<'_>,
    shared: &Shared,
) -> Result<()> {
    let pages_error = |source: PagesError| match source {
        PagesError::BadPage { page, .. } => Error::CorruptPage {
            snapshot: None,
            file: image.file.clone(),
            page,
            vaddr: images
                .maps
                .get(&image.file)
                .and_then(|m| m.address_of(page)),
            source: Box::new(source),
        },
        source => Error::Pages {
            what: format!("reading {} from the store", image.file),
            source: Box::new(source),
        },
    };
    let reader = opened
        .take(&image.file)
        .unwrap_or_else(|| PagesReader::open(images.store, &image.manifest))
        .map_err(pages_error)?;
    let pages = usize::try_from(reader.pages()).unwrap_or(usize::MAX);
    let chunks = pages.div_ceil(CHUNK_PAGES);
    let threads = shared.threads.clamp(1, chunks.max(1));
    let window = 2 * threads + 2;
    let state = Mutex::new(Chunks {
        ready: BTreeMap::new(),
        written: 0,
        spare: Vec::new(),
        over: false,
    });
    let changed = Condvar::new();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|s| {
        // One thread reads the packs ahead in the order the chunks first need them: the disk is
        // read at its own pace, not one pack's read-ahead at a time as the readers below come to
        // it (by hand, 1 GiB right after its freeze: 0.97 s cold, 0.64 s with the packs in
        // memory).
        if reader.pack(1).is_some() {
            let progress = Written {
                state: &state,
                changed: &changed,
                shared,
            };
            let reader = &reader;
            let started = std::thread::Builder::new()
                .name("pf-read-ahead".to_owned())
                .spawn_scoped(s, move || {
                    let plan: Vec<(usize, u32)> = reader
                        .packs_by_first_use()
                        .into_iter()
                        .filter(|&(_, _, used)| used >= READ_AHEAD_MIN_PAGES)
                        .map(|(page, n, _)| {
                            (usize::try_from(page).unwrap_or(usize::MAX) / CHUNK_PAGES, n)
                        })
                        .collect();
                    let started = std::time::Instant::now();
                    let (packs, bytes) = (AtomicUsize::new(0), AtomicU64::new(0));
                    let fetch = |pack: &pf_core::Digest256| {
                        opened.read_once(pack, || {
                            let n = reader.store().prefetch(pack).unwrap_or_else(|err| {
                                tracing::debug!(%pack, %err, "not read ahead");
                                0
                            });
                            packs.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                            n
                        })
                    };
                    read_ahead(
                        &plan,
                        &|n| reader.pack_sites(n),
                        &fetch,
                        &progress,
                        READ_AHEAD,
                    );
                    tracing::debug!(
                        file = %image.file,
                        planned = plan.len(),
                        packs = packs.into_inner(),
                        bytes = bytes.into_inner(),
                        elapsed = ?started.elapsed(),
                        "packs read ahead"
                    );
                });
            if let Err(e) = started {
                tracing::debug!(error = %e, "no thread to read packs ahead");
            }
        }
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chunks {
                        return;
                    }
                    let spare = {
                        let mut st = lock();
                        loop {
                            let ahead = i >= st.written + window;
                            let over_budget = i != st.written
                                && shared.buffered.load(Ordering::Relaxed) >= shared.budget;
                            if st.over || !(ahead || over_budget) {
                                break;
                            }
                            // Other files free the budget without notifying this one.
                            let wait = if ahead {
                                TICK
                            } else {
                                Duration::from_millis(2)
                            };
                            st = changed
                                .wait_timeout(st, wait)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        if st.over {
                            return;
                        }
                        shared.buffered.fetch_add(1, Ordering::Relaxed);
                        st.spare.pop()
                    };
                    let first = i * CHUNK_PAGES;
                    let n = CHUNK_PAGES.min(pages - first);
                    // A buffer the pipe is done with, else a fresh mapping (the pipe holds
                    // references to the pages of those it has not given CRIU yet).
                    let read = spare
                        .filter(|buf| buf.len() == n * PAGE_SIZE)
                        .map_or_else(|| PageBuf::new(n * PAGE_SIZE), Ok)
                        .map_err(|source| Error::Sys {
                            op: "mapping a buffer for pages",
                            source,
                        })
                        .and_then(|mut buf| {
                            reader
                                .read(first as u64, buf.as_mut_slice())
                                .map_err(pages_error)?;
                            Ok(buf.seal())
                        });
                    let mut st = lock();
                    match read {
                        Ok(buf) => {
                            st.ready.insert(i, buf);
                        }
                        Err(e) => {
                            st.over = true;
                            shared.buffered.fetch_sub(1, Ordering::Relaxed);
                            let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                            if f.is_none() {
                                *f = Some(e);
                            }
                        }
                    }
                    changed.notify_all();
                }
            });
        }
        // However the writing below ends (a panic too), the readers and the read-ahead stop.
        let _over = OverOnDrop(&state, &changed);
        // Every chunk ready in order goes into one write (the pipe's worth at a time): the
        // chunks being written, and how much of the first is written.
        let mut sending: std::collections::VecDeque<Sealed> = std::collections::VecDeque::new();
        let mut released = crate::splice::Released::new(&out.pipe)
            .inspect_err(|e| tracing::debug!(error = %e, "no pipe size: buffers not reused"))
            .ok();
        let mut offset = 0usize;
        let mut taken = 0usize;
        let mut done = 0usize;
        while done < chunks {
            {
                let mut st = lock();
                loop {
                    while let Some(buf) = st.ready.remove(&taken) {
                        sending.push_back(buf);
                        taken += 1;
                    }
                    if !sending.is_empty() {
                        break;
                    }
                    if st.over || shared.stopped() {
                        st.over = true;
                        break;
                    }
                    st = changed
                        .wait_timeout(st, TICK)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            if sending.is_empty() {
                break;
            }
            // A pipe takes its size at a time (1 MiB, a chunk): a few chunks a call is plenty,
            // and well under the kernel's 1024 buffers a call.
            let parts: Vec<(&Sealed, usize)> = sending
                .iter()
                .take(SPLICE_CHUNKS)
                .enumerate()
                .map(|(k, buf)| (buf, if k == 0 { offset } else { 0 }))
                .collect();
            let sent = out.splice_some(&parts);
            drop(parts);
            let mut n = match sent {
                Ok(n) => {
                    if let Some(r) = &mut released {
                        r.spliced(n);
                    }
                    n
                }
                Err(e) => {
                    tracing::debug!(file = %image.file, error = %e, "pages not sent");
                    lock().over = true;
                    break;
                }
            };
            let mut finished = Vec::new();
            while let Some(front) = sending.front() {
                let left = front.len() - offset;
                if n < left {
                    offset += n;
                    break;
                }
                n -= left;
                offset = 0;
                finished.extend(sending.pop_front());
            }
            if !finished.is_empty() {
                shared.buffered.fetch_sub(finished.len(), Ordering::Relaxed);
                done += finished.len();
                let mut st = lock();
                if let Some(r) = &mut released {
                    for buf in finished {
                        r.done(buf);
                    }
                    // Two spares at most: what is mapped stays within the read-ahead budget
                    // but for them.
                    while let Some(buf) = r.take(&out.pipe) {
                        if st.spare.len() < 2 {
                            st.spare.push(buf);
                        }
                    }
                }
                st.written = done;
                changed.notify_all();
                if st.over {
                    break;
                }
            }
        }
        // What was taken and never wholly written gives its budget back.
        shared.buffered.fetch_sub(sending.len(), Ordering::Relaxed);
        lock().over = true;
        changed.notify_all();
    });
    // What was read and never written gives its budget back.
    let unsent = state
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .ready
        .len();
    shared.buffered.fetch_sub(unsent, Ordering::Relaxed);
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Marks a pages file over when dropped, waking every thread that waits on it.
struct OverOnDrop<'a>(&'a Mutex<Chunks>, &'a Condvar);

impl Drop for OverOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).over = true;
        self.1.notify_all();
    }
}

/// How far a pages file's pipe has got, as the thread reading its packs ahead sees it.
trait Progress {
    /// Chunks written to the pipe so far, or `None` once the file is over (sent, failed, or
    /// the restore stopped).
    fn written(&self) -> Option<usize>;
    /// Wait until at least `chunks` chunks are written (`true`) or the file is over (`false`).
    fn wait_written(&self, chunks: usize) -> bool;
}

/// [`Progress`] of a pages file being served.
struct Written<'a> {
    state: &'a Mutex<Chunks>,
    changed: &'a Condvar,
    shared: &'a Shared,
}

impl Progress for Written<'_> {
    fn written(&self) -> Option<usize> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (!st.over && !self.shared.stopped()).then_some(st.written)
    }

    fn wait_written(&self, chunks: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.over || self.shared.stopped() {
                return false;
            }
            if st.written >= chunks {
                return true;
            }
            st = self
                .changed
                .wait_timeout(st, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The packs a pages file needs first, in the order it first needs them: those its own
/// read-ahead (in [`pages_file`]) may read before the pipe has moved at all, the packs first
/// used within `window` chunks of the file's start (its byte bound is [`head_start`]'s).
fn first_packs(reader: &PagesReader<'_>, window: usize) -> Vec<pf_core::Digest256> {
    reader
        .packs_by_first_use()
        .into_iter()
        .filter(|&(_, _, used)| used >= READ_AHEAD_MIN_PAGES)
        .take_while(|&(page, _, _)| {
            usize::try_from(page).unwrap_or(usize::MAX) / CHUNK_PAGES < window
        })
        .flat_map(|(_, n, _)| reader.pack_sites(n))
        .collect()
}

/// Read the packs each pages file needs first ([`first_packs`], sent by the thread that opens
/// the page lists) from the start of the restore, until `budget` bytes are read over all files
/// (the last pack read may go past it).
///
/// A file's own read-ahead starts only when CRIU asks for the file, 15–30 ms into the restore
/// (CRIU probes the kernel and reads the small images first), and packs a freeze just wrote are
/// not in memory (written with direct I/O): CRIU then waited on the disk for the first ones.
/// Read from the start, they are in memory by the time it asks. Only a hint, as the file's own
/// read-ahead is (each pack is read once, by whichever comes first).
fn head_start(
    store: &dyn BlobStore,
    firsts: &std::sync::mpsc::Receiver<Vec<pf_core::Digest256>>,
    opened: &Opened<'_>,
    shared: &Shared,
    budget: u64,
) {
    let started = std::time::Instant::now();
    let (mut packs, mut bytes) = (0usize, 0u64);
    'files: while let Ok(list) = firsts.recv() {
        for pack in list {
            if shared.stopped() || bytes >= budget {
                break 'files;
            }
            bytes += opened.read_once(&pack, || {
                packs += 1;
                store.prefetch(&pack).unwrap_or_else(|err| {
                    tracing::debug!(%pack, %err, "not read ahead");
                    0
                })
            });
        }
    }
    tracing::debug!(packs, bytes, elapsed = ?started.elapsed(), "packs read ahead from the start");
}

/// Read the packs of `plan` ((the chunk that first needs it, its number), in that order) ahead
/// with `fetch` (which returns the bytes it read), each at the packs `sites` names for it: a
/// pack once the pipe is within `ahead.0` chunks of its first use, and only while less than
/// `ahead.1` bytes read ahead are not reached yet. Stops as soon as the file is over.
fn read_ahead(
    plan: &[(usize, u32)],
    sites: &dyn Fn(u32) -> Vec<pf_core::Digest256>,
    fetch: &dyn Fn(&pf_core::Digest256) -> u64,
    progress: &dyn Progress,
    (chunks, bytes): (usize, u64),
) {
    // Read ahead and not reached yet: (the chunk that first needs it, bytes), in plan order.
    let mut pending: std::collections::VecDeque<(usize, u64)> = std::collections::VecDeque::new();
    for &(first, n) in plan {
        if !progress.wait_written(first.saturating_sub(chunks)) {
            return;
        }
        loop {
            let Some(now) = progress.written() else {
                return;
            };
            while pending.front().is_some_and(|&(c, _)| c < now) {
                pending.pop_front();
            }
            let Some(&(oldest, _)) = pending.front() else {
                break;
            };
            if pending.iter().map(|&(_, b)| b).sum::<u64>() < bytes {
                break;
            }
            if !progress.wait_written(oldest + 1) {
                return;
            }
        }
        for site in sites(n) {
            if progress.written().is_none() {
                return;
            }
            pending.push_back((first, fetch(&site)));
        }
    }
}

/// CRIU's side of the image streamer protocol, for the tests of both directions.
#[cfg(test)]
pub(crate) mod criu_side {
    use std::io::Write as _;
    use std::mem::MaybeUninit;
    use std::os::fd::BorrowedFd;
    use std::os::unix::net::UnixStream;

    /// Send the request for `name`, as CRIU does.
    pub(crate) fn request(mut conn: &UnixStream, name: &str) {
        let mut msg = vec![0x0a, u8::try_from(name.len()).expect("short name")];
        msg.extend_from_slice(name.as_bytes());
        let mut request = u32::try_from(msg.len())
            .expect("len")
            .to_ne_bytes()
            .to_vec();
        request.extend_from_slice(&msg);
        conn.write_all(&request).expect("request");
    }

    /// Send one end of a pipe, as CRIU does after a request (one dummy byte, `SCM_RIGHTS`).
    pub(crate) fn send_fd(conn: &UnixStream, fd: BorrowedFd<'_>) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [fd];
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        sendmsg(
            conn,
            &[std::io::IoSlice::new(&[0])],
            &mut control,
            SendFlags::empty(),
        )
        .expect("send the pipe");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pf_core::pages::{PageWriter, PagesManifest, load_manifest};

    /// Three packs' worth: each pages file served is read ahead pack by pack.
    const PAGES: usize = 5000;

    /// A pages file of `PAGES` pages, distinct but for every 7th (zeros), stored in `store`.
    fn stored_pages(store: &dyn BlobStore, dir: &Path) -> (Vec<u8>, PagesImage) {
        let mut bytes = vec![0u8; PAGES * PAGE_SIZE];
        for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 7 != 3 {
                page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                page[4000] = i as u8;
            }
        }
        let path = dir.join("pages-src.img");
        std::fs::write(&path, &bytes).expect("write");
        let mut writer = PageWriter::new(store, pf_core::page_index::PageIndex::none(), 2);
        let file = std::fs::File::open(&path).expect("open");
        let stored = writer.write_file(&file, &path).expect("store pages");
        writer.commit().expect("commit");
        std::fs::remove_file(&path).expect("rm");
        let image = PagesImage {
            file: "pages-1.img".to_owned(),
            manifest: stored.manifest,
            pages: stored.pages,
        };
        (bytes, image)
    }

    /// Serve the images in `dir` and the pages file `image` from `store` while `criu` talks to
    /// the socket as CRIU would, over one connection.
    fn serve_one(
        store: &dyn BlobStore,
        dir: &Path,
        image: PagesImage,
        criu: impl FnOnce(&mut UnixStream),
    ) -> Result<()> {
        let maps = HashMap::new();
        let pages = [image];
        let images = Images {
            store,
            dir,
            pages: &pages,
            maps: &maps,
        };
        serve_while(&images, || {
            let mut conn = UnixStream::connect(dir.join(SOCKET)).expect("connect");
            criu(&mut conn);
            Ok(())
        })
    }

    /// Ask for `name` as CRIU does: `None` when the streamer says it does not exist, else all
    /// the bytes the pipe gave before it closed.
    fn fetch(conn: &mut UnixStream, name: &str) -> Option<Vec<u8>> {
        let mut r = open(conn, name)?;
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read the image");
        Some(got)
    }

    /// Ask for `name` as CRIU does: `None` when the streamer says it does not exist, else the
    /// pipe to read it from.
    fn open(conn: &mut UnixStream, name: &str) -> Option<std::io::PipeReader> {
        criu_side::request(conn, name);
        let mut reply = [0u8; 6];
        conn.read_exact(&mut reply).expect("reply");
        assert_eq!(&reply[..5], &[2, 0, 0, 0, 0x08], "framing");
        if reply[5] == 0 {
            return None;
        }
        let (r, w) = std::io::pipe().expect("pipe");
        criu_side::send_fd(conn, OwnedFd::from(w).as_fd());
        Some(r)
    }

    /// Item: pages files CRIU opens together are all produced whatever order it reads them in
    /// (their read-ahead shares one budget, and the chunk a pipe waits for is always read).
    #[test]
    fn pages_files_open_at_once_are_read_in_any_order() {
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (bytes, image) = stored_pages(&store, dir.path());
        let pages: Vec<PagesImage> = (1..=3)
            .map(|n| PagesImage {
                file: format!("pages-{n}.img"),
                ..image.clone()
            })
            .collect();
        let maps = HashMap::new();
        let images = Images {
            store: &store,
            dir: dir.path(),
            pages: &pages,
            maps: &maps,
        };
        serve_while(&images, || {
            let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
            let mut pipes: Vec<_> = (1..=3)
                .map(|n| open(&mut conn, &format!("pages-{n}.img")).expect("a pages file"))
                .collect();
            for pipe in pipes.iter_mut().rev() {
                let mut got = Vec::new();
                pipe.read_to_end(&mut got).expect("read");
                assert!(got == bytes, "a pages file differs ({} bytes)", got.len());
            }
            Ok(())
        })
        .expect("served");
    }

    /// Item: the streamer answers CRIU's requests: small images from the directory (any number
    /// of times), a pages file rebuilt from the store byte for byte (zero pages included), and
    /// "no such file" for anything else, names that leave the directory included.
    #[test]
    fn criu_gets_every_image_and_each_pages_file_byte_for_byte() {
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (bytes, image) = stored_pages(&store, dir.path());
        std::fs::write(dir.path().join("inventory.img"), b"inventory").expect("write");
        serve_one(&store, dir.path(), image, |conn| {
            for _ in 0..2 {
                assert_eq!(
                    fetch(conn, "inventory.img").as_deref(),
                    Some(&b"inventory"[..])
                );
            }
            assert_eq!(fetch(conn, "mm-1.img"), None);
            assert_eq!(fetch(conn, "../inventory.img"), None);
            assert_eq!(fetch(conn, SOCKET), None);
            let got = fetch(conn, "pages-1.img").expect("pages");
            assert!(got == bytes, "the pages file differs ({} bytes)", got.len());
        })
        .expect("served");
        assert!(!dir.path().join(SOCKET).exists(), "the socket is removed");
    }

    /// Item: a pages file whose packs are files on disk is read ahead of the pipe and still
    /// reaches CRIU byte for byte; and when CRIU stops reading halfway, the serving ends (the
    /// thread reading ahead with it) instead of waiting for the rest to be read.
    #[test]
    fn a_pages_file_read_ahead_from_disk_arrives_whole_or_stops_with_its_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = pf_core::FsBlobStore::open(&dir.path().join("store")).expect("store");
        let (bytes, image) = stored_pages(&store, dir.path());
        assert!(
            load_manifest(&store, &image.manifest)
                .expect("manifest")
                .packs
                .len()
                > 1
        );
        serve_one(&store, dir.path(), image, |conn| {
            let got = fetch(conn, "pages-1.img").expect("pages");
            assert!(got == bytes, "the pages file differs ({} bytes)", got.len());
            let mut pipe = open(conn, "pages-1.img").expect("pages again");
            let mut some = vec![0u8; 3 * PAGE_SIZE];
            pipe.read_exact(&mut some).expect("the first pages");
            assert!(some[..] == bytes[..some.len()]);
        })
        .expect("served");
    }

    /// Item: the packs a pages file needs first (those first used within the read-ahead's
    /// window) are read from the start of the restore, each once, until the byte budget is
    /// spent: the file's own read-ahead then finds them read; a serving already stopped reads
    /// none.
    #[test]
    fn the_packs_a_file_needs_first_are_read_once_from_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = pf_core::FsBlobStore::open(&dir.path().join("store")).expect("store");
        let (_, image) = stored_pages(&store, dir.path());
        let manifest = load_manifest(&store, &image.manifest).expect("manifest");
        let reader = PagesReader::open(&store, &image.manifest).expect("reader");
        // A first snapshot's packs hold its pages in file order; one with fewer than the
        // minimum of the file's pages is left to the kernel's own read-ahead.
        let used: HashMap<u32, u64> = reader
            .packs_by_first_use()
            .into_iter()
            .map(|(_, n, used)| (n, used))
            .collect();
        let expected: Vec<pf_core::Digest256> = (0u32..)
            .zip(&manifest.packs)
            .filter(|(n, _)| used.get(n).is_some_and(|&u| u >= READ_AHEAD_MIN_PAGES))
            .map(|(_, pack)| *pack)
            .collect();
        assert!(expected.len() >= 2, "{used:?}");
        let firsts = first_packs(&reader, READ_AHEAD.0);
        assert_eq!(firsts, expected);
        // Within one chunk of the start: the first pack only.
        assert_eq!(first_packs(&reader, 1), expected[..1]);
        assert_eq!(first_packs(&reader, 0), []);
        let maps = HashMap::new();
        let pages = [image];
        let images = Images {
            store: &store,
            dir: dir.path(),
            pages: &pages,
            maps: &maps,
        };
        // (stopped, budget, how many of `firsts` are read)
        for (stopped, budget, read) in [
            (false, u64::MAX, firsts.len()),
            (false, 1, 1),
            (true, u64::MAX, 0),
        ] {
            let (woken, _wake) = std::io::pipe().expect("pipe");
            let shared = Shared {
                stop: AtomicBool::new(stopped),
                woken: woken.into(),
                error: Mutex::new(None),
                conns: Mutex::new(Vec::new()),
                buffered: AtomicUsize::new(0),
                budget: 4,
                threads: 1,
            };
            let opened = Opened::new(&images);
            let (send, firsts_rx) = std::sync::mpsc::channel();
            send.send(firsts.clone()).expect("send");
            drop(send);
            head_start(&store, &firsts_rx, &opened, &shared, budget);
            for (k, pack) in firsts.iter().enumerate() {
                let len = std::fs::metadata(store.blob_path(pack))
                    .expect("pack file")
                    .len();
                let again = opened.read_once(pack, || 7);
                if k < read {
                    assert_eq!(again, len, "{pack}: read ahead once, its bytes counted");
                } else {
                    assert_eq!(
                        again, 7,
                        "{pack} (stopped: {stopped}, budget {budget}) not read"
                    );
                }
                assert_eq!(
                    opened.read_once(pack, || panic!("{pack} read twice")),
                    again
                );
            }
        }
    }

    /// A pipe that moves on to whatever chunk is waited for, and is over from `over_at` on.
    struct Scripted {
        written: Mutex<usize>,
        over_at: usize,
    }

    impl Progress for Scripted {
        fn written(&self) -> Option<usize> {
            let w = *self.written.lock().expect("lock");
            (w < self.over_at).then_some(w)
        }

        fn wait_written(&self, chunks: usize) -> bool {
            let mut w = self.written.lock().expect("lock");
            if chunks >= self.over_at {
                *w = self.over_at;
                return false;
            }
            *w = (*w).max(chunks);
            true
        }
    }

    /// Item: packs are read ahead in the plan's order, each only once the pipe is within the
    /// chunk bound of its first use and while the bytes read ahead and not reached stay under
    /// the byte bound; a repacked pack is read at each pack that holds its pages now; nothing
    /// more is read once the file is over.
    #[test]
    fn packs_are_read_ahead_in_order_within_both_bounds_and_not_after_the_end() {
        let digest = |n: u32| pf_core::Digest256::of(&n.to_le_bytes());
        let plan: Vec<(usize, u32)> = [0, 0, 10, 20, 300, 301, 302, 303, 900, 1000]
            .into_iter()
            .zip(0..)
            .collect();
        // Pack 5 was repacked into two.
        let sites = |n: u32| match n {
            5 => vec![digest(50), digest(51)],
            n => vec![digest(n)],
        };
        let first_of = |d: &pf_core::Digest256| {
            let n = (0..10u32)
                .find(|&n| sites(n).contains(d))
                .expect("a planned pack");
            plan[n as usize].0
        };
        for (over_at, read) in [(usize::MAX, 11), (305, 9)] {
            let pipe = Scripted {
                written: Mutex::new(0),
                over_at,
            };
            let fetched: Mutex<Vec<(pf_core::Digest256, usize)>> = Mutex::new(Vec::new());
            let fetch = |d: &pf_core::Digest256| {
                let now = *pipe.written.lock().expect("lock");
                fetched.lock().expect("lock").push((*d, now));
                100
            };
            read_ahead(&plan, &sites, &fetch, &pipe, (50, 250));
            let fetched = fetched.into_inner().expect("lock");
            let order: Vec<pf_core::Digest256> = fetched.iter().map(|&(d, _)| d).collect();
            let expected: Vec<pf_core::Digest256> = (0..10u32).flat_map(sites).take(read).collect();
            assert_eq!(order, expected, "over at {over_at}");
            for (k, &(d, now)) in fetched.iter().enumerate() {
                assert!(first_of(&d) <= now + 50, "read ahead too early: {k}");
                let unreached: u64 = fetched[..k]
                    .iter()
                    .filter(|&&(e, _)| first_of(&e) >= now)
                    .map(|_| 100)
                    .sum();
                assert!(unreached < 250, "{unreached} bytes ahead before read {k}");
            }
        }
    }

    /// Item: a page that fails its check never reaches CRIU: the pipe ends before it (CRIU reads
    /// a short file and its restore fails), every byte sent before it is right, and the
    /// streamer's error names the page, winning over whatever the restore said.
    #[test]
    fn a_bad_page_ends_the_pages_file_before_it_and_is_the_error() {
        use pf_core::pack::{Pack, PackBuilder};
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (bytes, image) = stored_pages(&store, dir.path());
        // The pack rewritten with one page's bytes changed but its digest kept.
        let manifest = load_manifest(&store, &image.manifest).expect("manifest");
        let pack_digest = manifest.packs[0];
        let pack_bytes = store.get(&pack_digest).expect("pack");
        let pack = Pack::parse(pack_digest, &pack_bytes).expect("parse");
        let victim = 1000u32;
        let mut forged = PackBuilder::new(1);
        let mut page = [0u8; PAGE_SIZE];
        for (digest, slot) in pack.entries() {
            pack.read_page(slot, &digest, &mut page).expect("page");
            if slot == victim {
                page[9] ^= 1;
            }
            forged.push(&page, digest);
        }
        let forged = store.put(&forged.finish().expect("pack")).expect("put");
        let mut packs = manifest.packs.clone();
        packs[0] = forged;
        let bad = PagesManifest { packs, ..manifest };
        let bad = store
            .put(&serde_json::to_vec(&bad).expect("json"))
            .expect("put manifest");
        let pages = [PagesImage {
            manifest: bad,
            ..image
        }];
        let maps = HashMap::new();
        let images = Images {
            store: &store,
            dir: dir.path(),
            pages: &pages,
            maps: &maps,
        };
        let mut got = Vec::new();
        let err = serve_while(&images, || {
            let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
            got = fetch(&mut conn, "pages-1.img").expect("pages");
            Ok(())
        })
        .expect_err("a bad page");
        assert!(
            matches!(&err, Error::CorruptPage { file, .. } if file == "pages-1.img"),
            "{err}"
        );
        // Which page the victim slot holds: the bytes stop at or before it.
        let victim_page = bytes
            .chunks_exact(PAGE_SIZE)
            .position(|p| {
                p[..8] != [0; 8]
                    && pf_core::Digest256::of(p)
                        == pack.entries().nth(victim as usize).expect("entry").0
            })
            .expect("the victim's page");
        assert!(
            got.len() <= victim_page * PAGE_SIZE,
            "{} bytes reached CRIU",
            got.len()
        );
        assert!(got.len() % PAGE_SIZE == 0 && got[..] == bytes[..got.len()]);
    }

    /// The page list is opened ahead once: a pages file asked for again (by a second restore
    /// of the same serving, say) is opened anew and served whole again.
    #[test]
    fn a_pages_file_asked_for_twice_is_served_whole_twice() {
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (bytes, image) = stored_pages(&store, dir.path());
        serve_one(&store, dir.path(), image, |conn| {
            for _ in 0..2 {
                let got = fetch(conn, "pages-1.img").expect("pages");
                assert!(
                    got == bytes,
                    "{} bytes, not the file's {}",
                    got.len(),
                    bytes.len()
                );
            }
        })
        .expect("served");
    }

    #[test]
    fn requests_are_parsed_and_anything_else_refused() {
        let mut msg = vec![0x0a, 13];
        msg.extend_from_slice(b"inventory.img");
        assert_eq!(parse_request(&msg).as_deref(), Some("inventory.img"));
        // A two-byte varint length.
        let long = "a".repeat(200);
        let mut msg = vec![0x0a, 0xc8, 0x01];
        msg.extend_from_slice(long.as_bytes());
        assert_eq!(parse_request(&msg), Some(long));
        // Wrong field, short, trailing bytes, empty.
        assert_eq!(parse_request(&[0x08, 1]), None);
        assert_eq!(parse_request(&[0x0a, 5, b'a']), None);
        assert_eq!(parse_request(&[0x0a, 1, b'a', b'b']), None);
        assert_eq!(parse_request(&[]), None);
    }
}
