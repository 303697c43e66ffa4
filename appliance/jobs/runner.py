"""Start, run, watch and cancel jobs.

`start_job` writes the row and launches `python -m appliance.cli jobs run ID` in its own session
(it survives the TUI or the SSH connection closing). `run_job` is that process: it takes the
GPU's lock when the job needs one (one GPU-heavy job per GPU; CPU jobs run beside), marks the
job running with its pid, and calls the handler for the job's kind. SIGTERM (and `jobs cancel`)
asks the handler to checkpoint and stop; the job ends `cancelled`. An `AirlockError` ends it
`failed` with message and hint; a `JobInterrupted` ends it `interrupted` (resumable: a process it
supervised was killed). A job whose process vanished is marked `interrupted` by `reconcile_jobs`,
which every job listing runs first.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.catalog import transaction
from appliance.errors import AirlockError
from appliance.jobs import records
from appliance.jobs.records import Job, JobError
from appliance.paths import airlock_home

if TYPE_CHECKING:
    import sqlite_utils

# Job kinds and their handlers, by import path: a fixed table, never a name taken from the catalog.
HANDLERS: dict[str, str] = {
    "vault_verify": "appliance.jobs.vault_verify:run_vault_verify",
    "data_import": "appliance.data.import_job:run_data_import",
    "train": "appliance.train.jobs:run_training",
    "retrain": "appliance.registry.retrain:run_retrain",
    "serve": "appliance.serve.server:run_serve_job",
    "optimize": "appliance.optimize.jobs:run_optimize",
    "engine_build": "appliance.optimize.jobs:run_engine_build",
}
CANCEL_POLL_S = 2.0


class JobInterrupted(AirlockError):
    """The work stopped without an error of its own (a worker process was killed): resumable from its checkpoint."""


@dataclass
class JobContext:
    """What a handler gets: the catalog, its job, and the stop/progress plumbing."""

    db: sqlite_utils.Database
    job: Job
    home: Path
    _terminated: list[bool] = field(default_factory=lambda: [False])
    _last_poll: float = 0.0

    def progress(self, message: str = "", **data: Any) -> None:
        records.add_event(self.db, self.job.id, "progress", message, data)

    def log(self, message: str) -> None:
        records.add_event(self.db, self.job.id, "log", message)

    def should_stop(self) -> bool:
        """True after SIGTERM or `airlock jobs cancel` (polled from the catalog every few seconds)."""
        if self._terminated[0]:
            return True
        if time.monotonic() - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = time.monotonic()
            self._terminated[0] = records.get_job(self.db, self.job.id).cancel_requested
        return self._terminated[0]


def jobs_dir(home: Path) -> Path:
    path = home / "jobs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def start_job(db: sqlite_utils.Database, kind: str, params: dict[str, Any], *, device: str = "cpu",
              actor: str | None = None) -> Job:
    if kind not in HANDLERS:
        raise JobError(f"unknown job kind {kind!r}", hint=f"known: {', '.join(sorted(HANDLERS))}")
    job = records.create_job(db, kind, params, device=device, actor=actor)
    launch(job)
    return job


def launch(job: Job) -> None:
    home = airlock_home()
    log_path = jobs_dir(home) / f"{job.id}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen([sys.executable, "-I", "-m", "appliance.cli", "jobs", "run", job.id], stdin=subprocess.DEVNULL,
                         stdout=fd, stderr=fd, start_new_session=True, close_fds=True,
                         env={**os.environ, "AIRLOCK_HOME": str(home)})
    finally:
        os.close(fd)


def resume_job(db: sqlite_utils.Database, job_id: str) -> Job:
    """Queue an interrupted, cancelled or failed job again; its handler continues from its checkpoint."""
    reconcile_jobs(db)
    job = records.get_job(db, job_id)
    if job.state not in ("interrupted", "cancelled", "failed"):
        raise JobError(f"job {job_id} is {job.state}; only interrupted, cancelled or failed jobs resume",
                       hint="watch it with `airlock jobs show`" if job.state in ("queued", "running") else "")
    with transaction(db):
        records.set_state(db, job_id, "queued")
        db.execute("UPDATE jobs SET cancel_requested = 0, error = NULL, hint = NULL WHERE id = ?", [job_id])
    launch(records.get_job(db, job_id))
    return records.get_job(db, job_id)


def cancel_job(db: sqlite_utils.Database, job_id: str) -> Job:
    job = records.request_cancel(db, job_id)
    if job.pid and job.pid_start and process_start_time(job.pid) == job.pid_start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(job.pid, signal.SIGTERM)
    return job


def reconcile_jobs(db: sqlite_utils.Database) -> list[str]:
    """Mark running jobs whose process is gone as `interrupted`. Returns their ids."""
    lost = []
    for job in records.list_jobs(db, state="running", limit=10_000):
        if job.pid is None or process_start_time(job.pid) != job.pid_start:
            records.set_state(db, job.id, "interrupted",
                              error="the job's process ended without reporting (killed, crashed or power loss)",
                              hint=f"resume it with `airlock jobs resume {job.id}`")
            lost.append(job.id)
    return lost


def gpu_indices(device: str) -> list[int]:
    """The GPUs a job's device names: `cuda:1` -> [1], `cuda:0,1` -> [0, 1], `cpu` -> []."""
    if not device.startswith("cuda:"):
        return []
    return [int(i) for i in device[5:].split(",")]


@contextlib.contextmanager
def _device_lock(ctx: JobContext):
    """One GPU-heavy job per GPU: an flock per GPU the job uses (taken in index order, so two jobs
    that share GPUs cannot deadlock), released by the kernel if the process dies."""
    indices = sorted(set(gpu_indices(ctx.job.device)))
    if not indices:
        yield
        return
    lock_dir = ctx.home / "locks"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    with contextlib.ExitStack() as held:
        for index in indices:
            handle = held.enter_context(open(lock_dir / f"cuda-{index}.lock", "w"))  # closed by the stack
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                ctx.log(f"waiting for cuda:{index}: another job is using it")
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _handler(kind: str) -> Callable[[JobContext], dict[str, Any]]:
    module, _, name = HANDLERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def run_job(db: sqlite_utils.Database, job_id: str) -> int:
    """The body of the detached job process. Returns the process exit code."""
    from appliance.vault.keys import disable_core_dumps

    disable_core_dumps()  # a job may hold data keys
    job = records.get_job(db, job_id)
    if job.state != "queued":
        raise JobError(f"job {job_id} is {job.state}, not queued", hint="use `airlock jobs resume` to run it again")
    from appliance.audit import set_process_actor

    set_process_actor(job.actor)
    ctx = JobContext(db, job, airlock_home())
    signal.signal(signal.SIGTERM, lambda *_: ctx._terminated.__setitem__(0, True))
    try:
        with _device_lock(ctx):
            pid = os.getpid()
            records.set_state(db, job_id, "running", pid=pid, pid_start=process_start_time(pid))
            result = _handler(job.kind)(ctx)
    except JobInterrupted as exc:
        records.set_state(db, job_id, "interrupted", error=exc.message, hint=exc.hint)
        return 1
    except AirlockError as exc:
        records.set_state(db, job_id, "failed", error=exc.message, hint=exc.hint)
        return 1
    except Exception as exc:
        # The traceback goes to the job's 0600 log without the exception's message (it may hold data).
        sys.stderr.write("".join(traceback.format_tb(exc.__traceback__)) + type(exc).__name__ + "\n")
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        records.set_state(db, job_id, "failed",
                          error=f"internal error ({type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno})",
                          hint=f"report it with the log {jobs_dir(ctx.home) / (job_id + '.log')}")
        return 1
    if ctx.should_stop():
        records.set_state(db, job_id, "cancelled", result=result)
        return 0
    records.set_state(db, job_id, "succeeded", result=result)
    return 0


def wait_for(db: sqlite_utils.Database, job_id: str, *, timeout_s: float = 3600,
             on_event: Callable[[records.JobEvent], None] | None = None) -> Job:
    """Follow a job until it reaches a final state (for `--wait` and tests)."""
    deadline, seen = time.monotonic() + timeout_s, 0
    while True:
        for event in records.events(db, job_id, after_id=seen):
            seen = event.id
            if on_event:
                on_event(event)
        reconcile_jobs(db)
        job = records.get_job(db, job_id)
        if job.state in records.FINAL_STATES:
            return job
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {job.state} after {timeout_s:.0f} s",
                           hint="it keeps running; follow it with `airlock jobs show`")
        time.sleep(0.2)
