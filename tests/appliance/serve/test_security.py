"""What the server refuses, and how: keys (missing, invalid, revoked, another task's), sizes, malformed
JSON and files, a DICOM that lies about its length, overload (429/503 with Retry-After), and logs
that hold no prompt text."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx

from tests.appliance.serve.conftest import MARKER
from tests.appliance.serve.test_api import make_dicom

CHAT = {"model": "qa", "messages": [{"role": "user", "content": f"Status of pump {MARKER}?"}], "max_tokens": 4}


def _post(server, path: str, key: str | None, *, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60, **kwargs)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert "\n" not in error["message"] and MARKER not in error["message"]
    return error["message"]


def test_keys_missing_invalid_revoked_and_for_another_task(server, appliance):
    good = appliance.keys["client"]
    missing = _post(server, "/v1/chat/completions", None, json=CHAT)
    _error(missing, 401, "missing_api_key")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    _error(_post(server, "/v1/chat/completions", "sk-not-ours", json=CHAT), 401, "invalid_api_key")
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")  # right key id, wrong secret
    _error(_post(server, "/v1/chat/completions", forged, json=CHAT), 401, "invalid_api_key")
    _error(httpx.get(f"{server.url}/metrics", timeout=10), 401, "missing_api_key")
    assert _post(server, "/v1/chat/completions", good, json=CHAT).status_code == 200

    # A key limited to the classifier may not use the language model, and does not see it listed.
    scoped = appliance.keys["xray-only"]
    message = _error(_post(server, "/v1/chat/completions", scoped, json=CHAT), 403, "model_not_allowed")
    assert "xray-only" in message and "qa" in message
    listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {scoped}"}, timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["xray"]

    # Revoked through the CLI: refused from the next request on, without restarting the server.
    doomed = appliance.create_key("doomed")
    assert _post(server, "/v1/chat/completions", doomed, json=CHAT).status_code == 200
    revoked = appliance.cli("keys", "revoke", "doomed")
    assert revoked.returncode == 0, revoked.stderr
    _error(_post(server, "/v1/chat/completions", doomed, json=CHAT), 401, "revoked_api_key")
    again = appliance.cli("keys", "revoke", "doomed")
    assert again.returncode == 2 and again.stderr.splitlines() == [
        "error: no active API key named 'doomed' (it was revoked already)",
        "hint: list keys with `airlock keys list`"]
    taken = appliance.cli("keys", "create", "client")
    assert taken.returncode == 2 and "an active API key named 'client' already exists" in taken.stderr
    assert "hint: pick another name, or revoke it first" in taken.stderr
    listing = appliance.cli_json("keys", "list", "--json")["keys"]
    assert {k["name"]: k["state"] for k in listing}["doomed"] == "revoked"
    assert all("secret" not in k and "key_hash" not in k for k in listing)
    # Only SHA-256 hashes are stored: the key itself is nowhere in the catalog.
    catalog = (appliance.home / "catalog.db").read_bytes() + (appliance.home / "catalog.db-wal").read_bytes()
    assert doomed.encode() not in catalog and good.encode() not in catalog


def test_bad_requests_get_one_clear_line(server, appliance):
    key = appliance.keys["client"]
    message = _error(_post(server, "/v1/chat/completions", key, content=b'{"model": "qa", "messages": [',
                           headers={"Content-Type": "application/json"}), 400, "invalid_json")
    assert "not valid JSON" in message
    _error(_post(server, "/v1/chat/completions", key, content=b"\xff\xfe\x00"), 400, "invalid_json")
    _error(_post(server, "/v1/chat/completions", key, json=[1, 2]), 400, "invalid_json")
    _error(_post(server, "/v1/chat/completions", key, json={**CHAT, "max_tokens": 100_000}), 400, "invalid_request")
    _error(_post(server, "/v1/chat/completions", key, json={**CHAT, "temperature": "hot"}), 400, "invalid_request")
    _error(_post(server, "/v1/chat/completions", key, json={**CHAT, "n": 3}), 400, "invalid_request")
    _error(_post(server, "/v1/chat/completions", key, json={**CHAT, "messages": [{"role": "robot", "content": "x"}]}),
           400, "invalid_request")
    _error(_post(server, "/v1/chat/completions", key, json={**CHAT, "model": "gpt-4"}), 404, "model_not_found")
    _error(_post(server, "/v1/completions", key, json={"model": "xray", "prompt": "x"}), 400, "wrong_model_kind")
    long_prompt = {"model": "qa", "prompt": "pump valve " * 5000, "max_tokens": 1}
    _error(_post(server, "/v1/completions", key, json=long_prompt), 400, "prompt_too_long")
    too_big = {**CHAT, "messages": [{"role": "user", "content": MARKER + "x" * (2 << 20)}]}
    message = _error(_post(server, "/v1/chat/completions", key, json=too_big), 413, "body_too_large")
    assert str(1 << 20) in message
    _error(httpx.get(f"{server.url}/v1/nothing-here", timeout=10), 404, "no_such_endpoint")


def test_a_1_gb_content_length_is_refused_before_reading(server, appliance):
    """Raw HTTP: a Content-Length of 1 GiB and no body. The answer comes at once; the connection closes."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(b"POST /v1/classify?model=xray HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + appliance.keys["client"].encode() + b"\r\nContent-Length: 1073741824\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head = reply.split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 413 Request Entity Too Large", reply[:300]
    assert b"body_too_large" in reply


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_classify_refuses_non_images_and_a_dicom_declaring_1_gb(server, appliance):
    import struct

    key = appliance.keys["client"]
    _error(_post(server, "/v1/classify?model=xray", key, content=b"%PDF-1.7 not an image" * 50), 415,
           "unsupported_file")
    _error(_post(server, "/v1/classify?model=xray", key, content=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), 400,
           "bad_image")
    dicom = make_dicom()
    _error(_post(server, "/v1/classify?model=xray", key, content=dicom[:700]), 400, "dicom_length")

    # Pixel Data (7FE0,0010) OW, whose 4-byte length now says 1 GiB; the file itself stays ~3 KB.
    at = dicom.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")
    forged = dicom[:at + 8] + struct.pack("<I", 1 << 30) + dicom[at + 12:]
    before = _peak_rss_mb(server.process.pid)
    message = _error(_post(server, "/v1/classify?model=xray", key, content=forged), 400, "dicom_length")
    assert "1073741824" in message
    assert _peak_rss_mb(server.process.pid) - before < 200  # nothing near 1 GiB was ever allocated
    assert _post(server, "/v1/classify?model=xray", key, content=dicom).status_code == 200  # and it still serves


def _metric(server, appliance, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {appliance.keys['client']}"},
                     timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def _wait_metric(server, appliance, name: str, value: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _metric(server, appliance, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_overload_answers_429_per_key_and_503_for_the_server_with_retry_after(server, appliance):
    """The server runs 2 requests (--max-batch 2), lets 2 wait, and takes 2 per key; a closed stream frees its row."""
    long_stream = {**CHAT, "max_tokens": 1024, "ignore_eos": True, "stream": True}
    release = threading.Event()
    results: dict[str, int] = {}
    streaming: dict[str, threading.Event] = {}

    def hold(name: str, key: str) -> None:
        with httpx.Client(timeout=120) as client, client.stream(
                "POST", f"{server.url}/v1/chat/completions", json=long_stream,
                headers={"Authorization": f"Bearer {key}"}) as response:
            results[name] = response.status_code
            for _ in response.iter_lines():
                streaming[name].set()
                if release.is_set():
                    break  # closing the connection cancels the generation at its next token

    threads = []
    try:
        # Two streams take both batch rows, two more wait: loader has 2 requests in, the server 4.
        for name, key_name in (("loader-1", "loader"), ("other-1", "other"), ("loader-2", "loader"),
                               ("fourth-1", "fourth")):
            streaming[name] = threading.Event()
            threads.append(threading.Thread(target=hold, args=(name, appliance.keys[key_name])))
            threads[-1].start()
            _wait_metric(server, appliance, "airlock_inflight_requests", len(threads))
        assert streaming["loader-1"].wait(60) and streaming["other-1"].wait(60)
        assert _metric(server, appliance, "airlock_running_requests") == 2
        per_key = _post(server, "/v1/chat/completions", appliance.keys["loader"], json=CHAT)
        message = _error(per_key, 429, "key_concurrency")
        assert "loader" in message and int(per_key.headers["Retry-After"]) >= 1
        overloaded = _post(server, "/v1/chat/completions", appliance.keys["third"], json=CHAT)
        _error(overloaded, 503, "overloaded")
        assert int(overloaded.headers["Retry-After"]) >= 1
    finally:
        release.set()
        for thread in threads:
            thread.join(120)
    assert results == {"loader-1": 200, "other-1": 200, "loader-2": 200, "fourth-1": 200}
    _wait_metric(server, appliance, "airlock_inflight_requests", 0)
    assert _post(server, "/v1/chat/completions", appliance.keys["third"], json=CHAT).status_code == 200


def test_binding_beyond_loopback_without_tls_warns(appliance):
    """The warning comes before anything loads or binds (here the run does not exist, so nothing does)."""
    host = "0.0.0.0"  # noqa: S104 - the point of the test; the command fails before it binds
    result = appliance.cli("serve", "--host", host, "--port", "0", "--run", "no-such-run")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"warning: serving on {host} without TLS")
    assert lines[1].startswith("hint: pass --tls-cert and --tls-key")
    assert "error: cannot serve no-such-run" in result.stderr and "no training run" in result.stderr


def test_metrics_list_only_the_models_a_key_may_use(server, appliance):
    """Attack (issue 20, item 7): a key limited to one task reads /metrics to learn the other models."""
    def metrics(key: str) -> str:
        response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {appliance.keys[key]}"},
                             timeout=10)
        assert response.status_code == 200
        return response.text

    limited = metrics("xray-only")
    assert 'model="xray"' in limited and 'model="qa"' not in limited
    assert 'airlock_model_info{model="qa"' in metrics("client")


def test_classify_refuses_before_it_reads_the_body(server, appliance):
    """Attack (issue 20, item 7): uploads buffered before the model and admission checks. The client
    declares a large body and sends none of it: the refusal must come at once, not after the
    server waited for (and would have buffered) the body."""
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall((f"POST /v1/classify?model=qa HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Authorization: Bearer {appliance.keys['xray-only']}\r\n"
                      "Content-Type: application/octet-stream\r\nContent-Length: 4000000\r\n\r\n").encode())
        started = time.monotonic()
        head = ""
        while "model_not_allowed" not in head and time.monotonic() - started < 10:
            chunk = conn.recv(4096).decode("latin-1")
            if not chunk:
                break
            head += chunk
    assert head.startswith("HTTP/1.1 403") and "model_not_allowed" in head
    assert time.monotonic() - started < 5  # the body timeout is far longer; margin: answered in ms here
