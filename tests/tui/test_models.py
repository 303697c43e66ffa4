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
    wait_for_dialog,
    wait_for_text,
    wait_until,
)
from tui.dialogs import ErrorDialog, FormDialog, HelpDialog
from tui.screens.job import JobScreen
from tui.screens.models import ModelsScreen, VersionScreen


async def open_models_with(pilot, app, run_id: str) -> None:
    """Log in, open the Models screen (key 4) and wait until `run_id` heads the unregistered runs."""
    await wait_until(pilot, lambda: app.session is not None, "the session")
    await pilot.press("4")
    await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen)
                     and first_row(app, "#unregistered")[:1] == [run_id], "the unregistered run",
                     seen=lambda: first_row(app, "#unregistered"))


@pilot_test
async def test_register_quantize_engine_promote_rollback_and_detail(trained_run: str):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_models_with(pilot, app, trained_run)
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
        await wait_for_dialog(pilot, FormDialog, "the register dialog")
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
        await wait_for_dialog(pilot, FormDialog, "the quantize dialog")
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
        await wait_for_dialog(pilot, FormDialog, "the promote dialog")
        await type_text(pilot, "passed review")
        await pilot.press("enter")
        await wait_until(pilot, lambda: first_row(app, "#versions")[1:2] == ["PRODUCTION"], "the promoted version",
                         seen=lambda: first_row(app, "#versions"))

        # Rollback of the first production version is refused with the registry's message and hint.
        await pilot.press("b")
        await wait_for_dialog(pilot, FormDialog, "the rollback dialog")
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


@pilot_test
async def test_quantize_form_offers_the_genai_variants_with_the_cli_checks(trained_run: str, tmp_path):
    """The quantize form of an LM run lists the onnxruntime-genai exports and takes a recipe file; what it refuses,
    it refuses with the CLI's own message (the same appliance functions), and a valid form starts the same job."""
    import json

    import pytest

    from appliance.optimize.errors import OptimizeError
    from appliance.optimize.jobs import parse_variants
    from appliance.optimize.recipe import load_quant_recipe

    bad, good = tmp_path / "bad.toml", tmp_path / "int4.toml"
    bad.write_text("int4_block_size = 24\n", encoding="utf-8")
    good.write_text("int4_block_size = 64\nint4_algo = \"k_quant\"\n", encoding="utf-8")
    with pytest.raises(OptimizeError) as unknown:
        parse_variants("fp32,genai-int3")
    with pytest.raises(OptimizeError) as block:
        load_quant_recipe(bad)

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_models_with(pilot, app, trained_run)
        await pilot.press("tab")  # the runs' table: the form acts on the selected run

        async def submit(**values: str) -> None:
            await pilot.press("o")
            await wait_for_dialog(pilot, FormDialog, "the quantize dialog")
            for name, value in values.items():
                app.screen.set_value(name, value)
            await pilot.press("enter")

        await pilot.press("o")
        await wait_for_dialog(pilot, FormDialog, "the quantize dialog")
        notes = {spec.name: spec.note for spec in app.screen.fields}
        assert "genai-int4, genai-int8, genai-fp32 (onnxruntime-genai, CPU)" in notes["variants"]
        assert "onnxruntime-genai" in app.screen.text and "--recipe" in notes["recipe"]
        await pilot.press("escape")

        for values, refusal in (({"variants": "fp32,genai-int3"}, unknown.value),
                                ({"variants": "genai-int4", "recipe": str(bad)}, block.value)):
            await submit(**values)
            await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the refusal")
            assert (app.screen.message, app.screen.hint) == (refusal.message, refusal.hint)
            await pilot.press("escape")
        assert not [j for j in _jobs() if j[0] == "optimize"]  # nothing started

        await submit(qat="no", variants="genai-int4", recipe=str(good))
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen), "the optimize job")
    jobs = [params for kind, params in _jobs() if kind == "optimize"]
    assert len(jobs) == 1 and jobs[0]["run"] == trained_run and jobs[0]["variants"] == ["genai-int4"]
    assert (jobs[0]["recipe"]["int4_block_size"], jobs[0]["recipe"]["int4_algo"], jobs[0]["recipe"]["qat"]) == \
        (64, "k_quant", False)
    assert json.dumps(jobs[0])  # the job's parameters as the CLI's `optimize` writes them
    # Building the export is another test's job (tests/appliance/optimize/test_genai_jobs.py): cancel it here and
    # wait for it to stop (it checks between stages; a builder run already started finishes first).
    from appliance.jobs.records import FINAL_STATES, list_jobs
    from appliance.jobs.runner import cancel_job, wait_for

    db = open_catalog()
    try:
        job = next(j for j in list_jobs(db, limit=100) if j.kind == "optimize")
        cancel_job(db, job.id)
        assert wait_for(db, job.id, timeout_s=900).state in FINAL_STATES
    finally:
        db.close()


def _jobs() -> list[tuple[str, dict]]:
    import json

    db = open_catalog()
    try:
        return [(kind, json.loads(params)) for kind, params in db.execute("SELECT kind, params FROM jobs")]
    finally:
        db.close()
