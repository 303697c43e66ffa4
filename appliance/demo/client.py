"""The demo's HTTP client: what a site's application does, with the standard library only.

    server = ServerClient("http://127.0.0.1:43511", api_key)
    reply, seconds = server.chat("site-qa", "Which lockout procedure applies to the CNC mill 4?")
    result, seconds = server.classify("phantom-ct", Path("scan.dcm").read_bytes())
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

from appliance.demo.steps import DemoError


class ServerClient:
    def __init__(self, url: str, api_key: str, timeout: float = 120) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if body is not None:
            headers["Content-Type"] = content_type
        # Only the http://127.0.0.1:PORT the server job reported (never a file: or other scheme).
        request = urllib.request.Request(self.url + path, data=body, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise DemoError(f"the server answered {exc.code} to {path}: {detail}",
                            hint="see the server job's log: `airlock jobs logs JOB`") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DemoError(f"cannot reach the server at {self.url}{path}: {exc}",
                            hint="the server job may have stopped; see `airlock jobs list`") from None

    def models(self) -> list[dict[str, Any]]:
        return self._request("/v1/models")["data"]

    def chat(self, model: str, question: str, max_tokens: int = 72) -> tuple[dict[str, Any], float]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                           "max_tokens": max_tokens, "temperature": 0}).encode()
        started = time.perf_counter()
        reply = self._request("/v1/chat/completions", body)
        return reply, time.perf_counter() - started

    def classify(self, model: str, image: bytes) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        result = self._request(f"/v1/classify?model={model}", image, "application/dicom")
        return result, time.perf_counter() - started


def median_latency(call: Any, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `call()` (which returns (result, seconds)) after a warm-up."""
    for _ in range(warmup):
        call()
    return statistics.median(call()[1] for _ in range(repeats))
