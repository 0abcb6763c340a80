//! The bench's baseline: raw `criu dump` into a tmpfs directory and raw `criu restore` from it,
//! run by hand the way a person would, and the frozen time CRIU records in its `stats-dump`.
//!
//! `stats-dump` (CRIU 4.x, `images/stats.proto`) is `IMG_SERVICE_MAGIC` 0x55105940 and
//! `STATS_MAGIC` 0x57093306 (little-endian `u32`s), then one entry: a `u32` length and a
//! protobuf `stats_entry` whose field 1 is `dump_stats_entry`; its field 2 is `frozen_time`, in
//! microseconds. pf-world-procs reads the same file after its own dumps (`images::dump_stats`);
//! this copy keeps xtask free of pf's crates. It is the only CRIU image xtask reads.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::bench_proc::{Collected, Guard, Lines};
use crate::process::{self, Out};

/// One raw dump: wall seconds and CRIU's frozen time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawDump {
    pub(crate) secs: f64,
    pub(crate) frozen_us: u64,
}

/// `criu dump -t PID -D DIR --leave-running` (DIR on tmpfs, empty), timed; the log and
/// `stats-dump` land in DIR, as they do for anyone who runs criu by hand.
pub(crate) fn dump(criu: &Path, pid: u32, dir: &Path) -> anyhow::Result<RawDump> {
    let mut cmd = process::command(criu, dir, Out::Null, Out::Pipe);
    cmd.args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(dir)
        .args(["--leave-running", "-o", "dump.log"]);
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}); see {}",
            process::display(&cmd),
            out.status,
            dir.join("dump.log").display()
        );
    }
    let stats = dir.join("stats-dump");
    let bytes =
        std::fs::read(&stats).with_context(|| format!("cannot read {}", stats.display()))?;
    let frozen_us =
        frozen_time_us(&bytes).map_err(|why| anyhow::anyhow!("{}: {why}", stats.display()))?;
    Ok(RawDump { secs, frozen_us })
}

/// Raw `criu restore` from `dir`, inside fresh pid and mount namespaces as pf's thaw does
/// (`unshare --pid --fork --mount-proc criu restore …`: the original still runs and holds the
/// pid), on fresh pipes passed with `--inherit-fd` for the goblin's pipe inodes `pipes`. Returns
/// the seconds from starting `unshare` to the goblin's answer to `question`, and the answer.
/// Closing its stdin then ends the goblin, criu and unshare; the guard kills them otherwise.
pub(crate) fn restore(
    criu: &Path,
    dir: &Path,
    pipes: [u64; 3],
    question: &str,
) -> anyhow::Result<(f64, String)> {
    let (stdin_r, mut stdin_w) = std::io::pipe().context("pipe")?;
    let (stdout_r, stdout_w) = std::io::pipe().context("pipe")?;
    let (stderr_r, stderr_w) = std::io::pipe().context("pipe")?;
    let mut cmd = process::command("unshare", dir, Out::Null, Out::Null);
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(criu)
        .args(["restore", "-D"])
        .arg(dir)
        .args(["-o", "restore.log"]);
    for (fd, ino) in pipes.iter().enumerate() {
        cmd.arg("--inherit-fd")
            .arg(format!("fd[{fd}]:pipe:[{ino}]"));
    }
    // criu logs to its file: the goblin's pipes are the only stdio it is given.
    cmd.stdin(Stdio::from(stdin_r))
        .stdout(Stdio::from(stdout_w))
        .stderr(Stdio::from(stderr_w));
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    // Our copies of the child's ends are closed now (moved into `cmd`, dropped with it).
    drop(cmd);
    let mut guard = Guard::new(child, "raw criu restore");
    let out = Lines::new(stdout_r);
    let err = Collected::from(stderr_r);
    use std::io::Write as _;
    writeln!(stdin_w, "{question}").context("write to the restored goblin")?;
    let answer = out.next(Duration::from_secs(120)).with_context(|| {
        format!(
            "the raw restore did not answer (see {}): {}",
            dir.join("restore.log").display(),
            err.tail()
        )
    })?;
    let secs = start.elapsed().as_secs_f64();
    drop(stdin_w);
    let status = guard.wait(Duration::from_secs(60))?;
    if !status.success() {
        bail!(
            "raw criu restore ended with {status} (see {})",
            dir.join("restore.log").display()
        );
    }
    Ok((secs, answer))
}

/// `frozen_time` (µs) from the bytes of a `stats-dump`.
fn frozen_time_us(img: &[u8]) -> Result<u64, &'static str> {
    let u32_at = |at: usize| -> Result<u32, &'static str> {
        img.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or("truncated")
    };
    if u32_at(0)? != 0x5510_5940 || u32_at(4)? != 0x5709_3306 {
        return Err("not a CRIU stats image");
    }
    let len = u32_at(8)? as usize;
    let entry = img.get(12..12 + len).ok_or("truncated entry")?;
    let dump = field(entry, 1)?.ok_or("no dump statistics")?;
    let Field::Bytes(dump) = dump else {
        return Err("dump statistics are not a message");
    };
    match field(dump, 2)? {
        Some(Field::Varint(us)) => Ok(us),
        _ => Err("no frozen_time"),
    }
}

#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// The last value of protobuf field `want` in `msg` (varint or length-delimited).
fn field(msg: &[u8], want: u64) -> Result<Option<Field<'_>>, &'static str> {
    let mut pos = 0;
    let varint = |pos: &mut usize| -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *msg.get(*pos).ok_or("truncated varint")?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    };
    let mut found = None;
    while pos < msg.len() {
        let key = varint(&mut pos)?;
        let value = match key & 7 {
            0 => Some(Field::Varint(varint(&mut pos)?)),
            2 => {
                let len = usize::try_from(varint(&mut pos)?).map_err(|_| "length too large")?;
                let bytes = msg.get(pos..pos + len).ok_or("truncated field")?;
                pos += len;
                Some(Field::Bytes(bytes))
            }
            1 => {
                pos += 8;
                None
            }
            5 => {
                pos += 4;
                None
            }
            _ => return Err("unsupported wire type"),
        };
        if key >> 3 == want && value.is_some() {
            found = value;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frozen_time_from_a_real_stats_dump() {
        // Written by CRIU 4.1.1 after `criu dump --leave-running` of `sleep`.
        let real: &[u8] = b"\x40\x59\x10\x55\x06\x33\x09\x57\x21\x00\x00\x00\x0a\x1f\x08\x68\
\x10\xdc\x82\x01\x18\xba\x02\x20\x5a\x28\x3a\x30\x00\x38\x1e\x40\x00\x48\x00\x50\x06\x58\x06\
\x60\x00\x68\x00\x70\x00";
        assert_eq!(frozen_time_us(real), Ok(16732));
        assert_eq!(frozen_time_us(&real[..20]), Err("truncated entry"));
        assert_eq!(frozen_time_us(&real[4..]), Err("not a CRIU stats image"));
        let mut no_dump = real[..8].to_vec();
        no_dump.extend_from_slice(&[2, 0, 0, 0, 0x12, 0x00]);
        assert_eq!(frozen_time_us(&no_dump), Err("no dump statistics"));
    }
}
