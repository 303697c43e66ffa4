"""Training from the form as a real job (progress, loss, re-attach from the dashboard, cancel), the
recipe's validation, the audit log's filter and chain verification, and the command palette."""

from __future__ import annotations

from textual.widgets import ProgressBar, Select

from appliance.audit import iter_audit
from appliance.catalog import open_catalog
from tests.tui.conftest import SIZE, make_app, pilot_test, table_rows, text_of, wait_for_text, wait_until
from tui.dialogs import ErrorDialog
from tui.screens.job import JobScreen
from tui.screens.train import TrainScreen
from tui.widgets import JobRow


@pilot_test
async def test_train_form_validates_starts_a_job_shows_progress_and_cancels(qa_dataset):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None, "the session")
        await pilot.press("3")
        await wait_until(pilot, lambda: isinstance(app.screen, TrainScreen), "the train screen")
        train = app.screen
        await wait_until(pilot, lambda: train.query_one("#dataset", Select).value == "qa", "the dataset choice")
        # Text data trains a language model: the image classifier is not offered, nor configs without weights.
        offered = [name for name, kind in train.all_bases.items() if kind == train.kind]
        assert train.kind == "lm" and "tiny-deepseek-r1" in offered and "tiny-resnet-cls" not in offered
        train.query_one("#base", Select).value = "tiny-deepseek-r1"

        train.set_field("rank", "0")
        await wait_for_text(pilot, "#recipe-check", "rank = 0 is outside 1..256")
        await pilot.press("ctrl+s")  # refused: the recipe's own message and hint, as a dialog
        await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the recipe error")
        assert "pick a value between 1 and 256" in app.screen.hint
        await pilot.press("escape")

        for name, value in {"rank": "", "max_steps": "200", "eval_every": "1", "batch_size": "2",
                            "max_length": "64"}.items():
            train.set_field(name, value)
        await wait_until(pilot, lambda: text_of(app, "#recipe-check") == "recipe valid", "the recipe checked",
                         seen=lambda: text_of(app, "#recipe-check"))
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen), "the job screen")
        job_screen = app.screen
        # eval_every = 1: the first progress event carries a validation loss too
        await wait_until(pilot, lambda: job_screen.losses and job_screen.val_losses, "the first training step", 90)
        await wait_for_text(pilot, "#job-progress-text", "step ", "tok/s")
        await wait_until(pilot, lambda: text_of(app, "#job-curve-text").startswith("loss "), "the loss curve's text",
                         seen=lambda: text_of(app, "#job-curve-text"))
        bar = job_screen.query_one("#job-bar", ProgressBar)
        assert bar.total == 200 and 0 < bar.progress < 200
        assert job_screen.query_one("#job-sparkline").display  # 80 columns: a sparkline, not the wide chart
        job_id = job_screen.job_id

        # The dashboard lists the running job with its progress; Enter re-attaches with the whole curve.
        await pilot.press("1")
        await wait_until(pilot, lambda: app.screen.query(JobRow), "the running job on the dashboard")
        row = app.screen.query_one(JobRow)
        assert row.job_id == job_id
        row.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen is not job_screen,
                         "a second job screen")
        reopened = app.screen
        await wait_until(pilot, lambda: len(reopened.losses) >= len(job_screen.losses) > 0, "the replayed curve")
        await wait_for_text(pilot, "#job-curve-text", "val loss")

        await pilot.press("c")
        await wait_until(pilot, lambda: reopened.job is not None and reopened.job.state == "cancelled",
                         "the cancelled job", 120)
        await wait_for_text(pilot, "#job-run", "press r to continue")
        assert app.screen.check_action("resume_job", ()) is True
        assert app.screen.check_action("cancel_job", ()) is None  # shown, greyed out


@pilot_test
async def test_audit_filter_verify_and_the_palette_has_no_screenshot(unlocked):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None, "the session")
        await pilot.press("7")
        await wait_until(pilot, lambda: app.screen.query("#audit")
                         and {"vault.init", "vault.unlock"} <= {row[3] for row in table_rows(app, "#audit")},
                         "the audit rows of the vault's init and unlock")
        await pilot.press("slash", "u", "n", "l", "o", "c", "k")
        await wait_until(pilot, lambda: {row[3] for row in table_rows(app, "#audit")} == {"vault.unlock"},
                         "the filtered rows")
        await pilot.press("escape")  # leaves the filter's focus; the filter stays
        app.screen.query_one("#audit").focus()
        await pilot.press("v")
        await wait_for_text(pilot, "#verify-result", "Chain intact", "record it to detect truncation later",
                            "audit-anchor.log")

        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert "Verify audit chain" in titles and "Go to Data" in titles
        assert "Screenshot" not in titles
        assert app.ALLOW_SELECT is False

    verified = list(iter_audit(open_catalog(), action="audit.verify"))
    assert len(verified) == 1 and verified[0].details["ok"] is True and verified[0].actor.startswith("admin")
