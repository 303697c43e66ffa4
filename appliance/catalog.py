"""The catalog: one SQLite file (`<AIRLOCK_HOME>/catalog.db`) holding metadata only.

Datasets, runs, models, jobs ... arrive with later migrations; bulk data lives in encrypted
files beside it. Opened through sqlite-utils in WAL mode with `synchronous=FULL`: an appliance
that loses power must not lose a committed audit row.

Writes that need an audit row go through `transaction(db)`, which takes the write lock up front
(`BEGIN IMMEDIATE`) so that the audit chain's read-last-hash-then-append is serialized across
processes. sqlite-utils' own write helpers nest inside it as savepoints.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from appliance.errors import CatalogError
from appliance.paths import ensure_home

if TYPE_CHECKING:
    import sqlite_utils

CATALOG_FILENAME = "catalog.db"
BUSY_TIMEOUT_MS = 10_000


def _migration_1(db: sqlite_utils.Database) -> None:
    """Audit log: append-only, hash-chained (see appliance.audit)."""
    db.execute("""
        CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            object TEXT NOT NULL,
            details TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            entry_hash TEXT NOT NULL UNIQUE
        )""")
    db.execute("CREATE INDEX audit_log_action ON audit_log(action)")
    db.execute("""
        CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""")
    db.execute("""
        CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""")
    db.execute("""
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""")


def _migration_2(db: sqlite_utils.Database) -> None:
    """Vault: key slots, KEK versions, wrapped per-object DEKs (all ciphertext; see docs/adr/0003-vault.md)."""
    db.execute("""
        CREATE TABLE vault_meta (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            vault_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            unlock_failures INTEGER NOT NULL DEFAULT 0,
            last_failure_at TEXT
        )""")
    db.execute("""
        CREATE TABLE vault_key_slots (
            slot_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('passphrase', 'recovery', 'machine')),
            kdf TEXT NOT NULL,
            wrapped_root BLOB NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE vault_keks (
            version INTEGER PRIMARY KEY,
            wrapped_kek BLOB,
            state TEXT NOT NULL CHECK (state IN ('active', 'retired')),
            created_at TEXT NOT NULL,
            retired_at TEXT,
            CHECK ((state = 'active') = (wrapped_kek IS NOT NULL))
        )""")
    db.execute("""
        CREATE TABLE vault_deks (
            object_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            dek_id TEXT NOT NULL UNIQUE,
            kek_version INTEGER NOT NULL REFERENCES vault_keks(version),
            wrapped_dek BLOB,
            state TEXT NOT NULL CHECK (state IN ('active', 'shredded')),
            created_at TEXT NOT NULL,
            shredded_at TEXT,
            CHECK ((state = 'active') = (wrapped_dek IS NOT NULL))
        )""")


def _migration_3(db: sqlite_utils.Database) -> None:
    """Jobs: long-running stages as detached processes, with progress events (see appliance.jobs)."""
    db.execute("""
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled',
                                                 'interrupted')),
            params TEXT NOT NULL,
            actor TEXT NOT NULL,
            device TEXT NOT NULL DEFAULT 'cpu',
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            pid INTEGER,
            pid_start TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            hint TEXT,
            result TEXT
        )""")
    db.execute("CREATE INDEX jobs_state ON jobs(state)")
    db.execute("""
        CREATE TABLE job_events (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            ts TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('progress', 'log', 'state')),
            message TEXT NOT NULL DEFAULT '',
            data TEXT NOT NULL DEFAULT '{}'
        )""")
    db.execute("CREATE INDEX job_events_job ON job_events(job_id, id)")


def _migration_4(db: sqlite_utils.Database) -> None:
    """Datasets: imported data, its versions and one row per record (hashes and splits, no contents).

    A dataset's records live encrypted in the vault object `object_id` (one DEK per dataset), in
    shards named after the import job that wrote them. A version becomes visible only when its row
    and its records' rows commit in one transaction (see appliance.data.store).
    """
    db.execute("""
        CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('text', 'dicom', 'images')),
            profile TEXT NOT NULL,
            split_seed TEXT NOT NULL,
            split_spec TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('importing', 'active', 'deleted')),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            deleted_at TEXT
        )""")
    # A name is reused only after the dataset that had it was deleted.
    db.execute("CREATE UNIQUE INDEX datasets_live_name ON datasets(name) WHERE state != 'deleted'")
    db.execute("""
        CREATE TABLE dataset_versions (
            dataset_id TEXT NOT NULL REFERENCES datasets(id),
            version INTEGER NOT NULL,
            shard_prefix TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            records_added INTEGER NOT NULL,
            shards INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            summary TEXT NOT NULL,
            PRIMARY KEY (dataset_id, version)
        )""")
    db.execute("""
        CREATE TABLE dataset_records (
            dataset_id TEXT NOT NULL REFERENCES datasets(id),
            content_hash TEXT NOT NULL,
            version INTEGER NOT NULL,
            split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
            shard INTEGER NOT NULL,
            position INTEGER NOT NULL,
            group_key TEXT NOT NULL DEFAULT '',
            label TEXT,
            minhash BLOB,
            PRIMARY KEY (dataset_id, content_hash)
        )""")
    db.execute("CREATE INDEX dataset_records_order ON dataset_records(dataset_id, version, shard, position)")


def _migration_5(db: sqlite_utils.Database) -> None:
    """Training runs: what was trained on what, with which recipe, and how well (see appliance.train.runs).

    Lineage for auditors and the registry: base model name + content hash, dataset id + pinned
    version + that version's content hash, the recipe and its hash. The adapter itself is the
    vault object `artifact` (encrypted); metrics are numbers only, never record contents.
    """
    db.execute("""
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('lm', 'classifier')),
            task TEXT,
            job_id TEXT NOT NULL UNIQUE REFERENCES jobs(id),
            base_model TEXT NOT NULL,
            base_hash TEXT,
            dataset_id TEXT NOT NULL REFERENCES datasets(id),
            dataset_name TEXT NOT NULL,
            dataset_version INTEGER NOT NULL,
            dataset_hash TEXT NOT NULL,
            recipe TEXT NOT NULL,
            recipe_hash TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled',
                                                 'interrupted')),
            metrics TEXT NOT NULL DEFAULT '{}',
            lineage TEXT NOT NULL DEFAULT '{}',
            artifact TEXT,
            error TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            actor TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX runs_dataset ON runs(dataset_id, dataset_version)")
    db.execute("CREATE INDEX runs_created ON runs(created_at)")


def _migration_6(db: sqlite_utils.Database) -> None:
    """Accounts: one per person, each with its own passphrase key slot and a role (see appliance.access).

    A vault created before accounts existed gets an `admin` account for each passphrase slot it
    has, so an installed appliance keeps unlocking after the upgrade.
    """
    db.execute("""
        CREATE TABLE users (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'auditor')),
            slot_id TEXT UNIQUE,
            state TEXT NOT NULL CHECK (state IN ('active', 'disabled')),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            failed_unlocks INTEGER NOT NULL DEFAULT 0,
            locked_until TEXT,
            last_unlock_at TEXT,
            disabled_at TEXT,
            CHECK ((state = 'active') = (slot_id IS NOT NULL))
        )""")
    db.execute("""
        CREATE TABLE emergency_access (
            id INTEGER PRIMARY KEY,
            started_at TEXT NOT NULL,
            origin TEXT NOT NULL,
            agent_pid INTEGER,
            acknowledged_by TEXT,
            acknowledged_at TEXT,
            note TEXT
        )""")
    legacy = [r[0] for r in db.execute("SELECT slot_id FROM vault_key_slots WHERE kind = 'passphrase'"
                                        " ORDER BY slot_id")]
    for number, slot_id in enumerate(legacy, start=1):
        db.execute("INSERT INTO users (name, role, slot_id, state, created_at, created_by)"
                   " VALUES (?, 'admin', ?, 'active', ?, 'migration 6')",
                   ["admin" if number == 1 else f"admin{number}", slot_id, datetime.now(UTC).isoformat()])


def _migration_7(db: sqlite_utils.Database) -> None:
    """API keys of the inference server: SHA-256 of each key, never the key (see appliance.serve.api_keys).

    `tasks` is a JSON list of the models a key may use ([] = all). A revoked key keeps its row for
    the audit trail; a name is reused only after its key was revoked.
    """
    db.execute("""
        CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL,
            tasks TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            revoked_at TEXT,
            revoked_by TEXT
        )""")
    db.execute("CREATE UNIQUE INDEX api_keys_active_name ON api_keys(name) WHERE state = 'active'")


def _migration_8(db: sqlite_utils.Database) -> None:
    """Model registry, retraining gates and schedules (see appliance.registry, docs/adr/0007-registry-and-gates.md).

    A model version is a trained artifact with its lineage, gate results and state; exactly one
    version per task is `production` (a partial unique index, so no code path can make two).
    `model_promotions` is the production history that `rollback` walks back. Schedules say when
    `airlock schedule run-due` retrains a task; every due run leaves a `schedule_runs` row, also
    the ones skipped because the vault was locked.
    """
    db.execute("""
        CREATE TABLE model_tasks (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('lm', 'classifier')),
            dataset_id TEXT NOT NULL REFERENCES datasets(id),
            base_model TEXT NOT NULL,
            auto_promote INTEGER NOT NULL DEFAULT 0 CHECK (auto_promote IN (0, 1)),
            max_forgetting REAL NOT NULL DEFAULT 0.05 CHECK (max_forgetting >= 0),
            new_data_tolerance REAL NOT NULL DEFAULT 0.01 CHECK (new_data_tolerance >= 0),
            deploys_engines INTEGER NOT NULL DEFAULT 0 CHECK (deploys_engines IN (0, 1)),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            updated_at TEXT,
            updated_by TEXT
        )""")
    db.execute("""
        CREATE TABLE model_versions (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL REFERENCES model_tasks(name),
            kind TEXT NOT NULL CHECK (kind IN ('lm', 'classifier')),
            number INTEGER NOT NULL CHECK (number >= 1),
            state TEXT NOT NULL CHECK (state IN ('candidate', 'production', 'retired', 'rejected', 'deleted')),
            run_id TEXT NOT NULL UNIQUE REFERENCES runs(id),
            parent_id TEXT REFERENCES model_versions(id),
            base_model TEXT NOT NULL,
            base_hash TEXT,
            dataset_versions TEXT NOT NULL,
            recipe_hash TEXT NOT NULL,
            code_version TEXT NOT NULL,
            metrics TEXT NOT NULL DEFAULT '{}',
            artifacts TEXT NOT NULL DEFAULT '{}',
            gates TEXT NOT NULL DEFAULT '{}',
            reasons TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL,
            actor TEXT NOT NULL,
            state_changed_at TEXT NOT NULL,
            UNIQUE (task, number)
        )""")
    db.execute("CREATE UNIQUE INDEX model_versions_one_production ON model_versions(task) WHERE state = 'production'")
    db.execute("""
        CREATE TABLE model_promotions (
            id INTEGER PRIMARY KEY,
            task TEXT NOT NULL REFERENCES model_tasks(name),
            action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
            version_id TEXT NOT NULL REFERENCES model_versions(id),
            previous_id TEXT REFERENCES model_versions(id),
            actor TEXT NOT NULL,
            reason TEXT NOT NULL,
            at TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX model_promotions_task ON model_promotions(task, id)")
    db.execute("""
        CREATE TABLE schedules (
            task TEXT PRIMARY KEY REFERENCES model_tasks(name),
            every_s INTEGER CHECK (every_s IS NULL OR every_s >= 60),
            cron TEXT,
            min_new_records INTEGER NOT NULL DEFAULT 1 CHECK (min_new_records >= 1),
            inbox TEXT,
            replay REAL NOT NULL DEFAULT 0.2,
            next_due_at TEXT NOT NULL,
            last_run_at TEXT,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            updated_at TEXT,
            CHECK ((every_s IS NULL) != (cron IS NULL))
        )""")
    db.execute("""
        CREATE TABLE schedule_runs (
            id INTEGER PRIMARY KEY,
            task TEXT NOT NULL,
            due_at TEXT NOT NULL,
            ran_at TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('started', 'skipped', 'nothing_new', 'failed')),
            reason TEXT NOT NULL DEFAULT '',
            hint TEXT NOT NULL DEFAULT '',
            job_id TEXT,
            records_imported INTEGER NOT NULL DEFAULT 0,
            actor TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX schedule_runs_task ON schedule_runs(task, id)")


def _migration_9(db: sqlite_utils.Database) -> None:
    """Task policy for retraining classifiers and deploying engines (docs/adr/0007-registry-and-gates.md).

    `ewc_lambda`: strength of the EWC penalty a retrain adds (0 = off). The engine-parity gate of a
    task that deploys engines quantizes `engine_variant` (QAT, or PTQ when `engine_qat` is 0) and
    holds ONNX Runtime parity to `engine_max_rel_diff` / `engine_min_top1` (NULL: the optimize
    stage's own tolerance for the variant).
    """
    for column in ("ewc_lambda REAL NOT NULL DEFAULT 0 CHECK (ewc_lambda >= 0)",
                   "engine_variant TEXT NOT NULL DEFAULT 'int8' CHECK (engine_variant IN ('fp32', 'fp16', 'int8'))",
                   "engine_qat INTEGER NOT NULL DEFAULT 1 CHECK (engine_qat IN (0, 1))",
                   "engine_max_rel_diff REAL CHECK (engine_max_rel_diff IS NULL OR engine_max_rel_diff >= 0)",
                   "engine_min_top1 REAL CHECK (engine_min_top1 IS NULL OR engine_min_top1 BETWEEN 0 AND 1)"):
        db.execute(f"ALTER TABLE model_tasks ADD COLUMN {column}")


def _migration_10(db: sqlite_utils.Database) -> None:
    """The SHA-256 of each vault file's ciphertext as last written (see appliance.vault.store).

    A file that is overwritten (an artifact rewritten by a retried job, an optimize stage) could
    otherwise be swapped back for an older ciphertext of the same object and name: same key, same
    associated data, so it authenticates. Reads check the ciphertext against this row.
    """
    db.execute("""
        CREATE TABLE vault_files (
            object_id TEXT NOT NULL,
            name TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            written_at TEXT NOT NULL,
            PRIMARY KEY (object_id, name)
        )""")


def _migration_11(db: sqlite_utils.Database) -> None:
    """A classifier task's operating point (appliance.train.operating_point, docs/adr/0015-operating-point-gates.md).

    `operating_class`: the class a positive call means (NULL: the second of two classes); then either
    `operating_specificity` (a target; the threshold is set on validation images) or
    `operating_threshold` (fixed, on that class's probability); both NULL: not chosen by the site.
    """
    for column in ("operating_class TEXT",
                   "operating_specificity REAL CHECK (operating_specificity IS NULL OR "
                   "(operating_specificity > 0 AND operating_specificity < 1))",
                   "operating_threshold REAL CHECK (operating_threshold IS NULL OR "
                   "operating_threshold BETWEEN 0 AND 1)"):
        db.execute(f"ALTER TABLE model_tasks ADD COLUMN {column}")


def _migration_12(db: sqlite_utils.Database) -> None:
    """genai exports as the variant a task serves; a task's own quantization recipe (docs/adr/0016).

    `engine_variant` may now name an onnxruntime-genai export (`genai-int4` ...) besides the Q/DQ ones,
    and `engine_recipe` holds the quantization recipe (JSON of appliance.optimize.recipe.QuantRecipe's
    fields; `{}` = its defaults) the retrain's engine gate builds and judges the variant with. SQLite cannot
    change a CHECK constraint in place, so `model_tasks` is rebuilt by SQLite's documented procedure
    (https://sqlite.org/lang_altertable.html#otheralter): foreign keys are off around this migration (see
    `_REBUILDS`), a new table is filled from the old one, the old one dropped, the new one renamed, and
    `PRAGMA foreign_key_check` must find nothing before the transaction commits.
    """
    variants = ", ".join(f"'{v}'" for v in _ENGINE_VARIANTS_12)
    db.execute(f"""
        CREATE TABLE model_tasks_new (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('lm', 'classifier')),
            dataset_id TEXT NOT NULL REFERENCES datasets(id),
            base_model TEXT NOT NULL,
            auto_promote INTEGER NOT NULL DEFAULT 0 CHECK (auto_promote IN (0, 1)),
            max_forgetting REAL NOT NULL DEFAULT 0.05 CHECK (max_forgetting >= 0),
            new_data_tolerance REAL NOT NULL DEFAULT 0.01 CHECK (new_data_tolerance >= 0),
            deploys_engines INTEGER NOT NULL DEFAULT 0 CHECK (deploys_engines IN (0, 1)),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            updated_at TEXT,
            updated_by TEXT,
            ewc_lambda REAL NOT NULL DEFAULT 0 CHECK (ewc_lambda >= 0),
            engine_variant TEXT NOT NULL DEFAULT 'int8' CHECK (engine_variant IN ({variants})),
            engine_qat INTEGER NOT NULL DEFAULT 1 CHECK (engine_qat IN (0, 1)),
            engine_max_rel_diff REAL CHECK (engine_max_rel_diff IS NULL OR engine_max_rel_diff >= 0),
            engine_min_top1 REAL CHECK (engine_min_top1 IS NULL OR engine_min_top1 BETWEEN 0 AND 1),
            operating_class TEXT,
            operating_specificity REAL CHECK (operating_specificity IS NULL OR
                                              (operating_specificity > 0 AND operating_specificity < 1)),
            operating_threshold REAL CHECK (operating_threshold IS NULL OR operating_threshold BETWEEN 0 AND 1),
            engine_recipe TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(engine_recipe)
                                                             AND json_type(engine_recipe) = 'object')
        )""")
    columns = ("name, kind, dataset_id, base_model, auto_promote, max_forgetting, new_data_tolerance, "
               "deploys_engines, created_at, created_by, updated_at, updated_by, ewc_lambda, engine_variant, "
               "engine_qat, engine_max_rel_diff, engine_min_top1, operating_class, operating_specificity, "
               "operating_threshold")
    db.execute(f"INSERT INTO model_tasks_new ({columns}) SELECT {columns} FROM model_tasks")
    db.execute("DROP TABLE model_tasks")
    db.execute("ALTER TABLE model_tasks_new RENAME TO model_tasks")


_ENGINE_VARIANTS_12 = ("fp32", "fp16", "int8", "genai-fp32", "genai-int8", "genai-int4", "genai-fp16-cuda",
                       "genai-bf16-cuda", "genai-int4-cuda")
"""What migration 12 lets `model_tasks.engine_variant` hold (frozen here: a released migration never changes)."""


# Append only: a released migration is never edited, a new one is added at the end.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                             _migration_5, _migration_6, _migration_7,
                                                             _migration_8, _migration_9, _migration_10,
                                                             _migration_11, _migration_12]
SCHEMA_VERSION = len(MIGRATIONS)
_REBUILDS = frozenset({12})
"""Migrations that rebuild a table other tables reference: they run with foreign keys off (it cannot change inside
a transaction) and must leave `PRAGMA foreign_key_check` empty, else they roll back."""


def catalog_path(home: Path | None = None) -> Path:
    return (home or ensure_home()) / CATALOG_FILENAME


# sqlite-utils imports these at import time when they are installed, only to map their scalar types to column types
# for tables it creates from values (sqlite_utils/db.py); the catalog's tables come from the SQL migrations above and
# its rows hold Python values only. numpy alone was ~0.2 of the ~0.5 CPU-s an `airlock` vault command cost (ADR 0022).
_SQLITE_UTILS_OPTIONAL = ("numpy", "pandas")


def _import_sqlite_utils() -> ModuleType:
    """sqlite_utils, loaded without its optional numpy and pandas support where that saves their import.

    A None in `sys.modules` makes an import fail as if the package were not installed (the import system's documented
    behaviour), which sqlite-utils handles as it does a missing package. The entries go as soon as it is loaded, so a
    later `import numpy` in this process (a training job's torch) works as usual. Only in a process with one thread:
    an import of numpy by another thread meanwhile would fail. Where numpy is already loaded, nothing is saved and
    nothing is changed: sqlite-utils then maps numpy's types, which the catalog never gives it.
    """
    if "sqlite_utils" in sys.modules or threading.active_count() > 1:
        import sqlite_utils

        return sqlite_utils
    blocked = [name for name in _SQLITE_UTILS_OPTIONAL if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import sqlite_utils
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return sqlite_utils


def open_catalog(home: Path | None = None, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open (and create or migrate) the catalog under `home` (default: AIRLOCK_HOME)."""
    sqlite_utils = _import_sqlite_utils()

    path = catalog_path(home)
    try:
        # isolation_level=None: no implicit transactions; we and sqlite-utils open them explicitly.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Deleted and overwritten cells are zeroed on every connection, not only the vault's:
        # destroyed keys and removed rows must not linger in free space (crypto-shredding).
        conn.execute("PRAGMA secure_delete=ON")
    except sqlite3.DatabaseError as exc:
        raise CatalogError(
            f"cannot open the catalog {path}: {exc}",
            hint="check that the file is a SQLite database and that you may write to its directory",
        ) from exc
    path.chmod(0o600)
    # No sqlite-utils plugins: they would be any installed package's `sqlite_utils` entry point, run on the catalog's
    # connection (`prepare_connection`); finding them reads every installed distribution's metadata (16 ms a process).
    db = sqlite_utils.Database(conn, execute_plugins=False)
    if migrate:
        migrate_catalog(db, path)
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    if "schema_version" not in db.table_names():
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return row[0] or 0


def migrate_catalog(db: sqlite_utils.Database, path: Path | str = "catalog") -> int:
    """Apply missing migrations, each in its own transaction. Returns the resulting version."""
    with transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        current = schema_version(db)
    if current > SCHEMA_VERSION:
        raise CatalogError(
            f"the catalog {path} has schema version {current}, newer than this appliance knows "
            f"({SCHEMA_VERSION})",
            hint="run the newer airlock release that wrote it, or `airlock upgrade` to it",
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        rebuild = version in _REBUILDS
        if rebuild:
            db.execute("PRAGMA foreign_keys=OFF")
        try:
            with transaction(db):
                # Re-check under the write lock: another process may have migrated meanwhile.
                if schema_version(db) >= version:
                    continue
                MIGRATIONS[version - 1](db)
                if rebuild:
                    _check_foreign_keys(db, path, version)
                db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                           [version, datetime.now(UTC).isoformat()])
        finally:
            if rebuild:
                db.execute("PRAGMA foreign_keys=ON")
    return SCHEMA_VERSION


def _check_foreign_keys(db: sqlite_utils.Database, path: Path | str, version: int) -> None:
    broken = db.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        table, rowid, parent = broken[0][0], broken[0][1], broken[0][2]
        raise CatalogError(
            f"migration {version} of the catalog {path} would leave {len(broken)} row(s) pointing nowhere "
            f"(first: {table} row {rowid} -> {parent}); nothing was changed",
            hint="restore the catalog from its last backup and report this; the appliance keeps the old schema")


# Work that must happen only once the transaction it belongs to has committed (the audit anchor's
# line for a row: a rolled-back row must leave no anchor behind). Keyed by connection.
_AFTER_COMMIT: dict[int, list[Callable[[], None]]] = {}


def after_commit(db: sqlite_utils.Database, action: Callable[[], None]) -> None:
    """Run `action` when the current `transaction(db)` commits (now, outside one); dropped on rollback."""
    if not db.conn.in_transaction:
        action()
        return
    _AFTER_COMMIT.setdefault(id(db.conn), []).append(action)


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """All-or-nothing block holding the write lock. Reentrant: an inner block joins the outer."""
    conn = db.conn
    if conn.in_transaction:
        yield db
        return
    _AFTER_COMMIT.pop(id(conn), None)  # leftovers of a connection that was closed mid-transaction
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        _AFTER_COMMIT.pop(id(conn), None)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    for action in _AFTER_COMMIT.pop(id(conn), []):
        action()
