//! The processes `cargo xtask bench` starts, and how it makes sure none outlives it.
//!
//! Every child is held in a [`Guard`]: dropping it (at the end of a step, or on any error)
//! SIGKILLs the child and everything below it, by pid — the pids come from
//! `/proc/<pid>/task/<tid>/children`, walked down before anything is killed, so restored copies
//! inside pid namespaces (grandchildren through `unshare`, criu or pf's own init) go too. Scratch
//! directories are held in a [`ScratchDir`], removed on drop.
//!
//! [`Lines`] reads a child's output on a thread, so waiting for an answer has a deadline; the
//! bench's goblin ([`Goblin`]) and pf's resident memory ([`PeakRss`]) are built on these.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::{self, Out};

/// The goblin the bench freezes: allocates `argv[1]` MiB (half random bytes, half text that zstd
/// packs about 3:1), touches every page, says `ready`, then answers each line on stdin:
/// `mutate` rewrites 5% of its pages (every 20th, a different 20th each time) with new random
/// bytes and says `mutated G`; anything else gets `sum G C`, a CRC-32 of 64 pages spread over
/// the buffer, so a thawed copy proves it has the memory it was frozen with. It closes every fd
/// above 2 and leads its own session first, as CRIU wants.
const GOBLIN_PY: &str = r#"import mmap, os, random, sys, zlib
os.closerange(3, 1 << 16)
os.setsid()
MIB, PAGE = 1 << 20, 4096
size = int(sys.argv[1]) * MIB
pages, half = size // PAGE, size // 2
# Page-aligned (a private anonymous mapping, as malloc would give), so that "page p" of the
# buffer is one page of memory.
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
for off in range(0, half, MIB):
    buf[off:off + MIB] = os.urandom(MIB)
rnd = random.Random(7)
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(4096)]
text = b" ".join(rnd.choice(words) for _ in range(200000))
while len(text) < MIB:
    text += text
text = text[:MIB]
for i, off in enumerate(range(half, size, MIB)):
    buf[off:off + MIB] = text
    buf[off:off + 8] = i.to_bytes(8, "little")
gen = 0
view = memoryview(buf)
rand = open("/dev/urandom", "rb", buffering=0)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    if line.strip() == "mutate":
        gen += 1
        # Read straight into the pages: no temporary objects, so no other page changes.
        for p in range(gen % 20, pages, 20):
            rand.readinto(view[p * PAGE:(p + 1) * PAGE])
        print("mutated", gen, flush=True)
    else:
        c = 0
        for p in range(0, pages, max(1, pages // 64)):
            c = zlib.crc32(buf[p * PAGE:(p + 1) * PAGE], c)
        print("sum", gen, c, flush=True)
"#;

/// A child we started. Dropping it kills it and all its descendants by pid, then reaps it.
#[derive(Debug)]
pub(crate) struct Guard {
    child: Option<Child>,
    what: String,
}

impl Guard {
    pub(crate) fn new(child: Child, what: impl Into<String>) -> Guard {
        Guard {
            child: Some(child),
            what: what.into(),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Wait until it exits, at most `limit`; past that, kill it (and its descendants) and fail.
    pub(crate) fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut().context("already reaped")?;
        loop {
            if let Some(status) = child.try_wait().context("wait for a child")? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > limit {
                let what = self.what.clone();
                self.kill();
                bail!("{what} did not finish within {limit:?}; killed it");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kill the child and everything below it, and reap the child.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every descendant of `pid` (host pids), found through `/proc/<pid>/task/*/children`.
fn descendants(pid: u32) -> Vec<u32> {
    let Ok(pid) = i32::try_from(pid) else {
        return Vec::new();
    };
    pf_os::proc::tree(pid)
        .into_iter()
        .skip(1)
        .filter_map(|p| u32::try_from(p).ok())
        .collect()
}

/// SIGKILL `pid`'s descendants (not `pid` itself), all found before any is killed.
fn kill_tree(pid: u32) {
    let pids = descendants(pid);
    if pids.is_empty() {
        return;
    }
    let mut kill = process::command("kill", Path::new("/"), Out::Null, Out::Null);
    kill.arg("-KILL")
        .arg("--")
        .args(pids.iter().map(u32::to_string));
    // Some may have exited meanwhile: kill then fails for them, which is fine.
    let _ = kill.status();
}

/// The lines a child writes, read on a thread so that waiting has a deadline.
#[derive(Debug)]
pub(crate) struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    pub(crate) fn new(from: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                if tx.send(line.trim_end().to_owned()).is_err() {
                    break;
                }
                line.clear();
            }
        });
        Lines { rx }
    }

    /// The next line, within `limit`.
    pub(crate) fn next(&self, limit: Duration) -> anyhow::Result<String> {
        match self.rx.recv_timeout(limit) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("no answer within {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("output closed without an answer"),
        }
    }
}

/// Everything a child writes to a pipe, kept, read on a thread.
#[derive(Debug)]
pub(crate) struct Collected {
    buf: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Collected {
    pub(crate) fn from(from: impl Read + Send + 'static) -> Collected {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&buf);
        let reader = std::thread::spawn(move || {
            let mut from = from;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                if let Ok(mut b) = kept.lock() {
                    b.extend_from_slice(&chunk[..n]);
                }
            }
        });
        Collected { buf, reader }
    }

    fn text(&self) -> String {
        self.buf
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines written so far.
    pub(crate) fn tail(&self) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Everything, once the writer has closed the pipe (or `limit` has passed: a grandchild
    /// may hold the pipe open; the reader thread is left behind then).
    pub(crate) fn finish(self, limit: Duration) -> String {
        let start = Instant::now();
        while !self.reader.is_finished() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.text()
    }
}

/// The bench's goblin, running as our child with its stdio on our pipes.
#[derive(Debug)]
pub(crate) struct Goblin {
    guard: Guard,
    stdin: ChildStdin,
    out: Lines,
    err: Collected,
    /// The inodes of its stdin, stdout and stderr pipes (`pipe:[N]`).
    pub(crate) pipes: [u64; 3],
}

impl Goblin {
    /// Start a goblin of `mib` MiB and wait until it says `ready`.
    pub(crate) fn spawn(python: &Path, mib: u64, dir: &Path) -> anyhow::Result<Goblin> {
        let mut cmd = process::command(python, dir, Out::Pipe, Out::Pipe);
        cmd.args(["-u", "-c", GOBLIN_PY, &mib.to_string()])
            .stdin(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let stdin = child.stdin.take().context("goblin stdin")?;
        let out = Lines::new(child.stdout.take().context("goblin stdout")?);
        let err = Collected::from(child.stderr.take().context("goblin stderr")?);
        let guard = Guard::new(child, format!("the {mib} MiB goblin"));
        let pid = guard.pid();
        let ready = out
            .next(Duration::from_secs(600))
            .with_context(|| format!("the {mib} MiB goblin did not get ready: {}", err.tail()))?;
        if ready != format!("ready {pid}") {
            bail!("the goblin said {ready:?} instead of `ready {pid}`");
        }
        let mut pipes = [0; 3];
        for (fd, ino) in pipes.iter_mut().enumerate() {
            *ino = pipe_inode(pid, fd)?;
        }
        Ok(Goblin {
            guard,
            stdin,
            out,
            err,
            pipes,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Send one line, return its answer.
    pub(crate) fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .context("write to the goblin")?;
        self.out
            .next(Duration::from_secs(120))
            .with_context(|| format!("the goblin did not answer {line:?}: {}", self.err.tail()))
    }
}

/// The inode of the pipe at `/proc/<pid>/fd/<fd>`.
fn pipe_inode(pid: u32, fd: usize) -> anyhow::Result<u64> {
    let link = format!("/proc/{pid}/fd/{fd}");
    let target = pf_os::proc::fd_link(i32::try_from(pid)?, i32::try_from(fd)?)
        .with_context(|| format!("cannot read {link}"))?
        .with_context(|| format!("{link} is not open"))?;
    pf_os::proc::link_inode(&target, "pipe")
        .with_context(|| format!("{link} is {target}, not a pipe"))
}

/// The peak resident memory (`VmHWM`) of one process, sampled every few milliseconds while it
/// runs: the process's own peak, not that of its children (GNU time's `%M` would count a
/// restored goblin reaped below pf).
#[derive(Debug)]
pub(crate) struct PeakRss {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl PeakRss {
    pub(crate) fn watch(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            let status = format!("/proc/{pid}/status");
            while !flag.load(Ordering::Relaxed) {
                match std::fs::read_to_string(&status)
                    .ok()
                    .and_then(|s| vm_hwm_kib(&s))
                {
                    Some(kib) => peak = peak.max(kib),
                    // Exited (a zombie has no VmHWM line) or gone.
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            peak
        });
        PeakRss { stop, handle }
    }

    /// Stop watching; the peak in KiB (0 if it was never seen).
    pub(crate) fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// `VmHWM:   12345 kB` from `/proc/<pid>/status`.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// A directory of ours, removed (with everything in it) when dropped.
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A fresh empty directory `<parent>/<prefix>-<our pid>-<n>`.
    pub(crate) fn new(parent: &Path, prefix: &str) -> anyhow::Result<ScratchDir> {
        use std::sync::atomic::AtomicU32;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{prefix}-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(ScratchDir(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.0)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            process::warn(&format!("cannot remove {}: {err}", self.0.display()));
        }
    }
}

/// Bytes in the files under `dir` (0 if it does not exist).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_hwm() {
        let status = "Name:\tpf\nVmPeak:\t  20000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(12345));
        assert_eq!(vm_hwm_kib("Name:\tzombie\nState:\tZ (zombie)\n"), None);
    }

    #[test]
    fn guard_kills_the_whole_tree_and_scratch_dirs_go() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "xtask-bench-test").expect("dir");
        let path = dir.path().to_owned();
        std::fs::write(path.join("f"), b"x").expect("write");
        assert_eq!(dir_bytes(&path), 1);
        // sh starts a sleep below it that would outlive sh alone.
        let mut cmd = process::command("sh", &path, Out::Pipe, Out::Null);
        cmd.args(["-c", "sleep 60 & echo $!; wait"]);
        let mut child = cmd.spawn().expect("sh");
        let lines = Lines::new(child.stdout.take().expect("stdout"));
        let mut guard = Guard::new(child, "sh");
        let sleep: u32 = lines
            .next(Duration::from_secs(10))
            .expect("pid")
            .parse()
            .expect("a pid");
        assert!(descendants(guard.pid()).contains(&sleep));
        let sh = guard.pid();
        drop(guard);
        // The sleep was sh's child: killed, and reaped by init (not ours to reap).
        let gone = |pid: u32| {
            !matches!(
                pf_os::proc::pid_state(pid as i32),
                pf_os::proc::PidState::Alive
            )
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(gone(sleep) && gone(sh)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone(sleep) && gone(sh));
        drop(dir);
        assert!(!path.exists());
        guard = Guard::new(
            process::command("true", Path::new("/"), Out::Null, Out::Null)
                .spawn()
                .expect("true"),
            "true",
        );
        assert!(guard.wait(Duration::from_secs(10)).expect("wait").success());
    }
}
