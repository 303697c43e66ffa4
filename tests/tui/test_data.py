"""The import wizard end to end: preview without contents, dry run, a real import job, the dataset's
detail with its per-file report, an appliance error as a dialog, and a typed-confirmation delete."""

from __future__ import annotations

import json
from pathlib import Path

from textual.widgets import DataTable, Input

from tests.tui.conftest import (
    SIZE,
    finished_job,
    first_row,
    make_app,
    pilot_test,
    table_rows,
    wait_for_dialog,
    wait_for_text,
    wait_until,
)
from tui.dialogs import ConfirmByTyping, ErrorDialog
from tui.screens.data import DatasetScreen
from tui.screens.import_wizard import ImportScreen


@pilot_test
async def test_import_wizard_dry_run_then_import_job_then_detail_and_delete(unlocked, qa_source: Path):
    (qa_source / "notes.bin").write_bytes(b"\x00\x01binary")  # rejected, with its reason
    secret_text = json.loads((qa_source / "qa.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    app = make_app(mount_root=qa_source.parent)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None, "the session")
        await pilot.press("2")
        await wait_until(pilot, lambda: app.current_mode == "data", "the data screen")
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, ImportScreen), "the wizard")
        wizard = app.screen

        path = wizard.query_one("#path", Input)
        path.value = str(qa_source)
        path.focus()
        await pilot.press("enter")
        preview = await wait_for_text(pilot, "#preview", "contents hidden", "2 files", "1 jsonl",
                                      "line 1: messages: user", "chars")
        assert secret_text[:20] not in preview  # shapes and lengths only
        assert wizard.query_one("#name", Input).value == "qa-export"  # suggested from the folder name

        # An appliance error (a bad dataset name) is a dialog with its message and hint.
        wizard.query_one("#name", Input).value = "Bad Name!"
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the error dialog")
        assert "is not allowed" in app.screen.message and "lowercase" in app.screen.hint
        await pilot.press("escape")

        wizard.query_one("#name", Input).value = "qa"
        await pilot.press("ctrl+r")
        await wait_for_text(pilot, "#dry-run-summary", "would be imported", "2 files: imported 1", "rejected 1")
        await wait_until(pilot, lambda: first_row(app, "#dry-run-problems")[:2] == ["notes.bin", "rejected"],
                         "the rejected file in the dry run", seen=lambda: first_row(app, "#dry-run-problems"))

        await pilot.press("ctrl+s")
        await finished_job(pilot, "import", "dataset qa version 1", timeout=120)

        await pilot.press("escape", "escape")
        await wait_until(pilot, lambda: app.screen.query("#datasets")
                         and any(row[0] == "qa" for row in table_rows(app, "#datasets")), "the new dataset")
        app.screen.query_one("#datasets", DataTable).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, DatasetScreen), "the dataset detail")
        await wait_for_text(pilot, "#report-summary", "Import report, version 1", "rejected 1")
        await wait_until(pilot, lambda: first_row(app, "#problems")[:2] == ["notes.bin", "rejected"],
                         "the rejected file in the report", seen=lambda: first_row(app, "#problems"))

        await pilot.press("delete")
        await wait_for_dialog(pilot, ConfirmByTyping, "the confirmation")
        await pilot.press("q", "x", "enter")  # not the name: nothing happens
        await wait_for_text(pilot, "#confirm-feedback", "did not match")
        assert isinstance(app.screen, ConfirmByTyping)
        app.screen.query_one("#typed", Input).value = "qa"
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, (ConfirmByTyping, DatasetScreen)),
                         "the dataset list again")
        await wait_until(pilot, lambda: first_row(app, "#datasets")[:1] == ["no datasets yet: press n to import"],
                         "the empty list", seen=lambda: first_row(app, "#datasets"))
