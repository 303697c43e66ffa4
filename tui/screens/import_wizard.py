"""Import wizard: choose a file or folder, see what it holds (no contents), dry run, import as a job.

The import itself is a detached job (`start_job(db, "data_import", params)`, the parameters built
as `airlock data import` builds them), so it survives this UI closing; its progress opens in the
job screen. The dry run stores nothing and works while the vault is locked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, DirectoryTree, Footer, Input, Label, Select, Static

from tui.connection import catalog
from tui.messages import DryRunDone, JobStarted, PreviewReady
from tui.screen_base import AirlockScreen
from tui.screens.data import problem_rows
from tui.widgets import NavBar

FORMATS = ("auto", "jsonl", "json", "csv", "txt", "dicom", "images")
PROFILES = ("general", "medical")


def import_options(db, name: str, fmt: str, profile: str) -> Any:
    """The options `airlock data import PATH --name NAME --format F --profile P` uses (other flags at defaults).

    Appending to an existing dataset keeps its split ratios, as the CLI does."""
    from appliance.data import datasets
    from appliance.data.pipeline import ImportOptions
    from appliance.data.splits import SplitSpec

    existing = datasets.find(db, name)
    splits = SplitSpec.parse(existing.split_spec) if existing else SplitSpec()
    return ImportOptions(fmt=fmt, profile=profile, splits=splits)


class ImportScreen(AirlockScreen):
    MODE = "data"
    HELP = """
1. Choose a file or folder in the tree (Enter), or type its path. The preview shows the formats
   found and the first records' shapes (roles and lengths; contents stay hidden).
2. Name the dataset (a new name creates it, an existing one gets a new version) and choose the
   profile: **medical** scrubs e-mails, phone and ID numbers and dates from free text.
3. **ctrl+r** dry run: every file's bucket (imported, duplicate, cleaned-empty, quarantined,
   rejected) with its reason; nothing is stored.
4. **ctrl+s** imports, as a job: all or nothing, encrypted, and it keeps running if you close the UI.
"""
    BINDINGS: ClassVar[list] = [
        Binding("ctrl+r", "dry_run", "Dry run", priority=True),
        Binding("ctrl+s", "start_import", "Import", priority=True),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static(f"Import data · browsing {self.airlock.mount_root}", classes="screen-note")
        with Horizontal(id="wizard-top"):
            yield DirectoryTree(self.airlock.mount_root, id="tree")
            with VerticalScroll(id="preview-box"):
                yield Static("Choose a file or folder (Enter) to see what it holds.", id="preview")
        with Horizontal(classes="field"):
            yield Label("Path", classes="field-label")
            yield Input(placeholder="/media/usb/export", id="path", compact=True)
        with Horizontal(classes="field"):
            yield Label("Dataset", classes="field-label")
            yield Input(placeholder="name, e.g. radiology-reports", id="name", compact=True)
            yield Select([(p, p) for p in PROFILES], value="general", allow_blank=False, id="profile", compact=True)
            yield Select([(f, f) for f in FORMATS], value="auto", allow_blank=False, id="format", compact=True)
        yield Static("Dry run (ctrl+r) shows what an import would do; nothing is stored.", id="dry-run-summary")
        problems: DataTable = DataTable(id="dry-run-problems", cursor_type="row")
        problems.add_columns("file", "outcome", "why")
        yield problems
        yield Footer()

    # --- choosing the input --------------------------------------------------------------------------------------

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.choose(event.path)

    def on_directory_tree_directory_selected(self, event: DirectoryTree.DirectorySelected) -> None:
        self.choose(event.path)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "path" and event.value.strip():
            self.choose(Path(event.value.strip()).expanduser(), from_input=True)
        elif event.input.id == "name":
            self.action_dry_run()

    def choose(self, path: Path, *, from_input: bool = False) -> None:
        from tui.preview import suggested_name

        if not from_input:
            self.query_one("#path", Input).value = str(path)
        name = self.query_one("#name", Input)
        if not name.value:
            name.value = suggested_name(path)
        self.query_one("#preview", Static).update("reading…")
        self.preview(path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="preview")
    def preview(self, path: Path) -> None:
        from tui.preview import describe_input

        self.post_message(PreviewReady(str(path), describe_input(path)))

    def on_preview_ready(self, message: PreviewReady) -> None:
        self.query_one("#preview", Static).update("\n".join(message.lines))

    def chosen(self) -> tuple[Path, str, str, str] | None:
        path = self.query_one("#path", Input).value.strip()
        name = self.query_one("#name", Input).value.strip()
        if not path or not name:
            self.notify("choose a file or folder and name the dataset first", severity="warning")
            self.query_one("#path" if not path else "#name", Input).focus()
            return None
        return (Path(path).expanduser(), name, str(self.query_one("#format", Select).value),
                str(self.query_one("#profile", Select).value))

    # --- dry run and import --------------------------------------------------------------------------------------

    def action_dry_run(self) -> None:
        chosen = self.chosen()
        if chosen:
            self.query_one("#dry-run-summary", Static).update("dry run: reading every file…")
            self.dry_run(*chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="dry-run")
    def dry_run(self, path: Path, name: str, fmt: str, profile: str) -> None:
        from appliance.data import datasets
        from appliance.data.store import dry_run

        with catalog(self.airlock.home) as db:
            datasets.check_name(name)
            report = dry_run(db, path, name, import_options(db, name, fmt, profile))
        self.post_message(DryRunDone(name, report.to_dict()))

    def on_dry_run_done(self, message: DryRunDone) -> None:
        report = message.report
        records = report["records"]
        buckets = " · ".join(f"{b} {n}" for b, n in report["buckets"].items())
        splits = ", ".join(f"{k} {v}" for k, v in sorted(report.get("splits", {}).items())) or "none"
        self.query_one("#dry-run-summary", Static).update(
            f"Dry run into {message.name!r} (nothing stored): {report['files_read']} files: {buckets}\n"
            f"records: {records['imported']} would be imported, {records['duplicates']} duplicates, "
            f"{records['cleaned_empty']} empty, {records['rejected']} rejected · splits: {splits} · ctrl+s imports")
        table = self.query_one("#dry-run-problems", DataTable)
        table.clear()
        for row in problem_rows(report)[:200]:
            table.add_row(*row)

    def action_start_import(self) -> None:
        chosen = self.chosen()
        if chosen:
            self.start_import(*chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="import")
    def start_import(self, path: Path, name: str, fmt: str, profile: str) -> None:
        from appliance.access import require
        from appliance.data import datasets
        from appliance.data.import_job import options_to_params
        from appliance.jobs.runner import start_job
        from appliance.vault.lifecycle import keys_for

        home = self.airlock.home
        with catalog(home) as db:
            datasets.check_name(name)
            keys_for(db, home)  # fail now with "vault is locked", not inside the job
            require(db, home, "data.import")
            params = {"path": str(path.resolve()), "name": name,
                      "options": options_to_params(import_options(db, name, fmt, profile))}
            job = start_job(db, "data_import", params)
        self.post_message(JobStarted(job.id, f"import into {name}"))

    def on_job_started(self, message: JobStarted) -> None:
        from tui.screens.job import JobScreen

        self.notify(f"started {message.what} ({message.job_id}); it keeps running if you close the UI")
        self.app.push_screen(JobScreen(message.job_id))

    def palette_commands(self):
        yield SystemCommand("Dry run", "what the import would do; nothing is stored", self.action_dry_run)
        yield SystemCommand("Start import", "import as a job (all or nothing, encrypted)", self.action_start_import)
