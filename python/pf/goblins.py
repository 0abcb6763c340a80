"""Goblins: processes that talk only through stdin, stdout and stderr, frozen with CRIU and
thawed onto fresh pipes, once or many times.

    import pf, subprocess
    g = pf.goblins.spawn(["python3", "-u", "-i"])          # or any process you started
    digest = pf.goblins.freeze(g.pid, pf.Store(), tag="repl")  # leave_running=True by default
    with pf.goblins.thaw("repl") as copy:                   # a new process, fresh pipes
        copy.stdin.write(b"print(6 * 7)\\n")
        print(copy.stdout.readline())                       # b'42\\n'

A snapshot is named by a digest or a name in a store (``store=``, default ``pf.Store()``), or
is an images directory (a ``str`` or ``os.PathLike`` naming an existing directory, as made by
``freeze(pid, "/some/dir")``). Thawed copies run in their own pid and mount namespaces, so any
number of them, and the original, run at once.

A ``Goblin`` owns its process: leaving a ``with`` block, ``kill()``, or the handle being
garbage-collected kills it and reaps it (its whole process group, or its pid namespace when
thawed). Call ``detach()`` to leave it running instead.
"""

import asyncio
import os
import threading
from typing import IO, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from pf import _native, errors
from pf._native import Store

Snapshot = Union[str, "os.PathLike[str]"]

__all__ = [
    "AsyncGoblin",
    "Cancel",
    "Collected",
    "Goblin",
    "Loaded",
    "Warmed",
    "fork",
    "fork_and_collect",
    "fork_async",
    "freeze",
    "load",
    "spawn",
    "thaw",
    "thaw_async",
    "warm_up",
]

Cancel = _native.Cancel


def _is_images_dir(snapshot: Snapshot) -> bool:
    return isinstance(snapshot, os.PathLike) or os.path.isdir(snapshot)


def _not_a_missing_directory(snapshot: str) -> None:
    """No digest or name holds a slash: a snapshot that does is an images directory that is not
    there, and is said to be one (not an invalid name)."""
    if "/" in snapshot:
        raise errors.NotFound(
            f"there is no images directory {snapshot!r} (a snapshot in the store is named by a "
            "digest or a name, which holds no '/')"
        )


def _argv(argv: Sequence[str]) -> List[str]:
    """The command line as a list; one string is refused, not split into one-letter arguments."""
    if isinstance(argv, (str, bytes)):
        raise TypeError(
            f"argv is a list of arguments, not one string: {argv!r} "
            "(split it, e.g. with shlex.split)"
        )
    return [os.fsdecode(a) for a in argv]


class Goblin:
    """A running goblin: ``pid``, binary file objects ``stdin`` (unbuffered), ``stdout`` and
    ``stderr`` (buffered readers; ``stderr`` is ``None`` when it shares ``stdout``'s pipe), and
    ``returncode`` once it has exited (minus the signal number if a signal killed it), like
    ``subprocess.Popen``.

    Read ``stdout`` and ``stderr`` concurrently (or one on a thread) if the goblin may write a
    lot to both: a goblin blocked on a full stderr pipe never answers on stdout.
    """

    returncode: Optional[int]

    def __init__(self, native: "_native.NativeGoblin") -> None:
        self._native = native
        # The pipes become file objects when first used, so that a goblin whose pipes are
        # untouched can still be handed to ``warm_up`` (which reads them itself).
        self._pipes: Optional[Tuple[Optional[IO[bytes]], ...]] = None
        self._pipes_lock = threading.Lock()
        self._let_go = False  # detached, or handed to warm_up: leaving `with` leaves it be
        self.returncode = None

    def _files(self) -> Tuple[Optional[IO[bytes]], ...]:
        with self._pipes_lock:
            if self._pipes is None:
                fin, fout, ferr = self._native.take_fds()
                self._pipes = (
                    open(fin, "wb", buffering=0) if fin is not None else None,
                    open(fout, "rb") if fout is not None else None,
                    open(ferr, "rb") if ferr is not None else None,
                )
            return self._pipes

    @property
    def stdin(self) -> Optional[IO[bytes]]:
        """The goblin's stdin (unbuffered), or ``None``."""
        return self._files()[0]

    @property
    def stdout(self) -> Optional[IO[bytes]]:
        """The goblin's stdout (a buffered reader), or ``None``."""
        return self._files()[1]

    @property
    def stderr(self) -> Optional[IO[bytes]]:
        """The goblin's stderr (a buffered reader), or ``None`` when it shares stdout's pipe."""
        return self._files()[2]

    @property
    def pid(self) -> int:
        """The goblin's pid as seen from here (a thawed copy has another inside its namespace)."""
        return self._native.pid

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait until the goblin exits, reap it and return its returncode. With ``timeout``
        (seconds), raise ``pf.Timeout`` if it still runs then. Like ``Popen.wait``, this does not
        close stdin: close ``stdin`` first if the goblin waits for end of input."""
        self.returncode = self._native.wait(timeout)
        return self.returncode

    def poll(self) -> Optional[int]:
        """The returncode if the goblin has exited (reaping it), else ``None``."""
        code = self._native.poll()
        if code is not None:
            self.returncode = code
        return code

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the goblin's main process (an exited goblin is not an error)."""
        self._native.send_signal(int(signal))

    def terminate(self) -> None:
        """Send SIGTERM."""
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL the goblin (its process group, or its whole pid namespace when thawed), reap
        it and return its returncode. Killing an exited goblin is not an error."""
        self.returncode = self._native.kill()
        return self.returncode

    def wait_pages(self, timeout: Optional[float] = None) -> bool:
        """For a goblin thawed lazily (``lazy=True``): wait until every page of its memory is
        in and return ``True`` (``False`` if ``timeout`` seconds ran out first). From then on
        it needs nothing from this process. Raises if its memory could not be served (the
        goblin was killed then). Any other goblin returns ``True`` at once."""
        return self._native.wait_pages(timeout)

    @property
    def pages_served(self) -> int:
        """Pages of its memory served on demand so far (0 unless thawed lazily)."""
        return self._native.pages_served

    def detach(self) -> None:
        """Let the goblin run on after this handle is gone; pf will not kill or reap it. A
        goblin thawed lazily is detached once every page is in (this waits for that)."""
        self._files()  # its pipes stay ours
        self._native.detach()
        self._let_go = True

    def close(self) -> None:
        """Close our ends of the goblin's pipes."""
        for f in self._files():
            if f is not None:
                f.close()

    def __enter__(self) -> "Goblin":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if not self._let_go:
                self.kill()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<pf.Goblin pid={self.pid} returncode={self.returncode}>"


class Loaded:
    """A snapshot checked and ready to thaw or fork any number of times (``load``): the images
    are read (and, from a store, verified and extracted) once."""

    def __init__(self, native: "_native.NativeLoaded") -> None:
        self._native = native

    @property
    def name(self) -> str:
        """The digest or images directory it was loaded from."""
        return self._native.name

    @property
    def lazy(self) -> bool:
        """Whether its thaws serve memory on demand (``load(..., lazy=True)``)."""
        return self._native.lazy

    def __repr__(self) -> str:
        return f"<pf.goblins.Loaded {self.name} lazy={self.lazy}>"

    def thaw(self, *, new_pid_namespace: bool = True) -> Goblin:
        """Restore one copy on fresh pipes."""
        return Goblin(self._native.thaw(new_pid_namespace=new_pid_namespace))

    def fork(self, n: int) -> List[Goblin]:
        """Restore ``n`` copies side by side: all of them, or none and an error."""
        return [Goblin(g) for g in self._native.fork(n)]


class Warmed(NamedTuple):
    """What ``warm_up`` did: the ``snapshot`` (digest, or images directory), the goblin's
    ``pid``, seconds until it was ``warmup``-ready, all it printed on ``stdout`` and ``stderr``,
    its ``returncode`` when the freeze stopped it, how the ``drain`` after the freeze ended
    (``"complete"``, ``"held_open"`` with the holders' ``(pid, command)`` in ``held_by``,
    ``"cancelled"``, ``"left_running"``) and, with ``leave_running=True``, the running
    ``goblin``."""

    snapshot: str
    pid: int
    warmup: float
    stdout: bytes
    stderr: bytes
    returncode: Optional[int]
    drain: str
    held_by: List[Tuple[int, str]]
    goblin: Optional["Goblin"]


class Collected(NamedTuple):
    """One clone of ``fork_and_collect``: its number ``clone`` (from 1), ``pid``,
    ``returncode``, everything it wrote on ``stdout`` and ``stderr``, whether it overran the
    deadline and was killed (``timed_out``) and whether a cancel reached it."""

    clone: int
    pid: int
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    cancelled: bool


def warm_up(
    argv_or_goblin: Union[Sequence[str], "Goblin"],
    store_or_dir: Union[Store, Snapshot],
    *,
    input: bytes = b"",
    ready: Optional[str] = None,
    quiet: Optional[float] = None,
    timeout: float,
    leave_running: bool = False,
    tag: Optional[str] = None,
    drain: float = 2.0,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    cancel: Optional[Cancel] = None,
) -> Warmed:
    """Warm a goblin up and freeze it, in one call: start ``argv`` (or take a ``Goblin`` from
    ``spawn`` whose pipes are untouched: warm_up reads them), write ``input`` to its stdin
    (which then stays open), wait until its stdout matches the regex ``ready`` or it has been
    quiet for ``quiet`` seconds — at most ``timeout`` seconds, else ``pf.NotWarm`` — freeze it
    into ``store_or_dir`` (naming it ``tag``), then read what it printed for at most ``drain``
    seconds.

    Unlike ``freeze``, the goblin is stopped once frozen unless ``leave_running=True`` (it is
    then in ``Warmed.goblin``, its pipes ready). ``cancel.cancel()`` from another thread stops a
    warm-up that is still waiting (``pf.Cancelled``; Ctrl-C does the same and raises
    ``KeyboardInterrupt``); after the freeze, either ends the drain early and the result is
    returned (``drain == "cancelled"``).
    """
    kwargs = dict(
        input=bytes(input),
        ready=ready,
        quiet=quiet,
        timeout=timeout,
        leave_running=leave_running,
        tag=tag,
        drain=drain,
        cwd=os.fspath(cwd) if cwd is not None else os.getcwd(),
        env=list((env or {}).items()),
        cancel=cancel,
    )
    if isinstance(argv_or_goblin, Goblin):
        with argv_or_goblin._pipes_lock:
            if argv_or_goblin._pipes is not None:
                raise errors.InvalidArgument(
                    f"goblin {argv_or_goblin.pid}'s pipes are in use here (its stdin, stdout or "
                    "stderr was touched): warm_up reads them itself, so give it a goblin fresh "
                    "from spawn, or the command"
                )
            # Its pipes go to warm_up with it (and to Warmed.goblin with leave_running=True).
            argv_or_goblin._pipes = (None, None, None)
            argv_or_goblin._let_go = True
        kwargs["goblin"] = argv_or_goblin._native
    else:
        kwargs["argv"] = _argv(argv_or_goblin)
    if isinstance(store_or_dir, Store):
        kwargs["store"] = store_or_dir
    else:
        kwargs["images_dir"] = os.fspath(store_or_dir)
    out = _native.warm_up(**kwargs)
    native = out.pop("goblin")
    return Warmed(goblin=Goblin(native) if native is not None else None, **out)


def fork_and_collect(
    snapshot: Snapshot,
    inputs: Sequence[bytes],
    store: Optional[Store] = None,
    *,
    deadline: Optional[float] = None,
    cancel: Optional[Cancel] = None,
) -> List[Collected]:
    """Thaw one clone per input, give each its input and then end of input, and return what
    each printed and how it ended, in order. Each clone gets at most ``deadline`` seconds
    (``None``: no limit); one still running then is killed (``timed_out``). Ctrl-C (SIGINT
    passed on) or ``cancel.cancel()`` (SIGKILL) ends the clones and returns what they printed,
    each marked ``cancelled``. No clone is left
    running when this returns. The shape of an agent exploring N branches from one warm
    state::

        branches = pf.goblins.fork_and_collect("warm", [b"1+1\n", b"2+2\n"], deadline=10)
    """
    loaded = load(snapshot, store)
    clones = _native.fork_and_collect(
        loaded._native, [bytes(i) for i in inputs], deadline=deadline, cancel=cancel
    )
    return [Collected(**c) for c in clones]


def spawn(
    argv: Sequence[str],
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
) -> Goblin:
    """Start ``argv`` as a goblin: leader of its own session, stdin/stdout/stderr on fresh
    pipes, no other descriptor open. ``env`` entries are added to (or replace entries of) the
    inherited environment; ``cwd`` defaults to the current directory and must exist wherever
    the goblin is thawed later. Run Python with ``-u`` (line-by-line goblins must not
    block-buffer their output)."""
    return Goblin(
        _native.spawn(
            _argv(argv),
            os.fspath(cwd) if cwd is not None else os.getcwd(),
            list((env or {}).items()),
        )
    )


def freeze(
    pid: int,
    store_or_dir: Union[Store, Snapshot],
    leave_running: bool = True,
    tag: Optional[str] = None,
    *,
    shell_job: bool = False,
) -> str:
    """Checkpoint the goblin ``pid`` with CRIU into a ``pf.Store`` (naming it ``tag``) or into
    an images directory (created if missing, must be empty). Returns the snapshot's digest, or
    the directory.

    ``leave_running=True`` (as in pdum-criu) lets the goblin run on from the same state;
    ``False`` ends it once the dump is complete. The process must lead its own session
    (unless ``shell_job``) with its stdout on a pipe; its stdin and stderr may be pipes,
    ``/dev/null``, a file or closed, never a terminal, a socket or a named pipe
    (``subprocess.Popen(..., stdin=PIPE, stdout=PIPE, stderr=DEVNULL,
    start_new_session=True)`` will do)."""
    if isinstance(store_or_dir, Store):
        return _native.freeze(
            pid, store=store_or_dir, leave_running=leave_running, tag=tag, shell_job=shell_job
        )
    return _native.freeze(
        pid,
        images_dir=os.fspath(store_or_dir),
        leave_running=leave_running,
        tag=tag,
        shell_job=shell_job,
    )


def load(
    snapshot: Snapshot, store: Optional[Store] = None, *, lazy: Optional[bool] = None
) -> Loaded:
    """Check a snapshot and get it ready to thaw or fork many times.

    With ``lazy=True`` its thaws serve memory from the store on demand: each copy runs as soon
    as CRIU has rebuilt it, pages it touches come first (each checked against its digest), the
    rest follows in the background, and copies share one page cache. Only snapshots frozen in
    the page-level format (pf's default; not with ``PF_SNAPSHOT_FORMAT=v1``) in a store can be
    thawed lazily.
    ``lazy=False`` puts all memory in first. ``None`` (the default) is lazy for such snapshots
    holding 32 MiB or more, eager otherwise."""
    if _is_images_dir(snapshot):
        return Loaded(_native.load(images_dir=os.fspath(snapshot), lazy=lazy))
    _not_a_missing_directory(snapshot)
    return Loaded(
        _native.load(store=store if store is not None else Store(), reference=snapshot, lazy=lazy)
    )


def thaw(
    snapshot: Snapshot,
    store: Optional[Store] = None,
    *,
    new_pid_namespace: bool = True,
    lazy: Optional[bool] = None,
) -> Goblin:
    """Restore one copy of a frozen goblin on fresh pipes and return it running.

    ``new_pid_namespace=True`` (the default) runs it in its own pid and mount namespaces, beside
    the original and any other copy; ``False`` takes its old pid back on the host, which fails
    with ``pf.PidInUse`` while anything holds that pid. ``lazy=True``: see ``load`` (lazy thaws
    need a new pid namespace, so without one pf's choice is eager)."""
    if lazy is None and not new_pid_namespace:
        lazy = False
    if _is_images_dir(snapshot):
        return load(snapshot, store, lazy=lazy).thaw(new_pid_namespace=new_pid_namespace)
    _not_a_missing_directory(snapshot)
    # One thaw: an eager one streams the memory from the store into CRIU as it restores.
    native = _native.load(
        store=store if store is not None else Store(), reference=snapshot, lazy=lazy, once=True
    )
    return Loaded(native).thaw(new_pid_namespace=new_pid_namespace)


def fork(
    snapshot: Snapshot, n: int, store: Optional[Store] = None, *, lazy: Optional[bool] = None
) -> List[Goblin]:
    """Restore ``n`` copies of a frozen goblin side by side, each on its own pipes
    (``lazy=True``: see ``load``)."""
    return load(snapshot, store, lazy=lazy).fork(n)


class AsyncGoblin:
    """A goblin for asyncio: ``stdin`` is an ``asyncio.StreamWriter``, ``stdout`` and
    ``stderr`` are ``asyncio.StreamReader``s, and ``wait()`` is awaitable. Like ``Goblin``, it
    owns its process: ``kill()`` it, or use ``async with``."""

    stdin: Optional[asyncio.StreamWriter]
    stdout: Optional[asyncio.StreamReader]
    stderr: Optional[asyncio.StreamReader]
    returncode: Optional[int]

    def __init__(self) -> None:
        raise TypeError("AsyncGoblin comes from thaw_async / fork_async")

    @classmethod
    async def _wrap(cls, native: "_native.NativeGoblin") -> "AsyncGoblin":
        self = object.__new__(cls)
        self._native = native
        self.returncode = None
        loop = asyncio.get_running_loop()
        fin, fout, ferr = native.take_fds()

        async def reader(fd: Optional[int]) -> Optional[asyncio.StreamReader]:
            if fd is None:
                return None
            stream = asyncio.StreamReader()
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stream), open(fd, "rb", buffering=0)
            )
            return stream

        self.stdout = await reader(fout)
        self.stderr = await reader(ferr)
        self.stdin = None
        if fin is not None:
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, open(fin, "wb", buffering=0)
            )
            self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        return self

    @property
    def pid(self) -> int:
        """The goblin's pid as seen from here."""
        return self._native.pid

    async def wait(self) -> int:
        """Wait (without blocking the event loop) until the goblin exits; its returncode."""
        loop = asyncio.get_running_loop()
        self.returncode = await loop.run_in_executor(None, self._native.wait, None)
        return self.returncode

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the goblin's main process."""
        self._native.send_signal(int(signal))

    async def kill(self) -> int:
        """SIGKILL the goblin, reap it, return its returncode."""
        loop = asyncio.get_running_loop()
        self.returncode = await loop.run_in_executor(None, self._native.kill)
        if self.stdin is not None:
            self.stdin.close()
        return self.returncode

    async def __aenter__(self) -> "AsyncGoblin":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


async def thaw_async(
    snapshot: Snapshot, store: Optional[Store] = None, *, new_pid_namespace: bool = True
) -> AsyncGoblin:
    """``thaw`` for asyncio: the restore runs on a worker thread (the GIL released), and the
    goblin's pipes become asyncio streams."""
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, load, snapshot, store)
    native = await loop.run_in_executor(
        None, lambda: loaded._native.thaw(new_pid_namespace=new_pid_namespace)
    )
    return await AsyncGoblin._wrap(native)


async def fork_async(snapshot: Snapshot, n: int, store: Optional[Store] = None) -> List[AsyncGoblin]:
    """``fork`` for asyncio: ``n`` copies, each with asyncio streams."""
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, load, snapshot, store)
    natives = await loop.run_in_executor(None, loaded._native.fork, n)
    return [await AsyncGoblin._wrap(g) for g in natives]
