"""`airlock jobs list|show|logs|cancel|resume` (and the hidden `jobs run`, the detached process)."""

from __future__ import annotations

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _open():
    from appliance.catalog import open_catalog
    from appliance.jobs.runner import reconcile_jobs

    db = open_catalog()
    reconcile_jobs(db)
    return db


@click.group()
def jobs() -> None:
    """Long-running work (training, exports, verification) running as detached processes."""


@jobs.command("list")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@_json
def jobs_list(state: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    from appliance.jobs.records import events, list_jobs

    db = _open()
    found = list_jobs(db, state=state, limit=limit)
    if as_json:
        echo_json({"jobs": [j.to_dict() for j in found]})
        return
    if not found:
        click.echo("no jobs")
        return
    rows = []
    for job in found:
        last = events(db, job.id, kind="progress", limit=1)
        progress = _progress_text(last[0].data) if last else ""
        rows.append((job.id, job.state, job.actor, progress or (job.error or "")))
    echo_table(rows, ["job", "state", "by", "progress / error"])


def follow_job(db, job_id: str, *, quiet: bool = False, describe=None):
    """Print a job's events to stderr until it ends: the `--wait` of every command that starts a job.

    `describe(event)` words a progress event that has a step (default: step/total, loss, eta).
    Returns the job in its final state, or None when the operator pressed Ctrl-C (the job keeps
    running)."""
    from appliance.jobs.records import JobEvent
    from appliance.jobs.runner import wait_for

    def show(event: JobEvent) -> None:
        if quiet:
            return
        if event.kind == "progress" and "step" in event.data:
            click.echo(describe(event) if describe else _progress_text(event.data), err=True)
        elif event.kind in ("progress", "log"):
            click.echo(event.message, err=True)
        elif event.kind == "state":
            click.echo(f"job {event.message}", err=True)

    try:
        return wait_for(db, job_id, timeout_s=30 * 24 * 3600, on_event=show)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running (`airlock jobs show {job_id}`, "
                   f"`airlock jobs cancel {job_id}`)", err=True)
        return None


def _progress_text(data: dict) -> str:
    if "step" in data and "total_steps" in data:
        text = f"step {data['step']}/{data['total_steps']}"
        if data.get("loss") is not None:
            text += f" loss {data['loss']:.4f}"
        if data.get("eta_s"):
            text += f" eta {int(data['eta_s'])} s"
        return text
    if "files_done" in data and "files_total" in data:
        text = f"files {data['files_done']}/{data['files_total']}, {data.get('records', 0)} records"
        if data.get("eta_s"):
            text += f" eta {int(data['eta_s'])} s"
        return text
    return ", ".join(f"{k} {v}" for k, v in sorted(data.items()))


@jobs.command("show")
@click.argument("job_id")
@_json
def jobs_show(job_id: str, as_json: bool) -> None:
    """One job: state, parameters, latest progress, error and hint, result."""
    from appliance.jobs.records import events, get_job

    db = _open()
    job = get_job(db, job_id)
    last = events(db, job.id, kind="progress", limit=1)
    if as_json:
        echo_json({"job": job.to_dict(), "last_progress": last[0].data if last else None})
        return
    rows = [("job", job.id), ("kind", job.kind), ("state", job.state), ("started by", job.actor),
            ("device", job.device), ("created", job.created_at), ("started", job.started_at or "-"),
            ("finished", job.finished_at or "-"), ("parameters", _flat(job.params))]
    if last:
        rows.append(("progress", _progress_text(last[0].data)))
    if job.error:
        rows += [("error", job.error), ("hint", job.hint or "")]
    if job.result:
        rows.append(("result", _flat(job.result)))
    echo_table(rows, ["field", "value"])


def _flat(data: dict) -> str:
    from appliance.audit import canonical_json

    return canonical_json(data)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True)
@_json
def jobs_logs(job_id: str, limit: int, as_json: bool) -> None:
    """The job's events: state changes, progress, log lines."""
    from dataclasses import asdict

    from appliance.jobs.records import events, get_job

    db = _open()
    get_job(db, job_id)
    found = events(db, job_id, limit=limit)
    if as_json:
        echo_json({"events": [asdict(e) for e in found]})
        return
    for event in found:
        text = _progress_text(event.data) if event.kind == "progress" else event.message
        if event.kind == "progress" and event.message:
            text = f"{event.message} {text}".strip()
        click.echo(f"{event.ts}  {event.kind:<8}  {text}")


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> None:
    """Ask a job to checkpoint and stop (SIGTERM); it ends `cancelled`."""
    from appliance.access import require
    from appliance.jobs.runner import cancel_job
    from appliance.paths import airlock_home

    db = _open()
    require(db, airlock_home(), "jobs.control", unless_no_vault=True)
    cancel_job(db, job_id)
    click.echo(f"cancel requested for {job_id}; it checkpoints and stops (follow with `airlock jobs show {job_id}`)")


@jobs.command("resume")
@click.argument("job_id")
def jobs_resume(job_id: str) -> None:
    """Run an interrupted, cancelled or failed job again from its last checkpoint."""
    from appliance.access import require
    from appliance.jobs.runner import resume_job
    from appliance.paths import airlock_home

    db = _open()
    require(db, airlock_home(), "jobs.control", unless_no_vault=True)
    resume_job(db, job_id)
    click.echo(f"resumed {job_id} (follow with `airlock jobs show {job_id}`)")


@jobs.command("run", hidden=True)
@click.argument("job_id")
def jobs_run(job_id: str) -> int:
    """The detached job process itself (started by the appliance, not by people)."""
    from appliance.catalog import open_catalog
    from appliance.jobs.runner import run_job

    return run_job(open_catalog(), job_id)
