"""The catalog: real SQLite file, WAL, migrations, all-or-nothing transactions."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from appliance.audit import append_audit, iter_audit
from appliance.catalog import SCHEMA_VERSION, open_catalog, schema_version, transaction
from appliance.errors import CatalogError
from tests.conftest import run_cli


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


# In a child process: this worker has numpy loaded already (torch), which is the case where nothing changes.
_LOAD = r"""
import json, sys, threading
if sys.argv[1] == "numpy-first":
    import numpy
elif sys.argv[1] == "second-thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
from appliance.catalog import open_catalog
open_catalog().execute("SELECT 1")
import sqlite_utils.db
loaded = sorted(name for name in ("numpy", "pandas") if name in sys.modules)
import numpy  # still importable afterwards, and sqlite-utils' catalog work goes on with it loaded
db = open_catalog()
db["settings"].insert({"key": "k", "value": str(numpy.float32(0.5))}, replace=True)
print(json.dumps({"loaded": loaded, "sqlite_utils_numpy": sqlite_utils.db.np is not None,
                  "value": db["settings"].get("k")["value"]}))
"""


@pytest.mark.parametrize(("case", "numpy_loaded"), [("alone", False), ("numpy-first", True), ("second-thread", True)])
def test_sqlite_utils_is_loaded_without_numpy_where_that_saves_it(airlock_home, case, numpy_loaded):
    result = subprocess.run([sys.executable, "-I", "-c", _LOAD, case], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "AIRLOCK_HOME": str(airlock_home)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"loaded": ["numpy"] if numpy_loaded else [], "sqlite_utils_numpy": numpy_loaded, "value": "0.5"}


def test_a_catalog_command_does_not_import_numpy(airlock_home):
    """The `airlock` command line: every process pays what it imports (~0.2 CPU-s for numpy, ADR 0022)."""
    result = run_cli("audit", "verify", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "sqlite_utils.db" in imported and "cryptography" in imported  # the profile is there
    assert not {name for name in imported if name.split(".")[0] in ("numpy", "pandas")}


_PLUGIN = '''
import sqlite_utils

@sqlite_utils.hookimpl
def prepare_connection(conn):
    conn.execute("CREATE TEMP TABLE plugin_ran (x)")
'''


def test_an_installed_sqlite_utils_plugin_never_touches_the_catalog_connection(airlock_home, tmp_path):
    """A package with a `sqlite_utils` entry point would run its hook on every connection sqlite-utils opens."""
    site = tmp_path / "site"
    dist_info = site / "plugin_demo-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-demo\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[sqlite_utils]\nplugin_demo = plugin_demo\n")
    (site / "plugin_demo.py").write_text(_PLUGIN)
    check = (f"import sys; sys.path.insert(0, {str(site)!r}); import sqlite_utils, sqlite3;"
             "from appliance.catalog import open_catalog;"
             "ran = lambda db: ('plugin_ran',) in db.execute('SELECT name FROM temp.sqlite_master').fetchall();"
             "print(ran(sqlite_utils.Database(sqlite3.connect(':memory:'))), ran(open_catalog()))")
    result = subprocess.run([sys.executable, "-I", "-c", check], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "AIRLOCK_HOME": str(airlock_home)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]  # sqlite-utils' default runs it; the catalog does not
