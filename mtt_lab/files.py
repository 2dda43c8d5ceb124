"""Safe files: atomic writes, validated reads and advisory locks (beneath stores and run folders).

Three promises, kept here so that every other module can rely on them:

* **Nothing written is lost or half-written.** :func:`atomic_write` writes to a temporary name in
  the same folder, fsyncs, and renames over the final name; if the write fails (a full disk,
  an I/O error) the temporary file is removed, the previous file is intact, and the error is a
  :class:`FileError` that names the file and the cause. Files honour the user's umask (a store
  shared by a group stays readable by the group).
* **Nothing read runs code, and a bad file is a sentence, not a traceback.** :func:`read_torch`
  checks size and format before ``torch.load(weights_only=True)`` and turns every failure into a
  one-line :class:`FileError`: the file, what was expected, what was found, what to do.
* **One writer at a time.** :class:`FolderLock` takes an advisory ``flock`` on ``FOLDER/.lock``;
  a second writer fails at once with the holder's PID. The kernel drops the lock of a process
  that dies (even by ``kill -9``), so a stale lock is simply taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

LOCK_NAME = ".lock"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class FileError(RuntimeError):
    """A file or folder that mtt_lab reads or writes is missing, damaged, of another kind, locked,
    or cannot be written. ``str(error)`` is one line that names the file and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the causes printed


def bad_file(path, expected: str, found: str, todo: str) -> FileError:
    """The one shape of a read error: ``PATH: expected ..., found ...; todo``."""
    return FileError(f"{path}: expected {expected}, found {found}; {todo}")


# ----------------------------------------------------------------------------------------------
# writing


def _cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "")
    reason = {errno.ENOSPC: "no space left on device", errno.EIO: "input/output error (the disk failed)",
              errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
    return f"{reason} ({name})" if name else reason


def atomic_write(path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``path`` atomically.

    The bytes go to ``.NAME.<random>.tmp`` beside ``path`` and are renamed over it only once complete
    and fsynced; the folder is fsynced after the rename, so the new name survives a power cut. Raises :class:`FileError` (the previous file untouched, no temporary file left) if
    the disk is full or the write fails.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mode 0o666 & ~umask, like any file the user creates (mkstemp would force 0o600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        keep = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise FileError(f"cannot write {path}: {_cause(exc)}; {keep}; free some space or write elsewhere") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the file is written either way
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode())


def save_torch(path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically (serialised in memory first, so a full disk is an
    ``OSError`` of the write, not an error deep inside torch's zip writer)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


class LineLog:
    """An append-only text file of one JSON object per line (a run's ``log.jsonl``).

    Each :meth:`append` writes whole lines; if the write fails, the file is cut back to its
    previous length, so a full disk never leaves half a line behind.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)

    def append(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        size = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            os.ftruncate(self._fd, size)
            raise FileError(f"cannot append to {self.path}: {_cause(exc)}; the log is kept up to the last "
                            f"complete line; free some space and resume the run") from exc

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> LineLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# reading


def _check_exists(path: Path, expected: str, todo: str) -> int:
    if path.is_dir():
        raise bad_file(path, expected, "a folder", todo)
    if not path.is_file():
        raise bad_file(path, expected, "no such file", todo)
    size = path.stat().st_size
    if size == 0:
        raise bad_file(path, expected, "an empty file (0 bytes: the write was interrupted)", todo)
    return size


def read_json(path, expected: str, todo: str):
    """The JSON value in ``path``, or a :class:`FileError` saying what is wrong with the file."""
    path = Path(path)
    size = _check_exists(path, expected, todo)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_file(path, expected, f"{size} bytes that are not valid JSON ({exc}: truncated or not "
                                       f"a JSON file)", todo) from exc


def read_torch(path, expected: str, todo: str, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU, with every failure as a :class:`FileError`.

    Only tensors and plain containers are ever unpickled: anything else is refused unread.
    """
    path = Path(path)
    size = _check_exists(path, expected, todo)
    with path.open("rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC:
        found = ("a plain Python pickle (refused unread: unpickling it could run code)" if head[:1] == b"\x80"
                 else f"{size} bytes that are not a torch file")
        raise bad_file(path, expected, found, todo)
    try:
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise bad_file(path, expected, "Python objects other than tensors and plain containers (refused: "
                                       "unpickling them could run code)", todo) from exc
    except Exception as exc:  # torch's zip reader: truncated or damaged archives
        raise bad_file(path, expected, f"a damaged or truncated torch file ({size} bytes)", todo) from exc


def describe(obj) -> str:
    """A short description of a loaded object, for "found ..." in error messages."""
    if isinstance(obj, dict):
        if "kind" in obj:
            return f"{obj['kind']}"
        keys = ", ".join(map(str, list(obj)[:8]))
        return f"a dict with keys [{keys}]"
    if isinstance(obj, Tensor):
        return f"a {str(obj.dtype).removeprefix('torch.')} tensor of shape {list(obj.shape)}"
    if isinstance(obj, list):
        return f"a list of {len(obj)} items"
    return f"a {type(obj).__name__}"


def require_keys(path, obj, keys: dict[str, type | tuple[type, ...]], expected: str, todo: str) -> None:
    """Raise a :class:`FileError` unless ``obj`` is a dict holding ``keys`` of the given types."""
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
        raise bad_file(path, expected, describe(obj), todo)
    for key, kind in keys.items():
        if not isinstance(obj[key], kind):
            raise bad_file(path, expected, f"{key!r} = {describe(obj[key])}", todo)


# ----------------------------------------------------------------------------------------------
# locking


class FolderLock:
    """``with FolderLock(folder, "run folder"):`` -- be the only writer of ``folder``.

    An advisory ``flock`` on ``folder/.lock`` (created if needed, removed on release; the folder must
    exist). A second writer gets a :class:`FileError` at once that names the holder's PID. The kernel
    releases the lock when its process ends, however it ends, so the lock file a dead process left
    behind is simply taken over.
    """

    def __init__(self, folder, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise FileError(f"cannot lock {self.what} {self.folder}: {_cause(exc)}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FileError(f"{self.what} {self.folder} is being written by another process (PID {holder}, "
                                f"lock {self.path}); wait for it to finish or stop it, then try again") from None
            try:  # the holder may have removed the file between our open and our flock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked (see the inode check above)
            os.close(self._fd)
            self._fd = None
