"""SIGTERM on a foreground server drains a stream in flight and exits 0; its request log never held a
prompt, an output, a key or a file's contents.

The server is this test's own (the shared one serves the other tests, in whatever order they run): it
first gets the kinds of requests that carry contents (a prompt, a DICOM with a patient name, a body
that is not JSON, a request without a key), each with a marker that must never reach the log."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from tests.appliance.serve.conftest import MARKER, Appliance, Server
from tests.appliance.serve.test_api import make_dicom


@pytest.fixture
def own_server(appliance: Appliance, tmp_path: Path) -> tuple[Server, str]:
    """`airlock serve --task qa --run xray=RUN` for this test alone, and an API key for it."""
    from appliance.catalog import open_catalog
    from appliance.serve.api_keys import create_key

    db = open_catalog(appliance.home)
    try:
        key = create_key(db, "shutdown-client", (), actor="test")[1]
    finally:
        db.close()
    running = Server(appliance, "--task", "qa", "--run", f"xray={appliance.runs['xray']}",
                     log_path=tmp_path / "server.log")
    yield running, key
    running.stop()


def test_sigterm_drains_in_flight_stream_and_logs_hold_no_contents(own_server, appliance):
    server, key = own_server
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "qa", "messages": [{"role": "user", "content": f"Status of pump {MARKER}?"}], "max_tokens": 4}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
        assert client.post("/v1/classify", params={"model": "xray"}, content=make_dicom(),
                           headers=auth).status_code == 200  # the DICOM's patient name holds the marker
        assert client.post("/v1/chat/completions", content=f'{{"prompt": "{MARKER}'.encode(),
                           headers={**auth, "Content-Type": "application/json"}).status_code == 400
        assert client.post("/v1/chat/completions", json=chat).status_code == 401

    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=180) as client, client.stream(
                "POST", f"{server.url}/v1/completions", headers=auth,
                json={"model": "qa", "prompt": f"Log for {MARKER}:", "max_tokens": 300, "ignore_eos": True,
                      "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert first.wait(60)
    assert server.stop(timeout=120) == 0
    streamer.join(60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert any(line.startswith("airlock serve: stopped after") for line in server.stdout)

    log = server.log()
    requests = server.request_log()
    assert [r["status"] for r in requests] == [200, 200, 400, 401, 200]  # each request logged, in order
    for line in requests:
        assert set(line) >= {"id", "key", "endpoint", "status", "bytes_in", "bytes_out", "ms", "model"}
    assert requests[-1]["endpoint"] == "completions" and requests[-1]["completion_tokens"] == 300
    assert {r["key"] for r in requests if r["status"] == 401} == {"-"}
    assert MARKER not in log
    for secret in (key, *appliance.keys.values()):
        assert secret not in log
    outputs = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(outputs).strip() and "".join(outputs).strip() not in log

    from appliance.audit import iter_audit
    from appliance.catalog import open_catalog

    db = open_catalog(appliance.home)
    stops = [e for e in iter_audit(db, action="serve.stop") if e.details["url"] == server.url]
    db.close()
    assert len(stops) == 1 and stops[0].details["requests"] == len(requests)
