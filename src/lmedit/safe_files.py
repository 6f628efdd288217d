"""Writes that a kill cannot tear, and folder locks that a killed process cannot leave behind.

Every file lmedit resumes from (a run's ``config.json`` and ``summary.json``,
statistics cache entries, training checkpoints) is written to a temporary file
in the same folder, flushed to disk and renamed over the old one, so a reader
sees either the old bytes or the new ones, never a mix.

A folder that one process writes for a long time (a run folder, a training
folder) is held with an operating-system lock (:mod:`filelock`) for the whole
command: a second process gets :class:`FolderBusy` at once, naming the holder's
pid. The OS drops the lock when its process dies, even by SIGKILL, so a killed
run never blocks the next one; the lock file it leaves is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

LOCK_FILE = ".lmedit.lock"
OWNER_FILE = ".lmedit.owner"
TEMP_PREFIX = ".tmp-"

_HELD: dict[str, int] = {}  # folders this process holds -> nesting depth (a nested hold is free)
_HELD_GUARD = threading.Lock()


class FolderBusy(RuntimeError):
    """Another process holds the folder; the message names it and says what to do."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (files may be model-sized)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dumps: Any) -> None:
    atomic_write_text(path, json.dumps(data, **dumps))


def append_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Append whole lines in one write, then fsync.

    A killed writer can leave half a line at the end of the file; it is ended
    first, or the next line would join it and both would be unreadable.
    Readers skip the half line.
    """
    path = Path(path)
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n":
        text = "\n" + text
    with path.open("ab") as handle:
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files a killed writer left in ``folder``; call only while holding the folder's lock."""
    removed = []
    for stale in folder.glob(f"{TEMP_PREFIX}*"):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextmanager
def hold_folder(folder: str | Path, what: str = "run folder", advice: str = "wait for it or choose another --out"
                ) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this process until the block ends; nested holds are free.

    Raises :class:`FolderBusy` at once when another process holds it.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _HELD_GUARD:
        nested = _HELD.get(key, 0) > 0
        if nested:
            _HELD[key] += 1
    if nested:
        try:
            yield folder
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderBusy(f"{what} {folder} is in use by another lmedit process (pid {holder_pid(folder)}); "
                         f"{advice}") from None
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        atomic_write_json(folder / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname()})
        yield folder
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        (folder / OWNER_FILE).unlink(missing_ok=True)  # still held: no other process reads or writes it now
        lock.release()


def ensure_folder_free(folder: str | Path, what: str = "run folder",
                       advice: str = "wait for it or choose another --out") -> None:
    """Raise :class:`FolderBusy` now if another process holds ``folder`` (checked before slow set-up work).

    Writes nothing: a folder without a lock file has never been held.
    """
    folder = Path(folder)
    if not (folder / LOCK_FILE).is_file():
        return
    with hold_folder(folder, what, advice):
        pass


def holder_pid(folder: Path) -> str:
    """The pid recorded by the process holding ``folder`` ("unknown" if it has not written it yet)."""
    try:
        return str(json.loads((Path(folder) / OWNER_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
