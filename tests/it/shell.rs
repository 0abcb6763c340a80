//! `pf shell freeze|thaw|beam`: real bash sessions in a private tmux server, read back through
//! `capture-pane`. The live tests need root, CRIU and tmux (`cargo xtask ci` installs tmux).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pf_world_procs::test_support::{Deadline, KillOnDrop, live, spawn_clean};

use crate::support::{pf, pf_bin, text};

/// A tmux server of this test's own (own socket); on drop every process under it is killed by
/// pid, then the server.
struct Tmux {
    socket: String,
    server: i32,
}

impl Tmux {
    /// A server with a `keep` session, so that it outlives the shells a test freezes.
    fn start(test: &str) -> Self {
        let socket = format!("pf-test-{}-{test}", std::process::id());
        let status = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-s", "keep", "sleep 600"])
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .status()
            .expect("run tmux (apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        let mut tmux = Self { socket, server: 0 };
        tmux.server = tmux.query("keep", "#{pid}");
        tmux
    }

    fn tmux(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket]).stdin(Stdio::null());
        cmd
    }

    fn new_session(&self, name: &str, command: &str) {
        let ok = self
            .tmux()
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "160",
                "-y",
                "40",
                command,
            ])
            .status()
            .expect("tmux new-session");
        assert!(ok.success());
    }

    /// Press a key (`C-c`, `C-z`) in `session`.
    fn key(&self, session: &str, key: &str) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", session, key])
            .status()
            .expect("tmux send-keys");
        assert!(ok.success());
    }

    fn query(&self, session: &str, format: &str) -> i32 {
        let out = self
            .tmux()
            .args(["display-message", "-p", "-t", session, format])
            .output()
            .expect("tmux display-message");
        text(&out.stdout).trim().parse().expect("a pid from tmux")
    }

    fn send(&self, session: &str, line: &str) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", session, "-l", line])
            .status()
            .expect("tmux send-keys");
        assert!(ok.success());
        self.tmux()
            .args(["send-keys", "-t", session, "Enter"])
            .status()
            .expect("tmux send-keys Enter");
    }

    fn screen(&self, session: &str) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-J", "-S", "-200", "-t", session])
            .output()
            .expect("tmux capture-pane");
        text(&out.stdout)
    }

    /// Wait until `session`'s screen holds a line containing `needle`; panics with the screen.
    fn wait_for(&self, session: &str, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen(session);
            if screen.lines().any(|l| l.contains(needle)) {
                return screen;
            }
            assert!(
                Instant::now() < end,
                "{needle:?} never appeared in tmux session {session}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Tmux {
    /// Wait until a process with the command line `command` runs under `session`'s pane; its pid.
    fn wait_for_process(&self, session: &str, command: &str) -> i32 {
        let pane = self.query(session, "#{pane_pid}");
        let end = Instant::now() + Duration::from_secs(20);
        // NUL-separated arguments, each ended by a NUL.
        let is = |p: &i32| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                c.strip_suffix(b"\0").is_some_and(|c| {
                    c.split(|&b| b == 0).collect::<Vec<_>>().join(&b' ') == command.as_bytes()
                })
            })
        };
        loop {
            if let Some(pid) = descendants(pane).into_iter().find(is) {
                return pid;
            }
            assert!(
                Instant::now() < end,
                "{command:?} never ran in {session}:\n{}",
                self.screen(session)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The restored shell in `session` has this terminal, with job control: Ctrl-C ends the
    /// command it runs, not the shell or pf (which used to die of it, leaving the shell to share
    /// the terminal with the one that ran pf); with `stop`, Ctrl-Z stops a command and the shell
    /// takes the terminal back.
    fn assert_job_control(&self, session: &str, stop: bool) {
        self.send(session, "sleep 30.5");
        self.wait_for_process(session, "sleep 30.5");
        self.key(session, "C-c");
        self.send(session, "echo int-$((3+4))");
        let screen = self.wait_for(session, "int-7");
        assert!(!screen.contains("pf-exit="), "Ctrl-C ended pf:\n{screen}");
        if stop {
            self.send(session, "sleep 31.5");
            self.wait_for_process(session, "sleep 31.5");
            self.key(session, "C-z");
            self.wait_for(session, "Stopped");
            // Back in the foreground with `fg`, then ended by Ctrl-C.
            let sleep = self.wait_for_process(session, "sleep 31.5");
            self.send(session, "fg");
            let end = Instant::now() + Duration::from_secs(20);
            while pf_os::proc::stat(sleep).is_some_and(|s| s.state == 'T') {
                assert!(Instant::now() < end, "fg never resumed the job");
                std::thread::sleep(Duration::from_millis(20));
            }
            self.key(session, "C-c");
            self.send(session, "echo tstp-$((4+4))");
            let screen = self.wait_for(session, "tstp-8");
            assert!(!screen.contains("pf-exit="), "Ctrl-Z stopped pf:\n{screen}");
        }
    }

    /// Wait until the `pf` in `session` has a restored bash under it and criu is done.
    fn wait_for_restored_shell(&self, session: &str) {
        let pane = self.query(session, "#{pane_pid}");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let names: Vec<String> = descendants(pane)
                .into_iter()
                .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect();
            if names.iter().any(|n| n == "bash") && !names.iter().any(|n| n == "criu") {
                return;
            }
            assert!(
                Instant::now() < end,
                "no restored shell under pf in session {session} ({names:?}):\n{}",
                self.screen(session)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every descendant of `pid` (children first found, deepest last).
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(child);
                todo.push(child);
            }
        }
    }
    out
}

impl Drop for Tmux {
    fn drop(&mut self) {
        for pid in descendants(self.server).into_iter().rev() {
            drop(KillOnDrop(pid));
        }
        drop(KillOnDrop(self.server));
    }
}

/// A child of this test, killed and reaped on drop.
struct Reaped(std::process::Child);

impl Reaped {
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shell_command() -> String {
    // No rc files, no history file: what the test types is all the shell knows.
    "env -u HISTFILE PS1='pf-test$ ' HISTFILE= bash --norc --noprofile -i".to_owned()
}

fn pf_line(store: &Path, args: &str) -> String {
    format!(
        "{} --store {} {args}; echo pf-exit=$?; read -r line; echo \"after-pf=$line\"; sleep 120",
        pf_bin().display(),
        store.display()
    )
}

#[test]
fn live_shell_freeze_then_thaw_in_another_terminal() {
    if !live("live_shell_freeze_then_thaw_in_another_terminal") {
        return;
    }
    let deadline = Deadline::start("live_shell_freeze_then_thaw", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let workdir = dir.path().join("work place");
    std::fs::create_dir(&workdir).expect("mkdir");

    let tmux = Tmux::start("thaw");
    deadline.watch(tmux.server);
    tmux.new_session("orig", &shell_command());
    tmux.wait_for("orig", "pf-test$");
    tmux.send(
        "orig",
        &format!(
            "export PF_T=thawed-42; cd '{}'; echo marker-$((6*7))",
            workdir.display()
        ),
    );
    tmux.wait_for("orig", "marker-42");
    let shell = tmux.query("orig", "#{pane_pid}");

    let out = pf(&store)
        .args([
            "shell",
            "freeze",
            "--pid",
            &shell.to_string(),
            "--tag",
            "sh",
        ])
        .output()
        .expect("pf shell freeze");
    assert!(out.status.success(), "freeze: {}", text(&out.stderr));
    assert!(text(&out.stdout).trim().starts_with("sha256:"));

    tmux.new_session("thaw", &pf_line(&store, "shell thaw sh"));
    tmux.wait_for_restored_shell("thaw");
    tmux.send("thaw", "echo \"var=$PF_T dir=$PWD\"; history");
    let screen = tmux.wait_for("thaw", "var=thawed-42");
    assert!(
        screen.contains(&format!("dir={}", workdir.display())),
        "{screen}"
    );
    assert!(
        screen.contains("echo marker-$((6*7))"),
        "history is gone:\n{screen}"
    );
    tmux.assert_job_control("thaw", true);
    tmux.send("thaw", "exit 3");
    tmux.wait_for("thaw", "pf-exit=3");
    // The terminal is the caller's again: it reads it (in the background it would stop).
    tmux.send("thaw", "back");
    tmux.wait_for("thaw", "after-pf=back");
}

#[test]
fn live_shell_beam_copies_a_running_shell() {
    if !live("live_shell_beam_copies_a_running_shell") {
        return;
    }
    let deadline = Deadline::start("live_shell_beam", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");

    let tmux = Tmux::start("beam");
    deadline.watch(tmux.server);
    tmux.new_session("orig", &shell_command());
    tmux.wait_for("orig", "pf-test$");
    tmux.send("orig", "export PF_T=beamed; echo ready-$((1+1))");
    tmux.wait_for("orig", "ready-2");
    let shell = tmux.query("orig", "#{pane_pid}");

    tmux.new_session(
        "copy",
        &pf_line(&store, &format!("shell beam --pid {shell}")),
    );
    tmux.wait_for_restored_shell("copy");
    tmux.send("copy", "echo \"copy=$PF_T-$((2+3))\"");
    tmux.wait_for("copy", "copy=beamed-5");
    tmux.send("orig", "echo \"orig=$PF_T-$((3+4))\"");
    tmux.wait_for("orig", "orig=beamed-7");
    tmux.assert_job_control("copy", true);
    // The copy is in a pid namespace of its own, in the session of its terminal: a freeze of
    // it says it cannot be frozen again and what to freeze instead.
    let copy = descendants(tmux.query("copy", "#{pane_pid}"))
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("NSpid:") && l.split_whitespace().count() == 3)
            }) && std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "bash")
        })
        .expect("the beamed copy's shell");
    // criu's kept log of the refused dump goes to the test's directory, removed with it.
    let again = pf(&store)
        .env("TMPDIR", dir.path())
        .args([
            "shell",
            "freeze",
            "--pid",
            &copy.to_string(),
            "--tag",
            "again",
        ])
        .output()
        .expect("pf shell freeze of the copy");
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("cannot be frozen or beamed again; freeze the original"),
        "{}",
        text(&again.stderr)
    );
    tmux.send("copy", "exit 4");
    tmux.wait_for("copy", "pf-exit=4");
    tmux.send("copy", "back");
    tmux.wait_for("copy", "after-pf=back");
    // The original still answers after the copy is gone.
    tmux.send("orig", "echo still-$((4+4))");
    tmux.wait_for("orig", "still-8");
}

#[test]
fn pgrep_with_no_match_or_two_matches_lists_candidates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let tag = format!("pf-pgrep-{}", std::process::id());
    let none = pf(&store)
        .args(["shell", "freeze", "--pgrep", &format!("{tag}-nothing")])
        .output()
        .expect("pf");
    assert_eq!(none.status.code(), Some(1));
    assert!(
        text(&none.stderr).contains("no process matches"),
        "{}",
        text(&none.stderr)
    );

    // Two processes whose command lines match: `sleep` with durations unique to this test (no
    // shell in between, whose forks would briefly match too).
    let spawn = |n: u32| {
        Reaped(
            spawn_clean(
                Command::new("sleep")
                    .arg(format!("600.{}{n}", std::process::id()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .expect("spawn sleep"),
        )
    };
    let (a, b) = (spawn(1), spawn(2));
    let pattern = format!("sleep 600\\.{}[12]", std::process::id());
    let two: Output = pf(&store)
        .args(["shell", "freeze", "--pgrep", &pattern])
        .output()
        .expect("pf");
    assert_eq!(two.status.code(), Some(1));
    let err = text(&two.stderr);
    assert!(err.contains("2 processes match"), "{err}");
    assert!(err.contains(&a.pid()) && err.contains(&b.pid()), "{err}");
    assert!(
        err.contains(&format!("sleep 600.{}1", std::process::id())),
        "{err}"
    );
}

/// A shell in its own session with pipes for stdio: no controlling terminal. It reads a line,
/// answers `got LINE` and exits 3. `read` and `echo` are builtins, so no grandchild outlives the
/// test.
fn shell_without_terminal() -> Reaped {
    Reaped(
        spawn_clean(
            Command::new("setsid")
                .args([
                    "bash",
                    "--norc",
                    "-c",
                    "read -t 60 line; echo \"got $line\"; exit 3",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )
        .expect("spawn setsid bash"),
    )
}

/// Write `line` to a shell from [`shell_without_terminal`], read its answer to the end, reap it.
fn ask(shell: &mut Reaped, line: &str) -> (String, std::process::ExitStatus) {
    use std::io::{Read as _, Write as _};
    let mut stdin = shell.0.stdin.take().expect("stdin");
    writeln!(stdin, "{line}").expect("write to the shell");
    drop(stdin);
    let mut answer = String::new();
    shell
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut answer)
        .expect("read the shell's answer");
    (answer, shell.0.wait().expect("reap the shell"))
}

#[test]
fn a_shell_without_a_terminal_is_refused_with_the_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let shell = shell_without_terminal();
    let out = pf(&store)
        .args(["shell", "freeze", "--pid", &shell.pid(), "--leave-running"])
        .output()
        .expect("pf");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no controlling terminal"), "{err}");
    assert!(
        err.contains("tmux or screen") && err.contains("--force"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(
        !store.join("refs").exists(),
        "a refused freeze names nothing"
    );
}

#[test]
fn live_shell_force_without_a_terminal_dumps_a_working_copy() {
    if !live("live_shell_force_without_a_terminal_dumps_a_working_copy") {
        return;
    }
    let deadline = Deadline::start(
        "live_shell_force_without_a_terminal_dumps_a_working_copy",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut shell = shell_without_terminal();
    let shell_pid = i32::try_from(shell.0.id()).expect("pid");
    deadline.watch(shell_pid);
    let stdio: Vec<String> = (0..2)
        .map(|fd| {
            std::fs::read_link(format!("/proc/{shell_pid}/fd/{fd}"))
                .expect("the shell's stdio")
                .display()
                .to_string()
        })
        .collect();
    // Without --force pf refuses (the test above); with it, CRIU dumps the shell: a session
    // leader whose stdio are pipes is an ordinary tree to CRIU, no terminal is needed.
    let forced = pf(&store)
        .args([
            "shell",
            "freeze",
            "--pid",
            &shell_pid.to_string(),
            "--leave-running",
            "--force",
        ])
        .args(["--tag", "forced"])
        .output()
        .expect("pf");
    let err = text(&forced.stderr);
    assert!(forced.status.success(), "{err}");
    assert!(
        err.contains("no controlling terminal") && err.contains("trying anyway (--force)"),
        "{err}"
    );
    let digest = text(&forced.stdout).trim().to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let show = pf(&store)
        .args(["procs", "show", "forced"])
        .output()
        .expect("pf procs show");
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("procs json");
    assert_eq!(json["kind"], "procs.criu.v2", "{json}");
    assert_eq!(json["pids"], serde_json::json!([shell_pid]), "{json}");
    assert_eq!(json["labels"]["shell"], "v1", "{json}");
    assert_eq!(json["options"]["shell_job"], true, "{json}");
    assert_eq!(json["stdio"][0], stdio[0], "{json}");
    assert_eq!(json["stdio"][1], stdio[1], "{json}");

    // The dump is a working shell: restored beside the original on fresh pipes, it reads a
    // line, answers and exits 3.
    let fs_store = pf_core::FsBlobStore::open(&store).expect("open the store");
    let procs = pf_core::BlobStore::resolve(&fs_store, "forced").expect("resolve");
    let (in_r, mut in_w) = std::io::pipe().expect("pipe");
    let (mut out_r, out_w) = std::io::pipe().expect("pipe");
    let mut copy = pf_world_procs::restore(
        &fs_store,
        &procs,
        pf_world_procs::RestoreOptions {
            new_pidns: true,
            shell_job: true,
            join_session: false,
            inherit: vec![
                pf_world_procs::InheritFd {
                    fd: in_r.into(),
                    key: stdio[0].clone(),
                },
                pf_world_procs::InheritFd {
                    fd: out_w.into(),
                    key: stdio[1].clone(),
                },
            ],
            extra_args: Vec::new(),
        },
    )
    .expect("restore the forced dump");
    if let Some(init) = copy.init_pid() {
        deadline.watch(init);
    }
    assert_eq!(copy.ns_pid(), shell_pid);
    {
        use std::io::{Read as _, Write as _};
        writeln!(in_w, "to the copy").expect("write to the copy");
        drop(in_w);
        let mut answer = String::new();
        out_r
            .read_to_string(&mut answer)
            .expect("read the copy's answer");
        assert_eq!(answer, "got to the copy\n");
    }
    assert_eq!(copy.wait().expect("wait"), pf_world_procs::Exit::Code(3));

    // The original was left running, untouched.
    let (answer, status) = ask(&mut shell, "to the original");
    assert_eq!(answer, "got to the original\n");
    assert_eq!(status.code(), Some(3));
}
