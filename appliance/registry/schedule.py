"""Scheduled retraining: when each task retrains, and `run_due`, which a systemd timer calls.

    airlock schedule set maint-qa --every 7d --min-new-records 50 --inbox /srv/airlock/inbox/maint
    airlock vault unlock --machine-key && airlock schedule run-due      # what the timer runs

A due schedule imports its inbox (appliance.registry.inbox), counts the records imported since
the production version's data, and starts a `retrain` job when there are at least
`min_new_records`. Every due run leaves a `schedule_runs` row and an audit row, whatever happens:
`started`, `nothing_new`, `failed` (with the error), or `skipped` when nobody can act for it
(vault locked, or a role that may not retrain). A skipped run stays due, so it happens on the
first `run-due` after the vault is unlocked; the others move on to the next time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.audit import append_audit
from appliance.catalog import transaction
from appliance.errors import AirlockError
from appliance.registry import cron as cron_spec
from appliance.registry.versions import RegistryError, get_task, set_policy

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.access import Session

LOCKED_REASON = "vault locked"
LOCKED_HINT = ("unlock first: `airlock vault unlock --machine-key` (the scheduler account), or log in with "
               "`airlock vault unlock --user NAME`, or run `airlock schedule run-due --machine-key`; the run stays "
               "due and happens at the next run-due")


@dataclass(frozen=True)
class Schedule:
    task: str
    every_s: int | None
    cron: str | None
    min_new_records: int
    inbox: str | None
    replay: float
    next_due_at: str
    last_run_at: str | None
    created_at: str
    created_by: str
    updated_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def when(self) -> str:
        return f"cron {self.cron} (UTC)" if self.cron else f"every {_interval_text(self.every_s or 0)}"


@dataclass(frozen=True)
class DueRun:
    task: str
    outcome: str
    """started | skipped | nothing_new | failed"""
    reason: str
    hint: str
    job_id: str | None = None
    records_imported: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = [f.name for f in fields(Schedule)]


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _interval_text(seconds: int) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def next_due(schedule_every_s: int | None, cron: str | None, after: datetime) -> datetime:
    if cron:
        found = cron_spec.next_cron_time(cron_spec.parse_cron(cron), after.astimezone(UTC).replace(tzinfo=None))
        assert found is not None  # parse_cron refuses expressions that never match
        return found.replace(tzinfo=UTC)
    return after + timedelta(seconds=schedule_every_s or 0)


def get_schedule(db: sqlite_utils.Database, task: str) -> Schedule | None:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM schedules WHERE task = ?", [task]).fetchone()
    return Schedule(*row) if row else None


def list_schedules(db: sqlite_utils.Database) -> list[Schedule]:
    return [Schedule(*r) for r in db.execute(f"SELECT {', '.join(_COLUMNS)} FROM schedules ORDER BY task")]


def last_runs(db: sqlite_utils.Database, task: str, limit: int = 5) -> list[dict[str, Any]]:
    rows = db.execute("SELECT id, due_at, ran_at, outcome, reason, hint, job_id, records_imported, actor"
                      " FROM schedule_runs WHERE task = ? ORDER BY id DESC LIMIT ?", [task, limit])
    keys = ("id", "due_at", "ran_at", "outcome", "reason", "hint", "job_id", "records_imported", "actor")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def set_schedule(db: sqlite_utils.Database, task_name: str, *, actor: str, every: str | None = None,
                 cron: str | None = None, min_new_records: int = 1, inbox: Path | None = None, replay: float = 0.2,
                 auto_promote: bool | None = None) -> Schedule:
    """Create or replace the task's schedule (audited). A new `--every` schedule is due at once."""
    task = get_task(db, task_name)
    if (every is None) == (cron is None):
        raise cron_spec.ScheduleSpecError("a schedule needs exactly one of --every and --cron",
                                          hint="e.g. --every 7d, or --cron \"30 2 * * 1\" (02:30 UTC on Mondays)")
    every_s = cron_spec.parse_every(every) if every else None
    if every_s is not None and every_s < 60:
        raise cron_spec.ScheduleSpecError("--every must be at least 1m", hint="e.g. --every 1d")
    cron_text = cron_spec.parse_cron(cron).text if cron else None
    if min_new_records < 1:
        raise RegistryError("--min-new-records must be at least 1", hint="e.g. --min-new-records 50")
    if not 0 <= replay <= 0.9:
        raise RegistryError(f"--replay {replay} is outside 0..0.9", hint="e.g. --replay 0.2")
    inbox_text = None
    if inbox is not None:
        inbox = inbox.expanduser().resolve()
        if not inbox.is_dir():
            raise RegistryError(f"inbox {inbox} is not a folder", hint="create it (writable by the appliance's account)"
                                                                       " and pass its path")
        inbox_text = str(inbox)
    now = datetime.now(UTC)
    due = next_due(None, cron_text, now) if cron_text else now
    with transaction(db):
        existed = get_schedule(db, task.name) is not None
        db.execute("INSERT INTO schedules (task, every_s, cron, min_new_records, inbox, replay, next_due_at,"
                   " created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                   " ON CONFLICT(task) DO UPDATE SET every_s = excluded.every_s, cron = excluded.cron,"
                   " min_new_records = excluded.min_new_records, inbox = excluded.inbox, replay = excluded.replay,"
                   " next_due_at = excluded.next_due_at, updated_at = excluded.created_at",
                   [task.name, every_s, cron_text, min_new_records, inbox_text, replay, _iso(due), _iso(now), actor])
        append_audit(db, "schedule.set", task.name, {
            "every_s": every_s, "cron": cron_text, "min_new_records": min_new_records, "inbox": inbox_text is not None,
            "replay": replay, "next_due_at": _iso(due), "replaced": existed}, actor=actor)
        if auto_promote is not None:
            set_policy(db, task.name, actor=actor, auto_promote=auto_promote)
    schedule = get_schedule(db, task.name)
    assert schedule is not None
    return schedule


def delete_schedule(db: sqlite_utils.Database, task: str, *, actor: str) -> None:
    with transaction(db):
        if get_schedule(db, task) is None:
            raise RegistryError(f"task {task!r} has no schedule", hint="see them with `airlock schedule list`")
        db.execute("DELETE FROM schedules WHERE task = ?", [task])
        append_audit(db, "schedule.delete", task, {}, actor=actor)


def _record(db: sqlite_utils.Database, schedule: Schedule, run: DueRun, *, actor: str, advance: bool,
            when: datetime) -> None:
    with transaction(db):
        db.execute("INSERT INTO schedule_runs (task, due_at, ran_at, outcome, reason, hint, job_id, records_imported,"
                   " actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [schedule.task, schedule.next_due_at, _iso(when), run.outcome, run.reason, run.hint, run.job_id,
                    run.records_imported, actor])
        if advance:
            db.execute("UPDATE schedules SET last_run_at = ?, next_due_at = ? WHERE task = ?",
                       [_iso(when), _iso(next_due(schedule.every_s, schedule.cron, when)), schedule.task])
        details: dict[str, Any] = {"outcome": run.outcome, "due_at": schedule.next_due_at}
        for key in ("reason", "job_id", "records_imported"):
            if getattr(run, key):
                details[key] = getattr(run, key)
        append_audit(db, f"schedule.{run.outcome}", schedule.task, details, actor=actor)


def run_due(db: sqlite_utils.Database, home: Path, *, task: str | None = None, force: bool = False,
            now: datetime | None = None, locked_reason: str = LOCKED_REASON) -> list[DueRun]:
    """Run every due schedule (or `task`'s; `force`: due or not). Each outcome is recorded and returned.

    Nobody logged in: every due run is recorded as skipped with `locked_reason` and stays due."""
    from appliance.access import current_session

    when = now or datetime.now(UTC)
    due = [s for s in list_schedules(db) if (task is None or s.task == task)
           and (force or _parse(s.next_due_at) <= when)]
    if task is not None and not due and get_schedule(db, task) is None:
        raise RegistryError(f"task {task!r} has no schedule", hint=f"add one with `airlock schedule set {task} "
                                                                   "--every 7d`")
    session = current_session(home)
    out = []
    for schedule in due:
        if session is None:
            run = DueRun(schedule.task, "skipped", locked_reason, LOCKED_HINT)
            _record(db, schedule, run, actor=_os_actor(), advance=False, when=when)
        elif not (session.allows("train.start") and session.allows("data.import")):
            run = DueRun(schedule.task, "skipped", f"{session.account} ({session.role}) may not retrain",
                         "run it as the scheduler (`airlock vault unlock --machine-key`), an operator or an admin")
            _record(db, schedule, run, actor=session.actor, advance=False, when=when)
        else:
            run = _run_one(db, schedule, session)
            _record(db, schedule, run, actor=session.actor, advance=True, when=when)
        out.append(run)
    return out


def _os_actor() -> str:
    from appliance.access import origin

    return origin()


def _run_one(db: sqlite_utils.Database, schedule: Schedule, session: Session) -> DueRun:
    from appliance.registry.inbox import import_inbox
    from appliance.registry.retrain import learned_version, new_record_counts, start_retrain
    from appliance.registry.versions import production

    imported = 0
    try:
        task = get_task(db, schedule.task)
        if schedule.inbox:
            dataset = db.execute("SELECT name FROM datasets WHERE id = ? AND state = 'active'",
                                 [task.dataset_id]).fetchone()
            if dataset is None:
                raise RegistryError(f"the dataset of task {task.name} was deleted", hint="retrain cannot continue; "
                                                                                       "delete this schedule")
            result = import_inbox(db, Path(schedule.inbox), dataset[0], actor=session.actor)
            imported = result.records_imported
        parent = production(db, task.name)
        if parent is None:
            raise RegistryError(f"task {task.name} has no production version to retrain",
                                hint="promote one with `airlock models promote ID`")
        counts = new_record_counts(db, task.dataset_id, learned_version(parent, task.dataset_id))
        new = counts["train"] + counts["val"] + counts["test"]
        if new < schedule.min_new_records:
            return DueRun(schedule.task, "nothing_new", f"{new} new records since {parent.id}, fewer than "
                                                        f"{schedule.min_new_records}", "", records_imported=imported)
        run, job = start_retrain(db, task.name, session=session, replay=schedule.replay)
        return DueRun(schedule.task, "started", f"{new} new records since {parent.id}; run {run.id}",
                      f"follow it with `airlock jobs show {job.id}`", job.id, imported)
    except AirlockError as exc:
        return DueRun(schedule.task, "failed", exc.message, exc.hint or "", records_imported=imported)
