"""`airlock serve --detach` as a job with TLS: it listens, answers over HTTPS only, and `airlock jobs
cancel` (SIGTERM) lets a stream in flight finish before the job ends `cancelled`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from pathlib import Path

import httpx

from tests.appliance.serve.conftest import MARKER
from tests.appliance.serve.test_security import CHAT


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "airlock-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _job_url(appliance, job_id: str, timeout_s: float = 180) -> str:
    from appliance.catalog import open_catalog
    from appliance.jobs.records import events, get_job

    db = open_catalog(appliance.home)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in events(db, job_id, kind="progress"):
                if "url" in event.data:
                    return event.data["url"]
            job = get_job(db, job_id)
            assert job.state in ("queued", "running"), (job.state, job.error, job.hint)
            time.sleep(0.2)
    finally:
        db.close()
    raise AssertionError(f"job {job_id} never reported its address")


def test_detached_tls_server_drains_a_stream_on_cancel(appliance, tmp_path):
    from appliance.catalog import open_catalog
    from appliance.jobs.runner import wait_for

    cert, key_file = self_signed(tmp_path)
    # A key of its own: the session `server` fixture creates "client", whichever of them runs first.
    key = appliance.keys.get("lifecycle-client") or appliance.create_key("lifecycle-client")
    started = appliance.cli_json("serve", "--detach", "--json", "--port", "0", "--run", f"qa={appliance.runs['qa1']}",
                                 "--tls-cert", str(cert), "--tls-key", str(key_file))
    job_id = started["job"]["id"]
    assert started["job"]["kind"] == "serve" and started["job"]["params"]["tls_cert_file"] == str(cert)
    url = _job_url(appliance, job_id)
    assert url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    headers = {"Authorization": f"Bearer {key}"}

    # TLS only: plain HTTP on the same port gets no answer.
    plain = url.replace("https://", "http://")
    try:
        refused = httpx.get(f"{plain}/healthz", timeout=10).status_code
    except httpx.HTTPError:
        refused = None
    assert refused in (None, 400)
    with httpx.Client(base_url=url, verify=trust, headers=headers, timeout=120) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200 and answer.headers["X-Airlock-Model"] == f"qa@{appliance.runs['qa1']}"

        events: list[str] = []
        first = threading.Event()

        def stream() -> None:
            with client.stream("POST", "/v1/chat/completions",
                               json={**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first.wait(60)
        cancelled = appliance.cli("jobs", "cancel", job_id)  # SIGTERM while the stream is in flight
        assert cancelled.returncode == 0, cancelled.stderr
        streamer.join(180)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # all 400 tokens: the stream was not cut

    db = open_catalog(appliance.home)
    job = wait_for(db, job_id, timeout_s=120)
    db.close()
    assert job.state == "cancelled", (job.error, job.hint)
    assert job.result["requests"] == 2 and job.result["url"] == url
    log = (appliance.home / "jobs" / f"{job_id}.log").read_text()
    assert "without TLS" not in log  # TLS is configured: no warning
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"event": "request"')]
    assert [(r["endpoint"], r["status"]) for r in lines] == [("chat_completions", 200)] * 2
    assert MARKER not in log and key not in log
    try:
        httpx.get(f"{url}/healthz", verify=trust, timeout=5)
        raise AssertionError("the server still answers after the job ended")
    except httpx.ConnectError:
        pass
