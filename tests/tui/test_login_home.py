"""Logging in (right and wrong passphrase), the dashboard, and the auto-lock that keeps screen state."""

from __future__ import annotations

from textual.widgets import Input

from appliance.audit import iter_audit
from appliance.catalog import open_catalog
from tests.tui.conftest import SIZE, log_in, make_app, pilot_test, text_of, wait_for_text, wait_until
from tui.screens.login import LoginScreen


@pilot_test
async def test_wrong_passphrase_is_refused_in_the_dialog_then_the_right_one_opens_home(vault_init):
    vault_init()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, "not the passphrase", typed=True)
        await wait_for_text(pilot, "#login-error", "the vault did not unlock: that passphrase is not correct", "hint:")
        assert isinstance(app.screen, LoginScreen) and app.session is None
        assert app.screen.query_one("#passphrase", Input).value == ""  # not kept in the widget

        await log_in(pilot)
        await wait_until(pilot, lambda: app.session is not None and not isinstance(app.screen, LoginScreen),
                         "the dashboard")
        assert app.session.account == "admin" and app.session.role == "admin"
        # Each line comes from its own poll (key agent, catalog, disk): wait for each as asserted.
        await wait_until(pilot, lambda: text_of(app, "#vault-state") == "unlocked: admin (admin role)",
                         "the session line", seen=lambda: text_of(app, "#vault-state"))
        await wait_for_text(pilot, "#vault-countdown", "without key use")
        await wait_until(pilot, lambda: text_of(app, "#data-summary") == "0 datasets · 0 training runs",
                         "the dashboard's data", seen=lambda: text_of(app, "#data-summary"))
        await wait_for_text(pilot, "#audit-summary", "chain never verified")
        await wait_for_text(pilot, "#machine-disk", "free under")

    actions = [e.action for e in iter_audit(open_catalog())]
    assert actions.index("vault.unlock_failed") < actions.index("vault.unlock")


@pilot_test
async def test_break_glass_session_is_flagged_on_the_dashboard(vault_init, unlock, tmp_path):
    recovery = tmp_path / "recovery.txt"
    recovery.write_text(vault_init() + "\n")
    unlock("--recovery-key-file", str(recovery))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_text(pilot, "#emergency-banner", "emergency", "not acknowledged", "airlock users emergencies")
        # The banner comes from the catalog, the session line from the key agent: two polls, either first.
        await wait_for_text(pilot, "#vault-state", "EMERGENCY", "break-glass")


@pilot_test
async def test_no_vault_says_how_to_create_one():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LoginScreen), "the login dialog")
        await wait_for_text(pilot, "#login-intro", "There is no vault", "airlock vault init --admin NAME")
        await wait_until(pilot, lambda: app.screen.query("#passphrase") and app.screen.query_one("#passphrase",
                                                                                                   Input).disabled,
                         "the disabled passphrase field")


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
        await wait_for_text(pilot, "#who", "admin")
        await pilot.press("f1")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "HelpDialog", "the help")
        await pilot.press("escape")
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, LoginScreen), "the login after ctrl+l")
        assert app.session is None


class VaultInUse:
    """A thread that uses a key of the vault every 0.1 s, as a running job would, so that the key agent's
    idle timer cannot run out while a test sets up a screen, however slowly a busy machine does it.

    It starts before the login and waits for the agent; once a key request succeeded, a refused one is
    recorded in `lost` (the agent locked although the vault was in use)."""

    def __init__(self, home) -> None:
        import threading

        self.home = home
        self.done = threading.Event()
        self.used = 0
        self.lost: str | None = None
        self.thread = threading.Thread(target=self._use, daemon=True)

    def _use(self) -> None:
        from appliance.errors import AirlockError
        from appliance.vault import records
        from appliance.vault.lifecycle import keys_for

        db = open_catalog(self.home)  # this thread's own connection
        try:
            while not self.done.wait(0.1):
                try:
                    kek = records.active_kek(db)
                    keys_for(db, self.home).new_dek(kek.version, kek.wrapped_kek, "idle-test")
                    self.used += 1
                except AirlockError as exc:
                    if self.used:
                        self.lost = exc.message
                        return
        finally:
            db.close()

    def __enter__(self) -> VaultInUse:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join(30)


@pilot_test
async def test_auto_lock_brings_back_the_login_and_keeps_the_screen(vault_init, airlock_home):
    vault_init()
    app = make_app(idle_timeout_s=3)
    async with app.run_test(size=SIZE) as pilot:
        # The agent locks after 3 s without key use. Setting up the screen (which uses no key) may take longer
        # on a busy machine, so the vault is kept in use until the audit screen holds its filter.
        with VaultInUse(airlock_home) as in_use:
            await log_in(pilot)
            await wait_until(pilot, lambda: app.session is not None and not isinstance(app.screen, LoginScreen),
                             "the dashboard")
            await pilot.press("7")
            await wait_until(pilot, lambda: app.current_mode == "audit", "the audit screen")
            audit_screen = app.screen
            await pilot.press("slash", "v", "a", "u", "l", "t")
            await wait_until(pilot, lambda: audit_screen.query_one("#audit-filter", Input).value == "vault",
                             "the typed filter", seen=lambda: audit_screen.query_one("#audit-filter", Input).value)
        assert in_use.used and in_use.lost is None, f"the vault locked while in use: {in_use.lost}"
        assert app.screen is audit_screen  # not locked yet: nothing uses a key from here on

        await wait_until(pilot, lambda: isinstance(app.screen, LoginScreen), "the auto-lock")
        await wait_for_text(pilot, "#login-intro", "The vault is locked")
        assert app.check_action("go", ("home",)) is False  # no way around the login while locked
        app.action_go("home")
        assert app.current_mode == "audit"
        # The second session must not lock itself before the test has looked at the screen: a long timeout.
        app.idle_timeout_s = 900
        await log_in(pilot)
        await wait_until(pilot, lambda: app.screen is audit_screen, "the audit screen again")
        assert audit_screen.query_one("#audit-filter", Input).value == "vault"
