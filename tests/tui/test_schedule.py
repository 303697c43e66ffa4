"""The Schedule screen against a real appliance home: a bad interval refused with the appliance's hint, a
schedule with an inbox folder set by keyboard, "run due now" importing the inbox (new records, so a real
retrain job starts), the outcome and the next due time, the rejected candidate with its gate results, and
deleting the schedule with a typed confirmation."""

from __future__ import annotations

from pathlib import Path

from appliance.catalog import open_catalog
from appliance.registry.schedule import get_schedule
from appliance.registry.versions import production
from tests.appliance.train.conftest import corpus_chats
from tests.conftest import run_cli
from tests.tui.conftest import (
    SIZE,
    first_row,
    make_app,
    pilot_test,
    table_rows,
    type_text,
    wait_for_dialog,
    wait_for_text,
    wait_until,
)
from tui.dialogs import ConfirmByTyping, ErrorDialog, FormDialog
from tui.screens.schedule import ScheduleScreen


async def open_dialog(pilot) -> FormDialog:
    await pilot.press("e")
    await wait_for_dialog(pilot, FormDialog, "the schedule dialog")
    return pilot.app.screen


@pilot_test
async def test_set_run_due_with_inbox_and_delete(production_task: str, tmp_path: Path):
    # Gate 3 (engine parity) with a limit no export can meet: the retrain the schedule starts is rejected.
    policy = run_cli("models", "policy", production_task, "--engines", "--engine-max-rel-diff", "1e-12")
    assert policy.returncode == 0, policy.stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "new.jsonl").write_text("\n".join(corpus_chats(60)[40:]) + "\n", encoding="utf-8")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None, "the session")
        await pilot.press("6")
        await wait_until(pilot, lambda: isinstance(app.screen, ScheduleScreen)
                         and first_row(app, "#schedules")[:2] == ["qa", "not scheduled (e sets)"], "the task's row",
                         seen=lambda: first_row(app, "#schedules"))
        await wait_for_text(pilot, "#schedule-detail", "production qa-v1")

        dialog = await open_dialog(pilot)
        dialog.set_value("every", "5 seconds")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the refusal")
        assert "is not an interval" in app.screen.message and "30m, 12h, 7d or 2w" in app.screen.hint
        await pilot.press("escape")

        dialog = await open_dialog(pilot)
        assert dialog.values()["every"] == "7d"  # the suggested interval
        await pilot.press("tab", "tab", "tab")  # every -> cron -> min new -> inbox
        await type_text(pilot, str(inbox))
        await pilot.press("enter")
        await wait_until(pilot, lambda: first_row(app, "#schedules")[1:2] == ["every 1w"], "the schedule",
                         seen=lambda: first_row(app, "#schedules"))
        assert table_rows(app, "#schedules")[0][4] == "never ran"
        await wait_for_text(pilot, "#schedule-detail", f"Inbox: {inbox}")

        # Run due now: a new --every schedule is due at once; the inbox's records arrive, a retrain starts.
        await pilot.press("u")
        await wait_until(pilot, lambda: first_row(app, "#schedules")[4:5] and
                         first_row(app, "#schedules")[4].startswith("retrain started"), "the run's outcome", 120,
                         seen=lambda: first_row(app, "#schedules"))
        await wait_for_text(pilot, "#schedule-detail", "retrain started: ", "new records since qa-v1")
        assert (inbox / "processed" / "new.jsonl").exists() and not (inbox / "new.jsonl").exists()
        db = open_catalog()
        schedule = get_schedule(db, "qa")
        assert schedule is not None and schedule.last_run_at is not None and schedule.next_due_at > schedule.last_run_at
        db.close()

        # The retrain job ends; its candidate is rejected by its gates and shows with each gate's result.
        detail = await wait_for_text(pilot, "#schedule-detail", "Rejected candidates", "forgetting: ", "new data: ",
                                     "engine parity: ", ": fail (", timeout=600)
        rejected = detail[detail.index("Rejected candidates"):].splitlines()
        print("\n".join(rejected))
        # Which gate fails first depends on the tiny run's losses; one of them does, and each says why.
        assert rejected[1].startswith("  qa-v2 ") and any(w in rejected[1] for w in ("forgetting:", "new data:",
                                                                                       "engine parity:"))
        gates = "\n".join(rejected[2:])
        assert "forgetting: " in gates and "new data: " in gates and "engine parity: " in gates
        assert ": fail (" in gates
        db = open_catalog()
        assert production(db, "qa").id == "qa-v1"  # production untouched
        db.close()

        await pilot.press("d")
        await wait_for_dialog(pilot, ConfirmByTyping, "the delete confirmation")
        await type_text(pilot, "qa")
        await pilot.press("enter")
        await wait_until(pilot, lambda: first_row(app, "#schedules")[1:2] == ["not scheduled (e sets)"],
                         "the schedule gone", seen=lambda: first_row(app, "#schedules"))
    db = open_catalog()
    assert get_schedule(db, "qa") is None
    db.close()
