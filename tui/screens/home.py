"""Home: the dashboard. Vault and session, emergency access, machine, data, audit, running jobs."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Label, Static

from tui.connection import catalog
from tui.formatting import countdown, duration, timestamp
from tui.messages import HomeLoaded, HomeView, MachineChecked, RunningJob
from tui.screen_base import AirlockScreen
from tui.widgets import JobRow, NavBar

MARKS = {"ok": "", "warn": "! ", "fail": "FAIL "}
GPU_EVERY_POLLS = 10


class HomeScreen(AirlockScreen):
    MODE = "home"
    POLL_GROUP = "home-poll"
    HELP = """
The dashboard. **Vault**: who is logged in, with which role, and how long until the vault locks
itself (any key use restarts the clock). **Machine**: GPUs (or CPU only) and free disk.
**Models**: the production version of each task and the backend it serves on (TensorRT, ONNX
Runtime on GPU or CPU, PyTorch). **Server**: whether the inference server runs, and where.
**Running jobs**: imports, training, quantizing, the server; they are separate processes, so they keep running
when this UI is closed, and show up here again when it is reopened. Select one and press Enter
for its progress, loss curve, cancel and resume.
"""
    BINDINGS: ClassVar[list] = [Binding("r", "refresh", "Refresh")]

    def compose(self) -> ComposeResult:
        # class "volatile": values that change by themselves (clock, disk, GPUs); snapshot tests mask them
        yield NavBar(self.MODE)
        with VerticalScroll(id="home-body", can_focus=False):
            yield Static("", id="emergency-banner")
            with Horizontal(classes="home-line"):
                yield Label("Vault", classes="home-key")
                yield Static("checking…", id="vault-state", classes="home-value")
            with Horizontal(classes="home-line"):
                yield Label("Auto-lock", classes="home-key")
                yield Static("", id="vault-countdown", classes="home-value volatile")
            with Horizontal(classes="home-line"):
                yield Label("Machine", classes="home-key")
                yield Static("checking GPUs…", id="machine-gpu", classes="home-value volatile")
            with Horizontal(classes="home-line"):
                yield Label("Disk", classes="home-key")
                yield Static("…", id="machine-disk", classes="home-value volatile")
            with Horizontal(classes="home-line"):
                yield Label("Data", classes="home-key")
                yield Static("…", id="data-summary", classes="home-value")
            with Horizontal(classes="home-line"):
                yield Label("Models", classes="home-key")
                yield Static("…", id="models-summary", classes="home-value", markup=False)
            with Horizontal(classes="home-line"):
                yield Label("Server", classes="home-key")
                yield Static("…", id="server-summary", classes="home-value", markup=False)
            with Horizontal(classes="home-line"):
                yield Label("Audit", classes="home-key")
                yield Static("…", id="audit-summary", classes="home-value volatile")
            yield Static("Running jobs (Tab selects one, Enter opens it)", classes="section-title")
            yield Static("", id="no-jobs")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "session", self.show_session)
        self.check_machine()

    def show_session(self, status) -> None:
        state = self.query_one("#vault-state", Static)
        left = self.query_one("#vault-countdown", Static)
        if status is None:
            state.update("locked")
            left.update("")
            return
        emergency = " · EMERGENCY (break-glass) session" if status.session == "emergency" else ""
        state.update(f"unlocked: {status.account} ({status.role} role){emergency}")
        left.update(f"in {countdown(status.seconds_left)} (after {duration(status.idle_timeout_s)} without key use)")

    @work(thread=True, exclusive=True, exit_on_error=False, group="machine")
    def check_machine(self) -> None:
        from appliance.gpu_probe import gpu_summary

        # nvidia-smi, not torch: importing torch in the UI process costs seconds and hundreds of MB.
        summary = gpu_summary()
        self.post_message(MachineChecked(summary, "ok"))

    def on_machine_checked(self, message: MachineChecked) -> None:
        self.query_one("#machine-gpu", Static).update(MARKS[message.status] + message.gpu)

    def poll(self):
        self._polls = getattr(self, "_polls", 0) + 1
        if self._polls % GPU_EVERY_POLLS == 0:
            self.check_machine()  # memory and utilization change: refreshed now and then, not every second
        return self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="home-poll")
    def load(self) -> None:
        from appliance.audit import iter_audit
        from appliance.data.datasets import all_datasets
        from appliance.doctor import check_disk
        from appliance.jobs.records import events, list_jobs
        from appliance.jobs.runner import reconcile_jobs
        from appliance.train.runs import list_runs, sync_with_jobs
        from appliance.vault.accounts import pending_emergencies

        with catalog(self.airlock.home) as db:
            reconcile_jobs(db)  # a job whose process died shows as interrupted, as `airlock jobs list` does
            sync_with_jobs(db)
            running = [j for state in ("running", "queued") for j in list_jobs(db, state=state, limit=20)]
            jobs = []
            for job in running:
                last = events(db, job.id, kind="progress", limit=1)
                jobs.append(RunningJob(job, last[0] if last else None))
            verified = next(iter(iter_audit(db, action="audit.verify", limit=1, newest_first=True)), None)
            disk = check_disk(self.airlock.home)
            view = HomeView(pending_emergencies(db), jobs, len(all_datasets(db)), len(list_runs(db, limit=10_000)),
                            verified, disk.detail, disk.status, models_lines(db), server_line(db))
        self.post_message(HomeLoaded(view))

    def on_home_loaded(self, message: HomeLoaded) -> None:
        view = message.view
        banner = self.query_one("#emergency-banner", Static)
        if view.emergencies:
            first = view.emergencies[0]
            banner.update(f"! {len(view.emergencies)} emergency (break-glass) session(s) not acknowledged, first "
                          f"#{first['id']} at {timestamp(first['started_at'])}: an admin reviews them with "
                          "`airlock users emergencies`")
            banner.display = True
        else:
            banner.display = False
        self.query_one("#machine-disk", Static).update(MARKS[view.disk_status] + view.disk)
        self.query_one("#models-summary", Static).update("\n".join(view.models) or
                                                         "no production model yet: 4, register a run, p promotes")
        self.query_one("#server-summary", Static).update(view.server)
        self.query_one("#data-summary", Static).update(
            f"{view.datasets} dataset{'s' if view.datasets != 1 else ''} · {view.runs} training "
            f"run{'s' if view.runs != 1 else ''}")
        entry = view.last_verify
        if entry is None:
            audit = "chain never verified: press 7, then v"
        else:
            outcome = (f"intact ({entry.details.get('rows_checked')} rows)" if entry.details.get("ok") else
                       f"BROKEN at seq {entry.details.get('first_broken_seq')}")
            audit = f"last verified {timestamp(entry.ts)} by {entry.actor.split(' (')[0]}: {outcome}"
        self.query_one("#audit-summary", Static).update(audit)
        self.show_jobs(view.jobs)

    def show_jobs(self, jobs: list[RunningJob]) -> None:
        body = self.query_one("#home-body", VerticalScroll)
        wanted = {item.job.id: item for item in jobs}
        for row in list(self.query(JobRow)):
            if row.job_id not in wanted:
                row.remove()
        shown = {row.job_id: row for row in self.query(JobRow)}
        for job_id, item in wanted.items():
            if job_id in shown:
                shown[job_id].show(item)
            else:
                body.mount(JobRow(item))
        none = self.query_one("#no-jobs", Static)
        none.display = not jobs
        none.update("none: import data (2, then n) or start a training run (3)")

    def on_job_row_open(self, message: JobRow.Open) -> None:
        from tui.screens.job import JobScreen

        self.app.push_screen(JobScreen(message.job_id))

    def action_refresh(self) -> None:
        self.poll_now()


def models_lines(db) -> list[str]:
    """'qa: qa-v2 on ORT CPU' per task (its production version and backend), '(no production)' otherwise."""
    from appliance.registry.overview import task_overviews

    lines = []
    for overview in task_overviews(db):
        if overview.production is None:
            lines.append(f"{overview.task.name}: no production version ({len(overview.versions)} registered)")
        else:
            lines.append(f"{overview.task.name}: {overview.production.id} on {overview.backend}")
    return lines


def server_line(db) -> str:
    from appliance.serve.status import servers

    found = servers(db, limit=1)
    if not found or not found[0].running:
        return "stopped (5 starts it)"
    server = found[0]
    where = server.url or "starting (loading models)"
    return f"running: {where} · {', '.join(server.models)}"
