"""Files written whole or not at all (a crash in the middle of a write leaves the old contents), and locks
held for a process's life (or waited for, around one piece of work: :func:`waiting_lock`): a run folder's (two
runs writing one folder would interleave their records and prune each other's checkpoints) and a file's (two
teacher collections appending to one file would write the same responses twice); and what is wrong with a model
folder, said before transformers reads a missing one as a hub id."""

import errno
import fcntl
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

# What flock says on a file system that keeps no locks (some FUSE and network mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


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


def model_folder_problem(folder: str | Path) -> str | None:
    """What makes ``folder`` no Hugging Face model folder ("no such folder", "not a folder", a training checkpoint
    or its ``hf/`` folder, "no config.json in the folder"), or None when it holds a ``config.json``."""
    path = Path(folder).expanduser()
    if not path.exists():
        return "no such folder"
    if not path.is_dir():
        return "not a folder"
    for checkpoint in (path, path.parent):  # a training checkpoint (step-N/), or its hf/ (configs, no weights)
        if (checkpoint / "trainer.json").is_file():
            return (f"{checkpoint} is a training checkpoint, not a model folder: python -m ril_fast.export "
                    f"{checkpoint} OUT writes its student as one")
    if not (path / "config.json").is_file():
        return "no config.json in the folder (not a Hugging Face model folder)"
    return None


class InUse(RuntimeError):
    """Another process holds the lock (:func:`lock_file`, :func:`lock_folder`)."""


_held: dict[Path, object] = {}  # this process's locks, by lock file


def lock_file(path: str | Path) -> None:
    """Take ``path``'s lock, the file ``.{name}.lock`` beside it (its folder made if missing), for this process
    until it ends, however it ends:
    an exclusive ``flock``, which the system drops with the process. Taking it again in the same process is a
    no-op; :func:`unlock_file` gives it back. Raises :class:`InUse`, naming the holder's process id, when another
    process holds it. On a file system that keeps no locks it warns that a second process will not be refused and
    goes on."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _lock(path.parent / f".{path.name}.lock", str(path))


def unlock_file(path: str | Path) -> None:
    """Give back this process's lock of ``path`` (nothing if it holds none)."""
    path = Path(path).resolve()
    _unlock(path.parent / f".{path.name}.lock")


@contextmanager
def waiting_lock(path: str | Path):
    """Hold ``path``'s lock (the file ``.{name}.lock`` beside it, as :func:`lock_file`) for the ``with`` block,
    waiting while another process holds it -> whether it is held (False on a file system that keeps no locks:
    the block then runs unlocked)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+") as f:  # closing it gives the lock back
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            yield False
        else:
            yield True


def lock_folder(folder: str | Path) -> None:
    """Take ``folder/.lock`` (made with the folder if missing) for this process, as :func:`lock_file` does."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _lock(folder / ".lock", str(folder))


def unlock_folder(folder: str | Path) -> None:
    """Give back this process's lock of ``folder`` (nothing if it holds none)."""
    _unlock(Path(folder).resolve() / ".lock")


def _lock(lock: Path, what: str) -> None:
    if lock in _held:
        return
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise InUse(f"{what} is in use by another process (pid {holder})") from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            f.close()
            raise
        warnings.warn(f"{what}: not locked, the file system keeps no locks ({e.strerror}): another process using it "
                      f"at the same time will not be refused", stacklevel=3)
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[lock] = f


def _unlock(lock: Path) -> None:
    f = _held.pop(lock, None)
    if f is not None:
        f.close()
