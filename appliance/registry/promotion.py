"""Promote, roll back and delete model versions: each is one catalog transaction with its audit row.

Promotion retires the task's current production version and makes the new one production in the
same transaction, and appends to `model_promotions` (who, why, what it replaced). Rollback walks
that history back: the version the current one replaced becomes production again. The partial
unique index on `model_versions` keeps a task from ever having two production versions, whatever
the order of concurrent writers; the server sees either the old or the new version, never none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit import append_audit
from appliance.catalog import transaction
from appliance.registry.versions import ModelVersion, RegistryError, get_task, get_version, now, production

if TYPE_CHECKING:
    import sqlite_utils

_PROMOTABLE = ("candidate", "retired")


def _set_state(db: sqlite_utils.Database, version: str, state: str) -> None:
    db.execute("UPDATE model_versions SET state = ?, state_changed_at = ? WHERE id = ?", [state, now(), version])


def _record(db: sqlite_utils.Database, task: str, action: str, version: str, previous: str | None, actor: str,
            reason: str) -> None:
    db.execute("INSERT INTO model_promotions (task, action, version_id, previous_id, actor, reason, at)"
               " VALUES (?, ?, ?, ?, ?, ?, ?)", [task, action, version, previous, actor, reason, now()])


def promote(db: sqlite_utils.Database, version: str, *, actor: str, reason: str = "",
            expect_production: str | None = None) -> tuple[ModelVersion, ModelVersion | None]:
    """Make `version` its task's production version. Returns (promoted, the version it replaced).

    `expect_production`: promote only if this is still the production version (an automatic
    promotion must not replace something a person promoted while the retrain ran).
    """
    with transaction(db):
        target = get_version(db, version)
        if target.state == "production":
            raise RegistryError(f"{version} is already in production", hint="nothing to do")
        if target.state not in _PROMOTABLE:
            why = f": {'; '.join(target.reasons)}" if target.reasons else ""
            raise RegistryError(f"{version} is {target.state} and cannot be promoted{why}",
                                hint="promote a candidate or a retired version (`airlock models list --task "
                                     f"{target.task}`); retrain to get a new candidate")
        previous = production(db, target.task)
        if expect_production is not None and (previous is None or previous.id != expect_production):
            raise RegistryError(f"production of {target.task} changed while {version} was being made",
                                hint=f"review it and promote it by hand: `airlock models promote {version}`")
        if previous is not None:
            _set_state(db, previous.id, "retired")
        _set_state(db, target.id, "production")
        _record(db, target.task, "promote", target.id, previous.id if previous else None, actor, reason)
        append_audit(db, "models.promote", target.id, {
            "task": target.task, "replaced": previous.id if previous else None, "reason": reason,
            "run": target.run_id, "gates": {k: v.get("status") for k, v in target.gates.items()
                                            if isinstance(v, dict)}}, actor=actor)
    return get_version(db, version), get_version(db, previous.id) if previous else None


def rollback_target(db: sqlite_utils.Database, task: str) -> tuple[ModelVersion, ModelVersion]:
    """(current production, the version it replaced when it was promoted), or a RegistryError saying why not."""
    current = production(db, task)
    if current is None:
        raise RegistryError(f"task {task!r} has no production version to roll back",
                            hint=f"promote one with `airlock models promote ID` (`airlock models list --task {task}`)")
    row = db.execute("SELECT previous_id FROM model_promotions WHERE task = ? AND version_id = ? AND action = 'promote'"
                     " ORDER BY id DESC LIMIT 1", [task, current.id]).fetchone()
    if row is None or row[0] is None:
        raise RegistryError(f"{current.id} was the first production version of {task}; there is nothing to roll "
                            "back to", hint="promote another version instead (`airlock models promote ID`)")
    earlier = get_version(db, row[0])
    if earlier.state != "retired":
        raise RegistryError(f"{current.id} replaced {earlier.id}, which is now {earlier.state}",
                            hint="promote the version you want by hand (`airlock models promote ID`)")
    return current, earlier


def rollback(db: sqlite_utils.Database, task: str, *, actor: str, reason: str = ""
             ) -> tuple[ModelVersion, ModelVersion]:
    """Put back the version the current production replaced. Returns (restored, retired)."""
    get_task(db, task)
    with transaction(db):
        current, earlier = rollback_target(db, task)
        _set_state(db, current.id, "retired")
        _set_state(db, earlier.id, "production")
        _record(db, task, "rollback", earlier.id, current.id, actor, reason)
        append_audit(db, "models.rollback", task, {"restored": earlier.id, "retired": current.id, "reason": reason},
                     actor=actor)
    return get_version(db, earlier.id), get_version(db, current.id)


def delete_version(db: sqlite_utils.Database, home: Path, version: str, *, actor: str) -> ModelVersion:
    """Crypto-shred a version's weights (the run's vault object) and mark it deleted; the row stays for lineage.

    Derived artifacts (ONNX, engines) recorded on the version are shredded too when they are vault objects.
    """
    from appliance.vault import records
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import delete_object

    target = get_version(db, version)
    if target.state == "production":
        raise RegistryError(f"{version} is in production and cannot be deleted",
                            hint=f"promote another version or roll back first (`airlock models rollback "
                                 f"{target.task}`)")
    if target.state == "deleted":
        raise RegistryError(f"{version} was already deleted", hint="nothing to do")
    with transaction(db):
        _set_state(db, target.id, "deleted")
        append_audit(db, "models.delete", target.id, {"task": target.task, "from": target.state,
                                                      "objects": sorted({a.get("object") for a in
                                                                         target.artifacts.values()
                                                                         if a.get("object")})}, actor=actor)
    for object_id in sorted({a.get("object") for a in target.artifacts.values() if a.get("object")}):
        try:
            if records.dek(db, object_id).state == "active":
                delete_object(db, home, object_id)
        except ObjectError:
            continue  # not a vault object (or already gone): nothing to shred
    return get_version(db, version)
