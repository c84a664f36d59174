"""The SQLite verdict cache (ril_fast.judges_cache) beyond what tests/test_judge.py checks: a batch that fails half
way is rolled back whole and the store stays usable; a file locked for good by another connection is an error
after the store's timeout, not a wait forever."""

import sqlite3
import subprocess
import sys

import pytest

from ril_fast.judges_cache import SqliteStore


def test_a_batch_that_fails_half_way_leaves_nothing_and_the_store_usable(tmp_path):
    """``update`` writes a batch in one transaction: a row SQLite cannot take (a key of no SQL type, after a good
    one) rolls back the whole batch, and the next batch is written (a transaction left open would refuse it:
    "cannot start a transaction within a transaction"). ~0.01 s."""
    store = SqliteStore(tmp_path / "s.sqlite")
    store["old"] = True
    with pytest.raises(sqlite3.ProgrammingError):
        store.update({"good": True, ("not", "a", "key"): False})
    assert dict(store) == {"old": True}
    store.update({"next": False})
    store.close()
    assert dict(SqliteStore(tmp_path / "s.sqlite")) == {"old": True, "next": False}  # committed, seen anew


_OPEN_LOCKED = r"""
import sqlite3, sys, time
from ril_fast.judges_cache import SqliteStore
start = time.monotonic()
try:
    SqliteStore(sys.argv[1], timeout_s=0.3)
except sqlite3.OperationalError as e:
    print(f"{e} after {time.monotonic() - start:.1f} s")
"""


def test_a_file_locked_for_good_is_an_error_after_the_timeout(tmp_path):
    """Another connection holds an exclusive lock on the file (rollback journal, not yet WAL) and never lets go: a
    store opened with ``timeout_s=0.3`` gives up with "database is locked" within its timeout (retrying the switch
    to WAL), where it must not retry forever. In a child process, so that a store that hangs is killed. ~1 s."""
    path = tmp_path / "locked.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        run = subprocess.run([sys.executable, "-c", _OPEN_LOCKED, str(path)], capture_output=True, text=True,
                             timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert run.returncode == 0, run.stderr
    message, seconds = run.stdout.split(" after ")
    assert message == "database is locked" and float(seconds.split()[0]) < 5, run.stdout
