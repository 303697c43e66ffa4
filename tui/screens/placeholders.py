"""Models, Serve, Schedule: what exists today, and which release brings the rest.

Models lists the training runs (the registry's input); promotion, serving and scheduled
retraining arrive with the registry and serving releases, which are being built now.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from tui.connection import catalog
from tui.formatting import timestamp
from tui.messages import RunsLoaded
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar


def _metrics(run) -> str:
    m = run.metrics or {}
    if run.kind == "lm" and m.get("val_loss") is not None:
        start = m.get("initial_val_loss")
        return f"val loss {start:.4f} -> {m['val_loss']:.4f}" if start is not None else f"val loss {m['val_loss']:.4f}"
    if m.get("val_auc") is not None:
        return f"val AUC {m['val_auc']:.3f}"
    return ""


class ModelsScreen(AirlockScreen):
    MODE = "models"
    HELP = """
Training runs, newest first: what was trained on which data version, and how well. Enter opens a
run's job (progress, loss curve, cancel/resume). The model registry (compare, promote, roll back,
model cards) arrives with the registry release; until then the trained adapters stay encrypted
in the vault as `run-<id>`.
"""
    BINDINGS: ClassVar[list] = [Binding("r", "refresh", "Refresh")]

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Training runs. The model registry (compare, promote, roll back) arrives with the registry "
                     "release.", classes="screen-note")
        table: DataTable = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.add_columns("run", "state", "base model", "data", "created", "metrics")
        yield table
        yield Footer()

    def on_screen_resume(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs")
    def load(self) -> None:
        from appliance.train.runs import list_runs

        with catalog(self.airlock.home) as db:
            self.post_message(RunsLoaded(list_runs(db, limit=200)))

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        table = self.query_one("#runs", DataTable)
        table.clear()
        for run in message.runs:
            table.add_row(run.id, run.state, run.base_model, f"{run.dataset_name} v{run.dataset_version}",
                          timestamp(run.created_at), _metrics(run), key=run.job_id)
        if not message.runs:
            table.add_row("no training runs yet: press 3 to start one", "", "", "", "", "")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        from tui.screens.job import JobScreen

        if event.row_key.value:
            self.app.push_screen(JobScreen(event.row_key.value))

    def action_refresh(self) -> None:
        self.load()


class ServeScreen(AirlockScreen):
    MODE = "serve"
    HELP = """
Serving (an OpenAI-compatible endpoint on this site's network, TensorRT or ONNX Runtime) arrives
with the serving release, together with API keys per client.
"""

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Serving arrives with the serving release: an on-prem inference endpoint for a promoted model "
                     "(TensorRT on the GPU, or ONNX Runtime), with API keys per client.\n\nUntil then nothing on "
                     "this appliance listens on the network.", classes="placeholder")
        yield Footer()


class ScheduleScreen(AirlockScreen):
    MODE = "schedule"
    HELP = """
Scheduled, incremental retraining on newly imported data (promoted only when it is better and has
not forgotten what the current model knows) arrives with the registry and serving releases.
"""

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Scheduling arrives with the registry and serving releases: nightly incremental retraining on "
                     "new data, with gates that promote a model only when it is better and has not forgotten what "
                     "the current one knew.", classes="placeholder")
        yield Footer()
