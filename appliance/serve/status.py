"""The inference server as the operator UI sees it: serve jobs, their address, and live numbers from /metrics.

    servers(db)                                  -> [ServerStatus]  serve jobs, running ones first
    start_server_job(db, tasks=[...], runs=[...], host=..., port=..., actor=...) -> Job   (`airlock serve --detach`)
    monitor_secret(db, keys, home)               -> str | None      the UI's key for /metrics (encrypted in the vault)
    create_monitor_key(db, keys, home, actor=...) -> ApiKey         an admin makes it once
    sample = read_metrics(url, secret)           -> MetricsSample   one scrape of /metrics
    live = traffic(previous, sample)             -> Traffic         requests/s, mean and p95 latency between two scrapes

/metrics answers any valid API key. The UI's own key (`airlock-monitor`) is limited to a model
name that no task can have (task names are lowercase), so it reads /metrics and nothing else;
its secret is kept encrypted in the vault like the models, so every logged-in operator's UI can
use it and nobody has to paste a key.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import AirlockError
from appliance.serve.api_keys import METRICS_ONLY

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.jobs.records import Job
    from appliance.serve.api_keys import ApiKey
    from appliance.vault.keys import KeyOps

MONITOR_KEY_NAME = "airlock-monitor"
MONITOR_SCOPE = METRICS_ONLY
"""The one model the monitoring key may use: uppercase, so never a registry task (nor a served task)."""
MONITOR_OBJECT_PREFIX = "serve-monitor-"
MONITOR_FILE = "key"
SCRAPE_TIMEOUT_S = 3.0


class MetricsUnavailable(AirlockError):
    """/metrics could not be read (server not answering, or the monitoring key refused)."""


@dataclass(frozen=True)
class ServerStatus:
    job: Job
    url: str | None
    """Where it listens (from the job's 'listening on' event); None before it bound its socket."""
    tasks: list[str]
    runs: list[str]
    """NAME=RUN entries."""
    host: str
    port: int

    @property
    def running(self) -> bool:
        return self.job.state in ("queued", "running")

    @property
    def models(self) -> list[str]:
        return [*self.tasks, *(r.split("=", 1)[0] for r in self.runs)]


def servers(db: sqlite_utils.Database, limit: int = 20) -> list[ServerStatus]:
    """Serve jobs, those still running (or starting) first, then the newest that ended."""
    from appliance.jobs.records import events, get_job

    rows = db.execute("SELECT id FROM jobs WHERE kind = 'serve' ORDER BY"
                      " CASE WHEN state IN ('queued', 'running') THEN 0 ELSE 1 END, created_at DESC LIMIT ?",
                      [limit]).fetchall()
    out = []
    for (job_id,) in rows:
        job = get_job(db, job_id)
        url = next((e.data["url"] for e in reversed(events(db, job_id, kind="progress")) if e.data.get("url")), None)
        params = job.params
        out.append(ServerStatus(job, url, list(params.get("tasks", [])), list(params.get("runs", [])),
                                str(params.get("host", "")), int(params.get("port", 0))))
    return out


def start_server_job(db: sqlite_utils.Database, *, tasks: Sequence[str] = (), runs: Sequence[str] = (),
                     host: str = "127.0.0.1", port: int = 8080, device: str = "auto", backend: str = "auto",
                     actor: str | None = None) -> Job:
    """`airlock serve --detach`: the same options, checked the same way, started as a `serve` job."""
    from appliance.jobs.runner import start_job
    from appliance.serve.models import TaskSource, parse_run_option
    from appliance.serve.server import ServeOptions

    options = ServeOptions((*(parse_run_option(r) for r in runs), *(TaskSource(t) for t in tasks)), host=host,
                           port=port, device=device, backend=backend)
    for source in options.sources:
        if isinstance(source, TaskSource) and source.resolve(db) is None:
            from appliance.serve.errors import ServeError

            raise ServeError(f"task {source.name!r} has no production version",
                             hint=f"promote one first (Models screen, or `airlock models promote {source.name}-vN`), "
                                  "or serve a run")
    return start_job(db, "serve", options.to_params(), device=device if device.startswith("cuda") else "cpu",
                     actor=actor)


# --- the monitoring key ----------------------------------------------------------------------------------------------

def monitor_secret(db: sqlite_utils.Database, keys: KeyOps, home: Path) -> str | None:
    """The active monitoring key's secret, decrypted from the vault; None when there is none."""
    from appliance.serve.api_keys import find_active
    from appliance.vault.store import list_files, read_bytes

    found = find_active(db, MONITOR_KEY_NAME)
    if found is None:
        return None
    object_id = MONITOR_OBJECT_PREFIX + found.key_id
    if MONITOR_FILE not in list_files(home, object_id):
        return None
    return read_bytes(db, keys, home, object_id, MONITOR_FILE).decode("ascii")


def create_monitor_key(db: sqlite_utils.Database, keys: KeyOps, home: Path, *, actor: str | None) -> ApiKey:
    """A new monitoring key (the old one, if any, revoked), its secret stored encrypted in the vault."""
    from appliance.serve.api_keys import create_key, find_active, revoke_key
    from appliance.vault.store import create_object, write_bytes

    if find_active(db, MONITOR_KEY_NAME) is not None:
        revoke_key(db, MONITOR_KEY_NAME, actor=actor)
    found, secret = create_key(db, MONITOR_KEY_NAME, [MONITOR_SCOPE], actor=actor)
    object_id = MONITOR_OBJECT_PREFIX + found.key_id
    create_object(db, keys, object_id, "apikey")
    write_bytes(db, keys, home, object_id, MONITOR_FILE, secret.encode("ascii"))
    return found


# --- /metrics --------------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class MetricsSample:
    at: float
    """time.monotonic() of the scrape."""
    requests: float
    errors: float
    duration_sum: float
    duration_count: float
    buckets: dict[float, float]
    """Upper bound (s) -> requests at most that long, summed over endpoints (cumulative, Prometheus style)."""
    inflight: float
    models: list[dict[str, str]] = field(default_factory=list)
    """{model, version, backend, kind} of each model the server has loaded now."""


def parse_metrics(text: str, at: float | None = None) -> MetricsSample:
    """The numbers the UI shows, from Prometheus text. /metrics itself is excluded from the request counts."""
    requests = errors = duration_sum = duration_count = inflight = 0.0
    buckets: dict[float, float] = {}
    models: list[dict[str, str]] = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        name, labels_text, value_text = match.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        try:
            value = float(value_text)
        except ValueError:
            continue
        if labels.get("endpoint") == "metrics":
            continue
        if name == "airlock_requests_total":
            requests += value
        elif name == "airlock_request_errors_total":
            errors += value
        elif name == "airlock_request_duration_seconds_sum":
            duration_sum += value
        elif name == "airlock_request_duration_seconds_count":
            duration_count += value
        elif name == "airlock_request_duration_seconds_bucket":
            bound = math.inf if labels.get("le") == "+Inf" else float(labels.get("le", "inf"))
            buckets[bound] = buckets.get(bound, 0.0) + value
        elif name == "airlock_inflight_requests":
            inflight = value
        elif name == "airlock_model_info":
            models.append({k: labels.get(k, "") for k in ("model", "version", "backend", "kind")})
    return MetricsSample(time.monotonic() if at is None else at, requests, errors, duration_sum, duration_count,
                         buckets, inflight, models)


def read_metrics(url: str, secret: str, *, timeout_s: float = SCRAPE_TIMEOUT_S) -> MetricsSample:
    """One scrape of the server's /metrics (standard library only: httpx is not installed on appliances).

    A TLS server's certificate is not verified: the UI scrapes the server this machine started."""
    import ssl
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise MetricsUnavailable(f"server address {url!r} is not http(s)", hint="see the server's job log")
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {secret}"})  # noqa: S310
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:  # noqa: S310
            text = response.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise MetricsUnavailable("the server refused the monitoring key (revoked?)",
                                     hint="an admin creates a new one on the Serve screen (m)") from None
        raise MetricsUnavailable(f"/metrics answered {exc.code}", hint="see the server's job log") from None
    except (urllib.error.URLError, OSError) as exc:
        raise MetricsUnavailable(f"the server at {url} does not answer ({type(exc).__name__})",
                                 hint="it may still be loading its models; see its job log") from None
    return parse_metrics(text)


@dataclass(frozen=True)
class Traffic:
    requests_per_s: float
    mean_latency_ms: float | None
    p95_latency_ms: float | None
    """Upper bound of the histogram bucket holding the 95th percentile (None without requests)."""
    errors: float
    requests: float
    inflight: float


def traffic(previous: MetricsSample | None, current: MetricsSample) -> Traffic:
    """Request rate and latency between two scrapes (since the server started when there is no previous one)."""
    base = previous or MetricsSample(current.at, 0, 0, 0, 0, {}, 0)
    seconds = current.at - base.at
    count = current.duration_count - base.duration_count
    rate = (current.requests - base.requests) / seconds if previous is not None and seconds > 0 else 0.0
    mean = (current.duration_sum - base.duration_sum) / count * 1000 if count > 0 else None
    p95 = None
    if count > 0:
        for bound in sorted(current.buckets):
            if current.buckets[bound] - base.buckets.get(bound, 0.0) >= 0.95 * count:
                p95 = bound * 1000 if math.isfinite(bound) else None
                break
    return Traffic(max(rate, 0.0), mean, p95, current.errors, current.requests, current.inflight)


def describe(status: ServerStatus) -> dict[str, Any]:
    """A plain summary for logs and JSON: never the monitoring key."""
    return {"job": status.job.id, "state": status.job.state, "url": status.url, "models": status.models}
