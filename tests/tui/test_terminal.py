"""`airlock` in a real terminal (tmux, 80x24): no arguments opens the UI, the operator logs in with
the keyboard, sees the dashboard, and imports a folder as a job."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.appliance.vault.conftest import PASSPHRASE
from tests.conftest import BIN, REPO

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """A private tmux server (its own socket: other tmux sessions are never touched) running one command."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        self.tmux = ["tmux", "-L", f"airlock-test-{os.getpid()}"]
        self.env = env
        subprocess.run([*self.tmux, "-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-s", "ui",
                        command], env=env, check=True)

    def screen(self) -> str:
        result = subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "ui"], capture_output=True, text=True,
                                check=False)
        return result.stdout

    def wait_for(self, *texts: str, timeout: float = 60) -> str:
        """The screen once it shows every one of `texts` (the very texts a test then asserts on)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if all(text in screen for text in texts):
                return screen
            if time.monotonic() > deadline:
                missing = [text for text in texts if text not in screen]
                raise AssertionError(f"{missing!r} did not appear within {timeout:.0f} s; the screen:\n{screen}")
            time.sleep(0.2)

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "ui", *(["-l"] if literal else []), *keys], check=True)
        time.sleep(0.3)

    def running(self) -> bool:
        return subprocess.run([*self.tmux, "has-session", "-t", "ui"], capture_output=True, check=False).returncode == 0

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, check=False)


def test_airlock_without_arguments_in_a_terminal_logs_in_shows_the_dashboard_and_imports(vault_init, airlock_home,
                                                                                          qa_source: Path):
    vault_init()
    env = {**os.environ, "AIRLOCK_HOME": str(airlock_home), "AIRLOCK_KDF_PROFILE": "test", "TERM": "xterm-256color"}
    terminal = Terminal(f"cd {shlex.quote(str(REPO))} && exec {shlex.quote(str(BIN / 'airlock'))}", env)
    try:
        terminal.wait_for("Log in with your account", "Airlock · log in", "admin")  # the only account, prefilled
        terminal.keys(PASSPHRASE, literal=True)
        terminal.keys("Enter")
        home = terminal.wait_for("unlocked: admin (admin role)", "1 Home", "7 Audit", "Running jobs")
        assert PASSPHRASE not in home

        terminal.keys("2")
        terminal.wait_for("Datasets in the vault")
        terminal.keys("n")
        terminal.wait_for("Import data")
        terminal.keys("Tab")
        terminal.keys("Tab")  # past the tree and the preview, to the path
        terminal.keys(str(qa_source), literal=True)
        terminal.keys("Enter")
        terminal.wait_for("contents hidden")
        terminal.keys("C-s")
        terminal.wait_for("SUCCEEDED", "dataset qa-export version 1", timeout=120)

        terminal.keys("q")
        deadline = time.monotonic() + 60
        while terminal.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not terminal.running(), f"`airlock` did not exit on q; the screen:\n{terminal.screen()}"
    finally:
        terminal.close()
