//! `cargo xtask demo`: the main job, end to end, on this machine, through the real `pf` binary.
//!
//! Makes sure CRIU works and builds `pf`, asks `pf doctor` whether this machine can checkpoint,
//! then shows what pf is for: a Python session that takes a while to warm up is started as a
//! goblin and frozen the moment it is ready (`pf goblin spawn --until`), thawed once to answer
//! a question (`pf goblin thaw`), and forked into four clones that each start from the warm
//! state and answer differently (`pf goblin fork`). Every step is real and timed; nothing is
//! simulated. The store is left in `target/pf-demo/store` to play with.

use std::io::Write as _;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::install_criu;
use crate::process::{self, Out};

/// The goblin of the demo: really computes its warm state (every prime below 20 million) before
/// it says it is ready, then answers questions from it and keeps notes (state that diverges
/// between clones).
const KB: &str = r#"import os, sys, time

start = time.time()
print("warming up: sieving the primes below 20,000,000 and indexing them ...")
limit = 20_000_000
sieve = bytearray([1]) * limit
sieve[0:2] = b"\0\0"
for i in range(2, int(limit ** 0.5) + 1):
    if sieve[i]:
        sieve[i * i :: i] = bytes(len(range(i * i, limit, i)))
primes = [i for i, p in enumerate(sieve) if p]
del sieve
index = {p: k for k, p in enumerate(primes, 1)}
notes = []
print(f"ready: {len(primes):,} primes in {time.time() - start:.1f} s (pid {os.getpid()})")

for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "nth":
        k = int(arg)
        print(f"prime #{k:,} is {primes[k - 1]:,}" if 0 < k <= len(primes) else f"only {len(primes):,} primes")
    elif cmd == "index":
        p = int(arg)
        print(f"{p:,} is prime #{index[p]:,}" if p in index else f"{p:,} is not a prime below {limit:,}")
    elif cmd == "note":
        notes.append(arg)
        print(f"noted ({len(notes)} note{'s' if len(notes) > 1 else ''}: {'; '.join(notes)})")
    elif cmd == "whoami":
        print(f"pid {os.getpid()} in my namespace, {len(primes):,} primes in memory")
    else:
        print(f"unknown command {cmd!r}; try: nth K | index P | note TEXT | whoami")
"#;

#[allow(clippy::print_stderr)]
pub(crate) fn demo(root: &Path) -> anyhow::Result<ExitCode> {
    eprintln!("==> CRIU");
    let criu = install_criu::ensure(
        root,
        &install_criu::Options {
            force: false,
            dest: install_criu::DEFAULT_DEST.into(),
        },
    )?;

    eprintln!("\n==> build pf");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = process::command(cargo, root, Out::Inherit, Out::Inherit);
    build.args(["build", "--quiet", "--package", "pf-cli", "--bin", "pf"]);
    process::run(&mut build)?;
    let pf = process::target_dir(root).join("debug/pf");
    let demo_dir = process::target_dir(root).join("pf-demo");
    let store = demo_dir.join("store");

    eprintln!("\n==> pf doctor --store {}", store.display());
    let mut doctor = process::command(&pf, root, Out::Inherit, Out::Inherit);
    doctor
        .arg("--store")
        .arg(&store)
        .arg("doctor")
        .env("PF_CRIU", &criu);
    process::run(&mut doctor).context("this machine cannot checkpoint yet: see the fixes above")?;

    let mut python = process::command("python3", root, Out::Null, Out::Null);
    python.arg("--version");
    process::run(&mut python).context("the demo's goblin is a Python program: install python3")?;
    std::fs::create_dir_all(&demo_dir)
        .with_context(|| format!("cannot create {}", demo_dir.display()))?;
    let kb = demo_dir.join("kb.py");
    std::fs::write(&kb, KB).with_context(|| format!("cannot write {}", kb.display()))?;
    let pf_cmd = |args: &[&str]| {
        let mut cmd = process::command(&pf, &demo_dir, Out::Inherit, Out::Inherit);
        cmd.arg("--store")
            .arg(&store)
            .args(args)
            .env("PF_CRIU", &criu);
        cmd
    };

    eprintln!(
        "\n==> a slow-starting Python session, frozen the moment it is warm:\n    \
         pf goblin spawn --tag kb --until '^ready' -- python3 -u kb.py"
    );
    let started = Instant::now();
    let mut spawn = pf_cmd(&["goblin", "spawn", "--tag", "kb", "--until", "^ready", "--"]);
    spawn.args(["python3", "-u"]).arg(&kb);
    process::run(&mut spawn)?;
    let warm = started.elapsed();
    eprintln!(
        "    (warm-up and freeze took {:.2} s; the digest above is now named kb)",
        warm.as_secs_f64()
    );

    eprintln!(
        "\n==> thaw it once and ask it things:\n    \
         printf 'nth 300000\\nindex 4256233\\nwhoami\\n' | pf goblin thaw kb"
    );
    let started = Instant::now();
    let mut thaw = pf_cmd(&["goblin", "thaw", "kb"]);
    let first = run_with_input(&mut thaw, b"nth 300000\nindex 4256233\nwhoami\n", started)?;
    eprintln!(
        "    (first answer {:.2} s after `pf goblin thaw` started, all answered and exited after\n     \
         {:.2} s; warming up from scratch took {:.2} s)",
        first.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        warm.as_secs_f64()
    );

    eprintln!(
        "\n==> fork it into 4 clones; each starts from the same warm state and is asked something\n    \
         different (`{{i}}` is the clone's number):\n    \
         pf goblin fork kb -n 4 --send 'nth {{i}}00000' --send 'note I am clone {{i}}' --send whoami"
    );
    let started = Instant::now();
    let mut fork = pf_cmd(&[
        "goblin",
        "fork",
        "kb",
        "-n",
        "4",
        "--send",
        "nth {i}00000",
        "--send",
        "note I am clone {i}",
        "--send",
        "whoami",
    ]);
    process::run(&mut fork)?;
    eprintln!(
        "    (4 clones thawed, answered and exited in {:.2} s; each ran in its own pid namespace,\n     \
         which is why every one of them has the pid the original had)",
        started.elapsed().as_secs_f64()
    );

    eprintln!(
        "\n==> done. The snapshot stays in {}; try:\n    \
         echo 'nth 42' | {} --store {} goblin thaw kb",
        store.display(),
        pf.display(),
        store.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Run `cmd` with `input` on its stdin (then end of input), echo its stdout line by line, and
/// return how long after `started` the first line came; fail unless it exits 0.
fn run_with_input(
    cmd: &mut std::process::Command,
    input: &[u8],
    started: Instant,
) -> anyhow::Result<std::time::Duration> {
    use std::io::BufRead as _;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .context("cannot write to pf's stdin")?;
    }
    let stdout = child.stdout.take().context("pf's stdout was not piped")?;
    let mut first = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("cannot read pf's stdout")?;
        first.get_or_insert_with(|| started.elapsed());
        writeln!(std::io::stdout(), "{line}").context("cannot write to stdout")?;
    }
    let status = child.wait().context("cannot wait for pf")?;
    if !status.success() {
        bail!("`{}` failed ({status})", process::display(cmd));
    }
    first.context("pf printed nothing")
}
