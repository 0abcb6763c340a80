//! `pf procs` on a program with TCP sockets: a small counting server that nobody wrote for pf is
//! captured (which kills it), restored, and answers on the same port from the same state.
//! CRIU 4.1.1 as released cannot dump an inet socket on Linux ≥ 6.16; the CRIU that
//! `cargo xtask install-criu` builds carries pf's patch for it.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use pf_world_procs::test_support::{Deadline, KillOnDrop, live, spawn_clean};

use crate::support::pf;

/// Listens on an ephemeral port of 127.0.0.1, prints it, and answers each connection with
/// `hits N`, counting in memory.
const SERVER: &str = r#"
import os, socket
os.setsid()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
hits = 0
while True:
    c, _ = s.accept()
    hits += 1
    c.sendall(b"hits %d\n" % hits)
    c.close()
"#;

fn ask(port: u16) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let _ = conn.flush();
    Ok(answer.trim().to_owned())
}

#[test]
fn live_a_tcp_server_is_captured_and_answers_again_from_its_state() {
    if !live("live_a_tcp_server_is_captured_and_answers_again_from_its_state") {
        return;
    }
    let deadline = Deadline::start(
        "live_a_tcp_server_is_captured_and_answers_again_from_its_state",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", SERVER])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut server = spawn_clean(&mut cmd).expect("start the server");
    let pid = i32::try_from(server.id()).expect("pid");
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    let mut first = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("the server's port");
    let port: u16 = first.trim().parse().expect("a port number");
    assert_eq!(ask(port).expect("ask"), "hits 1");
    assert_eq!(ask(port).expect("ask"), "hits 2");

    let out = pf(&store)
        .args([
            "procs",
            "capture",
            "--pid",
            &pid.to_string(),
            "--tag",
            "server",
        ])
        .output()
        .expect("run pf procs capture");
    assert!(
        out.status.success(),
        "capture of a process with TCP sockets: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.wait().expect("reap the captured original");
    assert!(ask(port).is_err(), "the original is gone after the capture");

    let out = pf(&store)
        .args(["procs", "restore", "server", "--json"])
        .output()
        .expect("run pf procs restore");
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let restored_pid = i32::try_from(restored["pid"].as_i64().expect("pid")).expect("pid");
    deadline.watch(restored_pid);
    let _kill_restored = KillOnDrop(restored_pid);
    assert_eq!(restored_pid, pid, "a plain restore takes the old pid back");
    assert_eq!(
        ask(port).expect("the restored server answers on its old port"),
        "hits 3",
        "it counts on from its captured state"
    );
}
