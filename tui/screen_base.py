"""What every Airlock screen shares: the nav bar, F1 help text, worker errors, and polling.

Polling: a screen with a `POLL_GROUP` implements `poll()` as a thread worker in that group. The
next poll is scheduled only when the previous one finished (success or error), and only while
the screen is the one on top, so a slow catalog never piles up threads and hidden screens rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from textual.screen import Screen
from textual.timer import Timer
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from tui.app import AirlockApp

FINISHED = (WorkerState.SUCCESS, WorkerState.ERROR)


class AirlockScreen(Screen):
    MODE: ClassVar[str] = ""
    """The navigation entry this screen belongs to (highlighted in the nav bar)."""
    HELP: ClassVar[str] = ""
    """Markdown shown by F1, above the screen's keys."""
    POLL_GROUP: ClassVar[str] = ""

    _poll_timer: Timer | None = None

    @property
    def airlock(self) -> AirlockApp:
        return cast("AirlockApp", self.app)

    def poll(self) -> Worker | None:
        """Start one refresh (a thread worker in POLL_GROUP). Screens that poll override this."""
        return None

    def keep_polling(self) -> bool:
        return True

    def poll_now(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.stop()
            self._poll_timer = None
        self.poll()

    def on_screen_resume(self) -> None:
        if self.POLL_GROUP:
            self.poll_now()

    def on_screen_suspend(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.stop()
            self._poll_timer = None

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.airlock.report_worker_error(event)
        if (self.POLL_GROUP and event.worker.group == self.POLL_GROUP and event.state in FINISHED
                and self.keep_polling()):
            self._poll_timer = self.set_timer(self.airlock.poll_interval, self._poll_if_on_top)

    def _poll_if_on_top(self) -> None:
        self._poll_timer = None
        if self.is_current and self.keep_polling():
            self.poll()
