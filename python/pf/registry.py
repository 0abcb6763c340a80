"""Snapshots to and from OCI registries, as ``pf push`` and ``pf pull`` move them.

A snapshot travels as one OCI image manifest whose blobs are the store's own, under the same
digests: ``push`` uploads only the blobs the registry lacks (snapshots of one goblin share most
of their pages), ``pull`` fetches only those the store lacks, checks every byte against its
digest before it enters the store, and names the snapshot last. A pull that fails keeps nothing.

A reference is ``REGISTRY/REPOSITORY:TAG`` (``localhost:5000/team/repl:warm``). A loopback
registry is spoken to in plain http, any other in https (verified against the system's roots)
unless ``insecure=True``. Credentials come from the docker config (``$DOCKER_CONFIG``, else
``~/.docker/config.json``: ``docker login`` writes it), or ``docker_config=``; ``anonymous=True``
uses none. Both calls release the GIL; Ctrl-C cancels them (a pull takes back what it stored, a
push writes no tag and a rerun skips what the registry took) and raises ``KeyboardInterrupt``
once the transfer has wound down: at once while bytes move, at ``idle_timeout`` at the latest
while a registry that does not answer is waited for. A Ctrl-C that comes as the transfer
finishes raises too; what it did then stands (the snapshot pulled and named, or pushed).
"""

import os
from typing import NamedTuple, Optional, Union

from pf import _native
from pf._native import Store

__all__ = ["PullReport", "PushReport", "pull", "push"]


class PushReport(NamedTuple):
    """What ``push`` did: the snapshot's digest, the ``reference`` it now has, the registry's
    ``manifest_digest``, its ``blobs``, how many were ``uploaded`` and ``skipped`` (the
    registry had them), ``bytes_total``/``bytes_uploaded`` (raw bytes) and ``seconds``."""

    reference: str
    snapshot: str
    manifest_digest: Optional[str]
    blobs: int
    uploaded: int
    skipped: int
    bytes_total: int
    bytes_uploaded: int
    seconds: float


class PullReport(NamedTuple):
    """What ``pull`` did: the ``snapshot``'s digest (thaw it by that, or by ``name``), its
    ``blobs``, how many were ``fetched`` and ``skipped`` (the store had them),
    ``bytes_total``/``bytes_fetched``, ``pages_indexed`` (pages of pulled packs that later
    freezes can share) and ``seconds``."""

    reference: str
    snapshot: str
    name: Optional[str]
    blobs: int
    fetched: int
    skipped: int
    bytes_total: int
    bytes_fetched: int
    pages_indexed: int
    seconds: float


def _store(store: Optional[Store]) -> Store:
    if store is None:
        return Store()
    if not isinstance(store, Store):
        raise TypeError(f"store is a pf.Store, or None for pf.Store(), not {type(store).__name__}")
    return store


def _config(docker_config: Union[None, str, "os.PathLike[str]"]) -> Optional[str]:
    return None if docker_config is None else os.fspath(docker_config)


def push(
    snapshot: str,
    reference: str,
    store: Optional[Store] = None,
    *,
    insecure: bool = False,
    docker_config: Union[None, str, "os.PathLike[str]"] = None,
    anonymous: bool = False,
    parallel: int = 4,
    idle_timeout: float = 60.0,
) -> PushReport:
    """Push ``snapshot`` (a digest or name in ``store``; ``None``: ``pf.Store()``) to
    ``reference``: the blobs the registry lacks, then the manifest that tags it. Run again after
    a failure or a Ctrl-C, it skips what arrived (a blob cut off midway continues from where
    the registry has it).

    Raises ``NotFound`` (no such snapshot), ``InvalidArgument`` (a malformed reference, bad
    options), ``RegistryUnreachable``, ``RegistryAuth``, ``RegistryError``, ``StoreCorrupt``."""
    out = _native.push(
        _store(store),
        snapshot,
        reference,
        insecure=insecure,
        docker_config=_config(docker_config),
        anonymous=anonymous,
        parallel=parallel,
        idle_timeout=idle_timeout,
    )
    return PushReport(**out)


def pull(
    reference: str,
    store: Optional[Store] = None,
    *,
    tag: Optional[str] = None,
    insecure: bool = False,
    docker_config: Union[None, str, "os.PathLike[str]"] = None,
    anonymous: bool = False,
    parallel: int = 4,
    idle_timeout: float = 60.0,
) -> PullReport:
    """Pull the snapshot at ``reference`` into ``store`` (``None``: ``pf.Store()``; created if
    missing), naming it ``tag`` once it is whole: the blobs the store lacks, each checked
    against its digest before it is stored. Returns the snapshot's digest in the report.

    Raises ``NotFound`` (no such repository or tag), ``InvalidArgument``,
    ``RegistryUnreachable``, ``RegistryAuth``, ``RegistryCorrupt`` (bytes that do not match
    their digest: nothing of the pull is kept), ``RegistryError``, ``NoSpace``."""
    out = _native.pull(
        _store(store),
        reference,
        tag=tag,
        insecure=insecure,
        docker_config=_config(docker_config),
        anonymous=anonymous,
        parallel=parallel,
        idle_timeout=idle_timeout,
    )
    return PullReport(**out)
