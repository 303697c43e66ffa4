"""Schedule: unattended, gated retraining per task; its inbox, last and next run, and rejected candidates.

Each task of the registry is a row, scheduled or not, so a schedule can be set on any of them.
Below, for the selected task: its inbox folder, the last runs of its schedule with their outcome,
and the candidates its gates rejected, with each gate's result. Setting, deleting and "run due
now" are the appliance's (`appliance.registry.schedule`), with its checks and role rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Static

from tui.connection import catalog
from tui.dialogs import ConfirmByTyping, FormDialog, FormField
from tui.formatting import timestamp
from tui.messages import ScheduleChanged, SchedulesLoaded
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

if TYPE_CHECKING:
    from appliance.registry.overview import ScheduleView

OUTCOME_WORDS = {"started": "retrain started", "nothing_new": "nothing new", "failed": "FAILED", "skipped": "SKIPPED"}


def pct(value: float | None, sign: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value * 100:+.1f}%" if sign else f"{value * 100:.1f}%"


def gate_line(name: str, gate: dict) -> str:
    """One gate's verdict with its numbers: forgetting (worst earlier split), new data, engine parity.

    Any number may be missing (a gate not applicable, not measured): it shows as '-', never an error."""
    status = gate.get("status", "?")
    if "measured" in gate:
        measured, limits = gate.get("measured") or {}, gate.get("thresholds") or {}
        rel = measured.get("max_rel_diff")
        text = f"{name}: {status} ({gate.get('variant', '?')} export"
        if isinstance(rel, int | float):
            text += f", max rel diff {rel:.3g}"
            if isinstance(limits.get("max_rel_diff"), int | float):
                text += f" (limit {limits['max_rel_diff']:.3g}, {limits.get('source', '')})"
        return text + ")"
    if "relative_change" in gate:
        limit = pct(gate.get("max_relative_increase"))
        return f"{name}: {status} ({pct(gate['relative_change'], True)}, limit {limit})"
    splits = [s for s in gate.get("splits") or [] if isinstance(s, dict)]
    if splits:
        worst = max(splits, key=lambda s: s.get("relative_change") or 0)
        return (f"{name}: {status} (worst {worst.get('split', '?')} {pct(worst.get('relative_change'), True)}, "
                f"limit {pct(gate.get('max_relative_increase'))})")
    return f"{name}: {status}" + (f" ({gate['reason']})" if gate.get("reason") else "")


class ScheduleScreen(AirlockScreen):
    MODE = "schedule"
    POLL_GROUP = "schedule-poll"
    HELP = """
Scheduled retraining. A task's schedule says **when** it retrains (every 7d, or a cron time in UTC)
and how many **new records** must have arrived since its production model's data. At each due
time the appliance imports the task's **inbox** folder (files move to processed/ or rejected/),
retrains the production model on the new records plus a replayed share of earlier ones, and runs
the **gates**: the new model must not forget (test loss on earlier splits may rise at most the
task's limit) and must not get worse on the new data. A candidate that fails is **rejected** and
production stays as it was; one that passes is promoted only with auto-promote on.

**e** sets the selected task's schedule, **d** deletes it (both admin), **u** runs every due
schedule now, **f** runs the selected one now even if not due. A systemd timer does the same
unattended (`airlock schedule run-due --machine-key`).
"""
    BINDINGS: ClassVar[list] = [
        Binding("e", "edit", "Set"),
        Binding("d", "delete", "Delete"),
        Binding("u", "run_due", "Run due now"),
        Binding("f", "run_selected", "Run this now"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.views: dict[str, ScheduleView] = {}

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Retraining schedules by task. e set · u run due now", classes="screen-note")
        table: DataTable = DataTable(id="schedules", cursor_type="row", zebra_stripes=True)
        for label in ("task", "when", "next due", "min new", "last run"):
            table.add_column(label, key=label)
        yield table
        with VerticalScroll(id="schedule-detail-box"):
            yield Static("", id="schedule-detail", markup=False)
        yield Footer()

    def poll(self):
        return self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="schedule-poll")
    def load(self) -> None:
        from appliance.jobs.runner import reconcile_jobs
        from appliance.registry.overview import schedule_overview

        with catalog(self.airlock.home) as db:
            reconcile_jobs(db)
            views = schedule_overview(db)
        self.post_message(SchedulesLoaded(views))

    def keep_polling(self) -> bool:
        return True

    def on_schedules_loaded(self, message: SchedulesLoaded) -> None:
        table = self.query_one("#schedules", DataTable)
        cursor = table.cursor_row
        rows = [(v.task.name, v) for v in message.views]
        changed = [name for name, _ in rows] != list(self.views) or any(
            self.views[name] != view for name, view in rows)
        self.views = dict(rows)
        if changed:
            table.clear()
            for name, view in rows:
                schedule = view.schedule
                last = view.last_runs[0] if view.last_runs else None
                last_text = (f"{OUTCOME_WORDS.get(last['outcome'], last['outcome'])} {timestamp(last['ran_at'])[5:16]}"
                             if last else "never ran" if schedule else "")
                if schedule is None:
                    table.add_row(name, "not scheduled (e sets)", "", "", last_text, key=name)
                else:
                    table.add_row(name, schedule.when, timestamp(schedule.next_due_at)[:16],
                                  str(schedule.min_new_records), last_text, key=name)
            if not rows:
                table.add_row("no tasks: register a model version first (4, then g)", "", "", "", "")
            table.move_cursor(row=min(cursor, table.row_count - 1))
        self.show_detail()

    def selected(self) -> ScheduleView | None:
        table = self.query_one("#schedules", DataTable)
        if not table.row_count or not self.views:
            return None
        return self.views.get(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or "")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_detail()

    def show_detail(self) -> None:
        view = self.selected()
        detail = self.query_one("#schedule-detail", Static)
        if view is None:
            detail.update("")
            return
        task, schedule = view.task, view.schedule
        lines = [f"{task.name}: production {view.production.id if view.production else 'none (promote one first)'} · "
                 f"auto-promote {'on' if task.auto_promote else 'off'} · gates: forgetting ≤ "
                 f"{task.max_forgetting * 100:.1f}%, new data ≤ {task.new_data_tolerance * 100:.1f}%"]
        if task.kind == "classifier":
            from appliance.train.operating_point import OperatingPolicy

            lines.append(f"Operating point: {OperatingPolicy.of_task(task).describe()}")
        if schedule is not None:
            lines.append(f"Inbox: {schedule.inbox or 'none (new data comes from imports on the Data screen)'} · "
                         f"replay {schedule.replay:g}")
            lines.append(f"Last run {timestamp(schedule.last_run_at)} · next due {timestamp(schedule.next_due_at)} UTC")
        for run in view.last_runs[:5]:
            lines.append(f"  {timestamp(run['ran_at'])}  {OUTCOME_WORDS.get(run['outcome'], run['outcome'])}: "
                         f"{run['reason']}" + (f" (job {run['job_id']})" if run["job_id"] else ""))
            if run["outcome"] in ("failed", "skipped") and run["hint"]:
                lines.append(f"      hint: {run['hint']}")
        if view.rejected:
            lines.append("Rejected candidates (production unchanged):")
            for version in view.rejected[:5]:
                lines.append(f"  {version.id} {timestamp(version.created_at)}: " + "; ".join(version.reasons))
                for name in ("forgetting", "new_data", "engine_parity"):
                    gate = version.gates.get(name)
                    if isinstance(gate, dict):
                        lines.append(f"      {gate_line(name.replace('_', ' '), gate)}")
        else:
            lines.append("No rejected candidates.")
        detail.update("\n".join(lines))

    # --- actions ---------------------------------------------------------------------------------------------------

    def action_edit(self) -> None:
        view = self.selected()
        if view is None:
            self.notify("no task to schedule: register a model version first", severity="warning")
            return
        schedule = view.schedule
        every = "" if schedule is None else ("" if schedule.cron else schedule.when.removeprefix("every "))
        task = view.task.name

        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                self.set_schedule(task, values)

        self.app.push_screen(FormDialog(
            f"Schedule for {task}", "Fill in either Every or Cron. A new 'every' schedule is due at once.",
            [FormField("every", "Every", every if schedule else "7d", placeholder="30m, 12h, 7d, 2w"),
             FormField("cron", "Cron (UTC)", schedule.cron or "" if schedule else "", placeholder="e.g. 30 2 * * 1"),
             FormField("min_new", "Min new", str(schedule.min_new_records) if schedule else "1",
                       note="retrain only when this many records arrived"),
             FormField("inbox", "Inbox", (schedule.inbox or "") if schedule else "",
                       placeholder="folder imported at each run (optional)"),
             FormField("replay", "Replay", f"{schedule.replay:g}" if schedule else "0.2",
                       note="share of earlier records in each retrain (0-0.9)")]), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="schedule-action")
    def set_schedule(self, task: str, values: dict[str, str]) -> None:
        from pathlib import Path

        from appliance.access import require
        from appliance.registry.schedule import set_schedule
        from appliance.registry.versions import RegistryError

        try:
            min_new = int(values["min_new"] or "1")
            replay = float(values["replay"] or "0.2")
        except ValueError:
            raise RegistryError("min new records must be a whole number and replay a fraction",
                                hint="e.g. min new 50, replay 0.2") from None
        home = self.airlock.home
        with catalog(home) as db:
            session = require(db, home, "schedules.manage")
            result = set_schedule(db, task, actor=session.actor if session else "", every=values["every"] or None,
                                  cron=values["cron"] or None, min_new_records=min_new,
                                  inbox=Path(values["inbox"]) if values["inbox"] else None, replay=replay)
        self.post_message(ScheduleChanged(f"{task}: {result.when}, next due {timestamp(result.next_due_at)} UTC"))

    def action_delete(self) -> None:
        view = self.selected()
        if view is None or view.schedule is None:
            self.notify("the selected task has no schedule", severity="warning")
            return
        task = view.task.name

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.delete_schedule(task)

        self.app.push_screen(ConfirmByTyping(f"Delete the retraining schedule of {task}? Its models stay.", task),
                             confirmed)

    @work(thread=True, exclusive=True, exit_on_error=False, group="schedule-action")
    def delete_schedule(self, task: str) -> None:
        from appliance.access import require
        from appliance.registry.schedule import delete_schedule

        home = self.airlock.home
        with catalog(home) as db:
            session = require(db, home, "schedules.manage")
            delete_schedule(db, task, actor=session.actor if session else "")
        self.post_message(ScheduleChanged(f"{task}: schedule removed"))

    def action_run_due(self) -> None:
        self.run_due(None)

    def action_run_selected(self) -> None:
        view = self.selected()
        if view is None or view.schedule is None:
            self.notify("the selected task has no schedule", severity="warning")
            return
        self.run_due(view.task.name)

    @work(thread=True, exclusive=True, exit_on_error=False, group="schedule-action")
    def run_due(self, task: str | None) -> None:
        from appliance.registry.run_due_process import run_due_in_process

        # In a child process: the inbox import runs its job in-process there (signal handlers, core dumps off).
        self.post_message(ScheduleChanged("running due schedules (inbox imports can take a while)…"))
        results = run_due_in_process(self.airlock.home, task=task, force=task is not None)
        if not results:
            self.post_message(ScheduleChanged("nothing due"))
            return
        text = "; ".join(f"{r.task}: {OUTCOME_WORDS.get(r.outcome, r.outcome)}: {r.reason}" for r in results)
        self.post_message(ScheduleChanged(text))

    def on_schedule_changed(self, message: ScheduleChanged) -> None:
        self.notify(message.text, timeout=8, markup=False)
        self.poll_now()

    def action_refresh(self) -> None:
        self.poll_now()

    def palette_commands(self):
        yield SystemCommand("Set schedule", "when the selected task retrains, and its inbox", self.action_edit)
        yield SystemCommand("Delete schedule", "stop retraining the selected task unattended", self.action_delete)
        yield SystemCommand("Run due schedules now", "what the timer would do now", self.action_run_due)
        yield SystemCommand("Run selected schedule now", "even if not due", self.action_run_selected)
