"""The Airlock operator UI: `airlock` (in a terminal) or `airlock tui`.

Seven screens, one per nav key (1-7), each a Textual mode with its own screen stack, so moving
between them keeps what each shows. Everything the screens know comes from appliance functions
called in thread workers; results come back as typed messages (`tui.messages`), and any worker
error becomes one dialog with the appliance's message and hint (`report_worker_error`).

The key agent's status is polled once a second: the nav bar counts down to the auto-lock, and
when the agent has locked, the login dialog comes back over whatever screen was showing.
No PHI on screenshots: text selection and the palette's screenshot command are off.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from tui.connection import catalog
from tui.dialogs import ErrorDialog, HelpDialog
from tui.formatting import duration
from tui.messages import LoginChecked, SessionChecked, Unlocked, UnlockFailed
from tui.screens.audit import AuditScreen
from tui.screens.data import DataScreen
from tui.screens.home import HomeScreen
from tui.screens.login import LoginScreen
from tui.screens.models import ModelsScreen
from tui.screens.schedule import ScheduleScreen
from tui.screens.serve import ServeScreen
from tui.screens.train import TrainScreen
from tui.stylesheet import STYLESHEET
from tui.widgets import NAV

if TYPE_CHECKING:
    from appliance.vault.agent import AgentStatus

DEFAULT_IDLE_TIMEOUT_S = 15 * 60
LOCKED_AGAIN = ("The vault is locked (it locks itself after {idle} without use; ctrl+l or `airlock vault lock` "
                "lock it at once). Log in again: your screens are as you left them.")


def default_mount_root() -> Path:
    """Where the import wizard starts browsing: /media (USB sticks) when it exists, else the home directory."""
    media = Path("/media")
    return media if media.is_dir() else Path.home()


class AirlockApp(App[None]):
    TITLE = "Airlock"
    CSS = STYLESHEET
    ALLOW_SELECT = False  # nothing on screen is copied out with the mouse: it may be patient data
    MODES: ClassVar[dict] = {"home": HomeScreen, "data": DataScreen, "train": TrainScreen, "models": ModelsScreen,
                             "serve": ServeScreen, "schedule": ScheduleScreen, "audit": AuditScreen}
    DEFAULT_MODE = "home"
    BINDINGS: ClassVar[list] = [
        Binding("f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+l", "lock", "Lock vault", show=False),
        # Digits typed into a field are text: Escape leaves the field, then 1-7 switch screens again.
        Binding("escape", "leave_field", "Leave field", show=False),
        *(Binding(key, f"go('{mode}')", title, show=False) for mode, key, title in NAV),
    ]

    session: reactive[AgentStatus | None] = reactive(None, always_update=True)
    """The logged-in session (the key agent's status), None while locked."""

    def __init__(self, *, poll_interval: float = 1.0, idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
                 mount_root: Path | None = None, wide_chart_columns: int = 100, debug: bool = False) -> None:
        from appliance.paths import airlock_home

        super().__init__()
        self.home = airlock_home()
        self.poll_interval = poll_interval
        self.idle_timeout_s = idle_timeout_s
        self.mount_root = mount_root or default_mount_root()
        self.wide_chart_columns = wide_chart_columns
        self.show_tracebacks = debug
        self._had_session = False
        self._session_generation = 0
        self._last_account = ""

    # --- session -------------------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.start_up()

    @work(thread=True, exclusive=True, exit_on_error=False, group="startup")
    def start_up(self) -> None:
        """Is there a vault, whose account is it likely to be, and is someone logged in already?"""
        from appliance.errors import AirlockError
        from appliance.vault import accounts, records
        from appliance.vault.agent import agent_status
        from appliance.vault.errors import VaultError

        with catalog(self.home) as db:  # the first open creates AIRLOCK_HOME and migrates the catalog
            initialized = records.vault_id(db) is not None
            default = ""
            if initialized:
                try:
                    default = accounts.resolve_name(db, None)
                except AirlockError:
                    default = ""  # several accounts: the person types theirs
        try:
            status = agent_status(self.home) if initialized else None
        except VaultError:
            status = None
        self.post_message(LoginChecked(initialized, default, status))

    def on_login_checked(self, message: LoginChecked) -> None:
        if message.status is not None and message.status.account:
            self.logged_in(message.status)  # re-attach to the running session
        else:
            self.push_screen(LoginScreen(initialized=message.initialized, default_account=message.default_account))
        self.check_session()

    @work(thread=True, exclusive=True, exit_on_error=False, group="session-poll")
    def check_session(self) -> None:
        from appliance.vault.agent import agent_status
        from appliance.vault.errors import VaultError

        generation = self._session_generation
        try:
            status = agent_status(self.home)
        except VaultError:  # an agent that does not answer cannot unwrap keys either: locked
            status = None
        self.post_message(SessionChecked(status if status is not None and status.account else None, generation))

    def on_session_checked(self, message: SessionChecked) -> None:
        if message.generation != self._session_generation:
            return  # started before a login or lock: it describes the old session
        self.session = message.status
        login = self.login_screen()
        if message.status is None and self._had_session and login is None:
            self._had_session = False
            self.push_screen(LoginScreen(LOCKED_AGAIN.format(idle=duration(self.idle_timeout_s)),
                                         default_account=self._last_account))
        elif message.status is not None:
            self._had_session = True
            if login is not None:  # unlocked from another terminal: same uid, same agent
                login.close()

    # description: the default one repeats the arguments, and one of them is the passphrase
    @work(thread=True, exclusive=True, exit_on_error=False, group="unlock", description="unlock")
    def unlock(self, account: str, passphrase: str) -> None:
        from appliance.errors import AirlockError
        from appliance.vault.lifecycle import Credential, unlock_vault

        try:
            with catalog(self.home) as db:
                status = unlock_vault(db, self.home, Credential.passphrase(passphrase), self.idle_timeout_s,
                                      account=account)
        except AirlockError as exc:  # expected feedback (wrong passphrase, lockout): shown in the dialog
            self.post_message(UnlockFailed(exc.message, exc.hint))
            return
        self.post_message(Unlocked(status))

    def on_unlocked(self, message: Unlocked) -> None:
        self.logged_in(message.status)
        login = self.login_screen()
        if login is not None:
            login.close()

    def on_unlock_failed(self, message: UnlockFailed) -> None:
        login = self.login_screen()
        if login is not None:
            login.show_failure(message.message, message.hint)

    def watch_session(self, old: AgentStatus | None, new: AgentStatus | None) -> None:
        if (old is None) != (new is None):
            self.refresh_bindings()  # navigation, lock and the palette are off while locked (check_action)

    def logged_in(self, status: AgentStatus) -> None:
        self._session_generation += 1
        self._last_account = status.account
        self.session = status
        self._had_session = True
        if status.session == "emergency":
            self.notify("Emergency (break-glass) session: flagged in the audit log until an admin acknowledges it",
                        severity="warning", timeout=10)

    def login_screen(self) -> LoginScreen | None:
        return next((s for s in self.screen_stack if isinstance(s, LoginScreen)), None)

    @property
    def locked(self) -> bool:
        return self.session is None

    # --- workers and errors --------------------------------------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.report_worker_error(event)
        if event.worker.group == "unlock" and event.state == WorkerState.ERROR:
            self.on_unlock_failed(UnlockFailed("the vault did not unlock", "see the error shown before"))
        if event.worker.group == "session-poll" and event.state in (WorkerState.SUCCESS, WorkerState.ERROR):
            self.set_timer(self.poll_interval, self.check_session)

    def report_worker_error(self, event: Worker.StateChanged) -> None:
        """The one place a worker's exception becomes something an operator sees: a dialog."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.show_error(event.worker.error)

    def show_error(self, error: BaseException) -> None:
        from appliance.errors import AirlockError

        if isinstance(error, AirlockError):
            message, hint = error.message, error.hint
        else:
            message, hint = internal_error(error)
        top = self.screen
        if isinstance(top, ErrorDialog) and top.message == message:
            return  # a poll failing again: one dialog is enough
        self.push_screen(ErrorDialog(message, hint))

    def _fatal_error(self) -> None:
        # Textual's default prints a traceback with local variables, which may hold a passphrase or
        # record text. Operators get the one line `airlock` prints for any internal error.
        if self.show_tracebacks:
            super()._fatal_error()
            return
        message, hint = internal_error(self._exception)
        self.bell()
        self.panic(f"error: {message}\nhint: {hint}")

    # --- actions -------------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("go", "lock", "command_palette") and self.locked:
            return False
        return True

    def action_go(self, mode: str) -> None:
        if self.locked:
            self.bell()
            return
        if self.current_mode != mode:
            self.switch_mode(mode)

    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpDialog):
            return
        text = getattr(screen, "HELP", "") or "Keys of this screen:"
        title = screen.__class__.__name__.removesuffix("Screen").removesuffix("Dialog")
        keys = []
        for active in screen.active_bindings.values():
            binding = active.binding
            # The screen's own keys (not the focused table's cursor keys), and not F1 itself.
            if active.node is screen and binding.description and active.enabled:
                keys.append((self.get_key_display(binding), binding.description))
        keys += [(key, f"go to {title}") for _, key, title in NAV]
        keys += [("escape", "leave a text field (then 1-7 switch screens)"), ("ctrl+p", "command palette"),
                 ("ctrl+l", "lock the vault"),
                 ("q / ctrl+q", "quit (jobs keep running)")]
        self.push_screen(HelpDialog(title, text, keys))

    def action_leave_field(self) -> None:
        from textual.widgets import Input

        if isinstance(self.focused, Input) and not self.screen.is_modal:
            self.screen.set_focus(None)

    def action_lock(self) -> None:
        self.lock_vault()

    @work(thread=True, exclusive=True, exit_on_error=False, group="lock")
    def lock_vault(self) -> None:
        from appliance.vault.lifecycle import lock_vault

        with catalog(self.home) as db:
            lock_vault(db, self.home)
        self.call_from_thread(self.locked_now)

    def locked_now(self) -> None:
        self._session_generation += 1
        self.post_message(SessionChecked(None, self._session_generation))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        if not self.locked:
            for mode, key, title in NAV:
                yield SystemCommand(f"Go to {title}", f"open the {title} screen (key {key})",
                                    lambda mode=mode: self.action_go(mode))
            yield from getattr(screen, "palette_commands", lambda: [])()
            yield SystemCommand("Lock vault", "wipe the key now; log in again to continue", self.action_lock)
        yield SystemCommand("Help", "what this screen does, and its keys (F1)", self.action_help)
        for command in super().get_system_commands(screen):
            if command.title != "Screenshot":  # a screenshot file could carry patient data off the machine
                yield command


def internal_error(error: BaseException | None) -> tuple[str, str]:
    """Type and place of an unexpected exception, never its message (it may hold data)."""
    if error is None:
        return "internal error", "report it with what you did last"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return (f"internal error ({type(error).__name__}{where})",
            "report it with what you did last; `airlock --debug tui` shows the traceback (check it for patient data)")


def run(*, mount_root: Path | None = None, debug: bool = False) -> None:
    AirlockApp(mount_root=mount_root, debug=debug).run()
