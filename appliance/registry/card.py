"""Model cards and version diffs, from catalog metadata only (an auditor can read them; nothing is decrypted).

    airlock models card maint-qa-v2                  # Markdown on stdout
    airlock models card maint-qa-v2 --html card.html # the same card as one HTML file, every value escaped

A card says what the model is for, what it was built from (base model and hash, dataset versions
with their content hashes, split counts, import dates, de-identification profile: never a
record), how (recipe), how well against the production version it replaced (a classifier:
also its operating point, the confusion there, calibration), which gates it passed, what
engines exist, its known limits and its lineage as a text tree. It is built once as blocks and
rendered to Markdown or HTML, so both always say the same.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.registry.versions import ModelVersion, get_task, get_version, list_versions, promotions

if TYPE_CHECKING:
    import sqlite_utils

SMALL_TEST_SPLIT = 30


@dataclass(frozen=True)
class Block:
    kind: str
    """h1 | h2 | p | ul | table | pre"""
    text: str = ""
    items: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def _h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def _table(headers: list[str], rows: list[list[Any]]) -> Block:
    return Block("table", headers=tuple(headers), rows=tuple(tuple(_cell(v) for v in row) for row in rows))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


# --- metrics -------------------------------------------------------------------------------------------------------

def headline_metrics(version: ModelVersion) -> dict[str, float | None]:
    """The comparable numbers of a version, by display name."""
    m = version.metrics
    test = m.get("test") if isinstance(m.get("test"), dict) else {}
    if version.kind == "classifier":
        op = test.get("operating_point") if isinstance(test.get("operating_point"), dict) else {}
        return {"val AUC": m.get("val_auc"), "best val AUC": m.get("best_val_auc"),
                "test accuracy": test.get("accuracy"), "test AUC": test.get("roc_auc"),
                "test sensitivity at the operating point": op.get("sensitivity"),
                "test expected calibration error": test.get("ece")}
    out = {"val loss": m.get("val_loss"), "best val loss": m.get("best_val_loss")}
    if "loss" in test:  # a training run's own test split (registered versions)
        out.update({"test loss": test.get("loss"), "test perplexity": test.get("perplexity"),
                    "token accuracy": test.get("token_accuracy"), "ROUGE-L": test.get("rouge_l")})
    return out


def _metric_rows(version: ModelVersion, previous: ModelVersion | None) -> list[list[Any]]:
    ours = headline_metrics(version)
    theirs = headline_metrics(previous) if previous else {}
    rows = []
    for name, value in ours.items():
        other = theirs.get(name)
        delta = value - other if isinstance(value, int | float) and isinstance(other, int | float) else None
        rows.append([name, value, other, None if delta is None else f"{delta:+.4f}"])
    return rows


def _sensitivity_text(op: dict[str, Any] | None) -> str:
    """'sensitivity 0.8000 (95% CI 0.49-0.94) at threshold 0.3712', or why it is not measured."""
    if not op:
        return "sensitivity not measured"
    if op.get("sensitivity") is None:
        return f"sensitivity not measured ({op.get('reason') or 'no operating point'})"
    ci = op.get("sensitivity_ci")
    interval = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
    return f"sensitivity {op['sensitivity']:.4f}{interval} at threshold {op['threshold']:.4f}"


def _split_row(label: str, entry: dict[str, Any], gate: dict[str, Any]) -> list[Any]:
    if "production_roc_auc" in entry:  # an image classifier: AUC, accuracy (and sensitivity), higher is better
        gated = any((entry.get(f"{side}_operating_point") or {}).get("site_chosen")
                    for side in ("production", "candidate"))

        def both(side: str) -> str:
            text = f"AUC {_cell(entry.get(f'{side}_roc_auc'))}, accuracy {_cell(entry.get(f'{side}_accuracy'))}"
            return text + (f", {_sensitivity_text(entry.get(f'{side}_operating_point'))}" if gated else "")

        change = f"AUC {_pct(entry.get('roc_auc_change'))}, accuracy {_pct(entry.get('accuracy_change'))}"
        if gated:
            change += f", sensitivity {_pct(entry.get('sensitivity_change'))}"
        limit = f"limit -{(gate.get('max_relative_decrease') or 0) * 100:.1f}%"
        return [f"{label}: {entry['split']}", entry["records"], both("production"), both("candidate"), change,
                f"{entry['status']} ({limit})"]
    return [f"{label}: {entry['split']}", entry["records"], entry.get("production_loss"), entry.get("candidate_loss"),
            _pct(entry.get("relative_change")), f"{entry['status']} (limit {_pct(gate.get('max_relative_increase'))})"]


def operating_point_blocks(version: ModelVersion) -> list[Block]:
    """A classifier's operating point on its test images: how it was chosen, sensitivity and specificity
    with Wilson 95% intervals, the confusion there, and the expected calibration error."""
    test = version.metrics.get("test") if isinstance(version.metrics.get("test"), dict) else {}
    op = test.get("operating_point") if isinstance(test.get("operating_point"), dict) else None
    blocks = [_h(2, "Operating point and calibration")]
    if op is None:
        return [*blocks, Block("p", "Not measured: this version's test metrics record no operating point (no test "
                                    "images, or trained before operating points were measured).")]
    chosen = op.get("chosen_by") or "no threshold could be set"
    text = f"Positive class {op.get('class') or '(none)'}; " + (
        f"threshold {op['threshold']:.4f} on its probability, from {chosen}." if op.get("threshold") is not None
        else f"{chosen}.")
    if not op.get("site_chosen"):
        text += (f" The site has not chosen an operating point, so the gates do not judge sensitivity; set one with "
                 f"`airlock models policy {version.task} --operating-specificity 0.9` (or --operating-threshold).")
    if op.get("reason"):
        text += f" Not measured: {op['reason']}."
    blocks.append(Block("p", text))

    def row(name: str, value: float | None, ci: list[float] | None) -> list[str]:
        if value is None:
            return [name, "not measured", "not measured"]
        return [name, f"{value:.4f}", f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else "not measured"]

    blocks.append(_table(["on the test images", "value", "95% CI (Wilson)"],
                         [row("sensitivity", op.get("sensitivity"), op.get("sensitivity_ci")),
                          row("specificity", op.get("specificity"), op.get("specificity_ci"))]))
    confusion = op.get("confusion")
    if confusion:
        positive = op.get("class")
        blocks.append(_table(["true class", f"called {positive}", f"called not {positive}"],
                             [[positive, confusion["tp"], confusion["fn"]],
                              [f"not {positive}", confusion["fp"], confusion["tn"]]]))
    ece = test.get("ece")
    blocks.append(Block("p", "Calibration: " + (
        f"expected calibration error {ece:.4f} (top-label confidence against accuracy, 10 equal-width bins; "
        "0 is perfectly calibrated)." if ece is not None else "not measured (no test images).")))
    return blocks


def _engine_row(gate: dict[str, Any]) -> list[Any]:
    measured, limits = gate.get("measured", {}), gate.get("thresholds", {})
    numbers = ", ".join(f"{k} {_cell(v)}" for k, v in measured.items() if k in ("max_rel_diff", "top1_agreement",
                                                                                    "accuracy_onnx", "greedy_equal"))
    quality = gate.get("quality") or {}
    if quality.get("metric") == "perplexity":
        numbers = ", ".join(x for x in (numbers, f"perplexity {_cell(quality.get('variant'))} vs float "
                                                 f"{_cell(quality.get('float'))}") if x)
    engine = gate.get("engine", {})
    where = "TensorRT engine built" if engine.get("built") else "ONNX Runtime only (no engine built)"
    result = gate["status"] + (f": {'; '.join(gate['failures'])}" if gate.get("failures") else "")
    if limits:
        result += (f" (limits: max rel diff {_cell(limits.get('max_rel_diff'))}, min top-1 "
                   f"{_cell(limits.get('min_top1_agreement'))}, {limits.get('source')})")
    quant = f", {gate['quantization'].upper()}" if gate.get("quantization") else ""
    return [f"engine parity: {gate.get('variant', '?')}{quant} ONNX vs PyTorch", measured.get("samples",
            measured.get("prompts", "-")), "PyTorch (reference)", numbers or "-", where, result]


def _gate_rows(version: ModelVersion) -> list[list[Any]]:
    rows = []
    forgetting = version.gates.get("forgetting", {})
    for entry in forgetting.get("splits", []):
        rows.append(_split_row("forgetting", entry, forgetting))
    new = version.gates.get("new_data", {})
    if "split" in new:
        rows.append(_split_row("new data", new, new))
    engine = version.gates.get("engine_parity", {})
    if engine.get("status") in ("pass", "fail"):
        rows.append(_engine_row(engine))
    for name in ("forgetting", "new_data", "engine_parity"):
        gate = version.gates.get(name, {})
        if gate.get("status") in ("not_applicable", "not_evaluated") and not gate.get("splits"):
            rows.append([name.replace("_", " "), "-", "-", "-", "-", f"{gate['status']}: {gate.get('reason', '')}"])
    return rows


def _ewc_text(recipe: dict[str, Any], metrics: dict[str, Any]) -> str:
    ewc = metrics.get("ewc")
    if ewc:
        return (f"EWC: lambda {ewc['lambda']:g}, diagonal Fisher of {ewc['parameters']:,} trainable weights from "
                f"{ewc['fisher_batches']} batches of earlier train records (last penalty {ewc['last_penalty']:.4g}).")
    if recipe.get("ewc_lambda"):
        return f"EWC: lambda {recipe['ewc_lambda']:g}."
    return "EWC: off (lambda 0)."


# --- data ----------------------------------------------------------------------------------------------------------

def _data_blocks(db: sqlite_utils.Database, version: ModelVersion) -> list[Block]:
    from appliance.data import datasets

    blocks: list[Block] = []
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for entry in version.dataset_versions:
        by_dataset.setdefault(entry["dataset_id"], []).append(entry)
    for dataset_id, entries in by_dataset.items():
        row = db.execute("SELECT name, kind, profile, split_spec, state FROM datasets WHERE id = ?",
                         [dataset_id]).fetchone()
        name, kind, profile, split_spec, state = row if row else (entries[0]["name"], "?", "?", "?", "unknown")
        last = max(e["version"] for e in entries)
        counts = {"train": 0, "val": 0, "test": 0}
        for split, count in db.execute("SELECT split, COUNT(*) FROM dataset_records WHERE dataset_id = ? AND "
                                       "version <= ? GROUP BY split", [dataset_id, last]):
            counts[split] = count
        stored = {v.version: v for v in datasets.versions(db, dataset_id)}
        dates = sorted(stored[e["version"]].created_at for e in entries if e["version"] in stored)
        blocks.append(Block("ul", items=(
            f"dataset {name} ({dataset_id}), {kind}, versions 1-{last}" + (" (since deleted)" if state == "deleted"
                                                                          else ""),
            f"records: {counts['train']} train, {counts['val']} val, {counts['test']} test (split {split_spec}, "
            "by a seeded hash: a record never changes split)",
            f"imported: {dates[0]} to {dates[-1]}" if dates else "imported: (dates not in the catalog)",
            f"de-identification profile: {profile}" + (" (PII scrub, DICOM PS3.15 Annex E)" if profile == "medical"
                                                       else ""))))
        blocks.append(_table(["version", "imported", "records added", "content hash (SHA-256)"],
                             [[e["version"], stored[e["version"]].created_at if e["version"] in stored else None,
                               stored[e["version"]].records_added if e["version"] in stored else None,
                               e["content_hash"]] for e in entries]))
    return blocks


# --- lineage -------------------------------------------------------------------------------------------------------

def _describe(db: sqlite_utils.Database, version: ModelVersion) -> str:
    run = db.execute("SELECT lineage FROM runs WHERE id = ?", [version.run_id]).fetchone()
    lineage = json.loads(run[0]) if run else {}
    retrain = lineage.get("retrain")
    data = ", ".join(f"{d['name']} v{d['version']}" for d in version.dataset_versions[-1:])
    if retrain:
        how = f"retrain from {retrain['parent']} ({'continued' if retrain['init'] == 'production' else 'fresh'}, " \
              f"replay {retrain['replay']:g})"
    else:
        how = f"run {version.run_id}"
    return f"{how}; data up to {data}" if data else how


def lineage_text(db: sqlite_utils.Database, version: ModelVersion) -> str:
    """Every version of the task as a tree by parent, this one marked."""
    everything = list_versions(db, task=version.task)
    children: dict[str | None, list[ModelVersion]] = {}
    for v in everything:
        children.setdefault(v.parent_id, []).append(v)
    lines: list[str] = []

    def walk(node: ModelVersion, prefix: str, last: bool, root: bool) -> None:
        branch = "" if root else ("└── " if last else "├── ")
        mark = "   <- this card" if node.id == version.id else ""
        lines.append(f"{prefix}{branch}{node.id} [{node.state}] {_describe(db, node)}{mark}")
        kids = children.get(node.id, [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if root else ("    " if last else "│   ")), i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(lines)


# --- the card ------------------------------------------------------------------------------------------------------

def card_blocks(db: sqlite_utils.Database, version_id: str) -> list[Block]:
    from appliance.audit import canonical_json

    version = get_version(db, version_id)
    task = get_task(db, version.task)
    previous = get_version(db, version.parent_id) if version.parent_id else None
    run_row = db.execute("SELECT recipe, lineage, dataset_name FROM runs WHERE id = ?", [version.run_id]).fetchone()
    recipe = json.loads(run_row[0]) if run_row else {}
    lineage = json.loads(run_row[1]) if run_row else {}
    history = [p for p in promotions(db, version.task) if version.id in (p["version"], p["previous"])]
    what = "language model (LoRA adapter)" if version.kind == "lm" else "image classifier"
    blocks = [_h(1, f"Model card: {version.id}")]
    state = f"State: {version.state} since {version.state_changed_at}."
    if history:
        last = history[-1]
        direction = "to" if last["version"] == version.id else "away from"
        state += (f" Last change: {last['action']} {direction} this version by {last['actor']} at {last['at']}: "
                  f"{last['reason'] or '(no reason given)'}.")
    blocks += [Block("p", f"Task {version.task}, version {version.number}; created {version.created_at} by "
                          f"{version.actor}; code version {version.code_version}. {state}")]

    blocks += [_h(2, "Intended use"), Block("p", (
        f"Task `{task.name}`: a {what} fine-tuned on this site's dataset for its own staff, served on the site's "
        "network. Its outputs are suggestions for trained people to check; it is not for unsupervised clinical, "
        "safety or legal decisions, and not for data unlike its training data (see Data)."))]

    blocks += [_h(2, "Base model"), Block("ul", items=(
        f"name: {version.base_model}", f"SHA-256 of its files: {version.base_hash or '(not recorded)'}"))]

    blocks += [_h(2, "Data"), Block("p", "Counts, dates and hashes only; record contents never leave the vault.")]
    blocks += _data_blocks(db, version)
    mix = lineage.get("records", {})
    if "new_train" in mix:
        blocks.append(Block("p", f"This retrain read {mix['new_train']} new train records and replayed "
                                 f"{mix['replay_train']} of {mix['earlier_train']} earlier ones "
                                 f"({mix.get('new_val', 0)} new + {mix.get('replay_val', 0)} replayed val records)."))

    blocks += [_h(2, "Training recipe"), Block("p", f"Recipe SHA-256 {version.recipe_hash}.")]
    retrain = lineage.get("retrain")
    if retrain:
        blocks.append(Block("p", f"Incremental retrain of {retrain['parent']}: "
                                 + ("continued from its adapter" if retrain["init"] == "production"
                                    else "a fresh adapter")
                                 + f", replay share {retrain['replay']:g} (seed {retrain['replay_seed']}), new data "
                                   f"after dataset version {retrain['since_version']}. "
                                 + _ewc_text(recipe, version.metrics)))
    blocks.append(_table(["field", "value"], [[k, canonical_json(v) if isinstance(v, list | dict)
                                               else f"{v:g}" if isinstance(v, float) else v]
                                              for k, v in sorted(recipe.items())]))

    label = f"previous production ({previous.id})" if previous else "previous production"
    blocks += [_h(2, "Metrics")]
    if previous is None:
        blocks.append(Block("p", "There was no production version to compare with."))
    else:
        blocks.append(Block("p", "Each version's numbers come from its own run, on its own validation and test "
                                 "records; the gates below compare both versions on the same test splits."))
    blocks.append(_table(["metric", "this version", label, "delta"], _metric_rows(version, previous)))
    if version.kind == "classifier":
        blocks += operating_point_blocks(version)
    blocks += [_h(2, "Gates"), _table(["gate", "test records", "production", "this version", "change", "result"],
                                      _gate_rows(version))]
    judged_at = version.gates.get("forgetting", {}).get("operating_point")
    if judged_at:
        blocks.append(Block("p", f"Operating point the gates read (task policy at the retrain): {judged_at}."))
    if version.reasons:
        blocks.append(Block("ul", items=tuple(f"rejected: {r}" for r in version.reasons)))

    blocks += [_h(2, "Quantization and engines")]
    derived = {k: v for k, v in version.artifacts.items() if k in ("onnx_fp32", "onnx_fp16", "onnx_int8", "engine",
                                                                     "genai_fp32", "genai_int8", "genai_int4")}
    engine_gate = version.gates.get("engine_parity", {})
    if engine_gate.get("status") in ("pass", "fail"):
        engine = engine_gate.get("engine") or {}
        stages = "; ".join(f"{stage}: " + ", ".join(f"{k} {_cell(v)}" for k, v in numbers.items())
                           for stage, numbers in (engine_gate.get("metrics") or {}).items() if numbers)
        blocks.append(Block("ul", items=tuple(x for x in (
            f"engine parity gate: {engine_gate['status']}, {engine_gate.get('variant')} export measured on "
            f"{engine_gate.get('runtime')}",
            f"quantization metrics: {stages}" if stages else "",
            ("TensorRT engine built: " + ", ".join(f"{k} {engine[k]}" for k in ("gpu", "sm", "tensorrt")
                                                    if k in engine)) if engine.get("built")
            else f"no TensorRT engine built: {engine.get('reason', 'the gate failed first')}") if x)))
    if derived:
        blocks.append(_table(["artifact", "details"], [[k, canonical_json(v)] for k, v in sorted(derived.items())]))
    else:
        blocks.append(Block("p", "None yet: no QAT, ONNX export or TensorRT engine is recorded for this version."))
    blocks.append(_table(["artifact", "vault object", "file", "SHA-256 (plaintext)"],
                         [[k, v.get("object"), v.get("file"), v.get("sha256")]
                          for k, v in sorted(version.artifacts.items())]))

    blocks += [_h(2, "Known limits"), Block("ul", items=tuple(_limits(version, lineage)))]
    blocks += [_h(2, "Lineage"), Block("pre", lineage_text(db, version))]
    return blocks


def _limits(version: ModelVersion, lineage: dict[str, Any]) -> list[str]:
    limits = ["Measured only on this site's held-out test records, by loss and the metrics above; no external "
              "benchmark and no human review are recorded here."]
    sizes = [e["records"] for e in version.gates.get("forgetting", {}).get("splits", [])]
    new = version.gates.get("new_data", {})
    if "records" in new:
        sizes.append(new["records"])
    if not sizes:
        sizes = [(lineage.get("records") or {}).get("test") or 0]
    small = [s for s in sizes if s < SMALL_TEST_SPLIT]
    if small:
        limits.append(f"Small test splits ({', '.join(map(str, small))} records): differences of a few percent "
                      "are within noise.")
    if all(g.get("status") == "not_evaluated" for g in version.gates.values() if isinstance(g, dict)):
        limits.append("Gates were not evaluated: this version was registered from a training run, so a person "
                      "decides its promotion from this card.")
    truncated = version.metrics.get("truncated_examples")
    if truncated:
        limits.append(f"{truncated} training examples were longer than max_length and were truncated.")
    if version.dataset_versions:
        latest = version.dataset_versions[-1]
        limits.append(f"Knows nothing imported after {latest['name']} version {latest['version']}.")
    limits.append(f"A LoRA adapter cannot exceed what the base model {version.base_model} can represent."
                  if version.kind == "lm" else "Trained on this site's images; other scanners or protocols may "
                                                "differ.")
    return limits


# --- rendering -----------------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind in ("h1", "h2"):
            out.append(("# " if block.kind == "h1" else "## ") + block.text)
        elif block.kind == "p":
            out.append(block.text)
        elif block.kind == "ul":
            out.append("\n".join(f"- {item}" for item in block.items))
        elif block.kind == "pre":
            out.append(f"```text\n{block.text}\n```")
        elif block.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                     "|" + "|".join("---" for _ in block.headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("\n".join(lines))
        out.append("")
    return "\n".join(out)


def to_html(blocks: list[Block]) -> str:
    """One self-contained HTML page; every value is escaped (reasons and names are typed by people)."""
    e = html.escape
    title = next((b.text for b in blocks if b.kind == "h1"), "Model card")
    body: list[str] = []
    for block in blocks:
        if block.kind in ("h1", "h2", "p"):
            body.append(f"<{block.kind}>{e(block.text)}</{block.kind}>")
        elif block.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>")
        elif block.kind == "pre":
            body.append(f"<pre>{e(block.text)}</pre>")
        elif block.kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block.headers)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:2px 6px;text-align:left}pre{background:#f4f4f4;padding:1em}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- diff ----------------------------------------------------------------------------------------------------------

def diff_versions(db: sqlite_utils.Database, a_id: str, b_id: str) -> dict[str, Any]:
    """What differs between two versions: lineage fields, recipe fields, metrics (with B - A deltas)."""
    a, b = get_version(db, a_id), get_version(db, b_id)
    fields = ["task", "kind", "state", "parent_id", "base_model", "base_hash", "recipe_hash", "code_version"]
    changed = {f: {"a": getattr(a, f), "b": getattr(b, f)} for f in fields if getattr(a, f) != getattr(b, f)}
    data_a = [[d["name"], d["version"], d["content_hash"]] for d in a.dataset_versions]
    data_b = [[d["name"], d["version"], d["content_hash"]] for d in b.dataset_versions]
    if data_a != data_b:
        changed["dataset_versions"] = {"a": data_a, "b": data_b}
    hashes_a = {k: v.get("sha256") for k, v in a.artifacts.items()}
    hashes_b = {k: v.get("sha256") for k, v in b.artifacts.items()}
    if hashes_a != hashes_b:
        changed["artifacts"] = {"a": hashes_a, "b": hashes_b}
    recipes = {}
    for side, version in (("a", a), ("b", b)):
        row = db.execute("SELECT recipe FROM runs WHERE id = ?", [version.run_id]).fetchone()
        recipes[side] = json.loads(row[0]) if row else {}
    recipe = {k: {"a": recipes["a"].get(k), "b": recipes["b"].get(k)}
              for k in sorted(set(recipes["a"]) | set(recipes["b"])) if recipes["a"].get(k) != recipes["b"].get(k)}
    ma, mb = headline_metrics(a), headline_metrics(b)
    metrics = {}
    for name in list(dict.fromkeys([*ma, *mb])):
        va, vb = ma.get(name), mb.get(name)
        delta = vb - va if isinstance(va, int | float) and isinstance(vb, int | float) else None
        metrics[name] = {"a": va, "b": vb, "delta": delta}
    return {"a": a.id, "b": b.id, "changed": changed, "recipe": recipe, "metrics": metrics}
