"""TUI fixtures: a real vault (fast KDF, real key agent), real datasets imported through the CLI,
and helpers to drive the app with the pilot and wait for its thread workers and job processes."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.appliance.train.conftest import corpus_chats
from tests.appliance.vault.conftest import (  # noqa: F401 - fixtures used by the TUI tests
    PASSPHRASE,
    agents,
    fast_kdf,
    passphrase_file,
    unlock,
    vault_init,
)
from tests.conftest import files_holding, fix_site_secret, run_cli

if TYPE_CHECKING:
    from tui.screens.job import JobScreen

SIZE = (80, 24)
WAIT_S = 60.0
"""How long a wait gives the app by default: generous, since two cores may run jobs beside the UI."""


@pytest.fixture
def unlocked(vault_init, unlock):  # noqa: F811 - the fixtures imported above
    """A vault with one admin account `admin`, logged in through `airlock vault unlock`."""
    vault_init()
    unlock()


def write_qa_source(root: Path) -> Path:
    """`root`/usb/qa-export holding one JSONL file of 40 chat Q&A records (the demo corpus)."""
    source = root / "usb" / "qa-export"
    source.mkdir(parents=True)
    (source / "qa.jsonl").write_text("\n".join(corpus_chats(40)) + "\n", encoding="utf-8")
    return source


@pytest.fixture
def qa_source(tmp_path: Path) -> Path:
    return write_qa_source(tmp_path)


class Templates:
    """Appliance homes built once per session, each a stage further, and copied into a test's AIRLOCK_HOME.

    `dataset`: a vault (admin, PASSPHRASE) with dataset `qa` imported under the fixed site secret; `trained`:
    plus a succeeded two-step LoRA run (a real job); `production`: plus that run registered as qa-v1 and
    promoted. Each is built through the CLI exactly as the per-test fixtures used to build it, then its key
    agent is stopped; a test gets a copy and unlocks it with its own agent, so what a test does never reaches
    another test. A copy is only valid if no file of the home names the template's own path (checked)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_id = ""
        self._built: dict[str, Path] = {}

    def _cli(self, home: Path, *args: str, timeout: int = 300):
        result = run_cli(*args, env={"AIRLOCK_HOME": str(home), "AIRLOCK_KDF_PROFILE": "test"}, timeout=timeout)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    def home(self, stage: str) -> Path:
        if stage not in self._built:
            self._built[stage] = self._build(stage)
        return self._built[stage]

    def _build(self, stage: str) -> Path:
        import json
        import shutil

        home = self.root / stage / "airlock-home"
        before = {"trained": "dataset", "production": "trained"}.get(stage)
        if before:
            shutil.copytree(self.home(before), home, symlinks=True)
        passphrase = self.root / "passphrase.txt"
        passphrase.write_text(PASSPHRASE + "\n", encoding="utf-8")
        if stage == "dataset":
            self._cli(home, "vault", "init", "--passphrase-file", str(passphrase))
        self._cli(home, "vault", "unlock", "--passphrase-file", str(passphrase))
        try:
            if stage == "dataset":
                fix_site_secret(home)
                self._cli(home, "data", "import", str(write_qa_source(self.root)), "--name", "qa", "--near-dup", "off")
            elif stage == "trained":
                recipe = self.root / "tiny.toml"
                recipe.write_text(TINY_LM_RECIPE, encoding="utf-8")
                trained = self._cli(home, "train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--recipe",
                                    str(recipe), "--wait", "--json")
                self.run_id = json.loads(trained.stdout)["run"]["id"]
            else:
                self._cli(home, "models", "register", self.run_id, "--task", "qa")
                self._cli(home, "models", "promote", "qa-v1", "--reason", "first model")
        finally:
            self._cli(home, "vault", "lock")
        return home

    def copy_to(self, stage: str, home: Path) -> None:
        import shutil

        shutil.copytree(self.home(stage), home, symlinks=True)
        assert files_holding(home, str(self.home(stage)).encode()) == [], "the copy names the template's path"


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return Templates(tmp_path_factory.mktemp("tui-templates"))


def _copied(templates: Templates, stage: str, home: Path, do_unlock) -> None:
    templates.copy_to(stage, home)
    do_unlock()


@pytest.fixture
def qa_dataset(templates: Templates, airlock_home: Path, unlock) -> str:  # noqa: F811 - the fixture imported above
    """Dataset `qa` in an unlocked vault (account `admin`), imported under the fixed site secret: its split,
    and the losses trained on it, are the same on every run. A copy of the session's template."""
    _copied(templates, "dataset", airlock_home, unlock)
    return "qa"


def pilot_test(test: Callable[..., Coroutine]) -> Callable[..., None]:
    """Run an async pilot test on a fresh event loop (no pytest async plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


def make_app(**options):
    from tui.app import AirlockApp

    return AirlockApp(poll_interval=options.pop("poll_interval", 0.2), **options)


async def wait_until(pilot, condition: Callable[[], object], what: str, timeout: float = WAIT_S,
                     seen: Callable[[], object] | None = None) -> None:
    """Let the app run (workers, timers) until `condition()` holds; `seen()` describes the state on a timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"; the app shows: {seen()!r}" if seen is not None else "")
                                 + f" (top screen: {type(pilot.app.screen).__name__})")
        await pilot.pause(0.05)
        await asyncio.sleep(0.05)


async def wait_for_dialog(pilot, dialog: type, what: str):
    """Wait for a dialog of type `dialog` on top with the focus where keys go (a FormDialog: its entry field), and
    return it. The screen is on top as soon as it is pushed but takes the focus when it mounts: keys pressed in
    between (Tab to a field, a name) land elsewhere, as they did once on a loaded machine (a schedule's inbox
    path typed into no field, the dialog never closed)."""
    from tui.dialogs import FormDialog

    app = pilot.app

    def ready() -> bool:
        screen = app.screen
        if not isinstance(screen, dialog) or not screen.is_mounted or screen.focused is None:
            return False
        return not isinstance(screen, FormDialog) or screen.focused.id == screen.entry_field_id()

    await wait_until(pilot, ready, what,
                     seen=lambda: (type(app.screen).__name__, getattr(app.screen.focused, "id", None)))
    return app.screen


def shows(app, selector: str, *expected: str) -> bool:
    """Whether the widget `selector` (on any screen, the top one first) exists and shows every `expected` text."""
    try:
        text = text_of(app, selector)
    except AssertionError:  # not composed yet
        return False
    return all(part in text for part in expected)


async def wait_for_text(pilot, selector: str, *expected: str, timeout: float = WAIT_S) -> str:
    """Wait until `selector` shows every `expected` text, the very text a test then asserts on; returns it.

    Waiting for a state that only precedes the text (a job's state, a flag) lets a slow repaint or poll
    fail the test; a timeout names what was missing and what the widget showed instead."""
    app = pilot.app

    def seen() -> str:
        return text_of(app, selector) if shows(app, selector) else f"nothing matches {selector}"

    wanted = " and ".join(map(repr, expected))
    await wait_until(pilot, lambda: shows(app, selector, *expected), f"{wanted} in {selector}", timeout, seen=seen)
    return text_of(app, selector)


async def finished_job(pilot, what: str, *expected: str, timeout: float = 180) -> JobScreen:
    """The job screen on top, its job succeeded, and its outcome (#job-run) showing every `expected` text.

    A job that ends otherwise fails at once with its outcome (error and hint) rather than at the timeout."""
    from tui.screens.job import FINAL, JobScreen

    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, JobScreen), f"the {what} job screen")
    job = app.screen

    def ended() -> bool:
        if job.job is None or job.job.state not in FINAL:
            return False
        return job.job.state != "succeeded" or shows(app, "#job-run", *expected)

    await wait_until(pilot, ended, f"the end of the {what} job, showing {expected}", timeout,
                     seen=lambda: (job.job.state if job.job else None, text_of(app, "#job-run")))
    assert job.job.state == "succeeded", text_of(app, "#job-run")
    return job


def text_of(app, selector: str) -> str:
    """The plain text a Static/Label shows, from whichever screen holds it (the top one first)."""
    for screen in reversed(app.screen_stack):
        found = screen.query(selector)
        if found:
            return str(found.first().render())
    raise AssertionError(f"nothing matches {selector!r}")


def table_rows(app, selector: str) -> list[list[str]]:
    table = app.screen.query_one(selector)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def first_row(app, selector: str) -> list[str]:
    """The table's first row, or [] while the table is empty or not on the top screen (for wait conditions)."""
    if not app.screen.query(selector):
        return []
    rows = table_rows(app, selector)
    return rows[0] if rows else []


async def log_in(pilot, passphrase: str = PASSPHRASE, *, typed: bool = False) -> None:
    """Enter the passphrase in the login dialog (the account is prefilled: the only one) and submit.

    `typed`: key by key; otherwise pasted at once (pressing 28 keys costs seconds on a busy machine)."""
    from textual.widgets import Input

    from tui.screens.login import LoginScreen

    app = pilot.app

    def ready() -> bool:  # pushed is not composed: the field exists only once the dialog has composed
        if not isinstance(app.screen, LoginScreen):
            return False
        found = app.screen.query("#passphrase")
        return bool(found) and not found.first(Input).disabled

    await wait_until(pilot, ready, "the login dialog")
    field = app.screen.query_one("#passphrase", Input)
    field.focus()
    await wait_until(pilot, lambda: app.screen.focused is field, "the passphrase field's focus")
    if typed:
        await pilot.press(*["space" if ch == " " else ch for ch in passphrase])
    else:
        field.insert_text_at_cursor(passphrase)
    await pilot.press("enter")


# Two optimizer steps: the runs only need to be real, succeeded runs with real adapters.
TINY_LM_RECIPE = "max_steps = 2\neval_every = 2\nbatch_size = 2\nmax_length = 64\nrank = 4\nlr = 1e-2\nseed = 1\n"


@pytest.fixture
def stop_jobs(airlock_home: Path):
    """At the end: cancel every job still queued or running (a server, a job a failed test left) and wait for it,
    so that no process outlives the test."""
    yield
    from appliance.catalog import open_catalog
    from appliance.jobs.records import list_jobs
    from appliance.jobs.runner import cancel_job, reconcile_jobs, wait_for

    db = open_catalog(airlock_home)
    try:
        reconcile_jobs(db)
        left = [job for state in ("queued", "running") for job in list_jobs(db, state=state, limit=1000)]
        for job in left:
            cancel_job(db, job.id)
        for job in left:
            if job.pid is not None:  # a queued row without a process has nothing to wait for
                wait_for(db, job.id, timeout_s=60)
    finally:
        db.close()


@pytest.fixture
def trained_run(templates: Templates, airlock_home: Path, unlock, stop_jobs) -> str:  # noqa: F811
    """Dataset `qa` and a succeeded two-step LoRA run of the tiny model on it (a real job, through the CLI);
    returns the run id. A copy of the session's template."""
    _copied(templates, "trained", airlock_home, unlock)
    return templates.run_id


@pytest.fixture
def production_task(templates: Templates, airlock_home: Path, unlock, stop_jobs) -> str:  # noqa: F811
    """Task `qa` with the trained run registered as qa-v1 and promoted (through the CLI). A copy of the
    session's template."""
    _copied(templates, "production", airlock_home, unlock)
    return "qa"


async def press_until_focused(pilot, widget_id: str, key: str = "tab", most: int = 40) -> None:
    """Press Tab (or `key`) until the widget `widget_id` has the focus, as an operator moves through a form."""
    for _ in range(most):
        focused = pilot.app.focused
        if focused is not None and focused.id == widget_id:
            return
        await pilot.press(key)
    raise AssertionError(f"{widget_id} never got the focus with {key}")


async def type_text(pilot, text: str) -> None:
    """Type `text` key by key, as an operator would."""
    await pilot.press(*text)
