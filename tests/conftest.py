"""Shared fixtures: every test gets its own AIRLOCK_HOME; CLIs run as real subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def airlock_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "airlock-home"
    monkeypatch.setenv("AIRLOCK_HOME", str(home))
    monkeypatch.delenv("AIRLOCK_MODELS", raising=False)
    return home


def run_cli(*args: str, prog: str = "airlock", env: dict[str, str] | None = None, wrap: list[str] | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (optionally under a wrapper such as `unshare -n`)."""
    command = [*(wrap or []), str(BIN / prog), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0


def loopback_up() -> bool:
    """False inside `unshare -n`, where even 127.0.0.1 is down."""
    from appliance.demo.netns import loopback_works

    return loopback_works()


needs_loopback = pytest.mark.skipif(not loopback_up(), reason="the loopback interface is down here "
                                                               "(e.g. inside `unshare -n`)")

needs_unshare = pytest.mark.skipif(not unshare_available(),
                                   reason="`unshare -n` is not permitted here (needs root or user namespaces)")
