"""pf.registry: snapshots pushed to a real registry (the ``registry`` fixture) and pulled
back into other stores, and the errors a caller can act on."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import pf


def synthetic(store, seed):
    """A snapshot-shaped blob graph (a record naming an images blob and a page manifest naming
    a pack), as pf stores them: what push and pull move, without CRIU."""
    tar = store.put(os.urandom(200_000) + bytes([seed]))
    pack = store.put(os.urandom(3 << 20))
    pages = store.put(json.dumps({"kind": "pages.v1", "packs": [pack]}).encode())
    record = {"kind": "procs.criu.v2", "criu_dump": tar, "pages": pages, "pids": [seed]}
    return store.put(json.dumps(record).encode()), {tar, pack, pages}


def test_push_then_pull_moves_only_what_is_missing(store, registry, tmp_path):
    root, blobs = synthetic(store, 1)
    store.tag("warm", root)
    ref = f"{registry}/team/repl:one"
    first = pf.registry.push("warm", ref, store)
    assert isinstance(first, pf.registry.PushReport)
    assert (first.snapshot, first.blobs, first.uploaded, first.skipped) == (root, 4, 4, 0)
    assert first.bytes_uploaded == first.bytes_total > 3 << 20
    assert first.manifest_digest.startswith("sha256:")
    again = pf.registry.push(root, ref, store)
    assert (again.uploaded, again.skipped, again.bytes_uploaded) == (0, 4, 0)

    # Into a store that is not there yet: made, filled, named.
    other = pf.Store(str(tmp_path / "other"))
    pulled = pf.registry.pull(ref, other, tag="pulled")
    assert (pulled.snapshot, pulled.name, pulled.fetched, pulled.skipped) == (root, "pulled", 4, 0)
    assert other.resolve("pulled") == root
    assert set(other.blobs()) == blobs | {root}
    for digest in blobs:
        assert other.get(digest) == store.get(digest)
    assert pf.registry.pull(ref, other).fetched == 0


def test_what_cannot_be_pushed_or_pulled_raises_what_to_act_on(store, registry, tmp_path):
    root, _ = synthetic(store, 2)
    with pytest.raises(pf.InvalidArgument, match="invalid reference"):
        pf.registry.push(root, "no tag here", store)
    with pytest.raises(pf.NotFound):
        pf.registry.push("nothing-by-that-name", f"{registry}/a/b:c", store)
    with pytest.raises(pf.InvalidArgument, match="parallel"):
        pf.registry.push(root, f"{registry}/a/b:c", store, parallel=0)
    with pytest.raises(TypeError, match="store is a pf.Store"):
        pf.registry.pull(f"{registry}/a/b:c", str(tmp_path))
    # Nothing there: a NotFound, and the store the pull would have made is not left behind.
    fresh = tmp_path / "fresh"
    with pytest.raises(pf.NotFound):
        pf.registry.pull(f"{registry}/a/b:missing", pf.Store(str(fresh)))
    assert not fresh.exists()
    # No registry at that port.
    target = pf.Store(str(fresh))
    with socket_free_port() as port:
        with pytest.raises(pf.RegistryUnreachable, match="cannot reach the registry") as err:
            pf.registry.pull(f"127.0.0.1:{port}/a/b:c", target)
    assert isinstance(err.value, ConnectionError)
    assert not fresh.exists()
    # The same Store, after its failed pulls: still no store there, and a good pull makes it.
    assert not target.exists
    ref = f"{registry}/a/b:there"
    pf.registry.push(root, ref, store)
    assert pf.registry.pull(ref, target, tag="there").snapshot == root
    assert target.exists and target.resolve("there") == root


def test_ctrl_c_stops_a_pull_and_keeps_nothing(tmp_path):
    # A registry that takes the connection and never answers: the pull waits; Ctrl-C raises
    # KeyboardInterrupt once the transfer winds down (here at its 3 s idle timeout).
    script = tmp_path / "pull.py"
    script.write_text(
        "import socket, sys, pf\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(8)\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    pf.registry.pull(f'127.0.0.1:{srv.getsockname()[1]}/a/b:c', pf.Store(sys.argv[1]),\n"
        "                     idle_timeout=3)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    fresh = tmp_path / "fresh"
    child = subprocess.Popen(
        [sys.executable, str(script), str(fresh)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout.readline() == b"ready\n"
        time.sleep(0.5)
        started = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
        assert out == b"interrupted\n", err
        assert time.monotonic() - started < 15
        assert not fresh.exists()
    finally:
        child.kill()
        child.wait()


class socket_free_port:
    """A loopback port nothing listens on (bound and closed: free for the test's moment)."""

    def __enter__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_live_a_goblin_pushed_and_pulled_thaws_elsewhere(live, store, registry, tmp_path):
    counter = [
        sys.executable,
        "-u",
        "-c",
        "import sys\nn = 41\nprint('ready', flush=True)\n"
        "for line in sys.stdin:\n    n += 1\n    print(n, flush=True)\n",
    ]
    warmed = pf.goblins.warm_up(counter, store, ready="ready", timeout=30, tag="c")
    ref = f"{registry}/agents/counter:v1"
    pushed = pf.registry.push("c", ref, store)
    assert pushed.snapshot == warmed.snapshot
    elsewhere = pf.Store(str(tmp_path / "elsewhere"))
    pulled = pf.registry.pull(ref, elsewhere, tag="c")
    assert pulled.snapshot == warmed.snapshot
    for lazy in (False, True):
        with pf.goblins.thaw("c", elsewhere, lazy=lazy) as copy:
            copy.stdin.write(b"x\n")
            assert copy.readline(timeout=30) == b"42\n"
