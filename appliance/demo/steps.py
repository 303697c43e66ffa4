"""What every demo stage is made of: real CLI commands in subprocesses, timed, and one summary row each.

    cli = Cli(Path("/opt/airlock/bin/airlock"), env={"AIRLOCK_HOME": "/tmp/x/home"})
    out = cli.json("data", "list")           # runs `airlock data list --json`, parses stdout
    with Stage(report, "import text") as stage:
        ...
        stage.metric = "199 records"

A failing command raises `DemoError` naming the command, with its own error lines, and its own hint
followed by where the demo's files are. A stage that fails records what failed in the report
(`facts["failure"]`); `stage_failed` turns that into the one error line the operator sees,
`stage "train classifier" failed: ...`, also when the stage's own code hit a bug (then with its
file and line; `airlock --debug demo` shows the traceback). Every number the demo prints goes
through `format_metric`, which says "not measured" where an appliance command reported none.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from appliance.errors import AirlockError


class DemoError(AirlockError):
    """A demo stage failed: the command, what it printed, where to look."""


class StageFailed(DemoError):
    """The error the demo ends with: which stage failed, what failed in it, and what to do."""


NOT_MEASURED = "not measured"


def format_metric(value: float | None, template: str = "{:.3f}") -> str:
    """`template.format(value)`, or "not measured" where a command reported none (None, NaN).

    A split with no records, or with one class only, gives no loss or AUC; the appliance reports
    None for it, and the demo says so instead of failing on it.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_MEASURED
    return template.format(value)


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
        elif issubclass(exc_type, Exception) and "failure" not in self.report.facts:
            self.report.facts["failure"] = {"stage": self.result.stage, **_what_failed(exc)}


def _what_failed(exc: BaseException) -> dict[str, str]:
    """The message and hint of a stage's exception: an AirlockError's own, or the demo's bug and where it is."""
    if isinstance(exc, AirlockError):
        return {"error": exc.message, "hint": exc.hint}
    frames = traceback.extract_tb(exc.__traceback__)
    # The last line of the demo's own code, not the library it called: that is where to look first.
    ours = [f for f in frames if Path(f.filename).parent.name == "demo"] or frames
    where = f" ({Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
    return {"error": f"unexpected {type(exc).__name__} in the demo's own code{where}",
            "hint": "a bug in the demo, not in the appliance command it ran: rerun as `airlock --debug demo ...` "
                    "for the traceback and report it (check it for patient data first)"}


def stage_failed(report: Report, exc: BaseException) -> AirlockError:
    """The error the demo ends with: the failed stage's (from this process or the inner run's report),
    else an AirlockError as it is, else a bug outside the stages with where it is."""
    failure = report.facts.get("failure")
    if failure:
        return StageFailed(f'stage "{failure["stage"]}" failed: {failure["error"]}', hint=failure["hint"])
    if isinstance(exc, AirlockError):
        return exc
    failure = _what_failed(exc)
    return StageFailed(f"the demo failed between its stages: {failure['error']}", hint=failure["hint"])


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
            said, hint = _own_hint(result.stderr or result.stdout)
            raise DemoError(f"`{_shown(command)}` exited {result.returncode}:\n{_tail(said)}",
                            hint=(f"{hint}; " if hint else "") + "a failed demo keeps its folder (as --keep does): "
                                 "`airlock jobs list` with AIRLOCK_HOME set to its home shows what ran")
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


def _own_hint(output: str) -> tuple[str, str]:
    """A command's output without its last `hint:` line, and that hint (what the command says to do)."""
    lines = output.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("hint: "):
            return "\n".join(lines[:i] + lines[i + 1:]), lines[i].removeprefix("hint: ").strip()
    return output, ""


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
