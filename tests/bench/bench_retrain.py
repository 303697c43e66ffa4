"""Incremental retraining vs a full retrain, after 10% new data arrived: the LM, then an image classifier.

    .venv/bin/python tests/bench/bench_retrain.py [--records 600] [--epochs 1] [--images 400] [--classifier-steps 600]
                                                  [--no-classifier]

Real path, one run, one machine: a throwaway AIRLOCK_HOME, a vault (test KDF parameters), the demo
corpus imported as dataset version 1 (90%) and version 2 (the new 10%), v1 trained and promoted.
Then, as jobs through the CLI, both with the same epoch-based recipe:
  full     `airlock train lm` on versions 1-2 (everything again)
  retrain  `airlock retrain` (new records + 20% replay, continued from v1, then the gates)
Prints each job's wall time, the retrain's own split (training vs measuring the gates) and the
ratios. The classifier part does the same with noisy disc/square PNGs (32 x 32; a fixed step count,
which a retrain scales to its mix). Never fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PASSPHRASE = "bench retrain pass phrase"


def airlock(*args: str, env: dict[str, str]) -> dict | str:
    result = subprocess.run([str(BIN / "airlock"), *args], capture_output=True, text=True, env=env, cwd=REPO,
                            check=False)
    if result.returncode not in (0, 1):
        raise SystemExit(f"airlock {' '.join(args)} failed:\n{result.stderr}")
    return json.loads(result.stdout) if "--json" in args else result.stdout


def seconds(job: dict) -> float:
    start, end = (datetime.fromisoformat(job[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
    return (end - start).total_seconds()


def classifier_ratio(root: Path, env: dict[str, str], images: int, steps: int) -> None:
    """The same comparison for an image classifier: 90% of `images` as version 1, the new 10% as version 2."""
    sys.path.insert(0, str(REPO))
    from tests.appliance.registry.test_classifier_retrain import write_shapes

    first, new = images * 9 // 10, images - images * 9 // 10
    write_shapes(root / "img1", first, seed=1)
    write_shapes(root / "img2", new, seed=2, inverted=True)
    recipe = root / "cls.toml"
    recipe.write_text(f"max_steps = {steps}\neval_every = 100000\nbatch_size = 16\nlr = 3e-3\naugment = false\n")
    size = ["--image-size", "32", "--split", "80/10/10"]
    airlock("data", "import", str(root / "img1"), "--name", "imgs", *size, env=env)
    first_run = airlock("train", "classifier", "--base", "tiny-resnet-cls", "--data", "imgs", "--recipe", str(recipe),
                        "--task", "imgs", "--wait", "--json", env=env)
    airlock("models", "promote", first_run["job"]["result"]["version"], "--reason", "bench", env=env)
    airlock("data", "import", str(root / "img2"), "--name", "imgs", *size, env=env)
    full = airlock("train", "classifier", "--base", "tiny-resnet-cls", "--data", "imgs", "--recipe", str(recipe),
                   "--wait", "--json", env=env)
    inc = airlock("retrain", "imgs", "--replay", "0.2", "--wait", "--json", env=env)
    full_s, inc_s = seconds(full["job"]), seconds(inc["job"])
    mix, timings = inc["run"]["lineage"]["records"], inc["run"]["metrics"]["timings_s"]
    print(f"classifier: {first} + {new} new images (32 x 32), {steps} steps of 16 for a full run")
    print(f"full retrain     {full_s:7.1f} s  ({full['run']['metrics']['steps']} steps on "
          f"{full['run']['metrics']['records']['train']} train images)")
    print(f"incremental      {inc_s:7.1f} s  ({inc['run']['metrics']['steps']} steps on {mix['new_train']} new + "
          f"{mix['replay_train']} replayed train images; training {timings['train']:.1f} s, "
          f"gates {timings['gates']:.1f} s)")
    print(f"ratio incremental / full (job wall time): {inc_s / full_s:.2f}; optimizer steps: "
          f"{inc['run']['metrics']['steps'] / full['run']['metrics']['steps']:.2f}")
    print(f"gates: {inc['version']['state']}" + (f" ({'; '.join(inc['version']['reasons'])})"
                                                 if inc["version"]["reasons"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=600, help="corpus records in the dataset")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=400, help="images in the classifier's dataset")
    parser.add_argument("--classifier-steps", type=int, default=600, help="steps of a full classifier run")
    parser.add_argument("--no-classifier", action="store_true", help="only the language model")
    args = parser.parse_args()

    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    lines = list(dict.fromkeys(lines))
    random.Random(11).shuffle(lines)
    lines = lines[:args.records]
    cut = len(lines) * 9 // 10
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "AIRLOCK_HOME": str(root / "home"), "AIRLOCK_KDF_PROFILE": "test"}
        (root / "pass.txt").write_text(PASSPHRASE + "\n")
        recipe = root / "recipe.toml"
        recipe.write_text(f"epochs = {args.epochs}\neval_every = 1000\nbatch_size = 8\nmax_length = 64\n"
                          "lr = 2e-3\nseed = 1\n")
        for part, chunk in (("v1", lines[:cut]), ("v2", lines[cut:])):
            (root / part).mkdir()
            (root / part / "data.jsonl").write_text("\n".join(chunk) + "\n", encoding="utf-8")
        airlock("vault", "init", "--passphrase-file", str(root / "pass.txt"), env=env)
        airlock("vault", "unlock", "--passphrase-file", str(root / "pass.txt"), env=env)
        try:
            airlock("data", "import", str(root / "v1"), "--name", "bench", "--near-dup", "off", env=env)
            first = airlock("train", "lm", "--base", "tiny-deepseek-r1", "--data", "bench", "--recipe", str(recipe),
                            "--task", "bench", "--wait", "--json", env=env)
            airlock("models", "promote", first["job"]["result"]["version"], "--reason", "bench", env=env)
            airlock("data", "import", str(root / "v2"), "--name", "bench", "--near-dup", "off", env=env)
            full = airlock("train", "lm", "--base", "tiny-deepseek-r1", "--data", "bench", "--recipe", str(recipe),
                           "--wait", "--json", env=env)
            inc = airlock("retrain", "bench", "--replay", "0.2", "--wait", "--json", env=env)
            report_lm(args, cut, len(lines) - cut, full, inc)
            if not args.no_classifier:
                classifier_ratio(root, env, args.images, args.classifier_steps)
        finally:
            airlock("vault", "lock", env=env)


def report_lm(args: argparse.Namespace, cut: int, new: int, full: dict, inc: dict) -> None:
    full_s, inc_s = seconds(full["job"]), seconds(inc["job"])
    timings = inc["run"]["metrics"]["timings_s"]
    mix = inc["run"]["lineage"]["records"]
    print(f"dataset: {cut} + {new} new records; recipe: {args.epochs:g} epoch(s), batch 8 x 64 tokens")
    print(f"full retrain     {full_s:7.1f} s  ({full['run']['metrics']['steps']} steps on "
          f"{full['run']['metrics']['records']['train']} train records)")
    print(f"incremental      {inc_s:7.1f} s  ({inc['run']['metrics']['steps']} steps on {mix['new_train']} new + "
          f"{mix['replay_train']} replayed train records; training {timings['train']:.1f} s, "
          f"gates {timings['gates']:.1f} s)")
    print(f"ratio incremental / full (job wall time): {inc_s / full_s:.2f}; optimizer steps: "
          f"{inc['run']['metrics']['steps'] / full['run']['metrics']['steps']:.2f}")
    print("(the full job also generates test-split samples; the retrain measures both models on every test split)")
    print(f"gates: {inc['version']['state']}" + (f" ({'; '.join(inc['version']['reasons'])})"
                                                 if inc["version"]["reasons"] else ""))


if __name__ == "__main__":
    main()
