"""TUI fixtures: a real vault (fast KDF, real key agent), real datasets imported through the CLI,
and helpers to drive the app with the pilot and wait for its thread workers and job processes."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

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
from tests.conftest import run_cli

SIZE = (80, 24)


@pytest.fixture
def unlocked(vault_init, unlock):  # noqa: F811 - the fixtures imported above
    """A vault with one admin account `admin`, logged in through `airlock vault unlock`."""
    vault_init()
    unlock()


@pytest.fixture
def qa_source(tmp_path: Path) -> Path:
    """A folder holding one JSONL file of 40 chat Q&A records (the demo corpus)."""
    source = tmp_path / "usb" / "qa-export"
    source.mkdir(parents=True)
    (source / "qa.jsonl").write_text("\n".join(corpus_chats(40)) + "\n", encoding="utf-8")
    return source


@pytest.fixture
def qa_dataset(unlocked, qa_source: Path) -> str:
    result = run_cli("data", "import", str(qa_source), "--name", "qa", "--near-dup", "off")
    assert result.returncode == 0, result.stderr
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


async def wait_until(pilot, condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Let the app run (workers, timers) until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)
        await asyncio.sleep(0.05)


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
def trained_run(qa_dataset: str, tmp_path: Path, stop_jobs) -> str:
    """A succeeded two-step LoRA run of the tiny model on dataset `qa` (a real job, through the CLI)."""
    import json

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_LM_RECIPE, encoding="utf-8")
    result = run_cli("train", "lm", "--base", "tiny-deepseek-r1", "--data", qa_dataset, "--recipe", str(recipe),
                     "--wait", "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["run"]["id"]


@pytest.fixture
def production_task(trained_run: str) -> str:
    """Task `qa` with the trained run registered as qa-v1 and promoted (through the CLI)."""
    for args in (("models", "register", trained_run, "--task", "qa"),
                 ("models", "promote", "qa-v1", "--reason", "first model")):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
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
