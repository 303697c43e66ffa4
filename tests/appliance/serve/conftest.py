"""Serving fixtures: one appliance home per test session, built the way an operator builds it.

Through the real CLI: `vault init` + `unlock` (a real key agent, the fixed site secret), `data import`
of 40 chat records and 24 PNGs, three tiny LoRA runs and one classifier run as real jobs, and
`airlock optimize` of the second LoRA run (an FP32 ONNX export); run qa1 is version 1 of task `qa`,
in production (PyTorch). Runs qa2 and qa3 are left to tests that need versions of their own (the
hot-swap tests register them under a task of their own and promote there). API keys come from
`airlock keys create`. The server is the real `airlock serve` in a subprocess on a free loopback
port; tests talk to it with httpx.

What the shared appliance and server hold is the same for every test, whatever ran before: a test
that promotes, or stops a server, does it on a task or a server of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, fix_site_secret, run_cli

PASSPHRASE = "correct horse battery staple"
# Two optimizer steps: the runs only need to be real, succeeded runs with real adapters.
TINY_LM_RECIPE = "max_steps = 2\neval_every = 2\nbatch_size = 2\nmax_length = 64\nrank = 4\nlr = 1e-2\nseed = {seed}\n"
LISTENING = re.compile(r"listening on (https?)://([\w.:\[\]]+):(\d+) ")
MARKER = "Zebra-Quartz-7731"
"""A word that appears in prompts: it must never reach a log."""


@dataclass
class Appliance:
    home: Path
    env: dict[str, str]
    runs: dict[str, str]
    """name -> run id: qa1, qa2 (LoRA, with an FP32 ONNX export), qa3 (LoRA), xray (classifier)."""
    passphrase_file: Path
    keys: dict[str, str] = field(default_factory=dict)
    """API key name -> secret."""

    def cli(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env, timeout=timeout)

    def cli_json(self, *args: str) -> dict:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def create_key(self, name: str, *tasks: str) -> str:
        out = self.cli_json("keys", "create", name, *(a for t in tasks for a in ("--task", t)), "--json")
        self.keys[name] = out["secret"]
        return out["secret"]


def write_shapes(root: Path, count: int, size: int = 32) -> None:
    """Noisy discs and squares as 8-bit grey PNGs, one folder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        label = "disc" if i % 2 == 0 else "square"
        cy, cx = rng.integers(10, size - 10, 2)
        shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36 if label == "disc" else (abs(yy - cy) <= 5) & (abs(xx - cx) <= 5)
        pixels = np.clip(shape * 0.7 + rng.random((size, size)) * 0.3, 0, 1)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8), "L").save(root / label / f"scan{i:03d}.png")


def _kill_agent(home: Path) -> None:
    from appliance.vault.agent import agent_status

    with contextlib.suppress(Exception):
        status = agent_status(home)
        if status is not None:
            os.kill(status.pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Appliance:
    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    # Test-only KDF profile: tiny Argon2id parameters. Never set on an appliance.
    env = {"AIRLOCK_HOME": str(home), "AIRLOCK_KDF_PROFILE": "test"}
    (root / "passphrase").write_text(PASSPHRASE + "\n")
    app = Appliance(home, env, {}, root / "passphrase")
    try:
        assert app.cli("vault", "init", "--passphrase-file", str(root / "passphrase")).returncode == 0
        # A day, not the default 15 minutes without key use: this agent serves the whole session, and in a random
        # order the last serving test may come half an hour after the one before it.
        unlocked = app.cli("vault", "unlock", "--passphrase-file", str(root / "passphrase"), "--idle-timeout", "86400")
        assert unlocked.returncode == 0, unlocked.stderr
        fix_site_secret(home)  # the same splits on every run
        chats = [line for line in (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8")
                 .splitlines() if '"messages"' in line][:40]
        (root / "qa").mkdir()
        (root / "qa" / "qa.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
        write_shapes(root / "shapes", 24)
        for source, name, extra in ((root / "qa", "qa", ["--near-dup", "off"]),
                                    (root / "shapes", "shapes", ["--image-size", "32", "--split", "60/20/20"])):
            imported = app.cli("data", "import", str(source), "--name", name, *extra)
            assert imported.returncode == 0, imported.stderr
        for seed in (1, 2, 3):
            (root / f"tiny{seed}.toml").write_text(TINY_LM_RECIPE.format(seed=seed))
        (root / "cls.toml").write_text("max_steps = 4\neval_every = 2\nbatch_size = 8\nlr = 3e-3\n")
        # Four jobs at once: each is its own process, so they overlap their start-up.
        started = {
            **{f"qa{seed}": app.cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--recipe",
                                         str(root / f"tiny{seed}.toml"), "--json") for seed in (1, 2, 3)},
            "xray": app.cli_json("train", "classifier", "--base", "tiny-resnet-cls", "--data", "shapes", "--recipe",
                                 str(root / "cls.toml"), "--json")}
        _wait_for_runs(app, started)
        # Run qa2 gets an FP32 ONNX export: served, it runs on ONNX Runtime; qa1 and qa3 on PyTorch.
        optimized = app.cli("optimize", "run", app.runs["qa2"], "--variants", "fp32", "--no-qat", "--wait")
        assert optimized.returncode == 0, optimized.stderr
        _register(app)
    except BaseException:
        _kill_agent(home)
        raise
    yield app
    _kill_agent(home)


def _wait_for_runs(app: Appliance, started: dict[str, dict]) -> None:
    from appliance.catalog import open_catalog
    from appliance.jobs.runner import wait_for

    db = open_catalog(app.home)
    for name, out in started.items():
        job = wait_for(db, out["job"]["id"], timeout_s=600)
        assert job.state == "succeeded", (name, job.error, job.hint)
        app.runs[name] = out["run"]["id"]
    db.close()


def _register(app: Appliance) -> None:
    """Run qa1 becomes version v1 of task `qa` in the registry, in production."""
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote
    from appliance.registry.versions import register_run
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for

    db = open_catalog(app.home)
    keys = keys_for(db, app.home)
    register_run(db, keys, app.home, get_run(db, app.runs["qa1"]), "qa", actor="test")
    promote(db, "qa-v1", actor="test", reason="first version")
    db.close()


SWAP_TASK = "swap"


@pytest.fixture(scope="session")
def swap_task(appliance: Appliance) -> str:
    """Task `swap` in the shared appliance: run qa3 as v1 (PyTorch), promoted, and run qa2 as v2 (its ONNX export), a
    candidate. Registered once per session (a run is registered once per catalog); the tests that promote within it
    (hot swap) bring it to the version they start from, the sandbox test works on a copy of the home."""
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote
    from appliance.registry.versions import register_run
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for

    db = open_catalog(appliance.home)
    try:
        vault_keys = keys_for(db, appliance.home)
        for name in ("qa3", "qa2"):
            register_run(db, vault_keys, appliance.home, get_run(db, appliance.runs[name]), SWAP_TASK, actor="test")
        promote(db, f"{SWAP_TASK}-v1", actor="test", reason="the swap task starts here")
    finally:
        db.close()
    return SWAP_TASK


@pytest.fixture(autouse=True)
def _appliance_home(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, airlock_home: Path) -> None:
    """Tests that use the shared appliance run their in-process catalog calls against its home."""
    if "appliance" in request.fixturenames or "server" in request.fixturenames:
        app = request.getfixturevalue("appliance")
        for name, value in app.env.items():
            monkeypatch.setenv(name, value)


class Server:
    """A real `airlock serve` process; its stderr (the request log) is kept in a file."""

    def __init__(self, app: Appliance, *args: str, log_path: Path) -> None:
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        self.process = subprocess.Popen([str(BIN / "airlock"), "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                        stderr=self.log_file, env={**os.environ, **app.env}, cwd=REPO, text=True)
        self.stdout: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if not self._ready.wait(180) or not self.url:
            self.stop()
            raise AssertionError(f"the server did not start: {self.log_path.read_text()[-2000:]}")

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.append(line)
            match = LISTENING.search(line)
            if match and not self.url:
                self.url = f"{match.group(1)}://{match.group(2)}:{match.group(3)}"
                self._ready.set()
        self._ready.set()

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request_log(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines()
                if line.startswith("{") and '"event": "request"' in line]

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self.log_file.close()


@pytest.fixture(scope="session")
def server(appliance: Appliance, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """`airlock serve --task qa --run xray=RUN`: two batch rows and two workers, two waiting places, two requests
    per key (small limits, so that the overload test reaches them)."""
    from appliance.catalog import open_catalog
    from appliance.serve.api_keys import create_key

    appliance.create_key("client")  # through `airlock keys create`; the others directly, to save process starts
    db = open_catalog(appliance.home)
    for name, tasks in (("xray-only", ("xray",)), ("loader", ()), ("other", ()), ("third", ()), ("fourth", ())):
        appliance.keys[name] = create_key(db, name, tasks, actor="test")[1]
    db.close()
    running = Server(appliance, "--task", "qa", "--run", f"xray={appliance.runs['xray']}", "--workers", "2",
                     "--max-batch", "2", "--queue-depth", "2", "--per-key-concurrency", "2",
                     log_path=tmp_path_factory.mktemp("serve-log") / "server.log")
    yield running
    running.stop()
