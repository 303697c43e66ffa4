"""Job rows and progress events in the catalog. Params and events never hold PHI or keys."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.audit import append_audit, canonical_json, current_actor
from appliance.catalog import transaction
from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")


class JobError(AirlockError):
    """A job id is unknown, or the job is not in a state that allows the request."""


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: str
    params: dict[str, Any]
    actor: str
    device: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    pid: int | None
    pid_start: str | None
    cancel_requested: bool
    error: str | None
    hint: str | None
    result: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("pid_start",)}


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    ts: str
    kind: str
    message: str
    data: dict[str, Any]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_COLUMNS = ("id, kind, state, params, actor, device, created_at, started_at, finished_at, pid, pid_start, "
            "cancel_requested, error, hint, result")


def _job(row: tuple) -> Job:
    return Job(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7], row[8], row[9], row[10],
               bool(row[11]), row[12], row[13], json.loads(row[14]) if row[14] else None)


def create_job(db: sqlite_utils.Database, kind: str, params: dict[str, Any], *, device: str = "cpu",
               actor: str | None = None) -> Job:
    job_id = f"{kind.replace('_', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    actor = actor or current_actor()
    with transaction(db):
        db.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, 'queued', ?, ?, ?, ?, NULL, NULL, NULL, NULL, 0,"
                   " NULL, NULL, NULL)", [job_id, kind, canonical_json(params), actor, device, now()])
        add_event(db, job_id, "state", "queued")
        append_audit(db, "job.create", job_id, {"kind": kind, "device": device, "params": params}, actor=actor)
    return get_job(db, job_id)


def get_job(db: sqlite_utils.Database, job_id: str) -> Job:
    row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", [job_id]).fetchone()
    if row is None:
        raise JobError(f"no job {job_id!r}", hint="list jobs with `airlock jobs list`")
    return _job(row)


def list_jobs(db: sqlite_utils.Database, *, state: str | None = None, limit: int = 50) -> list[Job]:
    sql = f"SELECT {_COLUMNS} FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY created_at DESC LIMIT ?"
    return [_job(r) for r in db.execute(sql, [state, limit] if state else [limit])]


def add_event(db: sqlite_utils.Database, job_id: str, kind: str, message: str = "",
              data: dict[str, Any] | None = None) -> None:
    with transaction(db):
        db.execute("INSERT INTO job_events (job_id, ts, kind, message, data) VALUES (?, ?, ?, ?, ?)",
                   [job_id, now(), kind, message, canonical_json(data or {})])


def events(db: sqlite_utils.Database, job_id: str, *, after_id: int = 0, kind: str | None = None,
           limit: int | None = None) -> list[JobEvent]:
    sql = "SELECT id, job_id, ts, kind, message, data FROM job_events WHERE job_id = ? AND id > ?"
    params: list[Any] = [job_id, after_id]
    if kind:
        sql += " AND kind = ?"
        params.append(kind)
    sql += " ORDER BY id"
    if limit:
        sql = f"SELECT * FROM ({sql.replace('ORDER BY id', 'ORDER BY id DESC')} LIMIT ?) ORDER BY id"
        params.append(limit)
    return [JobEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in db.execute(sql, params)]


def set_state(db: sqlite_utils.Database, job_id: str, state: str, *, error: str | None = None,
              hint: str | None = None, result: dict[str, Any] | None = None, pid: int | None = None,
              pid_start: str | None = None) -> None:
    """Move a job to `state` with its audit row, in one transaction."""
    with transaction(db):
        job = get_job(db, job_id)
        stamp = now()
        db.execute("UPDATE jobs SET state = ?, error = COALESCE(?, error), hint = COALESCE(?, hint),"
                   " result = COALESCE(?, result), pid = COALESCE(?, pid), pid_start = COALESCE(?, pid_start),"
                   " started_at = CASE WHEN ? = 'running' THEN ? ELSE started_at END,"
                   " finished_at = CASE WHEN ? IN ('succeeded', 'failed', 'cancelled', 'interrupted') THEN ?"
                   " ELSE finished_at END WHERE id = ?",
                   [state, error, hint, canonical_json(result) if result is not None else None, pid, pid_start,
                    state, stamp, state, stamp, job_id])
        add_event(db, job_id, "state", state, {"error": error} if error else {})
        details: dict[str, Any] = {"kind": job.kind, "from": job.state, "to": state}
        if error:
            details["error"] = error
        append_audit(db, f"job.{state}", job_id, details, actor=job.actor)


def request_cancel(db: sqlite_utils.Database, job_id: str) -> Job:
    with transaction(db):
        job = get_job(db, job_id)
        if job.state in FINAL_STATES:
            raise JobError(f"job {job_id} is already {job.state}", hint="nothing to cancel")
        db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", [job_id])
        append_audit(db, "job.cancel_requested", job_id, {"kind": job.kind, "state": job.state})
    return get_job(db, job_id)
