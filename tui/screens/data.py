"""Data: the datasets in the vault, one dataset's detail (splits, versions, per-file report), delete."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from tui.connection import catalog
from tui.dialogs import ConfirmByTyping
from tui.formatting import timestamp
from tui.messages import DatasetDeleted, DatasetDetail, DatasetLoaded, DatasetRow, DatasetsLoaded, ReportLoaded
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

REPORT_ROWS = 200


class DataScreen(AirlockScreen):
    MODE = "data"
    HELP = """
Datasets live encrypted in the vault, de-identified, deduplicated and split (train/val/test).
**n** opens the import wizard (a USB stick's folder, a folder, one file); **Enter** shows a
dataset's splits, versions and the per-file outcome of each import; **Delete** crypto-shreds a
dataset (admins only, after you type its name).
"""
    BINDINGS: ClassVar[list] = [
        Binding("n", "import_wizard", "Import…"),
        Binding("delete", "delete", "Delete"),
        Binding("r", "refresh", "Refresh"),
    ]

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Datasets in the vault. Enter: details · n: import new data", classes="screen-note")
        table: DataTable = DataTable(id="datasets", cursor_type="row", zebra_stripes=True)
        table.add_column("name", key="name")
        table.add_column("kind", key="kind")
        table.add_column("records", key="records")
        table.add_column("train/val/test", key="splits")
        table.add_column("versions", key="versions")
        table.add_column("updated (UTC)", key="updated")
        yield table
        yield Footer()

    def on_screen_resume(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="datasets")
    def load(self) -> None:
        from appliance.data import datasets
        from appliance.data.store import recover_imports

        with catalog(self.airlock.home) as db:
            notes = recover_imports(db, self.airlock.home)  # as every `airlock data` command does first
            rows = []
            for ds in datasets.all_datasets(db):
                versions = datasets.versions(db, ds.id)
                rows.append(DatasetRow(ds, datasets.split_counts(db, ds.id), len(versions),
                                       versions[-1].created_at if versions else ds.created_at))
        self.post_message(DatasetsLoaded(rows, notes))

    def on_datasets_loaded(self, message: DatasetsLoaded) -> None:
        for note in message.notes:
            self.notify(note, title="cleaned up")
        table = self.query_one("#datasets", DataTable)
        table.clear()
        for row in message.rows:
            counts = row.split_counts
            table.add_row(row.dataset.name, row.dataset.kind, str(row.records),
                          f"{counts['train']}/{counts['val']}/{counts['test']}", str(row.versions),
                          timestamp(row.updated_at), key=row.dataset.name)
        if not message.rows:
            table.add_row("no datasets yet: press n to import", "", "", "", "", "")

    def selected_name(self) -> str | None:
        table = self.query_one("#datasets", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return key or None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.app.push_screen(DatasetScreen(event.row_key.value))

    def action_import_wizard(self) -> None:
        from tui.screens.import_wizard import ImportScreen

        self.app.push_screen(ImportScreen())

    def action_delete(self) -> None:
        name = self.selected_name()
        if name:
            confirm_delete(self, name)

    def action_refresh(self) -> None:
        self.load()

    def palette_commands(self):
        yield SystemCommand("Import data", "the import wizard: choose files, dry run, import",
                            self.action_import_wizard)

    def on_dataset_deleted(self, message: DatasetDeleted) -> None:
        self.notify(f"deleted dataset {message.name}: {message.records} records; its key is destroyed")
        self.load()


def confirm_delete(screen: AirlockScreen, name: str) -> None:
    def confirmed(ok: bool | None) -> None:
        if ok:
            delete_dataset(screen, name)

    screen.app.push_screen(ConfirmByTyping(f"This destroys dataset {name!r} for good: its key is destroyed, then its "
                                           "files. Models trained on it keep their lineage.", name), confirmed)


@work(thread=True, exclusive=True, exit_on_error=False, group="delete")
def delete_dataset(screen: AirlockScreen, name: str) -> None:
    from appliance.access import require
    from appliance.data.store import delete_dataset as shred

    home = screen.airlock.home
    with catalog(home) as db:
        require(db, home, "data.delete")
        count = shred(db, home, name)
    screen.post_message(DatasetDeleted(name, count))


class DatasetScreen(AirlockScreen):
    """One dataset: what it holds and what each import did with every file (names need an unlocked vault)."""

    MODE = "data"
    HELP = """
One dataset: kind, profile, splits and record counts; every version (import) with what it added;
and the per-file report of the shown version: which files were not imported, and why. File names
may identify patients, so they are kept encrypted and need an unlocked vault. **v** shows the
previous version's report, **Delete** crypto-shreds the dataset (admins only).
"""
    BINDINGS: ClassVar[list] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("v", "previous_version", "Older report"),
        Binding("delete", "delete", "Delete"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.dataset_name = name
        self.detail: DatasetDetail | None = None
        self.report_version: int | None = None

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static(f"Dataset {self.dataset_name}", id="ds-header", classes="screen-note")
        versions: DataTable = DataTable(id="versions", cursor_type="row")
        versions.add_columns("version", "imported (UTC)", "by", "new records", "files", "not imported")
        yield versions
        yield Static("", id="report-summary")
        problems: DataTable = DataTable(id="problems", cursor_type="row", zebra_stripes=True)
        problems.add_columns("file", "outcome", "why")
        yield problems
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="dataset")
    def load(self) -> None:
        from appliance.data import datasets

        with catalog(self.airlock.home) as db:
            ds = datasets.get(db, self.dataset_name)
            detail = DatasetDetail(ds, datasets.split_counts(db, ds.id),
                                   datasets.label_counts(db, ds.id) if ds.kind != "text" else {},
                                   datasets.versions(db, ds.id))
        self.post_message(DatasetLoaded(detail))

    def on_dataset_loaded(self, message: DatasetLoaded) -> None:
        self.detail = detail = message.detail
        ds, counts = detail.dataset, detail.split_counts
        labels = ", ".join(f"{label or '(none)'} {sum(by.values())}" for label, by in detail.labels.items())
        self.query_one("#ds-header", Static).update(
            f"{ds.name}: {ds.kind}, profile {ds.profile}, splits {ds.split_spec}; {sum(counts.values())} records "
            f"(train {counts['train']}, val {counts['val']}, test {counts['test']})"
            + (f"\nlabels: {labels}" if labels else "")
            + f"\ncreated {timestamp(ds.created_at)} by {ds.created_by.split(' (')[0]}")
        table = self.query_one("#versions", DataTable)
        table.clear()
        for v in detail.versions:
            skipped = ", ".join(f"{b} {n}" for b, n in v.summary["buckets"].items() if n and b != "imported") or "-"
            table.add_row(str(v.version), timestamp(v.created_at), v.created_by.split(" (")[0], str(v.records_added),
                          str(v.summary["files_read"]), skipped)
        if detail.versions:
            self.report_version = detail.versions[-1].version
            self.load_report(self.report_version)

    @work(thread=True, exclusive=True, exit_on_error=False, group="report")
    def load_report(self, version: int) -> None:
        from appliance.access import require
        from appliance.data import datasets
        from appliance.data.store import load_report
        from appliance.vault.lifecycle import keys_for

        home = self.airlock.home
        with catalog(home) as db:
            ds = datasets.get(db, self.dataset_name)
            require(db, home, "data.report")
            entry, report = load_report(db, keys_for(db, home), home, ds, version)
        self.post_message(ReportLoaded(entry.version, report))

    def on_report_loaded(self, message: ReportLoaded) -> None:
        report = message.report
        records = report["records"]
        buckets = "  ".join(f"{b} {n}" for b, n in report["buckets"].items())
        self.query_one("#report-summary", Static).update(
            f"Import report, version {message.version}: {report['files_read']} files: {buckets}\n"
            f"records: {records['imported']} imported, {records['duplicates']} duplicates, "
            f"{records['cleaned_empty']} empty after cleaning, {records['rejected']} rejected")
        table = self.query_one("#problems", DataTable)
        table.clear()
        for row in problem_rows(report)[:REPORT_ROWS]:
            table.add_row(*row)
        if not table.row_count:
            table.add_row("every file was imported", "", "")

    def action_previous_version(self) -> None:
        if self.report_version and self.report_version > 1:
            self.report_version -= 1
        elif self.detail and self.detail.versions:
            self.report_version = self.detail.versions[-1].version  # wrap around to the latest
        if self.report_version:
            self.load_report(self.report_version)

    def action_delete(self) -> None:
        confirm_delete(self, self.dataset_name)

    def on_dataset_deleted(self, message: DatasetDeleted) -> None:
        self.notify(f"deleted dataset {message.name}: {message.records} records; its key is destroyed")
        self.app.pop_screen()


def problem_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Files not imported, or imported with rejected records: (file, outcome, why), as `airlock data report`."""
    rows = []
    for f in report.get("files", []):
        if f["bucket"] == "imported" and not f["rejected"]:
            continue
        reason = f["reason"]
        if not reason and f["issues"]:
            first = f["issues"][0]
            reason = f"{f['rejected']} records rejected; first: {first['where']}: {first['reason']}"
        rows.append((f["rel"], f["bucket"], reason))
    return rows
