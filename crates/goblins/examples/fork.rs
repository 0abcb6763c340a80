//! Fork a warm goblin: start a Python counter, warm it up, freeze it into a store, thaw N clones
//! side by side (`cargo run -p pf-goblins --example fork -- 8`; needs root and CRIU 4.2 or newer).
//!
//! Every clone starts from the frozen state (the counter at 3), then each is told something
//! different and answers on its own pipes. Each runs in its own pid namespace, beside the
//! original, which keeps running too.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::time::Instant;

use pf_goblins::{FreezeOptions, FreezeTarget, Source, SpawnOptions};

const COUNTER: &str = r#"
import sys
n = 0
for line in sys.stdin:
    n += int(line)
    print(n)
"#;

#[allow(clippy::print_stdout)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map_or(Ok(4), |a| a.parse())?;
    let store = pf_core::MemBlobStore::default();

    let cmd: Vec<OsString> = ["python3", "-u", "-c", COUNTER].map(OsString::from).into();
    let mut original = pf_goblins::spawn(&cmd, &SpawnOptions::in_dir("/".into()))?;
    let mut to_original = original.stdin.take().ok_or("no stdin")?;
    let mut from_original = BufReader::new(original.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    for _ in 0..3 {
        to_original.write_all(b"1\n")?;
        line.clear();
        from_original.read_line(&mut line)?;
    }
    println!(
        "original (pid {}) counted to {}",
        original.pid(),
        line.trim()
    );

    let started = Instant::now();
    let frozen = pf_goblins::freeze(
        original.pid(),
        FreezeTarget::Store(&store),
        &FreezeOptions {
            leave_running: true,
            shell_job: false,
        },
    )?;
    let digest = frozen.digest().ok_or("not stored")?;
    println!("frozen into {digest} in {:.0?}", started.elapsed());

    let started = Instant::now();
    let source = Source::Store {
        store: &store,
        digest,
    };
    let mut clones = pf_goblins::fork(&source, n)?;
    println!("{n} clones thawed in {:.0?}", started.elapsed());
    for (k, clone) in clones.iter_mut().enumerate() {
        let stdin = clone.stdin.as_mut().ok_or("no stdin")?;
        writeln!(stdin, "{}", 10 * (k + 1))?;
    }
    for (k, clone) in clones.iter_mut().enumerate() {
        let mut answer = String::new();
        BufReader::new(clone.stdout.as_mut().ok_or("no stdout")?).read_line(&mut answer)?;
        println!(
            "clone {k} (pid {}): 3 + {} = {}",
            clone.pid(),
            10 * (k + 1),
            answer.trim()
        );
    }
    to_original.write_all(b"1\n")?;
    line.clear();
    from_original.read_line(&mut line)?;
    println!("the original still runs: 3 + 1 = {}", line.trim());
    println!(
        "all {n} answered {:.0?} after the fork began",
        started.elapsed()
    );
    // Dropping the goblins kills and reaps every one of them.
    Ok(())
}
