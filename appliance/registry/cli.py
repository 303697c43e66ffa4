"""`airlock models ...` (the registry) and `airlock retrain TASK` (gated incremental retraining).

    airlock models list [--task T] [--json]         airlock models show ID [--json]
    airlock models register RUN --task TASK          airlock models card ID [--html OUT]
    airlock models promote ID [--reason TEXT]        airlock models rollback TASK [--reason TEXT]
    airlock models diff A B [--json]                 airlock models delete ID [--yes]
    airlock models policy TASK [--max-forgetting 0.05] [--auto-promote/--no-auto-promote] [--engines] ...
    airlock retrain TASK [--replay 0.2] [--from production|fresh] [--lr X] [--ewc-lambda X] [--auto] [--wait]

Reading (list, show, card, diff) needs no session; registering needs an operator, promoting and
rolling back an admin (or the scheduler, for gated automatic promotion), policy and delete an admin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _open():
    from appliance.train.cli import open_and_reconcile  # runs whose job vanished take its state

    return open_and_reconcile()


def _session(db, action: str):
    from appliance.access import require
    from appliance.paths import airlock_home

    return require(db, airlock_home(), action)


def _gate_text(version) -> str:
    statuses = {k: v.get("status") for k, v in version.gates.items() if isinstance(v, dict)}
    if version.reasons:
        return "rejected: " + "; ".join(version.reasons)
    if statuses and all(s == "not_evaluated" for s in statuses.values()):
        return "not evaluated"
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in statuses.items())


@click.group()
def models() -> None:
    """The model registry: versions with lineage, promotion and rollback, model cards."""


@models.command("list")
@click.option("--task", help="Only this task's versions.")
@click.option("--state", type=click.Choice(["candidate", "production", "retired", "rejected", "deleted"]))
@_json
def models_list(task: str | None, state: str | None, as_json: bool) -> None:
    """Model versions by task and number, with state, parent, data and gate results."""
    from appliance.registry.versions import list_tasks, list_versions

    db = _open()
    found = list_versions(db, task=task, state=state)
    if as_json:
        echo_json({"versions": [v.to_dict() for v in found], "tasks": [t.to_dict() for t in list_tasks(db)
                                                                        if task is None or t.name == task]})
        return
    if not found:
        click.echo("no model versions yet: `airlock train lm ... --task NAME --wait`, or `airlock models register "
                   "RUN --task NAME`")
        return
    echo_table([(v.id, v.state, v.parent_id or "-",
                 ", ".join(f"{d['name']} v{d['version']}" for d in v.dataset_versions[-1:]), v.created_at,
                 _gate_text(v)) for v in found],
               ["version", "state", "parent", "data", "created", "gates"])


@models.command("show")
@click.argument("version_id", metavar="ID")
@_json
def models_show(version_id: str, as_json: bool) -> None:
    """One version: lineage, metrics, artifacts, gates, and the task's production history."""
    from appliance.audit import canonical_json
    from appliance.registry.versions import get_task, get_version, promotions

    db = _open()
    version = get_version(db, version_id)
    history = [p for p in promotions(db, version.task) if version.id in (p["version"], p["previous"])]
    if as_json:
        echo_json({"version": version.to_dict(), "task": get_task(db, version.task).to_dict(),
                   "promotions": history})
        return
    rows = [("version", version.id), ("task", version.task), ("state", f"{version.state} since "
                                                                       f"{version.state_changed_at}"),
            ("parent", version.parent_id or "-"), ("run", version.run_id),
            ("created", f"{version.created_at} by {version.actor}"),
            ("base model", f"{version.base_model} sha256 {version.base_hash}"),
            ("data", "; ".join(f"{d['name']} v{d['version']} sha256 {d['content_hash']}"
                               for d in version.dataset_versions)),
            ("recipe", f"sha256 {version.recipe_hash}"), ("code version", version.code_version),
            ("artifacts", "; ".join(f"{k}: {v.get('object')}/{v.get('file')} sha256 {v.get('sha256')}"
                                    for k, v in version.artifacts.items())),
            ("gates", _gate_text(version)),
            ("metrics", canonical_json({k: v for k, v in version.metrics.items() if not isinstance(v, dict | list)}))]
    rows += [(p["action"], f"{p['at']} {p['actor']}: {p['version']} (was {p['previous'] or '-'}); "
                           f"{p['reason'] or 'no reason given'}") for p in history]
    echo_table(rows, ["field", "value"])


@models.command("register")
@click.argument("run_id", metavar="RUN")
@click.option("--task", required=True, help="Task name (created on first use, e.g. maint-qa).")
@_json
def models_register(run_id: str, task: str, as_json: bool) -> None:
    """Register a succeeded training run as a candidate version of TASK (its adapter is hashed)."""
    from appliance.paths import airlock_home
    from appliance.registry.versions import register_run
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for

    db = _open()
    keys = keys_for(db, airlock_home())
    session = _session(db, "models.register")
    version = register_run(db, keys, airlock_home(), get_run(db, run_id), task, actor=session.actor)
    if as_json:
        echo_json({"version": version.to_dict()})
        return
    click.echo(f"registered {version.id} (candidate) from run {run_id}; read `airlock models card {version.id}`, "
               f"then `airlock models promote {version.id} --reason ...`")


@models.command("promote")
@click.argument("version_id", metavar="ID")
@click.option("--reason", default="", help="Why (kept in the audit log and on the model card).")
@_json
def models_promote(version_id: str, reason: str, as_json: bool) -> None:
    """Make ID its task's production version; the current one is retired (one audited transaction)."""
    from appliance.registry.promotion import promote

    db = _open()
    session = _session(db, "models.promote")
    promoted, replaced = promote(db, version_id, actor=session.actor, reason=reason)
    if as_json:
        echo_json({"promoted": promoted.to_dict(), "replaced": replaced.to_dict() if replaced else None})
        return
    click.echo(f"{promoted.id} is now production for {promoted.task}"
               + (f" (replaces {replaced.id}, now retired)" if replaced else ""))


@models.command("rollback")
@click.argument("task")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@_json
def models_rollback(task: str, reason: str, as_json: bool) -> None:
    """Put back the production version that the current one replaced (one audited transaction)."""
    from appliance.registry.promotion import rollback

    db = _open()
    session = _session(db, "models.promote")
    restored, retired = rollback(db, task, actor=session.actor, reason=reason)
    if as_json:
        echo_json({"restored": restored.to_dict(), "retired": retired.to_dict()})
        return
    click.echo(f"{restored.id} is production for {task} again; {retired.id} is retired")


@models.command("diff")
@click.argument("a")
@click.argument("b")
@_json
def models_diff(a: str, b: str, as_json: bool) -> None:
    """What differs between versions A and B: lineage, recipe fields, metrics (B - A)."""
    from appliance.registry.card import diff_versions

    result = diff_versions(_open(), a, b)
    if as_json:
        echo_json(result)
        return
    rows: list[tuple[Any, ...]] = [(k, _short(v["a"]), _short(v["b"]), "") for k, v in result["changed"].items()]
    rows += [(f"recipe.{k}", _short(v["a"]), _short(v["b"]), "") for k, v in result["recipe"].items()]
    rows += [(k, _short(v["a"]), _short(v["b"]), "-" if v["delta"] is None else f"{v['delta']:+.4f}")
             for k, v in result["metrics"].items()]
    echo_table(rows, ["field", a, b, "B - A"])


def _short(value: Any) -> str:
    from appliance.audit import canonical_json

    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = value if isinstance(value, str) else canonical_json(value)
    return text if len(text) <= 40 else text[:37] + "..."


@models.command("card")
@click.argument("version_id", metavar="ID")
@click.option("--html", "html_out", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the card as one HTML file (every value escaped).")
def models_card(version_id: str, html_out: Path | None) -> None:
    """The model card: intended use, base model, data (counts, dates, hashes), recipe, metrics vs the
    previous production version, gates, engines, known limits and lineage. Never record contents."""
    from appliance.registry.card import card_blocks, to_html, to_markdown

    blocks = card_blocks(_open(), version_id)
    if html_out is not None:
        try:
            html_out.write_text(to_html(blocks), encoding="utf-8")
        except OSError as exc:
            from appliance.errors import AirlockError

            raise AirlockError(f"cannot write {html_out}: {exc.strerror}", hint="choose a writable path") from exc
        click.echo(f"wrote {html_out}", err=True)
        return
    click.echo(to_markdown(blocks))


@models.command("delete")
@click.argument("version_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def models_delete(version_id: str, yes: bool) -> None:
    """Crypto-shred a version's weights; its row stays (state deleted) so lineage and audit still read."""
    from appliance.paths import airlock_home
    from appliance.registry.promotion import delete_version

    db = _open()
    session = _session(db, "models.delete")
    if not yes:
        click.confirm(f"Destroy the weights of {version_id} for good?", abort=True)
    delete_version(db, airlock_home(), version_id, actor=session.actor)
    click.echo(f"{version_id} deleted: its weights' data key is destroyed")


def _recipe_fields(path: Path | None) -> dict[str, Any] | None:
    """The fields a recipe file sets, checked as `airlock optimize --recipe` checks them (errors name the file)."""
    if path is None:
        return None
    import tomllib

    from appliance.optimize.recipe import load_quant_recipe

    load_quant_recipe(path)
    return tomllib.loads(path.read_text(encoding="utf-8"))


@models.command("policy")
@click.argument("task")
@click.option("--max-forgetting", type=click.FloatRange(0, 1),
              help="Largest relative rise of test loss allowed on earlier test splits (0.05 = 5%).")
@click.option("--new-data-tolerance", type=click.FloatRange(0, 1),
              help="Largest relative rise of test loss allowed on the new data's test split "
                   "(default 0.01: improvement, or parity within 1%).")
@click.option("--auto-promote/--no-auto-promote", default=None, help="Promote retrains whose gates pass.")
@click.option("--engines/--no-engines", "deploys_engines", default=None,
              help="The task deploys QAT/TensorRT engines: retrains run the optimize stage, parity is gate 3.")
@click.option("--ewc-lambda", type=click.FloatRange(0, 1e12),
              help="EWC penalty strength for retrains (0 = off); e.g. 1e5 for the tiny models.")
@click.option("--engine-variant", type=click.Choice(["int8", "fp16", "fp32", "genai-int4", "genai-int8", "genai-fp32"]),
              help="The export gate 3 checks and production serves (default int8; genai-*: an LM served by "
                   "onnxruntime-genai on the CPU).")
@click.option("--engine-recipe", type=click.Path(dir_okay=False, path_type=Path),
              help="Quantization recipe (TOML, as for `airlock optimize --recipe`) gate 3 builds the variant with, "
                   "including its quality tolerance (max_perplexity_increase, max_accuracy_drop).")
@click.option("--engine-qat/--engine-ptq", "engine_qat", default=None,
              help="int8: quantization-aware fine-tuning after calibration (default), or calibration only.")
@click.option("--engine-max-rel-diff", type=click.FloatRange(0),
              help="Tighten gate 3: largest relative logit difference ONNX vs PyTorch (default: per variant).")
@click.option("--engine-min-top1", type=click.FloatRange(0, 1),
              help="Tighten gate 3: smallest share of held-out inputs with PyTorch's top-1 (default: per variant).")
@click.option("--operating-class", help="Classifiers: the class a positive call means at the operating point "
                                       "(default: the second of two classes).")
@click.option("--operating-specificity", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Classifiers: read scores where this share of negative validation images is called negative "
                   "(e.g. 0.9); gates then judge sensitivity there.")
@click.option("--operating-threshold", type=click.FloatRange(0, 1),
              help="Classifiers: a fixed threshold on the positive class's probability (e.g. 0.3).")
@click.option("--clear-operating-point", is_flag=True, help="Forget the operating point (not chosen: not gated).")
@_json
def models_policy(task: str, max_forgetting: float | None, new_data_tolerance: float | None,
                  auto_promote: bool | None, deploys_engines: bool | None, ewc_lambda: float | None,
                  engine_variant: str | None, engine_recipe: Path | None, engine_qat: bool | None,
                  engine_max_rel_diff: float | None,
                  engine_min_top1: float | None, operating_class: str | None, operating_specificity: float | None,
                  operating_threshold: float | None, clear_operating_point: bool, as_json: bool) -> None:
    """Show or change a task's gates, operating point, EWC strength and auto-promotion (changes need an admin;
    audited)."""
    from appliance.registry.versions import get_task, set_policy

    db = _open()
    changes = {"max_forgetting": max_forgetting, "new_data_tolerance": new_data_tolerance,
               "auto_promote": auto_promote, "deploys_engines": deploys_engines, "ewc_lambda": ewc_lambda,
               "engine_variant": engine_variant, "engine_recipe": _recipe_fields(engine_recipe),
               "engine_qat": engine_qat,
               "engine_max_rel_diff": engine_max_rel_diff, "engine_min_top1": engine_min_top1,
               "operating_class": operating_class, "operating_specificity": operating_specificity,
               "operating_threshold": operating_threshold}
    if clear_operating_point or any(v is not None for v in changes.values()):
        session = _session(db, "models.policy")
        result = set_policy(db, task, actor=session.actor, clear_operating_point=clear_operating_point, **changes)
    else:
        result = get_task(db, task)
    if as_json:
        echo_json({"task": result.to_dict()})
        return
    echo_table([("task", result.name), ("kind", result.kind), ("dataset", result.dataset_id),
                ("base model", result.base_model), ("auto-promote", "on" if result.auto_promote else "off"),
                ("max forgetting", f"{result.max_forgetting:.1%}"),
                ("new data tolerance", f"{result.new_data_tolerance:.1%}"),
                ("deploys engines", "yes" if result.deploys_engines else "no"),
                ("EWC lambda", f"{result.ewc_lambda:g}" + (" (off)" if not result.ewc_lambda else "")),
                ("engine gate", f"{result.engine_variant}"
                                + (f" ({'QAT' if result.engine_qat else 'PTQ'})" if result.engine_variant == "int8"
                                   else "")
                                + f", max rel diff {_limit(result.engine_max_rel_diff)}, min top-1 "
                                  f"{_limit(result.engine_min_top1)}"),
                ("engine recipe", ", ".join(f"{k} = {v}" for k, v in sorted(result.engine_recipe.items()))
                 or "defaults")]
               + ([("operating point", _operating_text(result))] if result.kind == "classifier" else []),
               ["field", "value"])


def _operating_text(task: Any) -> str:
    from appliance.train.operating_point import OperatingPolicy

    return OperatingPolicy.of_task(task).describe()


def _limit(value: float | None) -> str:
    return "per variant" if value is None else f"{value:g}"


@click.command()
@click.argument("task")
@click.option("--from", "init", type=click.Choice(["production", "fresh"]), default="production", show_default=True,
              help="Continue from the production adapter, or train a fresh adapter.")
@click.option("--replay", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Share of earlier records mixed into the training data (seeded sample).")
@click.option("--lr", type=float, help="Learning rate (default: the production run's).")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Optimizer steps (default: the production run's, scaled to the size of the new mix).")
@click.option("--ewc-lambda", type=click.FloatRange(0, 1e12),
              help="EWC penalty strength (default: the task's policy; 0 = off).")
@click.option("--auto", is_flag=True, help="Promote at once if the gates pass (admin or scheduler).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, or cuda:N.")
@click.option("--wait", is_flag=True, help="Follow the job; exit 1 if the gates reject the result, 2 if it fails.")
@_json
def retrain(task: str, init: str, replay: float, lr: float | None, max_steps: int | None, ewc_lambda: float | None,
            auto: bool, device: str, wait: bool, as_json: bool) -> int:
    """Retrain TASK's production model (LoRA adapter or image classifier) on the records imported since,
    plus replay; gate; register.

    Gates: no earlier test split may get worse than the task's max-forgetting allows (LMs: test loss;
    classifiers: ROC AUC and accuracy), the new data's test split must not get worse (new-data
    tolerance), and for tasks that deploy engines the quantized ONNX export must match the model
    (engine parity). Passing versions stay candidates unless auto-promote is on (`airlock models
    policy TASK --auto-promote`) or --auto; failing ones are rejected with their reasons, and
    production is untouched.
    """
    from appliance.jobs.records import get_job
    from appliance.paths import airlock_home
    from appliance.registry.retrain import start_retrain
    from appliance.registry.versions import version_for_run
    from appliance.train import runs
    from appliance.train.cli import follow_training
    from appliance.vault.lifecycle import keys_for

    if device != "auto" and device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise runs.RunError(f"--device {device!r} is not auto, cpu or cuda:N", hint="e.g. --device cuda:1")
    db = _open()
    keys_for(db, airlock_home())
    session = _session(db, "train.start")
    if auto:
        _session(db, "models.promote")
    run, job = start_retrain(db, task, session=session, init=init, replay=replay, lr=lr, max_steps=max_steps,
                             auto=auto, device=device, ewc_lambda=ewc_lambda)
    if not as_json:
        click.echo(f"started retrain of {task} (run {run.id}, job {job.id}) on {run.dataset_name} "
                   f"v{run.dataset_version}, from {job.params['parent']}")
    if not wait:
        if as_json:
            echo_json({"run": run.to_dict(), "job": job.to_dict(), "version": None})
        else:
            click.echo(f"follow it with `airlock jobs show {job.id}`")
        return 0
    finished = follow_training(db, job.id, quiet=as_json)
    if finished is None:
        return 130
    version = version_for_run(db, run.id)
    if as_json:
        echo_json({"run": runs.get_run(db, run.id).to_dict(), "job": get_job(db, job.id).to_dict(),
                   "version": version.to_dict() if version else None})
    if finished.state != "succeeded" or version is None:
        from appliance.errors import AirlockError

        raise AirlockError(f"retrain of {task} ended {finished.state}" + (f": {finished.error}" if finished.error
                                                                          else ""),
                           hint=finished.hint or f"see `airlock jobs show {job.id}`")
    if not as_json:
        result = finished.result or {}
        if version.state == "rejected":
            click.echo(f"{version.id} rejected; production stays {version.parent_id}:")
            for reason in version.reasons:
                click.echo(f"  {reason}")
        else:
            click.echo(f"{version.id} passed its gates and is {version.state}"
                       + (f" ({result['note']})" if result.get("note") else ""))
        click.echo(f"model card: `airlock models card {version.id}`")
    return 1 if version.state == "rejected" else 0
