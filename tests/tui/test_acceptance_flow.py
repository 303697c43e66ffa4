"""The issue's acceptance flow with the keyboard only, at 80x24, on the tiny model on CPU, as real jobs:
log in -> import a folder -> train (a tiny recipe typed into the form) -> register -> quantize (PTQ + QAT) and
export ONNX -> promote -> start the server -> a client's HTTP query answered -> stop the server.

The only things done outside the keyboard are reading the screen and the client's HTTP request."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Select

from appliance.catalog import open_catalog
from appliance.jobs.records import list_jobs
from tests.conftest import fix_site_secret
from tests.tui.conftest import (
    SIZE,
    finished_job,
    log_in,
    make_app,
    pilot_test,
    press_until_focused,
    shows,
    table_rows,
    text_of,
    type_text,
    wait_for_dialog,
    wait_for_text,
    wait_until,
)
from tui.dialogs import ConfirmDialog, FormDialog, SecretShownOnce
from tui.screens.data import DataScreen
from tui.screens.import_wizard import ImportScreen
from tui.screens.models import ModelsScreen
from tui.screens.serve import ServeScreen
from tui.screens.train import TrainScreen

TINY = {"rank": "4", "max_steps": "4", "batch_size": "2", "max_length": "64", "eval_every": "2"}
"""Typed into the recipe form, in its order."""


@pytest.mark.slow
@pilot_test
async def test_unlock_import_train_quantize_export_promote_serve_query(vault_init, qa_source: Path, stop_jobs):
    import httpx

    vault_init()
    app = make_app(mount_root=qa_source.parent, poll_interval=0.5)  # 2 cores: the UI polls beside four jobs
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, typed=True)
        await wait_until(pilot, lambda: app.session is not None, "the session")
        fix_site_secret()  # before the import: the same split, and so the same losses, on every run

        # Import: the wizard's path field (past the tree and the preview), Enter previews, ctrl+s imports.
        await pilot.press("2")
        await wait_until(pilot, lambda: isinstance(app.screen, DataScreen), "the data screen")
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, ImportScreen), "the import wizard")
        await press_until_focused(pilot, "path")
        await type_text(pilot, str(qa_source))
        await pilot.press("enter")
        await wait_until(pilot, lambda: "contents hidden" in text_of(app, "#preview"), "the preview")
        await pilot.press("ctrl+s")
        await finished_job(pilot, "import", "dataset qa-export version 1", timeout=120)
        await pilot.press("escape", "escape")

        # Train: the dataset and base model are preselected; a tiny recipe typed field by field.
        await pilot.press("3")
        await wait_until(pilot, lambda: isinstance(app.screen, TrainScreen)
                         and app.screen.query_one("#dataset", Select).value == "qa-export", "the train form")
        assert app.screen.query_one("#base", Select).value == "tiny-deepseek-r1"
        for name, value in TINY.items():
            await press_until_focused(pilot, f"recipe-{name}")
            await type_text(pilot, value)
        await wait_until(pilot, lambda: text_of(app, "#recipe-check") == "recipe valid", "the recipe checked",
                         seen=lambda: text_of(app, "#recipe-check"))
        await pilot.press("ctrl+s")
        # The outcome line needs the run's validation loss: the fixed site secret gives a non-empty val split.
        await finished_job(pilot, "training", "(succeeded)", "weights encrypted in the vault")
        await pilot.press("escape", "escape")  # back to the form, out of its last field

        # Register the run to a task (its dataset's name is offered), from the runs table (Tab).
        await pilot.press("4")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen)
                         and table_rows(app, "#unregistered")[0][0].startswith("lm-"), "the unregistered run")
        await press_until_focused(pilot, "unregistered")
        await pilot.press("g")
        await wait_for_dialog(pilot, FormDialog, "the register dialog")
        await pilot.press("enter")
        await wait_until(pilot, lambda: table_rows(app, "#versions")[0][:2] == ["qa-export-v1", "candidate"],
                         "the candidate version")

        # Quantize (PTQ, then QAT) and export ONNX fp32 + int8, each checked against PyTorch.
        await press_until_focused(pilot, "versions", "shift+tab")
        await pilot.press("o")
        await wait_for_dialog(pilot, FormDialog, "the quantize dialog")
        assert app.screen.values()["qat"] == "yes"
        await pilot.press("ctrl+u")
        await type_text(pilot, "fp32,int8")
        await pilot.press("enter")
        await finished_job(pilot, "quantize", "exports fp32, int8 stored (parity with PyTorch checked)",
                           "serves on ORT")
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen)
                         and table_rows(app, "#versions")[0][3].startswith("ORT"), "the quantized version")

        # Promote, with a reason.
        await pilot.press("p")
        await wait_for_dialog(pilot, FormDialog, "the promote dialog")
        await type_text(pilot, "acceptance run")
        await pilot.press("enter")
        await wait_until(pilot, lambda: table_rows(app, "#versions")[0][1] == "PRODUCTION", "the promoted version")

        # Serve: the UI's monitoring key, a client's key (shown once), the server on a free port.
        await pilot.press("5")
        await wait_until(pilot, lambda: isinstance(app.screen, ServeScreen) and app.screen.view is not None,
                         "the serve screen")
        serve = app.screen
        await pilot.press("m")
        await wait_until(pilot, lambda: any(r[0] == "airlock-monitor" for r in table_rows(app, "#keys")),
                         "the monitoring key")
        await pilot.press("n")
        await wait_for_dialog(pilot, FormDialog, "the new key dialog")
        await type_text(pilot, "ward-client")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, SecretShownOnce) and shows(app, "#secret", "airlock_"),
                         "the key, shown once")
        secret = text_of(app, "#secret")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ServeScreen), "the serve screen again")
        await pilot.press("s")
        await wait_for_dialog(pilot, FormDialog, "the start dialog")
        assert app.screen.values()["what"] == "task:qa-export"
        await pilot.press("tab", "ctrl+u", "0", "enter")  # address as offered (127.0.0.1), port: any free one
        await wait_until(pilot, lambda: serve.view.server is not None and serve.view.server.url is not None,
                         "the listening server", 120)
        url = serve.view.server.url
        await wait_for_text(pilot, "#server-models", "qa-export v1 on ORT")

        # The query: an OpenAI-style chat completion from a client.
        response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                              json={"model": "qa-export", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "How do I reset the pump?"}]},
                              timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["X-Airlock-Model"] == "qa-export@v1"
        assert response.headers["X-Airlock-Backend"].startswith("ort")
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
        await wait_for_text(pilot, "#server-traffic", "Since start: 1 requests")

        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the stop confirmation")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not serve.view.server.running, "the stopped server", 90)

    db = open_catalog()
    assert not [j for state in ("queued", "running") for j in list_jobs(db, state=state)]  # nothing left running
    db.close()
