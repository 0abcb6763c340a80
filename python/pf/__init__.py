"""pf: freeze, store, thaw and fork live Linux processes with CRIU.

``pf.Store`` is pf's content-addressed store (the one the ``pf`` command uses, unless you pass a
path). ``pf.goblins`` freezes processes that talk only through stdin/stdout/stderr ("goblins")
and thaws or forks them onto fresh pipes. ``pf.registry`` pushes snapshots to OCI registries and
pulls them back. Errors are ``pf.errors.Error`` subclasses, re-exported
here (``pf.NotAGoblin``, ``pf.CriuFailed`` ...).

The engine is Rust (pf-core, pf-world-procs, pf-goblins); this package is a thin binding and
releases the GIL while it freezes, thaws or forks.
"""

from pf import errors, goblins, registry
from pf._native import Store, __version__
from pf.errors import (
    AccessDenied,
    Cancelled,
    CriuFailed,
    CriuMissing,
    Error,
    InvalidArgument,
    InvalidSnapshot,
    NeedsRoot,
    NoSpace,
    NoSuchProcess,
    NotAGoblin,
    NotFound,
    NotWarm,
    PidInUse,
    RegistryAuth,
    RegistryCorrupt,
    RegistryError,
    RegistryUnreachable,
    SpawnFailed,
    StoreCorrupt,
    StoreError,
    Timeout,
    Traced,
)
from pf.goblins import Goblin

__all__ = [
    "AccessDenied",
    "Cancelled",
    "CriuFailed",
    "CriuMissing",
    "Error",
    "Goblin",
    "InvalidArgument",
    "InvalidSnapshot",
    "NeedsRoot",
    "NoSpace",
    "NoSuchProcess",
    "NotAGoblin",
    "NotFound",
    "NotWarm",
    "PidInUse",
    "RegistryAuth",
    "RegistryCorrupt",
    "RegistryError",
    "RegistryUnreachable",
    "SpawnFailed",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "Timeout",
    "Traced",
    "__version__",
    "errors",
    "goblins",
    "registry",
]
