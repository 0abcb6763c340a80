//! `thaw_async`: the same goblin over tokio pipes.

use pf_core::MemBlobStore;
use pf_goblins::{FreezeOptions, FreezeTarget, Source, ThawOptions};
use pf_world_procs::test_support::live;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::support::{ANSWER, COUNTER, Talk, gone, python, spawn};

async fn thaw_and_talk() {
    let store = MemBlobStore::default();
    let mut original = spawn(&python(COUNTER, &[]));
    let mut talk = Talk::new(&mut original);
    assert_eq!(talk.ask("inc"), "1");
    assert_eq!(talk.ask("set k=v"), "ok");
    let frozen = pf_goblins::freeze(
        original.pid(),
        FreezeTarget::Store(&store),
        &FreezeOptions {
            leave_running: false,
            shell_job: false,
        },
    )
    .expect("freeze");
    original.wait().expect("reap original");
    let digest = *frozen.digest().expect("stored");
    let source = Source::Store {
        store: &store,
        digest: &digest,
    };
    let options = ThawOptions {
        new_pid_namespace: true,
    };
    let mut goblin = pf_goblins::thaw_async(&source, &options)
        .await
        .expect("thaw_async");
    let mut stdin = goblin.stdin.take().expect("stdin");
    let mut lines = BufReader::new(goblin.stdout.take().expect("stdout")).lines();
    let mut next = async || {
        tokio::time::timeout(ANSWER, lines.next_line())
            .await
            .expect("answer in time")
            .expect("read")
            .expect("a line")
    };
    stdin.write_all(b"inc\nget k\n").await.expect("write");
    assert_eq!(next().await, "2");
    assert_eq!(next().await, "v");
    stdin.write_all(b"exit 7\n").await.expect("write");
    drop(stdin);
    let pid = goblin.pid();
    let status = tokio::time::timeout(ANSWER, goblin.wait())
        .await
        .expect("exit in time")
        .expect("wait");
    assert_eq!(status.code(), Some(7));
    assert!(gone(pid));

    let mut second = pf_goblins::thaw_async(&source, &options)
        .await
        .expect("thaw_async again");
    let pid = second.pid();
    let status = second.kill().await.expect("kill");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(gone(pid));
}

#[test]
fn live_thaw_async_on_both_runtime_flavours() {
    if !live("live_thaw_async_on_both_runtime_flavours") {
        return;
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(thaw_and_talk());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(thaw_and_talk());
}
