//! Streamed capture: `criu dump --stream` hands every image to pf through a pipe, and pf hashes
//! each page of the memory as it comes, keeping in the images directory only what the store
//! will need: the small images whole, and of each pages file only the pages the store and the
//! file itself do not already hold (the others are holes).
//!
//! Why: dumping to tmpfs, CRIU copies every page into the file and pf reads it back to hash it;
//! a re-freeze that changed 5% of memory wrote and read the other 95% for nothing. Streamed,
//! CRIU moves page references into the pipe (`splice`, no copy), pf copies each page once to
//! hash it, and writes only new pages.
//!
//! The protocol is CRIU's image streamer (criu/img-streamer.c) in capture mode: CRIU connects to
//! `streamer-capture.sock` in the images directory and, for each image it writes, sends a
//! request (a native-endian `u32` length, then `img_streamer_request_entry {filename}`) and
//! then the read end of a fresh pipe (`SCM_RIGHTS`, one dummy byte); no reply. It then writes
//! the image into the pipe and closes it.
//!
//! - **A pipe holds references to the tree's own pages**, not copies, so a tree that runs again
//!   (`--leave-running`) could change a page pf has not read yet. CRIU runs its `post-dump`
//!   action script before it lets the tree go: pf gives CRIU one ([`Hold`]) that asks pf whether
//!   every image was read to its end, and waits for the answer. A pf that died does not answer:
//!   the script sees pf gone and fails, and CRIU then leaves the tree running and fails the
//!   dump.
//! - **Which pages are kept**: a page is hashed on whichever of pf's threads read it; then, in
//!   file order, it is left out if it is a zero page, if it came earlier in the same file, or if
//!   the snapshot it most likely descends from lists it (guessed from the first pages, as a
//!   freeze to a directory guesses it). What is left out is only what the store is expected to
//!   have: storing a page the store turns out to lack is an error, never a packed hole.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read as _;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use pf_core::pack::PAGE_SIZE;
use pf_core::pages::{PagesIn, PagesReader};
use pf_core::{BlobStore, Digest256, DigestMap};

use crate::error::{Error, Result};

/// The socket CRIU's dump connects to, in the images directory.
pub(crate) const SOCKET: &str = "streamer-capture.sock";
/// Pages read from a pipe at a time.
const CHUNK_PAGES: usize = 256;
/// Pages hashed before the base is guessed from them (and at most used for it).
const SAMPLE_PAGES: usize = 64;
/// The pipe size asked for.
const PIPE_SIZE: usize = 1 << 20;
/// Buffers of kept pages (a chunk each) on their way to the packer at once, at most.
const PREPACK_BUFFERS: usize = 8;
/// How long CRIU's post-dump may wait for the images still being read.
const HOLD_DEADLINE: Duration = Duration::from_secs(60);

/// What a streamed dump's pages file holds: a digest per page (None: a zero page) and which
/// pages were written into the file (the rest are holes).
#[derive(Default)]
pub(crate) struct StreamedPages<'s> {
    pub(crate) digests: Vec<Option<Digest256>>,
    pub(crate) kept: Vec<bool>,
    /// The manifest its pages were left out against, if one was guessed, and its list.
    pub(crate) base: Option<(Digest256, PagesReader<'s>)>,
}

impl std::fmt::Debug for Captured<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captured")
            .field("pages", &self.pages)
            .field("prepacked", &self.prepacked)
            .finish()
    }
}

impl std::fmt::Debug for StreamedPages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedPages")
            .field("pages", &self.digests.len())
            .field("kept", &self.kept.iter().filter(|k| **k).count())
            .field("base", &self.base.as_ref().map(|(m, _)| m))
            .finish()
    }
}

/// Everything the capture server learnt, by pages file name.
pub(crate) type Streamed<'s> = HashMap<String, StreamedPages<'s>>;

/// The post-dump hold a streamed capture needs, unless streamed capture is off
/// (`PF_CAPTURE=dir`: CRIU dumps into a directory and pf follows the pages files) or cannot run
/// here (no `bash`, scratch space mounted noexec): then None, and pf dumps into a directory.
pub(crate) fn prepare() -> Option<Hold> {
    if std::env::var_os("PF_CAPTURE").is_some_and(|v| v == "dir") {
        return None;
    }
    Hold::new()
        .inspect_err(|e| tracing::info!(error = %e, "dumping into a directory, not streamed"))
        .ok()
}

/// Tree memory (private and shared anonymous, [`tree_memory`]) from which a dump is streamed
/// through pf even when the directory has the room for it: 128 MiB.
pub(crate) const STREAM_FROM: u64 = 128 << 20;

/// Whether to stream `pid`'s dump through pf rather than have CRIU dump into `dir`: when the
/// tree has [`STREAM_FROM`] of memory or more, or `dir` lacks the room for it (`/dev/shm` is
/// small in many containers; on tmpfs the machine's available memory counts too,
/// [`room_for`]). Streamed, CRIU splices the tree's pages into pipes and pf copies each once
/// to hash it, writing only the pages the store lacks (and of those only the ones its packer
/// did not take during the dump); into the directory, CRIU copies every page into tmpfs
/// memory allocated for it, and pf follows the files as they grow (mapped) and frees them.
///
/// Measured by hand (bench goblins, `pf -vv`, paired, `PF_CAPTURE` forcing either, sleeping
/// 0.2–1 s or 6 s before each freeze): streamed won the wall at 128 MiB and up, and the pause
/// too. 1 GiB re-freeze after 5% changed: 0.56 against 0.91 s, pause 395 against 635 ms
/// (after 6 s: 0.66 against 1.86 s, 486 against 1504 ms); first freeze 1.48 against 2.45 s,
/// pause 777 against 1274 ms. 256 MiB first freeze 0.415 against 0.503 s, pause 183 against
/// 194 ms; re-freeze 0.179 against 0.231 s, pause 107 against 151 ms. 128 MiB first freeze
/// 0.202 against 0.244 s, pause 90 against 107 ms; re-freeze 0.127 against 0.134 s, pause 64
/// against 82 ms. At 64 MiB a first freeze ties on the wall (0.199 against 0.200 s) and its
/// pause is longer streamed (74 against 60 ms): the directory stays below [`STREAM_FROM`].
/// Why the directory loses: a dump into tmpfs needs as much fresh memory as the tree has, and
/// on a VM that reports free memory to its host (virtio-balloon free page reporting, as on
/// this Firecracker VM: `/sys/module/page_reporting`) memory freed a few seconds earlier comes
/// back only through the host's page faults (a 1 GiB dump's pause 0.6–3.6 s into the
/// directory); streamed, pf's buffers are few and reused. An earlier session measured the
/// directory ahead on the pause (1 GiB re-freeze 0.60–0.75 against 0.80–0.89 s), with its
/// tmpfs memory warm. `PF_CAPTURE=stream|dir` forces either.
///
/// Some(the sample to guess the base from: empty, so the capture takes it as the dump starts)
/// to stream, None not to.
pub(crate) fn should_stream(pid: i32, dir: &Path) -> Option<Vec<Digest256>> {
    match std::env::var_os("PF_CAPTURE") {
        Some(v) if v == "stream" => return Some(Vec::new()),
        Some(v) if v == "dir" => return None,
        _ => {}
    }
    let memory = tree_memory(pid);
    let room = room_for(dir, memory);
    tracing::debug!(
        pid,
        memory,
        room,
        dir = %dir.display(),
        "streamed from 128 MiB of memory or without the room, else into the directory"
    );
    streams(memory, room).then(Vec::new)
}

/// The choice of [`should_stream`] for a tree of `memory` bytes whose scratch directory has
/// (`room`) or lacks the room for it.
fn streams(memory: u64, room: bool) -> bool {
    !room || memory >= STREAM_FROM
}

/// The anonymous memory (private, `RssAnon`, and shared, `RssShmem`) the processes of `pid`'s
/// tree have in memory, from `/proc/<pid>/status`: counters, so reading them costs nothing
/// however large the memory (`smaps` walks every page table entry). About what CRIU writes of
/// their memory; a process gone meanwhile counts nothing.
fn tree_memory(pid: i32) -> u64 {
    pf_os::proc::tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .map(|status| {
            ["RssAnon:", "RssShmem:"]
                .iter()
                .filter_map(|field| pf_os::proc::status_kib(&status, field))
                .map(|kib| kib.saturating_mul(1024))
                .fold(0u64, u64::saturating_add)
        })
        .fold(0, u64::saturating_add)
}

/// Whether `dir`'s filesystem has room for a dump of `bytes` of memory, and an eighth more and
/// 64 MiB besides (CRIU's other images, other users of the filesystem meanwhile); on tmpfs,
/// whose files are memory, the machine must have as much available too (`MemAvailable`, swap
/// left out: a dump swapped out as it is written takes longer than one streamed, and a tmpfs
/// may be larger than the memory left). No when it cannot tell.
fn room_for(dir: &Path, bytes: u64) -> bool {
    let wanted = bytes.saturating_add(bytes / 8).saturating_add(64 << 20);
    let room =
        rustix::fs::statvfs(dir).is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) >= wanted);
    let in_memory = nix::sys::statfs::statfs(dir).map_or(true, |s| {
        s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
    });
    room && (!in_memory || memory_available().is_some_and(|m| m >= wanted))
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    pf_os::proc::status_kib(&info, "MemAvailable:")?.checked_mul(1024)
}

/// The digests of up to `n` non-zero pages spread over the memory `pid` has in its private
/// writable anonymous mappings (weighted by each one's `Rss` in `/proc/<pid>/smaps`, so that
/// large reservations that were never touched do not take the sample), of pages in memory only
/// (`/proc/<pid>/pagemap`: present, not swapped), so that sampling never faults a page in; and
/// how many bytes those mappings have in memory.
fn sample_pages(pid: i32, n: usize) -> std::io::Result<(Vec<Digest256>, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    // (start, end, resident pages) of each area sampled.
    let mut areas: Vec<(u64, u64, u64)> = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if let Some((start, end)) = current.take() {
                let kb: u64 = rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                let pages = kb * 1024 / PAGE_SIZE as u64;
                if pages > 0 {
                    areas.push((start, end, pages));
                }
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        // A header line. Anonymous (no path, or [heap] and the like): a file's data is the
        // same in every instance of a program.
        current = (perms.starts_with("rw")
            && perms.ends_with('p')
            && !fields.nth(3).is_some_and(|path| path.starts_with('/'))
            && end > start)
            .then_some((start, end));
    }
    let total: u64 = areas.iter().map(|a| a.2).sum();
    let page = PAGE_SIZE as u64;
    if total == 0 || n == 0 {
        return Ok((Vec::new(), total * page));
    }
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut entries = vec![0u8; 8 * 64];
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut out = Vec::with_capacity(n);
    for k in 0..n as u64 {
        // The resident page k/n of the way through, placed proportionally in its area, then
        // the first resident page from there (64 pages at most).
        let mut target = (2 * k + 1) * total / (2 * n as u64);
        let Some(&(start, end, resident)) = areas.iter().find(|a| {
            if target < a.2 {
                true
            } else {
                target -= a.2;
                false
            }
        }) else {
            continue;
        };
        let pages = (end - start) / page;
        let first = start + (target * pages / resident) * page;
        let probe = ((end - first) / page).min(64) as usize;
        if probe == 0
            || pagemap
                .read_exact_at(&mut entries[..probe * 8], first / page * 8)
                .is_err()
        {
            continue;
        }
        let at = entries[..probe * 8]
            .chunks_exact(8)
            .position(|e| {
                let e = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                e & (1 << 63) != 0 && e & (1 << 62) == 0
            })
            .map(|i| first + i as u64 * page);
        if let Some(at) = at
            && mem.read_exact_at(&mut buf, at).is_ok()
            && !pf_core::pack::is_zero_page(&buf)
        {
            out.push(pf_core::pack::page_digest(&buf));
        }
    }
    Ok((out, total * page))
}

fn bash() -> Option<&'static str> {
    ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

/// The capture's side of [`pf_core::pages::prepack`]: a file thread sends the pages it keeps to
/// be packed at once while a buffer is free, else writes them into its file as before.
struct Prepack {
    /// Taken (and dropped) once every file thread is done: the packer then ends.
    send: Mutex<Option<SyncSender<PagesIn>>>,
    /// Free buffers, [`PREPACK_BUFFERS`] in all.
    spare: Mutex<Receiver<Vec<u8>>>,
}

/// What a file thread holds of [`Prepack`]: its own sender, and the free buffers.
type PrepackSide<'a> = (&'a SyncSender<PagesIn>, &'a Mutex<Receiver<Vec<u8>>>);

/// State shared by the server, its file threads and the hold.
struct Shared<'s> {
    /// None: every kept page goes into its file.
    prepack: Option<Prepack>,
    stop: AtomicBool,
    /// Files being read: the hold waits until none is.
    open: Mutex<usize>,
    closed: Condvar,
    pages: Mutex<Streamed<'s>>,
    error: Mutex<Option<Error>>,
    /// The packer's failure: the cause of a file thread's that could not hand it pages.
    packer_error: Mutex<Option<Error>>,
    /// The base guessed before the dump, for the root's pages file.
    early: Option<EarlyBase<'s>>,
    /// Where CRIU's requests are on the way to the root's pages file ([`Shared::roots`]).
    root_seen: Mutex<RootSeen>,
}

/// The root's pages file is the one CRIU asks for right after the first process's pagemap
/// (`pagemap-<pid>.img`: CRIU dumps the root first, and opens each pagemap and then its pages
/// file). Not simply the first pages file: a tree's shared anonymous memory comes first, in
/// `pagemap-shmem-<id>.img` and a pages file of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RootSeen {
    Not,
    Pagemap,
    Done,
}

impl Shared<'_> {
    /// Whether `name`, asked for now, is the root's pages file.
    fn roots(&self, name: &str) -> bool {
        let mut seen = self.root_seen.lock().unwrap_or_else(|p| p.into_inner());
        let process_pagemap = name
            .strip_prefix("pagemap-")
            .and_then(|rest| rest.strip_suffix(".img"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let (next, roots) = match *seen {
            RootSeen::Not if process_pagemap => (RootSeen::Pagemap, false),
            RootSeen::Not => (RootSeen::Not, false),
            RootSeen::Pagemap => (RootSeen::Done, crate::v2::is_pages_file(name)),
            RootSeen::Done => (RootSeen::Done, false),
        };
        *seen = next;
        roots
    }
}

/// A base guessed from the root's memory as the dump starts (`/proc/<pid>/mem`, sampled by
/// [`sample_pages`]), while CRIU seizes the tree and injects its parasite: ready when
/// the first pages come, where a guess from the pages themselves is ready only after ~100 ms
/// of them at 1 GiB (reading a base's list and making a set of it), and every page until then
/// is kept. It goes to the root's pages file ([`RootSeen`]); should that be another's, its
/// pages are only compared against a set the store has, and more of them are kept.
struct EarlyBase<'s> {
    /// None until guessed; then the guess (None if the sample could not be taken).
    guessed: Mutex<Option<Option<Guessed<'s>>>>,
    ready: Condvar,
}

impl<'s> EarlyBase<'s> {
    fn set(&self, guessed: Option<Guessed<'s>>) {
        *self.guessed.lock().unwrap_or_else(|p| p.into_inner()) = Some(guessed);
        self.ready.notify_all();
    }

    /// The guess if it is made (taken), or None if it is not yet: Some(None) if it was made
    /// without a sample.
    fn try_take(&self) -> Option<Option<Guessed<'s>>> {
        self.guessed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Wait for the guess and take it; None at once if the file failed meanwhile.
    fn take(&self, failed: &AtomicBool) -> Option<Guessed<'s>> {
        let mut slot = self.guessed.lock().unwrap_or_else(|p| p.into_inner());
        while slot.is_none() {
            if failed.load(Ordering::Relaxed) {
                return None;
            }
            slot = self
                .ready
                .wait_timeout(slot, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        slot.take().flatten()
    }
}

/// Sets an early guess that was not made (its thread panicked) to none, so no file waits on it.
struct Unblock<'a, 's>(&'a EarlyBase<'s>);

impl Drop for Unblock<'_, '_> {
    fn drop(&mut self) {
        let mut slot = self.0.guessed.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(None);
            self.0.ready.notify_all();
        }
    }
}

/// What a sample of pages says: whether the store has none of them (new memory), and the
/// base it most likely descends from with its list and the set of its pages the store has.
struct Guessed<'s> {
    new_memory: bool,
    base: Option<(Arc<DigestMap<()>>, Digest256, PagesReader<'s>)>,
}

impl<'s> Guessed<'s> {
    /// Whether it found a base or new memory (else a guess from the file's own pages may).
    fn telling(&self) -> bool {
        self.base.is_some() || self.new_memory
    }

    /// Make it the file's: its base, else packing at once if the memory is new. Whether it had
    /// a base.
    fn decide(self, decided: &Mutex<Decided<'s>>) -> bool {
        let mut d = decided.lock().unwrap_or_else(|p| p.into_inner());
        match self.base {
            Some((set, manifest, list)) => {
                d.base = Some(set);
                d.out.base = Some((manifest, list));
                true
            }
            None => {
                d.pack_now = self.new_memory;
                false
            }
        }
    }
}

impl Shared<'_> {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            || self
                .packer_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    fn opened(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn done(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.closed.notify_all();
    }

    /// Wait until every file being read is read; false if that took too long.
    fn wait_all_read(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (open, _) = self
            .closed
            .wait_timeout_while(open, HOLD_DEADLINE, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *open == 0
    }
}

/// CRIU's post-dump hold: two FIFOs in a private directory and the action script that uses
/// them. The script writes a line into `ask` and waits for a line in `answer` (`ok`: let the
/// tree go; anything else, or pf gone: fail).
pub(crate) struct Hold {
    _dir: crate::capture::Scratch,
    ask: std::fs::File,
    answer: std::fs::File,
    script: OsString,
}

impl Hold {
    fn new() -> Result<Self> {
        let bash = bash().ok_or_else(|| Error::Sys {
            op: "finding bash for criu's post-dump hold",
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let dir = crate::capture::scratch_dir("pf-hold-")?;
        let fifo = |name: &str| -> Result<(PathBuf, std::fs::File)> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let path = dir.path().join(name);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
                0,
            )
            .map_err(|e| Error::io("make a fifo", &path, e.into()))?;
            // Read and write, so opening never waits for the other side; non-blocking reads.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(&path)
                .map_err(|e| Error::io("open", &path, e))?;
            Ok((path, file))
        };
        let (ask_path, ask) = fifo("ask")?;
        let (answer_path, answer) = fifo("answer")?;
        let quote = |p: &Path| -> Result<String> {
            let s = p.to_str().filter(|s| !s.contains('\'')).ok_or_else(|| {
                Error::io(
                    "quote",
                    p,
                    std::io::Error::other("a scratch path criu's shell cannot be given"),
                )
            })?;
            Ok(format!("'{s}'"))
        };
        // CRIU runs the script (a path, no arguments) for every action; it acts on post-dump
        // only. `read -t` returns as soon as the answer comes; every 50 ms the script checks
        // that pf still lives: pf holds an exclusive `flock` on its scratch dir while it does
        // (a shared one is granted only once pf is gone, even while it is an unreaped zombie).
        // The lock is on the directory's inode, so it holds for criu run inside a thawed copy's
        // namespaces too, where pf's pid means nothing. It gives up on its own after the hold's
        // deadline and 30 s.
        let text = format!(
            "#!{bash}\n\
             test \"$CRTOOLS_SCRIPT_ACTION\" = post-dump || exit 0\n\
             exec 3<>{ask} 4<>{answer} 5<{dir} || exit 1\n\
             echo >&3\n\
             while ! read -r -t 0.05 x <&4; do\n\
             \x20 if flock -n -s 5 2>/dev/null; then exit 1; fi\n\
             \x20 (( SECONDS < {limit} )) || exit 1\n\
             done\n\
             test \"$x\" = ok\n",
            ask = quote(&ask_path)?,
            answer = quote(&answer_path)?,
            dir = quote(dir.path())?,
            limit = HOLD_DEADLINE.as_secs() + 30,
        );
        let script = dir.path().join("hold");
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&script)
                .map_err(|e| Error::io("write", &script, e))?;
            f.write_all(text.as_bytes())
                .map_err(|e| Error::io("write", &script, e))?;
        }
        let noexec = rustix::fs::statvfs(dir.path())
            .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::NOEXEC));
        if noexec {
            return Err(Error::io(
                "run criu's post-dump hold from",
                dir.path(),
                std::io::Error::other("mounted noexec"),
            ));
        }
        Ok(Self {
            _dir: dir,
            ask,
            answer,
            script: script.into_os_string(),
        })
    }
}

/// Serve CRIU's capture socket in `dir` while `dump` runs `criu dump --stream` with the extra
/// arguments it is given; return what `dump` returned and the pages files' digests. Every image
/// but the pages files is left in `dir` whole; of the pages files, the pages the store lacks are
/// packed as they come while the packer keeps up (with `prepack`), the rest left in the files.
pub(crate) fn capture_while<'s, T>(
    hold: Hold,
    store: &'s dyn BlobStore,
    (dir, prepack, root): (&Path, bool, Option<(i32, Vec<Digest256>)>),
    dump: impl FnOnce(&[OsString]) -> Result<T>,
) -> Result<(T, Captured<'s>)> {
    let path = dir.join(SOCKET);
    let listener = UnixListener::bind(&path).map_err(|e| Error::io("listen on", &path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set up", &path, e))?;
    let (prepack, packing) = if prepack {
        let (send, pages) = std::sync::mpsc::sync_channel::<PagesIn>(PREPACK_BUFFERS);
        let (spare_send, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(PREPACK_BUFFERS);
        for _ in 0..PREPACK_BUFFERS {
            // Chunk-sized: a chunk handed over whole is swapped for one of these, read into as
            // it is (zeros from the kernel, not written until read into).
            let _ = spare_send.try_send(vec![0u8; CHUNK_PAGES * PAGE_SIZE]);
        }
        (
            Some(Prepack {
                send: Mutex::new(Some(send)),
                spare: Mutex::new(spare),
            }),
            Some((pages, spare_send)),
        )
    } else {
        (None, None)
    };
    let shared = Shared {
        prepack,
        stop: AtomicBool::new(false),
        open: Mutex::new(0),
        closed: Condvar::new(),
        pages: Mutex::new(HashMap::new()),
        error: Mutex::new(None),
        packer_error: Mutex::new(None),
        early: root.as_ref().map(|_| EarlyBase {
            guessed: Mutex::new(None),
            ready: Condvar::new(),
        }),
        root_seen: Mutex::new(RootSeen::Not),
    };
    let extra: Vec<OsString> = vec![
        "--stream".into(),
        "--action-script".into(),
        hold.script.clone(),
    ];
    // Closed when the dump is over: wakes the server at once.
    let (woken, wake) = std::io::pipe().map_err(|source| Error::Sys {
        op: "creating the capture streamer's wake-up pipe",
        source,
    })?;
    let woken = OwnedFd::from(woken);
    let (result, prepacked) = std::thread::scope(|outer| {
        let shared = &shared;
        // Joined below, its panic ignored (a guess is only ever a guess): unjoined, the scope
        // would panic after CRIU let the tree go.
        let mut guesser = None;
        if let (Some(early), Some((pid, sample))) = (&shared.early, root) {
            let spawned = std::thread::Builder::new()
                .name("pf-base".into())
                .spawn_scoped(outer, move || {
                    let _unblock = Unblock(early);
                    let started = std::time::Instant::now();
                    let sample = match sample.is_empty() {
                        false => Ok(sample),
                        true => sample_pages(pid, SAMPLE_PAGES).map(|(sample, _)| sample),
                    };
                    let guessed = sample
                        .inspect_err(|e| tracing::debug!(pid, error = %e, "no early sample"))
                        .ok()
                        .map(|sample| guess_from(store, sample));
                    tracing::debug!(
                        pid,
                        base = ?guessed.as_ref().and_then(|g| g.base.as_ref()).map(|b| b.1),
                        new_memory = guessed.as_ref().is_some_and(|g| g.new_memory),
                        elapsed = ?started.elapsed(),
                        "base guessed as the dump starts"
                    );
                    early.set(guessed);
                });
            match spawned {
                Ok(handle) => guesser = Some(handle),
                Err(e) => {
                    tracing::debug!(error = %e, "no thread to guess the base early");
                    early.set(None);
                }
            }
        }
        // The packer of kept pages, from the start of the dump until every file thread is done.
        // Its failure is recorded at once, so that the hold answers `fail`.
        let packer = packing.and_then(|(pages, spare)| {
            std::thread::Builder::new()
                .name("pf-prepack".into())
                .spawn_scoped(outer, move || {
                    prepack_priority();
                    pf_core::pages::prepack(store, crate::v2::threads(), pages, spare)
                        .map_err(|source| {
                            let e = Error::Pages {
                                what: "packing the pages of the dump".to_owned(),
                                source: Box::new(source),
                            };
                            shared
                                .packer_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        })
                        .ok()
                })
                .inspect_err(
                    |e| tracing::debug!(error = %e, "no thread to pack pages during the dump"),
                )
                .ok()
        });
        // Dropped whatever happens below, even a panic: the packer then packs what it was sent
        // and ends (the file threads' own senders are gone with the inner scope).
        let close = CloseSend(shared.prepack.as_ref());
        if packer.is_none() {
            // No packer: file threads write every kept page (their sends would fail).
            close.close();
        }
        let result = std::thread::scope(|s| {
            // Stops the server when the dump is over, or if it panics (the scope would wait for
            // the server otherwise).
            let _stop = StopOnDrop {
                stop: &shared.stop,
                wake: Some(wake),
            };
            let server = std::thread::Builder::new()
                .name("pf-capture".into())
                .spawn_scoped(s, || {
                    serve(s, (&listener, &path), dir, store, (&hold, &woken), shared);
                })
                .map_err(|source| Error::Sys {
                    op: "starting the capture streamer",
                    source,
                });
            match server {
                Ok(_) => dump(&extra),
                Err(e) => Err(e),
            }
        });
        drop(close);
        let prepacked =
            packer.and_then(|p| p.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        if guesser.is_some_and(|g| g.join().is_err()) {
            tracing::debug!("the thread guessing the base early panicked");
        }
        (result, prepacked)
    });
    let _ = std::fs::remove_file(&path);
    // pf's own failure first: CRIU's error is then mostly its consequence (a failed post-dump
    // script, a broken pipe); but a tree that exited during the dump says so. Of pf's, the
    // packer's: it fails the capture (the pages sent to it are in no file), and is the cause of
    // a file thread's that could not hand it pages.
    let packer_error = shared
        .packer_error
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let file_error = shared.error.into_inner().unwrap_or_else(|p| p.into_inner());
    if let (Some(_), Some(other)) = (&packer_error, &file_error) {
        tracing::debug!(error = %other, "a file thread failed too");
    }
    if let Some(e) = packer_error.or(file_error) {
        return match result {
            Err(criu @ Error::ExitedDuringDump { .. }) => Err(criu),
            Err(criu) => {
                tracing::warn!(error = %criu, "criu's dump failed too");
                Err(e)
            }
            Ok(_) => Err(e),
        };
    }
    let result = result?;
    let pages = shared.pages.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((result, Captured { pages, prepacked }))
}

/// What a streamed capture left for storing: every pages file's digests, and the packs it
/// made of pages it kept while the dump ran (None: it packed nothing then).
pub(crate) struct Captured<'s> {
    pub(crate) pages: Streamed<'s>,
    pub(crate) prepacked: Option<pf_core::pages::PrePacked<'s>>,
}

/// Whether kept pages are packed while the dump runs (`PF_PREPACK=0` turns it off, to compare).
pub(crate) fn prepack_on() -> bool {
    std::env::var_os("PF_PREPACK").is_none_or(|v| v != "0")
}

/// The packer runs at nice 19 (its threads inherit it): it takes the CPU the capture's threads
/// leave, so the pause does not grow much. Measured by hand (1 GiB bench goblin, first freezes
/// into empty stores, 6 rounds, raw `criu dump` 0.90 s and its pause 0.87 s): packing nothing
/// during the dump 1.63 s, pause 0.67 s; the packer at nice 0 1.36 s, pause 0.99 s (it packed
/// 102k of the 133k new pages); nice 10 1.48 s, pause 0.88 s; nice 19 1.43 s, pause 0.80 s
/// (70k of them).
fn prepack_priority() {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(error = %e, "cannot lower the packer's priority");
    }
}

/// Drops the packer's original sender when dropped (the packer ends once the file threads'
/// clones are gone too).
struct CloseSend<'a>(Option<&'a Prepack>);

impl CloseSend<'_> {
    fn close(&self) {
        if let Some(prepack) = self.0 {
            prepack
                .send
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }
}

impl Drop for CloseSend<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sets the stop flag and closes the wake-up pipe when dropped.
struct StopOnDrop<'a> {
    stop: &'a AtomicBool,
    wake: Option<std::io::PipeWriter>,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.wake.take());
    }
}

/// Answers CRIU's hold with `fail` if the server thread unwinds, so the tree is let go at once.
struct FailHoldOnPanic<'a>(&'a std::fs::File);

impl Drop for FailHoldOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            use std::io::Write as _;
            let _ = (&*self.0).write_all(b"fail\n");
        }
    }
}

/// Marks a file read (and failed, if its thread unwinds) when dropped.
struct DoneOnDrop<'a, 's>(&'a Shared<'s>);

impl Drop for DoneOnDrop<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(Error::Sys {
                op: "reading an image from criu's dump",
                source: std::io::Error::other("the thread reading it panicked"),
            });
        }
        self.0.done();
    }
}

/// Tells the other threads of a pages file to stop if this one unwinds.
struct FailOnPanic<'a> {
    failed: &'a AtomicBool,
    turn: &'a Condvar,
}

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.failed.store(true, Ordering::Relaxed);
            self.turn.notify_all();
        }
    }
}

/// Accept CRIU's connection, take its images, answer its post-dump hold; until stopped.
fn serve<'scope, 'env, 's: 'scope>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    (listener, path): (&UnixListener, &Path),
    dir: &'env Path,
    store: &'s dyn BlobStore,
    (hold, woken): (&Hold, &OwnedFd),
    shared: &'scope Shared<'s>,
) {
    let _fail_hold = FailHoldOnPanic(&hold.answer);
    let mut conn: Option<UnixStream> = None;
    let mut ended = false;
    let ms = u16::try_from(crate::streamer::TICK.as_millis()).unwrap_or(u16::MAX);
    while !shared.stop.load(Ordering::Relaxed) {
        let (conn_ready, asked) = {
            let mut fds = vec![
                PollFd::new(hold.ask.as_fd(), PollFlags::POLLIN),
                PollFd::new(woken.as_fd(), PollFlags::POLLIN),
            ];
            match (&conn, ended) {
                (Some(c), _) => fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN)),
                (None, false) => fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN)),
                (None, true) => {}
            }
            if !matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0) {
                continue;
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (fds.get(2).is_some_and(ready), ready(&fds[0]))
        };
        if conn_ready {
            match conn.as_ref() {
                None => {
                    if let Ok((c, _)) = listener.accept()
                        && c.set_nonblocking(false).is_ok()
                    {
                        // Nothing else may connect, and the socket must not be stored.
                        let _ = std::fs::remove_file(path);
                        conn = Some(c);
                    }
                }
                Some(c) => match request(s, c, dir, store, shared) {
                    Ok(true) => {}
                    Ok(false) => {
                        conn = None;
                        ended = true;
                    }
                    Err(e) => {
                        shared.fail(e);
                        let _ = c.shutdown(std::net::Shutdown::Both);
                        conn = None;
                        ended = true;
                    }
                },
            }
        }
        if asked {
            let mut line = [0u8; 64];
            let _ = (&hold.ask).read(&mut line);
            // Every image CRIU will write before the tree goes on was sent already: take the
            // requests still queued, then wait until every file is read.
            if let Some(c) = conn.as_ref() {
                loop {
                    let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
                    if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
                        break;
                    }
                    match request(s, c, dir, store, shared) {
                        Ok(true) => {}
                        Ok(false) => {
                            conn = None;
                            ended = true;
                            break;
                        }
                        Err(e) => {
                            shared.fail(e);
                            let _ = c.shutdown(std::net::Shutdown::Both);
                            conn = None;
                            ended = true;
                            break;
                        }
                    }
                }
            }
            let all_read = shared.wait_all_read();
            if !all_read {
                shared.fail(Error::Sys {
                    op: "reading criu's images before it lets the tree run",
                    source: std::io::Error::other(format!(
                        "an image was still being written after {} s",
                        HOLD_DEADLINE.as_secs()
                    )),
                });
            }
            let answer: &[u8] = if all_read && !shared.failed() {
                b"ok\n"
            } else {
                b"fail\n"
            };
            use std::io::Write as _;
            if let Err(e) = (&hold.answer).write_all(answer) {
                tracing::warn!(error = %e, "cannot answer criu's post-dump hold");
            }
        }
    }
}

/// Take one request from CRIU and start reading its image; false when CRIU hung up.
fn request<'scope, 'env, 's: 'scope>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    mut conn: &UnixStream,
    dir: &'env Path,
    store: &'s dyn BlobStore,
    shared: &'scope Shared<'s>,
) -> Result<bool> {
    let bad = |what: String| Error::Sys {
        op: "taking an image from criu's dump",
        source: std::io::Error::other(what),
    };
    let mut len = [0u8; 4];
    match conn.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(bad(e.to_string())),
    }
    let len = u32::from_ne_bytes(len);
    if len > crate::streamer::MAX_REQUEST {
        return Err(bad(format!("an image request of {len} bytes")));
    }
    let mut msg = vec![0u8; len as usize];
    conn.read_exact(&mut msg).map_err(|e| bad(e.to_string()))?;
    let name = crate::streamer::parse_request(&msg)
        .filter(|n| !n.is_empty() && !n.contains('/') && n != "." && n != ".." && n != SOCKET)
        .ok_or_else(|| bad("a malformed image request".to_owned()))?;
    let pipe = crate::streamer::recv_fd(conn).map_err(|e| bad(e.to_string()))?;
    let path = dir.join(&name);
    let pages = crate::v2::is_pages_file(&name);
    if pages && path.exists() {
        // Two writers of one pages file would mix their pages under one list of digests.
        return Err(bad(format!("criu sent {name} twice")));
    }
    // As `criu dump` into a directory would: a file written again replaces the first (a new
    // file: the first one's thread may still be writing its own).
    let _ = std::fs::remove_file(&path);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    // The root's pages file takes the base guessed as the dump started, decided here in the
    // order CRIU asked.
    let early = shared.early.as_ref().filter(|_| shared.roots(&name));
    shared.opened();
    let spawned = std::thread::Builder::new()
        .name("pf-capture-file".into())
        .spawn_scoped(s, move || {
            let _done = DoneOnDrop(shared);
            let result = if pages {
                pages_file(pipe, &out, &path, store, (shared.prepack.as_ref(), early)).map(|p| {
                    shared
                        .pages
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name, p);
                })
            } else {
                let mut pipe = std::fs::File::from(pipe);
                let mut out = &out;
                std::io::copy(&mut pipe, &mut out)
                    .map(drop)
                    .map_err(|e| Error::io("write", &path, e))
            };
            if let Err(e) = result {
                shared.fail(e);
            }
        });
    if let Err(source) = spawned {
        shared.done();
        return Err(Error::Sys {
            op: "starting a thread to read an image",
            source,
        });
    }
    Ok(true)
}

/// The reading side of a pages file's pipe, shared by its threads: chunks are numbered in the
/// order they were read.
struct Reader {
    pipe: std::fs::File,
    next: usize,
    eof: bool,
}

/// The in-order side: the decisions made so far.
struct Decided<'s> {
    /// Whether kept pages may be packed at once: only once the base is known ([`guess_base`]).
    pack_now: bool,
    next: usize,
    seen: DigestMap<()>,
    base: Option<Arc<DigestMap<()>>>,
    out: StreamedPages<'s>,
}

/// Read a pages file from `pipe` on every core: hash each chunk, then in file order decide which
/// pages to keep, and send those to `prepack` or write them into `out`.
fn pages_file<'s>(
    pipe: OwnedFd,
    out: &std::fs::File,
    path: &Path,
    store: &'s dyn BlobStore,
    (prepack, early): (Option<&Prepack>, Option<&EarlyBase<'s>>),
) -> Result<StreamedPages<'s>> {
    let send = prepack.and_then(|p| p.send.lock().unwrap_or_else(|p| p.into_inner()).clone());
    let prepack = send.as_ref().zip(prepack.map(|p| &p.spare));
    let _ = rustix::pipe::fcntl_setpipe_size(&pipe, PIPE_SIZE);
    let reader = Mutex::new(Reader {
        pipe: std::fs::File::from(pipe),
        next: 0,
        eof: false,
    });
    let decided = Mutex::new(Decided {
        pack_now: false,
        next: 0,
        seen: DigestMap::default(),
        base: None,
        out: StreamedPages::default(),
    });
    let turn = Condvar::new();
    let failed = AtomicBool::new(false);
    let sample: Mutex<Option<Vec<Digest256>>> = Mutex::new(Some(Vec::new()));
    let threads = crate::v2::threads();
    // A base guessed before the dump that is ready is the file's before its first page is read;
    // one still being guessed is waited for beside the reading.
    let (early, decided_early) = match early.map(EarlyBase::try_take) {
        Some(Some(Some(guessed))) if guessed.telling() => {
            guessed.decide(&decided);
            (None, true)
        }
        Some(None) => (early, false),
        _ => (None, false),
    };
    let result = std::thread::scope(|s| {
        let guess = s.spawn(|| {
            if decided_early {
                return None;
            }
            guess_base(store, early, &sample, &failed, &decided)
        });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let _fail = FailOnPanic {
                        failed: &failed,
                        turn: &turn,
                    };
                    let r = work(
                        (&reader, &decided, &turn, &failed),
                        &sample,
                        prepack,
                        (out, path),
                    );
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                        turn.notify_all();
                    }
                    r
                })
            })
            .collect();
        let mut result = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            if result.is_ok() {
                result = r;
            }
        }
        // A file shorter than the sample: the guesser stops waiting.
        sample.lock().unwrap_or_else(|p| p.into_inner()).take();
        failed.store(true, Ordering::Relaxed);
        let _ = guess.join();
        result
    });
    result?;
    let d = decided.into_inner().unwrap_or_else(|p| p.into_inner());
    let len = d.out.digests.len() as u64 * PAGE_SIZE as u64;
    out.set_len(len).map_err(|e| Error::io("size", path, e))?;
    tracing::debug!(
        file = %path.display(),
        pages = d.out.digests.len(),
        kept = d.out.kept.iter().filter(|k| **k).count(),
        base = ?d.out.base.as_ref().map(|(m, _)| m),
        "pages file captured"
    );
    Ok(d.out)
}

/// The base of a streamed pages file: the one guessed before the dump if this file was given
/// it (`early`) and it found one or found new memory, else guessed from the first pages hashed
/// (`sample`); its list read and its pages made a set, into `decided`; None if there is none
/// (or the file failed). Then the pages kept from there on are packed at once
/// ([`Decided::pack_now`]) if the store has none of the sample (new memory: a first freeze):
/// the packer cannot look pages up, and pages it packs that the store had are dead bytes. Not
/// with a base (a re-freeze keeps a few changed pages, which cost less to pack after the dump
/// than the packer costs the pause; by hand, 1 GiB, 5% changed, 5 pairs: 0.917 s and pause
/// 0.613 s without it, 1.027 s and 0.722 s with it).
fn guess_base<'s>(
    store: &'s dyn BlobStore,
    early: Option<&EarlyBase<'s>>,
    sample: &Mutex<Option<Vec<Digest256>>>,
    failed: &AtomicBool,
    decided: &Mutex<Decided<'s>>,
) -> Option<()> {
    let early = early.and_then(|e| e.take(failed)).filter(Guessed::telling);
    let guessed = match early {
        Some(guessed) => guessed,
        None => guess_from(store, stream_sample(sample, failed)?),
    };
    guessed.decide(decided).then_some(())
}

/// The first [`SAMPLE_PAGES`] pages hashed of a file (fewer if it is shorter), when there are;
/// None if the file failed first.
fn stream_sample(
    sample: &Mutex<Option<Vec<Digest256>>>,
    failed: &AtomicBool,
) -> Option<Vec<Digest256>> {
    loop {
        if failed.load(Ordering::Relaxed) {
            return None;
        }
        {
            let mut slot = sample.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_none_or(|v| v.len() >= SAMPLE_PAGES) {
                return slot.take();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What `sample` says of the memory it came from: whether the store has none of it, and its
/// likely base ([`pf_core::pages::guess_base_of`]) with the set of the base's pages in packs the
/// store has (one check per pack of the base).
fn guess_from<'s>(store: &'s dyn BlobStore, sample: Vec<Digest256>) -> Guessed<'s> {
    let index = store.page_index();
    let mut sorted = sample.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let new_memory = !sorted.is_empty() && index.lookup(&sorted).is_ok_and(|f| f.is_empty());
    let base = pf_core::pages::guess_base_of(store, &index, sample).and_then(|manifest| {
        let list = pf_core::pages::PagesReader::open(store, &manifest)
            .inspect_err(|e| tracing::debug!(base = %manifest, error = %e, "no base list"))
            .ok()?;
        let present: Vec<bool> = (0..)
            .map_while(|k| list.pack(k))
            .map(|pack| store.contains(&pack).unwrap_or(false))
            .collect();
        let mut set = DigestMap::default();
        set.reserve(list.list().len());
        for page in list.list() {
            if let Some((k, _)) = page.at
                && present.get(k as usize).copied().unwrap_or(false)
            {
                set.insert(page.digest, ());
            }
        }
        Some((Arc::new(set), manifest, list))
    });
    Guessed { new_memory, base }
}

/// One thread of [`pages_file`]: read a chunk, hash it, wait for its turn, decide, then send the
/// kept pages to the packer if it has a buffer free, else write them into `out`.
fn work(
    (reader, decided, turn, failed): (&Mutex<Reader>, &Mutex<Decided<'_>>, &Condvar, &AtomicBool),
    sample: &Mutex<Option<Vec<Digest256>>>,
    prepack: Option<PrepackSide<'_>>,
    (out, path): (&std::fs::File, &Path),
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    let mut digests: Vec<Digest256> = Vec::with_capacity(CHUNK_PAGES);
    let mut hashed: Vec<Option<Digest256>> = Vec::with_capacity(CHUNK_PAGES);
    let mut keep: Vec<bool> = Vec::with_capacity(CHUNK_PAGES);
    loop {
        let (seq, n) = {
            let mut r = reader.lock().unwrap_or_else(|p| p.into_inner());
            if r.eof {
                return Ok(());
            }
            let n = read_full(&mut r.pipe, &mut buf).map_err(|e| Error::io("read", path, e))?;
            if n < buf.len() {
                r.eof = true;
            }
            let seq = r.next;
            r.next += 1;
            (seq, n)
        };
        if !n.is_multiple_of(PAGE_SIZE) {
            return Err(Error::io(
                "read",
                path,
                std::io::Error::other(format!(
                    "criu's pages file ended inside a page ({n} bytes into its last chunk)"
                )),
            ));
        }
        let pages: Vec<&[u8]> = buf[..n].chunks_exact(PAGE_SIZE).collect();
        let nonzero: Vec<&[u8]> = pages
            .iter()
            .copied()
            .filter(|p| !pf_core::pack::is_zero_page(p))
            .collect();
        digests.clear();
        pf_core::pack::page_digests(&nonzero, &mut digests);
        hashed.clear();
        let mut next = digests.iter();
        for page in &pages {
            hashed.push(if pf_core::pack::is_zero_page(page) {
                None
            } else {
                next.next().copied()
            });
        }
        {
            let mut slot = sample.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = slot.as_mut() {
                let room = SAMPLE_PAGES.saturating_sub(v.len());
                v.extend(hashed.iter().flatten().take(room));
            }
        }
        // In file order: the first of equal pages is the one kept.
        let packing: Option<Vec<u8>>;
        {
            let mut d = decided.lock().unwrap_or_else(|p| p.into_inner());
            while d.next != seq {
                if failed.load(Ordering::Relaxed) {
                    // Another thread failed: its error is the one reported.
                    return Ok(());
                }
                d = turn
                    .wait_timeout(d, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            keep.clear();
            let Decided {
                seen,
                base,
                out,
                pack_now,
                ..
            } = &mut *d;
            for digest in &hashed {
                let kept = match digest {
                    None => false,
                    Some(digest) => {
                        base.as_ref().is_none_or(|b| !b.contains_key(digest))
                            && seen.insert(*digest, ()).is_none()
                    }
                };
                keep.push(kept);
            }
            // Packed at once if the packer has a buffer free: then not in the file (a hole,
            // not kept), and known to the store's writer as a page it packed.
            packing = if *pack_now
                && keep.contains(&true)
                && let Some((_, spare)) = prepack
            {
                spare
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .try_recv()
                    .ok()
            } else {
                None
            };
            out.digests.extend_from_slice(&hashed);
            match packing {
                Some(_) => out.kept.extend(std::iter::repeat_n(false, keep.len())),
                None => out.kept.extend_from_slice(&keep),
            }
            d.next += 1;
        }
        turn.notify_all();
        if let (Some(mut bytes), Some((send, _))) = (packing, prepack) {
            let mut digests = Vec::with_capacity(keep.len());
            if keep.iter().all(|k| *k) {
                // Every page kept (new memory): the chunk itself goes to the packer, and the
                // next is read into the buffer that came back from it, instead of a copy.
                std::mem::swap(&mut buf, &mut bytes);
                bytes.truncate(n);
                buf.resize(CHUNK_PAGES * PAGE_SIZE, 0);
                digests.extend(hashed.iter().flatten());
            } else {
                bytes.clear();
                for ((page, kept), digest) in buf.chunks_exact(PAGE_SIZE).zip(&keep).zip(&hashed) {
                    if *kept && let Some(digest) = digest {
                        bytes.extend_from_slice(page);
                        digests.push(*digest);
                    }
                }
            }
            send.send(PagesIn { bytes, digests }).map_err(|_| {
                Error::io(
                    "pack the pages of",
                    path,
                    std::io::Error::other("the packer stopped"),
                )
            })?;
            continue;
        }
        // The kept runs, where they belong.
        let first = seq * CHUNK_PAGES;
        let mut i = 0;
        while i < keep.len() {
            if !keep[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < keep.len() && keep[i] {
                i += 1;
            }
            out.write_all_at(
                &buf[start * PAGE_SIZE..i * PAGE_SIZE],
                ((first + start) * PAGE_SIZE) as u64,
            )
            .map_err(|e| Error::io("write", path, e))?;
        }
    }
}

/// Read until `buf` is full or the pipe ends; how much was read.
fn read_full(pipe: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match pipe.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Send `name` as CRIU's dump does: the request, then the read end of a fresh pipe; the
    /// write end is returned for the image's bytes.
    fn send(conn: &mut UnixStream, name: &str) -> std::io::PipeWriter {
        crate::streamer::criu_side::request(conn, name);
        let (r, w) = std::io::pipe().expect("pipe");
        crate::streamer::criu_side::send_fd(conn, OwnedFd::from(r).as_fd());
        w
    }

    /// An error and its sources, as the CLI prints them.
    fn chain(e: &Error) -> String {
        let mut out = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            out.push_str(&format!(": {s}"));
            source = s.source();
        }
        out
    }

    /// Run the hold script as CRIU does at post-dump: its exit status.
    fn post_dump(script: &std::ffi::OsStr) -> std::process::ExitStatus {
        std::process::Command::new(script)
            .env("CRTOOLS_SCRIPT_ACTION", "post-dump")
            .status()
            .expect("run the hold script")
    }

    /// Page `i` of the test file: zeros every 5th, page 1's bytes again every 7th, else its own.
    fn page(i: usize) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        if i % 5 == 4 {
            return p;
        }
        let seed = if i % 7 == 6 { 1 } else { i };
        p[..8].copy_from_slice(&(seed as u64 + 1).to_le_bytes());
        p[4095] = seed as u8;
        p
    }

    #[test]
    fn streamed_images_are_kept_whole_and_pages_once_each_with_every_digest() {
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 3 * CHUNK_PAGES + 17;
        let bytes: Vec<u8> = (0..n).flat_map(page).collect();
        let (status, streamed) = capture_while(hold, &store, (dir.path(), false, None), |extra| {
            assert_eq!(extra[0], "--stream");
            assert_eq!(extra[1], "--action-script");
            let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
            let mut inv = send(&mut conn, "inventory.img");
            let mut pages = send(&mut conn, "pages-1.img");
            inv.write_all(b"inventory bytes").expect("write");
            drop(inv);
            // Written in odd pieces, as a pipe may hand them over.
            for piece in bytes.chunks(3 * PAGE_SIZE + 100) {
                pages.write_all(piece).expect("write");
            }
            drop(pages);
            let status = post_dump(&extra[2]);
            drop(conn);
            Ok(status)
        })
        .expect("capture");
        assert!(status.success(), "the hold let the dump go on: {status}");
        assert!(!dir.path().join(SOCKET).exists(), "the socket is gone");
        assert_eq!(
            std::fs::read(dir.path().join("inventory.img")).expect("read"),
            b"inventory bytes"
        );
        let got = &streamed.pages["pages-1.img"];
        assert_eq!(got.digests.len(), n);
        assert_eq!(got.kept.len(), n);
        let file = std::fs::read(dir.path().join("pages-1.img")).expect("read");
        assert_eq!(file.len(), n * PAGE_SIZE);
        let mut seen = std::collections::HashSet::new();
        for i in 0..n {
            let p = page(i);
            let at = &file[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if pf_core::pack::is_zero_page(&p) {
                assert_eq!(got.digests[i], None, "page {i}");
                assert!(!got.kept[i], "page {i}");
                continue;
            }
            let d = pf_core::pack::page_digest(&p);
            assert_eq!(got.digests[i], Some(d), "page {i}");
            let first = seen.insert(d);
            assert_eq!(
                got.kept[i], first,
                "page {i}: only the first of equal pages is kept"
            );
            if first {
                assert_eq!(at, &p[..], "page {i} is written where it belongs");
            } else {
                assert!(at.iter().all(|b| *b == 0), "page {i} is a hole");
            }
        }
    }

    /// Capture `files` (name, bytes) in one dump, as CRIU streams them, with the packer on.
    /// Pages are packed at once only once the base is settled (none here): each file pauses
    /// after its second chunk, so its first chunks likely go into the file.
    fn capture_files<'s>(
        store: &'s pf_core::MemBlobStore,
        dir: &Path,
        files: &[(&str, &[u8])],
    ) -> Captured<'s> {
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let (status, captured) = capture_while(hold, store, (dir, true, None), |extra| {
            let mut conn = UnixStream::connect(dir.join(SOCKET)).expect("connect");
            for (name, bytes) in files {
                let mut pages = send(&mut conn, name);
                for (i, chunk) in bytes.chunks(CHUNK_PAGES * PAGE_SIZE).enumerate() {
                    pages.write_all(chunk).expect("write");
                    if i == 1 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            let status = post_dump(&extra[2]);
            drop(conn);
            Ok(status)
        })
        .expect("capture");
        assert!(status.success(), "{status}");
        captured
    }

    /// Store what [`capture_files`] captured of `files` as a freeze stores it, in one session,
    /// and check that each file reads back whole and every distinct page was packed once (at
    /// once or from its file). Returns the pages packed at once.
    fn store_and_read_back(
        store: &pf_core::MemBlobStore,
        dir: &Path,
        captured: Captured<'_>,
        files: &[(&str, &[u8])],
    ) -> u64 {
        let Captured {
            mut pages,
            prepacked,
        } = captured;
        let prepacked = prepacked.expect("packed during the capture");
        let packed_at_once = prepacked.pages();
        let mut w =
            pf_core::pages::PageWriter::with_prepacked(store, store.page_index(), 2, prepacked);
        let mut distinct = std::collections::HashSet::new();
        let mut from_files = 0;
        let mut manifests = Vec::new();
        for (name, bytes) in files {
            let got = pages.remove(*name).expect("the pages file");
            assert_eq!(got.digests.len() * PAGE_SIZE, bytes.len(), "{name} whole");
            distinct.extend(got.digests.iter().flatten().copied());
            let path = dir.join(name);
            let file = std::fs::File::open(&path).expect("open");
            let stored = w
                .write_file_kept(
                    &file,
                    &path,
                    got.digests,
                    (None, None),
                    Some(&got.kept),
                    &mut |_| {},
                )
                .expect("store");
            from_files += stored.new_pages;
            manifests.push(stored.manifest);
        }
        w.commit().expect("commit");
        assert_eq!(packed_at_once + from_files, distinct.len() as u64);
        for (manifest, (name, bytes)) in manifests.iter().zip(files) {
            let out_path = dir.join(format!("rebuilt-{}", manifest.hex()));
            let out = std::fs::File::create(&out_path).expect("create");
            pf_core::pages::read_pages(store, manifest, &out, &out_path, 2).expect("read");
            assert!(
                std::fs::read(&out_path).expect("read") == *bytes,
                "{name} read back whole"
            );
        }
        packed_at_once
    }

    #[test]
    fn pages_kept_while_the_packer_keeps_up_are_packed_at_once_and_the_rest_written() {
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        // Two pages files (two processes) share the packer. The first has more chunks than the
        // packer has buffers: those that find no buffer free go into the file. The second
        // repeats 300 of the first one's pages, then has its own.
        let n = 3 * PREPACK_BUFFERS * CHUNK_PAGES + 17;
        let first: Vec<u8> = (0..n).flat_map(page).collect();
        let second: Vec<u8> = (0..300).chain(n + 1000..n + 1600).flat_map(page).collect();
        let files = [("pages-1.img", &first[..]), ("pages-2.img", &second[..])];
        let captured = capture_files(&store, dir.path(), &files);
        let packed_at_once = store_and_read_back(&store, dir.path(), captured, &files);
        assert!(packed_at_once > 0, "some pages packed at once");
    }

    #[test]
    fn chunks_of_new_pages_go_to_the_packer_whole_and_read_back_whole() {
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        // Every page distinct and not zero (new memory): every chunk the packer has a buffer
        // for goes to it as it is, the short last one too; the rest go into the file.
        let n = 3 * PREPACK_BUFFERS * CHUNK_PAGES + 17;
        let distinct = |i: usize| {
            let mut p = page(i);
            p[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            p[PAGE_SIZE - 8..].copy_from_slice(&(!(i as u64)).to_le_bytes());
            p
        };
        let bytes: Vec<u8> = (0..n).flat_map(distinct).collect();
        let files = [("pages-1.img", &bytes[..])];
        let captured = capture_files(&store, dir.path(), &files);
        let packed_at_once = store_and_read_back(&store, dir.path(), captured, &files);
        assert!(packed_at_once > 0, "some chunks went to the packer");
    }

    #[test]
    fn a_memory_is_sampled_and_dumped_into_a_directory_with_the_room_for_it() {
        // Our own memory: this test binary's data and heap, with 8 MiB of it not zero (run
        // alone, the test's heap could be all zeros, and a sample has none of those).
        let ballast: Vec<u8> = (0..8usize << 20).map(|i| (i % 251 + 1) as u8).collect();
        let pid = std::process::id() as i32;
        let (sample, resident) = sample_pages(pid, SAMPLE_PAGES).expect("sample");
        std::hint::black_box(&ballast);
        assert!(
            !sample.is_empty() && sample.len() <= SAMPLE_PAGES,
            "{}",
            sample.len()
        );
        assert!(
            resident >= (sample.len() * PAGE_SIZE) as u64,
            "{resident} bytes in memory for {} pages sampled",
            sample.len()
        );
        assert!(sample_pages(-1, SAMPLE_PAGES).is_err(), "no such process");
        // Counted from the status counters: at least what the sample saw resident.
        let memory = tree_memory(pid);
        assert!(memory >= resident, "{memory} < {resident}");
        assert_eq!(tree_memory(-1), 0, "no such process");
        let dir = std::env::temp_dir();
        assert!(room_for(&dir, 0), "64 MiB free where the tests run");
        assert!(!room_for(&dir, u64::MAX / 2), "no filesystem is that large");
        assert!(
            !room_for(Path::new("/no/such/dir"), 0),
            "no room where it cannot tell"
        );
        // On tmpfs, no more than the memory available, however large the tmpfs.
        let shm = Path::new("/dev/shm");
        let available = memory_available().expect("MemAvailable");
        if nix::sys::statfs::statfs(shm)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        {
            assert!(!room_for(shm, available), "{available} bytes available");
        }
        if std::env::var_os("PF_CAPTURE").is_none() && memory < STREAM_FROM {
            assert!(
                should_stream(pid, &dir).is_none(),
                "room and less than STREAM_FROM: into the directory"
            );
        }
        // From STREAM_FROM of memory, or without the room, streamed.
        assert!(!streams(STREAM_FROM - 1, true));
        assert!(streams(STREAM_FROM, true));
        assert!(streams(STREAM_FROM - 1, false));
        assert!(streams(0, false));
    }

    /// Item: a re-freeze's base is guessed from the root's memory as the dump starts, so that
    /// every page the base has is left out of the root's pages file from its first chunk on
    /// (guessed from the file's own first pages, the chunks read meanwhile keep all of theirs).
    /// The shared memory's pages file, which CRIU sends first, and another process's guess
    /// their own (the first of a memory the store lacks keeps every page, not left out against
    /// the root's base).
    #[test]
    fn a_base_guessed_as_the_dump_starts_leaves_out_every_page_it_has() {
        // 16 MiB of this process's memory, page-aligned, each page its own.
        const PAGES: usize = 4096;
        let mut mem = vec![0u8; (PAGES + 1) * PAGE_SIZE];
        let skip = mem.as_ptr().align_offset(PAGE_SIZE);
        let ours = &mut mem[skip..skip + PAGES * PAGE_SIZE];
        for (i, p) in ours.chunks_exact_mut(PAGE_SIZE).enumerate() {
            p.fill(0x5a);
            p[..8].copy_from_slice(&(0x00ba_5e00_0000_0000 + i as u64).to_le_bytes());
        }
        // Stored as an earlier snapshot of it.
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = pf_core::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let v1 = tmp.path().join("v1");
        std::fs::write(&v1, &*ours).expect("write v1");
        let mut w = pf_core::pages::PageWriter::new(&store, store.page_index(), 2);
        let base = w
            .write_file(&std::fs::File::open(&v1).expect("open v1"), &v1)
            .expect("store v1")
            .manifest;
        w.commit().expect("commit");
        // Dumped again with 8 new pages after it; CRIU takes a while before the first page.
        let mut bytes = ours.to_vec();
        for i in 0..8u64 {
            let mut p = vec![0xa5u8; PAGE_SIZE];
            p[..8].copy_from_slice(&i.to_le_bytes());
            bytes.extend_from_slice(&p);
        }
        // Shared memory the store lacks.
        let shmem: Vec<u8> = (0..64u64)
            .flat_map(|i| {
                let mut p = vec![0x3cu8; PAGE_SIZE];
                p[..8].copy_from_slice(&i.to_le_bytes());
                p
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let pid = std::process::id() as i32;
        let (status, captured) = capture_while(
            hold,
            &store,
            (dir.path(), false, Some((pid, Vec::new()))),
            |extra| {
                std::thread::sleep(Duration::from_millis(300));
                let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
                for (name, bytes) in [
                    ("pagemap-shmem-9.img", &b"map"[..]),
                    ("pages-1.img", &shmem),
                    ("pagemap-4242.img", b"map"),
                    ("pages-2.img", &bytes),
                    ("pagemap-4243.img", b"map"),
                    ("pages-3.img", &bytes),
                ] {
                    send(&mut conn, name).write_all(bytes).expect("write");
                }
                let status = post_dump(&extra[2]);
                drop(conn);
                Ok(status)
            },
        )
        .expect("capture");
        assert!(status.success(), "{status}");
        std::hint::black_box(&mem);
        let shared = &captured.pages["pages-1.img"];
        assert!(shared.base.is_none(), "the shared memory has no base");
        assert!(
            shared.kept.iter().all(|k| *k),
            "every page of new memory kept"
        );
        let got = &captured.pages["pages-2.img"];
        assert_eq!(got.base.as_ref().map(|(m, _)| *m), Some(base));
        assert_eq!(got.kept.len(), PAGES + 8);
        let kept_of_base = got.kept[..PAGES].iter().filter(|k| **k).count();
        assert_eq!(kept_of_base, 0, "pages of the base kept");
        assert!(got.kept[PAGES..].iter().all(|k| *k), "every new page kept");
        let second = &captured.pages["pages-3.img"];
        assert_eq!(second.base.as_ref().map(|(m, _)| *m), Some(base));
        assert_eq!(second.digests, got.digests);
        assert!(
            second.kept[PAGES..].iter().all(|k| *k),
            "the second file keeps the pages the store lacks"
        );
    }

    #[test]
    fn the_hold_answers_only_once_every_image_is_read() {
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (status, streamed) = capture_while(hold, &store, (dir.path(), false, None), |extra| {
            let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
            let mut pages = send(&mut conn, "pages-1.img");
            pages.write_all(&page(0)).expect("write");
            let script = extra[2].clone();
            let held = std::thread::spawn(move || post_dump(&script));
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !held.is_finished(),
                "the hold waits while a pages file is open"
            );
            pages.write_all(&page(2)).expect("write");
            drop(pages);
            let status = held.join().expect("join");
            drop(conn);
            Ok(status)
        })
        .expect("capture");
        assert!(status.success(), "{status}");
        assert_eq!(streamed.pages["pages-1.img"].digests.len(), 2);
    }

    #[test]
    fn a_pages_file_cut_inside_a_page_fails_the_hold_and_the_capture() {
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let err = capture_while(hold, &store, (dir.path(), false, None), |extra| {
            let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
            let mut pages = send(&mut conn, "pages-1.img");
            pages.write_all(&page(0)).expect("write");
            pages.write_all(&page(1)[..100]).expect("write");
            drop(pages);
            let status = post_dump(&extra[2]);
            assert!(!status.success(), "the hold failed the dump: {status}");
            drop(conn);
            Ok(())
        })
        .expect_err("a torn page");
        assert!(chain(&err).contains("inside a page"), "{}", chain(&err));
    }

    #[test]
    fn names_that_are_not_plain_files_are_refused() {
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let store = pf_core::MemBlobStore::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let err = capture_while(hold, &store, (dir.path(), false, None), |_| {
            let mut conn = UnixStream::connect(dir.path().join(SOCKET)).expect("connect");
            // Only the request: the server hangs up before it would take a pipe.
            let name = b"../escape-capture.img";
            let mut request = (name.len() as u32 + 2).to_ne_bytes().to_vec();
            request.extend_from_slice(&[0x0a, name.len() as u8]);
            request.extend_from_slice(name);
            conn.write_all(&request).expect("request");
            let mut byte = [0u8; 1];
            assert_eq!(conn.read(&mut byte).expect("read"), 0, "hung up");
            Ok(())
        })
        .expect_err("refused");
        assert!(
            chain(&err).contains("malformed image request"),
            "{}",
            chain(&err)
        );
        let outside = dir
            .path()
            .parent()
            .expect("parent")
            .join("escape-capture.img");
        assert!(
            !outside.exists(),
            "nothing was written outside the images dir"
        );
    }

    #[test]
    fn the_hold_waits_for_a_late_answer_in_a_pid_namespace_of_its_own() {
        // criu runs the script inside a thawed copy's pid namespace when it dumps the copy; an
        // answer that comes after several of the script's 50 ms checks must still let it pass.
        let mut hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let mut child = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(&hold.script)
            .env("CRTOOLS_SCRIPT_ACTION", "post-dump")
            .spawn()
            .expect("run the hold script under unshare (needs root, as criu does)");
        let mut line = [0u8; 1];
        let asked = std::time::Instant::now();
        loop {
            match hold.ask.read(&mut line) {
                Ok(1) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("reading the ask: {other:?}"),
            }
            assert!(asked.elapsed() < Duration::from_secs(10), "never asked");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(300));
        hold.answer.write_all(b"ok\n").expect("answer");
        let status = child.wait().expect("wait");
        assert!(status.success(), "a late answer failed the hold: {status}");
    }

    /// Write `script` to `path` and run it at post-dump: it must fail, and at once.
    fn fails_at_once(path: &Path, script: &str) {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(path)
            .expect("create");
        f.write_all(script.as_bytes()).expect("write");
        drop(f);
        let started = std::time::Instant::now();
        let status = post_dump(path.as_os_str());
        assert!(!status.success(), "{status}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_hold_fails_when_pf_is_gone() {
        let hold = Hold::new().expect("the post-dump hold (bash, an exec-able scratch dir)");
        let text = std::fs::read_to_string(&hold.script).expect("read");
        // With pf alive (its scratch dir locked) the lock check passes.
        assert!(text.contains("flock -n -s 5"), "{text}");
        // pf's lock gone (pf ended, or is an unreaped zombie): the script fails at once.
        let unlocked = tempfile::tempdir().expect("tempdir");
        let dir = hold._dir.path().to_str().expect("utf-8").to_owned();
        let other = text.replace(
            &format!("5<'{dir}'"),
            &format!("5<'{}'", unlocked.path().display()),
        );
        assert_ne!(
            text, other,
            "the script checks pf's lock on its scratch dir"
        );
        let path = hold._dir.path().join("hold-unlocked");
        fails_at_once(&path, &other);
        // Any other action passes straight through.
        let status = std::process::Command::new(&hold.script)
            .env("CRTOOLS_SCRIPT_ACTION", "pre-dump")
            .status()
            .expect("run");
        assert!(status.success());
    }
}
