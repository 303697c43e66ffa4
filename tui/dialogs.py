"""Modal dialogs: an appliance error (message + hint), a typed confirmation, and per-screen help."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Markdown, Static


class ErrorDialog(ModalScreen[None]):
    """What went wrong and what to do next; never a traceback."""

    BINDINGS: ClassVar[list] = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.message = message
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error-dialog"):
            yield Static("Error", classes="dialog-title")
            yield Static(self.message, id="error-message")
            if self.hint:
                yield Static(f"hint: {self.hint}", id="error-hint")
            yield Button("OK", id="ok", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss()


class ConfirmByTyping(ModalScreen[bool]):
    """A destructive action goes ahead only when the operator types the object's name exactly."""

    BINDINGS: ClassVar[list] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, expected: str) -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.expected = expected

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm-dialog"):
            yield Static("Confirm", classes="dialog-title")
            yield Static(self.question)
            yield Label(f"Type {self.expected} and press Enter:")
            yield Input(id="typed", compact=True)
            yield Static("", id="confirm-feedback")
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.value == self.expected:
            self.dismiss(True)
        else:
            self.query_one("#confirm-feedback", Static).update("the name did not match; nothing was changed")

    def action_cancel(self) -> None:
        self.dismiss(False)


class HelpDialog(ModalScreen[None]):
    """F1: what this screen is for, and its keys."""

    BINDINGS: ClassVar[list] = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, title: str, text: str, keys: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.text = text
        self.keys = keys

    def compose(self) -> ComposeResult:
        keys = "\n".join(f"| `{key}` | {description} |" for key, description in self.keys)
        body = f"{self.text.strip()}\n\n| key | does |\n|---|---|\n{keys}\n"
        with Vertical(classes="dialog help-dialog"):
            yield Static(f"Help: {self.title_text}", classes="dialog-title")
            with VerticalScroll():
                yield Markdown(body)
        yield Footer()
