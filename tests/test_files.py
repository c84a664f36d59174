"""ril_fast/files.py on its own: a write is whole or not at all, a lock is held by its own lock file until it is given
back (and waited for where asked), and a model folder's problem is said. Runs and collections refused while another
process holds their folder or file are in tests/test_setup_checks.py and tests/test_teacher.py."""

import errno
import fcntl
import os
import warnings

import pytest

from ril_fast import files


def _held(lock) -> bool:
    """Whether some open file holds ``lock``'s flock: another open file of this process is refused as another
    process would be (flock locks belong to an open file, not to a process)."""
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _failing_flock(code):
    def flock(f, flags):
        raise OSError(code, os.strerror(code))
    return flock


def test_an_atomic_write_reaches_the_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """The new text goes to a temporary file beside the old one and is fsynced there, the old file untouched until the
    rename: a crash before it leaves the old contents, after it the new ones."""
    path = tmp_path / "f.json"
    path.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", path.read_text(), os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert files.write_text_atomic(path, "new") == path
    tmp = str(tmp_path / ".f.json.tmp")
    assert events == [("fsync", "old", tmp), ("replace", tmp, str(path))]
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_model_folder_problems(tmp_path, monkeypatch):
    """A file is not a folder; a training checkpoint and its hf/ folder are named as one; ``~`` is the home folder."""
    (tmp_path / "notes.txt").write_text("x")
    assert files.model_folder_problem(tmp_path / "notes.txt") == "not a folder"
    (tmp_path / "step-8" / "hf").mkdir(parents=True)
    (tmp_path / "step-8" / "trainer.json").write_text("{}")
    (tmp_path / "step-8" / "hf" / "config.json").write_text("{}")
    assert files.model_folder_problem(tmp_path / "step-8" / "hf").startswith(f"{tmp_path / 'step-8'} is a training")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert files.model_folder_problem("~/m") is None


def test_a_file_lock_is_its_own_file_held_until_given_back(tmp_path, monkeypatch):
    """``lock_file`` holds ``.{name}.lock`` beside the file (not the folder's lock, not a neighbour's), with this
    process's id in it in place of an old holder's; taking it again is a no-op; ``unlock_file`` gives it back (closes
    its file), for a relative path too."""
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / "data" / ".a.jsonl.lock"
    lock.parent.mkdir()
    lock.write_text("99999999\n")  # a holder that has ended
    files.lock_file("data/a.jsonl")
    try:
        assert _held(lock) and lock.read_text() == f"{os.getpid()}\n"
        assert not _held(tmp_path / "data" / ".lock") and not _held(tmp_path / "data" / ".b.jsonl.lock")
        files.lock_file(tmp_path / "data" / "a.jsonl")  # the same file, already held
        assert _held(lock)
    finally:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files.unlock_file("data/a.jsonl")
    assert not [w for w in caught if w.category is ResourceWarning]  # closed there, not left to the collector
    assert not _held(lock)


def test_a_held_lock_names_its_holder(tmp_path):
    """Held by another open file (as by another process), ``lock_file`` raises ``InUse`` with the id written in the
    lock file, and ``lock_folder`` makes a missing folder and takes its ``.lock``."""
    target = tmp_path / "a.jsonl"
    with open(tmp_path / ".a.jsonl.lock", "a+") as other:
        other.write("12345\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(files.InUse, match=rf"^{target} is in use by another process \(pid 12345\)$"):
            files.lock_file(target)
    folder = tmp_path / "new" / "run"
    files.lock_folder(folder)
    try:
        assert _held(folder / ".lock")
    finally:
        files.unlock_folder(folder)
    assert not _held(folder / ".lock")


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_locks_warns(tmp_path, monkeypatch, code):
    """Each errno of a file system that keeps no locks warns (``lock_file``) or runs the block unlocked
    (``waiting_lock`` says False); any other failure is raised."""
    monkeypatch.setattr(fcntl, "flock", _failing_flock(code))
    with pytest.warns(UserWarning, match="not locked, the file system keeps no locks"):
        files.lock_file(tmp_path / "a.jsonl")
    files.unlock_file(tmp_path / "a.jsonl")
    with files.waiting_lock(tmp_path / "b") as locked:
        assert locked is False
    monkeypatch.setattr(fcntl, "flock", _failing_flock(errno.EACCES))
    with pytest.raises(PermissionError):
        files.lock_file(tmp_path / "c.jsonl")
    with pytest.raises(PermissionError):
        with files.waiting_lock(tmp_path / "d"):
            pass


def test_a_waiting_lock_is_exclusive_for_its_block(tmp_path):
    """Inside the block no other open file gets the lock, even a shared one; after it, the lock is free."""
    lock = tmp_path / ".x.lock"
    with files.waiting_lock(tmp_path / "x") as locked:
        assert locked is True
        with open(lock) as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert not _held(lock)
