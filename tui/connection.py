"""A catalog connection per worker call: SQLite connections stay in the thread that opened them.

Workers run in short-lived threads, so each opens the catalog, does its reads or its one
appliance call, and closes it again. The first open in this process creates AIRLOCK_HOME (0700)
and migrates the catalog, whichever screen's worker gets there first; later opens skip that
(migrating takes the write lock, which a running job may be holding).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

_migrated: set[Path] = set()
_migrating = threading.Lock()


@contextlib.contextmanager
def catalog(home: Path) -> Iterator[sqlite_utils.Database]:
    from appliance.catalog import open_catalog

    if home not in _migrated:
        with _migrating:
            if home not in _migrated:
                home.mkdir(mode=0o700, parents=True, exist_ok=True)
                open_catalog(home).close()
                _migrated.add(home)
    db = open_catalog(home, migrate=False)
    try:
        yield db
    finally:
        db.close()
