"""The one exception hierarchy shared by both command lines.

`AirlockError` lives here, at the bottom layer, because the build station (`bundler`) must not
import the appliance, while the appliance may import the bundler's manifest code. Every error
carries a `hint`: what the person at the keyboard should do next.

    AirlockError                  base: message + hint; the CLIs print both and exit 2
    ├── BundleError               bundler: bad spec, bad signature, tampered bundle (bundler/)
    └── appliance.errors.*        appliance: catalog, audit, vault, data, jobs ... (appliance/)
"""

from __future__ import annotations

from pathlib import Path


class AirlockError(Exception):
    """An error an operator can act on. `str(error)` is one line; `hint` says what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class BundleError(AirlockError):
    """A bundle, its spec or its signature is not acceptable."""


def run_cli(command, prog_name: str, argv: list[str] | None = None) -> None:
    """Run a click command the way operators should see it, then exit.

    An `AirlockError` prints `error: <message>` and `hint: <hint>` and exits 2. Any other
    exception prints its type and where it happened (never its message, which may carry record
    contents) and exits 2. `--debug` anywhere on the command line adds the traceback.
    """
    import sys
    import traceback

    import click

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        result = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)
    except AirlockError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        click.echo(f"error: internal error ({type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno})",
                   err=True)
        click.echo("hint: rerun with --debug for the traceback and report it; check it for patient data first",
                   err=True)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
