"""Logging in (right and wrong passphrase), the dashboard, and the auto-lock that keeps screen state."""

from __future__ import annotations

from textual.widgets import Input

from appliance.audit import iter_audit
from appliance.catalog import open_catalog
from tests.tui.conftest import SIZE, log_in, make_app, pilot_test, text_of, wait_until
from tui.screens.login import LoginScreen


@pilot_test
async def test_wrong_passphrase_is_refused_in_the_dialog_then_the_right_one_opens_home(vault_init):
    vault_init()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, "not the passphrase", typed=True)
        await wait_until(pilot, lambda: "not correct" in text_of(app, "#login-error"), "the refusal")
        error = text_of(app, "#login-error")
        assert "the vault did not unlock: that passphrase is not correct" in error and "hint:" in error
        assert isinstance(app.screen, LoginScreen) and app.session is None
        assert app.screen.query_one("#passphrase", Input).value == ""  # not kept in the widget

        await log_in(pilot)
        await wait_until(pilot, lambda: app.session is not None and not isinstance(app.screen, LoginScreen),
                         "the dashboard")
        assert app.session.account == "admin" and app.session.role == "admin"
        await wait_until(pilot, lambda: "dataset" in text_of(app, "#data-summary"), "the dashboard's data")
        assert text_of(app, "#vault-state") == "unlocked: admin (admin role)"
        assert "without key use" in text_of(app, "#vault-countdown")
        assert text_of(app, "#data-summary") == "0 datasets · 0 training runs"
        assert "chain never verified" in text_of(app, "#audit-summary")
        assert "free under" in text_of(app, "#machine-disk")

    actions = [e.action for e in iter_audit(open_catalog())]
    assert actions.index("vault.unlock_failed") < actions.index("vault.unlock")


@pilot_test
async def test_break_glass_session_is_flagged_on_the_dashboard(vault_init, unlock, tmp_path):
    recovery = tmp_path / "recovery.txt"
    recovery.write_text(vault_init() + "\n")
    unlock("--recovery-key-file", str(recovery))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "emergency" in text_of(app, "#emergency-banner"), "the emergency banner")
        assert "not acknowledged" in text_of(app, "#emergency-banner")
        assert "airlock users emergencies" in text_of(app, "#emergency-banner")
        # The banner comes from the catalog, the session line from the key agent: two polls, either first.
        await wait_until(pilot, lambda: "EMERGENCY" in text_of(app, "#vault-state"), "the session line")
        assert "break-glass" in text_of(app, "#vault-state")


@pilot_test
async def test_no_vault_says_how_to_create_one():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LoginScreen), "the login dialog")
        assert "There is no vault" in text_of(app, "#login-intro")
        assert "airlock vault init --admin NAME" in text_of(app, "#login-intro")
        assert app.screen.query_one("#passphrase", Input).disabled


@pilot_test
async def test_a_running_session_skips_the_login_and_the_dashboard_shows_machine_and_no_color(unlocked,
                                                                                          monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.session is not None and not isinstance(app.screen, LoginScreen),
                         "the re-attached session")
        assert app.no_color
        await wait_until(pilot, lambda: "checking" not in text_of(app, "#machine-gpu"), "the GPU check", 60)
        gpu = text_of(app, "#machine-gpu")
        assert "CPU only" in gpu or "GPU" in gpu
        assert "admin" in text_of(app, "#who")
        await pilot.press("f1")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "HelpDialog", "the help")
        await pilot.press("escape")
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, LoginScreen), "the login after ctrl+l")
        assert app.session is None


@pilot_test
async def test_auto_lock_brings_back_the_login_and_keeps_the_screen(vault_init):
    vault_init()
    app = make_app(idle_timeout_s=3)
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot)
        await wait_until(pilot, lambda: app.session is not None and not isinstance(app.screen, LoginScreen),
                         "the dashboard")
        await pilot.press("7")
        await wait_until(pilot, lambda: app.current_mode == "audit", "the audit screen")
        audit_screen = app.screen
        await pilot.press("slash", "v", "a", "u", "l", "t")
        await wait_until(pilot, lambda: isinstance(app.screen, LoginScreen), "the auto-lock", 15)
        assert "The vault is locked" in text_of(app, "#login-intro")
        assert app.check_action("go", ("home",)) is False  # no way around the login while locked
        app.action_go("home")
        assert app.current_mode == "audit"
        await log_in(pilot)
        await wait_until(pilot, lambda: app.screen is audit_screen, "the audit screen again")
        assert audit_screen.query_one("#audit-filter", Input).value == "vault"
