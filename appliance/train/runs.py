"""Training runs in the catalog: lineage, state, metrics and the adapter's vault object. Metadata only.

A run is created together with its job (`appliance.train.jobs.start_training`), pinned to one
dataset version. The job fills in the base model's content hash when it starts, and metrics and
the artifact (vault object id) when it ends. The registry (promotion, a later stage) reads these
rows; nothing here holds record contents. Every state change is written with its audit row.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.audit import append_audit, canonical_json
from appliance.catalog import transaction
from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

KINDS = ("lm", "classifier")
STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
_AUDIT_ACTION = {"succeeded": "train.finish", "failed": "train.fail", "cancelled": "train.cancel",
                 "interrupted": "train.interrupted"}


class RunError(AirlockError):
    """A run id is unknown, or the run is not in a state that allows the request."""


@dataclass(frozen=True)
class Run:
    id: str
    kind: str
    task: str | None
    job_id: str
    base_model: str
    base_hash: str | None
    """SHA-256 over the base model's files; None until the job has started."""
    dataset_id: str
    dataset_name: str
    dataset_version: int
    dataset_hash: str
    """Content hash of the pinned dataset version (`dataset_versions.content_hash`)."""
    recipe: dict[str, Any]
    recipe_hash: str
    state: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    """Everything else needed to reproduce the run: all version hashes read, split sizes, tokenizer hash."""
    artifact: str | None
    """Vault object holding the adapter (or classifier weights), once the run succeeded."""
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    actor: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = [f.name for f in fields(Run)]
_JSON_COLUMNS = {"recipe", "metrics", "lineage"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_run_id(kind: str) -> str:
    return f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def finite(value: Any) -> Any:
    """NaN and infinities become None: the catalog stores strict JSON (and an AUC of NaN means 'undefined')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _run(row: tuple) -> Run:
    values = {name: (json.loads(value) if name in _JSON_COLUMNS else value) for name, value in zip(_COLUMNS, row,
                                                                                                   strict=True)}
    return Run(**values)


def insert_run(db: sqlite_utils.Database, run: Run) -> None:
    """Write a new run row with its `train.create` audit row (joins the caller's transaction)."""
    values = [canonical_json(finite(getattr(run, c))) if c in _JSON_COLUMNS else getattr(run, c) for c in _COLUMNS]
    with transaction(db):
        db.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        append_audit(db, "train.create", run.id, {
            "kind": run.kind, "job": run.job_id, "base_model": run.base_model, "dataset_id": run.dataset_id,
            "dataset_version": run.dataset_version, "dataset_hash": run.dataset_hash, "recipe_hash": run.recipe_hash},
            actor=run.actor)


def get_run(db: sqlite_utils.Database, run_id: str) -> Run:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", [run_id]).fetchone()
    if row is None:
        raise RunError(f"no training run {run_id!r}", hint="list runs with `airlock train runs`")
    return _run(row)


def run_for_job(db: sqlite_utils.Database, job_id: str) -> Run:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE job_id = ?", [job_id]).fetchone()
    if row is None:
        raise RunError(f"job {job_id} has no training run", hint="start training with `airlock train lm` or "
                                                                 "`airlock train classifier`")
    return _run(row)


def list_runs(db: sqlite_utils.Database, *, state: str | None = None, kind: str | None = None,
              limit: int = 50) -> list[Run]:
    sql, params = f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE 1 = 1", []
    if state:
        sql += " AND state = ?"
        params.append(state)
    if kind:
        sql += " AND kind = ?"
        params.append(kind)
    return [_run(r) for r in db.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit])]


def mark_running(db: sqlite_utils.Database, run: Run, *, base_hash: str, lineage: dict[str, Any]) -> Run:
    """The job has (re)started: record the base model's hash and the lineage; audit start or resume."""
    resumed = run.started_at is not None
    with transaction(db):
        db.execute("UPDATE runs SET state = 'running', base_hash = ?, lineage = ?, error = NULL,"
                   " started_at = COALESCE(started_at, ?), finished_at = NULL WHERE id = ?",
                   [base_hash, canonical_json(finite(lineage)), now(), run.id])
        append_audit(db, "train.resume" if resumed else "train.start", run.id, {
            "kind": run.kind, "job": run.job_id, "base_model": run.base_model, "base_hash": base_hash,
            "dataset_id": run.dataset_id, "dataset_version": run.dataset_version, "dataset_hash": run.dataset_hash,
            "recipe_hash": run.recipe_hash, "from_state": run.state}, actor=run.actor)
    return get_run(db, run.id)


def finish_run(db: sqlite_utils.Database, run_id: str, state: str, *, metrics: dict[str, Any] | None = None,
               artifact: str | None = None, error: str | None = None) -> Run:
    """Move a run to a final state with its audit row. Metrics are numbers only (no record contents)."""
    if state not in _AUDIT_ACTION:
        raise ValueError(f"{state} is not a final run state")
    with transaction(db):
        run = get_run(db, run_id)
        db.execute("UPDATE runs SET state = ?, metrics = COALESCE(?, metrics), artifact = COALESCE(?, artifact),"
                   " error = ?, finished_at = ? WHERE id = ?",
                   [state, canonical_json(finite(metrics)) if metrics is not None else None, artifact, error, now(),
                    run_id])
        details: dict[str, Any] = {"kind": run.kind, "job": run.job_id, "from": run.state}
        if artifact:
            details["artifact"] = artifact
        if error:
            details["error"] = error
        if metrics:
            details["metrics"] = finite({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        append_audit(db, _AUDIT_ACTION[state], run_id, details, actor=run.actor)
    return get_run(db, run_id)


def sync_with_jobs(db: sqlite_utils.Database) -> list[str]:
    """Runs whose job ended without telling them (kill -9, power loss) take the job's final state.

    Call after `jobs.runner.reconcile_jobs`. Returns the run ids changed.
    """
    stale = db.execute("SELECT runs.id, jobs.state, jobs.error FROM runs JOIN jobs ON jobs.id = runs.job_id"
                       " WHERE runs.state IN ('queued', 'running')"
                       " AND jobs.state IN ('failed', 'cancelled', 'interrupted')").fetchall()
    for run_id, state, error in stale:
        finish_run(db, run_id, state, error=error)
    return [row[0] for row in stale]
