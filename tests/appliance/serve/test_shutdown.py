"""The last test of the serving suite: SIGTERM on the shared foreground server drains a stream in flight
and exits 0; its request log never held a prompt, an output, a key or a file's contents."""

from __future__ import annotations

import json
import threading

import httpx

from tests.appliance.serve.conftest import MARKER


def test_sigterm_drains_in_flight_stream_and_logs_hold_no_contents(server, appliance):
    key = appliance.keys["client"]
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=180) as client, client.stream(
                "POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
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
    assert requests  # the whole suite leaves dozens; this test alone leaves one
    for line in requests:
        assert set(line) >= {"id", "key", "endpoint", "status", "bytes_in", "bytes_out", "ms", "model"}
    assert requests[-1]["endpoint"] == "completions" and requests[-1]["completion_tokens"] == 300
    assert {r["key"] for r in requests if r["status"] == 401} <= {"-", "doomed"}
    assert MARKER not in log
    for secret in appliance.keys.values():
        assert secret not in log
    outputs = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(outputs).strip() and "".join(outputs).strip() not in log

    from appliance.audit import iter_audit
    from appliance.catalog import open_catalog

    db = open_catalog(appliance.home)
    stops = [e for e in iter_audit(db, action="serve.stop") if e.details["url"] == server.url]
    db.close()
    assert len(stops) == 1 and stops[0].details["requests"] == len(requests)
