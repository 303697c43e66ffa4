"""Demo stages 3-6, run by one `airlock` (the installed one, or the venv's with `--skip-bundle`).

    report = run_story(StoryOptions(work=Path("/tmp/airlock-demo-x"), airlock=Path("/opt/airlock/bin/airlock")))

vault -> import text and DICOM (fake PHI removed) -> train LoRA LM + classifier -> optimize both
(PTQ, QAT, ONNX + parity) -> TensorRT engine where a GPU and TensorRT exist -> promote -> serve,
chat + classify with an API key, ORT vs PyTorch latency -> new records, gated retrain -> audit
chain. Every step is the same `airlock ... --json` command an operator would type; this module
only chains them, times them and reads their JSON. `finally` stops what it started (the server
jobs, any job still running, the key agent), so nothing outlives the demo.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.demo.client import ServerClient, median_latency
from appliance.demo.dicom_phantoms import PHI_KEYWORDS, phi_found, value_in, write_phantom_set
from appliance.demo.steps import Cli, DemoError, Report, Stage, format_metric, say
from appliance.demo.text_samples import FIRST_BATCH, NEW_BATCH

LM_BASE = "tiny-deepseek-r1"
CLS_BASE = "tiny-resnet-cls"
TEXT_DATASET = "site-qa"
DICOM_DATASET = "phantom-ct"
LM_TASK = "site-qa"
CLS_TASK = "phantom-ct"
QUESTION = "The CNC mill 4 shows abnormal vibration. What should I check first?"
EXPECTED = "spindle bearing"
"""What the site's data says (appliance/demo/text_samples.py): the demo shows whether the model learned it."""
LISTEN_WITHIN_S = 600
"""A bound for a server that never comes up, not an expectation: it listens within seconds on a quiet machine."""
PERCENT = "{:.1%}"
MS = "{:.0f} ms"
WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper", "kelp",
         "lumen", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
         "willow", "xenon", "yarrow", "zephyr")


@dataclass
class StoryOptions:
    work: Path
    """The demo's folder: home/ (AIRLOCK_HOME), incoming/ (sample files), recipes/, review/."""
    airlock: Path
    """The `airlock` executable every stage runs."""
    lm_steps: int = 100
    cls_steps: int = 60
    latency_repeats: int = 10


@dataclass
class _Started:
    """What the story started and must stop."""

    server_jobs: list[str] = field(default_factory=list)


def generate_passphrase() -> str:
    return "-".join(secrets.choice(WORDS) for _ in range(5)) + f"-{secrets.randbelow(100):02d}"


def run_story(options: StoryOptions, report: Report | None = None) -> Report:
    report = report or Report()
    work = options.work
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    cli = Cli(options.airlock, env={"AIRLOCK_HOME": str(home)}, cwd=work)
    started = _Started()
    try:
        _vault(cli, work, report)
        _import_text(cli, report)
        phantoms = _import_dicom(cli, work, report)
        lm_run, cls_run = _train(cli, work, options, report)
        _optimize(cli, work / "recipes", lm_run, cls_run, report)
        _engines(cli, lm_run, cls_run, report)
        versions = _promote(cli, lm_run, cls_run, report)
        _serve(cli, work, options, phantoms, started, report)
        _retrain(cli, started, report, versions)
        _audit(cli, report)
    finally:
        stop_everything(cli, started.server_jobs)
    report.facts["home"] = str(home)
    return report


def _vault(cli: Cli, work: Path, report: Report) -> None:
    with Stage(report, "vault init + unlock", "3. vault: init with a generated passphrase, unlock") as stage:
        passphrase = generate_passphrase()
        secret = work / "passphrase.txt"
        secret.touch(mode=0o600)
        secret.write_text(passphrase + "\n")
        say(f"demo passphrase (account 'admin'): {passphrase}")
        # vault init prints the recovery key once; a demo has no safe to keep it in, so it is not shown.
        cli.run("vault", "init", "--passphrase-file", str(secret))
        say("vault initialised: root key, the admin's passphrase slot, a recovery key (not kept by the demo)")
        cli.run("vault", "unlock", "--passphrase-file", str(secret), "--idle-timeout", "7200")
        status = cli.json("vault", "status")
        say(f"unlocked as {status['account']} ({status['role']}); key agent pid {status['agent_pid']}, "
            f"KEK version {status['kek_version']}")
        stage.metric = f"account {status['account']} ({status['role']}), {len(status['slots'])} key slots"
        stage.artifacts = f"{cli.env['AIRLOCK_HOME']}/vault (passphrase in {secret})"
        report.facts["passphrase_file"] = str(secret)


def _import_text(cli: Cli, report: Report) -> None:
    with Stage(report, "import text", f"3. import the sample text dataset ({FIRST_BATCH.name})") as stage:
        out = cli.json("data", "import", str(FIRST_BATCH), "--name", TEXT_DATASET)
        records = cli.json("data", "report", TEXT_DATASET)["report"]["records"]
        splits = out["splits"]
        say(f"{records['read']} records read, {records['imported']} imported, {records['duplicates']} near/exact "
            f"duplicates dropped; splits {_splits(splits)}")
        stage.metric = f"{records['imported']}/{records['read']} records ({records['duplicates']} duplicates)"
        stage.artifacts = f"dataset {TEXT_DATASET} v{out['version']}, encrypted in the vault"


def _import_dicom(cli: Cli, work: Path, report: Report) -> list[Any]:
    with Stage(report, "import DICOM", "3. import synthetic DICOM phantoms with fake PHI") as stage:
        incoming = work / "incoming" / "dicom"
        files = write_phantom_set(incoming, patients=24, images=4)
        before = sum(len(phi_found(f.path, f.phi)) for f in files)
        say(f"wrote {len(files)} phantom CT slices of 24 fake patients to {incoming}: {before} identifying "
            f"values in their headers ({', '.join(PHI_KEYWORDS[:4])}, ...)")
        out = cli.json("data", "import", str(incoming), "--name", DICOM_DATASET, "--format", "dicom",
                       "--profile", "medical", "--image-size", "64")
        say(f"imported {out['records_added']} images, labels from folders; splits by patient {_splits(out['splits'])}")
        # What is stored is what an export shows: write it out, look for every original value, delete it.
        review = work / "review" / "dicom"
        cli.run("data", "export", DICOM_DATASET, "--out", str(review))
        stored = sorted(review.rglob("*.dcm"))
        values = {v for f in files for v in f.phi.values()}
        contents = [p.read_bytes() for p in stored]
        left = sorted(v for v in values if any(value_in(raw, v) for raw in contents))
        shutil.rmtree(review.parent)
        if left or len(stored) != out["records_added"]:
            raise DemoError(f"de-identification check failed: {len(left)} original identifiers found in "
                            f"{len(stored)} stored files", hint="do not use this build with patient data; report it")
        say(f"PHI check: 0 of {len(values)} distinct original identifiers found in the {len(stored)} stored files "
            "(names, IDs, birth dates, addresses, accession numbers, institution, physicians, UIDs remapped)")
        stage.metric = f"{out['records_added']} images; PHI {before} values -> 0 found after import"
        stage.artifacts = f"dataset {DICOM_DATASET} v{out['version']}; source files in {incoming}"
        report.facts["phi_removed"] = {"source_values": before, "distinct": len(values), "found_after": 0,
                                       "files": len(stored)}
    return files


def _splits(splits: dict[str, int]) -> str:
    return "/".join(str(splits.get(s, 0)) for s in ("train", "val", "test")) + " (train/val/test)"


def _train(cli: Cli, work: Path, options: StoryOptions, report: Report) -> tuple[dict[str, Any], dict[str, Any]]:
    recipes = work / "recipes"
    recipes.mkdir(exist_ok=True)
    lm_recipe = recipes / "lm.toml"
    lm_recipe.write_text(f"# the demo's LoRA recipe: a short run on two CPU cores\nmax_steps = {options.lm_steps}\n"
                         f"eval_every = {max(1, options.lm_steps // 4)}\nbatch_size = 4\nmax_length = 128\n"
                         "rank = 8\nlr = 3e-3\nseed = 3\n")
    # Calibration on 4 batches instead of 16: the tiny model's ranges settle fast, and it saves CPU minutes.
    (recipes / "quant.toml").write_text("calibration_batches = 4\n")
    cls_recipe = recipes / "classifier.toml"
    cls_recipe.write_text(f"max_steps = {options.cls_steps}\neval_every = {max(1, options.cls_steps // 3)}\n"
                          "batch_size = 16\nlr = 3e-3\nseed = 3\n")
    with Stage(report, "train LM (LoRA)", f"4. train: LoRA on {LM_BASE}, {options.lm_steps} steps") as stage:
        lm = cli.json("train", "lm", "--base", LM_BASE, "--data", TEXT_DATASET, "--recipe", str(lm_recipe),
                      "--task", LM_TASK, "--wait")
        m = lm["run"]["metrics"]
        test = m.get("test") or {}
        val_loss = f"val loss {format_metric(m.get('initial_val_loss'))} -> {format_metric(m.get('best_val_loss'))}"
        say(f"run {lm['run']['id']}: {val_loss} (best); test loss {format_metric(test.get('loss'))}, "
            f"token accuracy {format_metric(test.get('token_accuracy'), PERCENT)}")
        stage.metric = val_loss
        stage.artifacts = f"adapter in vault object {lm['run']['artifact']}"
        report.facts["lm"] = {"run": lm["run"]["id"], "initial_val_loss": m.get("initial_val_loss"),
                              "best_val_loss": m.get("best_val_loss"), "version": lm["job"]["result"]["version"]}
    with Stage(report, "train classifier", f"4. train: {CLS_BASE} classifier, {options.cls_steps} steps") as stage:
        cls = cli.json("train", "classifier", "--base", CLS_BASE, "--data", DICOM_DATASET, "--recipe",
                       str(cls_recipe), "--task", CLS_TASK, "--wait")
        m = cls["run"]["metrics"]
        test = m.get("test") or {}
        say(f"run {cls['run']['id']}: best val AUC {format_metric(m.get('best_val_auc'))}; test accuracy "
            f"{format_metric(test.get('accuracy'), PERCENT)}, AUC {format_metric(test.get('roc_auc'))}, "
            f"confusion {test.get('confusion')} (rows: true {m.get('labels')})")
        op = test.get("operating_point") or {}
        say(f"at the operating point ({op.get('chosen_by') or 'none'}): sensitivity "
            f"{format_metric(op.get('sensitivity'))}, specificity {format_metric(op.get('specificity'))}; "
            f"expected calibration error {format_metric(test.get('ece'))}")
        if m.get("best_val_auc") is None:
            say("no validation AUC (the validation split is empty or holds one class): training ran all its steps "
                "without early stopping")
        stage.metric = (f"test accuracy {format_metric(test.get('accuracy'), PERCENT)}, "
                        f"AUC {format_metric(test.get('roc_auc'))}")
        stage.artifacts = f"weights in vault object {cls['run']['artifact']}"
        report.facts["classifier"] = {"run": cls["run"]["id"], "accuracy": test.get("accuracy"),
                                      "auc": test.get("roc_auc"), "version": cls["job"]["result"]["version"]}
    return lm["run"], cls["run"]


def _optimize(cli: Cli, recipes: Path, lm_run: dict[str, Any], cls_run: dict[str, Any], report: Report) -> None:
    for run, name in ((lm_run, "LM"), (cls_run, "classifier")):
        with Stage(report, f"optimize {name}", f"4. optimize the {name}: PTQ, QAT, ONNX fp32/fp16/int8 + parity") \
                as stage:
            out = cli.json("optimize", run["id"], "--recipe", str(recipes / "quant.toml"), "--wait")["report"]
            variants = out["variants"]
            parity = ", ".join(f"{v} {'ok' if variants[v]['ok'] else 'FAILED'} (top-1 "
                               f"{format_metric((variants[v].get('parity') or {}).get('top1_agreement'), '{:.0%}')})"
                               for v in sorted(variants))
            # PTQ/QAT report None when no int8 variant was made; a stage with no number says "not measured".
            scores = {name: out.get(name) or {} for name in ("float", "ptq", "qat")}
            if out["task"] == "causal_lm":
                ppl = {name: format_metric(score.get("perplexity")) for name, score in scores.items()}
                quality = f"perplexity float {ppl['float']}, PTQ {ppl['ptq']}, QAT {ppl['qat']}"
                metric = f"ppl PTQ {ppl['ptq']} vs QAT {ppl['qat']}"
            else:
                acc = {name: format_metric(score.get("accuracy"), PERCENT) for name, score in scores.items()}
                quality = f"val accuracy float {acc['float']}, PTQ {acc['ptq']}, QAT {acc['qat']}"
                metric = f"acc PTQ {acc['ptq']} vs QAT {acc['qat']}"
            say(f"{quality} ({out.get('qat_steps_done') or 0} QAT steps)")
            say(f"ONNX parity vs PyTorch: {parity}")
            say(f"serves with: {out['runtime']['reason']}")
            stage.metric = metric + f"; parity {sum(v['ok'] for v in variants.values())}/{len(variants)} ok"
            # An export that failed its parity check is not stored, so it has no file.
            stored = [v["file"] for v in variants.values() if v.get("file")]
            stage.artifacts = f"{', '.join(stored) or 'no export'} in vault object {run['artifact']}"
            report.facts[f"optimize_{name.lower()}"] = {"float": out.get("float"), "ptq": out.get("ptq"),
                                                       "qat": out.get("qat"), "runtime": out["runtime"]["kind"]}


def _engines(cli: Cli, lm_run: dict[str, Any], cls_run: dict[str, Any], report: Report) -> None:
    with Stage(report, "TensorRT engine", "4. TensorRT engine (needs an NVIDIA GPU and TensorRT)") as stage:
        checks = {c["name"]: c for c in cli.json("doctor", ok_codes=(0, 1))["checks"]}
        gpu, trt = checks.get("gpu", {}), checks.get("tensorrt", {})
        if gpu.get("status") != "ok" or trt.get("status") != "ok":
            say(f"skipped. GPU: {gpu.get('detail') or 'none'}. TensorRT: {trt.get('detail') or 'none'}")
            say("ONNX Runtime serves the ONNX exports instead (the same files TensorRT would build from)")
            stage.metric = "skipped: no GPU/TensorRT, ONNX Runtime serves"
            return
        built = []
        for run in (lm_run, cls_run):
            cli.run("engine", "build", run["id"], "--variant", "int8", "--wait", timeout=3600)
            built.append(run["id"])
        say(f"built INT8 engines for {', '.join(built)}; the server picks them on this GPU")
        stage.metric = f"{len(built)} INT8 engines built"


def _promote(cli: Cli, lm_run: dict[str, Any], cls_run: dict[str, Any], report: Report) -> dict[str, str]:
    versions = {LM_TASK: report.facts["lm"]["version"], CLS_TASK: report.facts["classifier"]["version"]}
    with Stage(report, "promote", f"5. promote {' and '.join(versions.values())} to production") as stage:
        for version in versions.values():
            cli.json("models", "promote", version, "--reason", "airlock demo: first version")
        listed = cli.json("models", "list", "--state", "production")["versions"]
        say("production: " + ", ".join(f"{v['task']} = {v['id']} ({v['kind']})" for v in listed))
        stage.metric = ", ".join(sorted(v["id"] for v in listed))
        stage.artifacts = f"model cards: `airlock models card {versions[LM_TASK]}`"
    return versions


def _start_server(cli: Cli, started: _Started, *extra: str) -> tuple[str, str]:
    job = cli.json("serve", "--task", LM_TASK, "--task", CLS_TASK, "--port", "0", "--workers", "1", *extra,
                   "--detach")["job"]["id"]
    started.server_jobs.append(job)
    deadline = time.monotonic() + LISTEN_WITHIN_S
    while time.monotonic() < deadline:
        shown = cli.json("jobs", "show", job)
        progress = shown.get("last_progress") or {}
        url = progress.get("url") or (progress.get("data") or {}).get("url")
        if url:
            return job, url
        if shown["job"]["state"] not in ("queued", "running"):
            raise DemoError(f"server job {job} ended {shown['job']['state']}: {shown['job'].get('error')}",
                            hint=shown["job"].get("hint") or f"see `airlock jobs logs {job}`")
        time.sleep(0.5)
    raise DemoError(f"server job {job} did not start listening within {LISTEN_WITHIN_S} s",
                    hint=f"see `airlock jobs logs {job}`; a machine this loaded may need the demo run again")


def _stop_server(cli: Cli, started: _Started, job: str) -> None:
    stop_job(cli, job)
    started.server_jobs.remove(job)


def _serve(cli: Cli, work: Path, options: StoryOptions, phantoms: list[Any], started: _Started,
           report: Report) -> None:
    with Stage(report, "serve + requests", "5. serve: API key, chat completion, classification") as stage:
        key = cli.json("keys", "create", "demo-client", "--task", LM_TASK, "--task", CLS_TASK)
        say(f"API key demo-client created (shown once, stored hashed): {key['secret'][:20]}...")
        job, url = _start_server(cli, started)
        client = ServerClient(url, key["secret"])
        served = {m["id"]: m["airlock"] for m in client.models()}
        say(f"server job {job} listening on {url}: " + ", ".join(
            f"{name} {info['version']} on {info['backend']}" for name, info in sorted(served.items())))
        reply, seconds = client.chat(LM_TASK, QUESTION)
        answer = reply["choices"][0]["message"]["content"].strip()
        say(f"chat  > {QUESTION}")
        say(f"chat  < {_one_line(answer)}  ({reply['usage']['completion_tokens']} tokens, "
            f"{format_metric(seconds * 1000, MS)})")
        learned = EXPECTED in answer
        say(f"the site's answer is the {EXPECTED}: "
            + ("in the reply" if learned else "not in the reply (the tiny demo model has 2.6 M parameters: "
               "the validation loss above is the measure of what it learned)"))
        # Unseen patients: scans written now, never imported.
        fresh = write_phantom_set(work / "incoming" / "unseen", patients=2, images=2, first_patient=900)
        answers = []
        for scan in fresh:
            result, seconds = client.classify(CLS_TASK, scan.path.read_bytes())
            answers.append(result["label"] == scan.label)
            say(f"classify {scan.path.name} (truly {scan.label}): {result['label']} "
                f"p={format_metric(result['predictions'][0].get('probability'), '{:.2f}')} "
                f"({format_metric(seconds * 1000, MS)})")
        ort = _latencies(client, fresh[0].path.read_bytes(), options.latency_repeats)
        _stop_server(cli, started, job)
        # The same versions on PyTorch eager, for the speed-up ONNX Runtime buys on this CPU.
        eager_job, eager_url = _start_server(cli, started, "--backend", "pytorch")
        eager = _latencies(ServerClient(eager_url, key["secret"]), fresh[0].path.read_bytes(),
                           options.latency_repeats)
        _stop_server(cli, started, eager_job)
        chat_speedup = format_metric(_ratio(eager["chat"], ort["chat"]), "x{:.2f}")
        cls_speedup = format_metric(_ratio(eager["classify"], ort["classify"]), "x{:.2f}")
        ms = {"ort": {t: s * 1000 for t, s in ort.items()}, "eager": {t: s * 1000 for t, s in eager.items()}}
        chat = f"chat {format_metric(ms['ort']['chat'], '{:.0f}')} vs {format_metric(ms['eager']['chat'], MS)}"
        classify = (f"classify {format_metric(ms['ort']['classify'], '{:.1f}')} vs "
                    f"{format_metric(ms['eager']['classify'], '{:.1f} ms')}")
        say(f"median latency over HTTP, ONNX Runtime vs PyTorch: {chat} ({chat_speedup}), {classify} ({cls_speedup})")
        stage.metric = (f"chat answered, {sum(answers)}/{len(answers)} unseen scans right; ORT speedup chat "
                        f"{chat_speedup}, classify {cls_speedup}")
        stage.artifacts = f"server jobs {job}, {eager_job} (stopped)"
        report.facts["serve"] = {"chat_answer": answer, "site_answer_in_reply": learned, "classified": len(answers),
                                 "correct": sum(answers),
                                 "ort_ms": ms["ort"], "pytorch_ms": ms["eager"]}


def _ratio(slower: float, faster: float) -> float | None:
    return slower / faster if faster > 0 else None


def _latencies(client: ServerClient, scan: bytes, repeats: int) -> dict[str, float]:
    return {"chat": median_latency(lambda: client.chat(LM_TASK, QUESTION, max_tokens=32), repeats),
            "classify": median_latency(lambda: client.classify(CLS_TASK, scan), repeats * 3)}


def _one_line(text: str, width: int = 150) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _retrain(cli: Cli, started: _Started, report: Report, versions: dict[str, str]) -> None:
    with Stage(report, "new records + retrain", f"5. new records arrive ({NEW_BATCH.name}); gated retrain") as stage:
        out = cli.json("data", "import", str(NEW_BATCH), "--name", TEXT_DATASET)
        say(f"dataset {TEXT_DATASET} v{out['version']}: {out['records_added']} new records")
        # Half of the mix replayed from earlier records at half the learning rate: what keeps a tiny
        # model from forgetting. Exit 1 means the gates rejected the candidate: an outcome, not an error.
        say("retrain from the production adapter on the new records + 50% replay of earlier ones, "
            "promoted only if its gates pass")
        result = cli.json("retrain", LM_TASK, "--replay", "0.5", "--lr", "1.5e-3", "--auto", "--wait",
                          ok_codes=(0, 1))
        version, metrics = result["version"], result["run"]["metrics"]
        # Either decision is a good ending: the gates, not the demo, judge whether the retrain helped.
        gates = version.get("gates") or {}
        for name in ("forgetting", "new_data"):
            gate = gates.get(name) or {"status": "not recorded"}
            for split in gate.get("splits") or [gate]:
                say(_gate_line(name, split))
        reasons = version.get("reasons") or []
        if version["state"] == "rejected":
            decision = f"{version['id']} rejected, production stays {versions[LM_TASK]}"
            for reason in reasons:
                say(f"reason: {reason}")
        else:
            decision = f"{version['id']} passed its gates: {version['state']}"
        say(f"decision: {decision}")
        stage.metric = (f"{decision}; val loss {format_metric(metrics.get('initial_val_loss'))} -> "
                        f"{format_metric(metrics.get('best_val_loss'))}")
        stage.artifacts = f"model card: `airlock models card {version['id']}`"
        report.facts["retrain"] = {"version": version["id"], "state": version["state"], "reasons": reasons,
                                   "decision": decision}


def _gate_line(name: str, split: dict[str, Any]) -> str:
    """One gate's verdict on one test split: the losses when both models were measured, else why not."""
    where = f" {split['split']}" if split.get("split") else ""
    status = split.get("status", "not recorded")
    if split.get("relative_change") is None:
        reason = f" ({split['reason']})" if split.get("reason") else ""
        return f"gate {name}:{where} {status}{reason}"
    return (f"gate {name}:{where} test loss {format_metric(split.get('production_loss'), '{:.4f}')} -> "
            f"{format_metric(split.get('candidate_loss'), '{:.4f}')} "
            f"({format_metric(split['relative_change'], '{:+.1%}')}): {status}")


def _audit(cli: Cli, report: Report) -> None:
    with Stage(report, "audit verify", "6. verify the audit chain") as stage:
        out = cli.json("audit", "verify")
        if not out["ok"]:
            raise DemoError(f"audit chain broken at row {out['first_broken_seq']}: {out['reason']}",
                            hint="keep the demo's home (--keep) and report it")
        actions = [e["action"] for e in cli.json("audit", "show", "--limit", "1000")["entries"]]
        families = sorted({a.split(".")[0] for a in actions})
        say(f"chain intact: {out['rows_checked']} rows ({', '.join(families)}); head {out['head_seq']}:"
            f"{out['head_hash'][:16]}...")
        stage.metric = f"chain intact, {out['rows_checked']} rows"
        report.facts["audit"] = {"ok": True, "rows": out["rows_checked"]}


def stop_job(cli: Cli, job_id: str, timeout: float = 60) -> None:
    """SIGTERM through `airlock jobs cancel`, wait for the job and its process to end, SIGKILL it if they do not."""
    with contextlib.suppress(DemoError):
        cli.run("jobs", "cancel", job_id)
    deadline = time.monotonic() + timeout
    pid = None
    while time.monotonic() < deadline:
        try:
            job = cli.json("jobs", "show", job_id)["job"]
        except DemoError:
            return
        pid = job.get("pid")
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    wait_for_exit(pid, _job_command(job_id), timeout=max(1.0, deadline - time.monotonic()))


def _job_command(job_id: str) -> tuple[str, ...]:
    """What a job process's command line holds (`python -m appliance.cli jobs run ID`): who it is, not a reused pid."""
    return ("jobs", "run", job_id)


def _running(pid: int | None, command: tuple[str, ...]) -> bool:
    """Whether `pid` is still the process whose command line holds `command` (an exited zombie is not running)."""
    if not pid:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and all(word in args for word in command)


def wait_for_exit(pid: int | None, command: tuple[str, ...], timeout: float = 60) -> None:
    """Wait for the process to exit; SIGKILL it after `timeout` seconds (a bound for a stuck process, not a
    duration the demo expects: a job's interpreter takes a few seconds to exit after it reports its end)."""
    deadline = time.monotonic() + timeout
    while _running(pid, command) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _running(pid, command):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _running(pid, command) and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_everything(cli: Cli, server_jobs: list[str]) -> list[str]:
    """Stop the given server jobs, any job still running in this home, and the key agent, and wait until their
    processes (and those of jobs that already ended) have exited. Returns what it stopped."""
    stopped = []
    if not (Path(cli.env["AIRLOCK_HOME"]) / "catalog.db").exists() and not server_jobs:
        return stopped
    jobs = list(server_jobs)
    listed = []
    with contextlib.suppress(DemoError):
        listed = cli.json("jobs", "list", "--limit", "10000")["jobs"]
    jobs += [j["id"] for j in listed if j["state"] in ("queued", "running")]
    for job in dict.fromkeys(jobs):
        stop_job(cli, job)
        stopped.append(job)
    # A job records its end a moment before its process exits: wait for those processes too, so
    # that nothing started for this home outlives the demo.
    for job in listed:
        wait_for_exit(job.get("pid"), _job_command(job["id"]))
    with contextlib.suppress(DemoError):
        agent = cli.json("vault", "status").get("agent_pid")
        cli.run("vault", "lock")
        wait_for_exit(agent, ("appliance.vault.agent",), timeout=30)
        if agent:
            stopped.append(f"key agent {agent}")
    return stopped


def load_report(path: Path) -> Report:
    return Report.from_dict(json.loads(path.read_text()))
