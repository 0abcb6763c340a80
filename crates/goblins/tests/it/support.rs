//! Helpers for the live tests: goblin programs, and talking to a goblin line by line with a
//! deadline on every answer (a hung goblin fails its test instead of hanging the run).

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, PipeWriter, Write as _};
use std::sync::mpsc;
use std::time::Duration;

use pf_goblins::{Goblin, SpawnOptions};

/// How long any single answer may take.
pub(crate) const ANSWER: Duration = Duration::from_secs(20);

/// A stateful goblin: a counter and a dictionary, one command per line.
///
/// `inc` prints the incremented counter, `set k=v` prints `ok`, `get k` prints the value, `exit N`
/// exits with N, `err TEXT` writes TEXT to stderr and prints `ok`. At end of input it prints
/// `eof N` and exits 0.
pub(crate) const COUNTER: &str = r#"
import sys
n = 0
d = {}
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "inc":
        n += 1
        print(n)
    elif cmd == "set":
        k, _, v = arg.partition("=")
        d[k] = v
        print("ok")
    elif cmd == "get":
        print(d.get(arg, "-"))
    elif cmd == "exit":
        sys.exit(int(arg))
    elif cmd == "err":
        print(arg, file=sys.stderr)
        print("ok")
    else:
        print("?", cmd)
print("eof", n)
"#;

/// A goblin that sleeps before it reads anything, then echoes each line as `got LINE`.
pub(crate) const SLOW_READER: &str = r#"
import sys, time
print("started")
time.sleep(float(sys.argv[1]))
for line in sys.stdin:
    print("got", line.strip())
print("eof")
"#;

/// `python3 -u -c SCRIPT ARGS…` as a command line.
pub(crate) fn python(script: &str, args: &[&str]) -> Vec<OsString> {
    let mut cmd: Vec<OsString> = vec!["python3".into(), "-u".into(), "-c".into(), script.into()];
    cmd.extend(args.iter().map(OsString::from));
    cmd
}

/// Spawn `cmd` as a goblin in `/`.
pub(crate) fn spawn(cmd: &[OsString]) -> Goblin {
    pf_goblins::spawn(cmd, &SpawnOptions::in_dir("/".into())).expect("spawn goblin")
}

/// Our side of a conversation with a goblin: its stdin, and its stdout as lines.
pub(crate) struct Talk {
    pub(crate) stdin: Option<PipeWriter>,
    lines: mpsc::Receiver<String>,
}

impl Talk {
    /// Take the goblin's stdin and stdout (a thread reads stdout line by line).
    pub(crate) fn new(goblin: &mut Goblin) -> Talk {
        let stdout = goblin.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Talk {
            stdin: goblin.stdin.take(),
            lines,
        }
    }

    /// Write `line` and a newline.
    pub(crate) fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to goblin");
    }

    /// The next line of stdout, within [`ANSWER`].
    pub(crate) fn line(&self) -> String {
        self.lines
            .recv_timeout(ANSWER)
            .expect("goblin answered in time")
    }

    /// `send` then `line`.
    pub(crate) fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }

    /// Close stdin: the goblin sees end of input.
    pub(crate) fn close(&mut self) {
        drop(self.stdin.take());
    }

    /// Every remaining line until the goblin closes stdout.
    pub(crate) fn rest(&self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match self.lines.recv_timeout(ANSWER) {
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("goblin kept stdout open: {out:?}"),
            }
        }
    }
}

/// Whether `pid` is gone from /proc (not even a zombie).
pub(crate) fn gone(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}
