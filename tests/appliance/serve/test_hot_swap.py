"""Hot swap: promoting a version in the registry switches the running server to it with no failed
request; a request in flight finishes on the version it started with; a version that cannot be
loaded (here: the vault was locked meanwhile) leaves the old one serving and is reported."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.appliance.serve.test_security import CHAT, _metric


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
        return [{"object": e.object, **e.details} for e in iter_audit(db, action=action)]
    finally:
        db.close()


def test_promotion_swaps_versions_with_zero_failed_requests(server, appliance):
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote

    key = appliance.keys["client"]
    results: list[tuple[int, str | None, float]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 6})
                    results.append((response.status_code, response.headers.get("X-Airlock-Model"), time.monotonic()))
                except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                    results.append((0, type(exc).__name__, time.monotonic()))

    # A long stream on version 1, started before the promotion: it must finish on version 1.
    stream_versions: list[str] = []
    stream_events: list[str] = []
    first_chunk = threading.Event()

    def long_stream() -> None:
        with httpx.Client(timeout=300) as client, client.stream(
                "POST", f"{server.url}/v1/chat/completions",
                json={**CHAT, "max_tokens": 1024, "ignore_eos": True, "stream": True},
                headers={"Authorization": f"Bearer {appliance.keys['other']}"}) as response:
            stream_versions.append(response.headers["X-Airlock-Model"])
            for line in response.iter_lines():
                if line.startswith("data: "):
                    stream_events.append(line[6:])
                    first_chunk.set()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert first_chunk.wait(120)
    askers = [threading.Thread(target=keep_asking) for _ in range(2)]
    for thread in askers:
        thread.start()
    try:
        _wait(lambda: sum(1 for r in results if r[1] == "qa@v1") >= 3, 120, "answers from v1")
        db = open_catalog(appliance.home)
        promote(db, "qa-v2", actor="test", reason="hot-swap test")
        db.close()
        promoted_at = time.monotonic()
        _wait(lambda: any(r[1] == "qa@v2" for r in results), 120, "the server to switch to v2")
        switched = len(results)
        _wait(lambda: len(results) >= switched + 4, 120, "more answers after the switch")
    finally:
        stop.set()
        for thread in askers:
            thread.join(180)
        streamer.join(300)

    assert [r for r in results if r[0] != 200] == []
    versions = [r[1] for r in sorted(results, key=lambda r: r[2])]
    assert set(versions) == {"qa@v1", "qa@v2"}
    first_v2 = versions.index("qa@v2")
    assert "qa@v1" not in versions[first_v2 + 2:]  # at most the one request in flight on the other thread
    assert all(r[2] > promoted_at for r in results if r[1] == "qa@v2")
    # The stream kept its version to the end, and ended properly.
    assert stream_versions == ["qa@v1"] and stream_events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in stream_events[:-1]]
    assert {c["system_fingerprint"] for c in chunks} == {"v1"}
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 0

    swaps = _audit_rows(appliance, "serve.swap")
    assert swaps[-1]["object"] == "qa" and (swaps[-1]["from"], swaps[-1]["to"]) == ("v1", "v2")
    assert swaps[-1]["run"] == appliance.runs["qa2"]
    assert _metric(server, appliance, 'airlock_model_loads_total{model="qa",result="ok"}') == 1
    # Version 2 was optimized: it serves from its ONNX export on ONNX Runtime, version 1 from PyTorch.
    assert _metric(server, appliance, 'airlock_model_info{model="qa",version="v2",backend="ort-cpu",kind="lm"}') == 1
    listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    qa = next(m for m in listed["data"] if m["id"] == "qa")["airlock"]
    assert qa["backend"] == "ort-cpu" and qa["backend_reason"].startswith("ONNX Runtime on the CPU")


def test_onnx_runtime_answers_exactly_like_pytorch(server, appliance):
    """The served v2 (ONNX Runtime) against the same run loaded here in PyTorch: same greedy and seeded text."""
    from appliance.catalog import open_catalog
    from appliance.serve.backends import Sampling
    from appliance.serve.decoding import complete, encode_chat
    from appliance.serve.models import TaskSource, load_model
    from appliance.vault.lifecycle import keys_for

    db = open_catalog(appliance.home)
    target = TaskSource("qa").resolve(db)
    assert target is not None and target.version == "v2", "runs after the promotion test"
    local = load_model(db, keys_for(db, appliance.home), appliance.home, "qa", target, device="cpu",
                       backend="pytorch")
    db.close()
    assert local.backend.kind == "pytorch"
    messages = [{"role": "user", "content": CHAT["messages"][0]["content"]}]
    for sampling in (Sampling(max_new_tokens=24, temperature=0.0), Sampling(max_new_tokens=24, temperature=0.8,
                                                                             top_p=0.9, seed=77)):
        expected = complete(local.backend, local.tokenizer, encode_chat(local.tokenizer, messages, limit=4096),
                            sampling, stops=(), eos_ids=frozenset(), should_stop=lambda: False)
        served = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                            headers={"Authorization": f"Bearer {appliance.keys['client']}"},
                            json={"model": "qa", "messages": messages, "max_tokens": 24, "ignore_eos": True,
                                  "temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "seed": sampling.seed})
        assert served.headers["X-Airlock-Backend"] == "ort-cpu"
        assert served.json()["choices"][0]["message"]["content"] == expected.text


def test_a_version_that_cannot_load_leaves_the_old_one_serving(server, appliance):
    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote

    key = {"Authorization": f"Bearer {appliance.keys['client']}"}
    before = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=key, timeout=60)
    serving = before.headers["X-Airlock-Model"]
    assert serving == "qa@v2", "runs after the promotion test"
    assert appliance.cli("vault", "lock").returncode == 0
    try:
        db = open_catalog(appliance.home)
        promote(db, "qa-v1", actor="test", reason="roll back while the vault is locked")
        db.close()
        failed = 'airlock_model_loads_total{model="qa",result="failed"}'

        def load_failed() -> bool:
            try:
                return _metric(server, appliance, failed) >= 1
            except StopIteration:  # not exported until the first failure
                return False

        _wait(load_failed, 60, "the failed load to be reported")
        after = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=key, timeout=60)
        assert after.status_code == 200 and after.headers["X-Airlock-Model"] == "qa@v2"
        row = _audit_rows(appliance, "serve.load_failed")[-1]
        assert row["object"] == "qa" and row["version"] == "v1" and row["serving"] == "v2"
        assert "vault is locked" in row["error"]
        assert '"event": "model_load_failed"' in server.log()
    finally:
        unlocked = appliance.cli("vault", "unlock", "--passphrase-file", str(appliance.passphrase_file))
        assert unlocked.returncode == 0, unlocked.stderr
