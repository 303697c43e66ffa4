"""Fill the test wheelhouse (`make venv` runs this, with network) so bundle tests run offline.

    .venv/bin/python tests/bundler/fill_wheelhouse.py .cache/wheelhouse

Downloads, for the test bundles' target (CPython 3.11, manylinux_2_28_x86_64 and every older
manylinux tag), the project's base dependencies, its pinned `appliance` extra with the CPU build
of torch, and mdurl (a tiny pure wheel the tamper bundles ship). Uses the machine's pip
configuration (index, mirror, find-links), like any `pip download`.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from bundler.spec import TargetSpec

REPO = Path(__file__).resolve().parents[2]
TARGET = TargetSpec(python="3.11", platform="manylinux_2_28_x86_64")
EXTRA = ["mdurl==0.1.2"]


def requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["appliance"], *EXTRA]
    # The CPU build: a plain torch==X on the public index is the multi-GB CUDA one.
    return [f"{p}+cpu" if p.startswith("torch==") and "+" not in p else p for p in pins]


def main(dest: str) -> int:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", dest,
               "--python-version", TARGET.python, "--implementation", "cp", "--abi", "cp311"]
    for tag in TARGET.platform_tags():
        command += ["--platform", tag]
    return subprocess.run([*command, *requirements()], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
