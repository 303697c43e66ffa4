"""Audit: the tamper-evident log, newest first, filterable; `v` walks the hash chain."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Input, Label, Static

from tui.connection import catalog
from tui.formatting import timestamp
from tui.messages import AuditLoaded, ChainVerified
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

if TYPE_CHECKING:
    from appliance.audit import AuditEntry

ROWS_SHOWN = 2000


def matches(entry: AuditEntry, text: str) -> bool:
    needle = text.strip().lower()
    return not needle or any(needle in field.lower() for field in (entry.action, entry.actor, entry.object))


class AuditScreen(AirlockScreen):
    MODE = "audit"
    HELP = f"""
Every state change on this appliance, newest first (the newest {ROWS_SHOWN} rows; older ones with
`airlock audit show --since SEQ`). Each row's hash covers the previous row's, so an edited,
deleted or reordered row breaks the chain: **v** walks it and names the first broken row, and
the check itself is recorded. Write the printed head down to detect rows cut off the end later
(`airlock audit verify --anchor SEQ:HASH`).

The filter matches action (e.g. `vault.` or `data.import`), actor or object.
"""
    AUTO_FOCUS = "#audit"
    BINDINGS: ClassVar[list] = [
        Binding("v", "verify", "Verify chain"),
        Binding("slash", "filter", "Filter"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[AuditEntry] = []

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        with Horizontal(classes="field"):
            yield Label("Filter", classes="field-label")
            yield Input(placeholder="action, actor or object (e.g. vault.)", id="audit-filter", compact=True)
        yield DataTable(id="audit", cursor_type="row", zebra_stripes=True)
        yield Static("Chain not verified in this session: press v.", id="verify-result")
        yield Footer()

    def on_screen_resume(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="audit-load")
    def load(self) -> None:
        from appliance.audit import iter_audit

        with catalog(self.airlock.home) as db:
            entries = list(iter_audit(db, limit=ROWS_SHOWN, newest_first=True))
        self.post_message(AuditLoaded(entries))

    def on_audit_loaded(self, message: AuditLoaded) -> None:
        self.entries = message.entries
        self.show_rows()

    def show_rows(self) -> None:
        table = self.query_one("#audit", DataTable)
        text = self.query_one("#audit-filter", Input).value
        table.clear(columns=True)  # columns too: their widths then fit the rows shown
        for label, key in (("seq", "seq"), ("time (UTC)", "time"), ("actor", "actor"), ("action", "action"),
                           ("object", "object")):
            table.add_column(label, key=key)
        for entry in self.entries:
            if matches(entry, text):
                table.add_row(str(entry.seq), timestamp(entry.ts), entry.actor.split(" (")[0], entry.action,
                              entry.object, key=str(entry.seq))

    def on_input_changed(self, event: Input.Changed) -> None:
        self.show_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#audit", DataTable).focus()

    def action_filter(self) -> None:
        self.query_one("#audit-filter", Input).focus()

    def action_refresh(self) -> None:
        self.load()

    def action_verify(self) -> None:
        self.query_one("#verify-result", Static).update("verifying the chain…")
        self.verify()

    @work(thread=True, exclusive=True, exit_on_error=False, group="audit-verify")
    def verify(self) -> None:
        from appliance.audit import append_audit, verify_chain

        with catalog(self.airlock.home) as db:
            report = verify_chain(db)
            # Recorded after the walk, as `airlock audit verify` does: the report describes the chain as found.
            append_audit(db, "audit.verify", "audit_log", {"ok": report.ok, "rows_checked": report.rows_checked,
                                                           "first_broken_seq": report.first_broken_seq})
        self.post_message(ChainVerified(report))

    def on_chain_verified(self, message: ChainVerified) -> None:
        report = message.report
        result = self.query_one("#verify-result", Static)
        if report.ok:
            anchor = f"\n{report.anchor.describe()}" if report.anchor is not None else ""
            result.update(f"Chain intact: {report.rows_checked} rows. Head {report.head_seq}:{report.head_hash[:16]}… "
                          f"(record it to detect truncation later){anchor}")
            result.set_class(False, "-bad")
        else:
            where = f"first broken row: seq {report.first_broken_seq}: " if report.first_broken_seq else ""
            anchor = f"\nchecked against {report.anchor.describe()}" if report.anchor is not None else ""
            result.update(f"Chain BROKEN: {where}{report.reason}{anchor}\nhint: preserve the catalog file as evidence "
                          "and tell your security office")
            result.set_class(True, "-bad")
        self.load()

    def palette_commands(self):
        yield SystemCommand("Verify audit chain", "walk the hash chain and name the first broken row",
                            self.action_verify)
