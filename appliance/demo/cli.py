"""`airlock demo`: the whole story in one command (what `make demo` runs).

    airlock demo                 # 1 bundle -> 2 offline install -> 3..6 with the installed appliance
    airlock demo --keep          # ... and keep the folder, to open the operator UI on its home
    airlock demo --skip-bundle   # stages 3..6 only, with this `airlock` (what the e2e test runs)

Without --skip-bundle the stages 3-6 run as `PREFIX/bin/airlock demo --skip-bundle ...` inside
`unshare -n` (the installed release, no network but its own loopback), and this process prints
the one summary table from the report that run writes.

A failed stage ends the demo with `error: stage "NAME" failed: ...` and a hint, and exit status 2;
`airlock --debug demo` adds the traceback (passed on to the installed appliance's run too).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import click

from appliance.demo.steps import Cli, DemoError, Report, echo_summary, stage_failed, this_airlock


@click.command()
@click.option("--keep", is_flag=True,
              help="Keep the demo's folder (bundle, install, AIRLOCK_HOME) and print how to open the UI on it.")
@click.option("--skip-bundle", is_flag=True,
              help="Skip building and installing a bundle: run stages 3-6 with this `airlock`.")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for everything the demo writes (default: a new temporary folder, removed at the end "
                   "unless --keep or a stage failed).")
@click.option("--lm-steps", type=click.IntRange(2, 10_000), default=100, show_default=True,
              help="LoRA training steps.")
@click.option("--classifier-steps", type=click.IntRange(2, 10_000), default=60, show_default=True,
              help="Classifier training steps.")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), hidden=True,
              help="Write the stage rows as JSON here instead of printing the summary (for the outer demo).")
@click.option("--airlock-bin", type=click.Path(path_type=Path, dir_okay=False), hidden=True,
              help="The `airlock` the stages run (default: the one next to this Python).")
def demo(keep: bool, skip_bundle: bool, work_dir: Path | None, lm_steps: int, classifier_steps: int,
         report_path: Path | None, airlock_bin: Path | None) -> None:
    """The whole story on this machine, offline, in 3 to 6 minutes on two CPU cores.

    Builds a signed bundle from the local wheelhouse and installs it with no network; then, with
    the installed appliance: vault, import of sample text and DICOM (PHI removed), LoRA and
    classifier training, PTQ/QAT + ONNX with parity checks, promotion, the server answering a
    chat completion and a classification, a gated retrain on new records, the audit chain; and a
    summary table. Nothing keeps running afterwards.
    """
    started = time.perf_counter()
    debug = bool(click.get_current_context().find_root().params.get("debug"))
    work, temporary = _work_dir(work_dir)
    if report_path is None:
        click.echo(f"airlock demo: working in {work}")
    report = Report()
    succeeded = False
    try:
        if skip_bundle:
            _stages_here(work, airlock_bin or this_airlock(), lm_steps, classifier_steps, report, report_path)
        else:
            _full_story(work, lm_steps, classifier_steps, report, debug)
        succeeded = True
    except Exception as exc:
        # One line that names the stage, even for a bug in the demo's own code (`--debug`: the traceback).
        raise stage_failed(report, exc) from exc
    finally:
        if report_path is None:  # the outer demo prints the summary of an inner run
            if report.stages:
                echo_summary(report)
            _farewell(work, temporary, keep, succeeded, report, airlock_bin or this_airlock())
    if report_path is None:
        click.echo(f"demo finished in {time.perf_counter() - started:.0f} s")


def _work_dir(work_dir: Path | None) -> tuple[Path, bool]:
    if work_dir is None:
        return Path(tempfile.mkdtemp(prefix="airlock-demo-")), True
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir, False


def _stages_here(work: Path, airlock: Path, lm_steps: int, classifier_steps: int, report: Report,
                 report_path: Path | None) -> None:
    from appliance.demo.netns import ensure_loopback
    from appliance.demo.story import StoryOptions, run_story

    ensure_loopback()
    try:
        run_story(StoryOptions(work=work, airlock=airlock, lm_steps=lm_steps, cls_steps=classifier_steps), report)
    finally:
        if report_path is not None:
            import json

            report_path.write_text(json.dumps(report.to_dict(), indent=2))


def _full_story(work: Path, lm_steps: int, classifier_steps: int, report: Report, debug: bool) -> None:
    from appliance.demo.bundle import build_and_install
    from appliance.demo.story import load_report, stop_everything

    installed = build_and_install(work, report)
    stages_report = work / "stages.json"
    wrap = ["unshare", "-n"] if installed.isolated else []
    command = [*wrap, str(installed.airlock), *(["--debug"] if debug else []), "demo", "--skip-bundle",
               "--work-dir", str(work),
               "--lm-steps", str(lm_steps), "--classifier-steps", str(classifier_steps),
               "--report", str(stages_report), "--airlock-bin", str(installed.airlock)]
    where = "inside `unshare -n`, loopback only" if installed.isolated else "with the network present (no unshare)"
    click.secho(f"\n== 3-6 run by the installed appliance ({installed.airlock}), {where}", bold=True)
    cli = Cli(installed.airlock, wrap=wrap, env={"AIRLOCK_HOME": str(work / "home")}, cwd=work)
    try:
        returncode = _run_to_the_end(command, cli.env, work)
    finally:
        if stages_report.exists():
            report.stages += load_report(stages_report).stages
            report.facts.update(load_report(stages_report).facts)
        # The inner run stops what it started; this catches what a second Ctrl-C cut short.
        stop_everything(cli, [])
    if returncode != 0:  # `demo` ends with the failed stage's error, from the report the inner run wrote
        raise DemoError(f"stages 3-6 failed (exit {returncode}): the error is printed above",
                        hint=f"the demo's folder is kept: {work}")


def _run_to_the_end(command: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run the inner demo; on Ctrl-C give it time to stop its jobs (it got the SIGINT too) instead of killing it."""
    process = subprocess.Popen(command, env=env, cwd=cwd)
    try:
        return process.wait()
    except KeyboardInterrupt:
        click.echo("\ninterrupted: waiting for the stages to stop their jobs ...", err=True)
        with contextlib.suppress(KeyboardInterrupt):
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        raise


def _farewell(work: Path, temporary: bool, keep: bool, succeeded: bool, report: Report, airlock: Path) -> None:
    home = work / "home"
    prefix_airlock = work / "opt-airlock" / "bin" / "airlock"
    airlock = prefix_airlock if prefix_airlock.exists() else airlock
    if keep or not succeeded or not temporary:
        click.echo(f"\nkept {work}" + ("" if succeeded else " (a stage failed; look inside, then delete it)"))
        if "passphrase_file" in report.facts:
            click.echo(f"open the operator UI on it: AIRLOCK_HOME={home} {airlock}   "
                       f"(account admin, passphrase in {report.facts['passphrase_file']})")
        return
    shutil.rmtree(work, ignore_errors=True)
    click.echo(f"\nremoved {work} (pass --keep to keep it and open the operator UI on it)")
