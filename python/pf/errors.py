"""The exceptions pf raises: one class per thing a caller can act on.

Every one is a ``pf.errors.Error``; some are also the built-in exception a Python programmer
would catch for the same situation (``NotFound`` is a ``LookupError``, ``NeedsRoot`` and
``AccessDenied`` are ``PermissionError``s, ``Timeout`` a ``TimeoutError``, ``InvalidArgument``
a ``ValueError``).
The message is pf's whole error chain, the same text the ``pf`` command prints.

Every instance has ``criu_errors`` (CRIU's own ``Error (...)`` lines, for ``CriuFailed``; else
empty) and ``log`` (the path of the CRIU log pf kept, or ``None``).
"""

from typing import List, Optional


class Error(Exception):
    """Anything pf reports."""

    criu_errors: List[str]
    log: Optional[str]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.criu_errors = []
        self.log = None


class InvalidArgument(Error, ValueError):
    """An argument pf cannot use (a malformed digest or name, an empty command, n < 1 ...)."""


class Timeout(Error, TimeoutError):
    """A wait ran out of time (``Goblin.wait(timeout=)``), or a read did
    (``Goblin.readline(timeout=)``, ``read_until``: nothing it had read is lost); the goblin
    still runs."""


class NotFound(Error, LookupError):
    """No blob with that digest, or no such name, in the store."""


class StoreError(Error):
    """The store could not be read or written (permissions, a full disk ...)."""


class StoreCorrupt(StoreError):
    """A blob's bytes do not match its digest, or cannot be decoded: pf never returns them."""


class InvalidSnapshot(Error):
    """The blob is not a usable snapshot (not a procs record, hostile or broken images)."""


class NotAGoblin(Error):
    """The process or snapshot is not a goblin's (stdio not pipes, not a session leader,
    a plain process tree)."""


class NoSuchProcess(Error, ProcessLookupError):
    """The pid does not exist, or the process exited while it was being frozen."""


class AccessDenied(Error, PermissionError):
    """pf may not look into the process it was asked to freeze: it belongs to another user,
    holds privileges (capabilities) this process lacks (``freeze(1)`` in a container), or a
    security module forbids it. Nothing was frozen; the message says what to do."""


class SpawnFailed(Error, OSError):
    """The program could not be started."""


class CriuMissing(Error):
    """No usable criu on this machine; the message says how to get one
    (``cargo xtask install-criu`` in pf's source tree)."""


class NeedsRoot(CriuMissing, PermissionError):
    """criu is there but pf lacks the privileges to run it: run as root."""


class CriuFailed(Error):
    """CRIU itself failed; ``criu_errors`` holds its ``Error (...)`` lines and ``log`` the
    path of its full log. Both are empty when pf found the problem before CRIU ran (a file the
    snapshot needs is gone or changed: the message names it)."""


class NoSpace(StoreError):
    """Not enough room left (the store's disk, or tmpfs for a snapshot's images); the message
    says how much is needed and how much is free."""


class NotWarm(Error, TimeoutError):
    """``warm_up``: the goblin did not become ready within the timeout (or exited first); it
    was stopped and nothing was frozen."""


class Cancelled(Error):
    """The work was cancelled (a ``Cancel``, or Ctrl-C) before it was done; nothing was
    frozen and nothing is left running."""


class Traced(Error):
    """The process to freeze is traced by another one, so criu cannot seize it: another freeze
    of it is under way (its criu traces it), or a debugger holds it. Nothing was frozen and it
    runs on; try again once that freeze is done or the debugger detached. When criu ran and
    failed to seize it, ``criu_errors`` and ``log`` are criu's."""


class PidInUse(CriuFailed):
    """The snapshot's pid is taken on this machine; thaw into a new pid namespace (the
    default) instead."""


class RegistryError(Error):
    """A push or pull (``pf.registry``) failed at the registry's end; the message says what the
    registry answered. Nothing of a failed pull is kept in the store."""


class RegistryUnreachable(RegistryError, ConnectionError):
    """The registry could not be reached, or stopped moving bytes for longer than
    ``idle_timeout`` (the message names the blob)."""


class RegistryAuth(RegistryError, PermissionError):
    """The registry wants credentials, or refuses those given (from the docker config:
    ``docker login``, or ``docker_config=``)."""


class RegistryCorrupt(RegistryError):
    """Bytes from the registry do not match their digest, or the snapshot there is not whole:
    nothing of the pull was kept."""
