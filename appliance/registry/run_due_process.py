"""`airlock schedule run-due` in its own process, for callers that must not run it themselves (the operator UI).

    results = run_due_in_process(home, task="maint-qa", force=True)   # -> [DueRun]

A due run imports the inbox through the data pipeline (`appliance.registry.inbox` runs the import
job in-process: it installs signal handlers and changes process-wide state), then starts the
retrain as a detached job. None of that belongs in a UI's thread, so this runs the very command
the systemd timer runs, as the logged-in person (their key agent answers it), and reads its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.errors import AirlockError
from appliance.registry.schedule import DueRun

TIMEOUT_S = 3600
"""Inbox imports of a large folder take a while; the retrain itself is a detached job and does not count."""


def run_due_in_process(home: Path, *, task: str | None = None, force: bool = False,
                       timeout_s: float = TIMEOUT_S) -> list[DueRun]:
    """Run due schedules (or `task`'s, `force`d) in a child process; its error comes back as an AirlockError."""
    command = [sys.executable, "-I", "-m", "appliance.cli", "schedule", "run-due", "--json"]
    if task:
        command += ["--task", task]
    if force:
        command.append("--force")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False,
                                stdin=subprocess.DEVNULL, env={**os.environ, "AIRLOCK_HOME": str(home)})
    except subprocess.TimeoutExpired:
        raise AirlockError(f"run-due did not finish within {timeout_s:.0f} s",
                           hint="a large inbox is still importing; see `airlock jobs list`") from None
    if result.returncode in (0, 1) and result.stdout.strip():
        try:
            return [DueRun(**entry) for entry in json.loads(result.stdout)["runs"]]
        except (ValueError, KeyError, TypeError):
            pass
    lines = [line for line in result.stderr.strip().splitlines() if line]
    message = next((line.removeprefix("error: ") for line in lines if line.startswith("error: ")),
                   f"run-due ended with exit code {result.returncode}")
    hint = next((line.removeprefix("hint: ") for line in lines if line.startswith("hint: ")),
                "run `airlock schedule run-due` to see the whole output")
    raise AirlockError(message, hint=hint)
