"""Shared fixtures: a private store per test, and the live-test gate.

The ``registry`` fixture is a real OCI registry (Debian's ``docker-registry``, the CNCF
distribution server) on a free loopback port with its own storage, stopped by its pid.

Live tests (named ``test_live_*``) freeze and thaw for real: they need root and a working CRIU
and run only with ``PF_HAS_CRIU=1``, as the Rust live tests do. Under ``CI`` a live test that
would skip fails instead, so CI never passes by skipping them.
"""

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

import pf


@pytest.fixture
def store(tmp_path):
    """An empty store of the test's own (an empty private directory is an empty store; a
    ``pf.Store`` whose path does not exist is no store at all until something is put in it)."""
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    return pf.Store(str(root))


@pytest.fixture
def live():
    """Gate a live test: run it with PF_HAS_CRIU=1, fail it under CI, skip it otherwise."""
    if os.environ.get("PF_HAS_CRIU") == "1":
        return
    if os.environ.get("CI"):
        pytest.fail("a live test would be skipped in CI: PF_HAS_CRIU is not 1")
    pytest.skip("live test: needs root and CRIU; run with PF_HAS_CRIU=1")


@pytest.fixture
def registry(tmp_path):
    """``HOST:PORT`` of a registry of the test's own (``$PF_DOCKER_REGISTRY``, else
    ``/usr/bin/docker-registry``): missing, the test fails under CI and skips otherwise."""
    binary = os.environ.get("PF_DOCKER_REGISTRY") or "/usr/bin/docker-registry"
    if not os.path.exists(binary):
        message = f"{binary} is missing: apt-get install -y docker-registry"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "registry-conf"
    conf.mkdir()
    (conf / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: pf-test-upload-secret\n"
    )
    log = open(conf / "registry.log", "wb")
    server = subprocess.Popen(
        [binary, "serve", str(conf / "config.yml")],
        cwd=conf,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        end = time.monotonic() + 20
        while True:
            if server.poll() is not None:
                pytest.fail(f"the registry exited ({server.returncode}) at start: "
                            f"{(conf / 'registry.log').read_text()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > end:
                    pytest.fail("the registry did not answer within 20 s")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()
        log.close()
