"""`airlock`: the appliance command line. Every `list`/`show`/`status` takes `--json`.

Kept light: this module imports click and our small modules only; torch and friends load
inside the commands that need them, so `airlock --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path

import click

import appliance
from appliance.cli_output import echo_json, echo_table
from appliance.errors import AirlockError
from bundler.errors import run_cli


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(appliance.__version__, prog_name="airlock")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Airlock: offline fine-tuning appliance.

    `airlock` alone, in a terminal, opens the operator UI (also `airlock tui`); every stage is
    also a command below. Start with `airlock doctor`.
    """
    from appliance.vault.audit_seal import register

    register()  # audit rows this command writes are sealed when the vault is unlocked
    if ctx.invoked_subcommand is None:
        import sys

        if sys.stdin.isatty() and sys.stdout.isatty():
            _open_ui(None, debug)
        else:  # piped or scripted: the UI needs a terminal
            click.echo(ctx.get_help())


@cli.command("tui")
@click.option("--mount", "mount_root", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Folder the import wizard browses (default: /media if it exists, else your home directory).")
@click.pass_context
def tui_command(ctx: click.Context, mount_root: Path | None) -> None:
    """Open the operator's terminal UI (what `airlock` alone does in a terminal)."""
    _open_ui(mount_root, bool(ctx.parent and ctx.parent.params.get("debug")))


def _open_ui(mount_root: Path | None, debug: bool) -> None:
    # The UI is loaded by name: `appliance` never imports `tui` (import-linter's layers), the entry
    # point only launches it, and `airlock --help` stays free of Textual.
    import importlib

    try:
        ui = importlib.import_module("tui.app")
    except ModuleNotFoundError as exc:
        raise AirlockError(f"the terminal UI cannot start: {exc.name} is not installed",
                           hint="install the appliance from its bundle (install.sh); every stage is also an "
                                "`airlock` command (`airlock --help`)") from None
    ui.run(mount_root=mount_root, debug=debug)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor(as_json: bool) -> int:
    """Check this machine: Python, torch/GPU, TensorRT, ONNX Runtime, disk, catalog, audit, network.

    Exits 1 when a check fails; a missing GPU or TensorRT is only a warning.
    """
    from appliance.doctor import run_checks, worst_status
    from appliance.paths import airlock_home

    checks = run_checks()
    status = worst_status(checks)
    if as_json:
        echo_json({"status": status, "home": str(airlock_home()), "checks": [c.to_dict() for c in checks]})
    else:
        _print_checks(checks)
        click.echo(f"\noverall: {status}")
    return 1 if status == "fail" else 0


def _print_checks(checks) -> None:
    marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    echo_table([(c.name, marks[c.status], c.detail + (f" -> {c.hint}" if c.hint else "")) for c in checks],
               ["check", "status", "detail"])


@cli.group()
def audit() -> None:
    """Read and verify the tamper-evident audit log."""


@audit.command("show")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Rows to show.")
@click.option("--action", help="Only this action, or a family with a trailing dot (e.g. 'vault.').")
@click.option("--since", "since_seq", type=click.IntRange(min=0), default=0, help="Only rows after this seq.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def audit_show(limit: int, action: str | None, since_seq: int, as_json: bool) -> None:
    """List audit rows, newest first."""
    from dataclasses import asdict

    from appliance.audit import iter_audit
    from appliance.catalog import open_catalog

    db = open_catalog()
    entries = list(iter_audit(db, since_seq=since_seq, action=action, limit=limit, newest_first=True))
    if as_json:
        echo_json({"entries": [asdict(e) for e in entries]})
        return
    if not entries:
        click.echo("no audit rows")
        return
    echo_table([(e.seq, e.ts[:19] + "Z", e.actor, e.action, f"{e.object} {_short_details(e.details)}".strip())
                for e in entries], ["seq", "time (UTC)", "actor", "action", "object / details"])


def _short_details(details: dict) -> str:
    from appliance.audit import canonical_json

    return canonical_json(details) if details else ""


@audit.command("verify")
@click.option("--anchor", metavar="SEQ:HASH",
              help="A head you recorded earlier; also catches rows cut off the end of the chain.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def audit_verify(anchor: str | None, as_json: bool) -> int:
    """Walk the hash chain and name the first broken row. Exits 1 if the chain is broken."""
    from appliance.audit import append_audit, verify_chain
    from appliance.catalog import open_catalog

    parsed_anchor = _parse_anchor(anchor) if anchor else None
    db = open_catalog()
    report = verify_chain(db, anchor=parsed_anchor)
    # The verification itself is recorded, after the walk, so the report describes the chain as found.
    append_audit(db, "audit.verify", "audit_log",
                 {"ok": report.ok, "rows_checked": report.rows_checked, "first_broken_seq": report.first_broken_seq})
    if as_json:
        echo_json(report.to_dict())
    elif report.ok:
        click.echo(f"audit chain intact: {report.rows_checked} rows")
        click.echo(f"head: {report.head_seq}:{report.head_hash}  (record this to detect truncation later)")
        if report.anchor is not None:
            click.echo(report.anchor.describe())
    else:
        where = f"first broken row: seq {report.first_broken_seq}: " if report.first_broken_seq else ""
        click.echo(f"audit chain BROKEN: {where}{report.reason}", err=True)
        if report.anchor is not None:
            click.echo(f"checked against {report.anchor.describe()}", err=True)
        click.echo("hint: preserve the catalog file as evidence and tell your security office", err=True)
    return 0 if report.ok else 1


def _parse_anchor(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise AirlockError(f"anchor {text!r} is not SEQ:HASH",
                           hint="copy the 'head:' line that `airlock audit verify` printed, e.g. 42:9f86d0…")
    return int(seq), digest


@cli.group("base-models")
def base_models() -> None:
    """Base models available on this machine (from bundles, or the demo models)."""


@base_models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def base_models_list(as_json: bool) -> None:
    """List base model directories found in the model search path."""
    from appliance.base_models import list_base_models

    found = list_base_models()
    if as_json:
        echo_json({"models": [{"name": m.name, "path": str(m.path), "architecture": m.architecture,
                               "has_weights": m.has_weights} for m in found]})
        return
    if not found:
        click.echo("no base models found")
        return
    echo_table([(m.name, m.architecture, "yes" if m.has_weights else "config only", m.path) for m in found],
               ["name", "architecture", "weights", "path"])


from appliance.demo.cli import demo  # noqa: E402 - the whole story in one command (issue 11)

cli.add_command(demo)

from appliance.vault.cli import vault  # noqa: E402 - command groups register here, one line each

cli.add_command(vault)

from appliance.vault.users_cli import users  # noqa: E402 - accounts and roles (issue 12)

cli.add_command(users)

from appliance.upgrade import upgrade  # noqa: E402 - bundle install/upgrade/rollback (issue 9)

cli.add_command(upgrade)

from appliance.jobs.cli import jobs  # noqa: E402 - detached long-running work (issue 5)

cli.add_command(jobs)

from appliance.data.cli import data  # noqa: E402 - datasets: import, show, export, delete (issue 4)

cli.add_command(data)

from appliance.train.cli import train  # noqa: E402 - fine-tuning runs as resumable jobs (issue 5)

cli.add_command(train)

from appliance.serve.cli import serve  # noqa: E402 - the inference server, foreground or as a job (issue 8)

cli.add_command(serve)

from appliance.serve.keys_cli import keys  # noqa: E402 - API keys of the inference server (issue 8)

cli.add_command(keys)

from appliance.optimize.cli import engine, optimize  # noqa: E402 - INT8 QAT, ONNX exports, TensorRT engines

cli.add_command(optimize)
cli.add_command(engine)

from appliance.registry.cli import models  # noqa: E402 - model registry: versions, promotion, cards (issue 6)

cli.add_command(models)

from appliance.registry.cli import retrain  # noqa: E402 - gated incremental retraining (issue 6)

cli.add_command(retrain)

from appliance.registry.schedule_cli import schedule  # noqa: E402 - scheduled retraining and inbox (issue 6)

cli.add_command(schedule)


def main() -> None:
    run_cli(cli, "airlock")


if __name__ == "__main__":
    main()
