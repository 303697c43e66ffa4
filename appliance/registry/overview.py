"""What the operator UI shows about the registry, read from the catalog alone (no keys, nothing decrypted).

    task_overviews(db)            -> [TaskOverview]   each task, its production version and the backend it serves on
    optimize_status(db, run_id)   -> OptimizeStatus   the run's last optimize and engine-build jobs, exports, runtime
    unregistered_runs(db)         -> [Run]            succeeded training runs that are not a model version yet
    version_detail(db, version)   -> VersionDetail    metrics next to production, lineage, history, the card
    schedule_overview(db)         -> [ScheduleView]   each task's schedule, its last runs, rejected candidates

The backend is the one the optimize stage chose on this machine (recorded in its job's result:
TensorRT once an engine was built after it, else ONNX Runtime on the GPU or CPU), PyTorch for a
run that was never optimized. A running server says what it actually loaded (`appliance.serve.status`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.registry.versions import ModelVersion, Task, list_tasks, list_versions, production

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.jobs.records import Job
    from appliance.registry.schedule import Schedule
    from appliance.train.runs import Run

BACKEND_LABELS = {"tensorrt": "TensorRT", "ort-cuda": "ORT CUDA", "ort-cpu": "ORT CPU", "pytorch": "PyTorch"}


def backend_label(kind: str | None) -> str:
    """'TensorRT', 'ORT CUDA', 'ORT CPU' or 'PyTorch' for a runtime kind (appliance.optimize.runtime_select)."""
    return BACKEND_LABELS.get(kind or "pytorch", kind or "PyTorch")


@dataclass(frozen=True)
class OptimizeStatus:
    run_id: str
    optimize: Job | None
    """The newest `optimize` job of the run (any state)."""
    engine: Job | None
    """The newest `engine_build` job of the run (any state)."""
    exports: list[str] = field(default_factory=list)
    """ONNX variants the last succeeded optimize stored (fp32, fp16, int8)."""
    runtime: str = "pytorch"
    """The runtime this machine serves the run with: tensorrt, ort-cuda, ort-cpu or pytorch."""

    @property
    def backend(self) -> str:
        return backend_label(self.runtime)

    @property
    def busy(self) -> Job | None:
        """An optimize or engine-build job of this run that has not ended."""
        return next((j for j in (self.optimize, self.engine) if j is not None and j.state in ("queued", "running")),
                    None)


def _jobs_of_run(db: sqlite_utils.Database, kind: str, run_id: str) -> list[Job]:
    """Jobs of `kind` whose params name `run_id`, newest first."""
    from appliance.jobs.records import get_job

    rows = db.execute("SELECT id FROM jobs WHERE kind = ? AND json_extract(params, '$.run') = ?"
                      " ORDER BY created_at DESC", [kind, run_id]).fetchall()
    return [get_job(db, r[0]) for r in rows]


def optimize_status(db: sqlite_utils.Database, run_id: str) -> OptimizeStatus:
    optimizes = _jobs_of_run(db, "optimize", run_id)
    engines = _jobs_of_run(db, "engine_build", run_id)
    done = next((j for j in optimizes if j.state == "succeeded" and (j.result or {}).get("stored")), None)
    exports: list[str] = []
    runtime = "pytorch"
    if done is not None:
        result = done.result or {}
        exports = [v for v, s in (result.get("variants") or {}).items() if s.get("ok")]
        runtime = result.get("runtime") or "pytorch"
        built = next((j for j in engines if j.state == "succeeded"), None)
        if built is not None and (built.finished_at or "") > (done.finished_at or ""):
            runtime = "tensorrt"
    return OptimizeStatus(run_id, optimizes[0] if optimizes else None, engines[0] if engines else None, exports,
                          runtime)


@dataclass(frozen=True)
class TaskOverview:
    task: Task
    production: ModelVersion | None
    versions: list[ModelVersion]
    backend: str
    """Where its production version serves ('PyTorch', 'ORT CPU', ...); '' without one."""


def task_overviews(db: sqlite_utils.Database) -> list[TaskOverview]:
    out = []
    for task in list_tasks(db):
        current = production(db, task.name)
        backend = optimize_status(db, current.run_id).backend if current else ""
        out.append(TaskOverview(task, current, list_versions(db, task=task.name), backend))
    return out


def unregistered_runs(db: sqlite_utils.Database, limit: int = 200) -> list[Run]:
    """Succeeded training runs without a model version, newest first (what `airlock models register` takes)."""
    from appliance.train.runs import list_runs

    registered = {r[0] for r in db.execute("SELECT run_id FROM model_versions")}
    return [r for r in list_runs(db, state="succeeded", limit=limit) if r.id not in registered]


@dataclass(frozen=True)
class VersionDetail:
    version: ModelVersion
    production: ModelVersion | None
    metrics: list[tuple[str, float | None, float | None]]
    """(metric, this version, production) for the headline metrics of the card."""
    lineage: str
    history: list[dict[str, Any]]
    card_markdown: str
    optimize: OptimizeStatus


def version_detail(db: sqlite_utils.Database, version_id: str) -> VersionDetail:
    from appliance.registry.card import card_blocks, headline_metrics, lineage_text, to_markdown
    from appliance.registry.versions import get_version, promotions

    version = get_version(db, version_id)
    current = production(db, version.task)
    ours = headline_metrics(version)
    theirs = headline_metrics(current) if current is not None and current.id != version.id else {}
    metrics = [(name, value, theirs.get(name)) for name, value in ours.items()]
    history = [p for p in promotions(db, version.task) if version.id in (p["version"], p["previous"])]
    return VersionDetail(version, current, metrics, lineage_text(db, version), history,
                         to_markdown(card_blocks(db, version.id)), optimize_status(db, version.run_id))


@dataclass(frozen=True)
class ScheduleView:
    task: Task
    schedule: Schedule | None
    last_runs: list[dict[str, Any]]
    """Newest first: due_at, ran_at, outcome (started, nothing_new, failed, skipped), reason, hint, job_id."""
    rejected: list[ModelVersion]
    """Candidates the gates rejected, newest first, with their gate results and reasons."""
    production: ModelVersion | None


def schedule_overview(db: sqlite_utils.Database) -> list[ScheduleView]:
    """Every task (scheduled or not), so that a schedule can be set on any of them."""
    from appliance.registry.schedule import get_schedule, last_runs

    out = []
    for task in list_tasks(db):
        rejected = sorted(list_versions(db, task=task.name, state="rejected"), key=lambda v: v.number, reverse=True)
        out.append(ScheduleView(task, get_schedule(db, task.name), last_runs(db, task.name, 10), rejected,
                                production(db, task.name)))
    return out
