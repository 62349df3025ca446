"""SQLite shared by several processes: writers queue on a file lock, not on SQLite's busy wait.

SQLite lets one writer in at a time. The others retry on a busy handler that sleeps 1, 2, 5,
10, ... up to 100 ms between tries, so with the web server, two worker processes and the
listener all writing, most of a write's wait was sleep after the lock had come free (measured:
the processes together used little more than one of two cores). Here every transaction first
takes an exclusive lock on a file beside the database, polled at a millisecond, and then
BEGIN IMMEDIATE as before: correctness still rests on SQLite's own lock, so a writer that
does not take the file lock (a single autocommit statement, the sqlite3 shell) stays safe, and
after the connection's timeout a writer goes on to SQLite's lock without the file lock.
"""

from __future__ import annotations

import fcntl
import time
from typing import IO, Any

from django.db.backends.sqlite3 import base

POLL_SECONDS = 0.001


class DatabaseWrapper(base.DatabaseWrapper):
    """django.db.backends.sqlite3 with transactions serialised on a file lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writers: IO[bytes] | None = None
        self._writing = False

    def _writers_file(self) -> IO[bytes] | None:
        if self.is_in_memory_db():
            return None
        if self._writers is None:
            self._writers = open(f"{self.settings_dict['NAME']}.writers", "ab")  # noqa: SIM115
        return self._writers

    def _take_writers_lock(self) -> None:
        lock = self._writers_file()
        if lock is None or self._writing:
            return
        timeout = float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return  # SQLite's own lock (and busy timeout) still guard the write
                time.sleep(POLL_SECONDS)
            else:
                self._writing = True
                return

    def _release_writers_lock(self) -> None:
        if self._writing and self._writers is not None:
            fcntl.flock(self._writers, fcntl.LOCK_UN)
        self._writing = False

    def _start_transaction_under_autocommit(self) -> None:
        self._take_writers_lock()
        try:
            super()._start_transaction_under_autocommit()  # type: ignore[misc]
        except BaseException:
            self._release_writers_lock()
            raise

    def _commit(self) -> Any:
        try:
            return super()._commit()  # type: ignore[misc]
        finally:
            self._release_writers_lock()

    def _rollback(self) -> Any:
        try:
            return super()._rollback()  # type: ignore[misc]
        finally:
            self._release_writers_lock()

    def _close(self) -> Any:
        try:
            return super()._close()  # type: ignore[misc]
        finally:
            self._release_writers_lock()
            if self._writers is not None:
                self._writers.close()
                self._writers = None
