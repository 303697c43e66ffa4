"""Vault fixtures: fast KDF parameters (test-only profile) and a finalizer that kills every agent."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    # Test-only: tiny Argon2id/scrypt parameters. Never set AIRLOCK_KDF_PROFILE on an appliance.
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase.txt"
    path.write_text(PASSPHRASE + "\n")
    return path


@pytest.fixture(autouse=True)
def agents(airlock_home: Path):
    """Pids of agents a test started; all are killed afterwards, whatever the test did."""
    pids: list[int] = []
    yield pids
    from appliance.vault.agent import agent_status

    with contextlib.suppress(Exception):
        status = agent_status(airlock_home)
        if status is not None:
            pids.append(status.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A detached agent is reparented; a zombie would still answer kill(0). Check /proc.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


@pytest.fixture
def vault_init(passphrase_file: Path):
    """`airlock vault init`; returns the printed recovery key."""
    def init(*extra: str) -> str:
        result = run_cli("vault", "init", "--passphrase-file", str(passphrase_file), *extra)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        return lines[lines.index("RECOVERY KEY (shown once; print it and keep it in the site's safe):") + 2].strip()
    return init


@pytest.fixture
def unlock(passphrase_file: Path, agents: list[int], airlock_home: Path):
    """`airlock vault unlock` (passphrase by default); records the agent pid for the finalizer."""
    def do_unlock(*args: str, expect_ok: bool = True):
        extra = list(args) or ["--passphrase-file", str(passphrase_file)]
        result = run_cli("vault", "unlock", *extra)
        if expect_ok:
            assert result.returncode == 0, result.stderr
        from appliance.vault.agent import agent_status

        status = agent_status(airlock_home)
        if status is not None:
            agents.append(status.pid)
        return result
    return do_unlock
