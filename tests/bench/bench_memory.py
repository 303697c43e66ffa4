"""Memory and speed of a LoRA step on the real 1.5B shape, on CPU: bf16 base vs fp32, planned vs measured.

    .venv/bin/python tests/bench/bench_memory.py [--seq 256] [--model-dir DIR]

The model is DeepSeek-R1-Distill-Qwen-1.5B's exact shape with random bf16 weights
(models/build_random_r1_distill.py), built once into `.cache/r1-distill-qwen-1.5b-random`
(~3.6 GB, about a minute). Each variant runs `train_lora` (the real code path: memory plan, load,
packing, autocast, LoRA, AdamW) for two steps of one packed row of `--seq` tokens, in its own
process, so its peak RSS (`wait4`'s rusage of that child) is its own. Prints, measured in one run:

- peak RSS of the bf16-base run / the fp32 run (goal <= 0.55x),
- seconds per step of each (the second step; the first also pays one-off allocations),
- the memory planner's total vs the measured peak for each (goal: within 15%).

Needs ~12 GB of free RAM for the fp32 variant. Never fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL_DIR = REPO / ".cache" / "r1-distill-qwen-1.5b-random"
VARIANTS = ("bf16", "fp32")
PEAK_RATIO_GOAL = 0.55
PLAN_TOLERANCE = 0.15
NEEDS_FREE_BYTES = 14 * 1024 ** 3


def ensure_model(model_dir: Path) -> None:
    """Build the random 1.5B-shape model once (config.json is written last: its presence means complete)."""
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors.index.json").is_file():
        return
    started = time.perf_counter()
    print(f"building the 1.5B-shape random model into {model_dir} (once) ...", flush=True)
    # In its own process: Linux carries a parent's peak RSS into the children it forks, so this process
    # must stay small for the variants' peaks to be their own.
    subprocess.run([sys.executable, str(REPO / "models" / "build_random_r1_distill.py"), str(model_dir)],
                   check=True, cwd=REPO)
    print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)


def records(n: int = 64) -> list[dict]:
    """Long plain-text records (corpus snippets joined), so packing fills every row."""
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if '"text"' in line]
    rng = random.Random(7)
    return [{"text": " ".join(rng.sample(texts, min(len(texts), 12)))} for _ in range(n)]


def _sample_memory(peaks: dict[str, int], stop: list[bool]) -> None:
    """Peak anonymous and file-backed resident memory, sampled from /proc every 20 ms. Mapped file pages
    (the safetensors shards while they load) count in RSS but are clean: the kernel can drop them."""
    while not stop[0]:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        time.sleep(0.02)


def child(variant: str, model_dir: Path, seq: int) -> None:
    """One variant in this process: two `train_lora` steps; prints one JSON line."""
    import peft  # noqa: F401  (the runtime is loaded before the baseline is read)
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.memory_plan import plan_for
    from appliance.train.recipe import LoraRecipe

    recipe = LoraRecipe(precision=variant, batch_size=1, max_length=seq, max_steps=2, eval_every=10_000,
                        warmup_ratio=0.0)
    base = resolve_base_model(str(model_dir))
    plan = plan_for(base, recipe, device="cpu")
    marks: list[float] = []
    rss_after: list[int] = []  # resident between steps: weights, adapter, optimizer state, runtime

    def on_progress(_p) -> None:
        marks.append(time.perf_counter())
        rss_after.append(psutil.Process().memory_info().rss)

    baseline = psutil.Process().memory_info().rss  # now, not ru_maxrss (which starts at the parent's peak)
    peaks: dict[str, int] = {}
    stop = [False]
    sampler = threading.Thread(target=_sample_memory, args=(peaks, stop), daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = train_lora(base, records(), [], recipe, on_progress=on_progress)
    stop[0] = True
    sampler.join()
    print(json.dumps({"variant": variant, "steps": result.steps, "plan": plan.to_dict(),
                      "first_step_s": marks[0] - started, "step_s": marks[1] - marks[0],
                      "runtime_rss": baseline, "rss_between_steps": rss_after[-1],
                      "peak_anon": peaks.get("RssAnon", 0), "peak_file": peaks.get("RssFile", 0),
                      "gradient_checkpointing": plan.checkpointing}), flush=True)


def run_variant(variant: str, model_dir: Path, seq: int) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir), "--seq", str(seq)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    output = process.stdout.read()  # to its end: the child has exited or is exiting
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS alone
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{variant} variant failed (exit {process.returncode}); its output:\n{output}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256, help="tokens in the packed row of each step")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.seq)
        return
    import psutil

    gib = 1024 ** 3
    free = psutil.virtual_memory().available
    if free < NEEDS_FREE_BYTES:
        print(f"skipped: the fp32 variant needs ~{NEEDS_FREE_BYTES / gib:.0f} GiB of free RAM, "
              f"{free / gib:.1f} GiB are free")
        return
    ensure_model(args.model_dir)
    results = {}
    for variant in VARIANTS:
        results[variant] = r = run_variant(variant, args.model_dir, args.seq)
        plan = r["plan"]
        terms = ", ".join(f"{k} {plan[k] / gib:.2f}" for k in ("weights", "adapter", "optimizer", "activations",
                                                               "logits", "overhead"))
        print(f"{variant}: peak RSS {r['peak_rss'] / gib:.2f} GiB, planned {plan['total'] / gib:.2f} GiB "
              f"({terms}), {r['step_s']:.1f} s/step (first step {r['first_step_s']:.1f} s incl. load), "
              f"1 x {args.seq} tokens, gradient checkpointing {r['gradient_checkpointing']}", flush=True)
        print(f"  runtime before loading {r['runtime_rss'] / gib:.2f} GiB, resident between steps "
              f"{r['rss_between_steps'] / gib:.2f} GiB (peak - between steps: "
              f"{(r['peak_rss'] - r['rss_between_steps']) / gib:.2f} GiB); sampled peaks: anonymous "
              f"{r['peak_anon'] / gib:.2f} GiB, file-backed {r['peak_file'] / gib:.2f} GiB", flush=True)
    bf16, fp32 = results["bf16"], results["fp32"]
    ratio = bf16["peak_rss"] / fp32["peak_rss"]
    growth = (bf16["peak_rss"] - bf16["runtime_rss"]) / (fp32["peak_rss"] - fp32["runtime_rss"])
    print(f"peak RSS bf16 / fp32: {ratio:.2f}x (goal <= {PEAK_RATIO_GOAL}x); above the runtime: {growth:.2f}x")
    print(f"seconds per step: bf16 {bf16['step_s']:.1f}, fp32 {fp32['step_s']:.1f} "
          f"(bf16 / fp32 {bf16['step_s'] / fp32['step_s']:.2f}x)")
    for variant, r in results.items():
        error = r["plan"]["total"] / r["peak_rss"] - 1
        print(f"planner vs measured peak, {variant}: {r['plan']['total'] / gib:.2f} vs {r['peak_rss'] / gib:.2f} GiB "
              f"({error:+.0%}; goal within {PLAN_TOLERANCE:.0%})")


if __name__ == "__main__":
    main()
