"""`make demo-soak`: the whole demo N times in a row, each run on a fresh folder, then a tally.

    .venv/bin/python tests/e2e/demo_soak.py                    # 10 runs of `airlock demo` (what make runs)
    .venv/bin/python tests/e2e/demo_soak.py --runs 3 --skip-bundle

Each run is `airlock demo` as `make demo` runs it: a new temporary folder (the demo removes it after
a passing run and keeps it after a failing one), a new vault with new keys, so new data splits.
One line per run: its wall time, and for a failed run the line the demo failed with and its log.
The last line is `N passed, M failed`; the exit status is 1 if any run failed. Wall times are
printed, never judged. Not collected by pytest (no `test_` prefix): one run takes minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[2]
AIRLOCK = Path(sys.executable).parent / "airlock"


def failure_line(output: str) -> str:
    """The error a failed demo ends with (`error: stage "..." failed: ...` and the command's own error
    lines under it, joined), else the last line it printed."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if not starts:
        return lines[-1].strip() if lines else "(no output)"
    error = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1:]:
        if not line.startswith(" "):  # the `hint:` line, or what the demo printed after its error
            break
        error.append(line.strip())
    return " / ".join(error)


def run_demo(args: list[str], log: Path, timeout_s: float) -> tuple[bool, float, str]:
    """One `airlock demo`, its output to `log`. Returns (passed, wall seconds, the failing line or "")."""
    env = {k: v for k, v in os.environ.items() if k != "AIRLOCK_HOME"}  # the demo makes its own home
    env["PYTHONUNBUFFERED"] = "1"  # its lines in the log in the order it printed them
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen([str(AIRLOCK), "demo", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            return False, time.monotonic() - started, f"did not finish within {timeout_s:.0f} s (stopped)"
    seconds = time.monotonic() - started
    if returncode == 0:
        return True, seconds, ""
    return False, seconds, f"exit {returncode}: {failure_line(log.read_text(errors='replace'))}"


@click.command()
@click.option("--runs", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many demos in a row.")
@click.option("--skip-bundle", is_flag=True, help="Stages 3-6 only, with this venv's `airlock` (faster).")
@click.option("--timeout", "timeout_s", type=click.IntRange(60), default=3600, show_default=True,
              help="Seconds after which a run that has not finished counts as failed (a hang, not a slow run).")
def soak(runs: int, skip_bundle: bool, timeout_s: int) -> None:
    """Run `airlock demo` RUNS times, each on a fresh folder; print `N passed, M failed`."""
    logs = Path(tempfile.mkdtemp(prefix="airlock-demo-soak-"))
    args = ["--skip-bundle"] if skip_bundle else []
    click.echo(f"demo soak: {runs} runs of `airlock demo{' --skip-bundle' if skip_bundle else ''}`; logs in {logs}")
    passed = failed = 0
    for number in range(1, runs + 1):
        log = logs / f"run-{number:02d}.log"
        ok, seconds, why = run_demo(args, log, timeout_s)
        if ok:
            passed += 1
            click.echo(f"run {number:2d}/{runs}: passed in {seconds:.0f} s")
            log.unlink()
        else:
            failed += 1
            click.echo(f"run {number:2d}/{runs}: FAILED after {seconds:.0f} s: {why}  (log: {log})")
    if not failed:
        logs.rmdir()
    click.echo(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    soak()
