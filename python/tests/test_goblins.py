"""pf.goblins: spawn, freeze, thaw, fork and the errors a caller branches on.

Tests named ``test_live_*`` freeze and thaw with CRIU for real (the ``live`` fixture gates them);
the others check what pf refuses before CRIU runs.
"""

import asyncio
import os
import signal
import re
import subprocess
import sys
import time
import types

import pytest

import pf

# A goblin with state: counts the lines it was sent and echoes each with the count.
COUNTER = [
    sys.executable,
    "-u",
    "-c",
    "import sys\n"
    "n = 0\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    n += 1\n"
    "    print(n, line.strip(), flush=True)\n",
]

# A goblin that writes what it is sent, unescaped ("ab" writes no newline, "ab\\n" writes one),
# with "#" replaced by how many lines it has been sent; "err ..." goes to stderr; "exit" ends it.
TALKER = [
    sys.executable,
    "-u",
    "-c",
    "import sys\n"
    "n = 0\n"
    "for line in sys.stdin:\n"
    "    n += 1\n"
    "    if line.strip() == 'exit':\n"
    "        break\n"
    "    out = sys.stdout\n"
    "    if line.startswith('err '):\n"
    "        out, line = sys.stderr, line[4:]\n"
    "    out.write(line[:-1].encode().decode('unicode_escape').replace('#', str(n)))\n"
    "    out.flush()\n",
]


def say(goblin, text):
    """Have a TALKER goblin write ``text`` (its escapes, such as a newline, written as \\n)."""
    goblin.stdin.write(text.encode() + b"\n")


def ask(goblin, line):
    """Send one line, read one answer."""
    goblin.stdin.write(line.encode() + b"\n")
    return goblin.stdout.readline().decode().strip()


def alive(pid):
    """Whether pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone meanwhile
        return False


@pytest.fixture
def counter():
    """A spawned counter goblin that has answered one line ("1 a")."""
    with pf.goblins.spawn(COUNTER) as goblin:
        assert goblin.stdout.readline() == b"ready\n"
        assert ask(goblin, "a") == "1 a"
        yield goblin


# --- refused before CRIU runs --------------------------------------------------------------------


def test_spawn_refuses_an_empty_command_and_a_missing_program():
    with pytest.raises(pf.InvalidArgument):
        pf.goblins.spawn([])
    with pytest.raises(pf.SpawnFailed, match="no-such-program-here"):
        pf.goblins.spawn(["/no-such-program-here"])


def test_a_command_line_given_as_one_string_is_refused(store):
    # Not run as "s" with arguments "l", "e", ...: a str is a sequence of one-letter strings.
    with pytest.raises(TypeError, match="shlex.split"):
        pf.goblins.spawn("sleep 60")
    with pytest.raises(TypeError, match="shlex.split"):
        pf.goblins.warm_up(b"sleep 60", store, quiet=1, timeout=5)
    assert store.blobs() == []


def test_sending_no_such_signal_raises_invalid_argument():
    with pf.goblins.spawn([sys.executable, "-c", "import sys; sys.stdin.read()"]) as goblin:
        with pytest.raises(pf.InvalidArgument, match="999 is not a signal"):
            goblin.send_signal(999)
        goblin.send_signal(0)
        assert goblin.poll() is None


def test_a_spawned_goblin_answers_and_with_kills_and_reaps_it():
    with pf.goblins.spawn(COUNTER) as goblin:
        pid = goblin.pid
        assert goblin.stdout.readline() == b"ready\n"
        assert ask(goblin, "x") == "1 x"
        assert goblin.poll() is None
    assert goblin.returncode == -9
    assert not alive(pid)


def test_wait_returns_the_exit_status_and_times_out():
    goblin = pf.goblins.spawn([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(7)"])
    with pytest.raises(pf.Timeout) as err:
        goblin.wait(timeout=0.05)
    assert isinstance(err.value, TimeoutError)
    goblin.stdin.close()
    assert goblin.wait(timeout=30) == 7
    assert goblin.returncode == 7


def test_kill_of_a_detached_goblin_refuses_and_leaves_it_running():
    goblin = pf.goblins.spawn([sys.executable, "-c", "import sys; sys.stdin.read()"])
    goblin.detach()
    try:
        with pytest.raises(pf.InvalidArgument, match="detached"):
            goblin.kill()
        # Nor does it pass for running forever.
        with pytest.raises(pf.InvalidArgument, match="detached"):
            goblin.poll()
        time.sleep(0.05)
        assert alive(goblin.pid)
    finally:
        os.kill(goblin.pid, signal.SIGKILL)
        os.waitpid(goblin.pid, 0)


def test_leaving_with_leaves_a_goblin_detached_inside_it_running():
    # One that outlives the end of its input (leaving `with` closes our end of its stdin).
    with pf.goblins.spawn([sys.executable, "-c", "import time; time.sleep(60)"]) as goblin:
        goblin.detach()
    try:
        assert alive(goblin.pid)
        assert goblin.stdin.closed
    finally:
        os.kill(goblin.pid, signal.SIGKILL)
        os.waitpid(goblin.pid, 0)


def test_wait_with_no_time_left_still_sees_a_goblin_that_has_exited():
    goblin = pf.goblins.spawn([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, goblin.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert goblin.wait(timeout=0) == 0


def test_ctrl_c_ends_a_wait_for_a_goblin_that_never_exits():
    script = (
        "import sys, pf\n"
        "g = pf.goblins.spawn([sys.executable, '-c', 'import sys; sys.stdin.read()'])\n"
        "print(g.pid, flush=True)\n"
        "with g:\n"
        "    try:\n"
        "        g.wait()\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
    )
    # SIGINT's default action, as at a terminal (see the warm-up's Ctrl-C test).
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    goblin = None
    try:
        goblin = int(proc.stdout.readline())
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        # The goblin leads a session of its own: proc.kill() does not reach it.
        if goblin is not None and alive(goblin):
            os.kill(goblin, signal.SIGKILL)
    assert out == "interrupted\n"
    assert proc.returncode == 0
    assert not alive(goblin)


def test_readline_with_a_timeout_returns_a_line_or_raises_and_loses_nothing():
    with pf.goblins.spawn(TALKER) as goblin:
        start = time.monotonic()
        with pytest.raises(pf.Timeout, match="wrote no full line on its stdout within 0.3 s") as err:
            goblin.readline(timeout=0.3)
        assert 0.25 < time.monotonic() - start < 5
        assert isinstance(err.value, TimeoutError)
        assert goblin.poll() is None
        # An unfinished line is kept for the next read, whichever reads it.
        say(goblin, "unfin")
        with pytest.raises(pf.Timeout, match="5 bytes it wrote before that are kept"):
            goblin.readline(timeout=0.3)
        say(goblin, "ished #\\n")
        assert goblin.readline(timeout=10) == b"unfinished 2\n"
        say(goblin, "xy")
        with pytest.raises(pf.Timeout):
            goblin.readline(timeout=0.1)
        say(goblin, "z\\n")
        assert goblin.stdout.readline() == b"xyz\n"
        # Lines already in stdout's buffer are returned at once, even with no time at all, and
        # stdout.readline() goes on where readline() stopped.
        say(goblin, "a\\nb\\nc\\nd")
        assert goblin.readline(timeout=10) == b"a\n"
        assert goblin.stdout.readline() == b"b\n"
        assert goblin.readline(timeout=0) == b"c\n"
        with pytest.raises(pf.Timeout, match=r"\(1 byte it wrote"):
            goblin.readline(timeout=0)
        say(goblin, "\\n")
        assert goblin.readline(timeout=10) == b"d\n"


def test_read_until_a_marker_that_arrives_in_pieces():
    with pf.goblins.spawn(TALKER) as goblin:
        say(goblin, "hello\\n>>> ")
        assert goblin.read_until(b">>> ", timeout=10) == b"hello\n>>> "
        say(goblin, "ab")
        with pytest.raises(pf.Timeout, match="wrote no b'bc' on its stdout"):
            goblin.read_until(b"bc", timeout=0.2)
        say(goblin, "cd\\n")
        assert goblin.read_until(b"bc", timeout=10) == b"abc"
        assert goblin.readline(timeout=10) == b"d\n"
        with pytest.raises(pf.InvalidArgument, match="empty"):
            goblin.read_until(b"", timeout=1)
        with pytest.raises(TypeError, match="bytes"):
            goblin.read_until(">>> ", timeout=1)


def test_readline_at_end_of_input_returns_what_was_left_then_nothing():
    with pf.goblins.spawn(TALKER) as goblin:
        say(goblin, "one\\ntwo\\nlast words")
        say(goblin, "exit")
        assert goblin.readline(timeout=10) == b"one\n"
        assert next(iter(goblin.stdout)) == b"two\n"
        assert goblin.readline(timeout=10) == b"last words"
        assert goblin.readline(timeout=10) == b""
        assert goblin.stdout.read() == b""
        assert goblin.read_until(b">", timeout=0) == b""
        assert goblin.wait(timeout=10) == 0


def test_readline_reads_stderr_and_refuses_what_it_cannot_read():
    with pf.goblins.spawn(TALKER) as goblin:
        say(goblin, "err oops\\n")
        say(goblin, "fine\\n")
        assert goblin.readline(timeout=10, stream="stderr") == b"oops\n"
        assert goblin.readline(timeout=10) == b"fine\n"
        with pytest.raises(pf.Timeout, match="on its stderr"):
            goblin.readline(timeout=0.1, stream="stderr")
        with pytest.raises(pf.InvalidArgument, match="stream"):
            goblin.readline(timeout=1, stream="stdin")
        for bad in (-1, float("nan"), float("inf"), "1"):
            with pytest.raises(pf.InvalidArgument, match="timeout"):
                goblin.readline(timeout=bad)


def test_an_interrupted_readline_loses_nothing():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pf.goblins.spawn(TALKER) as goblin:
            say(goblin, "half a ")
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                goblin.readline()  # no timeout: only the signal ends it
            say(goblin, "line\\n")
            assert goblin.stdout.readline() == b"half a line\n"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_freezing_a_dead_pid_raises_no_such_process(tmp_path, store):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(pf.NoSuchProcess) as err:
        pf.goblins.freeze(proc.pid, store)
    assert isinstance(err.value, ProcessLookupError)
    assert str(proc.pid) in str(err.value)
    assert store.blobs() == []


def test_freezing_a_process_that_is_not_a_goblin_raises_not_a_goblin(store):
    # Not its own session leader: CRIU would need --shell-job.
    proc = subprocess.Popen(
        COUNTER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with pytest.raises(pf.NotAGoblin, match="session"):
            pf.goblins.freeze(proc.pid, store)
    finally:
        proc.kill()
        proc.wait()
    assert store.blobs() == []


def test_freezing_a_process_this_one_may_not_inspect_raises_access_denied(tmp_path):
    # A freezer in a user namespace of its own may not look into a process of ours, as a
    # container's root may not look into the host's pid 1.
    script = (
        "import sys, pf\n"
        "try:\n"
        "    pf.goblins.freeze(int(sys.argv[1]), sys.argv[2])\n"
        "except pf.AccessDenied as e:\n"
        "    print('AccessDenied', isinstance(e, PermissionError), e)\n"
    )
    with pf.goblins.spawn([sys.executable, "-c", "import sys; sys.stdin.read()"]) as goblin:
        out = subprocess.run(
            ["unshare", "--user", "--map-root-user", sys.executable, "-c", script]
            + [str(goblin.pid), str(tmp_path / "images")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.stdout.startswith("AccessDenied True"), out.stdout + out.stderr
    assert f"may not look into process {goblin.pid}" in out.stdout
    assert "pf.goblins.spawn" in out.stdout


def test_thawing_what_is_not_a_goblin_snapshot_raises(store):
    with pytest.raises(pf.NotFound):
        pf.goblins.thaw("no-such-snapshot", store)
    # A path that is no directory is said to be one, not a name with a slash in it.
    with pytest.raises(pf.NotFound, match="no images directory '/nonexistent/images'"):
        pf.goblins.thaw("/nonexistent/images", store)
    record = b'{"kind":"procs.unsupported.v1","unsupported_on":"plan9","note":"no criu"}'
    store.tag("plan9", store.put(record))
    with pytest.raises(pf.NotAGoblin, match="plan9"):
        pf.goblins.thaw("plan9", store)
    store.tag("text", store.put(b"just text"))
    with pytest.raises(pf.InvalidSnapshot):
        pf.goblins.thaw("text", store)


def test_what_cannot_be_a_snapshot_or_a_store_is_a_type_error_saying_what_can(tmp_path):
    what = r"a snapshot is a digest \('sha256:...'\) or a name in the store, as a str, or an images"
    loaded = pf.goblins.Loaded(types.SimpleNamespace(name="sha256:" + "0" * 64, lazy=False))
    wrong = [
        (123, "not int: 123"),
        (None, "not NoneType"),
        (b"x", "decode it first"),
        (loaded, r"its own thaw\(\) and fork\(n\)"),
    ]
    for bad, hint in wrong:
        for call in (
            lambda: pf.goblins.thaw(bad),
            lambda: pf.goblins.load(bad),
            lambda: pf.goblins.fork(bad, 2),
            lambda: pf.goblins.fork_and_collect(bad, [b""]),
            lambda: asyncio.run(pf.goblins.thaw_async(bad)),
            lambda: asyncio.run(pf.goblins.fork_async(bad, 2)),
        ):
            with pytest.raises(TypeError, match=what) as err:
                call()
            assert re.search(hint, str(err.value)), str(err.value)
    with pytest.raises(TypeError, match=r"store is a pf.Store, or None .* \(pf.Store\('/s'\) is"):
        pf.goblins.thaw("base", "/s")
    with pytest.raises(TypeError, match="store is a pf.Store"):
        pf.goblins.fork(str(tmp_path), 2, store=1)
    with pytest.raises(TypeError, match="a freeze goes into a pf.Store .* not NoneType"):
        pf.goblins.freeze(os.getpid(), None)
    with pf.goblins.spawn(COUNTER) as goblin:
        with pytest.raises(TypeError, match="a freeze goes into a pf.Store .* not int"):
            pf.goblins.warm_up(goblin, 5, ready="ready", timeout=5)
        # The goblin was not handed over: it is still this handle's.
        assert goblin.stdout.readline() == b"ready\n"


def test_inputs_are_bytes_not_an_int_or_a_str(store):
    # bytes(4) would be four NUL bytes: refused before anything starts.
    for bad, hint in [(4, "not int: 4"), ("print(1)", r"encode it first")]:
        with pytest.raises(TypeError, match="input is bytes, not") as err:
            pf.goblins.warm_up(["cat"], store, input=bad, quiet=0.3, timeout=5)
        assert re.search(hint, str(err.value)), str(err.value)
        with pytest.raises(TypeError, match=r"inputs\[1\] is bytes, not"):
            pf.goblins.fork_and_collect("base", [b"ok", bad], store)


def test_a_directory_here_that_is_not_an_images_directory_does_not_hide_a_name(
    tmp_path, store, monkeypatch
):
    # A project's "warm/" beside the script: "warm" still names a snapshot in the store.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "warm").mkdir()
    store.tag("warm", store.put(b"not a snapshot"))
    with pytest.raises(pf.InvalidSnapshot):
        pf.goblins.thaw("warm", store)
    # One that holds goblin.json is an images directory.
    (tmp_path / "warm" / "goblin.json").write_text("{")
    with pytest.raises(pf.InvalidSnapshot, match="goblin.json"):
        pf.goblins.thaw("warm", store)


def test_a_missing_criu_raises_criu_missing(tmp_path):
    # In a fresh interpreter: the criu probe is cached per process.
    script = (
        "import subprocess, sys, pf\n"
        "g = pf.goblins.spawn([sys.executable, '-c', 'import sys; sys.stdin.read()'])\n"
        "try:\n"
        "    pf.goblins.freeze(g.pid, pf.Store(sys.argv[1]))\n"
        "except pf.CriuMissing as e:\n"
        "    print('CriuMissing', e)\n"
        "finally:\n"
        "    g.kill()\n"
    )
    env = dict(os.environ, PF_CRIU=str(tmp_path / "no-criu-here"))
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.startswith("CriuMissing"), out.stdout + out.stderr
    assert "no-criu-here" in out.stdout


# --- live: CRIU for real -------------------------------------------------------------------------


def test_live_freeze_thaw_keeps_state_and_the_original_runs_on(live, store, counter):
    digest = pf.goblins.freeze(counter.pid, store, tag="counter")
    assert digest.startswith("sha256:")
    assert store.resolve("counter") == digest
    # A Goblin stands for its pid.
    assert pf.goblins.freeze(counter, store, tag="by-goblin").startswith("sha256:")
    # leave_running=True is the default: the original goes on from the same state.
    assert ask(counter, "b") == "2 b"
    with pf.goblins.thaw("counter", store) as copy:
        assert copy.pid != counter.pid
        assert ask(copy, "c") == "2 c"
        copy.stdin.close()
        assert copy.wait(timeout=30) == 0
    assert copy.returncode == 0


def test_live_freezing_a_traced_goblin_raises_traced_naming_the_tracer(live, store, counter):
    # A tracer as a debugger (or another freeze's criu) would be: PTRACE_SEIZE, then wait.
    tracer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes, sys, time\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.prctl(15, b'gdb', 0, 0, 0)\n"
            "ok = libc.ptrace(ctypes.c_long(0x4206), ctypes.c_long(int(sys.argv[1])), None, None)\n"
            "print('seized' if ok == 0 else 'failed', flush=True)\n"
            "time.sleep(600)\n",
            str(counter.pid),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert tracer.stdout is not None and tracer.stdout.readline() == b"seized\n"
        with pytest.raises(pf.Traced, match=f"is traced by gdb \\(pid {tracer.pid}\\)") as err:
            pf.goblins.freeze(counter.pid, store)
        assert err.value.log is None  # refused before criu ran
    finally:
        tracer.kill()
        tracer.wait()
    assert ask(counter, "b") == "2 b"
    deadline = time.monotonic() + 20
    while True:
        with open(f"/proc/{counter.pid}/status") as f:
            if "TracerPid:\t0\n" in f.read():
                break
        assert time.monotonic() < deadline, "still traced"
        time.sleep(0.01)
    assert pf.goblins.freeze(counter.pid, store).startswith("sha256:")


def test_live_freeze_into_a_store_that_is_not_there_creates_it(live, tmp_path, counter):
    store = pf.Store(str(tmp_path / "new-store"))
    assert not store.exists
    digest = pf.goblins.freeze(counter.pid, store, tag="counter")
    assert store.exists and store.resolve("counter") == digest
    with pf.goblins.thaw("counter", pf.Store(str(tmp_path / "new-store"))) as copy:
        assert ask(copy, "b") == "2 b"


def test_live_fork_of_four_answers_each_from_the_same_state(live, store, counter):
    pf.goblins.freeze(counter.pid, store, tag="base")
    copies = pf.goblins.fork("base", 4, store)
    try:
        assert len({c.pid for c in copies}) == 4
        answers = [ask(c, f"copy {i}") for i, c in enumerate(copies)]
        assert answers == [f"2 copy {i}" for i in range(4)]
        # Each diverges on its own.
        assert ask(copies[0], "again") == "3 again"
        assert ask(copies[1], "other") == "3 other"
    finally:
        for c in copies:
            c.kill()
            c.close()
    for c in copies:
        assert c.returncode == -9
        assert not alive(c.pid)


def test_live_a_thawed_copy_freezes_and_its_snapshot_thaws_from_its_state(live, store, counter):
    pf.goblins.freeze(counter.pid, store, tag="base")
    with pf.goblins.thaw("base", store) as branch:
        assert ask(branch, "step") == "2 step"
        # The copy runs in a pid namespace of its own; pf freezes it from inside.
        digest = pf.goblins.freeze(branch.pid, store, tag="branch")
        assert store.resolve("branch") == digest
        assert ask(branch, "on") == "3 on", "it runs on after its freeze"
        copies = pf.goblins.fork("branch", 2, store)
        try:
            assert [ask(c, f"c{i}") for i, c in enumerate(copies)] == ["3 c0", "3 c1"]
        finally:
            for c in copies:
                c.kill()
                c.close()
        branch.stdin.close()
        assert branch.wait(timeout=30) == 0


def test_live_fork_of_fewer_than_one_copy_raises_invalid_argument(live, store, counter):
    pf.goblins.freeze(counter.pid, store, tag="base")
    loaded = pf.goblins.load("base", store)
    for n in (0, -1):
        with pytest.raises(pf.InvalidArgument, match=f"n >= 1, not {n}"):
            loaded.fork(n)
        with pytest.raises(pf.InvalidArgument):
            pf.goblins.fork("base", n, store)


def test_live_with_kills_and_reaps_a_thawed_goblin(live, store, counter):
    pf.goblins.freeze(counter.pid, store, tag="k")
    loaded = pf.goblins.load("k", store)
    with loaded.thaw() as copy:
        pid = copy.pid
        assert alive(pid)
    assert copy.returncode == -9
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(pid)


def test_live_asyncio_thaw_and_fork(live, store, counter):
    pf.goblins.freeze(counter.pid, store, tag="aio")

    async def main():
        copy = await pf.goblins.thaw_async("aio", store)
        async with copy:
            copy.stdin.write(b"async\n")
            await copy.stdin.drain()
            line = await asyncio.wait_for(copy.stdout.readline(), 30)
            assert line == b"2 async\n"
        assert copy.returncode == -9
        twins = await pf.goblins.fork_async("aio", 2, store, lazy=False)
        lines = []
        for i, twin in enumerate(twins):
            assert twin.poll() is None
            with pytest.raises(pf.Timeout):
                await twin.wait(timeout=0.05)
            twin.stdin.write(f"twin {i}\n".encode())
            await twin.stdin.drain()
            lines.append(await asyncio.wait_for(twin.stdout.readline(), 30))
            twin.stdin.close()
            assert await twin.wait(timeout=30) == 0
            assert twin.poll() == 0
        # The same options as thaw's: lazy (the counter's snapshot is small: eager unless
        # asked), and a copy detached outlives its handle.
        lazy = await pf.goblins.thaw_async("aio", store, lazy=True)
        assert await lazy.wait_pages(timeout=30) is True
        async with lazy:
            await lazy.detach()
        try:
            assert alive(lazy.pid)
        finally:
            os.kill(lazy.pid, signal.SIGKILL)
            end = time.monotonic() + 10
            while alive(lazy.pid) and time.monotonic() < end:
                time.sleep(0.01)
        assert not alive(lazy.pid)
        return lines

    assert asyncio.run(main()) == [b"2 twin 0\n", b"2 twin 1\n"]


def test_live_readline_with_a_timeout_on_thawed_and_forked_goblins(live, store):
    with pf.goblins.spawn(TALKER) as goblin:
        say(goblin, "warm #\\n")
        assert goblin.readline(timeout=10) == b"warm 1\n"
        pf.goblins.freeze(goblin.pid, store, tag="talker")
    with pf.goblins.thaw("talker", store) as copy:
        with pytest.raises(pf.Timeout):
            copy.readline(timeout=0.2)
        say(copy, "thawed ")
        with pytest.raises(pf.Timeout, match="7 bytes"):
            copy.readline(timeout=0.2)
        say(copy, "#\\n")
        assert copy.readline(timeout=10) == b"thawed 3\n"
    copies = pf.goblins.fork("talker", 2, store)
    try:
        for i, twin in enumerate(copies):
            say(twin, f"twin {i} #\\n>>> ")
            assert twin.read_until(b">>> ", timeout=10) == f"twin {i} 2\n>>> ".encode()
            with pytest.raises(pf.Timeout):
                twin.readline(timeout=0.1)
            say(twin, "exit")
            assert twin.readline(timeout=10) == b""
    finally:
        for twin in copies:
            twin.kill()
            twin.close()

    async def main():
        copy = await pf.goblins.thaw_async("talker", store)
        async with copy:
            with pytest.raises(pf.Timeout, match="within 0.2 s"):
                await copy.readline(timeout=0.2)
            copy.stdin.write(b"async \n")
            await copy.stdin.drain()
            with pytest.raises(pf.Timeout):
                await copy.readline(timeout=0.2)
            copy.stdin.write(b"#\\n>>> \n")
            line = await copy.readline(timeout=10)
            prompt = await copy.read_until(b">>> ", timeout=10)
            copy.stdin.write(b"exit\n")
            rest = await copy.readline(timeout=10)
        return line, prompt, rest

    assert asyncio.run(main()) == (b"async 3\n", b">>> ", b"")


def test_live_thaw_on_the_host_pid_while_the_original_runs_raises_pid_in_use(
    live, store, counter
):
    pf.goblins.freeze(counter.pid, store, tag="busy")
    with pytest.raises(pf.PidInUse) as err:
        pf.goblins.thaw("busy", store, new_pid_namespace=False)
    assert str(counter.pid) in str(err.value)
    # The fix as this API spells it, not as the command line does.
    assert "new_pid_namespace=True" in str(err.value), str(err.value)
    assert "--new-pidns" not in str(err.value)
    assert ask(counter, "still") == "2 still"


def test_live_broken_images_raise_criu_failed_with_criu_lines(
    live, tmp_path, counter, monkeypatch
):
    # pf keeps the log of a failed criu run in $TMPDIR: this test's own, not the machine's /tmp.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    images = tmp_path / "images"
    assert pf.goblins.freeze(counter.pid, str(images)) == str(images)
    cores = [p for p in images.iterdir() if p.name.startswith("core-")]
    assert cores
    for core in cores:
        core.write_bytes(b"\x00" * 16)
    with pytest.raises(pf.CriuFailed) as err:
        pf.goblins.thaw(images)
    assert err.value.criu_errors, str(err.value)
    assert all(line.startswith("Error") for line in err.value.criu_errors)
    assert err.value.log and os.path.isfile(err.value.log)
    assert os.path.dirname(os.path.dirname(err.value.log)) == str(scratch)


def test_live_a_seed_style_script_runs_on_pf(live, tmp_path):
    """pdum-criu's goblins usage, ported line by line as python/README.md's table says."""
    # Before: from pdum.criu import goblins
    from pf import goblins

    proc = subprocess.Popen(
        COUNTER,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.stdin.write(b"warm\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"1 warm\n"
        images_dir = str(tmp_path / "goblin-images")
        # Before: goblins.freeze(proc.pid, images_dir, leave_running=True)
        goblins.freeze(proc.pid, images_dir, leave_running=True)
        # Before: handle = goblins.thaw(images_dir)
        handle = goblins.thaw(images_dir)
        handle.stdin.write(b"hello\n")
        assert handle.stdout.readline() == b"2 hello\n"
        # Before: handle.terminate() (and no exit status)
        handle.terminate()
        assert handle.wait(timeout=30) == -15
    finally:
        proc.kill()
        proc.wait()


# --- the workflow: warm_up and fork_and_collect --------------------------------------------------

# A REPL-like goblin that takes a while to warm up and then evaluates expressions line by line.
REPL = [
    sys.executable,
    "-u",
    "-c",
    "import sys, time\n"
    "table = {i: i * i for i in range(100000)}\n"
    "print('warm', len(table), flush=True)\n"
    "for line in sys.stdin:\n"
    "    print(eval(line, {'table': table}), flush=True)\n",
]


def test_live_warm_up_that_never_gets_ready_raises_not_warm_and_stops_it(live, store):
    with pytest.raises(pf.NotWarm) as err:
        pf.goblins.warm_up(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            store,
            ready="never",
            timeout=0.5,
        )
    assert isinstance(err.value, TimeoutError)
    assert "not warm after 0.5 s" in str(err.value), str(err.value)
    assert store.names() == {}


def test_live_a_cancel_from_another_thread_stops_a_warm_up(live, store):
    import threading

    cancel = pf.goblins.Cancel()
    threading.Timer(0.3, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(pf.Cancelled):
        pf.goblins.warm_up(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            store,
            ready="never",
            timeout=30,
            cancel=cancel,
        )
    assert cancel.cancelled
    assert time.monotonic() - started < 10


def processes_with(marker):
    """Pids whose command line holds marker."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read() and alive(int(entry)):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_live_ctrl_c_stops_a_warm_up_and_raises_keyboard_interrupt(live, tmp_path):
    marker = f"pf-ctrl-c-test-{os.getpid()}-{time.monotonic_ns()}"
    script = (
        "import sys, time, pf\n"
        "print('started', flush=True)\n"
        "try:\n"
        "    pf.goblins.warm_up([sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[2]],\n"
        "                       pf.Store(sys.argv[1]), ready='never', timeout=60)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    # SIGINT's default action, as at a terminal: run as a background job of a script, pytest
    # and so its children would inherit it ignored, and Python installs no KeyboardInterrupt.
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "store"), marker],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.readline() == "started\n"
        deadline = time.monotonic() + 20
        goblins = []
        while not goblins and time.monotonic() < deadline:
            goblins = [p for p in processes_with(marker) if p != proc.pid]
            time.sleep(0.02)
        assert goblins, "the goblin never started"
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert out == "interrupted\n"
    # The warm-up stopped its goblin (in a session of its own, out of reach of proc.kill()).
    assert processes_with(marker) == []


def test_warm_up_refuses_a_goblin_whose_pipes_are_in_use(store):
    with pf.goblins.spawn(COUNTER) as goblin:
        assert goblin.stdout.readline() == b"ready\n"
        with pytest.raises(pf.InvalidArgument, match="pipes are in use"):
            pf.goblins.warm_up(goblin, store, ready="ready", timeout=5)
        assert ask(goblin, "still mine") == "1 still mine"
    assert store.blobs() == []


def test_live_warm_up_of_a_goblin_from_spawn_reads_its_pipes(live, store):
    with pf.goblins.spawn(COUNTER) as goblin:
        warmed = pf.goblins.warm_up(
            goblin, store, input=b"a\n", ready=r"1 a\n", timeout=30, tag="spawned"
        )
    assert warmed.stdout == b"ready\n1 a\n"
    assert warmed.snapshot == store.resolve("spawned")
    # Its pipes went to warm_up: the old handle says where they are now.
    for pipe in ("stdin", "stdout", "stderr"):
        with pytest.raises(pf.InvalidArgument, match="handed to warm_up.*Warmed.goblin"):
            getattr(goblin, pipe)
    with pf.goblins.thaw("spawned", store) as copy:
        assert ask(copy, "b") == "2 b"


def test_live_warm_up_then_fork_and_collect_branches(live, store):
    warmed = pf.goblins.warm_up(REPL, store, ready=r"^warm \d+$", timeout=60, tag="repl")
    assert warmed.snapshot == store.resolve("repl")
    assert warmed.stdout == b"warm 100000\n"
    assert warmed.goblin is None and warmed.returncode is not None
    assert warmed.drain == "complete"
    assert not alive(warmed.pid)
    branches = pf.goblins.fork_and_collect(
        "repl",
        [b"table[3]\n", b"table[99999] + 1\n", b"len(table)\n"],
        store,
        deadline=30,
    )
    assert [b.stdout for b in branches] == [b"9\n", b"9999800002\n", b"100000\n"]
    assert [b.returncode for b in branches] == [0, 0, 0]
    assert [b.clone for b in branches] == [1, 2, 3]
    assert not any(b.timed_out for b in branches)
    assert all(not alive(b.pid) for b in branches)


def test_live_fork_and_collect_kills_a_branch_that_overruns(live, store):
    # The whole line, newline included: the rest of it would otherwise wait in the pipe.
    warmed = pf.goblins.warm_up(REPL, store, ready=r"warm \d+\n", timeout=60, leave_running=True)
    assert warmed.goblin is not None
    with warmed.goblin as original:
        assert ask(original, "table[2]") == "4"
    branches = pf.goblins.fork_and_collect(
        warmed.snapshot,
        [b"table[4]\n", b"__import__('time').sleep(60)\n"],
        store,
        deadline=2,
    )
    assert branches[0].stdout == b"16\n" and not branches[0].timed_out
    assert branches[1].timed_out and branches[1].returncode == -9


# --- lazy thaw: memory served from the store on demand ------------------------------------------


def test_lazy_thaw_from_an_images_directory_is_refused(tmp_path):
    with pytest.raises(pf.InvalidArgument, match="store"):
        pf.goblins.load(tmp_path, lazy=True)


def test_live_lazy_fork_answers_diverges_and_gets_every_page(live, store, counter, monkeypatch):
    monkeypatch.setenv("PF_SNAPSHOT_FORMAT", "v2")
    pf.goblins.freeze(counter.pid, store, tag="lz")
    loaded = pf.goblins.load("lz", store, lazy=True)
    assert loaded.lazy
    assert repr(loaded) == f"<pf.goblins.Loaded {loaded.name} lazy=True>"
    copies = loaded.fork(2)
    try:
        assert [ask(c, f"x{i}") for i, c in enumerate(copies)] == ["2 x0", "2 x1"]
        for c in copies:
            assert c.wait_pages(timeout=60) is True
            assert c.pages_served > 0
        assert ask(copies[0], "y") == "3 y"
    finally:
        for c in copies:
            c.kill()
            c.close()


def test_live_a_lazy_load_whose_pages_a_gc_removed_thaws_nothing(
    live, store, counter, monkeypatch
):
    # Loaded lazily, then its name removed and a gc run: the packs are gone. A thaw used to
    # start the copy and kill it at its first page; now it refuses before anything runs.
    monkeypatch.setenv("PF_SNAPSHOT_FORMAT", "v2")
    pf.goblins.freeze(counter.pid, store, tag="gone")
    loaded = pf.goblins.load("gone", store, lazy=True)
    assert store.untag("gone")
    store.gc(grace=0)
    with pytest.raises(pf.NotFound, match="no longer all in the store") as raised:
        loaded.thaw()
    assert "nothing was restored" in str(raised.value)
    with pytest.raises(pf.NotFound):
        loaded.fork(2)


def test_live_lazy_thaw_of_a_v1_snapshot_says_it_needs_the_page_format(
    live, store, counter, monkeypatch
):
    monkeypatch.setenv("PF_SNAPSHOT_FORMAT", "v1")
    pf.goblins.freeze(counter.pid, store, tag="old")
    with pytest.raises(pf.InvalidArgument, match="PF_SNAPSHOT_FORMAT unset"):
        pf.goblins.thaw("old", store, lazy=True)


def test_help_of_thaw_fork_freeze_and_fork_and_collect_says_what_a_caller_must_know():
    g = pf.goblins
    for call in (g.thaw, g.fork, g.fork_and_collect, g.load, g.freeze):
        assert "pf.Store()" in call.__doc__, call.__name__
    for call in (g.thaw, g.fork):
        assert "dies with its" in call.__doc__ and "detach()" in call.__doc__, call.__name__
        assert "Ctrl-C" in call.__doc__, call.__name__
    assert "All or nothing" in g.fork.__doc__
    assert "all thawed or none" in g.fork_and_collect.__doc__
    for call, raised in [
        (g.thaw, ["NotFound", "InvalidSnapshot", "NotAGoblin", "CriuFailed", "TypeError"]),
        (g.fork, ["what ``thaw`` raises", "InvalidArgument"]),
        (g.fork_and_collect, ["NotFound", "CriuFailed", "InvalidArgument"]),
        (g.freeze, ["NoSuchProcess", "AccessDenied", "NotAGoblin", "CriuFailed", "TypeError"]),
    ]:
        for name in raised:
            assert name in call.__doc__, (call.__name__, name)
