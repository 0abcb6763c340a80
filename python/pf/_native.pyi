"""Type stubs of pf's native module (crates/py). Import ``pf``, not this module."""

from os import PathLike
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__version__: str

class Store:
    """A pf store: blobs named by the SHA-256 of their bytes and names that point at them.
    Making one creates nothing: ``put``, ``put_file`` and a freeze or warm-up into it create the
    store; reading one that is not there raises ``pf.NotFound`` ("there is no store at ...").
    A reference (``get``, ``contains``, ``resolve``, ``verify``, ``tag``'s target) is a name, a
    digest (``sha256:`` and 64 hex digits), or a unique prefix of one in the store (``sha256:``
    and at least 4 hex digits, or at least 8 hex digits alone; a name spelled so wins)."""

    def __init__(self, path: Optional[Union[str, PathLike[str]]] = None) -> None: ...
    @property
    def path(self) -> Path: ...
    @property
    def exists(self) -> bool: ...
    def put(self, data: bytes) -> str: ...
    def put_file(self, path: Union[str, PathLike[str]]) -> str: ...
    def get(self, reference: str) -> bytes: ...
    def contains(self, reference: str) -> bool: ...
    def resolve(self, reference: str) -> str: ...
    def tag(self, name: str, target: str) -> None: ...
    def untag(self, name: str) -> bool: ...
    def names(self) -> Dict[str, str]: ...
    def blobs(self) -> List[str]: ...
    def gc(self, *, grace: float = 3600.0, dry_run: bool = False) -> Dict[str, Any]: ...
    def verify(self, reference: Optional[str] = None) -> Dict[str, str]: ...

class NativeGoblin:
    @property
    def pid(self) -> int: ...
    def take_fds(self) -> Tuple[Optional[int], Optional[int], Optional[int]]: ...
    def wait(self, timeout: Optional[float] = None) -> int: ...
    def poll(self) -> Optional[int]: ...
    def send_signal(self, signal: int) -> None: ...
    def kill(self) -> int: ...
    def wait_pages(self, timeout: Optional[float] = None) -> bool: ...
    @property
    def pages_served(self) -> int: ...
    def detach(self) -> None: ...

class NativeLoaded:
    @property
    def name(self) -> str: ...
    @property
    def lazy(self) -> bool: ...
    def thaw(self, *, new_pid_namespace: bool = True) -> NativeGoblin: ...
    def fork(self, n: int) -> List[NativeGoblin]: ...

def spawn(
    argv: Sequence[str], cwd: str, env: Sequence[Tuple[str, str]]
) -> NativeGoblin: ...
def freeze(
    pid: int,
    *,
    store: Optional[Store] = None,
    images_dir: Optional[str] = None,
    leave_running: bool,
    tag: Optional[str] = None,
    shell_job: bool = False,
) -> str: ...
def load(
    *,
    store: Optional[Store] = None,
    reference: Optional[str] = None,
    images_dir: Optional[str] = None,
    lazy: Optional[bool] = None,
    once: bool = False,
) -> NativeLoaded: ...

class Cancel:
    def __init__(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...

def warm_up(
    *,
    argv: Optional[Sequence[str]] = None,
    goblin: Optional[NativeGoblin] = None,
    cwd: str,
    env: Sequence[Tuple[str, str]],
    store: Optional[Store] = None,
    images_dir: Optional[str] = None,
    input: bytes,
    ready: Optional[str] = None,
    quiet: Optional[float] = None,
    timeout: float,
    leave_running: bool,
    tag: Optional[str] = None,
    drain: float,
    cancel: Optional[Cancel] = None,
) -> Dict[str, Any]: ...
def fork_and_collect(
    loaded: NativeLoaded,
    inputs: Sequence[bytes],
    *,
    deadline: Optional[float] = None,
    cancel: Optional[Cancel] = None,
) -> List[Dict[str, Any]]: ...
def push(
    store: Store,
    snapshot: str,
    reference: str,
    *,
    insecure: bool = False,
    docker_config: Optional[str] = None,
    anonymous: bool = False,
    parallel: int = 4,
    idle_timeout: float = 60.0,
) -> Dict[str, Any]: ...
def pull(
    store: Store,
    reference: str,
    *,
    tag: Optional[str] = None,
    insecure: bool = False,
    docker_config: Optional[str] = None,
    anonymous: bool = False,
    parallel: int = 4,
    idle_timeout: float = 60.0,
) -> Dict[str, Any]: ...
