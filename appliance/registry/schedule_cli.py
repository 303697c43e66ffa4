"""`airlock schedule set|list|delete|run-due`: when tasks retrain unattended.

    airlock schedule set maint-qa --every 7d --min-new-records 50 --inbox /srv/inbox/maint --auto-promote
    airlock schedule set maint-qa --cron "30 2 * * 1"          # 02:30 UTC on Mondays
    airlock schedule run-due --machine-key                     # the timer's command: unlocks as `scheduler` if locked

`run-due` exits 1 when a due run was skipped (vault locked, role) or failed, so a timer shows it.
"""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
MACHINE_IDLE_TIMEOUT_S = 3600
"""The scheduler's key agent outlives the retrain jobs it starts between their checkpoints."""


def _open():
    from appliance.train.cli import open_and_reconcile

    return open_and_reconcile()


@click.group()
def schedule() -> None:
    """Scheduled incremental retraining (with an optional inbox folder for new data)."""


@schedule.command("set")
@click.argument("task")
@click.option("--every", help="Interval: 30m, 12h, 7d, 2w. A new --every schedule is due at once.")
@click.option("--cron", help='Five-field cron expression in UTC, e.g. "30 2 * * 1".')
@click.option("--min-new-records", type=click.IntRange(min=1), default=1, show_default=True,
              help="Retrain only when at least this many records arrived since the production version's data.")
@click.option("--inbox", type=click.Path(path_type=Path, file_okay=False),
              help="Folder whose files are imported into the task's dataset on each run (then moved to "
                   "processed/ or rejected/).")
@click.option("--replay", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Share of earlier records in each retrain's mix.")
@click.option("--auto-promote/--no-auto-promote", default=None,
              help="Promote retrains whose gates pass (the task's policy; unchanged if not given).")
@_json
def schedule_set(task: str, every: str | None, cron: str | None, min_new_records: int, inbox: Path | None,
                 replay: float, auto_promote: bool | None, as_json: bool) -> None:
    """Create or replace TASK's schedule (admin)."""
    from appliance.access import require
    from appliance.paths import airlock_home
    from appliance.registry.schedule import set_schedule

    db = _open()
    session = require(db, airlock_home(), "schedules.manage")
    result = set_schedule(db, task, actor=session.actor, every=every, cron=cron, min_new_records=min_new_records,
                          inbox=inbox, replay=replay, auto_promote=auto_promote)
    if as_json:
        echo_json({"schedule": result.to_dict()})
        return
    click.echo(f"{task}: {result.when}, next due {result.next_due_at}, at least {result.min_new_records} new "
               f"records" + (f", inbox {result.inbox}" if result.inbox else ""))


@schedule.command("list")
@_json
def schedule_list(as_json: bool) -> None:
    """Schedules with their next due time, auto-promotion and last outcome."""
    from appliance.registry.schedule import last_runs, list_schedules
    from appliance.registry.versions import get_task

    db = _open()
    found = list_schedules(db)
    if as_json:
        echo_json({"schedules": [{**s.to_dict(), "auto_promote": get_task(db, s.task).auto_promote,
                                  "last_runs": last_runs(db, s.task)} for s in found]})
        return
    if not found:
        click.echo("no schedules: `airlock schedule set TASK --every 7d`")
        return
    rows = []
    for s in found:
        last = last_runs(db, s.task, 1)
        outcome = f"{last[0]['outcome']}: {last[0]['reason']} ({last[0]['ran_at']})" if last else "never ran"
        rows.append((s.task, s.when, s.next_due_at, "on" if get_task(db, s.task).auto_promote else "off",
                     s.min_new_records, outcome))
    echo_table(rows, ["task", "when", "next due (UTC)", "auto-promote", "min new", "last run"])


@schedule.command("delete")
@click.argument("task")
def schedule_delete(task: str) -> None:
    """Remove TASK's schedule (admin)."""
    from appliance.access import require
    from appliance.paths import airlock_home
    from appliance.registry.schedule import delete_schedule

    db = _open()
    session = require(db, airlock_home(), "schedules.manage")
    delete_schedule(db, task, actor=session.actor)
    click.echo(f"{task}: schedule removed")


@schedule.command("run-due")
@click.option("--task", help="Only this task's schedule.")
@click.option("--force", is_flag=True, help="Run even if not due yet.")
@click.option("--machine-key", "use_machine_key", is_flag=True,
              help="If the vault is locked, unlock it with the machine key first (the `scheduler` account).")
@click.option("--machine-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The machine key file [default: $AIRLOCK_HOME/vault/machine.key].")
@_json
def schedule_run_due(task: str | None, force: bool, use_machine_key: bool, machine_key_file: Path | None,
                     as_json: bool) -> int:
    """Run every due schedule: import its inbox, retrain when enough new records arrived.

    Needs the scheduler session (`airlock vault unlock --machine-key`) or a logged-in operator or
    admin. With the vault locked every due run is recorded as `skipped: vault locked` (and stays
    due); the command then exits 1.
    """
    from appliance.paths import airlock_home
    from appliance.registry.schedule import LOCKED_REASON, run_due

    db, home = _open(), airlock_home()
    locked_reason = LOCKED_REASON
    if use_machine_key or machine_key_file:
        locked_reason = _unlock_with_machine_key(db, home, machine_key_file) or LOCKED_REASON
    results = run_due(db, home, task=task, force=force, locked_reason=locked_reason)
    trouble = [r for r in results if r.outcome in ("skipped", "failed")]
    if as_json:
        echo_json({"runs": [r.to_dict() for r in results]})
        return 1 if trouble else 0
    if not results:
        click.echo("nothing due")
    for r in results:
        click.echo(f"{r.task}: {r.outcome}: {r.reason}" + (f" (job {r.job_id})" if r.job_id else ""))
    for hint in dict.fromkeys(r.hint for r in trouble if r.hint):
        click.echo(f"hint: {hint}", err=True)
    return 1 if trouble else 0


def _unlock_with_machine_key(db, home: Path, key_file: Path | None) -> str | None:
    """Start the scheduler's session unless someone is logged in. Returns why it could not, or None."""
    from appliance.access import current_session
    from appliance.errors import AirlockError
    from appliance.registry.schedule import LOCKED_REASON
    from appliance.vault.lifecycle import Credential, default_machine_key_path, unlock_vault

    if current_session(home) is not None:
        return None
    try:
        unlock_vault(db, home, Credential.machine(key_file or default_machine_key_path(home)), MACHINE_IDLE_TIMEOUT_S)
    except AirlockError as exc:
        return f"{LOCKED_REASON} (machine key: {exc.message})"
    return None
