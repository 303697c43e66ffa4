"""Errors reach people as `error:` + `hint:` lines and exit 2; tracebacks only with --debug."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, run_cli


def test_airlock_error_is_two_lines_and_exit_2(airlock_home):
    airlock_home.mkdir(parents=True)
    (airlock_home / "catalog.db").write_bytes(b"garbage" * 1000)
    result = run_cli("audit", "show")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("error: cannot open the catalog") and str(airlock_home) in lines[0]
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in result.stderr


def test_debug_adds_the_traceback(airlock_home):
    airlock_home.mkdir(parents=True)
    (airlock_home / "catalog.db").write_bytes(b"garbage" * 1000)
    result = run_cli("--debug", "audit", "show")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "error: cannot open the catalog" in result.stderr


def test_usage_errors_are_click_errors():
    result = run_cli("audit", "show", "--limit", "0")
    assert result.returncode == 2 and "Invalid value for '--limit'" in result.stderr


def test_no_arguments_prints_help_and_version_works():
    assert "Usage: airlock" in run_cli().stdout
    assert run_cli("--version").stdout.strip() == "airlock, version 0.1.0"


def test_base_models_list_json_has_stable_keys():
    data = json.loads(run_cli("base-models", "list", "--json").stdout)
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["tiny-deepseek-r1"] == {
        "name": "tiny-deepseek-r1", "architecture": "Qwen2ForCausalLM", "has_weights": True,
        "path": by_name["tiny-deepseek-r1"]["path"]}
    assert by_name["tiny-deepseek-coder"]["architecture"] == "LlamaForCausalLM"
    assert by_name["tiny-deepseek-v3"]["has_weights"] is False


def test_unexpected_exception_does_not_leak_its_message():
    # A command that fails with a plain exception carrying record contents.
    code = """
import click, sys
from bundler.errors import run_cli

@click.command()
@click.option("--debug", is_flag=True)
def crash(debug):
    raise ValueError("record 17: patient Jane Doe, MRN 123456")

run_cli(crash, "crash", sys.argv[1:])
"""
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO)
    assert plain.returncode == 2
    assert plain.stderr.startswith("error: internal error (ValueError at <string>:")
    assert "Jane Doe" not in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-c", code, "--debug"], capture_output=True, text=True, check=False,
                           cwd=REPO)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
