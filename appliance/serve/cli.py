"""`airlock serve`: the OpenAI-compatible inference server, in the foreground or as a detached job.

    airlock serve --run qa-bot=RUN                       # 127.0.0.1:8080 until Ctrl-C / SIGTERM
    airlock serve --task chest-xray --task qa --detach   # a `serve` job; stop it with `airlock jobs cancel`
    airlock serve --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem --task qa

Operators and admins start servers; the vault must be unlocked (the weights are decrypted into
memory). Clients need an API key (`airlock keys create`).
"""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli_output import echo_json


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback warns unless TLS is configured.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port (0: any free).")
@click.option("--task", "tasks", multiple=True, metavar="TASK",
              help="Serve the production version of TASK and follow its promotions (repeatable).")
@click.option("--run", "runs", multiple=True, metavar="[NAME=]RUN",
              help="Serve a succeeded training run, under NAME (default: the run id) (repeatable).")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), help="PEM certificate chain.")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), help="PEM private key (unencrypted).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda:0 when a GPU is visible), cpu or cuda:N.")
@click.option("--backend", type=click.Choice(["auto", "pytorch"]), default="auto", show_default=True,
              help="auto: the fastest export `airlock optimize` made for this machine (TensorRT, ONNX Runtime), "
                   "else PyTorch; pytorch: always PyTorch.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Requests one language model decodes together (continuous batching; 1: one per worker).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Requests running at once on backends that do not batch (classifiers, TensorRT, --max-batch 1).")
@click.option("--queue-depth", type=click.IntRange(1, 10_000), default=None,
              help="Requests waiting for a place before the server answers 503.  [default: 2 x --max-batch]")
@click.option("--per-key-concurrency", type=click.IntRange(1, 10_000), default=None,
              help="Requests one API key may have in progress before 429.  [default: 2 x --max-batch]")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=32768, show_default=True,
              help="Most tokens one request may generate (also bounded by each model's context).")
@click.option("--max-prompt-tokens", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="Longest prompt in tokens (after the chat template).")
@click.option("--detach", is_flag=True, help="Run as a background job (`airlock jobs show/cancel`).")
@click.option("--json", "as_json", is_flag=True, help="With --detach: print the job as JSON.")
def serve(host: str, port: int, tasks: tuple[str, ...], runs: tuple[str, ...], tls_cert: Path | None,
          tls_key: Path | None, device: str, backend: str, max_batch: int, workers: int, queue_depth: int | None,
          per_key_concurrency: int | None, max_tokens: int, max_prompt_tokens: int, detach: bool,
          as_json: bool) -> None:
    """Serve models over HTTP: /v1/chat/completions, /v1/completions, /v1/classify, /v1/models, /metrics."""
    from appliance.access import require
    from appliance.audit import set_process_actor
    from appliance.catalog import open_catalog
    from appliance.paths import airlock_home
    from appliance.serve.limits import ServeLimits
    from appliance.serve.models import TaskSource, parse_run_option
    from appliance.serve.server import ServeOptions, serve_foreground
    from appliance.vault.lifecycle import keys_for

    options = ServeOptions(
        (*(parse_run_option(r) for r in runs), *(TaskSource(t) for t in tasks)), host=host, port=port,
        tls_cert=tls_cert.resolve() if tls_cert else None, tls_key=tls_key.resolve() if tls_key else None,
        device=device, backend=backend, limits=ServeLimits(
            max_batch=max_batch, workers=workers, queue_depth=queue_depth or 2 * max_batch,
            per_key_concurrency=per_key_concurrency or 2 * max_batch, max_tokens=max_tokens,
            max_prompt_tokens=max_prompt_tokens, default_max_tokens=min(256, max_tokens)))
    home = airlock_home()
    db = open_catalog()
    keys_for(db, home)  # "vault is locked" now, not after the job started
    session = require(db, home, "serve.control")
    if detach:
        from appliance.jobs.records import get_job
        from appliance.jobs.runner import start_job

        job = start_job(db, "serve", options.to_params(), device=device if device.startswith("cuda") else "cpu",
                        actor=session.actor if session else None)
        if as_json:
            echo_json({"job": get_job(db, job.id).to_dict()})
        else:
            click.echo(f"started server job {job.id}: follow it with `airlock jobs show {job.id}`, "
                       f"stop it with `airlock jobs cancel {job.id}`")
        return
    if session is not None:
        set_process_actor(session.actor)
    db.close()
    summary = serve_foreground(options, home)
    click.echo(f"airlock serve: stopped after {summary['uptime_s']} s, {summary['requests']} requests")
