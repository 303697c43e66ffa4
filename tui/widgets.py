"""Small widgets shared by the screens: the navigation bar and a running job's progress row."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Label, ProgressBar, Static

from tui.formatting import countdown, progress_fraction, progress_text

if TYPE_CHECKING:
    from tui.messages import RunningJob

NAV: tuple[tuple[str, str, str], ...] = (
    ("home", "1", "Home"), ("data", "2", "Data"), ("train", "3", "Train"), ("models", "4", "Models"),
    ("serve", "5", "Serve"), ("schedule", "6", "Schedule"), ("audit", "7", "Audit"),
)


class NavBar(Horizontal):
    """Top line: the screens with their keys (the current one reversed, readable without colour),
    and who is logged in with the time left before the vault locks itself."""

    DEFAULT_CSS = """
    NavBar { height: 1; dock: top; background: $panel; }
    NavBar #nav { width: 1fr; }
    NavBar #who { width: auto; padding: 0 1; }
    """

    def __init__(self, current: str = "") -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        current = self.current or self.app.current_mode  # a job screen belongs to the mode it was opened in
        text = Text(" ")
        for mode, key, title in NAV:
            style = "reverse bold" if mode == current else ""
            text.append(f"{key} {title}", style=style)
            text.append("  ")
        yield Static(text, id="nav")
        yield Static("", id="who", classes="volatile")

    def on_mount(self) -> None:
        self.watch(self.app, "session", self._show_session)

    def _show_session(self, status) -> None:
        who = self.query_one("#who", Static)
        if status is None:
            who.update("locked")
        else:
            who.update(f"{status.account[:12]} {countdown(status.seconds_left)}")


class JobRow(Vertical, can_focus=True):
    """One running job on the dashboard: id and a progress bar, then its latest progress. Enter opens it."""

    BINDINGS: ClassVar[list] = [Binding("enter", "open", "Open job")]

    DEFAULT_CSS = """
    JobRow { height: auto; }
    JobRow:focus { background: $accent 30%; text-style: reverse; }
    JobRow Horizontal { height: 1; }
    JobRow .job-id { width: 31; }
    JobRow .job-progress { width: 1fr; padding-left: 2; }
    """

    class Open(Message):
        def __init__(self, job_id: str) -> None:
            super().__init__()
            self.job_id = job_id

    def __init__(self, item: RunningJob) -> None:
        super().__init__(id=f"job-{item.job.id}")
        self.job_id = item.job.id
        self._item = item
        self._mounted = False

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label(self.job_id[:30], classes="job-id")
            yield ProgressBar(show_eta=False)
        yield Label("", classes="job-progress")

    def on_mount(self) -> None:
        self._mounted = True
        self.show(self._item)

    def show(self, item: RunningJob) -> None:
        self._item = item
        if not self._mounted:  # the next poll can arrive before this row has composed: on_mount shows it
            return
        bar = self.query_one(ProgressBar)
        line = self.query_one(".job-progress", Label)
        event = item.progress
        fraction = progress_fraction(event.data) if event else None
        if fraction:
            bar.update(total=fraction[1], progress=fraction[0])
        else:
            bar.update(total=None)
        text = progress_text(event.message, event.data) if event else ""
        line.update(f"{item.job.state} · {text}" if text else item.job.state)

    def action_open(self) -> None:
        self.post_message(self.Open(self.job_id))
