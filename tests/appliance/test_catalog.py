"""The catalog: real SQLite file, WAL, migrations, all-or-nothing transactions."""

from __future__ import annotations

import sqlite3

import pytest

from appliance.audit import append_audit, iter_audit
from appliance.catalog import SCHEMA_VERSION, open_catalog, schema_version, transaction
from appliance.errors import CatalogError


def test_new_catalog_is_migrated_with_wal_and_full_sync(airlock_home):
    db = open_catalog()
    assert schema_version(db) == SCHEMA_VERSION
    assert {"audit_log", "schema_version", "settings"} <= set(db.table_names())
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert (airlock_home / "catalog.db").stat().st_mode & 0o777 == 0o600
    assert airlock_home.stat().st_mode & 0o777 == 0o700


def test_reopening_does_not_migrate_twice(airlock_home):
    open_catalog().close()
    db = open_catalog()
    assert [r[0] for r in db.execute("SELECT version FROM schema_version")] == list(range(1, SCHEMA_VERSION + 1))


def test_catalog_from_a_newer_release_is_refused(airlock_home):
    db = open_catalog()
    db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 'later')", [SCHEMA_VERSION + 1])
    db.close()
    with pytest.raises(CatalogError, match="newer than this appliance knows") as info:
        open_catalog()
    assert "airlock upgrade" in info.value.hint


def test_not_a_database_gives_one_clear_error(airlock_home):
    airlock_home.mkdir(parents=True)
    (airlock_home / "catalog.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="cannot open the catalog") as info:
        open_catalog()
    assert info.value.hint


def test_failed_change_rolls_back_its_audit_row_too():
    db = open_catalog()
    append_audit(db, "test.before", "x")

    with pytest.raises(RuntimeError), transaction(db):
        db.execute("INSERT INTO settings (key, value) VALUES ('colour', 'blue')")
        append_audit(db, "settings.set", "colour", {"value": "blue"})
        raise RuntimeError("the change failed half-way")

    assert db.execute("SELECT COUNT(*) FROM settings").fetchone()[0] == 0
    assert [e.action for e in iter_audit(db)] == ["test.before"]


def test_sqlite_utils_writes_nest_inside_a_transaction():
    db = open_catalog()
    with pytest.raises(RuntimeError), transaction(db):
        db["settings"].insert({"key": "a", "value": "1"})
        raise RuntimeError("abort")
    assert db.execute("SELECT COUNT(*) FROM settings").fetchone()[0] == 0
    with transaction(db):
        db["settings"].insert({"key": "a", "value": "1"})
        append_audit(db, "settings.set", "a")
    assert db.execute("SELECT value FROM settings").fetchone()[0] == "1"


def test_transaction_takes_the_write_lock_up_front(airlock_home):
    db = open_catalog()
    other = sqlite3.connect(airlock_home / "catalog.db", timeout=0.1, isolation_level=None)
    with transaction(db):
        # Before any write: BEGIN IMMEDIATE already holds the lock, so the audit chain's
        # read-last-hash-then-append cannot interleave with another process.
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
