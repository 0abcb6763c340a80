"""Shared fixtures: a private store per test, and the live-test gate.

Live tests (named ``test_live_*``) freeze and thaw for real: they need root and a working CRIU
and run only with ``PF_HAS_CRIU=1``, as the Rust live tests do. Under ``CI`` a live test that
would skip fails instead, so CI never passes by skipping them.
"""

import os

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
