"""How the command line prints: aligned tables for people, `--json` for scripts.

JSON output is one document on stdout with stable keys (documented in docs/cli-json.md);
everything meant for people goes through `echo_table`.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from typing import Any

import click


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, max_width: int = 80) -> None:
    """Left-aligned columns fitted to an 80-column terminal; the last column wraps."""
    cells = [[str(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(value))
    indent = sum(widths[:-1]) + 2 * (len(headers) - 1)
    last_width = max(24, max_width - indent)

    def emit(values: Sequence[str]) -> None:
        head = "".join(v.ljust(widths[i]) + "  " for i, v in enumerate(values[:-1]))
        wrapped = textwrap.wrap(values[-1], last_width, break_on_hyphens=False) or [""]
        click.echo((head + wrapped[0]).rstrip())
        for more in wrapped[1:]:
            click.echo(" " * indent + more)

    emit(list(headers))
    emit(["-" * w for w in widths[:-1]] + ["-" * min(last_width, 40)])
    for row in cells:
        emit(row)
