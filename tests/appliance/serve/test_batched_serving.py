"""One application, 32 users, one API key, default limits: every request is served (no 429), each one exactly
as it is served alone, through the official `openai` client against a real `airlock serve`.

The server batches run qa1 in PyTorch (task qa) and run qa2's ONNX export on ONNX Runtime (model `onnx`);
32 users ask each at once (64 requests in flight on one key: the default per-key limit is 2 x --max-batch).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.appliance.serve.conftest import Server

QUESTIONS = ["Why does pump P4 cavitate?", "The compressor C2 shows intermittent stop. What should I check first?",
             "Valve V3 sticks.", "List the steps to restart line 2 after an emergency stop, in order.", "Hi",
             "What torque for the flange bolts of heat exchanger E-101?", "Belt B7 slips under load.",
             "Is the alarm on tank T9 a sensor fault or a real overflow? Say how to tell them apart."]


def _requests() -> list[dict]:
    """32 different requests: greedy and seeded sampling, stop sequences, lengths 6-20, chat and completions,
    half of them streamed."""
    requests = []
    for i in range(32):
        question = QUESTIONS[i % len(QUESTIONS)]
        request: dict = {"max_tokens": 6 + (i * 7) % 15, "stream": i % 2 == 1}
        if i % 4 == 3:
            request.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        else:
            request.update(temperature=0)
        if i % 5 == 4:
            request["stop"] = ["e"]  # the tiny model writes an "e" within a few tokens: a stop mid-batch
        if i % 8 == 6:
            request["prompt"] = f"Maintenance log, {question}"
        else:
            request["messages"] = [{"role": "user", "content": question}]
        requests.append(request)
    return requests


def _ask(client, model: str, request: dict) -> tuple[str, str, str, int]:
    """(reasoning, content, finish reason, completion tokens) of one request, streamed or not."""
    request = {**request, "model": model}
    streamed = request.pop("stream")
    chat = "messages" in request
    create = client.chat.completions.create if chat else client.completions.create
    if not streamed:
        response = create(**request)
        choice = response.choices[0]
        if not chat:
            return "", choice.text, choice.finish_reason, response.usage.completion_tokens
        return (getattr(choice.message, "reasoning_content", None) or "", choice.message.content or "",
                choice.finish_reason, response.usage.completion_tokens)
    reasoning, content, finish, tokens = "", "", "", -1
    for chunk in create(**request, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if chat:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
        else:
            content += choice.text or ""
        finish = choice.finish_reason or finish
    return reasoning, content, finish, tokens


def _metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_32_users_on_one_key_are_all_served_each_as_if_alone(appliance, tmp_path_factory):
    openai = pytest.importorskip("openai", reason="the `openai` package is not installed in this venv")
    import httpx

    from appliance.catalog import open_catalog
    from appliance.serve.api_keys import create_key

    db = open_catalog(appliance.home)
    try:
        key = create_key(db, "one-app", (), actor="test")[1]
    finally:
        db.close()
    server = Server(appliance, "--task", "qa", "--run", f"onnx={appliance.runs['qa2']}",  # default limits
                    log_path=tmp_path_factory.mktemp("batched-log") / "server.log")
    try:
        # No retries: a 429 or 503 must surface, not be retried away.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)
        listed = {m.id: m.airlock for m in client.models.list()}
        assert (listed["qa"]["backend"], listed["onnx"]["backend"]) == ("pytorch", "ort-cpu")
        assert listed["qa"]["max_batch"] == listed["onnx"]["max_batch"] == 32
        work = [(model, request) for request in _requests() for model in ("qa", "onnx")]
        alone = [_ask(client, model, request) for model, request in work]  # one at a time: batches of one
        with ThreadPoolExecutor(len(work)) as pool:
            together = list(pool.map(lambda item: _ask(client, *item), work))
        for (model, request), single, batched in zip(work, alone, together, strict=True):
            assert batched == single, (model, request)
            assert 1 <= batched[3] <= request["max_tokens"]
        assert {result[2] for result in together} >= {"length", "stop"}
        # The requests shared forward passes: more rows decoded than steps taken, on both backends.
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
        for model in ("qa", "onnx"):
            assert _metric(metrics, "airlock_batch_rows_decoded_total", model) > \
                _metric(metrics, "airlock_batch_steps_total", model)
        statuses = [line["status"] for line in server.request_log()
                    if line["endpoint"] in ("chat_completions", "completions")]
        assert statuses == [200] * (2 * len(work))  # not one 429 or 503
    finally:
        server.stop()
