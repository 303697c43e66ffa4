"""`airlock demo`: the story so far, on any laptop, offline.

Today: the doctor's table, an audited event and a verified chain, and the tiny DeepSeek-R1
architecture model continuing a maintenance log and answering a chat question. Later releases
extend this to bundle -> install -> import -> train -> quantize -> serve.
"""

from __future__ import annotations

import time

import click

from appliance.cli_output import echo_table


def run_demo(prompt: str) -> None:
    from appliance.audit import append_audit, verify_chain
    from appliance.base_models import DEMO_MODEL, generate_text, load_causal_lm, resolve_base_model
    from appliance.catalog import open_catalog
    from appliance.doctor import run_checks, worst_status
    from appliance.paths import airlock_home

    started = time.perf_counter()
    click.secho("== 1. doctor: is this machine ready?", bold=True)
    checks = run_checks()
    echo_table([(c.name, c.status, c.detail) for c in checks], ["check", "status", "detail"])
    click.echo(f"overall: {worst_status(checks)}\n")

    click.secho(f"== 2. catalog and audit chain under {airlock_home()}", bold=True)
    db = open_catalog()
    model = resolve_base_model(DEMO_MODEL)
    entry = append_audit(db, "demo.run", model.name, {"architecture": model.architecture})
    report = verify_chain(db)
    click.echo(f"appended audit row {entry.seq} ({entry.action}); chain intact: {report.ok}, "
               f"{report.rows_checked} rows, head {report.head_hash[:16]}…\n")

    click.secho(f"== 3. tiny model {model.name} ({model.architecture}), offline, on the CPU", bold=True)
    load_started = time.perf_counter()
    lm, tokenizer = load_causal_lm(model)
    parameters = sum(p.numel() for p in lm.parameters())
    click.echo(f"loaded {parameters / 1e6:.1f} M parameters from {model.path} "
               f"in {time.perf_counter() - load_started:.1f} s")
    click.echo(f"prompt:       {prompt}")
    click.echo(f"continuation: {generate_text(lm, tokenizer, prompt, max_new_tokens=40).strip()}")
    question = "The conveyor B shows abnormal vibration. What should I check first?"
    click.echo(f"chat user:      {question}")
    answer = generate_text(lm, tokenizer, question, max_new_tokens=60, chat=True)
    reasoning, _, reply = answer.replace(tokenizer.eos_token, "").rpartition("</think>")
    click.echo(f"chat reasoning: {reasoning.strip() or '(none)'}")
    click.echo(f"chat assistant: {reply.strip()}")
    click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
