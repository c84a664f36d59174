"""The persistent judge cache: verdicts in an SQLite file that several processes share.

``SqliteStore(path)`` is a ``MutableMapping[str, bool]`` from ``ril_fast.judge.judge_key`` (a sha256
of judge name, question, answer and response) to a verdict; ``CachedJudge(judge, store=...)`` reads
and writes it. The file is in WAL mode: readers never block the writer and each other, and writers
take turns (a process waits up to ``timeout_s`` for the write lock). A batch of verdicts is written
in one transaction (``update``), so a process killed mid-write leaves the file as it was before the
batch. Every process — each rank of a torchrun, a second run, ``ril_fast.teacher`` — opens its own
connection. No connection may be open across a fork: the child inherits SQLite's record of the parent's
locks but not the POSIX locks themselves, so the parent, closing its connection while the child writes, sees
no other user, checkpoints and deletes the WAL under the child, and the child's committed verdicts are lost.
So before every ``os.fork`` (multiprocessing's fork included) each open store of the process closes its
connection, and the parent and the child each reopen their own on their next access: a store handed to a
child process by fork works there too.

WAL needs shared memory between the processes, so the file must be on a local disk, not NFS: for a
multi-node run give each node its own file.
"""

import os
import random
import sqlite3
import time
import weakref
from collections.abc import Iterator, MutableMapping
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict INTEGER NOT NULL) WITHOUT ROWID"

# Every store of this process, by id (a mapping is unhashable, so no WeakSet): what a fork must close first.
_OPEN: "weakref.WeakValueDictionary[int, SqliteStore]" = weakref.WeakValueDictionary()


def _close_before_fork() -> None:
    for store in list(_OPEN.values()):
        store.close()


os.register_at_fork(before=_close_before_fork)


class SqliteStore(MutableMapping):
    """Judge verdicts in the SQLite file ``path`` (made, with its folder, if missing). ``retries`` counts this
    object's openings that met another process's lock while switching to WAL and tried again."""

    def __init__(self, path: str | Path, *, timeout_s: float = 60.0):
        self.path = Path(path).expanduser()
        self.timeout_s = timeout_s
        self._conn = None
        self._pid = None
        self.retries = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection()  # create the file and table now, so a bad path fails here

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            # isolation_level=None: statements autocommit unless inside an explicit BEGIN. check_same_thread=False:
            # a fork from a thread other than the one that opened it must still close it (_close_before_fork).
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            self._set_up(conn)
            self._conn, self._pid = conn, os.getpid()
            _OPEN[id(self)] = self
        return self._conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL takes an exclusive lock and SQLite answers "database is locked" at once, without
        # its busy timeout, when another process holds any lock then (several ranks opening a new file at
        # once): retry, within the same timeout.
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
                conn.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    conn.close()
                    raise
                self.retries += 1
                time.sleep(random.uniform(0.005, 0.05))

    def __getitem__(self, key: str) -> bool:
        row = self._connection().execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return bool(row[0])

    def __setitem__(self, key: str, verdict: bool) -> None:
        self.update({key: verdict})

    def update(self, other=(), /, **kw) -> None:
        """Write many verdicts in one transaction (a verdict already stored is replaced)."""
        rows = [(k, int(bool(v))) for k, v in dict(other, **kw).items()]
        if not rows:
            return
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on a later upgrade
        try:
            conn.executemany("INSERT OR REPLACE INTO verdicts (key, verdict) VALUES (?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def __delitem__(self, key: str) -> None:
        if self._connection().execute("DELETE FROM verdicts WHERE key = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([k for (k,) in self._connection().execute("SELECT key FROM verdicts")])

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        """Close this process's connection (a later access reopens it)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"
