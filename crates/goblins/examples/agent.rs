//! An agent exploring branches from one warm state: warm a Python REPL up once (imports, a
//! "model" that is slow to load), freeze it, then fork N branches that each try a different
//! idea, and collect what each answered (`cargo run -p pf-goblins --example agent -- 4`; needs
//! root and CRIU).
//!
//! This is the workflow the library offers in two calls: [`pf_goblins::warm_up`] and
//! [`pf_goblins::fork_and_collect`]. Ctrl-C cancels it cleanly at any stage: the REPL is
//! stopped during the warm-up, and the branches get the signal during the collect.

use std::ffi::OsString;
use std::io::Write as _;
use std::time::{Duration, Instant};

use pf_goblins::{
    Cancel, CollectOptions, FreezeOptions, FreezeTarget, Ready, Source, SpawnOptions, Stream,
    WarmFrom, WarmOptions,
};

/// What the REPL does once, before it is frozen: the part an agent does not want to pay for in
/// every branch.
const WARM_UP: &str = r#"
import json, math, time
time.sleep(1.0)  # stands for loading a model or a large data set
weights = [math.sin(k) for k in range(100_000)]
def score(seed):
    return round(sum(w * ((k * seed) % 7) for k, w in enumerate(weights)), 3)

print("ready")
"#;

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map_or(Ok(4), |a| a.parse())?;
    let store = pf_core::MemBlobStore::default();

    // Ctrl-C cancels: a signal-handling thread turns SIGINT into a cancel.
    let cancel = Cancel::new()?;
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block()?;
    std::thread::spawn({
        let cancel = cancel.clone();
        move || {
            if let Ok(sig) = signals.wait() {
                cancel.cancel_with_signal(sig as i32);
            }
        }
    });

    let started = Instant::now();
    let warmed = pf_goblins::warm_up(
        WarmFrom::Command {
            command: ["python3", "-u", "-i", "-q"].map(OsString::from).into(),
            spawn: SpawnOptions::in_dir("/".into()),
        },
        FreezeTarget::Store(&store),
        &WarmOptions {
            input: WARM_UP.as_bytes().to_vec(),
            ready: Ready::Matches("^ready$".into()),
            timeout: Duration::from_secs(60),
            freeze: FreezeOptions {
                leave_running: false,
                shell_job: false,
            },
            tag: Some("agent-repl".into()),
            drain: Duration::from_secs(2),
        },
        &cancel,
        &mut |stream, bytes| {
            // The REPL's stdout as it warms up; its `>>>` prompts (stderr) are left out.
            if stream == Stream::Stdout {
                let _ = std::io::stderr().write_all(bytes);
            }
        },
    )?;
    let digest = warmed.frozen.digest().ok_or("not stored")?;
    println!(
        "warmed up in {:.1?} (total {:.1?} with the freeze), frozen into {digest}",
        warmed.warmup,
        started.elapsed()
    );

    // Each branch tries a different seed, in a copy of the warm REPL of its own.
    let started = Instant::now();
    let inputs = pf_goblins::inputs_from_template(
        b"print(json.dumps({'seed': {i}, 'score': score({i})}))\n",
        n,
    );
    let branches = pf_goblins::fork_and_collect(
        &Source::Store {
            store: &store,
            digest,
        },
        &CollectOptions {
            inputs,
            deadline: Some(Duration::from_secs(60)),
        },
        &cancel,
    )?;
    println!("{n} branches answered in {:.1?}", started.elapsed());
    let mut best: Option<(f64, usize)> = None;
    for b in &branches {
        let answer = String::from_utf8_lossy(&b.stdout);
        let answer = answer.trim();
        println!("branch {} (pid {}, {}): {answer}", b.clone, b.pid, b.status);
        if b.timed_out {
            eprintln!("branch {} overran its deadline and was killed", b.clone);
        }
        let score = serde_json::from_str::<serde_json::Value>(answer)
            .ok()
            .and_then(|v| v["score"].as_f64());
        if let Some(score) = score
            && best.is_none_or(|(s, _)| score > s)
        {
            best = Some((score, b.clone));
        }
    }
    match best {
        Some((score, k)) => println!("best branch: {k} (score {score})"),
        None => println!("no branch answered"),
    }
    Ok(())
}
