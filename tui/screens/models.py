"""Models: the registry per task, a version's detail and card, and what can be done with a version or run.

The table lists every task's versions (state, headline metric, the backend it serves on) and, below,
the succeeded training runs that are not registered yet. Actions act on the selected row:
register a run to a task, quantize (the `optimize` job: PTQ/QAT, ONNX export, parity checks),
build a TensorRT engine (`engine_build` job: refused with the appliance's reason on a machine
without GPU or TensorRT), promote with a reason, roll back. Jobs open in the job screen. Every
call is the appliance's own (`appliance.registry`, `appliance.optimize.jobs`) with its role check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Markdown, Static

from tui.connection import catalog
from tui.dialogs import FormDialog, FormField
from tui.formatting import timestamp
from tui.messages import JobStarted, ModelChanged, ModelsLoaded, ModelsView, VersionLoaded
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

if TYPE_CHECKING:
    from appliance.registry.versions import ModelVersion
    from appliance.train.runs import Run

VARIANTS_DEFAULT = "fp32,fp16,int8"


def variants_note(kind: str) -> str:
    """The exports a run of this kind may ask for (the CLI's `--variants`; the same check refuses the others)."""
    if kind != "lm":
        return "comma-separated: fp32, fp16, int8"
    return ("comma-separated: fp32, fp16, int8 (TensorRT / ONNX Runtime); genai-int4, genai-int8, genai-fp32 "
            "(onnxruntime-genai, CPU); genai-fp16-cuda, genai-bf16-cuda, genai-int4-cuda (GPU)")


def metric_text(kind: str, metrics: dict) -> str:
    """The one number that says how good a version or run is: validation loss (LM) or AUC (classifier)."""
    if kind == "classifier":
        value = metrics.get("val_auc")
        return f"val AUC {value:.3f}" if value is not None else "val AUC not measured" if metrics else ""
    value = metrics.get("val_loss")
    return f"val loss {value:.4f}" if value is not None else ""


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def task_name_for(run: Run) -> str:
    """A task name to offer for a run: the one it was trained for, else its dataset's name in task form."""
    import re

    if run.task:
        return run.task
    return re.sub(r"[^a-z0-9._-]+", "-", run.dataset_name.lower()).strip("-._")[:64] or "task"


class ModelActions:
    """Quantize, build engine, promote, rollback, register: the same on the list and on a version's detail."""

    def target(self) -> tuple[ModelVersion | None, Run | None]:
        """The selected version (with its run id) or unregistered run."""
        raise NotImplementedError

    def _run_id(self) -> str | None:
        version, run = self.target()
        return version.run_id if version is not None else run.id if run is not None else None

    def action_quantize(self) -> None:
        screen: AirlockScreen = self  # type: ignore[assignment]
        run_id = self._run_id()
        if run_id is None:
            screen.notify("select a model version or a training run first", severity="warning")
            return

        version, run = self.target()
        kind = version.kind if version is not None else run.kind if run is not None else "lm"

        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                self.start_optimize(run_id, values["qat"] == "yes", values["variants"] or VARIANTS_DEFAULT,
                                    values["recipe"])

        screen.app.push_screen(FormDialog(
            f"Quantize and export run {run_id}",
            "A job: INT8 calibration (PTQ), then quantization-aware fine-tuning (QAT, about 10% of the run's steps), "
            "ONNX exports, and each export's parity with PyTorch"
            + (("; genai-* exports are built by onnxruntime-genai (weight-only int4/int8, any model size) and "
                "gated on held-out perplexity") if kind == "lm" else "")
            + ". Exports are stored encrypted with the run.",
            [FormField("qat", "QAT", "yes", choices=(("yes: PTQ then QAT", "yes"), ("no: PTQ only", "no"))),
             FormField("variants", "Exports", VARIANTS_DEFAULT, note=variants_note(kind)),
             FormField("recipe", "Recipe", "", placeholder="optional: path of a quantization recipe (TOML)",
                       note="as `airlock optimize --recipe`: int4_block_size, int4_algo, "
                            "max_perplexity_increase ...")]),
            chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-action")
    def start_optimize(self, run_id: str, qat: bool, variants: str, recipe_path: str = "") -> None:
        """What `airlock optimize RUN --variants ... [--recipe FILE] [--no-qat]` does, with its checks and errors."""
        import dataclasses
        from pathlib import Path

        from appliance.access import require
        from appliance.optimize.jobs import parse_variants, start_optimize
        from appliance.optimize.recipe import load_quant_recipe
        from appliance.vault.lifecycle import keys_for

        screen: AirlockScreen = self  # type: ignore[assignment]
        home = screen.airlock.home
        chosen = parse_variants(variants)
        recipe = load_quant_recipe(Path(recipe_path.strip()).expanduser() if recipe_path.strip() else None)
        if not qat:
            recipe = dataclasses.replace(recipe, qat=False)
        with catalog(home) as db:
            keys_for(db, home)
            session = require(db, home, "optimize.run")
            job = start_optimize(db, run_id, recipe, chosen, actor=session.actor if session else None)
        screen.post_message(JobStarted(job.id, f"quantize and export run {run_id}"))

    def action_build_engine(self) -> None:
        run_id = self._run_id()
        if run_id is None:
            self.notify("select a model version or a training run first", severity="warning")  # type: ignore[attr-defined]
            return
        self.start_engine_build(run_id)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-action")
    def start_engine_build(self, run_id: str) -> None:
        from dataclasses import asdict

        from appliance.access import require
        from appliance.optimize.jobs import engine_build_refusal, start_engine_build
        from appliance.optimize.tensorrt_engine import EngineBuildOptions
        from appliance.vault.lifecycle import keys_for

        screen: AirlockScreen = self  # type: ignore[assignment]
        refusal = engine_build_refusal("cuda:0")
        if refusal is not None:
            raise refusal  # no GPU or no TensorRT here: the appliance's reason and hint, as a dialog
        home = screen.airlock.home
        with catalog(home) as db:
            keys = keys_for(db, home)
            session = require(db, home, "optimize.run")
            options = asdict(EngineBuildOptions())  # the defaults of `airlock engine build`
            job = start_engine_build(db, keys, home, run_id, variant=None, device="cuda:0",
                                     profile={"max_batch": None, "max_sequence": None, "max_past": None},
                                     options=options, actor=session.actor if session else None)
        screen.post_message(JobStarted(job.id, f"TensorRT engine of run {run_id}"))

    def action_promote(self) -> None:
        screen: AirlockScreen = self  # type: ignore[assignment]
        version, _ = self.target()
        if version is None:
            screen.notify("select a model version to promote (register a run first: g)", severity="warning")
            return

        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                self.promote(version.id, values["reason"])

        screen.app.push_screen(FormDialog(
            f"Promote {version.id}", f"{version.id} becomes the production model of {version.task}; the current one "
            "is retired, and running servers of this task switch to it within seconds.",
            [FormField("reason", "Reason", placeholder="why (kept in the audit log and on the model card)")]), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-action")
    def promote(self, version_id: str, reason: str) -> None:
        from appliance.access import require
        from appliance.registry.promotion import promote

        screen: AirlockScreen = self  # type: ignore[assignment]
        home = screen.airlock.home
        with catalog(home) as db:
            session = require(db, home, "models.promote")
            promoted, replaced = promote(db, version_id, actor=session.actor if session else "", reason=reason)
        screen.post_message(ModelChanged(f"{promoted.id} is now production for {promoted.task}"
                                         + (f" ({replaced.id} retired)" if replaced else "")))

    def action_rollback(self) -> None:
        screen: AirlockScreen = self  # type: ignore[assignment]
        version, _ = self.target()
        if version is None:
            screen.notify("select a version of the task to roll back", severity="warning")
            return
        task = version.task

        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                self.rollback(task, values["reason"])

        screen.app.push_screen(FormDialog(
            f"Roll back {task}", f"The production version of {task} goes back to the one it replaced.",
            [FormField("reason", "Reason", placeholder="why (kept in the audit log)")]), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-action")
    def rollback(self, task: str, reason: str) -> None:
        from appliance.access import require
        from appliance.registry.promotion import rollback

        screen: AirlockScreen = self  # type: ignore[assignment]
        home = screen.airlock.home
        with catalog(home) as db:
            session = require(db, home, "models.promote")
            restored, retired = rollback(db, task, actor=session.actor if session else "", reason=reason)
        screen.post_message(ModelChanged(f"{restored.id} is production for {task} again; {retired.id} retired"))

    def palette_commands(self):
        yield SystemCommand("Quantize and export", "PTQ/QAT and ONNX exports of the selected model (a job)",
                            self.action_quantize)
        yield SystemCommand("Build TensorRT engine", "an engine for this machine's GPU (a job)",
                            self.action_build_engine)
        yield SystemCommand("Promote model version", "make the selected version production (asks why)",
                            self.action_promote)
        yield SystemCommand("Roll back task", "put back the production version the current one replaced",
                            self.action_rollback)


def open_started_job(screen: AirlockScreen, message: JobStarted) -> None:
    from tui.screens.job import JobScreen

    screen.notify(f"started {message.what}; it keeps running if you close the UI")
    screen.app.push_screen(JobScreen(message.job_id))


class ModelsScreen(ModelActions, AirlockScreen):
    MODE = "models"
    POLL_GROUP = "models-poll"  # a quantize or retrain finishing elsewhere shows up without a keypress
    HELP = """
The model registry. Each **task** (one use of a model, e.g. `maint-qa`) has numbered **versions**:
*candidate* (registered, not serving), *production* (what the server answers with), *retired*,
*rejected* (a retrain that failed its gates). The backend says how the version serves on this
machine: TensorRT, ONNX Runtime (ORT CUDA / ORT CPU) after quantizing, else PyTorch.

Below: training runs that are not registered yet. **g** registers the selected one to a task
(a new task is created on first use). **Enter** opens a version: metrics next to production,
lineage, history and its model card.

**o** quantizes and exports the selected version or run (a job: PTQ, QAT, ONNX, parity);
**e** builds a TensorRT engine (needs an NVIDIA GPU and TensorRT; otherwise the reason is shown);
**p** promotes a version (asks why; an admin's action); **b** rolls the task back.
"""
    BINDINGS: ClassVar[list] = [
        Binding("enter", "open", "Details", show=False),
        Binding("g", "register", "Register"),
        Binding("o", "quantize", "Quantize"),
        Binding("e", "build_engine", "Engine", show=False),  # 80 columns: in F1, the palette and the detail's footer
        Binding("p", "promote", "Promote"),
        Binding("b", "rollback", "Rollback"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, ModelVersion] = {}
        self.runs: dict[str, Run] = {}

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Model versions by task. Enter: details · o quantize · p promote", classes="screen-note")
        versions: DataTable = DataTable(id="versions", cursor_type="row", zebra_stripes=True)
        for label in ("version", "state", "metric", "backend", "created"):
            versions.add_column(label, key=label)
        yield versions
        yield Static("Training runs not registered (g registers one; 3 trains more)", classes="section-title")
        runs: DataTable = DataTable(id="unregistered", cursor_type="row", zebra_stripes=True)
        for label in ("run", "base model", "data", "metric", "created"):
            runs.add_column(label, key=label)
        yield runs
        yield Footer()

    def poll(self):
        return self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="models-poll")
    def load(self) -> None:
        from appliance.jobs.runner import reconcile_jobs
        from appliance.registry.overview import optimize_status, task_overviews, unregistered_runs
        from appliance.train.runs import sync_with_jobs

        with catalog(self.airlock.home) as db:
            reconcile_jobs(db)
            sync_with_jobs(db)
            tasks = task_overviews(db)
            backends = {v.run_id: optimize_status(db, v.run_id).backend for t in tasks for v in t.versions}
            runs = unregistered_runs(db)
            backends.update({r.id: optimize_status(db, r.id).backend for r in runs})
        self.post_message(ModelsLoaded(ModelsView(tasks, runs, backends)))

    def on_models_loaded(self, message: ModelsLoaded) -> None:
        view = message.view
        shown = ([(v.id, v.state, v.metrics, view.backends.get(v.run_id)) for t in view.tasks for v in t.versions],
                 [r.id for r in view.runs])
        if shown == getattr(self, "_shown", None):
            return  # unchanged: the tables (and their cursors) stay as they are
        self._shown = shown
        table = self.query_one("#versions", DataTable)
        cursor = table.cursor_row
        table.clear()
        self.versions = {}
        for overview in view.tasks:
            for version in sorted(overview.versions, key=lambda v: v.number, reverse=True):
                self.versions[version.id] = version
                state = version.state.upper() if version.state == "production" else version.state
                table.add_row(version.id, state, metric_text(version.kind, version.metrics),
                              view.backends.get(version.run_id, ""), timestamp(version.created_at), key=version.id)
        if not self.versions:
            table.add_row("no versions yet: register a run below (g)", "", "", "", "")
        table.move_cursor(row=min(cursor, table.row_count - 1))
        runs = self.query_one("#unregistered", DataTable)
        run_cursor = runs.cursor_row
        runs.clear()
        self.runs = {}
        for run in view.runs:
            self.runs[run.id] = run
            runs.add_row(run.id, run.base_model, f"{run.dataset_name} v{run.dataset_version}",
                         metric_text(run.kind, run.metrics), timestamp(run.created_at), key=run.id)
        if not view.runs:
            runs.add_row("none", "", "", "", "")
        runs.move_cursor(row=min(run_cursor, runs.row_count - 1))

    def target(self) -> tuple[ModelVersion | None, Run | None]:
        runs = self.query_one("#unregistered", DataTable)
        if runs.has_focus:
            return None, self._row_item(runs, self.runs)
        return self._row_item(self.query_one("#versions", DataTable), self.versions), None

    @staticmethod
    def _row_item(table: DataTable, items: dict):
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return items.get(key)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        from tui.screens.job import JobScreen

        version, run = self.target()
        if version is not None:
            self.app.push_screen(VersionScreen(version.id))
        elif run is not None:
            self.app.push_screen(JobScreen(run.job_id))

    def action_register(self) -> None:
        _, run = self.target()
        if run is None:
            run = self._row_item(self.query_one("#unregistered", DataTable), self.runs)
        if run is None:
            self.notify("no unregistered training run: train one first (3)", severity="warning")
            return
        run_id = run.id

        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                self.register(run_id, values["task"])

        self.app.push_screen(FormDialog(
            f"Register run {run.id}", f"{run.base_model} trained on {run.dataset_name} v{run.dataset_version} "
            "becomes the next candidate version of a task (created if new). Its weights are hashed for the record.",
            [FormField("task", "Task", task_name_for(run), note="lowercase letters, digits, '.', '_' or '-'")]),
            chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-action")
    def register(self, run_id: str, task: str) -> None:
        from appliance.access import require
        from appliance.registry.versions import register_run
        from appliance.train.runs import get_run
        from appliance.vault.lifecycle import keys_for

        home = self.airlock.home
        with catalog(home) as db:
            keys = keys_for(db, home)
            session = require(db, home, "models.register")
            version = register_run(db, keys, home, get_run(db, run_id), task, actor=session.actor if session else "")
        self.post_message(ModelChanged(f"registered {version.id} (candidate); p promotes it"))

    def on_model_changed(self, message: ModelChanged) -> None:
        self.notify(message.text, markup=False)
        self.poll_now()

    def on_job_started(self, message: JobStarted) -> None:
        open_started_job(self, message)

    def action_refresh(self) -> None:
        self.poll_now()

    def palette_commands(self):
        yield SystemCommand("Register training run", "the selected run becomes a version of a task",
                            self.action_register)
        yield from super().palette_commands()


class VersionScreen(ModelActions, AirlockScreen):
    """One version: where it stands against production, its exports and backend, lineage, history, card."""

    POLL_GROUP = "version-poll"
    HELP = """
One model version. **Metrics** put it next to the task's production version (each measured on its
own run's validation and test records). **Exports** are what quantizing stored (ONNX fp32, fp16,
int8) and the backend it serves on here. **Lineage** is the task's versions as a tree by parent;
**history** its promotions and rollbacks, with who and why. Below: its model card, as
`airlock models card` prints it (metadata only, never records).
"""
    BINDINGS: ClassVar[list] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("o", "quantize", "Quantize"),
        Binding("e", "build_engine", "Engine"),
        Binding("p", "promote", "Promote"),
        Binding("b", "rollback", "Rollback"),
    ]

    def __init__(self, version_id: str) -> None:
        super().__init__()
        self.version_id = version_id
        self.detail = None

    def compose(self) -> ComposeResult:
        yield NavBar("models")
        yield Static(f"Model version {self.version_id}", id="version-title", classes="screen-note")
        with VerticalScroll(id="version-body"):
            yield Static("loading…", id="version-summary", markup=False)
            yield Markdown("", id="version-card")
        yield Footer()

    def keep_polling(self) -> bool:
        # Follow a running quantize or engine job of this version: its exports and backend change when it ends.
        return self.detail is None or self.detail.optimize.busy is not None

    def on_screen_resume(self) -> None:
        self.poll_now()

    def poll(self):
        return self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="version-poll")
    def load(self) -> None:
        from appliance.registry.overview import version_detail

        with catalog(self.airlock.home) as db:
            detail = version_detail(db, self.version_id)
        self.post_message(VersionLoaded(detail))

    def on_version_loaded(self, message: VersionLoaded) -> None:
        self.detail = message.detail
        detail = message.detail
        version = detail.version
        current = detail.production
        data = ", ".join(f"{d['name']} v{d['version']}" for d in version.dataset_versions[-1:])
        lines = [f"{version.id}: {version.state.upper()} · task {version.task} · run {version.run_id} · "
                 f"{version.base_model} on {data}"]
        compare = (f"production {current.id}" if current is not None and current.id != version.id
                   else "this is production" if current is not None else "no production version yet")
        lines.append(f"Metrics ({compare}):")
        versus = current is not None and current.id != version.id
        for name, ours, theirs in detail.metrics:
            if ours is None and theirs is None:
                continue
            if not versus:
                lines.append(f"  {name:<16} {number(ours):>10}")
                continue
            delta = f"  ({ours - theirs:+.4f})" if ours is not None and theirs is not None else ""
            lines.append(f"  {name:<16} {number(ours):>10}   production {number(theirs):>10}{delta}")
        status = detail.optimize
        exports = ", ".join(status.exports) or "none (o quantizes and exports)"
        lines.append(f"Exports: {exports} · serves on {status.backend}")
        busy = status.busy
        if busy is not None:
            lines.append(f"  {busy.kind} job {busy.id} is {busy.state}")
        elif status.optimize is not None and status.optimize.state != "succeeded":
            lines.append(f"  last quantize job {status.optimize.id}: {status.optimize.state}"
                         + (f": {status.optimize.error}" if status.optimize.error else ""))
        if status.engine is not None:
            lines.append(f"  engine job {status.engine.id}: {status.engine.state}")
        if version.reasons:
            lines.append("Rejected by its gates: " + "; ".join(version.reasons))
        for entry in detail.history:
            lines.append(f"{entry['action']} {timestamp(entry['at'])} by {entry['actor'].split(' (')[0]}: "
                         f"{entry['version']} (was {entry['previous'] or '-'}) · {entry['reason'] or 'no reason'}")
        lines.append("Lineage:")
        lines += [f"  {line}" for line in detail.lineage.splitlines()]
        self.query_one("#version-summary", Static).update("\n".join(lines))
        self.query_one("#version-card", Markdown).update(detail.card_markdown)
        self.refresh_bindings()

    def target(self) -> tuple[ModelVersion | None, Run | None]:
        return (self.detail.version if self.detail is not None else None), None

    def on_model_changed(self, message: ModelChanged) -> None:
        self.notify(message.text, markup=False)
        self.poll_now()

    def on_job_started(self, message: JobStarted) -> None:
        open_started_job(self, message)
