"""What every demo stage is made of: real CLI commands in subprocesses, timed, and one summary row each.

    cli = Cli(Path("/opt/airlock/bin/airlock"), env={"AIRLOCK_HOME": "/tmp/x/home"})
    out = cli.json("data", "list")           # runs `airlock data list --json`, parses stdout
    with Stage(report, "import text") as stage:
        ...
        stage.metric = "199 records"

A failing command raises `DemoError` naming the command, with the last lines of its stderr, so the
operator sees what the appliance said; the hint says where the demo's files are.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from appliance.errors import AirlockError


class DemoError(AirlockError):
    """A demo stage failed: the command, what it printed, where to look."""


@dataclass
class StageResult:
    """One row of the summary table."""

    stage: str
    seconds: float = 0.0
    metric: str = ""
    artifacts: str = ""
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """Everything the summary prints; written as JSON when one process hands its stages to another."""

    stages: list[StageResult] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "facts": self.facts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls([StageResult(**s) for s in data.get("stages", [])], dict(data.get("facts", {})))


class Stage:
    """Times a block, prints its banner, and appends its row to the report (marked failed on an exception)."""

    def __init__(self, report: Report, name: str, banner: str) -> None:
        self.result = StageResult(name)
        self.report = report
        self.banner = banner
        self._started = 0.0

    @property
    def metric(self) -> str:
        return self.result.metric

    @metric.setter
    def metric(self, value: str) -> None:
        self.result.metric = value

    @property
    def artifacts(self) -> str:
        return self.result.artifacts

    @artifacts.setter
    def artifacts(self, value: str) -> None:
        self.result.artifacts = value

    def __enter__(self) -> Stage:
        click.secho(f"\n== {self.banner}", bold=True)
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.result.seconds = round(time.perf_counter() - self._started, 1)
        self.result.ok = exc_type is None
        if exc_type is not None:
            why = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            self.result.metric = f"{why}: {self.result.metric}" if self.result.metric else why
        self.report.stages.append(self.result)
        if exc_type is None:
            click.echo(f"   ({self.result.seconds:.1f} s)")


def say(text: str) -> None:
    click.echo(f"   {text}")


class Cli:
    """Runs one executable (`airlock` or `airlock-bundle`) with a fixed environment and optional wrapper."""

    def __init__(self, executable: Path, env: dict[str, str] | None = None, wrap: list[str] | None = None,
                 cwd: Path | None = None) -> None:
        self.executable = executable
        self.env = {**os.environ, **(env or {})}
        self.wrap = wrap or []
        self.cwd = cwd

    def command(self, *args: str) -> list[str]:
        return [*self.wrap, str(self.executable), *args]

    def run(self, *args: str, ok_codes: tuple[int, ...] = (0,), timeout: float = 1800) -> subprocess.CompletedProcess:
        command = self.command(*args)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=self.cwd,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DemoError(f"`{_shown(command)}` did not finish within {timeout:.0f} s",
                            hint="the machine may be overloaded; run the demo again, or with --keep to inspect "
                                 "its home") from None
        if result.returncode not in ok_codes:
            raise DemoError(f"`{_shown(command)}` exited {result.returncode}:\n{_tail(result.stderr or result.stdout)}",
                            hint="the lines above are the command's own error; rerun with --keep to open the "
                                 "demo's home (AIRLOCK_HOME) and look at `airlock jobs list`")
        return result

    def json(self, *args: str, ok_codes: tuple[int, ...] = (0,), timeout: float = 1800) -> Any:
        result = self.run(*args, "--json", ok_codes=ok_codes, timeout=timeout)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            raise DemoError(f"`{_shown(self.command(*args, '--json'))}` printed no JSON:\n{_tail(result.stdout)}",
                            hint="this is a bug in the demo or the command; rerun with --keep and report it") from None


def _shown(command: list[str]) -> str:
    """The command as a person would type it: `airlock ...`, not the absolute path of the venv."""
    words = [Path(w).name if i == 0 or w == command[0] else w for i, w in enumerate(command)]
    return shlex.join(words)


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept) or "    (no output)"


def this_airlock() -> Path:
    """The `airlock` next to the running interpreter: the dev venv's, or the installed release's."""
    return Path(sys.executable).parent / "airlock"


def echo_summary(report: Report) -> None:
    from appliance.cli_output import echo_table

    click.secho("\n== summary", bold=True)
    rows = [(s.stage, f"{s.seconds:.1f} s", s.metric) for s in report.stages]
    echo_table(rows, ["stage", "time", "key metric"], max_width=100)
    total = sum(s.seconds for s in report.stages)
    click.echo(f"total: {total:.1f} s ({total / 60:.1f} min)")
    artifacts = [(s.stage, s.artifacts) for s in report.stages if s.artifacts]
    if artifacts:
        click.secho("\n== artifacts", bold=True)
        echo_table(artifacts, ["stage", "where"], max_width=100)
