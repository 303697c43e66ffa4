"""Log in: account name and passphrase open the account's key slot and start the key agent.

Shown at start-up (unless a session is already running for this vault: `AirlockApp.start_up`
decides), after `ctrl+l`, and when the agent locks itself after its idle timeout: the screen
underneath keeps its state. A wrong
passphrase, a locked-out or disabled account are shown here with the appliance's message and
hint. The passphrase leaves the input as soon as it is submitted; the unlock itself is the app's worker
(`AirlockApp.unlock`), which closes this dialog when it succeeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Static

if TYPE_CHECKING:
    from tui.app import AirlockApp

NO_VAULT = ("There is no vault under this AIRLOCK_HOME yet.\n"
            "hint: an admin creates it with `airlock vault init --admin NAME` (it prints the recovery key once), "
            "then everyone logs in here.")


class LoginScreen(ModalScreen[None]):
    HELP = """
Log in with **your own** account: the audit log names you for everything you do, including the
jobs you start. Five wrong passphrases lock the account for a while (1 min, doubling); an admin
can reset a forgotten passphrase (`airlock users passwd NAME`).

The vault locks itself after a while without use; this dialog then comes back and the screen
underneath keeps its state.
"""
    BINDINGS: ClassVar[list] = [Binding("ctrl+q", "app.quit", "Quit", priority=True)]

    def __init__(self, reason: str = "", *, initialized: bool = True, default_account: str = "") -> None:
        super().__init__(classes="dialog-screen", id="login")
        self.reason = reason
        self.initialized = initialized
        self.default_account = default_account
        self._dismissing = False

    @property
    def airlock(self) -> AirlockApp:
        return cast("AirlockApp", self.app)

    def compose(self) -> ComposeResult:
        usable = self.initialized
        with Vertical(classes="dialog login-dialog"):
            yield Static("Airlock · log in", classes="dialog-title")
            yield Static(self.reason or ("Log in with your account to use the appliance." if usable else NO_VAULT),
                         id="login-intro")
            with Horizontal(classes="field"):
                yield Label("Account", classes="field-label")
                yield Input(self.default_account, id="account", compact=True, disabled=not usable)
            with Horizontal(classes="field"):
                yield Label("Passphrase", classes="field-label")
                yield Input(id="passphrase", password=True, compact=True, disabled=not usable)
            yield Static("", id="login-error")
            yield Button("Unlock", id="unlock", compact=True, disabled=not usable)
        yield Footer()

    def on_mount(self) -> None:
        if self.initialized:
            self.query_one("#passphrase" if self.default_account else "#account", Input).focus()

    def close(self) -> None:
        """Dismiss once: the app's session poll may also see the new session and close this."""
        if not self._dismissing:
            self._dismissing = True
            self.dismiss()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "account":
            self.query_one("#passphrase", Input).focus()
        else:
            self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.submit()

    def submit(self) -> None:
        account = self.query_one("#account", Input)
        passphrase = self.query_one("#passphrase", Input)
        text = passphrase.value
        passphrase.value = ""  # gone from the widget before the slow key derivation starts
        if not account.value.strip():
            self.show_error("type your account name", "ask an admin if you do not have one (`airlock users list`)")
            account.focus()
            return
        if not text:
            self.show_error("type your passphrase", "")
            return
        self.query_one("#login-error", Static).update("unlocking… (the key derivation takes about a second)")
        for widget in (account, passphrase, self.query_one("#unlock", Button)):
            widget.disabled = True
        self.airlock.unlock(account.value.strip(), text)

    def show_failure(self, message: str, hint: str) -> None:
        """A wrong passphrase, a locked-out or unknown account: the appliance's message and hint, here."""
        for widget in (self.query_one("#account", Input), self.query_one("#unlock", Button)):
            widget.disabled = False
        passphrase = self.query_one("#passphrase", Input)
        passphrase.disabled = False
        passphrase.focus()
        self.show_error(message, hint)

    def show_error(self, message: str, hint: str) -> None:
        self.query_one("#login-error", Static).update(message + (f"\nhint: {hint}" if hint else ""))
