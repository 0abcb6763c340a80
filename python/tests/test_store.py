"""pf.Store: blobs by digest, names, gc and verify, through the Rust store."""

import hashlib
import os

import pytest

import pf


def test_put_get_round_trip_named_by_sha256(store):
    data = b"hello, pf\n" * 1000
    digest = store.put(data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.get(digest) == data
    assert store.contains(digest)
    assert digest in store.blobs()


def test_put_file_streams_a_file(store, tmp_path):
    path = tmp_path / "big"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    digest = store.put_file(str(path))
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.get(digest) == data


def test_a_store_path_is_a_path_and_a_directory_of_other_things_is_no_store(tmp_path):
    import pathlib

    assert isinstance(pf.Store(str(tmp_path / "s")).path, pathlib.Path)
    project = tmp_path / "project"
    project.mkdir(mode=0o700)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(pf.InvalidArgument, match="is not a pf store: the directory holds notes.txt"):
        pf.Store(str(project))
    with pytest.raises(pf.InvalidArgument, match="the store's path is empty"):
        pf.Store("").put(b"x")
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]


def test_a_store_pickles_as_its_path(store):
    import pickle

    digest = store.put(b"across processes")
    again = pickle.loads(pickle.dumps(store))
    assert again.path == store.path
    assert again.get(digest) == b"across processes"


def test_names_point_at_blobs(store):
    digest = store.put(b"a")
    store.tag("first", digest)
    store.tag("second", "first")
    assert store.resolve("second") == digest
    assert store.names() == {"first": digest, "second": digest}
    assert store.untag("first") is True
    assert store.untag("first") is False
    assert store.names() == {"second": digest}


def test_unknown_digest_and_name_raise_not_found(store):
    missing = "sha256:" + "0" * 64
    with pytest.raises(pf.NotFound) as err:
        store.get(missing)
    assert isinstance(err.value, LookupError)
    assert missing in str(err.value)
    with pytest.raises(pf.NotFound, match="nope"):
        store.resolve("nope")
    assert store.contains("nope") is False


def test_a_unique_prefix_of_a_digest_resolves(store):
    digest = store.put(b"prefixed")
    hexd = digest.split(":")[1]
    assert store.resolve("sha256:" + hexd[:4]) == digest
    assert store.resolve(hexd[:8]) == digest
    assert store.resolve(hexd) == digest
    assert store.get(hexd[:10]) == b"prefixed"
    assert store.contains("sha256:" + hexd[:6]) is True
    store.tag("by-prefix", "sha256:" + hexd[:6])
    assert store.names()["by-prefix"] == digest
    # A name spelled like a prefix wins over it.
    other = store.put(b"other")
    store.tag(hexd[:8], other)
    assert store.resolve(hexd[:8]) == other
    missing = "0000" if not hexd.startswith("0000") else "ffff"
    assert store.contains("sha256:" + missing) is False
    with pytest.raises(pf.NotFound, match="no digest in the store starts with"):
        store.resolve("sha256:" + missing)
    with pytest.raises(pf.InvalidArgument, match="at least 4 hex digits"):
        store.resolve("sha256:" + hexd[:3])
    # Two blobs whose digests share 4 hex digits: the prefix is refused, naming both.
    seen = {}
    for i in range(100000):
        data = b"blob %d" % i
        head = hashlib.sha256(data).hexdigest()[:4]
        if head in seen:
            first, second = seen[head], data
            break
        seen[head] = data
    a, b = store.put(first), store.put(second)
    with pytest.raises(pf.InvalidArgument, match="is the start of 2 digests") as err:
        store.resolve("sha256:" + head)
    assert isinstance(err.value, ValueError)
    assert a[:19] in str(err.value) and b[:19] in str(err.value)


def test_bad_names_and_digests_are_invalid_arguments(store):
    digest = store.put(b"x")
    with pytest.raises(pf.InvalidArgument) as err:
        store.tag("has space", digest)
    assert isinstance(err.value, ValueError)
    with pytest.raises(pf.InvalidArgument):
        store.get("sha256:xyz")


def test_a_corrupt_blob_raises_and_verify_names_it(store, tmp_path):
    good = store.put(b"good bytes")
    bad = store.put(b"bytes that will rot")
    hexd = bad.split(":")[1]
    blob_file = tmp_path / "store" / "blobs" / "sha256" / hexd[:2] / (hexd + ".zst")
    assert blob_file.is_file()
    # A valid zstd frame of other bytes: decodes fine, hashes wrong.
    other = pf.Store(str(tmp_path / "other"))
    forged = other.put(b"other bytes entirely")
    fh = forged.split(":")[1]
    forged_file = tmp_path / "other" / "blobs" / "sha256" / fh[:2] / (fh + ".zst")
    os.chmod(blob_file, 0o600)
    blob_file.write_bytes(forged_file.read_bytes())
    with pytest.raises(pf.StoreCorrupt) as err:
        store.get(bad)
    assert bad in str(err.value)
    problems = store.verify()
    assert list(problems) == [bad]
    assert store.verify(good) == {}


def test_gc_removes_what_no_name_reaches(store):
    kept = store.put(b"kept")
    store.tag("keep", kept)
    dropped = store.put(b"dropped")
    dry = store.gc(grace=0, dry_run=True)
    assert dry["removed"] == [dropped] and dry["dry_run"] is True
    assert store.contains(dropped)
    report = store.gc(grace=0)
    assert report["removed"] == [dropped]
    assert report["freed_bytes"] > 0
    assert not store.contains(dropped)
    assert store.get("keep") == b"kept"
    with pytest.raises(pf.InvalidArgument):
        store.gc(grace=-1)


def test_default_store_follows_pf_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PF_STORE", str(tmp_path / "env-store"))
    store = pf.Store()
    assert store.path == str(tmp_path / "env-store") or str(store.path) == str(
        tmp_path / "env-store"
    )
    store.put(b"z")
    assert (tmp_path / "env-store" / "blobs").is_dir()


def test_a_store_that_is_not_there_is_not_created_by_reading_it(tmp_path):
    root = tmp_path / "typo"
    store = pf.Store(str(root))
    assert not root.exists() and store.exists is False
    digest = "sha256:" + "0" * 64
    readers = [
        lambda: store.names(),
        lambda: store.blobs(),
        lambda: store.get(digest),
        lambda: store.get("base"),
        lambda: store.contains(digest),
        lambda: store.resolve("base"),
        lambda: store.tag("base", digest),
        lambda: store.untag("base"),
        lambda: store.verify(),
        lambda: store.gc(),
    ]
    for read in readers:
        with pytest.raises(pf.NotFound, match=f"there is no store at {root}") as err:
            read()
        assert isinstance(err.value, LookupError)
    # Nor by a thaw, fork or load from it: it says the store is missing, not the name.
    for thaw in (pf.goblins.thaw, pf.goblins.load, lambda s, st: pf.goblins.fork(s, 2, st)):
        with pytest.raises(pf.NotFound, match=f"there is no store at {root}"):
            thaw("base", store)
    with pytest.raises(pf.NotFound, match=f"there is no store at {root}"):
        pf.goblins.fork_and_collect("base", [b"x"], store)
    with pytest.raises(pf.StoreError, match="no-such-file"):
        store.put_file(str(tmp_path / "no-such-file"))
    assert not root.exists()
    # A writer creates it, private, and readers then see it.
    first = store.put(b"first")
    assert store.exists is True
    assert (root.stat().st_mode & 0o777) == 0o700
    assert store.blobs() == [first]
    assert pf.Store(str(root)).contains(first)


def test_put_file_creates_a_store_that_is_not_there(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"data")
    store = pf.Store(str(tmp_path / "new"))
    digest = store.put_file(str(path))
    assert store.get(digest) == b"data"


def test_the_default_store_is_not_created_by_reading_it(tmp_path, monkeypatch):
    root = tmp_path / "default-store"
    monkeypatch.setenv("PF_STORE", str(root))
    assert pf.Store().exists is False
    with pytest.raises(pf.NotFound, match=f"there is no store at {root}"):
        pf.Store().names()
    with pytest.raises(pf.NotFound, match=f"there is no store at {root}"):
        pf.goblins.thaw("base")
    assert not root.exists()


def test_a_store_of_another_user_is_refused_when_made(tmp_path):
    root = tmp_path / "others"
    root.mkdir(mode=0o700)
    os.chown(root, 12345, 12345)
    with pytest.raises(pf.StoreError, match="belongs to"):
        pf.Store(str(root))
