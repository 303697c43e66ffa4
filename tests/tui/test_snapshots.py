"""What the operator sees at 80x24, as SVG snapshots (`pytest tests/tui --snapshot-update` after a
deliberate change; review the SVGs in the diff). Fields that change by themselves (the auto-lock
countdown, free disk, GPUs, timestamps, random split counts) are masked before the screenshot."""

from __future__ import annotations

import re
from collections.abc import Callable

from textual.widgets import DataTable, Input

from tests.conftest import run_cli
from tests.tui.conftest import SIZE, make_app, wait_until
from tui.screens.login import LoginScreen

MASK = "(varies)"


def shown(app, selector: str) -> str:
    found = app.screen.query(selector)
    return str(found.first().render()) if found else ""


def screenshot_of(mode_key: str | None, ready: Callable[[object], bool], masked_columns: dict[str, list[str]]):
    """run_before: go to a screen, wait until its workers delivered, then mask what varies."""
    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_until(pilot, lambda: app.session is not None and not isinstance(app.screen, LoginScreen),
                         "the session")
        if mode_key:
            await pilot.press(mode_key)
        await wait_until(pilot, lambda: ready(app), "the screen's data")
        await app.workers.wait_for_complete()  # nothing left that could repaint after the masking
        await pilot.pause()
        for screen in app.screen_stack:
            for widget in screen.query(".volatile"):
                widget.update(MASK)
            for field in screen.query(Input):
                field.cursor_blink = False
        for selector, columns in masked_columns.items():
            table = app.screen.query_one(selector, DataTable)
            for row_key in list(table.rows):
                for column in columns:
                    table.update_cell(row_key, column, MASK)
        await pilot.pause()
    return run_before


def test_home_snapshot(unlocked, snap_compare):
    ready = screenshot_of(None, lambda app: "dataset" in shown(app, "#data-summary")
                          and "checking" not in shown(app, "#machine-gpu"), {})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=ready)


def test_data_snapshot(qa_dataset, snap_compare):
    ready = screenshot_of("2", lambda app: app.current_mode == "data" and app.screen.query_one("#datasets").row_count
                          and str(app.screen.query_one("#datasets").get_row_at(0)[0]) == "qa",
                          {"#datasets": ["splits", "updated"]})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=ready)


def test_train_snapshot(unlocked, snap_compare):
    ready = screenshot_of("3", lambda app: app.current_mode == "train" and "no datasets" in
                          str(app.screen.query_one("#dataset").prompt), {})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=ready)


def test_audit_snapshot(unlocked, snap_compare):
    # Filtered to the login row: `vault init` ran before anyone logged in, so its actor is the OS
    # account running the tests, whose name (and so the column's width) differs between machines.
    def filtered(app) -> bool:
        if app.current_mode != "audit" or not app.screen.query_one("#audit").row_count:
            return False
        app.screen.query_one("#audit-filter", Input).value = "unlock"
        return app.screen.query_one("#audit").row_count == 1

    ready = screenshot_of("7", filtered, {"#audit": ["time"]})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=ready)


def test_models_snapshot(trained_run, snap_compare):
    register = run_cli("models", "register", trained_run, "--task", "qa")
    assert register.returncode == 0, register.stderr
    ready = screenshot_of("4", lambda app: app.current_mode == "models" and
                          str(app.screen.query_one("#versions").get_row_at(0)[0]) == "qa-v1",
                          {"#versions": ["metric", "created"]})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=ready)


def test_serve_snapshot(unlocked, stop_jobs, snap_compare):
    created = run_cli("keys", "create", "pacs-bridge", "--task", "qa")
    assert created.returncode == 0, created.stderr
    ready = screenshot_of("5", lambda app: app.current_mode == "serve" and app.screen.view is not None
                          and app.screen.query_one("#keys").row_count == 1, {"#keys": ["id", "created"]})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=ready)


def test_schedule_snapshot(production_task, snap_compare):
    scheduled = run_cli("schedule", "set", production_task, "--every", "7d", "--min-new-records", "20")
    assert scheduled.returncode == 0, scheduled.stderr

    def ready(app) -> bool:
        if app.current_mode != "schedule" or not app.screen.views:
            return False
        # Due times and run times depend on the clock: masked where they appear in the detail too.
        detail = app.screen.query_one("#schedule-detail")
        detail.update(re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?", MASK, str(detail.render())))
        return True

    run_before = screenshot_of("6", ready, {"#schedules": ["next due"]})
    assert snap_compare(make_app(poll_interval=3600), terminal_size=SIZE, run_before=run_before)
