"""The build station CLI exists, stays light and shares the error format."""

from __future__ import annotations

from tests.conftest import run_cli


def test_version_and_unknown_command():
    assert run_cli("--version", prog="airlock-bundle").stdout.strip() == "airlock-bundle, version 0.1.0"
    result = run_cli("frobnicate", prog="airlock-bundle")
    assert result.returncode == 2 and "No such command" in result.stderr
