"""Goblins: processes that talk only through stdin, stdout and stderr, frozen with CRIU and
thawed onto fresh pipes, once or many times.

    import pf, subprocess
    g = pf.goblins.spawn(["python3", "-u", "-i"])          # or any process you started
    digest = pf.goblins.freeze(g.pid, pf.Store(), tag="repl")  # leave_running=True by default
    with pf.goblins.thaw("repl") as copy:                   # a new process, fresh pipes
        copy.stdin.write(b"print(6 * 7)\\n")
        print(copy.stdout.readline())                       # b'42\\n'

A snapshot is named by a digest, a unique prefix of one (``"sha256:3f2a9c"``, at least 4 hex
digits; or at least 8 hex digits alone, unless a name is spelled so) or a name in a store
(``store=``, default ``pf.Store()``), or is an images directory (a ``str`` or ``os.PathLike`` naming an existing directory, as made by
``freeze(pid, "/some/dir")``). Thawed copies run in their own pid and mount namespaces, so any
number of them, and the original, run at once.

A ``Goblin`` owns its process: leaving a ``with`` block, ``kill()``, or the handle being
garbage-collected kills it and reaps it (its whole process group, or its pid namespace when
thawed). Call ``detach()`` to leave it running instead.
"""

import asyncio
import io
import math
import os
import select
import threading
import time
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from pf._native import NativeGoblin

from pf import _native, errors
from pf._native import Store

Snapshot = Union[str, os.PathLike[str]]

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


def _images_dir(snapshot: object) -> Optional[str]:
    """The images directory ``snapshot`` is, or ``None`` when it names a snapshot in the store;
    what cannot be a snapshot at all is a ``TypeError`` that says what can."""
    if isinstance(snapshot, os.PathLike):
        return os.fsdecode(snapshot)
    if not isinstance(snapshot, str):
        if isinstance(snapshot, Loaded):
            hint = " (a Loaded snapshot thaws with its own thaw() and fork(n))"
        elif isinstance(snapshot, bytes):
            hint = " (decode it first)"
        else:
            hint = ""
        raise TypeError(
            "a snapshot is a digest ('sha256:...') or a name in the store, as a str, or an "
            "images directory (a str path or an os.PathLike such as pathlib.Path), not "
            f"{type(snapshot).__name__}: {snapshot!r}{hint}"
        )
    # A directory is an images directory when it holds one's goblin.json: a bare name that is
    # also some other directory here (a project's "warm/") still names a snapshot in the store.
    if os.path.isdir(snapshot) and (
        "/" in snapshot or os.path.exists(os.path.join(snapshot, "goblin.json"))
    ):
        return snapshot
    # No digest or name holds a slash: a snapshot that does is an images directory that is not
    # there, and is said to be one (not an invalid name).
    if "/" in snapshot:
        raise errors.NotFound(
            f"there is no images directory {snapshot!r} (a snapshot in the store is named by a "
            "digest or a name, which holds no '/')"
        )
    return None


def _bytes(value: object, what: str) -> bytes:
    """``value`` as bytes, if it is bytes-like (bytes, bytearray, memoryview): an int (which
    ``bytes()`` would turn into that many NUL bytes) or a str is a ``TypeError`` that says so."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    hint = " (encode it first, e.g. text.encode())" if isinstance(value, str) else ""
    raise TypeError(f"{what} is bytes, not {type(value).__name__}: {value!r:.60}{hint}")


def _store(store: object) -> Store:
    """The store a snapshot is read from: ``store``, or the default one for ``None``."""
    if store is None:
        return Store()
    if isinstance(store, Store):
        return store
    hint = (
        f" (pf.Store({store!r}) is the store at that path)"
        if isinstance(store, (str, os.PathLike))
        else ""
    )
    raise TypeError(
        "store is a pf.Store, or None for the store the pf command uses, not "
        f"{type(store).__name__}: {store!r}{hint}"
    )


def _store_or_dir(store_or_dir: object) -> Union[Store, str]:
    """Where a freeze goes: a ``pf.Store``, or an images directory's path."""
    if isinstance(store_or_dir, Store):
        return store_or_dir
    if isinstance(store_or_dir, (str, os.PathLike)):
        return os.fsdecode(store_or_dir)
    raise TypeError(
        "a freeze goes into a pf.Store (pf.Store() is the store the pf command uses) or an "
        "images directory (a str path or an os.PathLike), not "
        f"{type(store_or_dir).__name__}: {store_or_dir!r}"
    )


def _argv(argv: Sequence[str]) -> List[str]:
    """The command line as a list; one string is refused, not split into one-letter arguments."""
    if isinstance(argv, (str, bytes)):
        raise TypeError(
            f"argv is a list of arguments, not one string: {argv!r} "
            "(split it, e.g. with shlex.split)"
        )
    return [os.fsdecode(a) for a in argv]


def _deadline(timeout: Optional[float]) -> Optional[float]:
    """The ``time.monotonic()`` at which ``timeout`` seconds from now run out (``None``: never)."""
    if timeout is None:
        return None
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
        raise errors.InvalidArgument(f"timeout must be a number of seconds >= 0, not {timeout!r}")
    return time.monotonic() + timeout


def _marker(marker: bytes) -> bytes:
    if not isinstance(marker, (bytes, bytearray, memoryview)):
        raise TypeError(f"the marker is bytes (e.g. b'> '), not {type(marker).__name__}")
    if not marker:
        raise errors.InvalidArgument("the marker to read up to is empty")
    return bytes(marker)


class _Pipe(io.FileIO):
    """Our end of a goblin's stdout or stderr, under the ``BufferedReader`` the goblin's
    ``stdout``/``stderr`` is: a ``FileIO`` whose reads can be given a deadline (by
    ``Goblin.read_until``, in its own thread only), and that returns first the bytes such a read
    took from the buffer but gave back (an unfinished line when its time ran out), so that they
    reach the next reader, in order."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "rb")
        self._held = bytearray()
        self._timed = threading.local()  # .deadline while a timed read waits; .ran_out after

    def readinto(self, buffer: "WriteableBuffer") -> Optional[int]:
        if self._held:
            view = memoryview(buffer).cast("B")
            n = min(len(view), len(self._held))
            view[:n] = self._held[:n]
            del self._held[:n]
            return n
        deadline = getattr(self._timed, "deadline", None)
        if deadline is not None:
            poller = select.poll()
            poller.register(self.fileno(), select.POLLIN)
            wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if not poller.poll(wait_ms):  # readable, at end of input, or gone: read it
                self._timed.ran_out = True
                return None  # "would block": the BufferedReader's peek returns b""
        return super().readinto(buffer)

    def readall(self) -> bytes:
        held = bytes(self._held)
        self._held.clear()
        return held + super().readall()

    def read(self, size: Optional[int] = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buffer = bytearray(size)
        # None ("would block") only comes back to a timed read's peek, never here.
        n = self.readinto(buffer) or 0
        return bytes(buffer[:n])

    def peek_until(self, reader: "io.BufferedReader", deadline: Optional[float]) -> bytes:
        """``reader.peek()``: what it holds, or else what one read brings (``b""`` at end of
        input), waiting at most until ``deadline``; ``Timeout`` when that ran out first."""
        self._timed.deadline = deadline
        self._timed.ran_out = False
        try:
            chunk = reader.peek()
        finally:
            self._timed.deadline = None
        if self._timed.ran_out:
            raise _RanOut()
        return chunk

    def give_back(self, data: bytes) -> None:
        """Put ``data`` (taken from the buffer above, now empty) back in front of the pipe."""
        self._held[:0] = data


class _RanOut(Exception):
    """A timed read's deadline passed (turned into ``pf.Timeout`` with what it was waiting for)."""


def _read_until(
    reader: "io.BufferedReader", marker: bytes, deadline: Optional[float]
) -> Tuple[bytes, bool]:
    """Read up to and including ``marker``, or to end of input; ``(bytes, True)`` when the
    deadline passed first, everything taken given back to the stream."""
    raw = reader.raw
    assert isinstance(raw, _Pipe)
    taken = bytearray()
    try:
        while True:
            chunk = raw.peek_until(reader, deadline)
            if not chunk:
                return bytes(taken), False  # end of input
            # The marker may begin in the tail of what was taken before.
            start = max(0, len(taken) - len(marker) + 1)
            at = (bytes(taken[start:]) + chunk).find(marker)
            if at >= 0:
                taken += reader.read(start + at + len(marker) - len(taken))
                return bytes(taken), False
            taken += reader.read(len(chunk))  # all it holds: the next peek reads the pipe
    except _RanOut:
        raw.give_back(bytes(taken))
        return bytes(taken), True
    except BaseException:  # Ctrl-C while waiting, a closed pipe: nothing taken is lost either
        raw.give_back(bytes(taken))
        raise


class Goblin:
    """A running goblin: ``pid``, binary file objects ``stdin`` (unbuffered), ``stdout`` and
    ``stderr`` (buffered readers; ``stderr`` is ``None`` when it shares ``stdout``'s pipe), and
    ``returncode`` once it has exited (minus the signal number if a signal killed it), like
    ``subprocess.Popen``.

    ``readline(timeout=)`` and ``read_until(marker, timeout=)`` read an answer with a deadline
    (``pf.Timeout`` when none came, nothing lost), through the same buffer as ``stdout``.

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
        self._handed = False  # handed to warm_up, its pipes with it
        self.returncode = None

    def _files(self) -> Tuple[Optional[IO[bytes]], ...]:
        with self._pipes_lock:
            if self._handed:
                raise errors.InvalidArgument(
                    f"goblin {self.pid} was handed to warm_up, and its pipes with it: use the "
                    "goblin warm_up returns (Warmed.goblin, with leave_running=True)"
                )
            if self._pipes is None:
                fin, fout, ferr = self._native.take_fds()
                self._pipes = (
                    open(fin, "wb", buffering=0) if fin is not None else None,
                    io.BufferedReader(_Pipe(fout)) if fout is not None else None,
                    io.BufferedReader(_Pipe(ferr)) if ferr is not None else None,
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

    def readline(self, timeout: Optional[float] = None, *, stream: str = "stdout") -> bytes:
        """Read one line from the goblin's stdout (``stream="stderr"``: its stderr), waiting at
        most ``timeout`` seconds (``None``: as long as it takes; ``0``: only what is there now).

        Returns the line with its ``b"\\n"``. If the goblin closes the stream first (it
        exited), returns what was left, without ``b"\\n"``, and ``b""`` once nothing is left,
        as ``file.readline`` does. If the time runs out first, raises ``pf.Timeout`` (also a
        ``TimeoutError``) and loses nothing: an unfinished line stays in the stream for the
        next read. A goblin that hangs or never answers costs you ``timeout``, not your agent.

        This reads through the same buffer as ``stdout``: ``readline``, ``read_until`` and
        ``stdout.readline()``/``read()``/iteration can be mixed freely, each going on where
        the other stopped (not from two threads at once). ``select()`` on
        ``stdout.fileno()`` does not see bytes already buffered; use ``readline(timeout=)``
        instead."""
        return self.read_until(b"\n", timeout, stream=stream)

    def read_until(
        self, marker: bytes, timeout: Optional[float] = None, *, stream: str = "stdout"
    ) -> bytes:
        """Read from the goblin's stdout (or ``stream="stderr"``) up to and including
        ``marker`` (say a prompt, ``b">>> "``), waiting at most ``timeout`` seconds; what
        ``readline`` is for ``b"\\n"``, with the same rules: what was left at end of input
        (not ending with ``marker``) once the goblin closed the stream, ``pf.Timeout`` with
        nothing lost when the time runs out first."""
        marker = _marker(marker)
        deadline = _deadline(timeout)
        reader = self._reader(stream)
        data, ran_out = _read_until(reader, marker, deadline)
        if ran_out:
            waiting = "full line" if marker == b"\n" else f"{marker!r}"
            kept = (
                f" ({len(data)} byte{'' if len(data) == 1 else 's'} it wrote before that "
                f"{'is' if len(data) == 1 else 'are'} kept for the next read)"
                if data
                else ""
            )
            raise errors.Timeout(
                f"goblin {self.pid} wrote no {waiting} on its {stream} within {timeout:g} s"
                f"{kept}; its {stream} is still open (the goblin runs, or something it started "
                "holds the pipe): read again to wait longer, or kill() it"
            )
        return data

    def _reader(self, stream: str) -> "io.BufferedReader":
        """The goblin's stdout or stderr as the buffered reader ``readline`` reads."""
        if stream not in ("stdout", "stderr"):
            raise errors.InvalidArgument(f'stream is "stdout" or "stderr", not {stream!r}')
        reader = self.stdout if stream == "stdout" else self.stderr
        if reader is None:
            raise errors.InvalidArgument(
                f"goblin {self.pid} has no {stream} of its own here"
                + (" (it shares stdout's pipe: read stdout)" if stream == "stderr" else "")
            )
        if reader.closed:
            raise errors.InvalidArgument(f"goblin {self.pid}'s {stream} was closed here")
        assert isinstance(reader, io.BufferedReader)
        return reader

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait until the goblin exits, reap it and return its returncode. With ``timeout``
        (seconds), raise ``pf.Timeout`` if it still runs then. Like ``Popen.wait``, this does not
        close stdin: close ``stdin`` first if the goblin waits for end of input."""
        self.returncode = self._native.wait(timeout)
        return self.returncode

    def poll(self) -> Optional[int]:
        """The returncode if the goblin has exited (reaping it), else ``None``. After
        ``detach()`` (or once handed to ``warm_up``) pf no longer knows: ``InvalidArgument``,
        as for ``wait`` and ``kill``."""
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
        """Close our ends of the goblin's pipes (a goblin handed to ``warm_up`` has none)."""
        if self._handed:
            return
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
    target = _store_or_dir(store_or_dir)  # before a goblin is handed over
    kwargs: Dict[str, Any] = dict(
        input=_bytes(input, "input"),
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
            argv_or_goblin._handed = True
            argv_or_goblin._let_go = True
        kwargs["goblin"] = argv_or_goblin._native
    else:
        kwargs["argv"] = _argv(argv_or_goblin)
    if isinstance(target, Store):
        kwargs["store"] = target
    else:
        kwargs["images_dir"] = target
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
    each printed and how it ended, in order. The shape of an agent exploring N branches from
    one warm state::

        branches = pf.goblins.fork_and_collect("warm", [b"1+1\n", b"2+2\n"], deadline=10)

    ``snapshot`` is a digest or name in ``store`` (``None``: ``pf.Store()``, the store the
    ``pf`` command uses), or an images directory. Each clone gets at most ``deadline`` seconds
    (``None``: no limit); one still running then is killed (``timed_out``). Ctrl-C (SIGINT
    passed on) or ``cancel.cancel()`` (SIGKILL) ends the clones and returns what they
    printed, each marked ``cancelled``. No clone is left running when this returns, whatever
    happens: the clones are all thawed or none is (a failed thaw kills those already made).

    Raises what ``fork`` raises (``NotFound``, ``InvalidSnapshot``, ``NotAGoblin``,
    ``CriuFailed``, ``CriuMissing``/``NeedsRoot``, ``StoreCorrupt``, ``NoSpace``), and
    ``InvalidArgument`` for no inputs or a negative deadline. A clone that fails or exits
    early is not an error: its ``returncode`` and output say so."""
    given = [_bytes(i, f"inputs[{k}]") for k, i in enumerate(inputs)]
    loaded = load(snapshot, store)
    clones = _native.fork_and_collect(
        loaded._native,
        given,
        deadline=deadline,
        cancel=cancel,
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
    pid: Union[int, "Goblin", "AsyncGoblin"],
    store_or_dir: Union[Store, Snapshot],
    leave_running: bool = True,
    tag: Optional[str] = None,
    *,
    shell_job: bool = False,
) -> str:
    """Checkpoint the goblin ``pid`` (or a ``Goblin``) with CRIU into a ``pf.Store`` (naming it ``tag``) or into
    an images directory (created if missing, must be empty). Returns the snapshot's digest, or
    the directory. A store that is not there yet is created (``pf.Store()`` is the store the
    ``pf`` command uses). Snapshots of one goblin share their unchanged pages in the store.

    ``leave_running=True`` (as in pdum-criu) lets the goblin run on from the same state;
    ``False`` ends it once the dump is complete. The process must lead its own session
    (unless ``shell_job``) with its stdout on a pipe; its stdin and stderr may be pipes,
    ``/dev/null``, a file or closed, never a terminal, a socket or a named pipe
    (``subprocess.Popen(..., stdin=PIPE, stdout=PIPE, stderr=DEVNULL,
    start_new_session=True)`` or ``spawn`` will do). A thawed copy freezes the same way.

    Needs root and a working CRIU. A freeze runs to its end before a Ctrl-C takes effect
    (with ``tag``, the snapshot is stored and named when ``KeyboardInterrupt`` arrives).

    Raises ``NoSuchProcess`` (no such pid, or it exited meanwhile), ``AccessDenied`` (a
    process this one may not look into), ``NotAGoblin`` (stdio a terminal or socket, stdout
    not a pipe, not a session leader, a container's process), ``CriuFailed`` (with CRIU's own
    lines), ``CriuMissing``/``NeedsRoot``, ``NoSpace``, ``StoreError``, ``InvalidArgument``
    (a bad ``tag``, a non-empty images directory, ``tag`` with a directory) and
    ``TypeError`` for a ``store_or_dir`` that is neither."""
    if isinstance(pid, (Goblin, AsyncGoblin)):
        pid = pid.pid
    target = _store_or_dir(store_or_dir)
    if isinstance(target, Store):
        return _native.freeze(
            pid, store=target, leave_running=leave_running, tag=tag, shell_job=shell_job
        )
    return _native.freeze(
        pid,
        images_dir=target,
        leave_running=leave_running,
        tag=tag,
        shell_job=shell_job,
    )


def load(
    snapshot: Snapshot, store: Optional[Store] = None, *, lazy: Optional[bool] = None
) -> Loaded:
    """Check a snapshot and get it ready to thaw or fork many times: a digest or name in
    ``store`` (``None``: ``pf.Store()``, the store the ``pf`` command uses), or an images
    directory. Raises as ``thaw`` does when the snapshot is missing or unusable.

    With ``lazy=True`` its thaws serve memory from the store on demand: each copy runs as soon
    as CRIU has rebuilt it, pages it touches come first (each checked against its digest), the
    rest follows in the background, and copies share one page cache. Only snapshots frozen in
    the page-level format (pf's default; not with ``PF_SNAPSHOT_FORMAT=v1``) in a store can be
    thawed lazily.
    ``lazy=False`` puts all memory in first. ``None`` (the default) is lazy for such snapshots
    holding 32 MiB or more, eager otherwise."""
    source = _store(store)  # checked even when the snapshot is an images directory
    images = _images_dir(snapshot)
    if images is not None:
        return Loaded(_native.load(images_dir=images, lazy=lazy))
    return Loaded(_native.load(store=source, reference=str(snapshot), lazy=lazy))


def thaw(
    snapshot: Snapshot,
    store: Optional[Store] = None,
    *,
    new_pid_namespace: bool = True,
    lazy: Optional[bool] = None,
) -> Goblin:
    """Restore one copy of a frozen goblin on fresh pipes and return it running, as a
    ``Goblin`` (its ``stdin``, ``stdout``, ``readline(timeout=)`` ...).

    ``snapshot`` is a digest or name in ``store`` (``None``: ``pf.Store()``, the store the
    ``pf`` command uses: ``$PF_STORE``, else ``$XDG_DATA_HOME/pf``, else
    ``~/.local/share/pf``), or an images directory (a path to an existing directory, or an
    ``os.PathLike``).

    The copy dies with its handle: leaving ``with``, ``kill()``, the ``Goblin`` being
    garbage-collected, or this Python process ending (even by SIGKILL) kills it; ``detach()``
    leaves it running instead. ``new_pid_namespace=True`` (the default) runs it in its own pid
    and mount namespaces, beside the original and any other copy; ``False`` takes its old pid
    back on the host, which fails with ``pf.PidInUse`` while anything holds that pid.
    ``lazy=True``: see ``load`` (lazy thaws need a new pid namespace, so without one pf's
    choice is eager). Needs root and a working CRIU; the thaw runs to its end before a Ctrl-C
    takes effect (the copy is then killed).

    Raises ``NotFound`` (no such digest or name, no store at the path, no such images
    directory), ``InvalidSnapshot`` (not a snapshot, or broken images), ``NotAGoblin`` (a
    snapshot of a plain process tree), ``StoreCorrupt`` (its bytes do not match their
    digest: nothing runs on them), ``CriuFailed`` (with CRIU's own lines; ``PidInUse``),
    ``CriuMissing``/``NeedsRoot``, ``NoSpace`` and ``TypeError`` for what cannot be a
    snapshot or a store. Nothing is left running when it raises."""
    if lazy is None and not new_pid_namespace:
        lazy = False
    source = _store(store)
    if _images_dir(snapshot) is not None:
        return load(snapshot, store, lazy=lazy).thaw(new_pid_namespace=new_pid_namespace)
    # One thaw: an eager one streams the memory from the store into CRIU as it restores.
    native = _native.load(store=source, reference=str(snapshot), lazy=lazy, once=True)
    return Loaded(native).thaw(new_pid_namespace=new_pid_namespace)


def fork(
    snapshot: Snapshot, n: int, store: Optional[Store] = None, *, lazy: Optional[bool] = None
) -> List[Goblin]:
    """Restore ``n`` copies of a frozen goblin side by side, each in its own pid and mount
    namespaces on its own pipes, and return them running. The snapshot is read (and checked)
    once; ``snapshot``, ``store`` (``None``: ``pf.Store()``, the store the ``pf`` command uses)
    and ``lazy`` are as for ``thaw`` and ``load``.

    All or nothing: either all ``n`` copies are returned running, or none is left running
    and the first error is raised. Each copy dies with its ``Goblin`` handle, as a thawed one
    does (leaving ``with``, ``kill()``, garbage collection, this process ending): keep the
    list, or ``detach()`` those that must outlive it. The fork runs to its end before a
    Ctrl-C takes effect (the copies are then killed).

    Raises what ``thaw`` raises, and ``InvalidArgument`` for ``n < 1``. To give each copy an
    input and collect what it printed with a deadline, see ``fork_and_collect``."""
    return load(snapshot, store, lazy=lazy).fork(n)


class AsyncGoblin:
    """A goblin for asyncio: ``stdin`` is an ``asyncio.StreamWriter``, ``stdout`` and
    ``stderr`` are ``asyncio.StreamReader``s, and ``wait()`` is awaitable; ``await
    readline(timeout=)`` and ``read_until(marker, timeout=)`` read with a deadline, as
    ``Goblin``'s do. Like ``Goblin``, it owns its process: ``kill()`` it, or use ``async
    with``."""

    _native: "NativeGoblin"
    stdin: Optional[asyncio.StreamWriter]
    stdout: Optional[asyncio.StreamReader]
    stderr: Optional[asyncio.StreamReader]
    returncode: Optional[int]
    _let_go: bool

    def __init__(self) -> None:
        raise TypeError("AsyncGoblin comes from thaw_async / fork_async")

    @classmethod
    async def _wrap(cls, native: "NativeGoblin") -> "AsyncGoblin":
        self = object.__new__(cls)
        self._native = native
        self.returncode = None
        self._let_go = False  # detached: leaving `async with` leaves it be
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

    async def readline(self, timeout: Optional[float] = None, *, stream: str = "stdout") -> bytes:
        """``Goblin.readline`` for asyncio: one line from ``stdout`` (or ``stream="stderr"``)
        within ``timeout`` seconds, else ``pf.Timeout`` with nothing lost (the unfinished line
        stays in the ``StreamReader``); what was left (``b""`` when nothing) once the goblin
        closed the stream. The same as ``asyncio.wait_for(stdout.readline(), timeout)`` with
        pf's error. A line longer than the reader's limit (64 KiB) raises
        ``asyncio.LimitOverrunError``, its bytes left in the reader."""
        return await self.read_until(b"\n", timeout, stream=stream)

    async def read_until(
        self, marker: bytes, timeout: Optional[float] = None, *, stream: str = "stdout"
    ) -> bytes:
        """``Goblin.read_until`` for asyncio: up to and including ``marker`` within ``timeout``
        seconds (``StreamReader.readuntil``), else ``pf.Timeout`` with nothing lost; what was
        left once the goblin closed the stream."""
        marker = _marker(marker)
        _deadline(timeout)  # checks it
        if stream not in ("stdout", "stderr"):
            raise errors.InvalidArgument(f'stream is "stdout" or "stderr", not {stream!r}')
        reader = self.stdout if stream == "stdout" else self.stderr
        if reader is None:
            raise errors.InvalidArgument(f"goblin {self.pid} has no {stream} of its own here")
        try:
            return await asyncio.wait_for(reader.readuntil(marker), timeout)
        except asyncio.IncompleteReadError as end:
            return end.partial
        except asyncio.TimeoutError:
            waiting = "full line" if marker == b"\n" else f"{marker!r}"
            raise errors.Timeout(
                f"goblin {self.pid} wrote no {waiting} on its {stream} within {timeout:g} s "
                f"(what it wrote before that is kept for the next read); its {stream} is still "
                "open (the goblin runs, or something it started holds the pipe): read again to "
                "wait longer, or kill() it"
            ) from None

    async def wait(self, timeout: Optional[float] = None) -> int:
        """Wait (without blocking the event loop) until the goblin exits; its returncode. With
        ``timeout`` (seconds), raise ``pf.Timeout`` if it still runs then, as ``Goblin.wait``."""
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, self._native.wait, timeout)
        self.returncode = code
        return code

    def poll(self) -> Optional[int]:
        """The returncode if the goblin has exited (reaping it), else ``None``; as
        ``Goblin.poll``."""
        code = self._native.poll()
        if code is not None:
            self.returncode = code
        return code

    async def wait_pages(self, timeout: Optional[float] = None) -> bool:
        """``Goblin.wait_pages`` without blocking the event loop: for a copy thawed lazily,
        ``True`` once every page of its memory is in (``False`` if ``timeout`` ran out)."""
        loop = asyncio.get_running_loop()
        return bool(await loop.run_in_executor(None, self._native.wait_pages, timeout))

    @property
    def pages_served(self) -> int:
        """Pages of its memory served on demand so far (0 unless thawed lazily)."""
        return int(self._native.pages_served)

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the goblin's main process."""
        self._native.send_signal(int(signal))

    def terminate(self) -> None:
        """Send SIGTERM."""
        import signal

        self.send_signal(signal.SIGTERM)

    async def detach(self) -> None:
        """Let the goblin run on after this handle is gone, as ``Goblin.detach`` (a copy
        thawed lazily once every page is in: awaited without blocking the event loop)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._native.detach)
        self._let_go = True

    async def kill(self) -> int:
        """SIGKILL the goblin, reap it, return its returncode."""
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, self._native.kill)
        self.returncode = code
        if self.stdin is not None:
            self.stdin.close()
        return code

    async def __aenter__(self) -> "AsyncGoblin":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._let_go:
            await self.kill()
        elif self.stdin is not None:
            self.stdin.close()


async def thaw_async(
    snapshot: Snapshot,
    store: Optional[Store] = None,
    *,
    new_pid_namespace: bool = True,
    lazy: Optional[bool] = None,
) -> AsyncGoblin:
    """``thaw`` for asyncio: the restore runs on a worker thread (the GIL released), and the
    goblin's pipes become asyncio streams. The copy dies with its ``AsyncGoblin`` as with
    ``thaw``; ``lazy`` as for ``thaw``; the same errors."""
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, lambda: load(snapshot, store, lazy=lazy))
    native = await loop.run_in_executor(
        None, lambda: loaded._native.thaw(new_pid_namespace=new_pid_namespace)
    )
    return await AsyncGoblin._wrap(native)


async def fork_async(
    snapshot: Snapshot, n: int, store: Optional[Store] = None, *, lazy: Optional[bool] = None
) -> List[AsyncGoblin]:
    """``fork`` for asyncio: ``n`` copies, each with asyncio streams; all or none, as
    ``fork``; ``lazy`` as for ``fork``."""
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, lambda: load(snapshot, store, lazy=lazy))
    natives = await loop.run_in_executor(None, loaded._native.fork, n)
    return [await AsyncGoblin._wrap(g) for g in natives]
