"""Prometheus text metrics, kept in memory (no client library: a few counters and one histogram).

    airlock_requests_total{endpoint,status}            requests answered
    airlock_request_duration_seconds{endpoint}        latency histogram (to the last byte)
    airlock_request_errors_total{endpoint,code}       refused or failed requests, by short code
    airlock_tokens_total{model,type}                  prompt and completion tokens
    airlock_model_info{model,version,backend,kind}    1 per served model: the version now serving
    airlock_model_loads_total{model,result}           hot-swap loads: ok / failed
    airlock_batch_rows{model}, airlock_batch_steps_total{model}, airlock_batch_rows_decoded_total{model}
                                                      continuous batching: rows now, steps, tokens decoded
    airlock_inflight_requests, airlock_running_requests

Labels are route names, status codes and model names: never anything a client wrote.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(**labels: Any) -> str:
    def escape(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.loads: Counter[tuple[str, str]] = Counter()
        self._buckets: dict[str, list[int]] = {}
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

    def observe_request(self, endpoint: str, status: int, seconds: float, code: str | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if code:
                self.errors[(endpoint, code)] += 1
            buckets = self._buckets.setdefault(endpoint, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self._sums[endpoint] += seconds
            self._counts[endpoint] += 1

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.tokens[(model, "prompt")] += prompt
            self.tokens[(model, "completion")] += completion

    def model_load(self, model: str, ok: bool) -> None:
        with self._lock:
            self.loads[(model, "ok" if ok else "failed")] += 1

    def render(self, models: Iterable[Any], inflight: int, running: int, *,
               allows: Callable[[str], bool] = lambda name: True) -> str:
        """Prometheus text. `allows(model name)`: per-model series only for models the asking key may
        use (a key limited to one task learns nothing about the others)."""
        lines: list[str] = []
        models = [m for m in models if allows(m.name)]

        def family(name: str, kind: str, help_text: str) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])

        with self._lock:
            family("airlock_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f"airlock_requests_total{_labels(endpoint=endpoint, status=status)} {n}")
            family("airlock_request_errors_total", "counter", "Requests refused or failed, by endpoint and code.")
            for (endpoint, code), n in sorted(self.errors.items()):
                lines.append(f"airlock_request_errors_total{_labels(endpoint=endpoint, code=code)} {n}")
            family("airlock_request_duration_seconds", "histogram", "Time from request to last byte.")
            for endpoint, buckets in sorted(self._buckets.items()):
                for bound, n in zip(BUCKETS, buckets, strict=True):
                    lines.append(f"airlock_request_duration_seconds_bucket{_labels(endpoint=endpoint, le=bound)} {n}")
                count = self._counts[endpoint]
                lines.append(f"airlock_request_duration_seconds_bucket{_labels(endpoint=endpoint, le='+Inf')} "
                             f"{count}")
                lines.append(f"airlock_request_duration_seconds_sum{_labels(endpoint=endpoint)} "
                             f"{self._sums[endpoint]:.6f}")
                lines.append(f"airlock_request_duration_seconds_count{_labels(endpoint=endpoint)} {count}")
            family("airlock_tokens_total", "counter", "Tokens processed, by model and type (prompt/completion).")
            for (model, kind), n in sorted(self.tokens.items()):
                if not allows(model):
                    continue
                lines.append(f"airlock_tokens_total{_labels(model=model, type=kind)} {n}")
            family("airlock_model_loads_total", "counter", "Model loads while serving (hot swap), by result.")
            for (model, result), n in sorted(self.loads.items()):
                if not allows(model):
                    continue
                lines.append(f"airlock_model_loads_total{_labels(model=model, result=result)} {n}")
        family("airlock_model_info", "gauge", "The version and backend serving each model (value 1).")
        for m in sorted(models, key=lambda m: m.name):
            info = _labels(model=m.name, version=m.version, backend=m.backend.kind, kind=m.kind)
            lines.append(f"airlock_model_info{info} 1")
        batched = [m for m in sorted(models, key=lambda m: m.name) if hasattr(m.backend, "rows_decoded")]
        if batched:
            family("airlock_batch_rows", "gauge", "Requests in the model's running batch now.")
            lines += [f"airlock_batch_rows{_labels(model=m.name)} {m.backend.rows}" for m in batched]
            family("airlock_batch_steps_total", "counter", "Batched decode steps (one forward pass each).")
            lines += [f"airlock_batch_steps_total{_labels(model=m.name)} {m.backend.steps}" for m in batched]
            family("airlock_batch_rows_decoded_total", "counter",
                   "Tokens decoded by batched steps; divided by the steps, the mean batch size.")
            lines += [f"airlock_batch_rows_decoded_total{_labels(model=m.name)} {m.backend.rows_decoded}"
                      for m in batched]
        family("airlock_inflight_requests", "gauge", "Requests admitted (running or waiting for a worker).")
        lines.append(f"airlock_inflight_requests {inflight}")
        family("airlock_running_requests", "gauge", "Requests running on a model now.")
        lines.append(f"airlock_running_requests {running}")
        return "\n".join(lines) + "\n"
