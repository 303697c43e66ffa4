"""Migration 12: a catalog made by the old schema (migrations 1-11) upgrades in place so that a task's engine variant
may be an onnxruntime-genai export, with its own quantization recipe; a rebuild that would orphan a row rolls back."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from appliance.catalog import MIGRATIONS, SCHEMA_VERSION, migrate_catalog, open_catalog, schema_version, transaction
from appliance.errors import CatalogError

OLD = 11
"""The last schema before genai variants: what an installed appliance's catalog has before the upgrade."""
T = "2026-01-01T00:00:00Z"


def _old_catalog(*, orphan: bool = False):
    db = open_catalog(migrate=False)
    with transaction(db):
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for version, migration in enumerate(MIGRATIONS[:OLD], start=1):
            migration(db)
            db.execute("INSERT INTO schema_version VALUES (?, 'old release')", [version])
        db.execute("INSERT INTO datasets VALUES ('ds1', 'maint', 'text', 'chat', 's', '{}', 'active', ?, 'admin',"
                   " NULL)", [T])
        db.execute("INSERT INTO jobs (id, kind, state, params, actor, created_at) VALUES ('j1', 'train', "
                   "'succeeded', '{}', 'admin', ?)", [T])
        db.execute("INSERT INTO runs (id, kind, job_id, base_model, dataset_id, dataset_name, dataset_version, "
                   "dataset_hash, recipe, recipe_hash, state, created_at, actor) VALUES ('r1', 'lm', 'j1', "
                   "'tiny-deepseek-r1', 'ds1', 'maint', 1, 'h', '{}', 'rh', 'succeeded', ?, 'admin')", [T])
        db.execute("INSERT INTO model_tasks (name, kind, dataset_id, base_model, auto_promote, max_forgetting, "
                   "deploys_engines, created_at, created_by, ewc_lambda, engine_variant, engine_qat, "
                   "engine_max_rel_diff, operating_threshold) VALUES ('maint-qa', 'lm', 'ds1', 'tiny-deepseek-r1', "
                   "1, 0.07, 1, ?, 'admin', 12.5, 'fp16', 0, 0.01, 0.3)", [T])
        db.execute("INSERT INTO model_versions (id, task, kind, number, state, run_id, base_model, dataset_versions,"
                   " recipe_hash, code_version, created_at, actor, state_changed_at) VALUES ('maint-qa-v1', "
                   "'maint-qa', 'lm', 1, 'production', 'r1', 'tiny-deepseek-r1', '[]', 'rh', '0', ?, 'admin', ?)",
                   [T, T])
        db.execute("INSERT INTO model_promotions (task, action, version_id, actor, reason, at) VALUES "
                   "('maint-qa', 'promote', 'maint-qa-v1', 'admin', 'first', ?)", [T])
        db.execute("INSERT INTO schedules (task, every_s, next_due_at, created_at, created_by) VALUES "
                   "('maint-qa', 3600, ?, ?, 'admin')", [T, T])
    if orphan:  # a row an old bug could have left (foreign keys off): the rebuild must not bless it
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("INSERT INTO schedules (task, every_s, next_due_at, created_at, created_by) VALUES "
                   "('gone', 3600, ?, ?, 'admin')", [T, T])
        db.execute("PRAGMA foreign_keys=ON")
    return db


def _task_row(db) -> dict:
    cursor = db.execute("SELECT * FROM model_tasks WHERE name = 'maint-qa'")
    return dict(zip([c[0] for c in cursor.description], cursor.fetchone(), strict=True))


def test_an_old_catalog_upgrades_in_place_and_accepts_genai_variants(airlock_home: Path):
    from appliance.registry.versions import RegistryError, get_task, set_policy

    db = _old_catalog()
    before = _task_row(db)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # the old schema refuses a genai variant
        db.execute("UPDATE model_tasks SET engine_variant = 'genai-int4'")
    assert migrate_catalog(db) == SCHEMA_VERSION == schema_version(db) == OLD + 1

    after = _task_row(db)
    assert after == {**before, "engine_recipe": "{}"}  # every column kept, the new one at its default
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    # The tables that point at tasks still do, and foreign keys still hold against the rebuilt table.
    assert db.execute("SELECT task FROM model_versions").fetchall() == [("maint-qa",)]
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        db.execute("INSERT INTO schedules (task, every_s, next_due_at, created_at, created_by) VALUES "
                   "('nobody', 3600, ?, ?, 'admin')", [T, T])
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        db.execute("DELETE FROM model_tasks WHERE name = 'maint-qa'")
    # The new CHECKs: genai variants yes, made-up ones no; the recipe must be a JSON object.
    db.execute("UPDATE model_tasks SET engine_variant = 'genai-int4' WHERE name = 'maint-qa'")
    for column, bad in (("engine_variant", "genai-int3"), ("engine_recipe", "[1]"), ("engine_recipe", "{nope")):
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute(f"UPDATE model_tasks SET {column} = ? WHERE name = 'maint-qa'", [bad])

    # Through the registry: the policy takes a genai variant and a recipe, checked as `airlock optimize` checks it.
    task = set_policy(db, "maint-qa", actor="admin", engine_variant="genai-int8",
                      engine_recipe={"int4_block_size": 64, "max_perplexity_increase": 0.02})
    assert (task.engine_variant, task.engine_recipe) == ("genai-int8", {"int4_block_size": 64,
                                                                       "max_perplexity_increase": 0.02})
    assert get_task(db, "maint-qa").engine_recipe == task.engine_recipe
    for changes, message in (({"engine_recipe": {"int4_block_size": 24}}, "int4_block_size = 24 is not one of"),
                             ({"engine_recipe": {"block": 32}}, "unknown field(s) block"),
                             ({"engine_variant": "genai-int4-cuda"}, "is not one of fp32, fp16, int8, genai-int4")):
        with pytest.raises(RegistryError, match="engine") as info:
            set_policy(db, "maint-qa", actor="admin", **changes)
        assert message in info.value.message and info.value.hint
    assert get_task(db, "maint-qa").engine_variant == "genai-int8"  # refused changes left the task alone
    audit = [json.loads(d) for (d,) in db.execute("SELECT details FROM audit_log WHERE action = 'models.policy'")]
    assert audit == [{"before": {"engine_variant": "genai-int4", "engine_recipe": {}},
                      "after": {"engine_variant": "genai-int8",
                                "engine_recipe": {"int4_block_size": 64, "max_perplexity_increase": 0.02}}}]


def test_a_rebuild_that_would_orphan_a_row_rolls_back_and_names_it(airlock_home: Path):
    db = _old_catalog(orphan=True)
    with pytest.raises(CatalogError, match=r"migration 12 of the catalog .* would leave 1 row\(s\) pointing nowhere "
                                           r"\(first: schedules row \d+ -> model_tasks\); nothing was changed") as info:
        migrate_catalog(db)
    assert "backup" in info.value.hint
    assert schema_version(db) == OLD and db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    schema = db.execute("SELECT sql FROM sqlite_master WHERE name = 'model_tasks'").fetchone()[0]
    assert "genai" not in schema and "model_tasks_new" not in db.table_names()
    assert _task_row(db)["engine_variant"] == "fp16"
