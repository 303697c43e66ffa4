"""Hot swap: promoting a version in the registry switches the running server to it with no failed
request; a request in flight finishes on the version it started with; a version that cannot be
loaded (here: the vault was locked meanwhile) leaves the old one serving and is reported.

These tests promote, so they work on a task and a server of their own (task `swap`: run qa3 as v1 on
PyTorch, run qa2 as v2 from its ONNX export): the shared server's task `qa` never changes under the
other serving tests. Each test first brings `swap` to the version it starts from (`serve_version`),
so that they pass in any order and alone; counters are compared before and after."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.appliance.serve.conftest import SWAP_TASK, Appliance, Server
from tests.appliance.serve.test_security import CHAT

TASK = SWAP_TASK
SWAP_CHAT = {**CHAT, "model": TASK}


@dataclass
class SwapServer:
    server: Server
    keys: dict[str, str]
    """'client' (two askers at once) and 'stream' (the long stream), each allowed every task."""

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, key: str = "client") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def metric(self, name: str, default: float | None = None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        if default is None:
            raise AssertionError(f"{name} is not in /metrics")
        return default  # a counter is exported from its first increment on

    def served(self) -> dict:
        listed = httpx.get(f"{self.url}/v1/models", headers=self.headers(), timeout=10).json()
        return next(m for m in listed["data"] if m["id"] == TASK)["airlock"]


@pytest.fixture(scope="module")
def swap(appliance: Appliance, swap_task: str, tmp_path_factory: pytest.TempPathFactory) -> SwapServer:
    """Task `swap` (v1: run qa3, v2: run qa2, optimized; see `swap_task`) and a server of its own."""
    from appliance.catalog import open_catalog
    from appliance.serve.api_keys import create_key

    db = open_catalog(appliance.home)
    try:
        api = {name: create_key(db, f"swap-{name}", (), actor="test")[1] for name in ("client", "stream")}
    finally:
        db.close()
    # Two workers: the long stream holds one while the askers share the other (and the queue).
    running = Server(appliance, "--task", TASK, "--workers", "2", "--queue-depth", "4", "--per-key-concurrency", "2",
                     log_path=tmp_path_factory.mktemp("swap-log") / "server.log")
    yield SwapServer(running, api)
    running.stop()


def serve_version(swap: SwapServer, appliance: Appliance, version: str) -> None:
    """Make `version` (v1 or v2) of task swap its production version, and wait until the server serves it."""
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote
    from appliance.registry.versions import production

    db = open_catalog(appliance.home)
    try:
        if production(db, TASK).id != f"{TASK}-{version}":
            promote(db, f"{TASK}-{version}", actor="test", reason=f"hot-swap test starts from {version}")
    finally:
        db.close()
    # A version whose load failed a moment ago (see the last test) is retried only after a minute: room for that.
    _wait(lambda: swap.served()["version"] == version, 240, f"the swap server to serve {version}")


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _audit_rows(appliance, action: str) -> list[dict]:
    from appliance.audit import iter_audit
    from appliance.catalog import open_catalog

    db = open_catalog(appliance.home)
    try:
        return [{"object": e.object, **e.details} for e in iter_audit(db, action=action) if e.object == TASK]
    finally:
        db.close()


def test_promotion_swaps_versions_with_zero_failed_requests(swap, appliance):
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote

    serve_version(swap, appliance, "v1")
    loads_before = swap.metric(f'airlock_model_loads_total{{model="{TASK}",result="ok"}}', default=0)
    swaps_before = len(_audit_rows(appliance, "serve.swap"))
    results: list[tuple[int, str | None, float]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=swap.url, headers=swap.headers(), timeout=120) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/chat/completions", json={**SWAP_CHAT, "max_tokens": 6})
                    results.append((response.status_code, response.headers.get("X-Airlock-Model"), time.monotonic()))
                except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                    results.append((0, type(exc).__name__, time.monotonic()))

    # A long stream on version 1, started before the promotion: it must finish on version 1.
    stream_versions: list[str] = []
    stream_events: list[str] = []
    stream_times: list[float] = []
    first_chunk = threading.Event()

    def long_stream() -> None:
        with httpx.Client(timeout=300) as client, client.stream(
                "POST", f"{swap.url}/v1/chat/completions",
                json={**SWAP_CHAT, "max_tokens": 1024, "ignore_eos": True, "stream": True},
                headers=swap.headers("stream")) as response:
            stream_versions.append(response.headers["X-Airlock-Model"])
            for line in response.iter_lines():
                if line.startswith("data: "):
                    stream_events.append(line[6:])
                    stream_times.append(time.monotonic())
                    first_chunk.set()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert first_chunk.wait(120)
    askers = [threading.Thread(target=keep_asking) for _ in range(2)]
    for thread in askers:
        thread.start()
    try:
        _wait(lambda: sum(1 for r in results if r[1] == "swap@v1") >= 3, 120, "answers from v1")
        db = open_catalog(appliance.home)
        promote(db, f"{TASK}-v2", actor="test", reason="hot-swap test")
        db.close()
        promoted_at = time.monotonic()
        _wait(lambda: any(r[1] == "swap@v2" for r in results), 120, "the server to switch to v2")
        switched = len(results)
        _wait(lambda: len(results) >= switched + 4, 120, "more answers after the switch")
    finally:
        stop.set()
        for thread in askers:
            thread.join(180)
        streamer.join(300)

    assert [r for r in results if r[0] != 200] == []
    versions = [r[1] for r in sorted(results, key=lambda r: r[2])]
    assert set(versions) == {"swap@v1", "swap@v2"}
    first_v2 = versions.index("swap@v2")
    assert "swap@v1" not in versions[first_v2 + 2:]  # at most the one request in flight on the other thread
    assert all(r[2] > promoted_at for r in results if r[1] == "swap@v2")
    # The stream was still running when v2 answered (1024 tokens against a few 6-token answers and a load:
    # it ends well after the swap), kept its version to the end, and ended properly.
    first_v2_at = min(r[2] for r in results if r[1] == "swap@v2")
    assert stream_times[-1] > first_v2_at, "the long stream ended before the swap: the test checked nothing"
    assert stream_versions == ["swap@v1"] and stream_events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in stream_events[:-1]]
    assert {c["system_fingerprint"] for c in chunks} == {"v1"}
    assert sum(1 for c in chunks if c["choices"] and (c["choices"][0]["delta"].get("content")
                                                      or c["choices"][0]["delta"].get("reasoning_content"))) > 0

    swaps = _audit_rows(appliance, "serve.swap")
    assert len(swaps) == swaps_before + 1  # one swap, audited once
    assert (swaps[-1]["from"], swaps[-1]["to"]) == ("v1", "v2") and swaps[-1]["run"] == appliance.runs["qa2"]
    assert swap.metric(f'airlock_model_loads_total{{model="{TASK}",result="ok"}}') == loads_before + 1
    # Version 2 was optimized: it serves from its ONNX export on ONNX Runtime, version 1 from PyTorch.
    assert swap.metric(f'airlock_model_info{{model="{TASK}",version="v2",backend="ort-cpu",kind="lm"}}') == 1
    served = swap.served()
    assert served["backend"] == "ort-cpu" and served["backend_reason"].startswith("ONNX Runtime on the CPU")


def test_onnx_runtime_answers_exactly_like_pytorch(swap, appliance):
    """The served v2 (ONNX Runtime) against the same run loaded here in PyTorch: same greedy and seeded text."""
    from appliance.catalog import open_catalog
    from appliance.registry.versions import get_version
    from appliance.serve.backends import Sampling
    from appliance.serve.decoding import complete, encode_chat
    from appliance.serve.models import Target, load_model
    from appliance.vault.lifecycle import keys_for

    serve_version(swap, appliance, "v2")
    db = open_catalog(appliance.home)
    v2 = get_version(db, f"{TASK}-v2")  # by its id: the very version served, whatever production becomes later
    assert v2.run_id == appliance.runs["qa2"]
    local = load_model(db, keys_for(db, appliance.home), appliance.home, TASK, Target(v2.id, v2.run_id, "v2"),
                       device="cpu", backend="pytorch")
    db.close()
    assert local.backend.kind == "pytorch"
    messages = [{"role": "user", "content": CHAT["messages"][0]["content"]}]
    for sampling in (Sampling(max_new_tokens=24, temperature=0.0), Sampling(max_new_tokens=24, temperature=0.8,
                                                                             top_p=0.9, seed=77)):
        expected = complete(local.backend, local.tokenizer, encode_chat(local.tokenizer, messages, limit=4096),
                            sampling, stops=(), eos_ids=frozenset(), should_stop=lambda: False, reasoning=True)
        served = httpx.post(f"{swap.url}/v1/chat/completions", timeout=60, headers=swap.headers(),
                            json={"model": TASK, "messages": messages, "max_tokens": 24, "ignore_eos": True,
                                  "temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "seed": sampling.seed})
        assert served.headers["X-Airlock-Model"] == f"{TASK}@v2"
        assert served.headers["X-Airlock-Backend"] == "ort-cpu"
        message = served.json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (expected.reasoning, expected.text)


def test_a_version_that_cannot_load_leaves_the_old_one_serving(swap, appliance):
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote

    serve_version(swap, appliance, "v2")
    failed = f'airlock_model_loads_total{{model="{TASK}",result="failed"}}'
    failed_before = swap.metric(failed, default=0)
    before = httpx.post(f"{swap.url}/v1/chat/completions", json=SWAP_CHAT, headers=swap.headers(), timeout=60)
    assert before.headers["X-Airlock-Model"] == f"{TASK}@v2"
    assert appliance.cli("vault", "lock").returncode == 0
    try:
        db = open_catalog(appliance.home)
        promote(db, f"{TASK}-v1", actor="test", reason="roll back while the vault is locked")
        db.close()
        _wait(lambda: swap.metric(failed, default=0) >= failed_before + 1, 60, "the failed load to be reported")
        after = httpx.post(f"{swap.url}/v1/chat/completions", json=SWAP_CHAT, headers=swap.headers(), timeout=60)
        assert after.status_code == 200 and after.headers["X-Airlock-Model"] == f"{TASK}@v2"
        row = _audit_rows(appliance, "serve.load_failed")[-1]
        assert row["version"] == "v1" and row["serving"] == "v2"
        assert "vault is locked" in row["error"]
        assert '"event": "model_load_failed"' in swap.server.log()
    finally:
        unlocked = appliance.cli("vault", "unlock", "--passphrase-file", str(appliance.passphrase_file))
        assert unlocked.returncode == 0, unlocked.stderr
        # The registry names the served version again, so the server has nothing left to retry.
        db = open_catalog(appliance.home)
        promote(db, f"{TASK}-v2", actor="test", reason="back to the version served")
        db.close()
