"""The Models screen against a real appliance home: register a trained run to a task, quantize and export it
as a real `optimize` job, the engine build refused with the appliance's reason on a machine without GPU or
TensorRT, promote with a reason (audited), a rollback refused with its hint, and a version's detail and card."""

from __future__ import annotations

from textual.widgets import DataTable

from appliance.audit import iter_audit
from appliance.catalog import open_catalog
from appliance.optimize.jobs import NO_ENGINES, engine_build_refusal
from tests.tui.conftest import (
    SIZE,
    finished_job,
    first_row,
    make_app,
    pilot_test,
    table_rows,
    text_of,
    type_text,
    wait_for_text,
    wait_until,
)
from tui.dialogs import ErrorDialog, FormDialog, HelpDialog
from tui.screens.job import JobScreen
from tui.screens.models import ModelsScreen, VersionScreen


@pilot_test
async def test_register_quantize_engine_promote_rollback_and_detail(trained_run: str):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None, "the session")
        await pilot.press("4")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen)
                         and first_row(app, "#unregistered")[:1] == [trained_run], "the unregistered run",
                         seen=lambda: first_row(app, "#unregistered"))
        models = app.screen
        assert table_rows(app, "#versions")[0][0].startswith("no versions yet")
        assert table_rows(app, "#unregistered")[0][3].startswith("val loss ")

        await pilot.press("f1")  # the screen's help lists its keys, the footer's hidden ones too
        await wait_until(pilot, lambda: isinstance(app.screen, HelpDialog), "the help")
        assert {("g", "Register"), ("o", "Quantize"), ("e", "Engine"), ("p", "Promote"), ("b", "Rollback")} <= set(
            app.screen.keys) and "candidate" in app.screen.text
        await pilot.press("escape")

        # Register: the run table has the focus (Tab), g asks for the task (suggested: the dataset's name).
        await pilot.press("tab")
        assert models.query_one("#unregistered", DataTable).has_focus
        await pilot.press("g")
        await wait_until(pilot, lambda: isinstance(app.screen, FormDialog), "the register dialog")
        assert app.screen.values() == {"task": "qa"}
        await pilot.press("enter")
        # Both tables as asserted: the versions' and the runs' (the run moved from one to the other).
        await wait_until(pilot, lambda: first_row(app, "#versions")[:2] == ["qa-v1", "candidate"]
                         and first_row(app, "#unregistered")[:1] == ["none"], "the new candidate version",
                         seen=lambda: (first_row(app, "#versions"), first_row(app, "#unregistered")))
        assert table_rows(app, "#versions")[0][3] == "PyTorch"  # not quantized yet

        # Quantize: PTQ only, the FP32 export (the quickest real job), followed on the job screen.
        models.query_one("#versions", DataTable).focus()
        await pilot.press("o")
        await wait_until(pilot, lambda: isinstance(app.screen, FormDialog), "the quantize dialog")
        app.screen.set_value("qat", "no")
        app.screen.set_value("variants", "fp32")
        await pilot.press("enter")
        await finished_job(pilot, "optimize", "exports fp32 stored (parity with PyTorch checked)", "serves on ORT CPU")
        assert "quantize + ONNX export" in text_of(app, "#job-title")
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen)
                         and first_row(app, "#versions")[3:4] == ["ORT CPU"], "the version's new backend",
                         seen=lambda: first_row(app, "#versions"))

        # Engine build: this machine has no GPU or no TensorRT, so the appliance's reason and hint, as a dialog.
        refusal = engine_build_refusal("cuda:0")
        await pilot.press("e")
        if refusal is not None:
            await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the engine refusal")
            assert app.screen.message == NO_ENGINES and app.screen.hint == refusal.hint
            await pilot.press("escape")
        else:  # a GPU with TensorRT: the build starts as a job
            await wait_until(pilot, lambda: isinstance(app.screen, JobScreen), "the engine job")
            await pilot.press("escape")

        # Promote with a reason, typed.
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, FormDialog), "the promote dialog")
        await type_text(pilot, "passed review")
        await pilot.press("enter")
        await wait_until(pilot, lambda: first_row(app, "#versions")[1:2] == ["PRODUCTION"], "the promoted version",
                         seen=lambda: first_row(app, "#versions"))

        # Rollback of the first production version is refused with the registry's message and hint.
        await pilot.press("b")
        await wait_until(pilot, lambda: isinstance(app.screen, FormDialog), "the rollback dialog")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the rollback refusal")
        assert "first production version" in app.screen.message and "promote another" in app.screen.hint
        await pilot.press("escape")

        # The detail: exports and backend, the lineage, the card with the promotion's reason.
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, VersionScreen) and app.screen.detail is not None,
                         "the version detail")
        # The exports, the promotion's reason and the lineage tree (qa-v1 [production]).
        await wait_for_text(pilot, "#version-summary", "qa-v1: PRODUCTION", "Exports: fp32 · serves on ORT CPU",
                            "promote", "passed review", "qa-v1 [production]")
        assert "# Model card: qa-v1" in app.screen.detail.card_markdown

        titles = {command.title for command in app.get_system_commands(app.screen)}
        assert {"Quantize and export", "Build TensorRT engine", "Promote model version", "Roll back task"} <= titles

    db = open_catalog()
    promoted = list(iter_audit(db, action="models.promote"))
    assert len(promoted) == 1 and promoted[0].object == "qa-v1" and promoted[0].actor.startswith("admin")
    assert "passed review" in str(promoted[0].details)
    db.close()
