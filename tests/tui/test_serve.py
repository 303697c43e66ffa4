"""The Serve screen against a real appliance home: the monitoring key, an API key shown once (and only its
hash stored), the server started as a real `serve` job on a free port, a real HTTP request whose count and
latency come back through /metrics, revoking the key, and stopping the server."""

from __future__ import annotations

from textual.widgets import Input

from appliance.catalog import open_catalog
from appliance.jobs.records import get_job
from tests.tui.conftest import (
    SIZE,
    make_app,
    pilot_test,
    table_rows,
    text_of,
    type_text,
    wait_for_dialog,
    wait_for_text,
    wait_until,
)
from tui.dialogs import ConfirmByTyping, ConfirmDialog, FormDialog, SecretShownOnce
from tui.screens.serve import ServeScreen


def chat(url: str, secret: str, model: str) -> tuple[int, dict]:
    """One OpenAI-style chat completion over HTTP, as a client on the site's network sends it."""
    import httpx

    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=120,
                          json={"model": model, "max_tokens": 4,
                                "messages": [{"role": "user", "content": "How do I reset the pump?"}]})
    return response.status_code, response.json()


async def create_key(pilot, name: str) -> str:
    """n, type the name, Enter; the dialog shows the key once: read it there and close it."""
    app = pilot.app
    await pilot.press("n")
    await wait_for_dialog(pilot, FormDialog, "the new key dialog")
    await type_text(pilot, name)
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, SecretShownOnce), "the key, shown once")
    secret = app.screen.secret
    assert secret.startswith("airlock_") and text_of(app, "#secret") == secret
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, ServeScreen), "the serve screen again")
    return secret


@pilot_test
async def test_keys_start_server_live_metrics_revoke_and_stop(production_task: str):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None, "the session")
        await pilot.press("5")
        await wait_until(pilot, lambda: isinstance(app.screen, ServeScreen) and app.screen.view is not None,
                         "the serve screen")
        serve = app.screen
        await wait_for_text(pilot, "#server-state", "STOPPED (never started here)")
        assert app.screen.check_action("stop_server", ()) is None  # greyed out: nothing runs

        await pilot.press("m")  # the UI's monitoring key (admin, once)
        await wait_until(pilot, lambda: any(row[0] == "airlock-monitor" for row in table_rows(app, "#keys")),
                         "the monitoring key")
        secret = await create_key(pilot, "pacs-bridge")
        await wait_until(pilot, lambda: any(row[0] == "pacs-bridge" for row in table_rows(app, "#keys")),
                         "the new key in the list")
        assert not any(secret in " ".join(row) for row in table_rows(app, "#keys"))
        db = open_catalog()
        stored = db.execute("SELECT key_hash FROM api_keys WHERE name = 'pacs-bridge'").fetchone()[0]
        assert secret not in stored and len(stored) == 64  # the SHA-256, never the key
        db.close()

        # Start: the task's production model, on any free loopback port.
        await pilot.press("s")
        await wait_for_dialog(pilot, FormDialog, "the start dialog")
        assert app.screen.values() == {"what": "task:qa", "host": "127.0.0.1", "port": "8080"}
        port = app.screen.query_one("#form-port", Input)
        await pilot.press("tab")
        await wait_until(pilot, lambda: app.focused is port, "the port field")
        await pilot.press("ctrl+u", "0", "enter")
        await wait_until(pilot, lambda: serve.view.server is not None and serve.view.server.url is not None,
                         "the listening server", 120)
        url = serve.view.server.url
        await wait_for_text(pilot, "#server-state", f"RUNNING · {url}")
        await wait_for_text(pilot, "#server-models", "qa v1 on PyTorch")

        status, answer = chat(url, secret, "qa")
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
        await wait_for_text(pilot, "#server-traffic", "Since start: 1 requests, 0 errors", "req/s")

        # Revoke (typed confirmation): the running server refuses the key from the next request on.
        keys = serve.query_one("#keys")
        keys.focus()
        row = next(i for i, r in enumerate(table_rows(app, "#keys")) if r[0] == "pacs-bridge")
        keys.move_cursor(row=row)
        await pilot.press("d")
        await wait_for_dialog(pilot, ConfirmByTyping, "the revoke confirmation")
        await type_text(pilot, "pacs-bridge")
        await pilot.press("enter")
        await wait_until(pilot, lambda: any(r[0] == "pacs-bridge" and r[2] == "revoked"
                                            for r in table_rows(app, "#keys")), "the revoked key")
        status, answer = chat(url, secret, "qa")
        assert status == 401 and answer["error"]["code"] == "revoked_api_key"

        # Stop: confirmed, graceful; the job ends cancelled.
        job_id = serve.view.server.job.id
        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the stop confirmation")
        await pilot.press("enter")
        await wait_until(pilot, lambda: serve.view.server is not None and not serve.view.server.running,
                         "the stopped server", 90)
        await wait_for_text(pilot, "#server-state", "STOPPED · last ran")

    db = open_catalog()
    assert get_job(db, job_id).state == "cancelled"
    db.close()


@pilot_test
async def test_an_operator_may_not_create_api_keys_the_appliance_says_so(vault_init, unlock, passphrase_file,
                                                                          tmp_path):
    """Roles are the appliance's: the UI offers the key, `require` refuses it, the refusal is a dialog (audited)."""
    from appliance.audit import iter_audit
    from tests.conftest import run_cli
    from tui.dialogs import ErrorDialog

    vault_init()
    unlock()
    secret_file = tmp_path / "olga"
    secret_file.write_text("olga's own long passphrase\n")
    added = run_cli("users", "add", "olga", "--role", "operator", "--passphrase-file", str(secret_file),
                    "--admin-passphrase-file", str(passphrase_file))
    assert added.returncode == 0, added.stderr
    unlock("--user", "olga", "--passphrase-file", str(secret_file))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None and app.session.account == "olga", "olga's session")
        await pilot.press("5")
        await wait_until(pilot, lambda: isinstance(app.screen, ServeScreen) and app.screen.view is not None,
                         "the serve screen")
        await create_key_refused(pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert app.screen.message == "managing API keys needs the admin role; olga is operator"
        assert "ask an admin" in app.screen.hint
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ServeScreen)
                         and table_rows(app, "#keys")[0][0].startswith("no API keys"), "the empty key list",
                         seen=lambda: table_rows(app, "#keys") if app.screen.query("#keys") else app.screen)
    denied = list(iter_audit(open_catalog(), action="access.denied"))
    assert [(e.object, e.details["account"]) for e in denied] == [("keys.manage", "olga")]


async def create_key_refused(pilot) -> None:
    from tui.dialogs import ErrorDialog

    app = pilot.app
    await pilot.press("n")
    await wait_for_dialog(pilot, FormDialog, "the new key dialog")
    await type_text(pilot, "pacs-bridge")
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, ErrorDialog), "the refusal")
