"""Typed results that thread workers post back to the UI thread.

A worker reads the catalog or calls one appliance function, then posts one of these; the screen's
`on_<message>` handler updates widgets. Errors do not come back as messages: they end the worker,
and the one `Worker.StateChanged` handler (`AirlockApp.report_worker_error`) shows them.
Payloads are the appliance's own dataclasses (Job, Dataset, AuditEntry, ...), never record contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from appliance.audit import AuditEntry, ChainReport
    from appliance.data.datasets import Dataset, DatasetVersion
    from appliance.jobs.records import Job, JobEvent
    from appliance.registry.overview import ScheduleView, TaskOverview, VersionDetail
    from appliance.serve.api_keys import ApiKey
    from appliance.serve.status import MetricsSample, ServerStatus
    from appliance.train.runs import Run
    from appliance.vault.agent import AgentStatus


class SessionChecked(Message):
    """The key agent's status (None: the vault is locked, e.g. after its idle timeout).

    `generation`: a check that started before a login or a lock finished is stale and ignored."""

    def __init__(self, status: AgentStatus | None, generation: int) -> None:
        super().__init__()
        self.status = status
        self.generation = generation


class LoginChecked(Message):
    """What the login dialog needs before anyone types: is there a vault, whose account, a session?"""

    def __init__(self, initialized: bool, default_account: str, status: AgentStatus | None) -> None:
        super().__init__()
        self.initialized = initialized
        self.default_account = default_account
        self.status = status


class Unlocked(Message):
    def __init__(self, status: AgentStatus) -> None:
        super().__init__()
        self.status = status


class UnlockFailed(Message):
    """A wrong passphrase, a locked-out or unknown account: shown in the dialog, not as an error box."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__()
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class RunningJob:
    job: Job
    progress: JobEvent | None


@dataclass(frozen=True)
class HomeView:
    emergencies: list[dict[str, Any]]
    jobs: list[RunningJob]
    datasets: int
    runs: int
    last_verify: AuditEntry | None
    disk: str
    disk_status: str
    models: list[str] = field(default_factory=list)
    """One line per task: its production version and the backend it serves on."""
    server: str = ""


class HomeLoaded(Message):
    def __init__(self, view: HomeView) -> None:
        super().__init__()
        self.view = view


class MachineChecked(Message):
    """GPUs (or CPU only), from `appliance.doctor`: checked once, it imports torch."""

    def __init__(self, gpu: str, status: str) -> None:
        super().__init__()
        self.gpu = gpu
        self.status = status


@dataclass(frozen=True)
class DatasetRow:
    dataset: Dataset
    split_counts: dict[str, int]
    versions: int
    updated_at: str

    @property
    def records(self) -> int:
        return sum(self.split_counts.values())


class DatasetsLoaded(Message):
    """The datasets, and what the clean-up after dead imports did (`store.recover_imports`)."""

    def __init__(self, rows: list[DatasetRow], notes: list[str]) -> None:
        super().__init__()
        self.rows = rows
        self.notes = notes


@dataclass(frozen=True)
class DatasetDetail:
    dataset: Dataset
    split_counts: dict[str, int]
    labels: dict[str, dict[str, int]]
    versions: list[DatasetVersion] = field(default_factory=list)


class DatasetLoaded(Message):
    def __init__(self, detail: DatasetDetail) -> None:
        super().__init__()
        self.detail = detail


class ReportLoaded(Message):
    """The decrypted per-file report of one import (file names may identify patients: shown, never logged)."""

    def __init__(self, version: int, report: dict[str, Any]) -> None:
        super().__init__()
        self.version = version
        self.report = report


class DatasetDeleted(Message):
    def __init__(self, name: str, records: int) -> None:
        super().__init__()
        self.name = name
        self.records = records


class PreviewReady(Message):
    """What the wizard shows about a file or folder: formats, counts and record shapes, no contents."""

    def __init__(self, path: str, lines: list[str]) -> None:
        super().__init__()
        self.path = path
        self.lines = lines


class DryRunDone(Message):
    def __init__(self, name: str, report: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.report = report


class JobStarted(Message):
    def __init__(self, job_id: str, what: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.what = what


@dataclass(frozen=True)
class TrainChoices:
    base_models: list[str]
    datasets: list[tuple[str, str]]
    """(name, label shown) of text datasets."""


class TrainChoicesLoaded(Message):
    def __init__(self, choices: TrainChoices) -> None:
        super().__init__()
        self.choices = choices


class JobPolled(Message):
    """A job's row, the events after the last one seen, and its training run when it has one."""

    def __init__(self, job: Job, events: list[JobEvent], run: Run | None) -> None:
        super().__init__()
        self.job = job
        self.events = events
        self.run = run


class JobControlled(Message):
    def __init__(self, job_id: str, what: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.what = what


class AuditLoaded(Message):
    def __init__(self, entries: list[AuditEntry]) -> None:
        super().__init__()
        self.entries = entries


class ChainVerified(Message):
    def __init__(self, report: ChainReport) -> None:
        super().__init__()
        self.report = report


class RunsLoaded(Message):
    def __init__(self, runs: list[Run]) -> None:
        super().__init__()
        self.runs = runs


# --- models, serve, schedule ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelsView:
    tasks: list[TaskOverview]
    runs: list[Run]
    """Succeeded training runs that are not a model version yet."""
    backends: dict[str, str]
    """run id -> the backend it would serve on ('PyTorch', 'ORT CPU', ...), for every version's run."""


class ModelsLoaded(Message):
    def __init__(self, view: ModelsView) -> None:
        super().__init__()
        self.view = view


class VersionLoaded(Message):
    def __init__(self, detail: VersionDetail) -> None:
        super().__init__()
        self.detail = detail


class ModelChanged(Message):
    """A promote, rollback or register finished: what to say, and what to reload."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


@dataclass(frozen=True)
class ServeView:
    server: ServerStatus | None
    """The running (or starting) server, else the last one that ran; None when none ever ran."""
    sample: MetricsSample | None
    metrics_note: str
    """Why there are no live numbers ('' when there are)."""
    keys: list[ApiKey]
    choices: list[tuple[str, str]]
    """(label, value) of what can be served: 'task:NAME' (production version) or 'run:ID'."""
    others_running: int = 0
    """Further servers running (started from the command line): `airlock jobs list` shows them."""


class ServeLoaded(Message):
    def __init__(self, view: ServeView) -> None:
        super().__init__()
        self.view = view


class KeyCreated(Message):
    """The one moment a key exists in clear: shown in a dialog, then dropped."""

    def __init__(self, key: ApiKey, secret: str) -> None:
        super().__init__()
        self.key = key
        self.secret = secret


class ServeChanged(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class SchedulesLoaded(Message):
    def __init__(self, views: list[ScheduleView]) -> None:
        super().__init__()
        self.views = views


class ScheduleChanged(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
