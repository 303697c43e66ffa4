"""Incremental retraining vs a full retrain, after 10% new data arrived.

    .venv/bin/python tests/bench/bench_retrain.py [--records 600] [--epochs 1]

Real path, one run, one machine: a throwaway AIRLOCK_HOME, a vault (test KDF parameters), the demo
corpus imported as dataset version 1 (90%) and version 2 (the new 10%), v1 trained and promoted.
Then, as jobs through the CLI, both with the same epoch-based recipe:
  full     `airlock train lm` on versions 1-2 (everything again)
  retrain  `airlock retrain` (new records + 20% replay, continued from v1, then the gates)
Prints each job's wall time, the retrain's own split (training vs measuring the gates) and the
ratios. Never fails on time.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=600, help="corpus records in the dataset")
    parser.add_argument("--epochs", type=float, default=1.0)
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
        finally:
            airlock("vault", "lock", env=env)
    full_s, inc_s = seconds(full["job"]), seconds(inc["job"])
    timings = inc["run"]["metrics"]["timings_s"]
    mix = inc["run"]["lineage"]["records"]
    print(f"dataset: {cut} + {len(lines) - cut} new records; recipe: {args.epochs:g} epoch(s), batch 8 x 64 tokens")
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
