"""`airlock-bundle`: the build station's command line (keygen, build, verify, inspect, diff).

Runs on a connected build station without torch or a GPU. The bundle commands arrive with the
bundle issue; every `list`/`show`/`inspect` command will take `--json` like `airlock`'s.
"""

from __future__ import annotations

import click

from bundler.errors import run_cli

VERSION = "0.1.0"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(VERSION, prog_name="airlock-bundle")
def cli(debug: bool) -> None:
    """Airlock build station: pack wheels, models and the appliance into a signed offline bundle."""


def main() -> None:
    run_cli(cli, "airlock-bundle")


if __name__ == "__main__":
    main()
