"""Files written whole or not at all (a crash in the middle of a write leaves the old contents), and a run
folder's lock (two runs writing one folder would interleave their records and prune each other's
checkpoints)."""

import fcntl
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, flushed to the disk and then renamed over
    ``path``: a reader, or a crash at any moment, finds the old file or the new one, never a part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock (:func:`lock_folder`)."""


_held: dict[Path, object] = {}  # this process's locks, by folder


def lock_folder(folder: str | Path) -> None:
    """Take ``folder/.lock`` (made with the folder if missing) for this process until it ends, however it ends:
    an exclusive ``flock``, which the system drops with the process. Taking it again in the same process is a
    no-op; :func:`unlock_folder` gives it back. Raises :class:`FolderInUse`, naming the holder's process id,
    when another process holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FolderInUse(f"{folder} is in use by another process (pid {holder})") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[folder] = f


def unlock_folder(folder: str | Path) -> None:
    """Give back this process's lock of ``folder`` (nothing if it holds none)."""
    f = _held.pop(Path(folder).resolve(), None)
    if f is not None:
        f.close()
