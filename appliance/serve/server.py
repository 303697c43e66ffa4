"""Run the inference server: load the models, bind, serve until SIGTERM, shut down gracefully.

    airlock serve --run qa-bot=RUN                  # foreground; Ctrl-C or SIGTERM stops it
    airlock serve --task chest-xray --detach        # a job of kind `serve` (appliance.jobs.runner)

`run_server` is shared by both: it decrypts every model first (a server that cannot load what it
was asked to serve does not start), binds the socket itself (so a port in use is one clear error,
and `--port 0` picks a free one), starts the hot-swap watcher, and hands the socket to uvicorn.
On SIGTERM uvicorn stops accepting connections, lets in-flight requests (streams too) finish for
up to GRACEFUL_SHUTDOWN_S, and the process exits 0; a job ends `cancelled`.

It binds 127.0.0.1 unless told otherwise, and warns when it listens beyond the loopback interface
without TLS: API keys and prompts would cross the network in clear text.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import AirlockError
from appliance.serve.errors import ServeError
from appliance.serve.limits import ServeLimits
from appliance.serve.models import RunSource, ServedModel, Target, TaskSource

if TYPE_CHECKING:
    from appliance.jobs.runner import JobContext

GRACEFUL_SHUTDOWN_S = 30
POLL_INTERVAL_S = 2.0
log = logging.getLogger("airlock.serve")


@dataclass(frozen=True)
class ServeOptions:
    sources: tuple[RunSource | TaskSource, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "auto"
    """auto (cuda:0 when a GPU is visible, else cpu), cpu or cuda:N."""
    backend: str = "auto"
    """auto (the optimize stage's runtime choice for this machine) or pytorch."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    poll_interval_s: float = POLL_INTERVAL_S

    def __post_init__(self) -> None:
        if not self.sources:
            raise ServeError("nothing to serve", hint="name a model: --task TASK (its production version) or "
                                                      "--run RUN (a succeeded training run)")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ServeError(f"model name {duplicates[0]!r} is given twice",
                             hint="serve two runs under different names: --run a=RUN1 --run b=RUN2")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServeError("TLS needs both --tls-cert and --tls-key", hint="pass the certificate chain and its key")
        if self.device not in ("auto", "cpu") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ServeError(f"--device {self.device!r} is not auto, cpu or cuda:N", hint="e.g. --device cuda:0")
        from appliance.serve.models import BACKENDS

        if self.backend not in BACKENDS:
            raise ServeError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}",
                             hint="auto serves the fastest export the optimize stage made; pytorch forces PyTorch")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port {self.port} is not a TCP port", hint="use 1-65535, or 0 for any free port")

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def to_params(self) -> dict[str, Any]:
        """Job parameters (no secrets: TLS files are paths)."""
        limits = self.limits
        return {"host": self.host, "port": self.port, "device": self.device, "backend": self.backend,
                "runs": [f"{s.name}={s.run_id}" for s in self.sources if isinstance(s, RunSource)],
                "tasks": [s.name for s in self.sources if isinstance(s, TaskSource)],
                "tls_cert_file": str(self.tls_cert) if self.tls_cert else None,
                "tls_key_file": str(self.tls_key) if self.tls_key else None,
                "max_batch": limits.max_batch, "workers": limits.workers, "queue_depth": limits.queue_depth,
                "per_key_concurrency": limits.per_key_concurrency, "max_tokens": limits.max_tokens,
                "max_prompt_tokens": limits.max_prompt_tokens}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ServeOptions:
        from appliance.serve.models import parse_run_option

        sources = [*(parse_run_option(r) for r in params.get("runs", [])), *(TaskSource(t) for t in
                                                                             params.get("tasks", []))]
        return cls(tuple(sources), host=params["host"], port=int(params["port"]), device=params.get("device", "auto"),
                   backend=params.get("backend", "auto"),
                   tls_cert=Path(params["tls_cert_file"]) if params.get("tls_cert_file") else None,
                   tls_key=Path(params["tls_key_file"]) if params.get("tls_key_file") else None,
                   limits=ServeLimits(max_batch=int(params.get("max_batch", 1)),  # a job from before batching
                                      workers=int(params.get("workers", 2)),
                                      queue_depth=int(params.get("queue_depth", 32)),
                                      per_key_concurrency=int(params.get("per_key_concurrency", 4)),
                                      max_tokens=int(params.get("max_tokens", 32768)),
                                      max_prompt_tokens=int(params.get("max_prompt_tokens", 4096)),
                                      default_max_tokens=min(256, int(params.get("max_tokens", 32768)))))


def compute_streams(models: list[ServedModel], limits: ServeLimits) -> int:
    """Forward passes that may run at once: one per batched LM, and `workers` when some model does not batch."""
    from appliance.serve.batching import BatchingLMBackend

    batched = sum(isinstance(m.backend, BatchingLMBackend) for m in models)
    unbatched = any(not isinstance(m.backend, BatchingLMBackend) for m in models)
    return max(1, batched + (limits.workers if unbatched else 0))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(options: ServeOptions) -> str | None:
    if options.tls_cert or is_loopback(options.host):
        return None
    return (f"warning: serving on {options.host} without TLS: API keys, prompts and images cross the network "
            "in clear text\nhint: pass --tls-cert and --tls-key, or put a TLS proxy in front and bind 127.0.0.1")


def check_tls(options: ServeOptions) -> None:
    if options.tls_cert is None or options.tls_key is None:
        return
    for path in (options.tls_cert, options.tls_key):
        if not path.is_file():
            raise ServeError(f"TLS file {path} does not exist", hint="pass the PEM certificate chain and its key")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(options.tls_cert, options.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ServeError(f"cannot use {options.tls_cert} with {options.tls_key} for TLS ({exc.__class__.__name__}: "
                         f"{getattr(exc, 'reason', None) or 'unreadable'})",
                         hint="check that both are PEM, that the key matches the certificate and is not "
                              "passphrase-protected") from None


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ServeError(f"--host {host!r} is not an address of this machine",
                         hint="use 127.0.0.1 (this machine only) or the address of one network interface") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        what = "is in use" if exc.errno == 98 else f"cannot be bound ({exc.strerror})"
        raise ServeError(f"{host}:{port} {what}",
                         hint="stop the other server (`airlock jobs list --state running`) or pick another --port"
                         ) from None
    sock.set_inheritable(False)
    return sock


def _setup_logging() -> None:
    logger = logging.getLogger("airlock")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.setLevel(logging.WARNING)


def _audit(home: Path, action: str, obj: str, details: dict[str, Any]) -> None:
    from appliance.audit import append_audit
    from appliance.catalog import open_catalog, transaction

    db = open_catalog(home)
    try:
        with transaction(db):
            append_audit(db, action, obj, details)
    finally:
        db.close()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def load_all(options: ServeOptions, home: Path, device: str) -> list[ServedModel]:
    from appliance.catalog import open_catalog
    from appliance.serve.models import load_model
    from appliance.vault.lifecycle import keys_for

    db = open_catalog(home)
    keys = keys_for(db, home)
    models = []
    for source in options.sources:
        target = source.resolve(db)
        if target is None:
            raise ServeError(f"task {source.name!r} has no production version",
                             hint=f"promote one first (`airlock models list --task {source.name}`, then "
                                  f"`airlock models promote {source.name}-vN`), or serve a run with --run RUN")
        try:
            models.append(load_model(db, keys, home, source.name, target, device=device, backend=options.backend,
                                     limits=options.limits))
        except AirlockError as exc:
            raise type(exc)(f"cannot serve {source.name} ({target.version}): {exc.message}", hint=exc.hint) from exc
    db.close()
    return models


def run_server(options: ServeOptions, *, home: Path, on_listening: Callable[[str, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Serve until SIGTERM/SIGINT or `should_stop()`; returns a summary (requests, uptime)."""
    import uvicorn

    from appliance.serve.app import ServerState, create_app
    from appliance.serve.hot_swap import ModelTable, Watcher

    _setup_logging()
    check_tls(options)
    warning = exposure_warning(options)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    started = time.monotonic()
    device = resolve_device(options.device)
    models = load_all(options, home, device)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        # What computes side by side (one batch per batched LM, plus the workers of the backends that do not
        # batch) gets its share of the cores instead of all of them each (oversubscribed OpenMP threads spin
        # against each other and lose throughput).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // compute_streams(models, options.limits)))
    for model in models:
        log.info(json.dumps({"event": "model_loaded", "model": model.name, "version": model.version,
                             "backend": model.backend.kind, "why": model.backend_reason,
                             "load_s": round(model.load_seconds, 2)}))
    sock = bind(options.host, options.port)
    port = sock.getsockname()[1]
    table = ModelTable(models)
    state = ServerState(home=home, table=table, limits=options.limits)

    def load(db: Any, name: str, target: Target) -> ServedModel:
        from appliance.serve.models import load_model
        from appliance.vault.lifecycle import keys_for

        return load_model(db, keys_for(db, home), home, name, target, device=device, backend=options.backend,
                          limits=options.limits)

    def report(event: str, name: str, details: dict[str, Any]) -> None:
        log.info(json.dumps({"event": f"model_{event}", "model": name, **details}))
        if event == "swapped":
            state.metrics.model_load(name, True)
            _audit(home, "serve.swap", name, details)
        elif event == "load_failed":
            state.metrics.model_load(name, False)
            _audit(home, "serve.load_failed", name, {k: v for k, v in details.items() if k != "hint"})

    watcher = Watcher(home, table, options.sources, load, report, interval_s=options.poll_interval_s)
    config = uvicorn.Config(create_app(state), log_config=None, access_log=False, lifespan="on",
                            ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
                            ssl_keyfile=str(options.tls_key) if options.tls_key else None,
                            limit_concurrency=options.limits.max_connections, timeout_keep_alive=5,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)
    server = uvicorn.Server(config)
    url = f"{options.scheme}://{options.host if ':' not in options.host else f'[{options.host}]'}:{port}"
    _audit(home, "serve.start", "server", {
        "url": url, "tls": options.tls_cert is not None,
        "models": [{"name": m.name, "version": m.version, "run": m.target.run_id, "backend": m.backend.kind}
                   for m in models]})

    async def main() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            watcher.start()
            if on_listening:
                on_listening(url, port)
        while not serving.done():
            if should_stop is not None and should_stop():
                server.should_exit = True
            await asyncio.wait([serving], timeout=0.5)
        await serving

    try:
        asyncio.run(main())
    finally:
        watcher.stop()
        sock.close()
        summary = {"url": url, "uptime_s": round(time.monotonic() - started, 1),
                   "requests": sum(state.metrics.requests.values()),
                   "models": {m.name: m.version for m in table.all()}}
        _audit(home, "serve.stop", "server", summary)
    return summary


def serve_foreground(options: ServeOptions, home: Path) -> dict[str, Any]:
    """`airlock serve` without --detach: SIGTERM and Ctrl-C shut down gracefully and exit 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}

    def listening(url: str, port: int) -> None:
        names = ", ".join(s.name for s in options.sources)
        print(f"airlock serve: listening on {url} (models: {names}); Ctrl-C or SIGTERM stops it", flush=True)

    try:
        return run_server(options, home=home, on_listening=listening)
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)


def run_serve_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind `serve`: the server in a detached process; `airlock jobs cancel` stops it gracefully."""
    options = ServeOptions.from_params(ctx.job.params)
    ctx.progress("loading models", models=[s.name for s in options.sources])

    def listening(url: str, port: int) -> None:
        ctx.progress(f"listening on {url}", url=url, port=port)

    return run_server(options, home=ctx.home, on_listening=listening, should_stop=ctx.should_stop)
