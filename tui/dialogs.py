"""Modal dialogs: an appliance error (message + hint), confirmations, per-screen help, small forms, and a
secret shown once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Markdown, Select, Static


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


class ConfirmDialog(ModalScreen[bool]):
    """Yes or no for an action that is easy to undo but disturbs others (stopping the server): Enter yes, Escape no."""

    BINDINGS: ClassVar[list] = [Binding("escape,n", "answer(False)", "No"), Binding("enter,y", "answer(True)", "Yes")]

    def __init__(self, title: str, question: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="dialog-title")
            yield Static(self.question, markup=False)
            yield Static("Enter or y: yes · Escape or n: no", classes="dialog-note")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


@dataclass(frozen=True)
class FormField:
    """One line of a FormDialog: a text input, or a choice when `choices` is given ((label, value) pairs)."""

    name: str
    label: str
    default: str = ""
    placeholder: str = ""
    choices: tuple[tuple[str, str], ...] = ()
    note: str = ""


class FormDialog(ModalScreen[dict[str, str] | None]):
    """A few fields and OK: Enter (in any field) or ctrl+s submits, Escape cancels. Tab moves between fields.

    The values come back as text, checked by the appliance function the screen then calls; its error
    (message and hint) is the usual error dialog."""

    BINDINGS: ClassVar[list] = [Binding("escape", "cancel", "Cancel"),
                                Binding("ctrl+s", "submit", "OK", priority=True)]

    def __init__(self, title: str, text: str, fields: list[FormField]) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.text = text
        self.fields = fields

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog form-dialog"):
            yield Static(self.title_text, classes="dialog-title")
            if self.text:
                yield Static(self.text, classes="dialog-text", markup=False)
            for spec in self.fields:
                with Horizontal(classes="form-row"):
                    yield Label(spec.label, classes="form-label")
                    if spec.choices:
                        yield Select(list(spec.choices), value=spec.default or spec.choices[0][1], allow_blank=False,
                                     compact=True, id=f"form-{spec.name}")
                    else:
                        yield Input(spec.default, placeholder=spec.placeholder, compact=True, id=f"form-{spec.name}")
                if spec.note:
                    yield Static(spec.note, classes="form-note")
            yield Static("Enter or ctrl+s: OK · Escape: cancel · Tab: next field", classes="dialog-note")
        yield Footer()

    def entry_field_id(self) -> str | None:
        """The field that has the focus once the dialog is mounted: the first text field, so that Enter submits
        (Enter on a choice opens its list); Tab / shift+Tab move from there."""
        first = next((f for f in self.fields if not f.choices), self.fields[0] if self.fields else None)
        return None if first is None else f"form-{first.name}"

    def on_mount(self) -> None:
        entry = self.entry_field_id()
        if entry is not None:
            self.query_one(f"#{entry}").focus()

    def values(self) -> dict[str, str]:
        out = {}
        for spec in self.fields:
            widget = self.query_one(f"#form-{spec.name}")
            value = widget.value  # type: ignore[attr-defined]
            out[spec.name] = "" if value is Select.BLANK else str(value).strip()
        return out

    def set_value(self, name: str, value: str) -> None:
        self.query_one(f"#form-{name}").value = value  # type: ignore[attr-defined]

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def action_submit(self) -> None:
        self.dismiss(self.values())

    def action_cancel(self) -> None:
        self.dismiss(None)


class SecretShownOnce(ModalScreen[None]):
    """A new API key: shown here once, never stored in clear and never shown again."""

    BINDINGS: ClassVar[list] = [Binding("escape,enter", "dismiss", "I have copied it")]

    def __init__(self, title: str, secret: str, note: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.secret = secret
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="dialog-title")
            yield Static("The key, shown this once (only its hash is kept; it cannot be shown again):")
            yield Static(self.secret, id="secret", classes="secret", markup=False)
            yield Static(self.note)
            yield Button("I have copied it", id="ok", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss()

    def on_unmount(self) -> None:
        self.secret = ""  # the screen object may outlive the dialog (the screen stack's history)
