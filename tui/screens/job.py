"""One job: state, a progress bar with ETA, tokens/s, the loss curve, its log; cancel and resume.

Everything comes from the job's events in the catalog (`appliance.jobs.records.events`), read
from the last one seen, so opening this screen again (or reopening the UI) replays the whole
curve and then follows the job live. Wide terminals get a plotext chart; narrow ones (80
columns) a sparkline of the training loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Label, ProgressBar, RichLog, Sparkline, Static

from tui.connection import catalog
from tui.formatting import duration, progress_fraction, progress_text, timestamp
from tui.messages import JobControlled, JobPolled
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

if TYPE_CHECKING:
    from appliance.jobs.records import Job, JobEvent
    from appliance.train.runs import Run

FINAL = ("succeeded", "failed", "cancelled", "interrupted")
JOB_KINDS = {"train": "training", "data_import": "data import", "optimize": "quantize + ONNX export",
             "engine_build": "TensorRT engine build", "serve": "inference server", "retrain": "retraining"}
RESUMABLE = ("interrupted", "cancelled", "failed")


class JobScreen(AirlockScreen):
    POLL_GROUP = "job-poll"
    HELP = """
A job runs as its own process: closing this screen or the whole UI does not stop it, and
opening it again shows everything from the start. **c** asks it to checkpoint and stop (it ends
*cancelled*); **r** runs an interrupted, cancelled or failed job again from its last checkpoint
(an import starts over: it is all or nothing). Training shows the loss on the training batches
and, at every evaluation, on the validation split (lower is better; a validation loss that rises
while the training loss falls means over-fitting).
"""
    BINDINGS: ClassVar[list] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("r", "resume_job", "Resume"),
    ]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.job: Job | None = None
        self.train_run: Run | None = None
        self.last_event = 0
        self.losses: list[tuple[float, float]] = []
        self.val_losses: list[tuple[float, float]] = []
        self.last_progress: JobEvent | None = None

    def compose(self) -> ComposeResult:
        from textual_plotext import PlotextPlot

        yield NavBar(self.MODE)
        yield Static(f"Job {self.job_id}", id="job-title", classes="screen-note")
        yield Static("", id="job-run", markup=False)
        with Horizontal(id="job-progress-line"):
            yield ProgressBar(show_eta=False, id="job-bar")
            yield Label("", id="job-progress-text")
        yield Static("", id="job-curve-text")
        yield Sparkline([], id="job-sparkline")
        yield PlotextPlot(id="job-plot")
        yield RichLog(id="job-log", max_lines=500, wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        self.fit_chart()

    def on_resize(self) -> None:
        self.fit_chart()

    def fit_chart(self) -> None:
        """A plotext chart where there is room, a sparkline at 80 columns; neither before there is a loss."""
        wide = self.app.size.width >= self.airlock.wide_chart_columns
        self.query_one("#job-plot").display = wide and bool(self.losses)
        self.query_one("#job-sparkline").display = not wide and bool(self.losses)

    def keep_polling(self) -> bool:
        return self.job is None or self.job.state not in FINAL

    def poll(self):
        return self.follow()

    @work(thread=True, exclusive=True, exit_on_error=False, group="job-poll")
    def follow(self) -> None:
        from appliance.jobs.records import events, get_job
        from appliance.jobs.runner import reconcile_jobs
        from appliance.train.runs import RunError, run_for_job, sync_with_jobs

        with catalog(self.airlock.home) as db:
            reconcile_jobs(db)
            sync_with_jobs(db)
            new = events(db, self.job_id, after_id=self.last_event)
            job = get_job(db, self.job_id)
            run = None
            if job.kind == "train":
                try:
                    run = run_for_job(db, self.job_id)
                except RunError:
                    run = None
        self.post_message(JobPolled(job, new, run))

    def on_job_polled(self, message: JobPolled) -> None:
        self.job, self.train_run = message.job, message.run
        log = self.query_one("#job-log", RichLog)
        for event in message.events:
            self.last_event = max(self.last_event, event.id)
            if event.kind == "progress":
                self.take_progress(event)
            else:
                text = event.message + (f": {event.data['error']}" if event.data.get("error") else "")
                log.write(f"{timestamp(event.ts)[11:]}  {event.kind:<5}  {text}")
        self.show_job()

    def take_progress(self, event: JobEvent) -> None:
        data = event.data
        if "step" in data and data.get("loss") is not None:
            self.losses.append((float(data["step"]), float(data["loss"])))
        if "step" in data and data.get("val_loss") is not None:
            self.val_losses.append((float(data["step"]), float(data["val_loss"])))
        if progress_fraction(data) or not (self.last_progress and progress_fraction(self.last_progress.data)):
            self.last_progress = event
        if not progress_fraction(data) and event.message:
            self.query_one("#job-log", RichLog).write(f"{timestamp(event.ts)[11:]}  {'info':<5}  {event.message}")

    def show_job(self) -> None:
        job = self.job
        assert job is not None
        what = JOB_KINDS.get(job.kind, job.kind)
        self.query_one("#job-title", Static).update(
            f"Job {job.id}: {what}, {job.state.upper()} · started by {job.actor.split(' (')[0]} · device {job.device}")
        self.query_one("#job-run", Static).update(self.describe_outcome(job))
        bar = self.query_one("#job-bar", ProgressBar)
        text = self.query_one("#job-progress-text", Label)
        event = self.last_progress
        fraction = progress_fraction(event.data) if event else None
        if fraction:
            bar.update(total=fraction[1], progress=fraction[0])
        elif job.state in FINAL:
            bar.update(total=1, progress=1 if job.state == "succeeded" else 0)
        else:
            bar.update(total=None)
        text.update(progress_text(event.message, event.data) if event else job.state)
        self.show_curve()
        self.refresh_bindings()

    def describe_outcome(self, job: Job) -> str:
        lines = []
        if self.train_run is not None:
            run = self.train_run
            lines.append(f"run {run.id}: {run.base_model} on {run.dataset_name} v{run.dataset_version} ({run.state})")
        if job.state == "succeeded" and job.result:
            result = job.result
            if job.kind == "data_import":
                lines.append(f"dataset {result.get('dataset')} version {result.get('version')}: "
                             f"{result.get('records_added')} new records from {result.get('files_read')} files")
            elif job.kind == "optimize":
                lines.append(optimize_outcome(result))
            elif job.kind == "engine_build":
                lines.append(f"engine stored: {result.get('variant')} for SM {result.get('sm')}, TensorRT "
                             f"{result.get('tensorrt')} (encrypted in the vault)")
            elif self.train_run is not None and self.train_run.metrics.get("val_loss") is not None:
                m = self.train_run.metrics
                lines.append(f"val loss {m.get('initial_val_loss') or 0:.4f} -> {m['val_loss']:.4f}; weights "
                             f"encrypted in the vault as {self.train_run.artifact}")
        if job.error:
            lines.append(f"error: {job.error}")
            lines.append(f"hint: {job.hint}" if job.hint else "")
        if job.kind == "serve" and job.state in ("queued", "running"):
            url = next((e.data.get("url") for e in [self.last_progress] if e is not None and e.data.get("url")), None)
            lines.append(f"serving on {url}; stop it on the Serve screen (5, then x)" if url else "loading models…")
        elif job.kind == "serve" and job.state == "cancelled":
            lines.append("the server was stopped")
        elif job.state in ("cancelled", "interrupted"):
            lines.append("press r to continue it from its last checkpoint")
        return "\n".join(line for line in lines if line)

    def show_curve(self) -> None:
        curve = self.query_one("#job-curve-text", Static)
        self.fit_chart()
        if not self.losses:
            curve.update("")
            return
        text = f"loss {self.losses[0][1]:.4f} -> {self.losses[-1][1]:.4f}"
        if self.val_losses:
            text += f" · val loss {self.val_losses[0][1]:.4f} -> {self.val_losses[-1][1]:.4f}"
        eta = self.last_progress.data.get("eta_s") if self.last_progress else None
        if eta is not None and self.job is not None and self.job.state not in FINAL:
            text += f" · about {duration(eta)} left"
        curve.update(text)
        self.query_one("#job-sparkline", Sparkline).data = [loss for _, loss in self.losses]
        plot = self.query_one("#job-plot")
        plt = plot.plt  # type: ignore[attr-defined]
        plt.clear_data()
        plt.plot([s for s, _ in self.losses], [v for _, v in self.losses], label="train loss", marker="braille")
        if self.val_losses:
            plt.plot([s for s, _ in self.val_losses], [v for _, v in self.val_losses], label="val loss", marker="x")
        plt.xlabel("step")
        plot.refresh()

    # --- cancel and resume ---------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.job is None:
            return True
        if action == "cancel_job":
            return self.job.state not in FINAL or None
        if action == "resume_job":
            return self.job.state in RESUMABLE or None
        return True

    def action_cancel_job(self) -> None:
        self.control("cancel")

    def action_resume_job(self) -> None:
        self.control("resume")

    @work(thread=True, exclusive=True, exit_on_error=False, group="job-control")
    def control(self, what: str) -> None:
        from appliance.access import require
        from appliance.jobs.runner import cancel_job, resume_job

        home = self.airlock.home
        with catalog(home) as db:
            require(db, home, "jobs.control", unless_no_vault=True)
            if what == "cancel":
                cancel_job(db, self.job_id)
            else:
                resume_job(db, self.job_id)
        self.post_message(JobControlled(self.job_id, what))

    def on_job_controlled(self, message: JobControlled) -> None:
        if message.what == "cancel":
            self.notify("cancel requested: the job checkpoints and stops")
        else:
            self.notify("resumed from the last checkpoint")
        self.poll_now()

    def palette_commands(self):
        yield SystemCommand("Cancel job", "ask the job to checkpoint and stop", self.action_cancel_job)
        yield SystemCommand("Resume job", "run it again from its last checkpoint", self.action_resume_job)


def optimize_outcome(result: dict) -> str:
    """'exports fp32, int8 stored · serves on ORT CPU · perplexity float 2.52 -> QAT 2.52'."""
    from appliance.registry.overview import backend_label

    if not result.get("stored"):
        return "stopped before anything was stored (QAT has no checkpoint: start it again)"
    variants = result.get("variants") or {}
    stored = ", ".join(v for v, s in variants.items() if s.get("ok")) or "none"
    failed = ", ".join(v for v, s in variants.items() if not s.get("ok"))
    text = f"exports {stored} stored (parity with PyTorch checked)"
    if failed:
        text += f"; {failed} failed validation, not stored"
    text += f" · serves on {backend_label(result.get('runtime'))}"
    first, last = result.get("float") or {}, result.get("qat") or result.get("ptq") or {}
    for metric in ("perplexity", "accuracy"):
        if metric in first and metric in last:
            text += f" · {metric} float {first[metric]:.3f} -> quantized {last[metric]:.3f}"
            break
    return text
