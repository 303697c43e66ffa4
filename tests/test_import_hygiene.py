"""Layering that a static linter cannot see: imports done at run time, checked in `sys.modules`.

(import-linter checks the static graph in `make lint`; these catch imports inside functions
that run at import or --help time.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import BIN

HEAVY = ["torch", "transformers", "peft", "onnxruntime", "tensorrt", "textual", "tui"]


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("code", ["import appliance, bundler", "import bundler.cli, bundler.errors",
                                  "import appliance.cli, appliance.catalog, appliance.audit, appliance.doctor"])
def test_packages_import_no_heavy_or_ui_modules(code):
    assert _loaded_after(code).isdisjoint(HEAVY)


def test_cli_help_imports_no_torch():
    code = ("import sys\nsys.argv = ['airlock', '--help']\nfrom appliance.cli import cli\n"
            "try:\n    cli.main(standalone_mode=False)\nexcept SystemExit:\n    pass")
    assert _loaded_after(code).isdisjoint(HEAVY)


def test_help_of_both_clis_works():
    for prog in ("airlock", "airlock-bundle"):
        result = subprocess.run([str(BIN / prog), "--help"], capture_output=True, text=True, check=False)
        assert result.returncode == 0 and "Usage:" in result.stdout
